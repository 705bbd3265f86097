"""What each variant costs: one training step of a decoder LM, every variant vs LoRA.

    python -m experiments.benchmarks.variants_cost [--d_model 256 --layers 4 --rank 8]

Every dense kernel of a Llama-style decoder is adapted with each registered variant at the same
rank (plus LoKr with `factor=4`, which makes it factored). Prints, side by side with ratios to
LoRA: trainable parameters, XLA's FLOP count of the compiled step (`cost_analysis()`), compiled
memory (`memory_analysis()`: temporaries, and arguments + outputs + temporaries), the median step
time, and whether `lora(fn)` ran the variant factored or formed dW. The step is
`value_and_grad` through `lora(apply)` plus `optimizer(...)` (AdamW), nothing donated.
Exits non-zero unless DoRA costs at most 1.5x LoRA's step FLOPs.
"""

from __future__ import annotations


from absl import app
from absl import flags
import jax
import optax

import lorax_jax as lj
from experiments.benchmarks import common
from experiments.benchmarks.common import compiled_cost, median_time
from lorax_jax.models import Decoder

_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Model width.')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Decoder layers.')
_RANK = flags.DEFINE_integer('rank', 8, 'Rank of every variant.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Tokens per sequence.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed steps per variant (median reported).')
_DORA_MAX = 1.5


def configurations():
  """(row name, variant, extra options): every registered variant, plus LoKr factored."""
  rows = [(v, v, {}) for v in lj.variants.names()]
  rows.append(('lokr(factor=4)', 'lokr', {'factor': 4}))
  return rows


def measure(d_model=256, layers=4, rank=8, batch=8, seq=128, repeats=5, only=None):
  """`{row: dict(params, flops, bytes..., seconds, factored)}`."""
  model = Decoder(vocab_size=256, d_model=d_model, num_layers=layers,
                  num_heads=max(1, d_model // 64), mlp_dim=4 * d_model)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  tokens = jax.random.randint(k1, (batch, seq + 1), 0, 256)
  base = model.init(k2, tokens[:, :-1])
  apply = lj.lora(model.apply)

  def xent(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  results = {}
  for name, variant, options in configurations():
    if only and name not in only and name != 'lora':
      continue
    spec = lj.make_spec(base, lj.dense_kernels(variant=variant, rank=rank, alpha=16, **options),
                        fn=model.apply, args=(tokens[:, :-1],))
    params, adapters = lj.init(k3, base, spec)
    # Non-zero adapters, so no variant can exploit zeros.
    adapters = jax.tree_util.tree_map(lambda x: x + 0.01, adapters)
    tx = lj.optimizer(1e-4)

    def step(p, a, s):
      loss, g = jax.value_and_grad(lambda a: xent(apply(lj.join(p, a), tokens[:, :-1])))(a)
      u, s = tx.update(g, s, a)
      return optax.apply_updates(a, u), s, loss

    args = (params, adapters, tx.init(adapters))
    compiled = jax.jit(step).lower(*args).compile()
    flops, mem = compiled_cost(compiled)
    kinds = set()
    joined = lj.join(params, adapters)
    for leaf in jax.tree_util.tree_leaves(joined, is_leaf=lj.adapters.is_adapted):
      if isinstance(leaf, lj.Adapted):
        v = lj.variants.get(leaf.adapter.spec.variant)
        kinds.add(v.factored is not None and v.factored(leaf.w, leaf.adapter) is not None)
    results[name] = dict(params=lj.count_params(adapters), flops=flops, **mem,
                         seconds=median_time(compiled, args, repeats),
                         factored={True: 'yes', False: 'dW'}.get(kinds.pop(), 'mixed')
                         if len(kinds) == 1 else 'mixed')
  return results


def report(results) -> str:
  ref = results['lora']
  total = common.total_bytes
  lines = [f'{"variant":<16}{"params":>10}{"x lora":>8}{"GFLOPs":>9}{"x lora":>8}'
           f'{"temp MiB":>10}{"x lora":>8}{"total MiB":>11}{"x lora":>8}{"step ms":>9}'
           f'{"x lora":>8}  factored']
  for name, r in results.items():
    lines.append(
        f'{name:<16}{r["params"]:>10,}{r["params"] / ref["params"]:>8.3f}'
        f'{r["flops"] / 1e9:>9.3f}{r["flops"] / ref["flops"]:>8.3f}'
        f'{r["temp_size_in_bytes"] / 2**20:>10.2f}'
        f'{r["temp_size_in_bytes"] / max(ref["temp_size_in_bytes"], 1):>8.3f}'
        f'{total(r) / 2**20:>11.2f}{total(r) / total(ref):>8.3f}'
        f'{1e3 * r["seconds"]:>9.2f}{r["seconds"] / ref["seconds"]:>8.3f}  {r["factored"]}')
  return '\n'.join(lines)


def check(results) -> list[str]:
  """The claims the benchmark enforces; returns the failed ones."""
  failed = []
  if 'dora' in results and results['dora']['flops'] > _DORA_MAX * results['lora']['flops']:
    failed.append(f'dora FLOPs {results["dora"]["flops"]:.3e} > {_DORA_MAX} x lora '
                  f'{results["lora"]["flops"]:.3e}')
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
