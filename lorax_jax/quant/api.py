"""The tree-level quantization API over the registered formats (no format-specific code here).

`resolve_setting` validates a setting through its format; `quantize_array` / `dequantize_array`
encode and decode one leaf; `quantize` selects leaves by rules or by an adapter spec; the slicing
helpers let the interpreter cut a stacked quantized kernel per layer inside a scan; `layout` tells
sharding which leaf axes each stored array follows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import paths
from lorax_jax.leafspec import FULL, LeafSpec, spec_leaves
from lorax_jax.quant import base
from lorax_jax.quant.base import QuantizedArray, is_quantized
from lorax_jax.select import select

# The format of a setting without `type`.
DEFAULT_TYPE = 'nf4'


def resolve_setting(setting: Any, path: str, shape: tuple[int, ...]) -> dict[str, Any]:
  """Validated settings for a leaf of `shape` (named `path` in errors), defaults filled in, from
  a type name or a dict.

  Raises:
    ValueError: an unknown type or key, or a setting its format refuses (e.g. a block size that
      does not divide the block rows).
  """
  if isinstance(setting, str):
    setting = {'type': setting}
  keys = base.setting_keys()
  if not isinstance(setting, dict):
    raise ValueError(f'Quantization setting for {path!r} must be a type name {list(base.names())} '
                     f'or a dict with keys {list(keys)}; got {setting!r}.')
  unknown = sorted(set(setting) - set(keys))
  if unknown:
    raise ValueError(f'Unknown quantization keys {unknown} for {path!r}; allowed: {list(keys)}.')
  qtype = setting.get('type', DEFAULT_TYPE)
  fmt = base.get(qtype, path)
  s = {'type': qtype, **fmt.defaults, **{k: v for k, v in setting.items() if k != 'type'}}
  if not shape:
    raise ValueError(f'Cannot quantize the scalar at {path!r}.')
  s = fmt.resolve(s, path, tuple(shape))
  assert all(k in s for k in base.FIELDS), (qtype, s)
  return s


def quantize_array(w: jax.Array, setting: Any = 'nf4', *, path: str = 'array') -> QuantizedArray:
  """Quantizes one float array.

  Args:
    w: a float array (a kernel, a stacked kernel, an embedding table).
    setting: a type name (`'nf4'`, `'int4'`, `'int8'`, or another registered format) or a dict
      with `type` and optionally `block_size` (nf4/int4, default 64), `double_quant` (default
      True for nf4, False for int4), `dq_block_size` (default 256), `stack_axes` (nf4/int4:
      leading axes quantized slice by slice, default 0), `axes` (int8: the reduced axes of its
      per-channel scales).
    path: named in error messages.

  Returns:
    A `QuantizedArray` with `w`'s shape and dtype.

  Raises:
    ValueError: an unknown type or key, or a block size that does not divide the last dimension.
  """
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f'Cannot quantize {path!r}: dtype {w.dtype} is not a float dtype.')
  s = resolve_setting(setting, path, tuple(w.shape))
  return _quantize_jit(w, s['type'], *(s[k] for k in base.FIELDS))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize_jit(w, qtype, block_size, dq_block_size, axes, stack_axes):
  like = QuantizedArray(None, None, qtype=qtype, shape=tuple(w.shape),
                        dtype_name=jnp.dtype(w.dtype).name, block_size=block_size,
                        dq_block_size=dq_block_size, axes=axes, stack_axes=stack_axes)
  return base.get(qtype).encode(w.astype(jnp.float32), like)


def dequantize_array(q: QuantizedArray, dtype: Any = None) -> jax.Array:
  """The float array `q` stands for, in `dtype` (default: the original dtype). No gradient flows
  into `q`'s constants."""
  dtype = jnp.dtype(dtype or q.dtype)
  q = jax.lax.stop_gradient(q)
  return base.get(q.qtype).decode(q).astype(dtype)


def quant_setting(quant: Any, spec: LeafSpec) -> dict:
  """A quantization setting for a kernel, completed by its format (int8 channels reduce its
  in-axes; blockwise types keep its leading stacked axes separate, so scanned layers dequantize
  one layer at a time). A setting of an unknown type is returned as given (`resolve_setting`
  names it)."""
  setting = dict(quant) if isinstance(quant, (tuple, dict)) else {'type': quant}
  qtype = setting.get('type', DEFAULT_TYPE)
  if qtype not in base.names():
    return setting
  return base.get(qtype).for_kernel(setting, spec)


def quantize(params: Any, rules: Any, **defaults) -> Any:
  """Quantizes the leaves of a parameter tree selected by rules (or by an adapter spec).

  Args:
    params: a parameter pytree (or one array, with `rules` a setting).
    rules: ordered `(regex, setting)` rules over '/'-joined paths, first match wins; a setting is
      None (keep float), a type name, or a dict (see `quantize_array`). Or a spec from
      `make_spec`: its adapted leaves are quantized with `**defaults` (int8 channels reduce the
      spec's in-axes).
    **defaults: default setting keys (e.g. `type='int4'`, `block_size=32`).

  Returns:
    The tree with `QuantizedArray` leaves where selected.

  Raises:
    ValueError: a rule that matches no path, an unknown type or key, a block size that does not
      divide the last dimension, or a selected leaf that is not a float array.
  """
  keys = base.setting_keys()
  unknown = sorted(set(defaults) - set(keys))
  if unknown:
    raise ValueError(f'Unknown quantization keys {unknown}; allowed: {list(keys)}.')
  if isinstance(params, (jax.Array, np.ndarray)):
    setting = rules if isinstance(rules, dict) else {'type': rules}
    return quantize_array(params, {**defaults, **setting})
  chosen: dict[str, dict] = {}
  if isinstance(rules, dict):   # an adapter spec
    for path, s in spec_leaves(rules).items():
      if s.variant != FULL:
        chosen[path] = quant_setting(dict(defaults), s)
  else:
    leaves = [p for p, _, _ in paths.leaves_with_paths(params)]
    for path, rule in select(leaves, rules, what='Quantization rule').items():
      if rule.setting is not None:
        setting = rule.setting if isinstance(rule.setting, dict) else {'type': rule.setting}
        chosen[path] = {**defaults, **setting}

  def visit(kp, x):
    path = paths.path_str(kp)
    if path not in chosen or is_quantized(x):
      return x
    return quantize_array(x, chosen[path], path=path)

  return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)


def dequantize(tree: Any, dtype: Any = None) -> Any:
  """Replaces every `QuantizedArray` in `tree` (or `tree` itself) by its float array."""
  return jax.tree_util.tree_map(
      lambda x: dequantize_array(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def requantize_like(w: jax.Array, like: QuantizedArray) -> QuantizedArray:
  """Quantizes `w` with the format of `like` (same type, blocks and constants)."""
  return quantize_array(w.astype(like.dtype), like.settings())


def slice_leading(q: QuantizedArray, index: Sequence[Any], sizes: Sequence[int],
                  dynamic: bool) -> QuantizedArray | None:
  """Slices `q` along axes that are stored separately (a stacked kernel's layer axis).

  `index`/`sizes` give a start and size for every axis; returns None when a sliced axis is one
  that blocks or channels span, where the layout does not allow it.
  """
  n = q.ndim
  fmt = base.get(q.qtype)
  for d in range(n):
    if sizes[d] != q.shape[d] and not fmt.sliceable(q, d):
      return None
  new_shape = tuple(int(s) for s in sizes)

  def cut(x):
    if x is None:
      return None
    starts, lens = [], []
    for d in range(x.ndim):
      full = d < n and x.shape[d] == q.shape[d] and sizes[d] != q.shape[d]
      starts.append(index[d] if full else 0)
      lens.append(sizes[d] if full else x.shape[d])
    if dynamic:
      return jax.lax.dynamic_slice(x, starts, lens)
    return jax.lax.slice(x, starts, [s + l for s, l in zip(starts, lens)])

  return dataclasses.replace(q, codes=cut(q.codes), scales=cut(q.scales),
                             dq_scales=cut(q.dq_scales), dq_offset=cut(q.dq_offset),
                             shape=new_shape)


def scannable(q: QuantizedArray) -> bool:
  """Whether `q` can be sliced along axis 0 by `lax.scan` (its stored arrays all lead with it)."""
  return q.ndim > 1 and base.get(q.qtype).sliceable(q, 0)


def unstack(q: QuantizedArray) -> QuantizedArray:
  """`q`'s static metadata after its arrays lost their leading axis (inside a scan body)."""
  return base.get(q.qtype).unstack(q)


def layout(q: QuantizedArray) -> dict[str, tuple]:
  """For each stored array, the leaf axes each of its axes follows (a tuple per axis; empty:
  none). `codes` has the leaf's axes (the last one halved for 4-bit); a flattened block axis
  follows all the tail axes.

  Sharding gives each stored array the leaf's partitioning on those axes.
  """
  return base.get(q.qtype).layout(q)
