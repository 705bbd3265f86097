"""Serving many adapters on one base: a mixed-adapter batch vs one adapter vs a loop.

    python -m experiments.benchmarks.multi_adapter [--d_model 256 --layers 4 --rank 8
                                                    --batch 128 --seq 32 --adapters 1,8,32,128]

The reference decoder (every attention and MLP kernel adapted with LoRA) runs a batch of
`batch` sequences in two phases:
- prefill: the whole prompt (`seq` tokens per sequence);
- decode: one new token per sequence (`seq` 1). The reference decoder keeps no KV cache, so the
  attention over earlier tokens is not part of it; every adapted projection, which is what mixed
  adapters change, is.
For n = 1, 8, 32 and 128 adapters, row j of the batch uses adapter j mod n and runs three ways:
- mixed: `lora(apply)(join(params, stack_adapters(trees)), tokens, adapter_ids=ids)`, one
  compiled call (each layer gathers each row's A and B; the ids are traced);
- single: the same batch with one adapter for every row (the throughput to match);
- loop: one single-adapter call per adapter on its own rows, as a server without mixed batches
  (or PEFT's per-adapter loop) runs them.
Prints throughput (tokens/s), mixed / single, mixed / loop, the stacked adapters' memory and
XLA's FLOP and byte counts of the compiled mixed call against the single one. Exits non-zero
unless, at 32 adapters, mixed reaches `--min_vs_single` of single and `--min_vs_loop` x the
loop in both phases (`--nocheck` reports only).
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import lorax_jax as lj
from experiments.benchmarks import common
from lorax_jax.models import Decoder

_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Model width.')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Decoder layers.')
_RANK = flags.DEFINE_integer('rank', 8, 'Rank of every adapter.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Sequences per batch (at least the most adapters).')
_SEQ = flags.DEFINE_integer('seq', 32, 'Prompt tokens per sequence (prefill).')
_ADAPTERS = flags.DEFINE_list('adapters', ['1', '8', '32', '128'], 'Adapter counts to mix.')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed calls per measurement (median reported).')
_CHECK = flags.DEFINE_bool('check', True, 'Exit non-zero if a goal at 32 adapters is missed.')
_MIN_VS_SINGLE = flags.DEFINE_float('min_vs_single', 0.85, 'Goal: mixed / single throughput.')
_MIN_VS_LOOP = flags.DEFINE_float('min_vs_loop', 10.0, 'Goal: mixed / loop throughput.')
GOAL_AT = 32


def _trees(params, spec, n, rank):
  """n different random LoRA adapters (B non-zero), for the whole model."""
  out = []
  for k in range(n):
    _, ad = lj.init(jax.random.key(100 + k), params, spec)
    out.append(jax.tree_util.tree_map(
        lambda x, k=k: jax.random.normal(jax.random.key(k), x.shape, x.dtype) / rank, ad))
  return out


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def measure(d_model=256, layers=4, rank=8, batch=128, seq=32, counts=(1, 8, 32, 128), repeats=7):
  """`{phase: {n: dict(mixed, single, loop (seconds), flops/bytes of mixed and single,
  adapter_bytes)}}`."""
  if max(counts) > batch:
    raise ValueError(f'batch={batch} must be at least the most adapters mixed ({max(counts)}): '
                     'every adapter gets a row.')
  model = Decoder(vocab_size=256, d_model=d_model, num_layers=layers,
                  num_heads=max(1, d_model // 64), mlp_dim=4 * d_model)
  k1, k2 = jax.random.split(jax.random.key(0))
  prompt = jax.random.randint(k1, (batch, seq), 0, 256)
  params = model.init(k2, prompt[:1])['params']
  fn = lambda p, t: model.apply({'params': p}, t)
  spec = lj.make_spec(params, lj.dense_kernels(rank=rank, alpha=2 * rank), fn=fn,
                      args=(prompt[:1],))
  trees = _trees(params, spec, max(counts), rank)
  mixed = jax.jit(lambda j, t, i: lj.lora(fn)(j, t, adapter_ids=i))
  single = jax.jit(lambda j, t: lj.lora(fn)(j, t))
  results = {}
  for phase, tokens in (('prefill', prompt), ('decode', prompt[:, -1:])):
    one = single.lower(lj.join(params, trees[0]), tokens).compile()
    t_single = common.median_time(one, (lj.join(params, trees[0]), tokens), repeats)
    rows = {}
    for n in counts:
      stacked = lj.stack_adapters(trees[:n])
      ids = jnp.arange(batch, dtype=jnp.int32) % n
      joined = lj.join(params, stacked)
      compiled = mixed.lower(joined, tokens, ids).compile()
      t_mixed = common.median_time(compiled, (joined, tokens, ids), repeats)
      groups = [np.flatnonzero(np.arange(batch) % n == k) for k in range(n)]
      joins = [lj.join(params, t) for t in trees[:n]]
      parts = [jnp.asarray(tokens[g]) for g in groups]

      def loop(joins=joins, parts=parts, groups=groups):
        out = [single(j, p) for j, p in zip(joins, parts)]   # one call per adapter, dispatched
        order = np.argsort(np.concatenate(groups))
        return jnp.concatenate(out)[order]

      t_loop = common.median_time(lambda: loop(), (), max(3, repeats // 2))
      rows[n] = dict(mixed=t_mixed, single=t_single, loop=t_loop,
                     flops=common.compiled_cost(compiled)[0],
                     flops_single=common.compiled_cost(one)[0],
                     bytes=common.bytes_accessed(compiled), bytes_single=common.bytes_accessed(one),
                     adapter_bytes=_nbytes(stacked), tokens=int(np.prod(tokens.shape)))
    results[phase] = rows
  return results


def report(results) -> str:
  lines = [f'{"phase":<8}{"adapters":>9}{"mixed tok/s":>13}{"single tok/s":>14}{"x single":>10}'
           f'{"loop tok/s":>12}{"x loop":>9}{"FLOPs x single":>16}{"bytes x single":>16}'
           f'{"adapters MiB":>14}']
  for phase, rows in results.items():
    for n, r in rows.items():
      tps = lambda s, r=r: r['tokens'] / s
      lines.append(
          f'{phase:<8}{n:>9}{tps(r["mixed"]):>13,.0f}{tps(r["single"]):>14,.0f}'
          f'{r["single"] / r["mixed"]:>10.3f}{tps(r["loop"]):>12,.0f}{r["loop"] / r["mixed"]:>9.2f}'
          f'{r["flops"] / r["flops_single"]:>16.3f}{r["bytes"] / r["bytes_single"]:>16.3f}'
          f'{r["adapter_bytes"] / 2**20:>14.2f}')
  return '\n'.join(lines)


def check(results, min_vs_single, min_vs_loop) -> list[str]:
  failed = []
  for phase, rows in results.items():
    r = rows.get(GOAL_AT)
    if r is None:
      continue
    if r['single'] / r['mixed'] < min_vs_single:
      failed.append(f'{phase}: {GOAL_AT} mixed adapters run at {r["single"] / r["mixed"]:.3f}x '
                    f'the single-adapter throughput (goal {min_vs_single})')
    if r['loop'] / r['mixed'] < min_vs_loop:
      failed.append(f'{phase}: {GOAL_AT} mixed adapters run at {r["loop"] / r["mixed"]:.2f}x '
                    f'the loop (goal {min_vs_loop})')
  return failed


def main(argv):
  del argv
  counts = tuple(int(c) for c in _ADAPTERS.value)
  results = measure(_D_MODEL.value, _LAYERS.value, _RANK.value, _BATCH.value, _SEQ.value,
                    counts, _REPEATS.value)
  failed = check(results, _MIN_VS_SINGLE.value, _MIN_VS_LOOP.value) if _CHECK.value else []
  common.finish(f'decoder d_model={_D_MODEL.value} layers={_LAYERS.value} rank={_RANK.value} '
                f'batch={_BATCH.value} prefill seq={_SEQ.value} on {jax.devices()[0].platform}',
                report(results), failed)


if __name__ == '__main__':
  app.run(main)
