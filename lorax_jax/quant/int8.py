"""int8: symmetric absmax 8-bit integers with per-channel scales.

Storage: `codes` int8 (the leaf's shape), `scales` float32 absmax / 127 per channel, reduced
over `axes` (default: the second-to-last, a Dense kernel's input axis; for a kernel from a spec,
its in-axes), kept as size-1 axes. Any axis that is not reduced can be sliced (a stacked kernel's
layer axis inside a scan).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorax_jax.leafspec import LeafSpec
from lorax_jax.quant.base import Format, QuantizedArray


class Int8(Format):
  """The int8 per-channel format."""
  name = 'int8'
  keys = ('axes', 'double_quant')
  defaults = dict(block_size=0, double_quant=False, dq_block_size=0)

  def resolve(self, s: dict[str, Any], path: str, shape: tuple[int, ...]) -> dict[str, Any]:
    ndim = len(shape)
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

  def encode(self, x: jax.Array, like: QuantizedArray) -> QuantizedArray:
    amax = jnp.max(jnp.abs(x), axis=like.axes, keepdims=True)
    step = jnp.where(amax > 0, amax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(x / step), -127, 127).astype(jnp.int8)
    return dataclasses.replace(like, codes=codes, scales=step)

  def decode(self, q: QuantizedArray) -> jax.Array:
    return q.codes.astype(jnp.float32) * q.scales

  def settings(self, q: QuantizedArray) -> dict[str, Any]:
    return dict(type=self.name, axes=q.axes)

  def for_kernel(self, setting: dict[str, Any], spec: LeafSpec) -> dict[str, Any]:
    """The channels of a kernel reduce its in-axes."""
    setting.setdefault('axes', spec.in_axes)
    return setting

  def sliceable(self, q: QuantizedArray, d: int) -> bool:
    return d not in q.axes

  def unstack(self, q: QuantizedArray) -> QuantizedArray:
    return dataclasses.replace(q, shape=q.shape[1:], axes=tuple(a - 1 for a in q.axes))

  def layout(self, q: QuantizedArray) -> dict[str, tuple]:
    """`codes` follow the leaf's axes, `scales` those that are not reduced."""
    n = q.ndim
    return {'codes': tuple((d,) for d in range(n)),
            'scales': tuple(() if d in q.axes else (d,) for d in range(n))}


FORMAT = Int8()
