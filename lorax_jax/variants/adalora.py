"""AdaLoRA (Zhang et al., ICLR 2023): an SVD-shaped update P diag(lambda) Q with prunable ranks.

dW = s * P @ diag(lambda * mask) @ Q with P (d_in, r), lambda (r,), Q (r, d_out), s = alpha / r
(PEFT divides by the initial rank). As PEFT: lambda = 0 (so the first forward equals the base),
P, Q ~ N(0, 0.02^2). `mask` (a frozen 0/1 vector) is what the budget schedule of
`lorax_jax.dynamics.adalora` prunes: ranks stay static under jit, a pruned triplet contributes
nothing and gets no gradient. The orthogonality regularizer (||P^T P - I||_F + ||Q Q^T - I||_F)
and the sensitivity-based allocation live in that schedule.
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
from lorax_jax.variants.base import Factored, Variant, b_field, frozen_field, static_field

INIT_STD = 0.02


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaloraParams:
  """AdaLoRA adapter state: `p` (batch + in + (r,)), `lam` and `mask` (batch + (r,)), `q`
  (batch + (r,) + out)."""
  p: jax.Array
  lam: jax.Array
  q: jax.Array = b_field()
  mask: jax.Array = frozen_field()
  spec: LeafSpec = static_field()


def effective_p(ad: AdaloraParams) -> jax.Array:
  """P diag(lambda * mask) in A's layout (batch + in + (r,))."""
  s = ad.spec
  lam = ad.lam * jax.lax.stop_gradient(ad.mask).astype(ad.lam.dtype)
  lam = lam.reshape(s.batch_shape + (1,) * len(s.in_shape) + (lam.shape[-1],))
  return ad.p * lam.astype(ad.p.dtype)


def reference(w, p):
  """The paper's merged kernel, W + s P diag(lambda * mask) Q, in float64 NumPy for a 2-D
  kernel `w` (the law tests check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  return w + p.spec.scale * (f(p.p) * (f(p.lam) * f(p.mask))) @ f(p.q)


def adalora() -> Variant:
  """Builds the AdaLoRA variant (factored: (x P diag(lambda)) Q)."""

  def init(key, w, spec: LeafSpec):
    dtype = common.adapter_dtype(spec, w)
    kp, kq = jax.random.split(key)
    nb, r = spec.batch_shape, spec.rank
    p = (INIT_STD * jax.random.normal(kp, nb + spec.in_shape + (r,), jnp.float32)).astype(dtype)
    q = (INIT_STD * jax.random.normal(kq, nb + (r,) + spec.out_shape, jnp.float32)).astype(dtype)
    return w, AdaloraParams(p, jnp.zeros(nb + (r,), dtype), q, jnp.ones(nb + (r,), dtype), spec)

  def factored(w, ad: AdaloraParams):
    del w
    return Factored(effective_p(ad), ad.q, ad.spec.scale)

  def delta(w, ad: AdaloraParams):
    s = ad.spec
    return (s.scale * layout.delta_canonical(effective_p(ad), ad.q, s.kinds, w.dtype)
            ).astype(w.dtype)

  def num_params(spec: LeafSpec):
    return math.prod(spec.batch_shape) * spec.rank * (
        math.prod(spec.in_shape) + math.prod(spec.out_shape) + 1)

  def lay(spec: LeafSpec):
    return {'p': common.axes_a(spec), 'lam': common.axes_batch(spec, 1),
            'q': common.axes_b(spec), 'mask': common.axes_batch(spec, 1)}

  return Variant('adalora', init, delta, factored, num_params, layout=lay, reference=reference, resizable=True)
