"""SoRA (Ding et al., EMNLP 2023): LoRA with a gate on the rank dimension, sparsified while
training.

dW = s * A @ diag(g) @ B with A Kaiming (as LoRA), B = 0 (so the first forward equals the base)
and g ~ N(0, 1) (the SoRA code's `randn`), s = alpha / r. The gate's proximal L1 step (soft
thresholding after each update) and the pruning of ranks whose gate reached zero are
`lorax_jax.dynamics.sora`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import layout
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common
from lorax_jax.variants.base import Factored, Variant, b_field, static_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoraParams:
  """SoRA adapter state: `a` (batch + in + (r,)), `b` (batch + (r,) + out), `gate`
  (batch + (r,))."""
  a: jax.Array
  b: jax.Array = b_field()
  gate: jax.Array
  spec: LeafSpec = static_field()


def gated_a(ad: SoraParams) -> jax.Array:
  """A diag(g) in A's layout."""
  s = ad.spec
  g = ad.gate.reshape(s.batch_shape + (1,) * len(s.in_shape) + (ad.gate.shape[-1],))
  return ad.a * g.astype(ad.a.dtype)


def reference(w, p):
  """The paper's merged kernel, W + s (A diag(gate)) B, in float64 NumPy for a 2-D kernel `w`
  (the law tests check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  return w + p.spec.scale * (f(p.a) * f(p.gate)) @ f(p.b)


def sora() -> Variant:
  """Builds the SoRA variant (factored: ((x A) * g) B)."""

  def init(key, w, spec: LeafSpec):
    ka, kg = jax.random.split(key)
    a, b = common.lora_pair(ka, w, spec)
    gate = jax.random.normal(kg, spec.batch_shape + (spec.rank,), jnp.float32).astype(a.dtype)
    return w, SoraParams(a, b, gate, spec)

  def factored(w, ad: SoraParams):
    del w
    return Factored(gated_a(ad), ad.b, ad.spec.scale)

  def delta(w, ad: SoraParams):
    s = ad.spec
    return (s.scale * layout.delta_canonical(gated_a(ad), ad.b, s.kinds, w.dtype)).astype(w.dtype)

  def num_params(spec: LeafSpec):
    return math.prod(spec.batch_shape) * spec.rank * (
        math.prod(spec.in_shape) + math.prod(spec.out_shape) + 1)

  def lay(spec: LeafSpec):
    return {'a': common.axes_a(spec), 'b': common.axes_b(spec),
            'gate': common.axes_batch(spec, 1)}

  return Variant('sora', init, delta, factored, num_params, layout=lay, reference=reference, resizable=True)
