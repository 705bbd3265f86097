"""Proof that factoring pays: the cost of one training step of a decoder LM, three ways.

    python -m experiments.benchmarks.step_cost [--d_model 256 --layers 4 --rank 8]

Compares, side by side in one run, for a Llama-style decoder with LoRA on every dense kernel:
  full      fine-tuning every parameter (Adam);
  lora      LoRA through `lora(fn)`: x@W + s*((x@A)@B), gradients for the adapters only;
  merge     LoRA by merging W + s*A@B before every forward (what naive implementations do).
Prints XLA's FLOP count (`compiled.cost_analysis()`), compiled memory
(`compiled.memory_analysis()`: temporaries, arguments, and their total with outputs) and the
median wall time of a step, with ratios to `full`. No buffers are donated, so every method pays
for its outputs.
Exits non-zero unless lora needs at most 0.75x the FLOPs of full fine-tuning and fewer FLOPs
than merge-before-forward.
"""

from __future__ import annotations


from absl import app
from absl import flags
import jax
import numpy as np
import optax

import lorax_jax as lj
from experiments.benchmarks import common
from experiments.benchmarks.common import compiled_cost, median_time
from lorax_jax.models import Decoder

_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Model width.')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Decoder layers.')
_RANK = flags.DEFINE_integer('rank', 8, 'LoRA rank on every dense kernel.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Tokens per sequence.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed steps per method (median reported).')
_MAX_RATIO = 0.75


def measure(d_model=256, layers=4, rank=8, batch=8, seq=128, repeats=10):
  """Returns `{method: dict(flops, bytes..., seconds)}` for full, lora and merge."""
  model = Decoder(vocab_size=256, d_model=d_model, num_layers=layers,
                  num_heads=max(1, d_model // 64), mlp_dim=4 * d_model)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  tokens = jax.random.randint(k1, (batch, seq + 1), 0, 256)
  params = model.init(k2, tokens[:, :-1])
  spec = lj.make_spec(params, lj.dense_kernels(rank=rank, alpha=16),
                      fn=model.apply, args=(tokens[:, :-1],))
  params, adapters = lj.init(k3, params, spec)
  # Non-zero B so no method can exploit zeros.
  adapters = jax.tree_util.tree_map(lambda x: x + 0.01, adapters)

  def xent(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  tx = optax.adam(1e-4)

  def full_step(p, s):
    loss, g = jax.value_and_grad(lambda p: xent(model.apply(p, tokens[:, :-1])))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  apply = lj.lora(model.apply, strict=True)

  def lora_step(p, a, s):
    loss, g = jax.value_and_grad(lambda a: xent(apply(lj.join(p, a), tokens[:, :-1])))(a)
    u, s = tx.update(g, s, a)
    return optax.apply_updates(a, u), s, loss

  from lorax_jax.adapters import _merge  # the un-jitted merge, traced into the step

  def merge_step(p, a, s):
    loss, g = jax.value_and_grad(lambda a: xent(model.apply(_merge(p, a), tokens[:, :-1])))(a)
    u, s = tx.update(g, s, a)
    return optax.apply_updates(a, u), s, loss

  runs = {
      'full': (full_step, (params, tx.init(params))),
      'lora': (lora_step, (params, adapters, tx.init(adapters))),
      'merge': (merge_step, (params, adapters, tx.init(adapters))),
  }
  results = {}
  for name, (fn, args) in runs.items():
    jitted = jax.jit(fn)
    compiled = jitted.lower(*args).compile()
    flops, mem = compiled_cost(compiled)
    results[name] = dict(flops=flops, **mem, seconds=median_time(compiled, args, repeats))
  results['_meta'] = dict(trainable=lj.count_params(adapters),
                          total=sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
                              params)))
  return results


def report(results) -> str:
  full = results['full']
  total = common.total_bytes
  lines = [f'{"method":<8}{"GFLOPs":>10}{"x full":>9}{"temp MiB":>11}{"x full":>9}'
           f'{"args MiB":>11}{"total MiB":>11}{"x full":>9}{"step ms":>10}{"x full":>9}']
  for name in ('full', 'lora', 'merge'):
    r = results[name]
    lines.append(
        f'{name:<8}{r["flops"] / 1e9:>10.3f}{r["flops"] / full["flops"]:>9.3f}'
        f'{r["temp_size_in_bytes"] / 2**20:>11.2f}'
        f'{r["temp_size_in_bytes"] / max(full["temp_size_in_bytes"], 1):>9.3f}'
        f'{r["argument_size_in_bytes"] / 2**20:>11.2f}{total(r) / 2**20:>11.2f}'
        f'{total(r) / total(full):>9.3f}{1e3 * r["seconds"]:>10.2f}'
        f'{r["seconds"] / full["seconds"]:>9.3f}')
  m = results['_meta']
  lines.append(f'trainable {m["trainable"]:,} of {m["total"]:,} '
               f'({100 * m["trainable"] / m["total"]:.2f}%)')
  return '\n'.join(lines)


def check(results) -> list[str]:
  """The claims the benchmark enforces; returns the failed ones."""
  full, lora, merge = results['full'], results['lora'], results['merge']
  failed = []
  if lora['flops'] > _MAX_RATIO * full['flops']:
    failed.append(f'lora FLOPs {lora["flops"]:.3e} > {_MAX_RATIO} x full {full["flops"]:.3e}')
  if lora['flops'] >= merge['flops']:
    failed.append(f'lora FLOPs {lora["flops"]:.3e} >= merge-before-forward {merge["flops"]:.3e}')
  return failed


def main(argv):
  del argv
  results = measure(_D_MODEL.value, _LAYERS.value, _RANK.value, _BATCH.value, _SEQ.value,
                    _REPEATS.value)
  common.finish(f'decoder d_model={_D_MODEL.value} layers={_LAYERS.value} rank={_RANK.value} '
                f'batch={_BATCH.value}x{_SEQ.value} on {jax.devices()[0].platform}',
                report(results), check(results))


if __name__ == '__main__':
  app.run(main)
