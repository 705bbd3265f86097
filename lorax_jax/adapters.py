"""The two trees: creating adapters, joining them with the frozen base, merging.

>>> spec = make_spec(params, [(r'kernel$', {'rank': 4})])          # doctest: +SKIP
>>> params, adapters = init(jax.random.key(0), params, spec)        # doctest: +SKIP
>>> y = lora(model.apply)(join(params, adapters), x)                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import paths
from lorax_jax import spec as spec_lib
from lorax_jax import variants


def is_adapter(x: Any) -> bool:
  """True for per-leaf adapter states (they carry their `LeafSpec` as `.spec`)."""
  return dataclasses.is_dataclass(x) and isinstance(getattr(x, 'spec', None), spec_lib.LeafSpec)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
  """A base leaf joined with its adapter; what `lora(fn)` sees in place of the leaf."""
  w: jax.Array
  adapter: Any


def is_adapted(x: Any) -> bool:
  return isinstance(x, Adapted)


def _leaf_key(key: jax.Array, path: str) -> jax.Array:
  # Keyed by the path so a leaf's init does not depend on which other leaves are adapted.
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init(key: jax.Array, params: Any, spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """Creates the adapter tree for `spec`.

  Args:
    key: a PRNG key; each leaf's init uses `fold_in(key, crc32(path))`.
    params: the base parameters (linen dict or NNX State).
    spec: from `make_spec(params, ...)`.

  Returns:
    `(params, adapters)`: `params` is returned untouched unless a weight-aware variant replaces
    a base leaf; `adapters` is a nested dict holding only the adapted and fully trained leaves.

  Raises:
    ValueError: if the spec does not fit `params`.
  """
  spec_lib.validate_against(params, spec)
  specs = spec_lib.spec_leaves(spec)
  adapters = {}
  changed = {}
  for path, keys, leaf in paths.leaves_with_paths(params):
    s = specs.get(path)
    if s is None:
      continue
    if s.variant == spec_lib.FULL:
      adapters[keys] = variants.FullParams(jnp.array(leaf, copy=True), s)
      continue
    w, adapter = variants.get(s.variant).init(_leaf_key(key, path), jnp.asarray(leaf), s)
    adapters[keys] = adapter
    if w is not leaf:
      changed[path] = w
  if changed:
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: changed.get(paths.path_str(kp), x), params)
  return params, paths.nest(adapters)


def _flat_adapters(adapters: Any) -> dict[str, Any]:
  if not adapters:
    return {}
  return paths.flat(adapters, is_leaf=is_adapter)


def _map_adapted(fn, params, adapters):
  """Applies `fn(path, w, adapter)` to every adapted leaf of `params`."""
  flat = _flat_adapters(adapters)
  used = set()

  def visit(kp, w):
    path = paths.path_str(kp)
    if path not in flat:
      return w
    adapter = flat[path]
    if not is_adapter(adapter):
      raise ValueError(f'Adapter at {path!r} is {type(adapter).__name__}, not an adapter state.')
    if tuple(np.shape(w)) != adapter.spec.shape:
      raise ValueError(f'Adapter for {path!r} was made for shape {adapter.spec.shape}, but the '
                       f'parameter has shape {tuple(np.shape(w))}.')
    used.add(path)
    return fn(path, w, adapter)

  out = jax.tree_util.tree_map_with_path(visit, params)
  missing = sorted(set(flat) - used)
  if missing:
    raise ValueError(f'Adapters for paths that are not in params: {missing[:10]}.')
  return out


def join(params: Any, adapters: dict[str, Any]) -> Any:
  """Returns `params` with every adapted leaf replaced by `Adapted(w, adapter)`.

  Pass the result to a function transformed by `lora(fn)`. Differentiate with respect to
  `adapters` (join inside the loss) so the base never gets a gradient.
  """
  return _map_adapted(lambda path, w, a: Adapted(w, a), params, adapters)


def split(joined: Any) -> tuple[Any, dict[str, Any]]:
  """The inverse of `join`: `(params, adapters)`."""
  adapters = {}

  def visit(kp, x):
    if isinstance(x, Adapted):
      adapters[paths.path_keys(kp)] = x.adapter
      return x.w
    return x

  params = jax.tree_util.tree_map_with_path(visit, joined, is_leaf=is_adapted)
  return params, paths.nest(adapters)


def count_params(adapters: Any) -> int:
  """Number of trainable scalars in an adapter tree."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(adapters)))


def merged_leaf(w: jax.Array, adapter: Any, sign: int = 1) -> jax.Array:
  """W + sign * dW for one leaf, computed in the promoted dtype of W and the adapter.

  Fully trained leaves give their trained value on merge and keep `w` on unmerge.
  """
  if isinstance(adapter, variants.FullParams):
    return adapter.value if sign > 0 else w
  cd = jnp.promote_types(w.dtype, jax.tree_util.tree_leaves(adapter)[0].dtype)
  dw = variants.get(adapter.spec.variant).delta(w.astype(cd), adapter)
  return (w.astype(cd) + sign * dw.astype(cd)).astype(w.dtype)


def _merge_leaf(path, w, adapter, sign):
  del path
  return merged_leaf(w, adapter, sign)


def _merge(params, adapters):
  return _map_adapted(functools.partial(_merge_leaf, sign=1), params, adapters)


def _unmerge(merged, adapters):
  return _map_adapted(functools.partial(_merge_leaf, sign=-1), merged, adapters)


_merge_jit = jax.jit(_merge)
_merge_jit_donate = jax.jit(_merge, donate_argnums=0)
_unmerge_jit = jax.jit(_unmerge)
_unmerge_jit_donate = jax.jit(_unmerge, donate_argnums=0)


def merge(params: Any, adapters: dict[str, Any], *, donate: bool = False) -> Any:
  """W + dW for every adapted leaf (fully trained leaves take their trained value). Jitted.

  Args:
    params: the base parameters.
    adapters: the adapter tree.
    donate: donate `params`' buffers to the result (the base is consumed).

  Returns:
    A parameter tree like `params` for the plain, un-transformed model.
  """
  return (_merge_jit_donate if donate else _merge_jit)(params, adapters)


def unmerge(merged: Any, adapters: dict[str, Any], *, donate: bool = False) -> Any:
  """W' - dW: recovers the base from `merge`'s output (up to rounding in the base dtype).

  Fully trained leaves keep their merged (trained) value: the original is not recoverable.
  """
  return (_unmerge_jit_donate if donate else _unmerge_jit)(merged, adapters)
