"""Training helpers: gradients for the adapters only, LoRA+ and adapter-only weight decay.

The base parameters are a separate, non-differentiated (and donatable) argument of the step:
no base-sized gradient ever exists.

>>> tx = optimizer(1e-3, loraplus_ratio=16, weight_decay=1e-2)
>>> step = make_train_step(loss_fn, tx)                                  # doctest: +SKIP
>>> adapters, opt_state, loss = step(params, adapters, opt_state, batch)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from lorax_jax import adapters as adapters_lib
from lorax_jax import variants

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
    ValueError: for a non-positive `loraplus_ratio` or a negative `weight_decay`.
  """
  if not loraplus_ratio > 0:
    raise ValueError(f'loraplus_ratio={loraplus_ratio!r} must be > 0 (1 disables LoRA+).')
  if weight_decay < 0:
    raise ValueError(f'weight_decay={weight_decay!r} must be >= 0.')

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


def make_train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *,
                    has_aux: bool = False, donate: bool = True,
                    shardings: Any = None) -> Callable:
  """A jitted step that differentiates `loss_fn` with respect to the adapters only.

  Args:
    loss_fn: `(joined_params, batch, rng) -> loss` (or `(loss, aux)` with `has_aux`), where
      `joined_params = join(params, adapters)`; it typically calls `lora(apply)(joined, ...)`.
    tx: the optimizer (e.g. from `optimizer(...)`).
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    donate: donate the adapter and optimizer-state buffers to the outputs.
    shardings: optional `sharding.TrainShardings`: the step is jitted with them as
      `in_shardings` / `out_shardings` (adapters and optimizer state keep theirs; the loss is
      replicated), over the mesh they name.

  Returns:
    `step(params, adapters, opt_state, batch, rng=None) -> (adapters, opt_state, loss[, aux])`.
  """

  def step(params, adapters, opt_state, batch, rng=None):
    def objective(ad):
      return loss_fn(adapters_lib.join(params, ad), batch, rng)

    out, grads = jax.value_and_grad(objective, has_aux=has_aux)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    adapters = optax.apply_updates(adapters, updates)
    if has_aux:
      return adapters, opt_state, out[0], out[1]
    return adapters, opt_state, out

  donate_argnums = (1, 2) if donate else ()
  if shardings is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  rep = jax.sharding.NamedSharding(shardings.mesh, jax.sharding.PartitionSpec())
  outs = (shardings.adapters, shardings.opt_state, rep) + ((None,) if has_aux else ())
  jitted = jax.jit(step, donate_argnums=donate_argnums,
                   in_shardings=(shardings.params, shardings.adapters, shardings.opt_state,
                                 shardings.batch, rep),
                   out_shardings=outs)

  def sharded_step(params, adapters, opt_state, batch, rng=None):
    return jitted(params, adapters, opt_state, batch, rng)

  sharded_step.lower = lambda params, adapters, opt_state, batch, rng=None: jitted.lower(
      params, adapters, opt_state, batch, rng)
  return sharded_step
