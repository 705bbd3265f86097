"""Quantized frozen bases: NF4 (QLoRA) with double quantization, int4 blockwise, int8 per channel.

A `QuantizedArray` stands in for a base leaf in the parameter tree. `lora(fn)` dequantizes it on
use, inside the compiled function, to the leaf's original dtype (never stored dequantized, never
differentiated); adapters on top of it work as on a float base (QLoRA):

>>> qparams = quantize(params, [(r'kernel$', 'nf4')])                # doctest: +SKIP
>>> spec = make_spec(qparams, [(r'kernel$', {'rank': 8})])          # doctest: +SKIP
>>> qparams, adapters = init(key, qparams, spec)                    # doctest: +SKIP
>>> y = lora(model.apply)(join(qparams, adapters), x)               # doctest: +SKIP

Storage. The first `stack_axes` axes (a scanned kernel's layer axis) are kept; each slice along
them is quantized on its own, in blocks of `block_size` consecutive elements of the row-major
flattening of the other ("tail") axes, of size T, which the block size must divide:
  nf4, int4  `codes` uint8, two 4-bit codes per byte along the last axis (the leaf's shape with
             the last axis halved); `scales` the absmax of each block
             (lead + (T/block,)), float32, or with double
             quantization int8 codes of (absmax - offset) in blocks of `dq_block_size`, with
             float32 `dq_scales` (lead + (blocks,)) and `dq_offset`, the mean absmax (lead).
  int8       `codes` int8 (the leaf's shape), `scales` float32 absmax / 127 per channel, reduced
             over `axes` (default: the second-to-last, a Dense kernel's input axis), kept as 1.
So a stacked kernel is sliced per layer inside a scan, and a sharded base shards its codes on the
leaf's mesh axes (`layout`). `quantize(params, spec)` takes `stack_axes` from the spec.

NF4 (Dettmers et al., 2023): 16 values at quantiles of N(0, 1), normalized to [-1, 1], with an
exact zero; built by `nf4_code_book()` from the normal quantile function. With double
quantization it costs 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import paths
from lorax_jax.leafspec import FULL, LeafSpec, spec_leaves
from lorax_jax.select import select

QTYPES = ('nf4', 'int4', 'int8')
SETTING_KEYS = ('type', 'block_size', 'double_quant', 'dq_block_size', 'axes', 'stack_axes')
DEFAULTS = {
    'nf4': dict(block_size=64, double_quant=True, dq_block_size=256),
    'int4': dict(block_size=64, double_quant=False, dq_block_size=256),
    'int8': dict(block_size=0, double_quant=False, dq_block_size=0),
}


@functools.lru_cache(maxsize=None)
def nf4_code_book() -> np.ndarray:
  """The 16 NF4 values, from the normal quantile function (bitsandbytes' `create_normal_map`).

  The positive half is 8 quantiles of N(0, 1) at probabilities evenly spaced from
  `offset = 0.9677083` (the mean of the 1 - 1/(2*15) and 1 - 1/(2*16) quantiles) to 0.5, the
  negative half 7 such quantiles, plus an exact zero; all divided by the largest.
  """
  offset = 0.9677083
  ppf = statistics.NormalDist().inv_cdf
  pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  values = np.array(sorted(pos + [0.0] + neg), np.float64)
  return values / values.max()


@paths.register_leaf
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A quantized frozen base leaf (see the module docstring for the layout).

  `shape` and `dtype` are the leaf's logical (dequantized) shape and dtype, so specs, summaries
  and shape checks treat it like the float leaf.
  """
  codes: jax.Array
  scales: jax.Array
  dq_scales: Any = None
  dq_offset: Any = None
  qtype: str = dataclasses.field(metadata=dict(static=True), default='nf4')
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
  dtype_name: str = dataclasses.field(metadata=dict(static=True), default='float32')
  block_size: int = dataclasses.field(metadata=dict(static=True), default=64)
  dq_block_size: int = dataclasses.field(metadata=dict(static=True), default=0)
  axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
  stack_axes: int = dataclasses.field(metadata=dict(static=True), default=0)

  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype_name)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes stored (codes and every level of constants)."""
    return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(self))

  @property
  def bits_per_param(self) -> float:
    return 8.0 * self.nbytes / max(self.size, 1)

  def settings(self) -> dict[str, Any]:
    """The settings that `quantize` takes to reproduce this format."""
    if self.qtype == 'int8':
      return dict(type='int8', axes=self.axes)
    return dict(type=self.qtype, block_size=self.block_size,
                double_quant=self.dq_block_size > 0, dq_block_size=self.dq_block_size,
                stack_axes=self.stack_axes)

  def __repr__(self):
    if not hasattr(self.codes, 'dtype'):   # a tree of shardings or specs shaped like this
      return (f'QuantizedArray({self.qtype}, shape={self.shape}, codes={self.codes}, '
              f'scales={self.scales}, dq_scales={self.dq_scales}, dq_offset={self.dq_offset})')
    return (f'QuantizedArray({self.qtype}, shape={self.shape}, dtype={self.dtype_name}, '
            f'{self.bits_per_param:.3f} bits/param)')


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


# ---------------------------------------------------------------------------------------------
# Settings.


def resolve_setting(setting: Any, path: str, shape: tuple[int, ...]) -> dict[str, Any]:
  """Validated settings for a leaf of `shape` (named `path` in errors), defaults filled in, from
  a type name or a dict.

  Raises:
    ValueError: an unknown type or key, or a block size that does not divide the block rows.
  """
  if isinstance(setting, str):
    setting = {'type': setting}
  if not isinstance(setting, dict):
    raise ValueError(f'Quantization setting for {path!r} must be a type name {list(QTYPES)} or a '
                     f'dict with keys {list(SETTING_KEYS)}; got {setting!r}.')
  unknown = sorted(set(setting) - set(SETTING_KEYS))
  if unknown:
    raise ValueError(f'Unknown quantization keys {unknown} for {path!r}; allowed: '
                     f'{list(SETTING_KEYS)}.')
  qtype = setting.get('type', 'nf4')
  if qtype not in QTYPES:
    raise ValueError(f'Unknown quantization type {qtype!r} for {path!r}; allowed: '
                     f'{list(QTYPES)}.')
  s = {'type': qtype, **DEFAULTS[qtype], **{k: v for k, v in setting.items() if k != 'type'}}
  if not shape:
    raise ValueError(f'Cannot quantize the scalar at {path!r}.')
  ndim = len(shape)
  if qtype == 'int8':
    axes = s.get('axes')
    axes = ((ndim - 2,) if ndim >= 2 else (0,)) if axes is None else (
        (axes,) if isinstance(axes, int) else tuple(axes))
    if not axes or any(not isinstance(a, int) or not -ndim <= a < ndim for a in axes):
      raise ValueError(f'axes={s.get("axes")!r} for {path!r} (shape {shape}) must be ints in '
                       f'[-{ndim}, {ndim}).')
    s['axes'] = tuple(sorted(a % ndim for a in axes))
    if s['double_quant']:
      raise ValueError(f'double_quant for {path!r}: int8 per-channel constants are not '
                       'double-quantized; allowed for nf4 and int4.')
    s['block_size'] = s['dq_block_size'] = s['stack_axes'] = 0
    return s
  if s.get('axes') not in (None, ()):
    raise ValueError(f'axes for {path!r}: {qtype} is blockwise; `axes` is an int8 setting.')
  s['axes'] = ()
  lead = s.get('stack_axes', 0)
  if not isinstance(lead, int) or isinstance(lead, bool) or not 0 <= lead < ndim:
    raise ValueError(f'stack_axes={lead!r} for {path!r} (shape {shape}) must be an int in '
                     f'[0, {ndim - 1}].')
  s['stack_axes'] = lead
  bs = s['block_size']
  n = math.prod(shape[lead:])
  if not isinstance(bs, int) or isinstance(bs, bool) or bs < 2 or bs % 2 or n % bs:
    raise ValueError(f'block_size={bs!r} for {path!r} must be an even int >= 2 that divides the '
                     f'{n} elements of each block row (shape {shape}, stack_axes {lead}).')
  if shape[-1] % 2:
    raise ValueError(f'{qtype} packs two codes per byte along the last axis; {path!r} has an odd '
                     f'last dimension (shape {shape}).')
  if not isinstance(s['double_quant'], bool):
    raise ValueError(f'double_quant={s["double_quant"]!r} for {path!r} must be a bool.')
  if s['double_quant']:
    dq = s['dq_block_size']
    if not isinstance(dq, int) or isinstance(dq, bool) or dq < 1:
      raise ValueError(f'dq_block_size={dq!r} for {path!r} must be an int >= 1.')
  else:
    s['dq_block_size'] = 0
  return s


# ---------------------------------------------------------------------------------------------
# Blockwise 4-bit.


def _pack(codes):
  """uint8 codes in [0, 16) -> pairs along the last axis packed into bytes (low nibble first)."""
  pairs = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // 2, 2))
  return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(jnp.uint8)


def _unpack(packed):
  lo = packed & 0xF
  hi = packed >> 4
  out = jnp.stack([lo, hi], axis=-1)
  return out.reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))


def _levels(qtype: str) -> jax.Array:
  if qtype == 'nf4':
    return jnp.asarray(nf4_code_book(), jnp.float32)
  return jnp.arange(-7, 8, dtype=jnp.float32) / 7.0   # int4: symmetric absmax, codes 0..14


def _encode(x, qtype: str):
  """x in [-1, 1] -> index of the nearest level (ties to the lower one)."""
  levels = _levels(qtype)
  if qtype == 'int4':
    return (jnp.clip(jnp.round(x * 7.0), -7, 7) + 7).astype(jnp.uint8)
  mids = (levels[1:] + levels[:-1]) / 2
  return jnp.searchsorted(mids, x, side='left').astype(jnp.uint8)


def _double_quantize(scales, dq: int):
  """scales: lead + (m,) -> int8 codes (same shape), steps lead + (ceil(m/dq),), offset lead."""
  flat, lead = scales, scales.shape[:-1]
  m = flat.shape[-1]
  offset = jnp.mean(flat, axis=-1)
  c = flat - offset[..., None]
  nblk = -(-m // dq)
  c = jnp.pad(c, [(0, 0)] * len(lead) + [(0, nblk * dq - m)])
  c = c.reshape(lead + (nblk, dq))
  amax = jnp.max(jnp.abs(c), axis=-1)
  step = jnp.where(amax > 0, amax / 127.0, 1.0)
  codes = jnp.clip(jnp.round(c / step[..., None]), -127, 127).astype(jnp.int8)
  codes = codes.reshape(lead + (nblk * dq,))[..., :m]
  return codes, step.astype(jnp.float32), offset.astype(jnp.float32)


def _double_dequantize(codes, step, offset, dq: int):
  flat, lead = codes, codes.shape[:-1]
  m = flat.shape[-1]
  nblk = step.shape[-1]
  c = jnp.pad(flat.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, nblk * dq - m)])
  c = (c.reshape(lead + (nblk, dq)) * step[..., None]).reshape(lead + (nblk * dq,))[..., :m]
  return c + offset[..., None]


def _block_scales(q: QuantizedArray):
  if q.dq_block_size:
    return _double_dequantize(q.scales, q.dq_scales, q.dq_offset, q.dq_block_size)
  return q.scales.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Public functions.


def quantize_array(w: jax.Array, setting: Any = 'nf4', *, path: str = 'array') -> QuantizedArray:
  """Quantizes one float array.

  Args:
    w: a float array (a kernel, a stacked kernel, an embedding table).
    setting: a type name (`'nf4'`, `'int4'`, `'int8'`) or a dict with `type` and optionally
      `block_size` (nf4/int4, default 64), `double_quant` (default True for nf4, False for int4),
      `dq_block_size` (default 256), `stack_axes` (nf4/int4: leading axes quantized slice by
      slice, default 0), `axes` (int8: the reduced axes of its per-channel scales).
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
  return _quantize_jit(w, s['type'], s['block_size'], s['dq_block_size'], s['axes'],
                       s['stack_axes'])


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize_jit(w, qtype, block_size, dq_block_size, axes, lead):
  x = w.astype(jnp.float32)
  shape = tuple(w.shape)
  common = dict(qtype=qtype, shape=shape, dtype_name=jnp.dtype(w.dtype).name,
                block_size=block_size, dq_block_size=dq_block_size, axes=axes, stack_axes=lead)
  if qtype == 'int8':
    amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    step = jnp.where(amax > 0, amax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(x / step), -127, 127).astype(jnp.int8)
    return QuantizedArray(codes, step, **common)
  n = math.prod(shape[lead:])
  blocks = x.reshape(shape[:lead] + (n // block_size, block_size))
  amax = jnp.max(jnp.abs(blocks), axis=-1)
  safe = jnp.where(amax > 0, amax, 1.0)
  codes = _pack(_encode(blocks / safe[..., None], qtype).reshape(shape))
  if not dq_block_size:
    return QuantizedArray(codes, amax, **common)
  scodes, step, offset = _double_quantize(amax, dq_block_size)
  return QuantizedArray(codes, scodes, step, offset, **common)


def dequantize_array(q: QuantizedArray, dtype: Any = None) -> jax.Array:
  """The float array `q` stands for, in `dtype` (default: the original dtype). No gradient flows
  into `q`'s constants."""
  dtype = jnp.dtype(dtype or q.dtype)
  q = jax.lax.stop_gradient(q)
  if q.qtype == 'int8':
    return (q.codes.astype(jnp.float32) * q.scales).astype(dtype)
  vals = _levels(q.qtype)[_unpack(q.codes)]         # the leaf's shape
  lead = q.shape[:q.stack_axes]
  blocks = vals.reshape(lead + (-1, q.block_size))
  return (blocks * _block_scales(q)[..., None]).reshape(q.shape).astype(dtype)


def quant_setting(quant: Any, spec: LeafSpec) -> dict:
  """A quantization setting for a kernel: int8 channels reduce its in-axes; blockwise types keep
  its leading stacked axes separate (so scanned layers dequantize one layer at a time)."""
  setting = dict(quant) if isinstance(quant, tuple) else (
      dict(quant) if isinstance(quant, dict) else {'type': quant})
  if setting.get('type', 'nf4') == 'int8':
    setting.setdefault('axes', spec.in_axes)
  elif spec.batch_axes == tuple(range(len(spec.batch_axes))):
    setting.setdefault('stack_axes', len(spec.batch_axes))
  return setting


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
  unknown = sorted(set(defaults) - set(SETTING_KEYS))
  if unknown:
    raise ValueError(f'Unknown quantization keys {unknown}; allowed: {list(SETTING_KEYS)}.')
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


def _sliceable(q: QuantizedArray, d: int) -> bool:
  """Whether axis d is stored separately (no block or channel spans it)."""
  return d not in q.axes if q.qtype == 'int8' else d < q.stack_axes


def slice_leading(q: QuantizedArray, index: Sequence[Any], sizes: Sequence[int],
                  dynamic: bool) -> QuantizedArray | None:
  """Slices `q` along axes that are stored separately (a stacked kernel's layer axis).

  `index`/`sizes` give a start and size for every axis; returns None when a sliced axis is one
  that blocks or channels span, where the layout does not allow it.
  """
  n = q.ndim
  for d in range(n):
    if sizes[d] != q.shape[d] and not _sliceable(q, d):
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
  return q.ndim > 1 and _sliceable(q, 0)


def unstack(q: QuantizedArray) -> QuantizedArray:
  """`q`'s static metadata after its arrays lost their leading axis (inside a scan body)."""
  if q.qtype == 'int8':
    return dataclasses.replace(q, shape=q.shape[1:], axes=tuple(a - 1 for a in q.axes))
  return dataclasses.replace(q, shape=q.shape[1:], stack_axes=q.stack_axes - 1)


def layout(q: QuantizedArray) -> dict[str, tuple]:
  """For each stored array, the leaf axes each of its axes follows (a tuple per axis; empty:
  none). `codes` has the leaf's axes (the last one halved for 4-bit); a flattened block axis
  follows all the tail axes.

  Sharding gives each stored array the leaf's partitioning on those axes.
  """
  n = q.ndim
  codes = tuple((d,) for d in range(n))
  if q.qtype == 'int8':
    return {'codes': codes, 'scales': tuple(() if d in q.axes else (d,) for d in range(n))}
  lead = tuple((d,) for d in range(q.stack_axes))
  out = {'codes': codes, 'scales': lead + (tuple(range(q.stack_axes, n)),)}
  if q.dq_block_size:
    out['dq_scales'] = lead + ((),)
    out['dq_offset'] = lead
  return out
