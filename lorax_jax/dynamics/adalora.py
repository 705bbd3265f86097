"""AdaLoRA (Zhang et al., ICLR 2023; PEFT): sensitivity-based rank allocation for `adalora`
leaves under a cubic total-rank budget; pruned triplets are masked (static shapes)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.dynamics import base
from lorax_jax.variants import common
from lorax_jax.variants.adalora import AdaloraParams


def _triplet_scores(stats, adapters) -> dict[str, jax.Array]:
  """Per AdaLoRA leaf: score(lambda_i) + mean score of P's i-th column + mean score of Q's i-th
  row (batch + (r,)), with score = EMA(importance) * EMA(uncertainty)."""
  out = {}
  ipt, unc = base.flat(stats['ipt']), base.flat(stats['unc'])
  for path, ad in base.of(adapters, AdaloraParams).items():
    s = ad.spec
    nb, ni = len(s.batch_shape), len(s.in_shape)
    score = lambda f: (getattr(ipt[path], f) * getattr(unc[path], f)).astype(jnp.float32)
    p_axes = tuple(range(nb, nb + ni))
    q_axes = tuple(range(nb + 1, nb + 1 + len(s.out_shape)))
    out[path] = score('lam') + jnp.mean(score('p'), axis=p_axes) + jnp.mean(score('q'),
                                                                            axis=q_axes)
  return out


def adalora_budget(step: int, *, initial: int, target: int, total_steps: int, warmup: int,
                   final: int) -> int:
  """AdaLoRA's cubic budget b(t) (PEFT's `budget_schedule`): the initial total rank until
  `warmup`, then b_T + (b_0 - b_T) (1 - (t - warmup) / (T - final - warmup))^3, then b_T."""
  if step <= warmup:
    return initial
  if step >= total_steps - final:
    return target
  frac = 1.0 - (step - warmup) / (total_steps - final - warmup)
  return int((initial - target) * frac ** 3 + target)


def adalora(*, target_rank: int, total_steps: int, warmup: int = 0, final: int = 0,
            every: int = 1, beta1: float = 0.85, beta2: float = 0.85,
            orth_weight: float = 0.5) -> base.Dynamics:
  """AdaLoRA's training-time allocation for `adalora` leaves (Zhang et al., ICLR 2023; PEFT).

  Every step (inside the jitted step) the sensitivity I = |w * dL/dw| of each P, lambda, Q
  entry updates the EMAs I_bar <- beta1 I_bar + (1 - beta1) I and
  U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|. Every `every` steps after `warmup`, the total
  rank budget b(t) (`adalora_budget`, cubic from the initial total rank to
  `target_rank` x the number of adapted matrices) is met by keeping the b(t) triplets of highest
  score (I_bar * U_bar of lambda_i + the mean over P's column and Q's row), across all layers;
  the others are masked (their lambda zeroed, as PEFT). From `total_steps - final` on the mask is
  fixed at the target budget. The loss gets `orth_weight` x the mean over P and Q matrices of
  ||P^T P - I||_F and ||Q Q^T - I||_F.

  Args:
    target_rank: the final average rank per adapted matrix (PEFT's `target_r`).
    total_steps: training length (PEFT's `total_step`).
    warmup: steps at the initial budget (PEFT's `tinit`).
    final: steps at the final budget (PEFT's `tfinal`).
    every: steps between allocations (PEFT's `deltaT`).
    beta1, beta2: EMA factors of importance and uncertainty.
    orth_weight: weight of the orthogonality regularizer (the paper: 0.1 to 0.5).

  Returns:
    The method (its statistics: the EMAs and the current budget).

  Raises:
    ValueError: at build time for bad numbers or a schedule that ends after training
      (warmup + final >= total_steps); in `check`, for a target rank above a leaf's initial
      rank or a selection without `adalora` leaves.
  """
  name = 'adalora'
  total_steps = base.check_steps(name, total_steps)
  target_rank = base.check_int(name, 'target_rank', target_rank, 1)
  warmup = base.check_int(name, 'warmup', warmup, 0)
  final = base.check_int(name, 'final', final, 0)
  every = base.check_int(name, 'every', every, 1)
  if warmup + final >= total_steps:
    raise ValueError(f'{name}: the budget schedule ends after training: warmup={warmup} + '
                     f'final={final} must be < total_steps={total_steps}.')
  beta1 = base.check_float(name, 'beta1', beta1, 0.0, 1.0, open_hi=True)
  beta2 = base.check_float(name, 'beta2', beta2, 0.0, 1.0, open_hi=True)
  orth_weight = base.check_float(name, 'orth_weight', orth_weight, 0.0)

  def budgets(adapters) -> tuple[int, int]:
    ads = base.of(adapters, AdaloraParams).values()
    matrices = sum(math.prod(a.spec.batch_shape) for a in ads)
    initial = sum(math.prod(a.spec.batch_shape) * a.spec.rank for a in ads)
    return initial, target_rank * matrices

  def check_rank(rank, path):
    if target_rank > rank:
      where = f' of {path!r}' if path else ''
      raise ValueError(f'{name}: target_rank={target_rank} is above the initial rank '
                       f'{rank}{where}: the budget can only shrink. Use a target_rank '
                       f'<= {rank} (or a larger initial rank).')

  def check(spec, params):
    del params
    base.need(dyn, spec)
    base.check_ranks(dyn, spec)

  def init(params, adapters):
    del params
    sub = base.nested(base.of(adapters, AdaloraParams))
    return {'ipt': jax.tree_util.tree_map(jnp.zeros_like, sub),
            'unc': jax.tree_util.tree_map(jnp.zeros_like, sub),
            'budget': jnp.int32(budgets(adapters)[0])}

  def observe(stats, step, adapters, grads):
    del step
    own = base.of(adapters, AdaloraParams)
    ads = base.nested(own)
    gs = base.nested({p: g for p, g in base.flat(grads).items() if p in own})

    sens = lambda w, g, ref: jnp.abs(w * g).astype(ref.dtype)
    ipt = jax.tree_util.tree_map(lambda w, g, i: beta1 * i + (1 - beta1) * sens(w, g, i),
                                 ads, gs, stats['ipt'])
    unc = jax.tree_util.tree_map(
        lambda w, g, i, u: beta2 * u + (1 - beta2) * jnp.abs(sens(w, g, i) - i),
        ads, gs, ipt, stats['unc'])
    return {**stats, 'ipt': ipt, 'unc': unc}

  def after(state, old_adapters):
    del old_adapters   # pruned triplets stay at lambda = 0 (Adam's momentum would move them)
    new = {p: dataclasses.replace(a, lam=a.lam * a.mask.astype(a.lam.dtype))
           for p, a in base.of(state.adapters, AdaloraParams).items()}
    return state._replace(adapters=base.replace_leaves(state.adapters, new))

  def regularizer(adapters):
    terms = []
    for ad in base.of(adapters, AdaloraParams).values():
      s = ad.spec
      p = common.flat_a(ad.p, s).astype(jnp.float32)         # batch + (d_in, r)
      q = common.flat_b(ad.q, s).astype(jnp.float32)         # batch + (r, d_out)
      eye = jnp.eye(s.rank, dtype=jnp.float32)
      ptp = jnp.einsum('...ir,...is->...rs', p, p) - eye
      qqt = jnp.einsum('...ro,...so->...rs', q, q) - eye
      terms.append(jnp.sqrt(jnp.sum(jnp.square(ptp), axis=(-2, -1))).reshape(-1))
      terms.append(jnp.sqrt(jnp.sum(jnp.square(qqt), axis=(-2, -1))).reshape(-1))
    if not terms or orth_weight == 0:
      return jnp.float32(0)
    return orth_weight * jnp.mean(jnp.concatenate(terms))

  @jax.jit
  def allocate(adapters, stats, budget):
    scores = _triplet_scores(stats, adapters)
    order = sorted(scores)
    flat = jnp.concatenate([scores[p].reshape(-1) for p in order])
    # Rank of every triplet by score (0 = highest); ties broken by position, so exactly
    # `budget` triplets are kept.
    rank_of = jnp.empty_like(flat, dtype=jnp.int32).at[jnp.argsort(-flat, stable=True)].set(
        jnp.arange(flat.size, dtype=jnp.int32))
    keep = rank_of < budget
    new, start = {}, 0
    ads = base.of(adapters, AdaloraParams)
    for p in order:
      ad = ads[p]
      n = scores[p].size
      m = keep[start:start + n].reshape(scores[p].shape).astype(ad.mask.dtype)
      start += n
      new[p] = dataclasses.replace(ad, mask=m, lam=ad.lam * m.astype(ad.lam.dtype))
    return base.replace_leaves(adapters, new)

  def schedule(step, state, tx):
    # Called every step (`every=1`): allocations at the interval during the budget phase, and
    # once at its end (step T - final) at the target budget, which stays fixed after it.
    del tx
    end = total_steps - final
    if not ((warmup < step < end and step % every == 0) or step == end):
      return state
    initial, target = budgets(state.adapters)
    b = adalora_budget(step, initial=initial, target=target, total_steps=total_steps,
                       warmup=warmup, final=final)
    adapters = allocate(state.adapters, state.stats, jnp.int32(b))
    return state._replace(adapters=adapters, stats={**state.stats, 'budget': jnp.int32(b)})

  def report(state):
    alloc = {}
    for p, ad in base.of(state.adapters, AdaloraParams).items():
      kept = np.asarray(jax.device_get(ad.mask)).sum(axis=-1).astype(int)
      alloc[p] = kept.tolist() if kept.ndim else int(kept)
    total = int(sum(np.sum(v) for v in alloc.values()))
    initial, target = budgets(state.adapters)
    return {'rank_allocation': alloc, 'total_rank': total, 'initial_total_rank': initial,
            'target_total_rank': target}

  dyn = base.Dynamics(name, init=init, every=1, schedule=schedule, regularizer=regularizer,
                      observe=observe, after=after, check=check, check_rank=check_rank,
                      report=report, variants=('adalora',))
  return dyn


METHOD = base.Method('adalora', adalora, variant='adalora')
