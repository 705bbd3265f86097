"""Leaf geometry and settings: the `LeafSpec` of one adapted leaf (layer 0: plain data).

A spec tree (`make_spec`) holds a `LeafSpec` (or None) at every parameter path, and every adapter
state carries the `LeafSpec` of its leaf as static pytree metadata. It says HOW a leaf is adapted
(variant, rank, scale, init, axes, options), never WHERE: no path and no rule text, so two adapter
trees over the same model combine with `jax.tree.map` and stack with `jnp.stack` whatever rules
or files they came from. The path of a leaf is its position in the tree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lorax_jax import paths

SCALINGS = ('alpha/r', 'rslora', 'constant')
FULL = 'full'


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """How one parameter leaf is adapted. Static (hashable) metadata, never traced.

  Attributes:
    variant: registered variant name (`'lora'`, ...) or `'full'` to train the leaf fully.
    rank: adapter rank r.
    alpha: scaling numerator; see `scaling`.
    scaling: `'alpha/r'` (LoRA), `'rslora'` (alpha / sqrt(r)) or `'constant'` (scale = alpha).
    dropout: LoRA dropout rate on the adapter branch's input (active only with a `lora_rng`).
    init: initialization: `'kaiming'` (A uniform, as torch's Linear) or `'gaussian'` with B = 0,
      or a weight-aware init of `lorax_jax.inits` (`'pissa'` (or PEFT's `'pissa_niter_K'`),
      `'milora'`, `'olora'`, `'loftq'`, and the calibrated `'lora_ga'`, `'eva'`, `'corda'`).
    init_options: the init's settings (its record's `options`), as sorted `(key, value)`
      pairs with defaults filled in; read them with `init_opt(key)`.
    dtype: adapter dtype name, or None for the base leaf's dtype.
    shape: the base leaf's shape.
    batch_axes: stacked (scanned / vmapped) axes of the kernel; adapters are stacked over them.
    in_axes: axes contracted with the layer input (A's side).
    out_axes: axes that form the layer output (B's side).
    options: variant-specific settings (`Variant.options` keys), as sorted `(key, value)` pairs
      with the variant's defaults filled in; read them with `opt(key)`.
  """
  variant: str
  rank: int = 0
  alpha: float = 0.0
  scaling: str = 'alpha/r'
  dropout: float = 0.0
  init: str = 'kaiming'
  dtype: str | None = None
  shape: tuple[int, ...] = ()
  batch_axes: tuple[int, ...] = ()
  in_axes: tuple[int, ...] = ()
  out_axes: tuple[int, ...] = ()
  options: tuple[tuple[str, Any], ...] = ()
  init_options: tuple[tuple[str, Any], ...] = ()

  def init_opt(self, key: str) -> Any:
    """The value of init option `key`."""
    for k, v in self.init_options:
      if k == key:
        return v
    raise KeyError(f'{self.init!r} init has no option {key!r}.')

  def opt(self, key: str) -> Any:
    """The value of variant option `key`."""
    for k, v in self.options:
      if k == key:
        return v
    raise KeyError(f'{self.variant!r} spec has no option {key!r}.')

  @property
  def scale(self) -> float:
    if self.scaling == 'alpha/r':
      return self.alpha / self.rank
    if self.scaling == 'rslora':
      return self.alpha / math.sqrt(self.rank)
    return float(self.alpha)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[d] for d in self.batch_axes)

  @property
  def in_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[d] for d in self.in_axes)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[d] for d in self.out_axes)

  @property
  def kinds(self) -> tuple[str, ...]:
    """Per axis of the kernel: `'b'` (batch/stacked), `'i'` (in) or `'o'` (out)."""
    kinds = ['b'] * len(self.shape)
    for d in self.in_axes:
      kinds[d] = 'i'
    for d in self.out_axes:
      kinds[d] = 'o'
    return tuple(kinds)



def spec_leaves(spec: dict[str, Any]) -> dict[str, LeafSpec]:
  """`{path: LeafSpec}` for the adapted or fully trained leaves of a spec."""
  flat = paths.flat(spec, is_leaf=lambda x: x is None or isinstance(x, LeafSpec))
  return {p: s for p, s in flat.items() if s is not None}
