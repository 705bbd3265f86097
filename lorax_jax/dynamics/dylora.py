"""DyLoRA (Valipour et al., EACL 2023): training at a random truncation rank per step, so that
the adapters work at every rank <= r."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorax_jax import variants
from lorax_jax.dynamics import base
from lorax_jax.dynamics import surgery


def _expand_rank(v, ad, field):
  """A (r,) vector broadcast along the rank axis of `field`."""
  x = getattr(ad, field)
  axis = surgery.rank_axis(ad, field)
  shape = [1] * x.ndim
  shape[axis] = x.shape[axis]
  return v.reshape(shape)


def truncate(adapters: Any, rank: int | jax.Array, *, detach_lower: bool = False) -> Any:
  """LoRA leaves cut to their first `rank` ranks (at most their own), DyLoRA-scaled.

  A[:, :b] and B[:b] are each multiplied by sqrt(r / b), so the update's scale is alpha / b
  (for alpha/r scaling) as DyLoRA's; shapes stay static (the other ranks are zeroed), so one
  compiled function serves every rank. `rank` may be traced. With `detach_lower`, ranks below
  the b-th get no gradient (DyLoRA's "frozen" mode).
  """
  new = {}
  for path, ad in base.of(adapters, variants.LoraParams).items():
    s = ad.spec
    b = jnp.clip(jnp.asarray(rank, jnp.int32), 1, s.rank)
    idx = jnp.arange(s.rank)
    w = jnp.where(idx < b, jnp.sqrt(s.rank / b.astype(jnp.float32)), 0.0)
    a, bb = ad.a, ad.b
    if detach_lower:
      top = idx == b - 1
      a = jnp.where(top, a, jax.lax.stop_gradient(a))
      bb = jnp.where(_expand_rank(top, ad, 'b'), bb, jax.lax.stop_gradient(bb))
    new[path] = dataclasses.replace(ad, a=a * w.astype(a.dtype),
                                    b=bb * _expand_rank(w, ad, 'b').astype(bb.dtype))
  return base.replace_leaves(adapters, new)


def _ranks(adapters) -> list[int]:
  return sorted({a.spec.rank for a in base.of(adapters, variants.LoraParams).values()})


def dylora(*, min_rank: int = 1, detach_lower: bool = False) -> base.Dynamics:
  """DyLoRA (Valipour et al., EACL 2023) for `lora` leaves: every step trains at a random
  truncation rank b ~ U{min_rank..r} (one draw per step, from the step's rng; per leaf
  b = min(b, its rank)), so the trained adapters work at every rank <= r (`truncate`). At the
  end the loop evaluates the adapters at every rank (`views`: 'by_rank').

  Returns:
    The method.

  Raises:
    ValueError: for `min_rank` < 1 (build time) or above a leaf's rank (`check`).
  """
  name = 'dylora'
  min_rank = base.check_int(name, 'min_rank', min_rank, 1)

  def check_rank(rank, path):
    if min_rank > rank:
      where = f' of {path!r}' if path else ''
      raise ValueError(f'{name}: min_rank={min_rank} is above the rank {rank}{where}.')

  def check(spec, params):
    del params
    base.need(dyn, spec)
    base.check_ranks(dyn, spec)

  def prepare(adapters, step, rng):
    del step
    if rng is None:
      raise ValueError('dylora samples a rank per step: the step needs an rng.')
    r_max = max(_ranks(adapters))
    b = jax.random.randint(jax.random.fold_in(rng, 0x0D1), (), min_rank, r_max + 1)
    return truncate(adapters, b, detach_lower=detach_lower)

  def report(state):
    return {'ranks': _ranks(state.adapters)}

  def views(adapters):
    return {'by_rank': {str(r): truncate(adapters, r)
                        for r in range(1, max(_ranks(adapters)) + 1)}}

  dyn = base.Dynamics(name, prepare=prepare, check=check, check_rank=check_rank, report=report,
                      views=views, variants=('lora',))
  return dyn


METHOD = base.Method('dylora', dylora, variant='lora')
