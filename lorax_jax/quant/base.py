"""The quantized leaf, the `Format` protocol and the registry of formats.

A `QuantizedArray` is the same pytree node for every format: its arrays (`codes`, `scales` and
optionally two levels of constants of the scales) and static metadata (`qtype`, the logical
shape and dtype, block sizes, reduced axes, stacked axes). What the arrays mean is the business
of the format named by `qtype`, looked up in the registry (`get`): it encodes and decodes,
validates its settings, says which leaf axes may be sliced and which leaf axes each stored array
follows. Code outside a format's own module never branches on `qtype`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import paths
from lorax_jax.leafspec import LeafSpec

# The static fields of `QuantizedArray` that a format's `resolve` fills in (besides `type`).
FIELDS = ('block_size', 'dq_block_size', 'axes', 'stack_axes')


@paths.register_leaf
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A quantized frozen base leaf (its format's module documents the layout).

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
    return get(self.qtype).settings(self)

  def __repr__(self):
    if not hasattr(self.codes, 'dtype'):   # a tree of shardings or specs shaped like this
      return (f'QuantizedArray({self.qtype}, shape={self.shape}, codes={self.codes}, '
              f'scales={self.scales}, dq_scales={self.dq_scales}, dq_offset={self.dq_offset})')
    return (f'QuantizedArray({self.qtype}, shape={self.shape}, dtype={self.dtype_name}, '
            f'{self.bits_per_param:.3f} bits/param)')


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


class Format:
  """The protocol of a quantization format (subclass it; register an instance with `register`).

  Attributes:
    name: the `type` of its settings and the `qtype` of its leaves.
    keys: the setting keys it reads (besides `type`); the keys of all formats are accepted in
      every setting, so one dict can serve several formats (a format ignores or refuses the
      others' keys in `resolve`).
    defaults: default values of its keys.
  """
  name: str = ''
  keys: tuple[str, ...] = ()
  defaults: dict[str, Any] = {}

  def resolve(self, s: dict[str, Any], path: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """Validates the setting `s` (defaults filled in) for a leaf of `shape` named `path`, and
    fills in every key of `FIELDS`.

    Raises:
      ValueError: naming the bad value and what is allowed.
    """
    raise NotImplementedError

  def encode(self, x: jax.Array, like: QuantizedArray) -> QuantizedArray:
    """Quantizes the float32 array `x` (traced, under jit) into `like`'s static metadata."""
    raise NotImplementedError

  def decode(self, q: QuantizedArray) -> jax.Array:
    """The float32 array `q` stands for (its `shape`)."""
    raise NotImplementedError

  def settings(self, q: QuantizedArray) -> dict[str, Any]:
    """The setting that `quantize` takes to reproduce `q`'s format."""
    raise NotImplementedError

  def for_kernel(self, setting: dict[str, Any], spec: LeafSpec) -> dict[str, Any]:
    """`setting` completed for a kernel of `spec` (e.g. the axes its constants reduce)."""
    del spec
    return setting

  def sliceable(self, q: QuantizedArray, d: int) -> bool:
    """Whether leaf axis `d` is stored separately (no block or channel spans it)."""
    raise NotImplementedError

  def unstack(self, q: QuantizedArray) -> QuantizedArray:
    """`q`'s static metadata after its arrays lost their leading axis (inside a scan body)."""
    raise NotImplementedError

  def layout(self, q: QuantizedArray) -> dict[str, tuple]:
    """For each stored array, the leaf axes each of its axes follows (see `quant.layout`)."""
    raise NotImplementedError


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
  """Registers a quantization format under `fmt.name` (a plugin hook for research code).

  Raises:
    ValueError: if the name is empty or already registered.
  """
  if not isinstance(fmt, Format) or not fmt.name:
    raise ValueError(f'A quantization format is a named lorax_jax.quant.Format; got {fmt!r}.')
  if fmt.name in _REGISTRY:
    raise ValueError(f'Quantization format {fmt.name!r} is already registered.')
  _REGISTRY[fmt.name] = fmt
  return fmt


def names() -> tuple[str, ...]:
  """The registered format names, in registration order."""
  return tuple(_REGISTRY)


def setting_keys() -> tuple[str, ...]:
  """Every setting key some registered format reads, `type` first."""
  keys = ['type']
  for fmt in _REGISTRY.values():
    keys += [k for k in fmt.keys if k not in keys]
  return tuple(keys)


def get(qtype: Any, path: str | None = None) -> Format:
  """The format registered as `qtype`.

  Raises:
    ValueError: naming the type (and `path`) and the registered ones.
  """
  fmt = _REGISTRY.get(qtype) if isinstance(qtype, str) else None
  if fmt is None:
    where = f' for {path!r}' if path is not None else ''
    raise ValueError(f'Unknown quantization type {qtype!r}{where}; allowed: {list(names())}.')
  return fmt


def is_int(x: Any, low: int) -> bool:
  """Whether `x` is an int (not a bool) >= `low`."""
  return isinstance(x, int) and not isinstance(x, bool) and x >= low
