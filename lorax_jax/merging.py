"""Merging LoRA adapters: PEFT's `add_weighted_adapter` (task arithmetic, TIES, DARE, SVD), the
exact dW-space merges, and LoRAHub's gradient-free composition (layer 2: user API).

Three levels, all pure functions over jax arrays and adapter trees (jit-compatible; `density`,
`method` and ranks are static):

- Tensors: `task_arithmetic`, `magnitude_prune`, `ties`, `dare_linear`, `dare_ties`, `prune`,
  `calculate_majority_sign_mask`, `disjoint_merge` (and `magnitude_based_pruning`,
  `random_pruning`) have the names, arguments and semantics of `peft.utils.merge_utils`; the
  random ones take a PRNG `key=`. Task tensors are a list of arrays or one array stacked on
  axis 0.
- Adapter trees: `combine(trees, weights, method)` is PEFT's `LoraModel.add_weighted_adapter`
  over a list of LoRA adapter trees (same paths and base shapes) and returns a new adapter tree
  (rank and alpha as PEFT gives them, scale 1) for `join` / `lora` / `merge` / `save_peft`.
  `merge_deltas` is the exact dW-space merge (dense merged task vectors) and `factorize` its
  truncated-SVD refactoring at a chosen rank.
- `lorahub`: LoRAHub's (Huang et al. 2023) search of the combination weights.

Which merges are exact (dW_i = s_i A_i B_i is tree i's update at a leaf, w_i its weight):

- `'cat'` (dW space): exactly sum_i w_i dW_i, at rank sum_i r_i (ranks may differ).
- `'svd'` (dW space): sum_i w_i dW_i truncated by SVD to `svd_rank`; exact when `svd_rank` >= the
  rank of the sum (at most sum_i r_i). Computed from the factors (QR, then an SVD of the
  sum_i r_i square core) when `svd_rank` <= sum_i r_i: no d_in x d_out SVD.
- `'ties_svd'`, `'dare_linear_svd'`, `'dare_ties_svd'`, `'magnitude_prune_svd'` (dW space): the
  TIES / DARE / pruned merge of the dW_i (exactly `merge_deltas`), truncated to `svd_rank`; a
  pruned merge is generally of full rank, so this is exact only at min(d_in, d_out).
- `'linear'`, `'ties'`, `'dare_linear'`, `'dare_ties'`, `'magnitude_prune'` (factor space): the
  A_i and the B_i are merged SEPARATELY, A from sign(w_i s_i) sqrt|w_i s_i| A_i and B from
  sqrt|w_i s_i| B_i. The product has cross terms A_i B_j and the pruning acts on factors, not
  updates: this only approximates merging dW (exact for one adapter). Ranks must be equal.

The truncation of the `*_svd` methods is the best rank-`svd_rank` approximation of the merged dW
(Eckart-Young), and `factorize(merge_deltas(...), spec, rank)` gives it at any chosen rank.

>>> x = jnp.array([[1., -2.], [3., 0.5]])
>>> y = jnp.array([[-1., 1.], [2., -4.]])
>>> ties([x, y], jnp.array([1.0, 1.0]), density=0.5).tolist()
[[0.0, -2.0], [2.5, -4.0]]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import inits
from lorax_jax import paths
from lorax_jax.joined import is_adapter
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common
from lorax_jax.variants.lora import LoraParams

METHODS = ('linear', 'cat', 'svd', 'ties', 'ties_svd', 'dare_linear', 'dare_ties',
           'dare_linear_svd', 'dare_ties_svd', 'magnitude_prune', 'magnitude_prune_svd')
# `merge_deltas` methods; combine's '<m>_svd' refactors them ('svd' for 'linear').
DELTA_METHODS = ('linear', 'ties', 'dare_linear', 'dare_ties', 'magnitude_prune')
SIGN_METHODS = ('total', 'frequency')
_FACTOR_METHODS = DELTA_METHODS           # merge A and B separately (equal ranks)
_NEEDS_DENSITY = ('ties', 'dare_linear', 'dare_ties', 'magnitude_prune')
_RANDOM = ('dare_linear', 'dare_ties')


# ------------------------------------------------------------------------------------------
# Tensor level: peft.utils.merge_utils on jax arrays.


def _random_mask(key: jax.Array, tensor: jax.Array, density: float) -> jax.Array:
  """The one source of randomness: a Bernoulli(`density`) keep-mask shaped like `tensor`.

  Every random keep-mask of this module (`random_pruning`, DARE) is drawn here, so a test can
  substitute one function to give lorax_jax and PEFT the same masks.
  """
  return jax.random.bernoulli(key, density, jnp.shape(tensor))


def _density(density: Any, name: str = 'density') -> float:
  if (not isinstance(density, numbers.Real) or isinstance(density, bool)
      or not 0 <= density <= 1):
    raise ValueError(f'{name}={density!r} must be a Python number in [0, 1] (the fraction of '
                     'values kept; static under jit).')
  return float(density)


def _stack(task_tensors: Any) -> jax.Array:
  if isinstance(task_tensors, (list, tuple)):
    if not task_tensors:
      raise ValueError('task_tensors is empty: give at least one tensor.')
    return jnp.stack([jnp.asarray(t) for t in task_tensors])
  return jnp.asarray(task_tensors)


def _weighted(tensors: jax.Array, weights: Any) -> jax.Array:
  """`tensors * weights` with one weight per task (axis 0): PEFT's reshape_weight_task_tensors."""
  weights = jnp.asarray(weights)
  if weights.ndim != 1 or weights.shape[0] != tensors.shape[0]:
    raise ValueError(f'weights has shape {weights.shape} for {tensors.shape[0]} task tensors: '
                     'give one weight per task tensor.')
  return tensors * weights.reshape(weights.shape + (1,) * (tensors.ndim - 1))


def _keys(key: Any, n: int, what: str) -> jax.Array:
  if key is None:
    raise ValueError(f'{what} draws random masks: pass key=jax.random.key(seed).')
  return jax.random.split(key, n)


def magnitude_based_pruning(tensor: jax.Array, density: float) -> jax.Array:
  """Keeps the `int(density * size)` entries of largest magnitude, zeroes the rest.

  Args:
    tensor: the tensor to prune.
    density: the fraction of values kept, in [0, 1].

  Returns:
    The pruned tensor.
  """
  x = jnp.asarray(tensor)
  k = int(_density(density) * x.size)
  if k == 0:
    return jnp.zeros_like(x)
  if k >= x.size:
    return x
  _, top = jax.lax.top_k(jnp.abs(x).reshape(-1), k)
  mask = jnp.zeros((x.size,), x.dtype).at[top].set(1)
  return x * mask.reshape(x.shape)


def random_pruning(tensor: jax.Array, density: float, rescale: bool, *,
                   key: jax.Array | None = None) -> jax.Array:
  """Keeps each entry with probability `density` (DARE's drop), optionally rescaled by 1/density.

  Args:
    tensor: the tensor to prune.
    density: the keep probability, in (0, 1].
    rescale: divide the kept values by `density` (preserves the expectation).
    key: a PRNG key (required).

  Returns:
    The pruned tensor.

  Raises:
    ValueError: without a key, or for `density` 0 with `rescale`.
  """
  density = _density(density)
  if rescale and density == 0:
    raise ValueError('density=0 with rescale=True divides by zero: give a density in (0, 1].')
  if key is None:
    raise ValueError('random_pruning draws a random mask: pass key=jax.random.key(seed).')
  x = jnp.asarray(tensor)
  pruned = x * _random_mask(key, x, density).astype(x.dtype)
  return pruned / density if rescale else pruned


def prune(tensor: jax.Array, density: float, method: str, rescale: bool = False, *,
          key: jax.Array | None = None) -> jax.Array:
  """Prunes `tensor` by `method`, `'magnitude'` (top-k by magnitude) or `'random'` (Bernoulli).

  Args:
    tensor: the tensor to prune.
    density: the fraction of values kept, in [0, 1]; 1 keeps the tensor as it is.
    method: `'magnitude'` or `'random'`.
    rescale: for `'random'`: divide the kept values by `density`.
    key: a PRNG key, required for `'random'`.

  Returns:
    The pruned tensor.

  Raises:
    ValueError: for an unknown method, a density outside [0, 1] (PEFT warns above 1 and keeps
      the tensor), or `'random'` without a key.
  """
  if method not in ('magnitude', 'random'):
    raise ValueError(f"Unknown pruning method {method!r}; allowed: 'magnitude', 'random'.")
  density = _density(density)
  if density >= 1:
    return jnp.asarray(tensor)
  if method == 'magnitude':
    return magnitude_based_pruning(tensor, density)
  return random_pruning(tensor, density, rescale=rescale, key=key)


def calculate_majority_sign_mask(tensor: jax.Array, method: str = 'total') -> jax.Array:
  """TIES' sign election: where each task tensor (stacked on axis 0) has the elected sign.

  Args:
    tensor: the task tensors stacked on axis 0.
    method: `'total'` (the sign of the sum) or `'frequency'` (the sign held by more tasks);
      ties go to +.

  Returns:
    A boolean array like `tensor` (zeros never have the elected sign).

  Raises:
    ValueError: for another method (PEFT raises RuntimeError).
  """
  if method not in SIGN_METHODS:
    raise ValueError(f'Unknown majority_sign_method {method!r}; allowed: {SIGN_METHODS}.')
  tensor = jnp.asarray(tensor)
  sign = jnp.sign(tensor)
  magnitude = tensor.sum(axis=0) if method == 'total' else sign.sum(axis=0)
  majority = jnp.where(magnitude >= 0, 1, -1).astype(sign.dtype)
  return sign == majority


def disjoint_merge(task_tensors: jax.Array, majority_sign_mask: jax.Array) -> jax.Array:
  """TIES' disjoint mean: the mean over the tasks whose entry has the elected sign.

  Args:
    task_tensors: the (weighted) task tensors stacked on axis 0.
    majority_sign_mask: from `calculate_majority_sign_mask`.

  Returns:
    The merged tensor (0 where no task is kept).
  """
  task_tensors = jnp.asarray(task_tensors)
  mask = jnp.asarray(majority_sign_mask)
  mixed = (task_tensors * mask.astype(task_tensors.dtype)).sum(axis=0)
  kept = jnp.maximum(mask.sum(axis=0), 1).astype(mixed.dtype)
  return mixed / kept


def task_arithmetic(task_tensors: Any, weights: jax.Array) -> jax.Array:
  """Task arithmetic: sum_i weights[i] * task_tensors[i].

  Args:
    task_tensors: a list of arrays of one shape, or one array stacked on axis 0.
    weights: one weight per task tensor.

  Returns:
    The merged tensor.
  """
  return _weighted(_stack(task_tensors), weights).sum(axis=0)


def magnitude_prune(task_tensors: Any, weights: jax.Array, density: float) -> jax.Array:
  """Each task tensor magnitude-pruned to `density`, then the weighted sum.

  Args:
    task_tensors: a list of arrays of one shape, or one array stacked on axis 0.
    weights: one weight per task tensor.
    density: the fraction of values each task keeps, in [0, 1].

  Returns:
    The merged tensor.
  """
  t = _stack(task_tensors)
  t = jnp.stack([prune(t[i], density, 'magnitude') for i in range(t.shape[0])])
  return _weighted(t, weights).sum(axis=0)


def ties(task_tensors: Any, weights: jax.Array, density: float,
         majority_sign_method: str = 'total') -> jax.Array:
  """TIES-merging (Yadav et al. 2023): trim (magnitude prune), elect sign, disjoint mean.

  The sign is elected on the pruned tensors before weighting, as PEFT does.

  Args:
    task_tensors: a list of arrays of one shape, or one array stacked on axis 0.
    weights: one weight per task tensor.
    density: the fraction of values each task keeps, in [0, 1].
    majority_sign_method: `'total'` or `'frequency'`.

  Returns:
    The merged tensor.
  """
  t = _stack(task_tensors)
  t = jnp.stack([prune(t[i], density, 'magnitude') for i in range(t.shape[0])])
  mask = calculate_majority_sign_mask(t, majority_sign_method)
  return disjoint_merge(_weighted(t, weights), mask)


def dare_linear(task_tensors: Any, weights: jax.Array, density: float, *,
                key: jax.Array | None = None) -> jax.Array:
  """DARE (Yu et al. 2024): random drop with keep probability `density`, rescale, weighted sum.

  Args:
    task_tensors: a list of arrays of one shape, or one array stacked on axis 0.
    weights: one weight per task tensor.
    density: the keep probability, in (0, 1].
    key: a PRNG key (required); task i uses `jax.random.split(key, n)[i]`.

  Returns:
    The merged tensor.
  """
  t = _stack(task_tensors)
  keys = _keys(key, t.shape[0], 'dare_linear')
  t = jnp.stack([prune(t[i], density, 'random', rescale=True, key=keys[i])
                 for i in range(t.shape[0])])
  return _weighted(t, weights).sum(axis=0)


def dare_ties(task_tensors: Any, weights: jax.Array, density: float,
              majority_sign_method: str = 'total', *, key: jax.Array | None = None
              ) -> jax.Array:
  """DARE's random drop and rescale, then TIES' sign election and disjoint mean.

  Args:
    task_tensors: a list of arrays of one shape, or one array stacked on axis 0.
    weights: one weight per task tensor.
    density: the keep probability, in (0, 1].
    majority_sign_method: `'total'` or `'frequency'`.
    key: a PRNG key (required); task i uses `jax.random.split(key, n)[i]`.

  Returns:
    The merged tensor.
  """
  t = _stack(task_tensors)
  keys = _keys(key, t.shape[0], 'dare_ties')
  t = jnp.stack([prune(t[i], density, 'random', rescale=True, key=keys[i])
                 for i in range(t.shape[0])])
  mask = calculate_majority_sign_mask(t, majority_sign_method)
  return disjoint_merge(_weighted(t, weights), mask)


def _tensor_merge(method: str, density: float | None, sign_method: str) -> Callable:
  """`(tensors stacked on axis 0, weights, key) -> merged` for a `DELTA_METHODS` name."""
  table = {
      'linear': lambda t, w, k: task_arithmetic(t, w),
      'ties': lambda t, w, k: ties(t, w, density, sign_method),
      'dare_linear': lambda t, w, k: dare_linear(t, w, density, key=k),
      'dare_ties': lambda t, w, k: dare_ties(t, w, density, sign_method, key=k),
      'magnitude_prune': lambda t, w, k: magnitude_prune(t, w, density),
  }
  return table[method]


# ------------------------------------------------------------------------------------------
# Adapter trees: checks and per-leaf matrix views.


def _flat_trees(trees: Any, what: str) -> list[dict[str, LoraParams]]:
  """`[{path: LoraParams}]` per tree, checked: a non-empty list of plain-LoRA trees with the
  same paths and base geometry."""
  if isinstance(trees, dict) or not isinstance(trees, Sequence) or isinstance(trees, str):
    raise ValueError(f'{what} takes a list of adapter trees; got a {type(trees).__name__}. '
                     'Pass [tree_1, tree_2, ...].')
  if not trees:
    raise ValueError(f'{what} got an empty list of adapter trees: give at least one.')
  flats = []
  for i, tree in enumerate(trees):
    if not isinstance(tree, dict) or not tree:
      raise ValueError(f'trees[{i}] is {type(tree).__name__} {tree!r:.80}, not an adapter tree '
                       '(the non-empty dict lorax_jax.init or load_peft returns).')
    flats.append(paths.flat(tree, is_leaf=is_adapter))
  first = flats[0]
  for i, flat in enumerate(flats[1:], 1):
    if set(flat) != set(first):
      missing, extra = sorted(set(first) - set(flat)), sorted(set(flat) - set(first))
      raise ValueError(f'trees[{i}] does not have the paths of trees[0]: missing {missing[:10]}, '
                       f'extra {extra[:10]}. All trees must adapt the same paths.')
  for path in first:
    for i, flat in enumerate(flats):
      ad = flat[path]
      spec = getattr(ad, 'spec', None)
      if not isinstance(ad, LoraParams) or spec.variant != 'lora':
        kind = f'a {spec.variant!r}' if isinstance(spec, LeafSpec) else 'not an'
        raise ValueError(f'trees[{i}] at {path!r} is {kind} adapter ({type(ad).__name__}): '
                         f'{what} merges plain LoRA adapters (LoraParams) only.')
      if inits.changes_base(spec.init):
        raise ValueError(f'trees[{i}] at {path!r} was initialized by {spec.init!r}, so it '
                         'adapts a changed base (a residual or a quantized W): convert it with '
                         'lorax_jax.to_lora(trained, initial) before merging.')
    s0, geometry = first[path].spec, _geometry(first[path].spec)
    for i, flat in enumerate(flats[1:], 1):
      s = flat[path].spec
      if _geometry(s) != geometry:
        raise ValueError(f'{path!r}: trees[{i}] adapts a base of shape {s.shape} (batch axes '
                         f'{s.batch_axes}, in {s.in_axes}, out {s.out_axes}), trees[0] one of '
                         f'shape {s0.shape} (batch axes {s0.batch_axes}, in {s0.in_axes}, out '
                         f'{s0.out_axes}). Merged adapters must share the base shapes.')
  return flats


def _geometry(spec: LeafSpec) -> tuple:
  return spec.shape, spec.batch_axes, spec.in_axes, spec.out_axes


def _check_weights(weights: Any, n: int) -> None:
  shape = (len(weights),) if isinstance(weights, (list, tuple)) else tuple(jnp.shape(weights))
  if len(shape) != 1:
    raise ValueError(f'weights {weights!r:.80} has shape {shape}: give a list of {n} weights, '
                     'one per tree.')
  if shape[0] != n:
    raise ValueError(f'weights {weights!r:.80} has {shape[0]} entries for {n} trees: give one '
                     'weight per tree.')


def _check_equal_ranks(flats: Sequence[dict[str, LoraParams]], what: str) -> None:
  for path in flats[0]:
    ranks = [f[path].spec.rank for f in flats]
    if len(set(ranks)) != 1:
      raise ValueError(f'{what} merges the A and B factors separately, so every tree needs the '
                       f'same rank at each path; {path!r} has ranks {ranks}.')


def _leaf_key(key: jax.Array | None, path: str) -> jax.Array | None:
  if key is None:
    return None
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _dims(spec: LeafSpec) -> tuple[int, int, int]:
  """(stack size, d_in, d_out) of a leaf's matrix view."""
  return math.prod(spec.batch_shape), math.prod(spec.in_shape), math.prod(spec.out_shape)


def _mat_a(ad: LoraParams, dtype) -> jax.Array:
  n, d_in, _ = _dims(ad.spec)
  return ad.a.reshape(n, d_in, ad.a.shape[-1]).astype(dtype)


def _mat_b(ad: LoraParams, dtype) -> jax.Array:
  n, _, d_out = _dims(ad.spec)
  return ad.b.reshape(n, ad.a.shape[-1], d_out).astype(dtype)


def _lora(a: jax.Array, b: jax.Array, spec: LeafSpec, dtype_a, dtype_b) -> LoraParams:
  """LoraParams from stacked matrix views (stack, d_in, r) and (stack, r, d_out), at scale 1
  (alpha = r, as PEFT's merged adapter: `lora_alpha=new_rank`)."""
  r = a.shape[-1]
  new = dataclasses.replace(spec, variant='lora', rank=r, alpha=float(r), scaling='alpha/r',
                            init='kaiming', init_options=(),
                            options=spec.options if spec.variant == 'lora' else ())
  a = a.reshape(spec.batch_shape + a.shape[-2:]).astype(dtype_a)
  b = b.reshape(spec.batch_shape + b.shape[-2:]).astype(dtype_b)
  return LoraParams(common.unflat_a(a, spec), common.unflat_b(b, spec), new)


def _per_stack(merge: Callable, tensors: jax.Array, weights: jax.Array,
               key: jax.Array | None) -> jax.Array:
  """`merge(tensors[j], weights, key_j)` for every stack element j (a PEFT module each):
  tensors is (stack, tasks, ...)."""
  if tensors.shape[0] == 1:
    k = None if key is None else jax.random.split(key, 1)[0]
    return merge(tensors[0], weights, k)[None]
  if key is None:
    return jax.vmap(lambda t: merge(t, weights, None))(tensors)
  return jax.vmap(lambda t, k: merge(t, weights, k))(tensors, jax.random.split(key, len(tensors)))


def _canonical_signs(u: jax.Array, vh: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Singular pairs with the largest-magnitude entry of each left vector positive, so the
  factors (and `svd_clamp`'s quantile) do not depend on the SVD routine's sign choice."""
  top = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)
  sign = jnp.sign(jnp.take_along_axis(u, top, axis=-2))
  sign = jnp.where(sign == 0, 1, sign)
  return u * sign, vh * jnp.swapaxes(sign, -1, -2)


def _svd_factors(m: jax.Array | None, rank: int, clamp: float | None,
                 low_rank: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """PEFT's SVD split of dW (stack, d_in, d_out) at `rank`: A = V_r, B = S_r U_r^T in PEFT's
  (d_out, d_in) orientation dW^T = U S V^T (the singular values go to B), then `clamp`.

  `low_rank=(a, b)` with dW = a @ b, a (stack, d_in, R) and b (stack, R, d_out), R >= rank:
  the same SVD from QR factors of a and b^T and an R x R core, without forming dW.
  """
  if low_rank is None:
    u, s, vh = jnp.linalg.svd(jnp.swapaxes(m, -1, -2), full_matrices=False)
  else:
    qa, ra = jnp.linalg.qr(low_rank[0])                           # a = qa ra
    qb, rb = jnp.linalg.qr(jnp.swapaxes(low_rank[1], -1, -2))      # b^T = qb rb
    uc, s, vch = jnp.linalg.svd(rb @ jnp.swapaxes(ra, -1, -2))     # dW^T = qb rb ra^T qa^T
    u, vh = qb @ uc, vch @ jnp.swapaxes(qa, -1, -2)
  u, vh = _canonical_signs(u[..., :rank], vh[..., :rank, :])
  u = u * s[..., None, :rank]
  if clamp is not None:
    dist = jnp.concatenate([u.reshape(u.shape[0], -1), vh.reshape(vh.shape[0], -1)], axis=-1)
    hi = jnp.quantile(dist, clamp, axis=-1)[:, None, None]
    u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
  return jnp.swapaxes(vh, -1, -2), jnp.swapaxes(u, -1, -2)


def _check_rank(name: str, rank: Any, flat: dict[str, LoraParams | LeafSpec], note: str = ''
                ) -> int:
  """`rank` as an int in [1, min(d_in, d_out)] of every leaf."""
  specs = {p: getattr(x, 'spec', x) for p, x in flat.items()}
  limits = {p: min(_dims(s)[1:]) for p, s in specs.items()}
  allowed = min(limits.values())
  if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f'{name}={rank!r} must be an int from 1 to {allowed} (the smallest '
                     'min(d_in, d_out) of the merged leaves).')
  for path, limit in limits.items():
    if rank > limit:
      _, d_in, d_out = _dims(specs[path])
      raise ValueError(f'{name}={rank}{note} is above min(d_in, d_out) = {limit} of {path!r} '
                       f'({d_in} x {d_out}): a rank-{rank} SVD of it does not exist. Allowed: '
                       f'1 <= {name} <= {allowed}.')
  return int(rank)


def _check_options(method: str, density: Any, majority_sign_method: Any, key: Any) -> None:
  if majority_sign_method not in SIGN_METHODS:
    raise ValueError(f'Unknown majority_sign_method {majority_sign_method!r}; allowed: '
                     f'{SIGN_METHODS}.')
  base = method[:-len('_svd')] if method.endswith('_svd') else method
  if base in _NEEDS_DENSITY:
    if density is None:
      raise ValueError(f'method {method!r} needs density= (the fraction of values kept), a '
                       'number in (0, 1].')
    if (not isinstance(density, numbers.Real) or isinstance(density, bool)
        or not 0 < density <= 1):
      raise ValueError(f'density={density!r} must be a Python number in (0, 1] (the fraction '
                       f'of values kept) for method {method!r}.')
  if base in _RANDOM and key is None:
    raise ValueError(f'method {method!r} draws random (DARE) masks: pass '
                     'key=jax.random.key(seed).')


def _compute_dtype(states: Sequence[LoraParams]):
  return common.compute_dtype(*[x for s in states for x in (s.a, s.b)])


def _merged_delta(method: str, states: Sequence[LoraParams], weights: Any,
                  density: float | None, sign_method: str, key: jax.Array | None) -> jax.Array:
  """The merged dW of one leaf as (stack, d_in, d_out), in the compute dtype."""
  dtype = _compute_dtype(states)
  dws = jnp.stack([s.spec.scale * (_mat_a(s, dtype) @ _mat_b(s, dtype)) for s in states], 1)
  merge = _tensor_merge(method, density, sign_method)
  return _per_stack(merge, dws, jnp.asarray(weights).astype(dtype), key)


# One compiled program per leaf geometry and setting (leaves of one spec share it). `mask_fn` is
# the `_random_mask` in use, a static argument only so that a substituted one is traced afresh.
_STATIC = ('method', 'density', 'sign_method', 'rank', 'clamp', 'mask_fn')


@functools.partial(jax.jit, static_argnames=_STATIC)
def _combine_leaf(states, weights, key, *, method, density, sign_method, rank, clamp, mask_fn):
  """The merged LoraParams of one leaf (see `combine`)."""
  del mask_fn
  ad0 = states[0]
  dtype = _compute_dtype(states)
  w = jnp.asarray(weights).astype(dtype)
  ws = w * jnp.asarray([s.spec.scale for s in states], dtype)
  if method == 'cat':
    a = jnp.concatenate([_mat_a(s, dtype) * ws[i] for i, s in enumerate(states)], axis=-1)
    b = jnp.concatenate([_mat_b(s, dtype) for s in states], axis=-2)
  elif method in _FACTOR_METHODS:
    merge = _tensor_merge(method, density, sign_method)
    root = jnp.sqrt(jnp.abs(ws))
    ka, kb = (None, None) if key is None else jax.random.split(key)
    a = _per_stack(merge, jnp.stack([_mat_a(s, dtype) for s in states], 1),
                   jnp.where(ws >= 0, root, -root), ka)
    b = _per_stack(merge, jnp.stack([_mat_b(s, dtype) for s in states], 1), root, kb)
  elif method == 'svd' and rank <= sum(s.spec.rank for s in states) < min(_dims(ad0.spec)[1:]):
    # sum_i w_i dW_i = [w_i s_i A_i] @ [B_i] has rank <= sum_i r_i: its SVD from the factors.
    a = jnp.concatenate([_mat_a(s, dtype) * ws[i] for i, s in enumerate(states)], axis=-1)
    b = jnp.concatenate([_mat_b(s, dtype) for s in states], axis=-2)
    a, b = _svd_factors(None, rank, clamp, low_rank=(a, b))
  else:
    base = 'linear' if method == 'svd' else method[:-len('_svd')]
    m = _merged_delta(base, states, w, density, sign_method, key)
    a, b = _svd_factors(m, rank, clamp)
  return _lora(a, b, ad0.spec, ad0.a.dtype, ad0.b.dtype)


@functools.partial(jax.jit, static_argnames=('method', 'density', 'sign_method', 'mask_fn'))
def _delta_leaf(states, weights, key, *, method, density, sign_method, mask_fn):
  """The merged dW of one leaf in its kernel's layout (see `merge_deltas`)."""
  del mask_fn
  m = _merged_delta(method, states, weights, density, sign_method, key)
  s = states[0].spec
  return common.unmatrix(m.reshape(s.batch_shape + m.shape[-2:]), s)


@functools.partial(jax.jit, static_argnames=('spec', 'rank', 'clamp', 'dtype'))
def _factorize_leaf(dw, *, spec, rank, clamp, dtype):
  n, d_in, d_out = _dims(spec)
  m = common.matrix(dw.astype(common.compute_dtype(dw)), spec).reshape(n, d_in, d_out)
  a, b = _svd_factors(m, rank, clamp)
  return _lora(a, b, spec, dtype or dw.dtype, dtype or dw.dtype)


# ------------------------------------------------------------------------------------------
# Adapter trees: the public functions.


def combine(trees: Sequence[Any], weights: Any, method: str = 'svd', *,
            density: float | None = None, majority_sign_method: str = 'total',
            svd_rank: int | None = None, svd_clamp: float | None = None,
            key: jax.Array | None = None) -> dict[str, Any]:
  """A new LoRA adapter tree merging `trees`, as PEFT's `LoraModel.add_weighted_adapter`.

  With dW_i = s_i A_i B_i the update of tree i at a leaf (s_i its scale) and w_i its weight:

  - `'cat'`: A = [w_1 s_1 A_1, ..., w_n s_n A_n] (along the rank), B = [B_1; ...; B_n]: rank
    sum_i r_i, and A B = sum_i w_i dW_i EXACTLY. Ranks may differ.
  - `'svd'`, `'ties_svd'`, `'dare_linear_svd'`, `'dare_ties_svd'`, `'magnitude_prune_svd'`: the
    dW_i merged by task arithmetic / TIES / DARE / magnitude pruning (`merge_deltas`, exact),
    then truncated by SVD to rank `svd_rank` (default: the largest rank of all trees' leaves, as
    PEFT's max of the adapters' r): exact when `svd_rank` >= the rank of the merged dW (for
    `'svd'` at most sum_i r_i; a pruned merge is generally of full rank, min(d_in, d_out)), else
    its best rank-`svd_rank` approximation. In PEFT's orientation dW^T = U S V^T (d_out x d_in)
    A = V_r and B = (U_r S_r)^T: the singular values go to B. `svd_clamp` then clamps both
    factors to +-(the `svd_clamp` quantile of all their entries). Ranks may differ. Singular
    vectors are signed so that the largest entry of each U column is positive: PEFT leaves the
    signs to the SVD routine (MKL, LAPACK, cuSOLVER differ), which only `svd_clamp`'s quantile
    sees. For `'svd'` with `svd_rank` <= sum_i r_i < min(d_in, d_out) the SVD is computed from
    the factors (QR of both, an SVD of the sum_i r_i square core), not of the dense dW.
  - `'linear'`, `'ties'`, `'dare_linear'`, `'dare_ties'`, `'magnitude_prune'`: the FACTORS are
    merged separately by that method, A from the A_i with weights sign(w_i s_i) sqrt|w_i s_i|
    and B from the B_i with weights sqrt|w_i s_i|. This only approximates merging dW (it adds
    cross terms A_i B_j and prunes factors, not updates); all trees need the same rank at a leaf.

  The new adapter has alpha = rank (PEFT's `lora_alpha=new_rank`) and `'alpha/r'` scaling:
  scale 1, the weights and scales are in the factors. (PEFT keeps `use_rslora` from the first
  adapter, which scales its merged adapter by sqrt(rank) instead; lorax_jax does not.) As in
  PEFT, a single tree is merged with `'linear'` whatever `method` says. Stacked (scanned) leaves
  are merged per stack element, like PEFT's one module per layer. Pruning, sign election and
  random masks act on each leaf's whole tensor (A, B or dW), so the kernel layout does not
  matter. jit-compatible (`method`, `density`, `svd_rank`, `svd_clamp` static).

  Args:
    trees: a list of LoRA adapter trees with the same paths and base shapes (from `init`,
      training or `load_peft`).
    weights: one weight per tree (may be negative).
    method: one of `METHODS`.
    density: the fraction of values kept, in (0, 1]: required for the TIES, DARE and
      magnitude-prune methods.
    majority_sign_method: TIES' sign election, `'total'` or `'frequency'`.
    svd_rank: the rank of the `*svd` methods' result, 1 to min(d_in, d_out) of every leaf.
    svd_clamp: a quantile in [0, 1] to clamp the SVD factors at, or None.
    key: a PRNG key, required for the DARE methods; leaf `path` uses
      `fold_in(key, crc32(path))`.

  Returns:
    An adapter tree of `LoraParams` with the paths of `trees[0]`, each spec saying the new rank
    and alpha; its dtypes are those of `trees[0]`. `save_peft` writes it with the spec tree of
    the inputs.

  Raises:
    ValueError: for an empty list, trees with different paths or base shapes, adapters other
      than plain LoRA, `weights` of the wrong length, an unknown method or sign method, a
      missing or out-of-range `density`, `svd_rank` outside [1, min(d_in, d_out)], an
      out-of-range `svd_clamp`, different ranks for a factor-merging method, or a DARE method
      without `key`.

  Example:
    >>> merged = combine([t1, t2], [0.6, 0.4], 'cat')           # doctest: +SKIP
    >>> y = lora(apply)(join(params, merged), x)                 # doctest: +SKIP
  """
  if method not in METHODS:
    raise ValueError(f'Unknown method {method!r}; allowed: {METHODS}.')
  flats = _flat_trees(trees, 'combine')
  _check_weights(weights, len(flats))
  if len(flats) == 1:
    method = 'linear'   # PEFT: "if there is only one adapter, we can only use linear merging"
  _check_options(method, density, majority_sign_method, key)
  if svd_clamp is not None and (not isinstance(svd_clamp, numbers.Real)
                                or isinstance(svd_clamp, bool) or not 0 <= svd_clamp <= 1):
    raise ValueError(f'svd_clamp={svd_clamp!r} must be None or a quantile in [0, 1].')
  first = flats[0]
  if method in _FACTOR_METHODS:
    try:
      _check_equal_ranks(flats, f'method {method!r}')
    except ValueError as e:
      raise ValueError(f"{e} Use 'cat' or an '*svd' method (exact in dW) for different "
                       'ranks.') from None
  rank = None
  if method.endswith('svd'):
    default = max(f[p].spec.rank for f in flats for p in first)
    rank = _check_rank('svd_rank', default if svd_rank is None else svd_rank, first,
                       ' (the default: the largest adapter rank)' if svd_rank is None else '')
  weights = jnp.asarray(weights)
  out = {}
  for path in first:
    out[tuple(path.split('/'))] = _combine_leaf(
        [f[path] for f in flats], weights, _leaf_key(key, path), method=method,
        density=None if density is None else float(density), sign_method=majority_sign_method,
        rank=rank, clamp=None if svd_clamp is None else float(svd_clamp), mask_fn=_random_mask)
  return paths.nest(out)


def merge_deltas(trees: Sequence[Any], weights: Any, method: str = 'linear', *,
                 density: float | None = None, majority_sign_method: str = 'total',
                 key: jax.Array | None = None) -> dict[str, Any]:
  """The exact dW-space merge: per leaf the dense merged task vector of the dW_i = s_i A_i B_i.

  `'linear'` is task arithmetic, sum_i w_i dW_i; `'ties'`, `'dare_linear'`, `'dare_ties'` and
  `'magnitude_prune'` are the tensor functions of the same names applied to the dW_i (what
  PEFT's `'*_svd'` methods merge before their SVD). `combine(..., method='<m>_svd')` (`'svd'`
  for `'linear'`) is `factorize` of this at `svd_rank`, with the same random masks for the same
  key. Ranks may differ.

  Args:
    trees: a list of LoRA adapter trees with the same paths and base shapes.
    weights: one weight per tree.
    method: one of `DELTA_METHODS`.
    density: the fraction of values kept, in (0, 1], for the TIES, DARE and pruning methods.
    majority_sign_method: `'total'` or `'frequency'`.
    key: a PRNG key, required for the DARE methods.

  Returns:
    A nested dict with the adapters' paths holding dW in each kernel's layout and shape (add it
    to the base leaf at the same path), in at least float32.

  Raises:
    ValueError: as `combine`.

  Example:
    >>> deltas = merge_deltas([t1, t2], [1.0, 1.0], 'ties', density=0.2)   # doctest: +SKIP
    >>> adapters = factorize(deltas, spec, rank=16)                         # doctest: +SKIP
  """
  if method not in DELTA_METHODS:
    raise ValueError(f'Unknown method {method!r} for merge_deltas; allowed: {DELTA_METHODS} '
                     "(combine's 'cat' and 'svd' are 'linear' here).")
  flats = _flat_trees(trees, 'merge_deltas')
  _check_weights(weights, len(flats))
  _check_options(method, density, majority_sign_method, key)
  weights = jnp.asarray(weights)
  out = {}
  for path in flats[0]:
    out[tuple(path.split('/'))] = _delta_leaf(
        [f[path] for f in flats], weights, _leaf_key(key, path), method=method,
        density=None if density is None else float(density), sign_method=majority_sign_method,
        mask_fn=_random_mask)
  return paths.nest(out)


def factorize(deltas: dict[str, Any], spec: dict[str, Any], rank: int, *,
              clamp: float | None = None, dtype: Any = None) -> dict[str, Any]:
  """LoRA adapters of rank `rank` for dense updates: the truncated SVD of each dW.

  The result is the best rank-`rank` approximation of each dW (Eckart-Young), so it is exact
  when `rank` >= the rank of dW. The split is PEFT's (`combine`'s `*svd` methods): in the
  (d_out, d_in) orientation dW^T = U S V^T, A = V_r and B = (U_r S_r)^T, alpha = rank (scale 1),
  with singular vectors signed so that the largest entry of each U column is positive.

  Args:
    deltas: `{path: dW}` as a nested dict, each dW in its kernel's layout (`merge_deltas`).
    spec: a tree giving each path's geometry: the spec tree (`make_spec`) or an adapter tree
      of the same paths.
    rank: the rank of every leaf, 1 to min(d_in, d_out).
    clamp: a quantile in [0, 1] to clamp the factors at (PEFT's `svd_clamp`), or None.
    dtype: the factors' dtype (default: dW's).

  Returns:
    An adapter tree of `LoraParams` at the paths of `deltas`.

  Raises:
    ValueError: for a path of `deltas` that `spec` does not give, a dW of another shape than
      its spec, or `rank` outside [1, min(d_in, d_out)].
  """
  flat_d = paths.flat(deltas, is_leaf=lambda x: not isinstance(x, dict))
  flat_s = paths.flat(spec, is_leaf=lambda x: x is None or is_adapter(x)
                      or isinstance(x, LeafSpec))
  specs = {}
  for path, dw in flat_d.items():
    s = getattr(flat_s.get(path), 'spec', flat_s.get(path))
    if not isinstance(s, LeafSpec):
      raise ValueError(f'spec has no leaf spec for {path!r}: give the spec tree (make_spec) or '
                       'an adapter tree with the paths of deltas.')
    if tuple(np.shape(dw)) != s.shape:
      raise ValueError(f'dW at {path!r} has shape {tuple(np.shape(dw))}, its spec shape '
                       f'{s.shape}.')
    specs[path] = s
  if clamp is not None and (not isinstance(clamp, numbers.Real) or isinstance(clamp, bool)
                            or not 0 <= clamp <= 1):
    raise ValueError(f'clamp={clamp!r} must be None or a quantile in [0, 1].')
  rank = _check_rank('rank', rank, specs)
  out = {}
  for path, dw in flat_d.items():
    out[tuple(path.split('/'))] = _factorize_leaf(
        jnp.asarray(dw), spec=specs[path], rank=rank, clamp=None if clamp is None else float(clamp),
        dtype=None if dtype is None else jnp.dtype(dtype))
  return paths.nest(out)


# ------------------------------------------------------------------------------------------
# LoRAHub.


class LoraHubResult(NamedTuple):
  """What `lorahub` found.

  Attributes:
    weights: the best combination weights found, shape (number of trees,).
    adapters: `lorahub_combine(trees, weights)`.
    history: the best objective (loss + l1 * mean|w|) so far: at the initial weights, then
      after each generation.
    evaluations: how many objective evaluations the search made (at most the budget).
  """
  weights: jax.Array
  adapters: dict[str, Any]
  history: jax.Array
  evaluations: int


def lorahub_combine(trees: Sequence[Any], weights: Any) -> dict[str, Any]:
  """LoRAHub's composition: A = sum_i w_i A_i and B = sum_i w_i B_i at every leaf.

  As LoRAHub's code, which weights every LoRA tensor: the result is not sum_i w_i dW_i (for
  that, `combine(..., 'cat')`). The composed adapter keeps `trees[0]`'s specs (LoRAHub loads all
  modules with the first one's config, so its scale applies). Traceable in `weights`.

  Args:
    trees: a list of LoRA adapter trees with the same paths, base shapes and ranks.
    weights: one weight per tree.

  Returns:
    An adapter tree like `trees[0]`.

  Raises:
    ValueError: as `combine`, and for different ranks at a path.
  """
  flats = _flat_trees(trees, 'lorahub_combine')
  _check_weights(weights, len(flats))
  _check_equal_ranks(flats, 'LoRAHub')
  return _compose(flats, weights)


def _compose(flats, weights):
  w = jnp.asarray(weights)
  out = {}
  for path, ad0 in flats[0].items():
    a = sum(w[i].astype(ad0.a.dtype) * f[path].a for i, f in enumerate(flats))
    b = sum(w[i].astype(ad0.b.dtype) * f[path].b for i, f in enumerate(flats))
    out[tuple(path.split('/'))] = LoraParams(a, b, ad0.spec)
  return paths.nest(out)


def lorahub(trees: Sequence[Any], loss_fn: Callable[[Any], jax.Array], *, key: jax.Array,
            budget: int = 40, l1: float = 0.05, bounds: tuple[float, float] = (-1.5, 1.5),
            popsize: int | None = None, init: Any = None, sigma: float | None = None,
            batched: bool = True) -> LoraHubResult:
  """LoRAHub (Huang et al. 2023): a gradient-free search of the weights that compose `trees`.

  Minimizes loss_fn(lorahub_combine(trees, w)) + l1 * mean_i |w_i| over w in `bounds`^n with at
  most `budget` evaluations, from `init` (LoRAHub's: all zeros, the base model). The paper and
  its code use nevergrad's NGOpt; this is a JAX evolution strategy instead (no dependency): a
  (mu/mu_w, lambda)-ES with antithetic (mirrored) sampling, CMA-ES's recombination weights and
  cumulative step-size adaptation, candidates clipped to the bounds. Each generation's
  population is evaluated with `jax.vmap` of the objective over the weights (`batched=False`:
  `jax.lax.map`, one at a time), and the whole search runs in one `jax.jit`: deterministic
  given `key`. LoRAHub's defaults: 40 evaluations (`reproduce_bbh.py`), bounds +-1.5,
  regularizer 0.05 * mean|w|.

  Args:
    trees: the LoRA adapter trees to compose (same paths, base shapes and ranks).
    loss_fn: `adapter_tree -> scalar` few-shot loss, traceable (jit and vmap): e.g.
      `lambda ad: loss(lora(apply)(join(params, ad), x), y)`.
    key: a PRNG key.
    budget: the number of loss evaluations allowed; the search uses 1 (the initial weights) +
      generations * popsize of them.
    l1: the weight of the mean-absolute-weight regularizer.
    bounds: `(low, high)` of every weight.
    popsize: candidates per generation, even (antithetic pairs); default
      4 + 3 log(n) rounded up to even.
    init: the initial weights (default zeros, clipped to the bounds).
    sigma: the initial step size (default (high - low) / 6).
    batched: evaluate a population with `jax.vmap` (default) or sequentially.

  Returns:
    A `LoraHubResult` (weights, adapters, history, evaluations).

  Raises:
    ValueError: for trees `lorahub_combine` refuses, a missing key, a budget below
      1 + popsize, an odd or too small popsize, bounds with low >= high, a negative l1, or
      `init` of the wrong length.
  """
  flats = _flat_trees(trees, 'lorahub')
  n = len(flats)
  if key is None:
    raise ValueError('lorahub samples candidates: pass key=jax.random.key(seed).')
  if not callable(loss_fn):
    raise ValueError(f'loss_fn must be a function adapter_tree -> scalar; got {loss_fn!r:.80}.')
  lo, hi = bounds
  if not lo < hi:
    raise ValueError(f'bounds={bounds!r} must be (low, high) with low < high.')
  if not l1 >= 0:
    raise ValueError(f'l1={l1!r} must be >= 0.')
  lam = popsize if popsize is not None else 2 * math.ceil((4 + 3 * math.log(n)) / 2)
  if not isinstance(lam, int) or isinstance(lam, bool) or lam < 2 or lam % 2:
    raise ValueError(f'popsize={popsize!r} must be an even int >= 2 (antithetic pairs).')
  generations = (budget - 1) // lam if isinstance(budget, int) else 0
  if generations < 1:
    raise ValueError(f'budget={budget!r} evaluations is too small for popsize {lam}: give at '
                     f'least 1 + popsize = {1 + lam}.')
  x0 = jnp.zeros((n,), jnp.float32) if init is None else jnp.asarray(init, jnp.float32)
  if x0.shape != (n,):
    raise ValueError(f'init has shape {x0.shape} for {n} trees: give one weight per tree.')
  _check_equal_ranks(flats, 'LoRAHub')
  sigma0 = (hi - lo) / 6 if sigma is None else float(sigma)

  mu = lam // 2
  rw = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
  rw = jnp.asarray(rw / rw.sum(), jnp.float32)
  mu_eff = float(1 / np.sum(np.asarray(rw, np.float64) ** 2))
  cs = (mu_eff + 2) / (n + mu_eff + 5)
  ds = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + cs
  chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))

  def search(flats, key, x0):
    def objective(w):
      return loss_fn(_compose(flats, w)) + l1 * jnp.mean(jnp.abs(w))

    evaluate = jax.vmap(objective) if batched else (lambda xs: jax.lax.map(objective, xs))
    x0 = jnp.clip(x0, lo, hi)
    f0 = objective(x0).astype(jnp.float32)

    def generation(state, g):
      m, step, p, best_x, best_f = state
      z = jax.random.normal(jax.random.fold_in(key, g), (mu, n), jnp.float32)
      z = jnp.concatenate([z, -z])
      x = jnp.clip(m + step * z, lo, hi)
      f = evaluate(x).astype(jnp.float32)
      order = jnp.argsort(f)
      chosen = x[order[:mu]]
      new_m = rw @ chosen
      zw = (new_m - m) / step
      p = (1 - cs) * p + math.sqrt(cs * (2 - cs) * mu_eff) * zw
      step = step * jnp.exp((cs / ds) * (jnp.linalg.norm(p) / chi_n - 1))
      better = f[order[0]] < best_f
      best_x = jnp.where(better, x[order[0]], best_x)
      best_f = jnp.where(better, f[order[0]], best_f)
      return (new_m, step, p, best_x, best_f), best_f

    state = (x0, jnp.float32(sigma0), jnp.zeros((n,), jnp.float32), x0, f0)
    (_, _, _, best_x, _), history = jax.lax.scan(generation, state, jnp.arange(generations))
    return best_x, jnp.concatenate([f0[None], history])

  best, history = jax.jit(search)(flats, key, x0)
  return LoraHubResult(best, _compose(flats, best), history, 1 + generations * lam)
