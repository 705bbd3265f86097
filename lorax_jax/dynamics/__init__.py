"""Training-time dynamics: methods that change ranks or the base while training.

The survey's rank refinement (AdaLoRA, DyLoRA, SoRA) and rank augmentation (ReLoRA, COLA,
Delta-LoRA) methods need hooks in the training loop. A method is a `Dynamics` (`base.py`): a
NamedTuple of pure functions and declarations, built by a factory (`adalora(...)`,
`relora(...)`, ...) like a variant or an optax transform. It acts on a `TrainState` of (step,
base, adapters, optimizer state, statistics). The one train step runs its in-step hooks:

    dyn = dynamics.relora(period=200, total_steps=1000)
    tx = lj.optimizer(dyn.learning_rate(schedule))
    step = lj.make_train_step(loss_fn, tx, dyn)          # jitted; loss_fn(joined, batch, rng)
    state = lj.init_state(params, adapters, tx, dyn)
    for i in range(1000):
      state, loss = step(state, batch(i), jax.random.key(i))
      state, reshaped = dynamics.apply_schedule(dyn, i + 1, state, tx)
      if reshaped:                                        # only when shapes really changed
        step = lj.make_train_step(loss_fn, tx, dyn)       # (or let jit retrace)

Layout: `base` (the protocol, the registry, checks), `engine` (the loop's schedule call, the
merge-and-restart schedule), `surgery` (resizing, optimizer-state slicing and pruning through
`optax.tree_utils.tree_map_params`, merging into the base, update ranks), one file per method.
A new method is one file with its factory and `METHOD`, plus one line in `_BUILTIN` (or
`register(Method(...))` from research code).

Every factory validates its settings when it is built (config time), and `check(spec, params)`
validates them against the selection before the first step: bad settings never fail mid-run.
"""

from lorax_jax.dynamics import adalora as _adalora
from lorax_jax.dynamics import cola as _cola
from lorax_jax.dynamics import delta_lora as _delta_lora
from lorax_jax.dynamics import dylora as _dylora
from lorax_jax.dynamics import relora as _relora
from lorax_jax.dynamics import sora as _sora
from lorax_jax.dynamics.adalora import adalora, adalora_budget
from lorax_jax.dynamics.base import (LOOP_OPTIONS, Dynamics, Method, TrainState,
                                     default_variant, get, init_state, method, names, none,
                                     register)
from lorax_jax.dynamics.cola import cola
from lorax_jax.dynamics.delta_lora import delta_lora
from lorax_jax.dynamics.dylora import dylora, truncate
from lorax_jax.dynamics.engine import apply_schedule, restarting, shapes
from lorax_jax.dynamics.relora import jagged, relora
from lorax_jax.dynamics.sora import soft_threshold, sora
from lorax_jax.dynamics.surgery import (merge_and_reinit, prune_by_magnitude, prune_opt_state,
                                        rank_axis, resizable, resize, resize_opt_state,
                                        update_ranks)

# The registry configs use: one line per method.
_BUILTIN = (_adalora.METHOD, _dylora.METHOD, _sora.METHOD, _relora.METHOD, _cola.METHOD,
            _delta_lora.METHOD)
for _m in _BUILTIN:
  register(_m)
del _m

__all__ = [
    'LOOP_OPTIONS', 'Dynamics', 'Method', 'TrainState', 'adalora', 'adalora_budget',
    'apply_schedule', 'cola', 'default_variant', 'delta_lora', 'dylora', 'get', 'init_state',
    'jagged', 'merge_and_reinit', 'method', 'names', 'none', 'prune_by_magnitude',
    'prune_opt_state', 'rank_axis', 'register', 'relora', 'resizable', 'resize',
    'resize_opt_state', 'restarting', 'shapes', 'soft_threshold', 'sora', 'truncate',
    'update_ranks',
]
