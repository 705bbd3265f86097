"""LoRA-FA (Zhang et al., 2023): LoRA with A frozen at its random init; only B trains.

dW = s * A @ B. The frozen A is kept in the adapter state (a `frozen_field`: no gradient, no
update, not counted as trainable) so the activation x@A is all the backward pass stores.
`lora_fa_preconditioner()` (or `optimizer(..., lora_fa_precondition=True)`) adds PEFT's LoRA-FA
gradient step, g_B <- (1/s^2) (A^T A + delta I)^-1 g_B, which makes the B update approximate
full fine-tuning's.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_jax import layout
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common
from lorax_jax.variants.base import Factored, Variant, b_field, frozen_field, static_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFaParams:
  """LoRA-FA adapter state: frozen `a` (batch + in + (r,)) and trainable `b`."""
  a: jax.Array = frozen_field()
  b: jax.Array = b_field()
  spec: LeafSpec = static_field()


def reference(w, p):
  """The paper's merged kernel, W + s A B (A frozen), in float64 NumPy for a 2-D kernel `w`
  (the law tests check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  return w + p.spec.scale * f(p.a) @ f(p.b)


def lora_fa() -> Variant:
  """Builds the LoRA-FA variant (factored, like LoRA)."""

  def init(key, w, spec: LeafSpec):
    return w, LoraFaParams(*common.lora_pair(key, w, spec), spec)

  def factored(w, p: LoraFaParams):
    del w
    return Factored(jax.lax.stop_gradient(p.a), p.b, p.spec.scale)

  def delta(w, p: LoraFaParams):
    return (p.spec.scale * layout.delta_canonical(p.a, p.b, p.spec.kinds, w.dtype)).astype(w.dtype)

  def num_params(spec: LeafSpec):
    return math.prod(spec.batch_shape) * spec.rank * math.prod(spec.out_shape)

  return Variant('lora_fa', init, delta, factored, num_params,
                 layout=common.lora_layout, reference=reference, resizable=True)


def _precondition(g, p: LoraFaParams, delta: float):
  s = p.spec
  a = common.flat_a(p.a, s).astype(jnp.float32)
  ata = jnp.einsum('...ir,...is->...rs', a, a) + delta * jnp.eye(s.rank, dtype=jnp.float32)
  gb = common.flat_b(g.b, s).astype(jnp.float32)
  gb = jnp.linalg.solve(ata, gb) / (s.scale ** 2)
  return dataclasses.replace(g, b=common.unflat_b(gb, s).astype(g.b.dtype))


def lora_fa_preconditioner(delta: float = 1e-8) -> optax.GradientTransformation:
  """PEFT's LoRA-FA gradient transform for `lora_fa` leaves: g_B <- (A^T A + delta I)^-1 g_B / s^2.

  Chain it before the optimizer; it needs the adapters as `params` in `update`. Other leaves
  pass through unchanged.
  """
  if not delta >= 0:
    raise ValueError(f'delta={delta!r} must be >= 0.')

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('lora_fa_preconditioner needs the adapters: call update(g, state, params).')
    is_fa = lambda x: isinstance(x, LoraFaParams)
    out = jax.tree_util.tree_map(
        lambda g, p: _precondition(g, p, delta) if is_fa(p) else g, updates, params,
        is_leaf=is_fa)
    return out, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
