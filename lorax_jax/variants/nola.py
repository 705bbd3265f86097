"""NOLA (Koohpayegani et al., ICLR 2024): LoRA factors as mixtures of frozen random bases.

    A = A0 + sum_i alpha_i A_i,   B = sum_j beta_j B_j,   dW = s * A @ B

Only the coefficients alpha, beta (`num_basis` each) train. The bases A_i, B_j (entries
U[-1, 1] / sqrt(num_basis)) and A0 (Kaiming-uniform, as the official code) are never stored:
they are regenerated inside each step from the static `seed` and the kernel's `salt` (by default
the crc32 of its path, set at selection, so every kernel gets its own bases), per kernel
(and per stacked layer). alpha = beta = 0 at init, so B = 0 and the first forward equals the
base; beta gets a gradient through A0.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import layout
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common
from lorax_jax.variants.base import Factored, Variant, b_field, static_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NolaParams:
  """NOLA adapter state: mixing coefficients `alpha`, `beta` (batch + (num_basis,))."""
  alpha: jax.Array
  beta: jax.Array = b_field()
  spec: LeafSpec = static_field()


def bases(spec: LeafSpec, dtype=jnp.float32):
  """(A0, A_i, B_j) of one kernel: batch + in + (r,), batch + (k,) + in + (r,), and
  batch + (k, r) + out."""
  k = spec.opt('num_basis')
  key = common.seeded_key(spec.opt('seed'), 'nola', spec.opt('salt'), spec.shape)
  k0, ka, kb = jax.random.split(key, 3)
  bs, ins, outs, r = spec.batch_shape, spec.in_shape, spec.out_shape, spec.rank
  a0 = common.kaiming_uniform(k0, bs + ins + (r,), math.prod(ins), dtype)
  lim = 1.0 / math.sqrt(k)
  a_i = jax.random.uniform(ka, bs + (k,) + ins + (r,), jnp.float32, -lim, lim).astype(dtype)
  b_j = jax.random.uniform(kb, bs + (k, r) + outs, jnp.float32, -lim, lim).astype(dtype)
  return a0, a_i, b_j


def reference(w, p):
  """The paper's merged kernel, W + s (A0 + sum_i alpha_i A_i) (sum_j beta_j B_j), in float64
  NumPy for a 2-D kernel `w` (the law tests check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  a0, a_i, b_j = (f(x) for x in bases(p.spec, jnp.float64))
  a = a0 + np.einsum('k,kir->ir', f(p.alpha), a_i)
  return w + p.spec.scale * a @ np.einsum('k,kro->ro', f(p.beta), b_j)


def nola() -> Variant:
  """Builds the NOLA variant (factored: the mixed A and B are rank-r factors)."""

  def init(key, w, spec: LeafSpec):
    del key  # the bases come from `seed`; the coefficients start at 0
    dtype = common.adapter_dtype(spec, w)
    shape = spec.batch_shape + (spec.opt('num_basis'),)
    return w, NolaParams(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), spec)

  def factored(w, p: NolaParams):
    del w
    s = p.spec
    a0, a_i, b_j = bases(s, p.alpha.dtype)
    nb = len(s.batch_shape)
    mix = lambda c, m: jnp.einsum('zk,zk...->z...', c.reshape(-1, c.shape[-1]),
                                  m.reshape((-1,) + m.shape[nb:])).reshape(
                                      s.batch_shape + m.shape[nb + 1:])
    return Factored(a0 + mix(p.alpha, a_i), mix(p.beta, b_j), s.scale)

  def delta(w, p: NolaParams):
    f = factored(w, p)
    return (f.scale * layout.delta_canonical(f.a, f.b, p.spec.kinds, w.dtype)).astype(w.dtype)

  def num_params(spec: LeafSpec):
    return math.prod(spec.batch_shape) * 2 * spec.opt('num_basis')

  def check(path, spec):
    common.check_int(path, spec, 'num_basis', 1)
    common.check_int(path, spec, 'seed', 0)
    if spec.opt('salt') is not None:
      common.check_int(path, spec, 'salt', 0)

  def bind(path, spec):
    if spec.opt('salt') is not None:
      return spec
    options = tuple((k, zlib.crc32(path.encode()) & 0x7FFFFFFF if k == 'salt' else v)
                    for k, v in spec.options)
    return dataclasses.replace(spec, options=options)

  return Variant('nola', init, delta, factored, num_params, check,
                 options={'num_basis': 64, 'seed': 0, 'salt': None}, bind=bind,
                 layout=lambda s: {'alpha': common.axes_batch(s, 1),
                                   'beta': common.axes_batch(s, 1)}, reference=reference)
