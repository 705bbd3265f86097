"""The loop's side of a method: its schedule calls, and the merge-and-restart schedule.

The jitted step with the in-step hooks is `lorax_jax.training.make_train_step(loss_fn, tx,
dyn)`; between steps the loop calls `apply_schedule(dyn, steps_done, state, tx)`, which says
whether shapes changed (the only time the step recompiles).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import optax

from lorax_jax.dynamics import base
from lorax_jax.dynamics import surgery


def shapes(tree: Any) -> Any:
  """The tree's structure (static fields included: a resized adapter's spec) and leaf shapes."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(getattr(x, 'dtype', type(x)))) for x in leaves)


def apply_schedule(dyn: base.Dynamics | None, step: int, state: base.TrainState,
                   tx: optax.GradientTransformation) -> tuple[base.TrainState, bool]:
  """Runs `dyn.schedule` if `step` (steps done) is on its interval.

  Returns:
    `(state, reshaped)`: `reshaped` is True when the adapters' or optimizer state's shapes (or
    the adapters' specs) changed, i.e. when a jitted step must recompile. Only methods that
    declare `resizes` can reshape.
  """
  if dyn is None or not dyn.every or dyn.schedule is None or step % dyn.every:
    return state, False
  new = dyn.schedule(step, state, tx)
  if new is state or not dyn.resizes:   # nothing done, or shapes kept by construction
    return new, False
  parts = lambda s: (s.adapters, s.opt_state, s.stats)
  return new, shapes(parts(new)) != shapes(parts(state))


def restarting(name: str, period: int, prune: float, seed: int, total_steps: int,
               learning_rate: Callable[[Any], Any] | None = None) -> base.Dynamics:
  """A method that merges the adapters into the base and restarts them every `period` steps
  (`surgery.merge_and_reinit`, moments pruned by `prune`): ReLoRA and COLA."""

  def check(spec, params):
    base.need(dyn, spec)
    surgery.check_mergeable(name, params, spec)

  def schedule(step, state, tx):
    if step >= total_steps:
      return state      # training is over: keep the last adapters for evaluation and export
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x5E5), step)
    return surgery.merge_and_reinit(state, key, prune=prune, tx=tx)

  def report(state):
    del state
    return {'restarts': max(0, (total_steps - 1) // period)}

  dyn = base.Dynamics(name, every=period, schedule=schedule, learning_rate=learning_rate,
                      check=check, report=report, changes_base=True)
  return dyn
