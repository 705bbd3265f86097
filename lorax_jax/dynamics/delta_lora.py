"""Delta-LoRA (Zi et al., 2023): the base moves by the change of the low-rank update after
every optimizer step, with no base gradient and no base optimizer state."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax_jax import layout
from lorax_jax import paths
from lorax_jax import variants
from lorax_jax.dynamics import base
from lorax_jax.dynamics import surgery
from lorax_jax.leafspec import FULL, spec_leaves


def _change(w, old, new) -> jax.Array:
  """dW(new) - dW(old) in float32: one rank-2r product [A1 s1, -A0 s0] @ [B1; B0] for factored
  variants (one kernel-sized temporary, not two), else the difference of the two deltas."""
  v = variants.get(new.spec.variant)
  f1 = v.factored(w, new) if v.factored else None
  f0 = v.factored(w, old) if v.factored else None
  if f1 is None or f0 is None or f1.out_scale is not None or f0.out_scale is not None:
    return v.delta(w, new).astype(jnp.float32) - v.delta(w, old).astype(jnp.float32)
  nb = len(new.spec.batch_shape)
  a = jnp.concatenate([f1.a.astype(jnp.float32) * f1.scale,
                       -f0.a.astype(jnp.float32) * f0.scale], axis=-1)
  b = jnp.concatenate([f1.b.astype(jnp.float32), f0.b.astype(jnp.float32)], axis=nb)
  return layout.delta_canonical(a, b, new.spec.kinds, jnp.float32)


def delta_lora(*, scale: float = 2.0, start: int = 0, total_steps: int | None = None
               ) -> base.Dynamics:
  """Delta-LoRA (Zi et al., 2023): after every optimizer update (from step `start` on), the
  base also moves by the change of the low-rank update, W <- W + scale * (dW_{t+1} - dW_t)
  (dW = s A B). W gets no gradient and no optimizer state: the step carries the base in and out
  (donated, updated in place).

  Returns:
    The method (it `changes_base`).

  Raises:
    ValueError: for a negative start, a start not before the end of training, or a negative
      scale; in `check`, variants whose update depends on W (DoRA), tied or quantized leaves.
  """
  name = 'delta_lora'
  scale = base.check_float(name, 'scale', scale, 0.0)
  start = base.check_int(name, 'start', start, 0)
  if total_steps is not None:
    total_steps = base.check_steps(name, total_steps)
    if start >= total_steps:
      raise ValueError(f'{name}: start={start} must be < total_steps={total_steps}: the base '
                       'would never be updated.')

  def check(spec, params):
    surgery.check_mergeable(name, params, spec)
    if spec is None:
      return
    for path, s in spec_leaves(spec).items():
      if s.variant != FULL and variants.get(s.variant).unmerge is not None:
        raise ValueError(f'{name}: {path!r} uses {s.variant!r}, whose update depends on W; '
                         'Delta-LoRA needs an additive one (lora, lora_fa, vera, ...).')

  def after(state, old_adapters):
    old = base.low_rank(old_adapters)
    new = base.low_rank(state.adapters)
    on = (state.step - 1 >= start).astype(jnp.float32)

    def leaf(kp, w):
      path = paths.path_str(kp)
      if path not in new:
        return w
      return (w.astype(jnp.float32) + (on * scale) * _change(w, old[path], new[path])
              ).astype(w.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, state.params)
    return state._replace(params=params)

  return base.Dynamics(name, after=after, check=check, changes_base=True)


METHOD = base.Method('delta_lora', delta_lora, variant='lora')
