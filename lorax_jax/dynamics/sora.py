"""SoRA (Ding et al., EMNLP 2023): a proximal L1 step on the gates of `sora` leaves after every
update, and the ranks whose gate reached zero really cut from the adapters."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_jax import variants
from lorax_jax.dynamics import base
from lorax_jax.dynamics import surgery


def soft_threshold(x: jax.Array, t) -> jax.Array:
  """The proximal operator of t * ||x||_1: sign(x) * max(|x| - t, 0)."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0).astype(x.dtype)


def _alive(gate) -> np.ndarray:
  """Per rank: whether its gate is non-zero in some layer of a stacked leaf."""
  g = np.asarray(jax.device_get(gate))
  return np.any(g.reshape(-1, g.shape[-1]) != 0, axis=0)


def sora(*, learning_rate: float | optax.Schedule, sparsity: float = 3e-4, every: int = 100
         ) -> base.Dynamics:
  """SoRA (Ding et al., EMNLP 2023) for `sora` leaves: after every optimizer update the gates
  take the proximal step of the L1 penalty, g <- sign(g) max(|g| - eta_t * sparsity, 0) (eta_t:
  the learning rate at that step), and every `every` steps the ranks whose gate is zero (in all
  layers of a stacked leaf) are cut from A, B, the gate and their optimizer moments: the
  adapters really shrink (same function), and the step recompiles.

  Returns:
    The method (it `resizes`).

  Raises:
    ValueError: for a learning rate that is not a finite number > 0 (or a schedule), a
      negative `sparsity` or `every` < 1.
  """
  name = 'sora'
  learning_rate = base.check_learning_rate(f'{name}: learning_rate', learning_rate)
  sparsity = base.check_float(name, 'sparsity', sparsity, 0.0)
  every = base.check_int(name, 'every', every, 1)
  lr = learning_rate if callable(learning_rate) else (lambda step: learning_rate)

  def check(spec, params):
    del params
    base.need(dyn, spec)

  def after(state, old_adapters):
    del old_adapters
    t = lr(state.step - 1) * sparsity
    new = {p: dataclasses.replace(a, gate=soft_threshold(a.gate, t))
           for p, a in base.of(state.adapters, variants.SoraParams).items()}
    return state._replace(adapters=base.replace_leaves(state.adapters, new))

  def schedule(step, state, tx):
    del step
    keep = {}
    for p, a in base.of(state.adapters, variants.SoraParams).items():
      alive = _alive(a.gate)
      if not alive.all():
        kept = np.nonzero(alive)[0]
        keep[p] = kept if kept.size else np.array([0])   # a rank-1 remnant (gate 0: no-op)
    if not keep:
      return state
    adapters = surgery.resize(state.adapters, keep)
    opt_state = surgery.resize_opt_state(tx, state.opt_state, state.adapters, adapters, keep)
    return state._replace(adapters=adapters, opt_state=opt_state)

  def report(state):
    alloc = {p: int(np.sum(_alive(a.gate)))
             for p, a in base.of(state.adapters, variants.SoraParams).items()}
    return {'rank_allocation': alloc, 'total_rank': int(sum(alloc.values()))}

  dyn = base.Dynamics(name, every=every, schedule=schedule, after=after, check=check,
                      report=report, resizes=True, variants=('sora',))
  return dyn


METHOD = base.Method('sora', sora, variant='sora')
