"""LoRA (Hu et al., 2022) with alpha/r, rsLoRA alpha/sqrt(r) or constant scaling.

dW = s * A @ B with A (d_in, r) from a Kaiming-uniform (torch `Linear` default, bound
1/sqrt(d_in)) or Gaussian N(0, 1/r^2) init, and B = 0, so the first forward equals the base.
The weight-aware inits of `lorax_jax.inits` (PiSSA, MiLoRA, OLoRA, LoftQ, ...) set both
(`from_factors`) and return the residual (or quantized) base instead.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from lorax_jax import layout
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common
from lorax_jax.variants.base import Factored, Variant


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraParams:
  """LoRA adapter state. `a`: batch + in + (r,); `b`: batch + (r,) + out. `spec` is static."""
  a: jax.Array
  b: jax.Array
  spec: LeafSpec = dataclasses.field(metadata=dict(static=True))


def reference(w, p):
  """The paper's merged kernel, W + s A B, in float64 NumPy for a 2-D kernel `w` (the law tests
  check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  return w + p.spec.scale * f(p.a) @ f(p.b)


def lora() -> Variant:
  """Builds the LoRA variant.

  Example:
    >>> v = lora()
    >>> w2, adapter = v.init(jax.random.key(0), w, spec)   # doctest: +SKIP
  """

  def init(key, w, spec: LeafSpec):
    return w, LoraParams(*common.lora_pair(key, w, spec), spec)

  def from_factors(w, a, b, spec: LeafSpec):
    del w
    return LoraParams(a, b, spec)

  def factored(w, p: LoraParams):
    del w
    return Factored(p.a, p.b, p.spec.scale)

  def delta(w, p: LoraParams):
    return (p.spec.scale * layout.delta_canonical(p.a, p.b, p.spec.kinds, w.dtype)).astype(w.dtype)

  def num_params(spec: LeafSpec):
    return math.prod(spec.batch_shape) * spec.rank * (
        math.prod(spec.in_shape) + math.prod(spec.out_shape))

  return Variant('lora', init, delta, factored, num_params,
                 layout=common.lora_layout, from_factors=from_factors,
                 reference=reference, resizable=True)
