"""EVA (Paischer et al., 2024; PEFT's EvaConfig): A from the SVD of the layer inputs, B = 0.

C = the (centered) covariance of the layer's inputs, accumulated batch by batch until, for every
layer, its first r_l components agree with the previous batch's to cosine `tau` (or
`num_batches` are used); A = the top r_l eigenvectors (as rows of PEFT's lora_A, largest entry
positive), B = 0, base unchanged. The ranks r_l are redistributed across the eva layers by
explained-variance ratio under the budget sum(r), at most round(`rho` * r) each; with
`adjust_scaling` alpha becomes alpha * r_l / r, keeping the scale.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorax_jax.inits.base import ACTIVATIONS, Init, bad_option
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common


def covariance(stats, center: bool):
  """The input covariance from `(sum X^T X, sum X, count)` (centered: unbiased)."""
  gram, total, count = stats
  n = count[..., None, None]
  if not center:
    return gram / n
  mean = total / count[..., None]
  return (gram - n * mean[..., :, None] * mean[..., None, :]) / jnp.maximum(n - 1, 1)


def _eigh_desc(c):
  vals, vecs = jnp.linalg.eigh(c)
  return vals[..., ::-1], vecs[..., :, ::-1]


def eva_ranks(ratios: dict[str, np.ndarray], specs: dict[str, LeafSpec]) -> dict[str, int]:
  """EVA's rank redistribution: the largest explained-variance ratios across all eva leaves
  (each leaf offering its top round(rho * r) components) win the budget sum(r)."""
  budget = sum(s.rank * max(1, math.prod(s.batch_shape)) for s in specs.values())
  entries = []
  for path, ratio in ratios.items():
    ratio = np.asarray(ratio).reshape(-1, np.shape(ratio)[-1])   # (stack, k)
    for j, row in enumerate(ratio):
      for v in row:
        entries.append((float(v), path, j))
  entries.sort(key=lambda e: -e[0])
  counts: dict[tuple[str, int], int] = {}
  for _, path, j in entries[:budget]:
    counts[(path, j)] = counts.get((path, j), 0) + 1
  # A stacked (scanned) kernel needs one rank for all its layers: the largest its layers won.
  out = {}
  for path in ratios:
    stack = max(1, math.prod(specs[path].batch_shape))
    out[path] = max(counts.get((path, j), 0) for j in range(stack))
  return out


def _max_k(specs):
  return {p: min(int(round(s.init_opt('rho') * s.rank)), math.prod(s.in_shape))
          for p, s in specs.items()}


def _components(st, k):
  vals, vecs = _eigh_desc(covariance(st, center=True))
  vecs = vecs[..., :, :k]
  # PEFT's sign convention (svd_flip on V^T): each component's largest entry is positive.
  big = jnp.take_along_axis(vecs, jnp.argmax(jnp.abs(vecs), -2)[..., None, :], -2)
  return jnp.maximum(vals, 0), vecs * jnp.sign(big)


def _ratios(got, max_k):
  return {p: np.asarray(v[..., :max_k[p]] / jnp.sum(v, -1, keepdims=True))
          for p, (v, _) in got.items()}


def _stop(specs: dict[str, LeafSpec]):
  """PEFT's test: every layer's first r_l components (for the current r_l) have cosine
  similarity >= tau with the previous batch's."""
  max_k = _max_k(specs)
  tau = min(s.init_opt('tau') for s in specs.values())
  previous: dict[str, Any] = {}

  def converged(stats) -> bool:
    got = {p: _components(st, max_k[p]) for p, st in stats.items()}
    ranks = eva_ranks(_ratios(got, max_k), specs)
    done = bool(previous)
    for path, (_, vecs) in got.items():
      r = ranks[path]
      if r and path in previous:
        cos = jnp.sum(vecs[..., :r] * previous[path][..., :r], axis=-2)
        done = done and bool(jnp.all(cos >= tau))
      previous[path] = vecs
    return done

  return converged


def _calibrate(key, ws, specs, data):
  """`{path: (w, a, 0, spec with rank r_l)}`, None where EVA gave the leaf rank 0."""
  del key
  max_k = _max_k(specs)
  got = {p: _components(data[p][ACTIVATIONS], max_k[p]) for p in specs}
  ranks = eva_ranks(_ratios(got, max_k), specs)
  out = {}
  for path, s in specs.items():
    r = ranks[path]
    if r == 0:
      out[path] = None
      continue
    alpha = s.alpha * r / s.rank if s.init_opt('adjust_scaling') else s.alpha
    if s.scaling == 'constant':
      alpha = s.alpha
    elif s.scaling == 'rslora' and s.init_opt('adjust_scaling'):
      alpha = s.alpha * math.sqrt(r / s.rank)
    new = dataclasses.replace(s, rank=r, alpha=float(alpha))
    w = ws[path]
    dtype = common.adapter_dtype(new, w)
    a = common.unflat_a(got[path][1][..., :, :r].astype(dtype), new)
    b = jnp.zeros(new.batch_shape + (r,) + new.out_shape, dtype)
    out[path] = (w, a, b, new)
  return out


def _check(path: str, spec: LeafSpec) -> None:
  rho, tau = spec.init_opt('rho'), spec.init_opt('tau')
  if not isinstance(rho, (int, float)) or rho < 1:
    raise bad_option(path, spec, 'rho', 'a number >= 1')
  if not isinstance(tau, (int, float)) or not 0 < tau <= 1:
    raise bad_option(path, spec, 'tau', 'a number in (0, 1]')


EVA = Init('eva', options={'rho': 2.0, 'tau': 0.99, 'adjust_scaling': True},
           needs=frozenset({ACTIVATIONS}), check=_check, calibrate=_calibrate, stop=_stop)
