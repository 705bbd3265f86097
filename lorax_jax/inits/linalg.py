"""Decompositions shared by the inits (batched over leading axes, jit-able), and the residual.

`svd` and `randomized_svd` give `(U, S, Vh)`; `split_sqrt` splits a scaled triplet into LoRA
factors; `residual` casts the factors to the adapter dtype and returns W - s*A@B with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common


def t(m):
  """The matrix transpose of the last two axes."""
  return jnp.swapaxes(m, -1, -2)


def f32(w):
  """`w` in at least float32 (`common.compute_dtype`)."""
  return w.astype(common.compute_dtype(w))


def svd(m: jax.Array):
  """Exact thin SVD: m = U diag(S) Vh, singular values descending."""
  return jnp.linalg.svd(m, full_matrices=False)


def randomized_svd(key: jax.Array, m: jax.Array, rank: int, niter: int,
                   oversample: int = 10):
  """The top-`rank` singular triplets of `m` (batch + (p, q)) by randomized subspace iteration.

  Halko, Martinsson and Tropp (2011), Algorithm 4.4: a Gaussian sketch of `rank + oversample`
  columns, `niter` power iterations re-orthonormalized by QR (as `torch.svd_lowrank`), then the
  exact SVD of the small projected matrix. Costs O(p q (rank + oversample) (2 niter + 2)).

  Returns:
    `(U, S, Vh)` with `rank` columns / values / rows.
  """
  p, q = m.shape[-2:]
  k = min(rank + oversample, p, q)
  omega = jax.random.normal(key, m.shape[:-2] + (q, k), m.dtype)
  basis, _ = jnp.linalg.qr(m @ omega)
  for _ in range(niter):
    z, _ = jnp.linalg.qr(t(m) @ basis)
    basis, _ = jnp.linalg.qr(m @ z)
  u, s, vh = jnp.linalg.svd(t(basis) @ m, full_matrices=False)
  return (basis @ u)[..., :rank], s[..., :rank], vh[..., :rank, :]


def split_sqrt(u, s, vh, scale: float):
  """A = U sqrt(S / scale), B = sqrt(S / scale) Vh, so that scale * A @ B = U S Vh."""
  root = jnp.sqrt(s / scale)
  return u * root[..., None, :], root[..., :, None] * vh


def residual(w, spec: LeafSpec, a_mat, b_mat):
  """Casts the factors to the adapter dtype and returns (W - s*A@B, A, B) in spec layouts.

  The product is formed from the factors as stored, so that the residual base plus the scaled
  adapter reproduces W at step 0.
  """
  dtype = common.adapter_dtype(spec, w)
  a = common.unflat_a(a_mat.astype(dtype), spec)
  b = common.unflat_b(b_mat.astype(dtype), spec)
  cd = common.compute_dtype(w, a)
  dw = spec.scale * (a_mat.astype(dtype).astype(cd) @ b_mat.astype(dtype).astype(cd))
  res = f32(w).astype(cd) - common.unmatrix(dw, spec)
  return res.astype(w.dtype), a, b
