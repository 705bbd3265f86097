"""LoKr (LyCORIS; cf. KronA, Edalati et al. 2022): a Kronecker product with a low-rank factor.

    dW = s * kron(C, A @ B)      C: (p, u),  A: (q, r),  B: (r, v),  d_in = p q,  d_out = u v

over the flattened in and out axes. (p, q) and (u, v) come from PEFT's `factorization(dim,
factor)`: with `factor` = -1 (default) the two factors closest to sqrt(dim), otherwise
(factor, dim / factor) ordered so that C is the smaller one. Init as PEFT: C = 0 and A, B
Kaiming-uniform, so dW = 0 at init.

Factored where the layout allows: kron(C, A@B) = kron(C, A) @ kron(I_u, B) (rank u r), or
kron(I_p, A) @ kron(C, B) (rank p r); the smaller one is used when it is cheaper for a training
step than forming dW (`common.cheaper_factored`), e.g. with a small `factor`. Otherwise
`lora(fn)` forms dW once per step, which strict mode allows.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common
from lorax_jax.variants.base import Factored, Variant, b_field, static_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LokrParams:
  """LoKr adapter state: `c` (batch + (p, u)), `a` (batch + (q, r)), `b` (batch + (r, v))."""
  c: jax.Array
  a: jax.Array
  b: jax.Array = b_field()
  spec: LeafSpec = static_field()


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
  """PEFT's / LyCORIS' `factorization`: (m, n) with m * n = dim and m <= n."""
  if factor > 0 and dim % factor == 0:
    m, n = factor, dim // factor
    return (n, m) if m > n else (m, n)
  if factor < 0:
    factor = dim
  m, n = 1, dim
  length = m + n
  while m < n:
    new_m = m + 1
    while dim % new_m != 0:
      new_m += 1
    new_n = dim // new_m
    if new_m + new_n > length or new_m > factor:
      break
    m, n = new_m, new_n
  return (n, m) if m > n else (m, n)


def shapes(spec: LeafSpec) -> tuple[int, int, int, int]:
  """(p, q, u, v): d_in = p q, d_out = u v."""
  f = spec.opt('factor')
  p, q = factorization(math.prod(spec.in_shape), f)
  u, v = factorization(math.prod(spec.out_shape), f)
  return p, q, u, v


def _kron(x, y):
  """Batched kron over the last two axes."""
  out = jnp.einsum('...ij,...kl->...ikjl', x, y)
  return out.reshape(out.shape[:-4] + (x.shape[-2] * y.shape[-2], x.shape[-1] * y.shape[-1]))


def reference(w, p):
  """The paper's merged kernel, W + s C kron (A B), in float64 NumPy for a 2-D kernel `w` (the
  law tests check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  return w + p.spec.scale * np.kron(f(p.c), f(p.a) @ f(p.b))


def lokr() -> Variant:
  """Builds the LoKr variant (factored when its Kronecker rank is small enough)."""

  def init(key, w, spec: LeafSpec):
    dtype = common.adapter_dtype(spec, w)
    p, q, u, v = shapes(spec)
    ka, kb = jax.random.split(key)
    c = jnp.zeros(spec.batch_shape + (p, u), dtype)
    a = common.kaiming_uniform(ka, spec.batch_shape + (q, spec.rank), q, dtype)
    b = common.kaiming_uniform(kb, spec.batch_shape + (spec.rank, v), spec.rank, dtype)
    return w, LokrParams(c, a, b, spec)

  def factored(w, prm: LokrParams):
    del w
    s = prm.spec
    p, _, u, _ = shapes(s)
    rank = min(p, u) * s.rank
    if not common.cheaper_factored(rank, s):
      return None
    bshape = s.batch_shape
    if u <= p:  # kron(C, A) @ kron(I_u, B)
      fa = _kron(prm.c, prm.a)
      fb = _kron(jnp.broadcast_to(jnp.eye(u, dtype=prm.b.dtype), bshape + (u, u)), prm.b)
    else:       # kron(I_p, A) @ kron(C, B)
      fa = _kron(jnp.broadcast_to(jnp.eye(p, dtype=prm.a.dtype), bshape + (p, p)), prm.a)
      fb = _kron(prm.c, prm.b)
    return Factored(common.unflat_a(fa, s), common.unflat_b(fb, s), s.scale)

  def delta(w, prm: LokrParams):
    cd = common.compute_dtype(w, prm.a)
    d = _kron(prm.c.astype(cd), prm.a.astype(cd) @ prm.b.astype(cd))
    return (prm.spec.scale * common.unmatrix(d, prm.spec)).astype(w.dtype)

  def num_params(spec: LeafSpec):
    p, q, u, v = shapes(spec)
    return math.prod(spec.batch_shape) * (p * u + spec.rank * (q + v))

  def check(path, spec):
    f = common.check_int(path, spec, 'factor', -1)
    if f == 0:
      raise ValueError(f'factor=0 for {path!r} (lokr): use -1 (automatic) or a positive divisor.')
    for name, dim in (('in', math.prod(spec.in_shape)), ('out', math.prod(spec.out_shape))):
      if f > 0 and dim % f:
        raise ValueError(f'factor={f} for {path!r} (lokr) does not divide its {name} size {dim}.')
    _, q, _, v = shapes(spec)
    if spec.rank > min(q, v):
      raise ValueError(f'rank={spec.rank} for {path!r} (lokr) must be <= {min(q, v)}, the '
                       f'smaller side of its low-rank Kronecker factor ({q} x {v}).')

  return Variant('lokr', init, delta, factored, num_params, check, options={'factor': -1},
                 layout=lambda s: {k: common.axes_batch(s, 2) for k in ('c', 'a', 'b')},
                 reference=reference)
