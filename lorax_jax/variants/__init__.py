"""The variant registry: configs and rules name variants by string.

A new variant is a new module with a factory returning a `Variant`, and one entry here.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from lorax_jax import quant
from lorax_jax.leafspec import LeafSpec

from lorax_jax.variants import base  # noqa: F401  (variants.base)
from lorax_jax.variants.adalora import AdaloraParams, adalora
from lorax_jax.variants.base import Factored, FullParams, Tie, Variant
from lorax_jax.variants.dora import DoraParams, dora
from lorax_jax.variants.loha import LohaParams, loha
from lorax_jax.variants.lokr import LokrParams, lokr
from lorax_jax.variants.lora import LoraParams, lora
from lorax_jax.variants.lora_fa import LoraFaParams, lora_fa, lora_fa_preconditioner
from lorax_jax.variants.lora_xs import LoraXsParams, lora_xs
from lorax_jax.variants.nola import NolaParams, nola
from lorax_jax.variants.sora import SoraParams, sora
from lorax_jax.variants.tied_lora import TiedLoraParams, tied_lora
from lorax_jax.variants.vera import VeraParams, vera

_FACTORIES: dict[str, Callable[[], Variant]] = {
    'lora': lora,
    'dora': dora,
    'vera': vera,
    'lora_fa': lora_fa,
    'loha': loha,
    'lokr': lokr,
    'lora_xs': lora_xs,
    'tied_lora': tied_lora,
    'nola': nola,
    'adalora': adalora,
    'sora': sora,
}
_CACHE: dict[str, Variant] = {}


def register(name: str, factory: Callable[[], Variant]) -> None:
  """Registers a variant factory under `name` (a plugin hook for research code)."""
  if name in _FACTORIES or name == 'full':
    raise ValueError(f'Variant {name!r} is already registered.')
  _FACTORIES[name] = factory


def names() -> tuple[str, ...]:
  return tuple(_FACTORIES)


def get(name: str) -> Variant:
  """Returns the variant registered as `name`; ValueError naming the allowed ones otherwise."""
  if name not in _FACTORIES:
    raise ValueError(f'Unknown variant {name!r}; allowed: {sorted(_FACTORIES)}.')
  if name not in _CACHE:
    _CACHE[name] = _FACTORIES[name]()
  return _CACHE[name]


def merged_leaf(w: jax.Array, adapter: Any, sign: int = 1, requantize: bool = False) -> Any:
  """W + sign * dW for one leaf, computed in the promoted dtype of W and the adapter.

  Fully trained leaves give their trained value on merge and keep `w` on unmerge. A quantized
  base is dequantized first; the result is a float leaf, or with `requantize` quantized again
  in the base's format (which adds one rounding of the merged weight).
  """
  if quant.is_quantized(w):
    out = merged_leaf(quant.dequantize_array(w), adapter, sign)
    return quant.requantize_like(out, w) if requantize else out
  if isinstance(adapter, FullParams):
    return adapter.value if sign > 0 else w
  cd = jnp.promote_types(w.dtype, jax.tree_util.tree_leaves(adapter)[0].dtype)
  dw = get(adapter.spec.variant).delta(w.astype(cd), adapter)
  return (w.astype(cd) + sign * dw.astype(cd)).astype(w.dtype)



def tie_of(adapter: Any) -> Tie | None:
  """The variant's `Tie` for an adapter state of a tied variant (Tied-LoRA), else None."""
  if not isinstance(getattr(adapter, 'spec', None), LeafSpec) or isinstance(adapter, FullParams):
    return None
  return get(adapter.spec.variant).tie


def tie_group(adapter: Any) -> tuple[str, Any]:
  """The tie group of a tied adapter state: `(variant, Tie.key(spec))`."""
  return adapter.spec.variant, tie_of(adapter).key(adapter.spec)


def resolve_ties(states: dict[str, Any]) -> dict[str, Any]:
  """`{path: state}` with every member of a tied group given its owner's shared arrays (by the
  variant's own `Tie`), so that each state's update can be formed on its own.

  Raises:
    ValueError: for a member whose group's owner is not among `states`.
  """
  owners = {tie_group(a): a for a in states.values()
            if tie_of(a) is not None and tie_of(a).is_owner(a)}
  out = dict(states)
  for path, a in states.items():
    tie = tie_of(a)
    if tie is None or tie.is_owner(a):
      continue
    if tie_group(a) not in owners:
      raise ValueError(f'{a.spec.variant!r} adapter at {path!r} shares its arrays with group '
                       f'{tie_group(a)[1]!r}, whose owning leaf is not in the adapter tree.')
    out[path] = tie.fill(a, owners[tie_group(a)])
  return out


__all__ = [
    'AdaloraParams', 'DoraParams', 'Factored', 'FullParams', 'LohaParams', 'LokrParams',
    'LoraFaParams', 'LoraParams', 'LoraXsParams', 'NolaParams', 'SoraParams', 'Tie',
    'TiedLoraParams', 'Variant', 'VeraParams',
    'adalora', 'dora', 'get', 'loha', 'lokr', 'lora', 'lora_fa', 'lora_fa_preconditioner',
    'lora_xs', 'merged_leaf', 'names', 'nola', 'register', 'resolve_ties', 'sora', 'tie_group',
    'tie_of', 'tied_lora', 'vera',
]
