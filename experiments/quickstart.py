"""The core API in one screen: pretrain a small CNN on digits 0-4, LoRA-fine-tune it on 5-9.

(The full experiment runner, with configs, checkpoints and resumption, is `experiments.train`.)

    python -m experiments.quickstart [--pretrain_steps 600] [--adapt_steps 600] [--rank 8]

Real data (scikit-learn's `load_digits`), nothing downloaded. Prints the base model's accuracy
on the new classes, the adapted accuracy, the trainable-parameter fraction and the time taken.
"""

from __future__ import annotations

import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_jax as lj
from lorax_jax.data import Batches, digits
from lorax_jax.models import SmallCNN

_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 600, 'Steps of full pretraining.')
_ADAPT_STEPS = flags.DEFINE_integer('adapt_steps', 600, 'Steps of LoRA fine-tuning.')
_RANK = flags.DEFINE_integer('rank', 8, 'LoRA rank.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def run(pretrain_steps: int = 600, adapt_steps: int = 600, rank: int = 8, seed: int = 0,
        batch_size: int = 64, verbose: bool = True) -> dict[str, Any]:
  """Runs the whole demo and returns its metrics."""
  say = print if verbose else (lambda *a, **k: None)
  t0 = time.time()
  model = SmallCNN(num_classes=10)
  old_train, old_test = digits(range(5), split='train'), digits(range(5), split='test')
  new_train, new_test = digits(range(5, 10), split='train'), digits(range(5, 10), split='test')
  key_init, key_lora = jax.random.split(jax.random.key(seed))
  params = model.init(key_init, jnp.zeros((1, 8, 8, 1)))

  accuracy = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(model.apply(p, x), -1) == y))

  # 1. Pretrain every parameter on digits 0-4.
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def pretrain_step(p, s, x, y):
    loss, g = jax.value_and_grad(lambda p: _xent(model.apply(p, x), y))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  data = Batches(old_train, batch_size, seed).iterate()
  for _ in range(pretrain_steps):
    params, opt_state, _ = pretrain_step(params, opt_state, *next(data))
  base_old = float(accuracy(params, *old_test))
  base_new = float(accuracy(params, *new_test))
  say(f'pretrained on digits 0-4: accuracy {base_old:.3f} on 0-4, {base_new:.3f} on 5-9')

  # 2. LoRA on the conv and dense kernels, the classifier head trained fully.
  rules = [(r'head/', 'full'), (r'kernel$', {'rank': rank, 'alpha': 2 * rank})]
  # Conv kernels have 4 axes: their in/out axes are inferred from how the model uses them.
  spec = lj.make_spec(params, rules, fn=model.apply, args=(old_test[0][:1],))
  if verbose:
    lj.summary(params, spec)
  params, adapters = lj.init(key_lora, params, spec)
  n_trainable = lj.count_params(adapters)
  n_total = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(params))
  apply = lj.lora(model.apply)

  def loss_fn(joined, batch, rng):
    x, y = batch
    return _xent(apply(joined, x, lora_rng=rng), y)

  tx = lj.optimizer(2e-3, loraplus_ratio=4.0, weight_decay=1e-4)
  opt_state = tx.init(adapters)
  step = lj.make_train_step(loss_fn, tx)
  data = Batches(new_train, batch_size, seed + 1).iterate()
  loss = float('nan')
  for _ in range(adapt_steps):
    adapters, opt_state, loss = step(params, adapters, opt_state, next(data))
  joined_acc = jax.jit(lambda p, a, x, y: jnp.mean(
      jnp.argmax(apply(lj.join(p, a), x), -1) == y))
  adapted_new = float(joined_acc(params, adapters, *new_test))
  merged = lj.merge(params, adapters)
  merged_new = float(accuracy(merged, *new_test))
  seconds = time.time() - t0
  result = dict(base_accuracy=base_new, adapted_accuracy=adapted_new,
                merged_accuracy=merged_new, base_accuracy_old_classes=base_old,
                final_loss=float(loss), trainable_params=n_trainable, total_params=n_total,
                trainable_fraction=n_trainable / n_total, seconds=seconds)
  say(f'base accuracy on digits 5-9:    {base_new:.3f}')
  say(f'adapted accuracy on digits 5-9: {adapted_new:.3f} (merged model: {merged_new:.3f})')
  say(f'trainable parameters: {n_trainable:,} of {n_total:,} '
      f'({100 * n_trainable / n_total:.2f}%)')
  say(f'time: {seconds:.1f} s')
  return result


def main(argv):
  del argv
  run(_PRETRAIN_STEPS.value, _ADAPT_STEPS.value, _RANK.value, _SEED.value)


if __name__ == '__main__':
  app.run(main)
