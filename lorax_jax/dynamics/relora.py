"""ReLoRA (Lialin et al., ICLR 2024): periodic merge-and-restart with pruned optimizer moments
and a jagged learning-rate schedule."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from lorax_jax.dynamics import base
from lorax_jax.dynamics import engine


def jagged(schedule: optax.Schedule | float, period: int, warmup: int) -> optax.Schedule:
  """ReLoRA's jagged schedule: `schedule`, times a linear re-warmup over `warmup` steps after
  every restart (at multiples of `period`; the first segment keeps `schedule`'s own warmup)."""
  base_lr = schedule if callable(schedule) else (lambda count: schedule)

  def lr(count):
    count = jnp.asarray(count)
    since = count % period
    factor = jnp.where(count >= period, jnp.minimum(1.0, (since + 1) / warmup), 1.0)
    return base_lr(count) * factor

  return lr


def relora(*, period: int, total_steps: int, warmup: int | None = None, prune: float = 0.99,
           seed: int = 0) -> base.Dynamics:
  """ReLoRA (Lialin et al., ICLR 2024): every `period` steps W <- W + s A B, A and B
  re-initialized (B = 0: the function is unchanged), `prune` of the adapters' Adam moments
  zeroed by magnitude, and the learning rate restarted from 0 over `warmup` steps (`jagged`;
  `learning_rate` wraps the run's schedule; default min(50, period // 4), the paper re-warms
  over 50 to 100 steps of 5,000-step periods). The accumulated update has rank up to
  (restarts + 1) x r.

  Returns:
    The method (it `changes_base`).

  Raises:
    ValueError: for period < 1, a period not shorter than training (no restart would happen),
      warmup not in [1, period], prune not in [0, 1]; in `check`, tied or quantized leaves.
  """
  name = 'relora'
  total_steps = base.check_steps(name, total_steps)
  period = base.check_int(name, 'period', period, 1, why=' (steps between restarts)')
  if period >= total_steps:
    raise ValueError(f'{name}: period={period} must be < total_steps={total_steps}: the first '
                     'restart would come after training.')
  if warmup is None:
    warmup = max(1, min(50, period // 4))
  warmup = base.check_int(name, 'warmup', warmup, 1, period)
  prune = base.check_float(name, 'prune', prune, 0.0, 1.0)
  return engine.restarting(name, period, prune, seed, total_steps,
                           learning_rate=lambda s: jagged(s, period, warmup))


METHOD = base.Method('relora', relora, variant='lora')
