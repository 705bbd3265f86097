"""Training: the one train step over a `TrainState`, LoRA+ and adapter-only weight decay.

The base parameters are a separate, non-differentiated (and donatable) argument of the step:
no base-sized gradient ever exists. A training-time method (`lorax_jax.dynamics`) plugs its
in-step hooks into the same step.

>>> tx = optimizer(1e-3, loraplus_ratio=16, weight_decay=1e-2)
>>> step = make_train_step(loss_fn, tx)                                   # doctest: +SKIP
>>> state = init_state(params, adapters, tx)                              # doctest: +SKIP
>>> state, loss = step(state, batch, rng)                                 # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from lorax_jax import adapters as adapters_lib
from lorax_jax import sharding as sharding_lib
from lorax_jax import variants
from lorax_jax.dynamics.base import (Dynamics, TrainState, check_learning_rate, init_state,
                                     is_number, none)

LABELS = ('lora_a', 'lora_b', 'full', 'frozen')
labels = adapters_lib.labels


def optimizer(learning_rate: float | optax.Schedule, *, loraplus_ratio: float = 1.0,
              weight_decay: float = 0.0, full_learning_rate: float | optax.Schedule | None = None,
              make: Callable[..., optax.GradientTransformation] = optax.adamw,
              lora_fa_precondition: bool = False,
              **kwargs) -> optax.GradientTransformation:
  """AdamW (or `make`) over the adapter tree, with LoRA+ and adapter-only weight decay.

  Args:
    learning_rate: learning rate of A factors (a float or an optax schedule).
    loraplus_ratio: LoRA+ (Hayou et al., 2024): B factors use `ratio * learning_rate`. 1 = off.
    weight_decay: decoupled weight decay; it applies to what is trained (adapters and fully
      trained leaves), never to the frozen base, which the optimizer does not see.
    full_learning_rate: learning rate of fully trained leaves (default `learning_rate`).
    make: optax optimizer factory taking `learning_rate` and `weight_decay`.
    lora_fa_precondition: precondition the B gradients of `lora_fa` leaves as PEFT's LoRA-FA
      optimizer does (`variants.lora_fa_preconditioner`).
    **kwargs: passed to `make`.

  Arrays the method keeps fixed (label `'frozen'`: LoRA-FA's A, LoRA-XS's SVD factors) get no
  update and no weight decay.

  Returns:
    An `optax.GradientTransformation` for adapter trees.

  Raises:
    ValueError: for a learning rate that is not a finite number > 0 (or a schedule), a
      `loraplus_ratio` that is not a finite number > 0 or a `weight_decay` that is not a
      finite number >= 0.
  """
  check_learning_rate('learning_rate', learning_rate)
  if full_learning_rate is not None:
    check_learning_rate('full_learning_rate', full_learning_rate)
  if not (is_number(loraplus_ratio) and np.isfinite(loraplus_ratio) and loraplus_ratio > 0):
    raise ValueError(f'loraplus_ratio={loraplus_ratio!r} must be a finite number > 0 (1 '
                     'disables LoRA+).')
  if not (is_number(weight_decay) and np.isfinite(weight_decay) and weight_decay >= 0):
    raise ValueError(f'weight_decay={weight_decay!r} must be a finite number >= 0.')

  def scaled(lr, k):
    return (lambda step: lr(step) * k) if callable(lr) else lr * k

  full_lr = learning_rate if full_learning_rate is None else full_learning_rate
  txs = {
      'lora_a': make(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs),
      'lora_b': make(learning_rate=scaled(learning_rate, loraplus_ratio),
                     weight_decay=weight_decay, **kwargs),
      'full': make(learning_rate=full_lr, weight_decay=weight_decay, **kwargs),
      'frozen': optax.set_to_zero(),
  }
  tx = optax.multi_transform(txs, labels)
  if lora_fa_precondition:
    tx = optax.chain(variants.lora_fa_preconditioner(), tx)
  return tx


def state_shardings(tx: optax.GradientTransformation, params: Any, adapters: Any,
                    base_shardings: Any, batch: Any, mesh: jax.sharding.Mesh,
                    dyn: Dynamics | None = None) -> sharding_lib.TrainShardings:
  """The `TrainShardings` of a step over `adapters` (arrays or abstract values): the base's
  given, the adapters' derived from it, the optimizer state's from the adapters' (through
  `optax.tree_utils.tree_map_params`: each copy of the adapter tree takes its shardings, step
  counts are replicated), the method's statistics like the adapters they copy, the batch's
  leading axis split over `data` and `fsdp` (`batch`: an example batch or its shapes).
  """
  dyn = dyn or none()
  adapter_sh = sharding_lib.adapter_shardings(adapters, base_shardings)
  rep = sharding_lib.replicated(mesh)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_sh = optax.tree_utils.tree_map_params(
      tx, lambda x, s: x if masked(x) else s, jax.eval_shape(tx.init, adapters), adapter_sh,
      transform_non_params=lambda x: jax.tree_util.tree_map(lambda _: rep, x), is_leaf=masked)
  stats = jax.eval_shape(dyn.init, params, adapters)
  stats_sh = sharding_lib.like_params(stats, adapters, adapter_sh, mesh=mesh)
  batch_sh = jax.tree_util.tree_map(lambda x: sharding_lib.batch_sharding(mesh, np.ndim(x)),
                                    batch)
  return sharding_lib.TrainShardings(base_shardings, adapter_sh, opt_sh, batch_sh, mesh,
                                     stats_sh)


class TrainStep:
  """A jitted train step (see `make_train_step`); call it or `.lower` it."""

  def __init__(self, jitted, dyn: Dynamics, has_aux: bool):
    self._jitted = jitted
    self._dyn = dyn
    self._has_aux = has_aux

  def _args(self, args: Sequence[Any]) -> tuple[tuple, bool]:
    """The flat arguments of the jitted function, and whether the call is the legacy form."""
    if args and isinstance(args[0], TrainState):
      if len(args) not in (2, 3):
        raise TypeError('step(state, batch, rng=None) takes a TrainState, a batch and an rng; '
                        f'got {len(args)} arguments.')
      state, batch, rng = (tuple(args) + (None,))[:3]
      return tuple(state) + (batch, rng), False
    if len(args) not in (4, 5):
      raise TypeError('step takes (state, batch, rng=None) or (params, adapters, opt_state, '
                      f'batch, rng=None); got {len(args)} arguments.')
    if self._dyn.name != 'none':
      raise ValueError(f'A step with dynamics {self._dyn.name!r} takes a TrainState (its '
                       'statistics and step count): call step(state, batch, rng).')
    params, adapters, opt_state, batch, rng = (tuple(args) + (None,))[:5]
    return (np.int32(0), params, adapters, opt_state, (), batch, rng), True

  def __call__(self, *args):
    flat, legacy = self._args(args)
    out = self._jitted(*flat)
    state, rest = out[0], out[1:]
    if legacy:
      return (state.adapters, state.opt_state) + tuple(rest)
    return (state,) + tuple(rest)

  def lower(self, *args):
    """`jax.jit(...).lower` at these arguments (either call form). The compiled step takes the
    flat arguments `(*state, batch, rng)`."""
    return self._jitted.lower(*self._args(args)[0])


def make_train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation,
                    dyn: Dynamics | None = None, *, has_aux: bool = False, donate: bool = True,
                    shardings: sharding_lib.TrainShardings | None = None) -> TrainStep:
  """THE train step: differentiates `loss_fn` with respect to the adapters only, with the
  in-step hooks of a training-time method (`lorax_jax.dynamics`).

  Args:
    loss_fn: `(joined_params, batch, rng) -> loss` (or `(loss, aux)` with `has_aux`), where
      `joined_params = join(params, adapters)`; it typically calls `lora(apply)(joined, ...)`.
    tx: the optimizer (e.g. from `optimizer(...)`).
    dyn: the method (None: plain training): its `prepare` (adapters the loss sees),
      `regularizer` (added to the loss), `observe` (statistics) and `after` (after the
      update) hooks run inside the step.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    donate: donate the state's buffers to the outputs (the base only for methods that change
      it: otherwise the caller's base stays valid).
    shardings: optional `sharding.TrainShardings` (e.g. from `state_shardings`): the step is
      jitted with them as `in_shardings` / `out_shardings` (the state keeps its shardings; the
      step count and the loss are replicated), over the mesh they name.

  Returns:
    A `TrainStep`: `step(state, batch, rng=None) -> (state, loss[, aux])` over a `TrainState`
    (`init_state`); `loss` is the data loss, without the method's regularizer. For plain
    training it also takes `step(params, adapters, opt_state, batch, rng=None) ->
    (adapters, opt_state, loss[, aux])`. Only the adapters are differentiated: no base-sized
    gradient exists.

  Example:
    >>> step = make_train_step(loss_fn, tx)                    # doctest: +SKIP
    >>> state, loss = step(init_state(params, adapters, tx), batch, rng)   # doctest: +SKIP

  Raises:
    ValueError: for a `loss_fn` that is not callable, a `tx` that is not an optax
      `GradientTransformation` (no `init` and `update`) or a `dyn` that is not a `Dynamics`.
  """
  if not callable(loss_fn):
    raise ValueError(f'loss_fn={loss_fn!r} must be a function (joined_params, batch, rng) -> '
                     f'loss; got a {type(loss_fn).__name__}.')
  if not (callable(getattr(tx, 'init', None)) and callable(getattr(tx, 'update', None))):
    raise ValueError(f'tx={tx!r} must be an optax GradientTransformation (e.g. from '
                     f'lorax_jax.optimizer); got a {type(tx).__name__}.')
  if dyn is not None and not isinstance(dyn, Dynamics):
    raise ValueError(f'dyn={dyn!r} must be a lorax_jax.dynamics method (e.g. '
                     f'dynamics.relora(...)) or None; got a {type(dyn).__name__}.')
  dyn = dyn or none()

  def inner(count, params, adapters, opt_state, stats, batch, rng):
    state = TrainState(count, params, adapters, opt_state, stats)

    def objective(ad):
      used = dyn.prepare(ad, state.step, rng) if dyn.prepare else ad
      out = loss_fn(adapters_lib.join(state.params, used), batch, rng)
      loss = out[0] if has_aux else out
      total = loss + dyn.regularizer(ad) if dyn.regularizer else loss
      return total, out

    (_, out), grads = jax.value_and_grad(objective, has_aux=True)(state.adapters)
    stats = (dyn.observe(state.stats, state.step, state.adapters, grads) if dyn.observe
             else state.stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.adapters)
    adapters = optax.apply_updates(state.adapters, updates)
    new = TrainState(state.step + 1, state.params, adapters, opt_state, stats)
    if dyn.after:
      new = dyn.after(new, state.adapters)
    return (new,) + (tuple(out) if has_aux else (out,))

  donated = ((0, 1, 2, 3, 4) if dyn.changes_base else (0, 2, 3, 4)) if donate else ()
  kw = dict(donate_argnums=donated)
  if shardings is not None:
    rep = sharding_lib.replicated(shardings.mesh)
    stats_sh = shardings.stats if shardings.stats is not None else rep
    state_sh = TrainState(rep, shardings.params, shardings.adapters, shardings.opt_state,
                          stats_sh)
    kw.update(in_shardings=tuple(state_sh) + (shardings.batch, rep),
              out_shardings=(state_sh, rep) + ((None,) if has_aux else ()))
  return TrainStep(jax.jit(inner, **kw), dyn, has_aux)


__all__ = ['LABELS', 'TrainState', 'TrainStep', 'init_state', 'labels', 'make_train_step',
           'optimizer', 'state_shardings']
