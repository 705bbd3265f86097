"""The 4-bit blockwise machinery that NF4 and int4 share (a format supplies its 16 levels).

Storage. The first `stack_axes` axes (a scanned kernel's layer axis) are kept; each slice along
them is quantized on its own, in blocks of `block_size` consecutive elements of the row-major
flattening of the other ("tail") axes, of size T, which the block size must divide. `codes` are
uint8, two 4-bit level indices per byte along the last axis (low nibble first: the leaf's shape
with the last axis halved); `scales` the absmax of each block (lead + (T/block,)), float32, or
with double quantization int8 codes of (absmax - offset) in blocks of `dq_block_size`, with
float32 `dq_scales` (lead + (blocks,)) and `dq_offset`, the mean absmax (lead).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorax_jax.leafspec import LeafSpec
from lorax_jax.quant.base import Format, QuantizedArray, is_int


def pack(codes):
  """uint8 codes in [0, 16) -> pairs along the last axis packed into bytes (low nibble first)."""
  pairs = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // 2, 2))
  return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(jnp.uint8)


def unpack(packed):
  """The inverse of `pack`."""
  lo = packed & 0xF
  hi = packed >> 4
  out = jnp.stack([lo, hi], axis=-1)
  return out.reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))


def double_quantize(scales, dq: int):
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


def double_dequantize(codes, step, offset, dq: int):
  """The inverse of `double_quantize` (up to its rounding)."""
  flat, lead = codes, codes.shape[:-1]
  m = flat.shape[-1]
  nblk = step.shape[-1]
  c = jnp.pad(flat.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, nblk * dq - m)])
  c = (c.reshape(lead + (nblk, dq)) * step[..., None]).reshape(lead + (nblk * dq,))[..., :m]
  return c + offset[..., None]


def block_scales(q: QuantizedArray):
  """The float32 absmax of every block of `q` (double quantization undone)."""
  if q.dq_block_size:
    return double_dequantize(q.scales, q.dq_scales, q.dq_offset, q.dq_block_size)
  return q.scales.astype(jnp.float32)


class Blockwise4Bit(Format):
  """A 4-bit blockwise absmax format; a subclass gives `name`, `defaults`, `levels` and
  `encode_unit`."""
  keys = ('block_size', 'double_quant', 'dq_block_size', 'stack_axes')

  def levels(self) -> jax.Array:
    """The (up to) 16 float32 values in [-1, 1] that the codes index."""
    raise NotImplementedError

  def encode_unit(self, x: jax.Array) -> jax.Array:
    """x in [-1, 1] -> uint8 index of its level."""
    raise NotImplementedError

  def resolve(self, s: dict[str, Any], path: str, shape: tuple[int, ...]) -> dict[str, Any]:
    ndim = len(shape)
    if s.get('axes') not in (None, ()):
      raise ValueError(f'axes for {path!r}: {self.name} is blockwise; `axes` is an int8 setting.')
    s['axes'] = ()
    lead = s.get('stack_axes', 0)
    if not is_int(lead, 0) or not lead < ndim:
      raise ValueError(f'stack_axes={lead!r} for {path!r} (shape {shape}) must be an int in '
                       f'[0, {ndim - 1}].')
    s['stack_axes'] = lead
    bs = s['block_size']
    n = math.prod(shape[lead:])
    if not is_int(bs, 2) or bs % 2 or n % bs:
      raise ValueError(f'block_size={bs!r} for {path!r} must be an even int >= 2 that divides '
                       f'the {n} elements of each block row (shape {shape}, stack_axes {lead}).')
    if shape[-1] % 2:
      raise ValueError(f'{self.name} packs two codes per byte along the last axis; {path!r} has '
                       f'an odd last dimension (shape {shape}).')
    if not isinstance(s['double_quant'], bool):
      raise ValueError(f'double_quant={s["double_quant"]!r} for {path!r} must be a bool.')
    if s['double_quant']:
      dq = s['dq_block_size']
      if not is_int(dq, 1):
        raise ValueError(f'dq_block_size={dq!r} for {path!r} must be an int >= 1.')
    else:
      s['dq_block_size'] = 0
    return s

  def encode(self, x: jax.Array, like: QuantizedArray) -> QuantizedArray:
    shape, lead = like.shape, like.stack_axes
    n = math.prod(shape[lead:])
    blocks = x.reshape(shape[:lead] + (n // like.block_size, like.block_size))
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(amax > 0, amax, 1.0)
    codes = pack(self.encode_unit(blocks / safe[..., None]).reshape(shape))
    if not like.dq_block_size:
      return dataclasses.replace(like, codes=codes, scales=amax)
    scodes, step, offset = double_quantize(amax, like.dq_block_size)
    return dataclasses.replace(like, codes=codes, scales=scodes, dq_scales=step, dq_offset=offset)

  def decode(self, q: QuantizedArray) -> jax.Array:
    vals = self.levels()[unpack(q.codes)]         # the leaf's shape
    blocks = vals.reshape(q.shape[:q.stack_axes] + (-1, q.block_size))
    return (blocks * block_scales(q)[..., None]).reshape(q.shape)

  def settings(self, q: QuantizedArray) -> dict[str, Any]:
    return dict(type=self.name, block_size=q.block_size, double_quant=q.dq_block_size > 0,
                dq_block_size=q.dq_block_size, stack_axes=q.stack_axes)

  def for_kernel(self, setting: dict[str, Any], spec: LeafSpec) -> dict[str, Any]:
    """Keeps a kernel's leading stacked axes separate (scanned layers dequantize one by one)."""
    if spec.batch_axes == tuple(range(len(spec.batch_axes))):
      setting.setdefault('stack_axes', len(spec.batch_axes))
    return setting

  def sliceable(self, q: QuantizedArray, d: int) -> bool:
    return d < q.stack_axes

  def unstack(self, q: QuantizedArray) -> QuantizedArray:
    return dataclasses.replace(q, shape=q.shape[1:], stack_axes=q.stack_axes - 1)

  def layout(self, q: QuantizedArray) -> dict[str, tuple]:
    """`codes` follow the leaf's axes, the flattened block axis of `scales` all the tail axes."""
    n = q.ndim
    lead = tuple((d,) for d in range(q.stack_axes))
    out = {'codes': tuple((d,) for d in range(n)),
           'scales': lead + (tuple(range(q.stack_axes, n)),)}
    if q.dq_block_size:
      out['dq_scales'] = lead + ((),)
      out['dq_offset'] = lead
    return out
