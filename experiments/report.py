"""Plots of a finished (or partly finished) sweep: PNG files next to its results table.

    python -m experiments.report /tmp/sweep

Reads `DIR/results.csv` (written by `experiments.sweep`) and each trial's `metrics.jsonl`, and
draws with matplotlib (Agg, no display needed):
  metric_vs_params.png   final metric vs trainable parameters (log x), one marker per variant,
                         the full fine-tuning and head-only baselines marked;
  metric_vs_rank.png     final metric vs rank (log2 x), one line per variant and scaling mode;
  loss_curves.png        training loss vs step of every finished trial.
Returns (and prints) the paths written.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from experiments import cli

_METRIC_UNITS = {'accuracy': 'accuracy (fraction correct)',
                 'perplexity': 'perplexity (bytes, lower is better)'}


def _read(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, 'results.csv')
  if not os.path.exists(path):
    raise ValueError(f'{path} does not exist: run experiments.sweep (or --gather_only) first.')
  with open(path) as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    for k in ('rank', 'trainable_params'):
      r[k] = int(float(r[k])) if r.get(k) not in (None, '') else None
    for k in ('final', 'base', 'alpha', 'loraplus_ratio'):
      r[k] = float(r[k]) if r.get(k) not in (None, '') else None
  return rows


def _label(r) -> str:
  """The group a trial belongs to in the plots."""
  if r['method'] in ('full', 'head'):
    return {'full': 'full fine-tuning', 'head': 'head only'}[r['method']]
  if r.get('quant'):
    return f'QLoRA ({r["quant"]})' if r.get('init') in (None, '', 'kaiming') else (
        f'{r["init"]} ({r["quant"]})')
  if r.get('init') not in (None, '', 'kaiming', 'gaussian'):
    return r['init']
  name = r['variant'] or 'lora'
  if r.get('loraplus_ratio') and r['loraplus_ratio'] > 1:
    name += f'+ (lambda {r["loraplus_ratio"]:g})'
  return name


def plot(workdir: str) -> list[str]:
  """Writes the three PNGs for the sweep in `workdir`; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in _read(workdir) if r['status'] == 'done' and r['final'] is not None]
  if not rows:
    raise ValueError(f'No finished trials in {workdir}.')
  metric = rows[0]['metric']
  ylabel = _METRIC_UNITS.get(metric, metric)
  title = os.path.basename(os.path.normpath(workdir))
  out = []

  def save(fig, ax, name, xlabel, ylabel, heading, legend=None):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(heading)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(**(legend or dict(fontsize=8, ncol=2)))
    fig.tight_layout()
    path = os.path.join(workdir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

  fig, ax = plt.subplots(figsize=(8, 5.5))
  groups: dict[str, list] = {}
  for r in rows:
    groups.setdefault(_label(r), []).append(r)
  markers = 'osD^v<>phX*P'
  for i, (label, rs) in enumerate(sorted(groups.items())):
    rs = sorted(rs, key=lambda r: r['trainable_params'])
    ax.plot([r['trainable_params'] for r in rs], [r['final'] for r in rs],
            marker=markers[i % len(markers)], linestyle='-' if len(rs) > 1 else 'none',
            label=label, alpha=0.85)
  ax.set_xscale('log')
  out.append(save(fig, ax, 'metric_vs_params.png', 'trainable parameters (count, log scale)',
                  ylabel, f'{title}: final {metric} vs trainable parameters'))

  fig, ax = plt.subplots(figsize=(8, 5.5))
  lines: dict[str, list] = {}
  for r in rows:
    if r['method'] == 'lora' and r['rank']:
      lines.setdefault(f'{_label(r)}, {r["scaling"]}', []).append(r)
  for i, (label, rs) in enumerate(sorted(lines.items())):
    rs = sorted(rs, key=lambda r: r['rank'])
    ax.plot([r['rank'] for r in rs], [r['final'] for r in rs], marker=markers[i % len(markers)],
            linestyle='--' if 'rslora' in label else '-', label=label)
  for r in rows:
    if r['method'] in ('full', 'head'):
      ax.axhline(r['final'], color='gray', linestyle=':' if r['method'] == 'head' else '-.',
                 label=_label(r))
  ax.set_xscale('log', base=2)
  out.append(save(fig, ax, 'metric_vs_rank.png', 'rank r (log2 scale)', ylabel,
                  f'{title}: final {metric} vs rank (solid alpha/r, dashed rsLoRA)'))

  fig, ax = plt.subplots(figsize=(8, 5.5))
  # One color per group (variant, init or baseline), one line style per trial within it.
  colors = plt.get_cmap('tab20').colors
  group_color = {g: colors[i % len(colors)] for i, g in enumerate(sorted(groups))}
  seen: dict[str, int] = {}
  styles = ('-', '--', ':', '-.')
  for r in rows:
    path = os.path.join(workdir, 'trials', r['name'], 'metrics.jsonl')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      pts = [json.loads(l) for l in f if l.strip()]
    pts = [(p['step'], p['loss']) for p in pts if 'loss' in p]
    if pts:
      g = _label(r)
      k = seen[g] = seen.get(g, -1) + 1
      ax.plot(*zip(*pts), label=r['name'], linewidth=1.2, color=group_color[g],
              linestyle=styles[k % len(styles)])
  ax.set_yscale('log')
  out.append(save(fig, ax, 'loss_curves.png', 'training step',
                  'training loss (task loss, e.g. cross-entropy in nats)',
                  f'{title}: training loss of every trial', legend=dict(fontsize=6, ncol=3)))
  return out


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise cli.UserError(f'usage: python -m experiments.report SWEEP_DIR (got {argv[1:]}).')
  if not os.path.isdir(argv[1]):
    raise cli.UserError(f'SWEEP_DIR {argv[1]!r} is not a directory; allowed: the --workdir of '
                        'an experiments.sweep run.')
  for path in plot(argv[1]):
    print(path)


if __name__ == '__main__':
  cli.run(main)
