"""Rank adaptation and training dynamics next to plain LoRA on the ViT-digits config.

    python -m experiments.benchmarks.rank_dynamics [--quick] [--methods lora,adalora,...] \
        [--runs_dir DIR]

Runs `configs/vit_digits.py` (a tiny ViT pretrained on digits 0-4, adapted to 5-9) once per
method with the same rank, seed and learning-rate schedule: plain LoRA, AdaLoRA, DyLoRA, SoRA,
ReLoRA, COLA and Delta-LoRA (`lorax_jax.dynamics`, settings of `configs.common.dynamics`).
Prints, per method: the final accuracy on 5-9, the effective rank of the whole update (mean
numerical rank of merge(final) - W_0 over the adapted matrices), the rank the method ends with
(AdaLoRA's and SoRA's kept ranks), trainable parameters at the start and the end, the median
step time, XLA's FLOPs and compiled memory of the step (and their ratios to LoRA's), and how
often the step recompiled. DyLoRA also gets its accuracy at every rank.

Exits non-zero unless AdaLoRA ends at exactly its rank budget, ReLoRA's and COLA's updates have
an effective rank above the adapter rank, SoRA ends with fewer parameters than it started with,
DyLoRA's full-rank accuracy is at least its rank-1 accuracy, and no method's step costs more
than 1.5x LoRA's compiled memory (Delta-LoRA keeps no base gradient).
"""

from __future__ import annotations

import os
import tempfile

from absl import app
from absl import flags

from configs import common as config_common
from configs import vit_digits
from experiments import train
from experiments.benchmarks import common

_QUICK = flags.DEFINE_bool('quick', False, 'The quick config (100 steps, CPU and tests).')
_STEPS = flags.DEFINE_integer('steps', None, 'Override the number of adaptation steps.')
_RANK = flags.DEFINE_integer('rank', 8, 'Adapter rank (AdaLoRA: the initial rank).')
_MODEL = flags.DEFINE_string('model', 'vit', 'vit | cnn | resnet.')
_METHODS = flags.DEFINE_list('methods', ['lora', 'adalora', 'dylora', 'sora', 'relora', 'cola',
                                         'delta_lora'], 'Methods to run (lora = plain LoRA).')
_RUNS = flags.DEFINE_string('runs_dir', None, 'Where the runs go (default: a temporary dir).')


def config_for(method: str, quick: bool, rank: int, model: str, steps: int | None):
  """The vit_digits config of one method (the same schedule and seed for all)."""
  dyn = '' if method == 'lora' else method
  c = vit_digits.get_config(f'{"quick," if quick else ""}rank={rank},model={model}'
                            f'{",dynamics=" + dyn if dyn else ""}')
  c.train.loraplus_ratio = 1.0
  if steps:
    c.train.steps = steps
    c.train.warmup_steps = min(c.train.warmup_steps, steps // 5)
    c.train.eval_every = c.train.checkpoint_every = steps
    c.dynamics = config_common.dynamics(dyn, rank, steps)
  return c


def run(methods, *, quick: bool, rank: int, model: str, steps: int | None, workdir: str):
  results = {}
  for m in methods:
    c = config_for(m, quick, rank, model, steps)
    results[m] = train.train_and_evaluate(c, os.path.join(workdir, m))
  return results


def report(results: dict, rank: int) -> tuple[str, list[str]]:
  ref = results.get('lora')
  rows = [f'{"method":<11} {"accuracy":>8} {"eff.rank":>8} {"end rank":>8} {"params":>15} '
          f'{"step ms":>8} {"x LoRA":>6} {"GFLOP":>7} {"x LoRA":>6} {"MiB":>7} {"x LoRA":>6} '
          f'{"reshapes":>8}']
  failed = []
  for m, r in results.items():
    end_rank = r.get('total_rank')
    n_mat = len(r.get('rank_allocation') or {}) or None
    end = f'{end_rank / n_mat:.2f}' if end_rank is not None and n_mat else f'{rank}'
    params = f'{r["trainable_params"]:,}' + (
        f'->{r["trainable_params_final"]:,}' if r.get('trainable_params_final') not in (
            None, r['trainable_params']) else '')
    ratio = lambda k: f'{r[k] / ref[k]:.2f}' if ref and ref.get(k) else '-'
    rows.append(
        f'{m:<11} {r[r["metric"]]:>8.4f} {r.get("effective_rank") or 0:>8.2f} {end:>8} '
        f'{params:>15} {1e3 * r["step_seconds"]:>8.2f} {ratio("step_seconds"):>6} '
        f'{r.get("step_flops", 0) / 1e9:>7.3f} {ratio("step_flops"):>6} '
        f'{r["step_memory_bytes"] / 2**20:>7.2f} {ratio("step_memory_bytes"):>6} '
        f'{len(r.get("reshaped_at") or []):>8}')
    if ref and r['step_memory_bytes'] > 1.5 * ref['step_memory_bytes']:
      failed.append(f'{m}: step memory {r["step_memory_bytes"]} > 1.5x LoRA\'s')
  if 'adalora' in results:
    r = results['adalora']
    if r['total_rank'] != r['target_total_rank']:
      failed.append(f'adalora: total rank {r["total_rank"]} != budget {r["target_total_rank"]}')
    rows.append('adalora allocation: ' + ', '.join(
        f'{p.removeprefix("params/")}={v}' for p, v in r['rank_allocation'].items()))
  for m in ('relora', 'cola'):
    if m in results and not (results[m].get('effective_rank') or 0) > rank:
      failed.append(f'{m}: effective rank {results[m].get("effective_rank")} <= rank {rank}')
  if 'sora' in results and not (
      results['sora']['trainable_params_final'] < results['sora']['trainable_params']):
    failed.append('sora: no rank was pruned')
  if 'dylora' in results:
    r = results['dylora']
    by_rank = r[f'{r["metric"]}_by_rank']
    rows.append('dylora accuracy by rank: ' + ', '.join(f'{k}: {v:.4f}'
                                                          for k, v in by_rank.items()))
    if by_rank[str(max(map(int, by_rank)))] < by_rank['1']:
      failed.append('dylora: full-rank accuracy below rank-1 accuracy')
  return '\n'.join(rows), failed


def main(argv):
  del argv
  workdir = _RUNS.value or tempfile.mkdtemp(prefix='rank_dynamics_')
  results = run(_METHODS.value, quick=_QUICK.value, rank=_RANK.value, model=_MODEL.value,
                steps=_STEPS.value, workdir=workdir)
  table, failed = report(results, _RANK.value)
  steps = next(iter(results.values()))['steps']
  common.finish(f'Rank dynamics on digits / {_MODEL.value}: rank {_RANK.value}, {steps} steps '
                f'each (runs in {workdir})', table, failed)


if __name__ == '__main__':
  app.run(main)
