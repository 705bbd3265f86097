"""LoHa (FedPara, Hyeon-Woo et al. 2022; LyCORIS): a Hadamard product of two low-rank products.

    dW = s * (A1 @ B1) * (A2 @ B2)       rank up to r^2 from 2r(d_in + d_out) parameters

Init as PEFT: A1, B1, B2 Kaiming-uniform and A2 = 0 (PEFT's `hada_w2_b`), so dW = 0 at init.

Forming dW: LoHa has no rank-r factored form. Its exact rank-r^2 form (the row-wise Khatri-Rao
products A1 (.) A2 and B1 (.) B2) is used when it is cheaper for a training step than forming dW
(3 r^2 (d_in + d_out) < d_in d_out, see `common.cheaper_factored`); otherwise `lora(fn)` forms
dW once per step (never a dW-sized gradient of the base) and strict mode allows it.
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
class LohaParams:
  """LoHa adapter state: two LoRA pairs in canonical layout."""
  a1: jax.Array
  b1: jax.Array = b_field()
  a2: jax.Array
  b2: jax.Array = b_field()
  spec: LeafSpec = static_field()


def khatri_rao(p: LohaParams):
  """(A1 (.) A2, B1 (.) B2): canonical rank-r^2 factors with A' @ B' = (A1 B1) * (A2 B2)."""
  r = p.spec.rank
  a = p.a1[..., :, None] * p.a2[..., None, :]
  a = a.reshape(a.shape[:-2] + (r * r,))
  nb = len(p.spec.batch_shape)
  b = jnp.expand_dims(p.b1, nb + 1) * jnp.expand_dims(p.b2, nb)
  b = b.reshape(b.shape[:nb] + (r * r,) + b.shape[nb + 2:])
  return a, b


def reference(w, p):
  """The paper's merged kernel, W + s (A1 B1) * (A2 B2) (Hadamard product), in float64 NumPy
  for a 2-D kernel `w` (the law tests check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  return w + p.spec.scale * (f(p.a1) @ f(p.b1)) * (f(p.a2) @ f(p.b2))


def loha() -> Variant:
  """Builds the LoHa variant (dW formed, or the rank-r^2 factored form where cheaper)."""

  def init(key, w, spec: LeafSpec):
    dtype = common.adapter_dtype(spec, w)
    k1, k2, k3 = jax.random.split(key, 3)
    d_in = math.prod(spec.in_shape)
    a_shape = spec.batch_shape + spec.in_shape + (spec.rank,)
    b_shape = spec.batch_shape + (spec.rank,) + spec.out_shape
    a1 = common.kaiming_uniform(k1, a_shape, d_in, dtype)
    b1 = common.kaiming_uniform(k2, b_shape, spec.rank, dtype)
    b2 = common.kaiming_uniform(k3, b_shape, spec.rank, dtype)
    return w, LohaParams(a1, b1, jnp.zeros(a_shape, dtype), b2, spec)

  def factored(w, p: LohaParams):
    del w
    if not common.cheaper_factored(p.spec.rank ** 2, p.spec):
      return None
    a, b = khatri_rao(p)
    return Factored(a, b, p.spec.scale)

  def delta(w, p: LohaParams):
    k = p.spec.kinds
    d1 = layout.delta_canonical(p.a1, p.b1, k, w.dtype)
    d2 = layout.delta_canonical(p.a2, p.b2, k, w.dtype)
    return (p.spec.scale * d1 * d2).astype(w.dtype)

  def num_params(spec: LeafSpec):
    return 2 * math.prod(spec.batch_shape) * spec.rank * (
        math.prod(spec.in_shape) + math.prod(spec.out_shape))

  return Variant('loha', init, delta, factored, num_params,
                 layout=lambda s: {'a1': common.axes_a(s), 'b1': common.axes_b(s),
                                   'a2': common.axes_a(s), 'b2': common.axes_b(s)},
                 reference=reference)
