"""DoRA (Liu et al., ICML 2024): weight-decomposed low-rank adaptation.

    W' = m * (W + s*A@B) / ||W + s*A@B||_c

with the column norm taken over the kernel's in-axes for each output unit (and each stacked
layer), m initialized to ||W||_c so that W' = W at init. The weight-aware inits of
`lorax_jax.inits` compose (as in PEFT): with PiSSA the base is W_res = W - s*A@B and m is the
column norm of W_res + s*A@B, the original W. As in the paper (section 4.3) and PEFT,
the norm is treated as a constant in the backward pass.

`lora(fn)` never forms W + s*A@B: the forward is `(x@W + s*((x@A)@B)) * (m / n)` and the squared
norm expands into terms that cost one `A^T W` product per step:

    n^2 = ||W||_c^2 + 2s * sum_r B * (A^T W) + s^2 * sum_r B * ((A^T A) B)

Merging divides by n, so `unmerge` needs n: take it from `merge(..., return_cache=True)`.
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
class DoraParams:
  """DoRA adapter state: LoRA's `a`, `b` and the magnitude `m` (batch + out shape)."""
  a: jax.Array
  b: jax.Array = b_field()
  magnitude: jax.Array
  spec: LeafSpec = static_field()


def column_norm(w, a, b, spec: LeafSpec):
  """||W + s*A@B||_c (batch + out shape) from the expansion, without forming W + s*A@B."""
  cd = common.compute_dtype(w, a, b)
  wm = common.matrix(w, spec).astype(cd)
  a2 = common.flat_a(a, spec).astype(cd)
  b2 = common.flat_b(b, spec).astype(cd)
  s = spec.scale
  n2 = jnp.sum(jnp.square(wm), axis=-2)
  awt = jnp.einsum('...ir,...io->...ro', a2, wm)
  ata = jnp.einsum('...ir,...is->...rs', a2, a2)
  cross = jnp.sum(b2 * awt, axis=-2)
  quad = jnp.sum(b2 * jnp.einsum('...rs,...so->...ro', ata, b2), axis=-2)
  n2 = n2 + (2 * s) * cross + (s * s) * quad
  return jnp.sqrt(jnp.maximum(n2, 0)).reshape(spec.batch_shape + spec.out_shape)


def _adapted(w, p: DoraParams):
  """W + s*A@B in the kernel's layout (compute dtype), and its direct column norm."""
  cd = common.compute_dtype(w, p.a)
  wm = common.matrix(w, p.spec).astype(cd)
  ab = common.flat_a(p.a, p.spec).astype(cd) @ common.flat_b(p.b, p.spec).astype(cd)
  wa = wm + p.spec.scale * ab
  n = jnp.sqrt(jnp.sum(jnp.square(wa), axis=-2))
  return wa, n


def reference(w, p):
  """The paper's merged kernel, m (W + s A B) / ||W + s A B||_c (column norms over the input
  axis), in float64 NumPy for a 2-D kernel `w` (the law tests check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  wa = w + p.spec.scale * f(p.a) @ f(p.b)
  return f(p.magnitude) * wa / np.linalg.norm(wa, axis=0)


def dora() -> Variant:
  """Builds the DoRA variant (a factored form: output units scaled by m / ||W + sAB||)."""

  def init(key, w, spec: LeafSpec):
    a, b = common.lora_pair(key, w, spec)
    return w, from_factors(w, a, b, spec)

  def from_factors(w, a, b, spec: LeafSpec):
    # The same norm code as the forward, so that m / n is exactly 1 at init. For a residual
    # init (PiSSA, OLoRA, ...) w is W - s*A@B, so m is the column norm of the original W.
    m = column_norm(w, a, b, spec).astype(a.dtype)
    return DoraParams(a, b, m, spec)

  def factored(w, p: DoraParams):
    n = jax.lax.stop_gradient(column_norm(w, p.a, p.b, p.spec))
    cd = common.compute_dtype(p.magnitude)
    g = p.magnitude.astype(cd) / n.astype(p.magnitude.dtype).astype(cd)
    return Factored(p.a, p.b, p.spec.scale, g)

  def merged_matrix(w, p):
    wa, n = _adapted(w, p)
    m = p.magnitude.reshape(p.spec.batch_shape + (1, -1)).astype(wa.dtype)
    return wa * (m / n[..., None, :])

  def delta(w, p: DoraParams):
    wm = common.matrix(w, p.spec)
    out = merged_matrix(w, p) - wm.astype(common.compute_dtype(w, p.a))
    return common.unmatrix(out, p.spec).astype(w.dtype)

  def merge_cache(w, p: DoraParams):
    return _adapted(w, p)[1].reshape(p.spec.batch_shape + p.spec.out_shape)

  def unmerge(w_merged, p: DoraParams, cache):
    if cache is None:
      raise ValueError(
          'A DoRA leaf cannot be unmerged without the column norms of W + s*A@B '
          'computed at merge: use `merged, cache = merge(params, adapters, return_cache=True)` '
          'and `unmerge(merged, adapters, cache=cache)`.')
    cd = common.compute_dtype(w_merged, p.a)
    wm = common.matrix(w_merged, p.spec).astype(cd)
    n = cache.reshape(p.spec.batch_shape + (1, -1)).astype(cd)
    m = p.magnitude.reshape(p.spec.batch_shape + (1, -1)).astype(cd)
    ab = common.flat_a(p.a, p.spec).astype(cd) @ common.flat_b(p.b, p.spec).astype(cd)
    w = wm * (n / m) - p.spec.scale * ab
    return common.unmatrix(w, p.spec).astype(w_merged.dtype)

  def num_params(spec: LeafSpec):
    return math.prod(spec.batch_shape) * (
        spec.rank * (math.prod(spec.in_shape) + math.prod(spec.out_shape))
        + math.prod(spec.out_shape))

  return Variant('dora', init, delta, factored, num_params, unmerge=unmerge,
                 merge_cache=merge_cache, from_factors=from_factors,
                 layout=lambda s: {**common.lora_layout(s), 'magnitude': common.axes_out(s)},
                 reference=reference)
