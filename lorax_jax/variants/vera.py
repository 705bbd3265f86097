"""VeRA (Kopiczko et al., ICLR 2024): vector-based random matrix adaptation.

    dW = (A * d) @ (B * b)          A: (d_in, r), B: (r, d_out) frozen and random

Only the vectors d (r, init `d_initial` = 0.1) and b (d_out, init 0) train, so the first forward
equals the base. A and B are SHARED by every adapted kernel of the same (in, out) shape and rank
and are never stored: they are regenerated inside each step from the static `seed` (PEFT's
`projection_prng_key`), Kaiming-uniform as in PEFT. Stacked (scanned) kernels share them across
the stack. VeRA has no alpha: the update is not scaled.
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
class VeraParams:
  """VeRA adapter state: `d` (batch + (r,)) and `b` (batch + out shape)."""
  d: jax.Array
  b: jax.Array = b_field()
  spec: LeafSpec = static_field()


def projections(spec: LeafSpec, dtype=jnp.float32):
  """The shared frozen A (in + (r,)) and B ((r,) + out) of every kernel shaped like `spec`'s."""
  key = common.seeded_key(spec.opt('seed'), 'vera', spec.in_shape, spec.out_shape, spec.rank)
  ka, kb = jax.random.split(key)
  a = common.kaiming_uniform(ka, spec.in_shape + (spec.rank,), math.prod(spec.in_shape), dtype)
  b = common.kaiming_uniform(kb, (spec.rank,) + spec.out_shape, spec.rank, dtype)
  return a, b


def reference(w, p):
  """The paper's merged kernel, W + (A_shared diag(d)) (B_shared diag(b)) (no alpha in VeRA),
  in float64 NumPy for a 2-D kernel `w` (the law tests check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  a_sh, b_sh = (f(x) for x in projections(p.spec, jnp.float64))
  return w + (a_sh * f(p.d)[None, :]) @ (b_sh * f(p.b)[None, :])


def vera() -> Variant:
  """Builds the VeRA variant (factored: A * d and B * b are rank-r factors)."""

  def init(key, w, spec: LeafSpec):
    del key  # the projections come from `seed`; d and b have constant inits
    dtype = common.adapter_dtype(spec, w)
    d = jnp.full(spec.batch_shape + (spec.rank,), spec.opt('d_initial'), dtype)
    b = jnp.zeros(spec.batch_shape + spec.out_shape, dtype)
    return w, VeraParams(d, b, spec)

  def factored(w, p: VeraParams):
    del w
    s = p.spec
    nb, ni = len(s.batch_shape), len(s.in_shape)
    a_sh, b_sh = projections(s, p.d.dtype)
    a = a_sh.reshape((1,) * nb + a_sh.shape) * p.d.reshape(s.batch_shape + (1,) * ni + (-1,))
    b = b_sh.reshape((1,) * nb + b_sh.shape) * jnp.expand_dims(p.b, nb)
    return Factored(a, b, 1.0)

  def delta(w, p: VeraParams):
    f = factored(w, p)
    return layout.delta_canonical(f.a, f.b, p.spec.kinds, w.dtype).astype(w.dtype)

  def num_params(spec: LeafSpec):
    return math.prod(spec.batch_shape) * (spec.rank + math.prod(spec.out_shape))

  def check(path, spec):
    common.check_int(path, spec, 'seed', 0)
    common.check_float(path, spec, 'd_initial')

  return Variant('vera', init, delta, factored, num_params, check,
                 options={'seed': 0, 'd_initial': 0.1},
                 layout=lambda s: {'d': common.axes_batch(s, 1), 'b': common.axes_out(s)},
                 reference=reference)
