"""LoRA-XS (Bałazy et al., 2024): a tiny trainable r x r core between frozen SVD factors.

    dW = s * A @ R @ B,    A = U_r,  B = S_r V_r^T   (truncated SVD of W, frozen)

Only R (r^2 numbers per kernel, independent of the width) trains. The paper initializes R from
N(0, core_std^2) with core_std = 1e-5; the default here is R = 0 (`core_std=0`), which makes the
first forward equal the base exactly and still trains, since A and B are not zero. A and B are
kept in the adapter state as frozen arrays (no gradient, no update, not counted as trainable).
Stacked kernels get one SVD per stacked layer.
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
from lorax_jax.variants.base import Factored, Variant, frozen_field, static_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraXsParams:
  """LoRA-XS adapter state: trainable `core` (batch + (r, r)); frozen `a`, `b` (canonical)."""
  core: jax.Array
  a: jax.Array = frozen_field()
  b: jax.Array = frozen_field()
  spec: LeafSpec = static_field()


def reference(w, p):
  """The paper's merged kernel, W + s A R B (A, B frozen), in float64 NumPy for a 2-D kernel
  `w` (the law tests check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  return w + p.spec.scale * f(p.a) @ f(p.core) @ f(p.b)


def lora_xs() -> Variant:
  """Builds the LoRA-XS variant (factored: A @ R and B are rank-r factors)."""

  def init(key, w, spec: LeafSpec):
    dtype = common.adapter_dtype(spec, w)
    r = spec.rank
    wm = common.matrix(w, spec).astype(common.compute_dtype(w))
    u, sv, vt = jnp.linalg.svd(wm, full_matrices=False)
    a = common.unflat_a(u[..., :, :r], spec).astype(dtype)
    b = common.unflat_b(sv[..., :r, None] * vt[..., :r, :], spec).astype(dtype)
    core = (spec.opt('core_std') * jax.random.normal(
        key, spec.batch_shape + (r, r), jnp.float32)).astype(dtype)
    return w, LoraXsParams(core, a, b, spec)

  def factored(w, p: LoraXsParams):
    del w
    s = p.spec
    a = common.flat_a(jax.lax.stop_gradient(p.a), s) @ p.core
    return Factored(common.unflat_a(a, s), jax.lax.stop_gradient(p.b), s.scale)

  def delta(w, p: LoraXsParams):
    f = factored(w, p)
    return (f.scale * layout.delta_canonical(f.a, f.b, p.spec.kinds, w.dtype)).astype(w.dtype)

  def num_params(spec: LeafSpec):
    return math.prod(spec.batch_shape) * spec.rank ** 2

  def check(path, spec):
    common.check_float(path, spec, 'core_std', 0.0)

  return Variant('lora_xs', init, delta, factored, num_params, check, options={'core_std': 0.0},
                 layout=lambda s: {**common.lora_layout(s), 'core': common.axes_batch(s, 2)},
                 reference=reference)
