"""The variant registry: configs and rules name variants by string.

A new variant is a new module with a factory returning a `Variant`, and one entry here.
"""

from __future__ import annotations

from typing import Callable

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


__all__ = [
    'AdaloraParams', 'DoraParams', 'Factored', 'FullParams', 'LohaParams', 'LokrParams',
    'LoraFaParams', 'LoraParams', 'LoraXsParams', 'NolaParams', 'SoraParams', 'Tie',
    'TiedLoraParams', 'Variant', 'VeraParams',
    'adalora', 'dora', 'get', 'loha', 'lokr', 'lora', 'lora_fa', 'lora_fa_preconditioner',
    'lora_xs', 'names', 'nola', 'register', 'sora', 'tied_lora', 'vera',
]
