"""Surgery on adapters, optimizer state and the base: resizing ranks, pruning moments, folding.

The optimizer state is walked with `optax.tree_utils.tree_map_params`, which finds the copies of
the adapter tree that `tx.init` built (Adam's mu and nu, one per `multi_transform` partition),
so no leaf is matched by its key path or shape.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_jax import layout
from lorax_jax import paths
from lorax_jax import quant as quant_lib
from lorax_jax import variants
from lorax_jax.dynamics import base
from lorax_jax.joined import is_adapter
from lorax_jax.leafspec import FULL, spec_leaves


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _map_opt_state(tx: optax.GradientTransformation, fn, opt_state: Any, *rest: Any) -> Any:
  """`fn(x, *rest_leaves)` on every copy of the adapter tree's arrays in `opt_state`; the
  leaves a partition masks out (`optax.MaskedNode`) and non-parameter leaves (step counts)
  pass through."""
  def leaf(x, *r):
    return x if _is_masked(x) else fn(x, *r)
  return optax.tree_utils.tree_map_params(tx, leaf, opt_state, *rest, is_leaf=_is_masked)


def _fields(ad) -> list[str]:
  return [f.name for f in dataclasses.fields(ad)
          if not f.metadata.get('static') and getattr(ad, f.name) is not None]


def _with_fields(adapters, fn):
  """A tree shaped like `adapters` whose array leaves are `fn(path, state, field)`."""
  def leaf(kp, ad):
    path = paths.path_str(kp)
    return dataclasses.replace(ad, **{f: fn(path, ad, f) for f in _fields(ad)})
  return jax.tree_util.tree_map_with_path(leaf, adapters, is_leaf=is_adapter)


class _Leaf:
  """An opaque pytree leaf carrying per-array data next to an adapter tree."""

  def __init__(self, value):
    self.value = value


# ---------------------------------------------------------------------------------------------
# Resizing ranks.


def rank_axis(ad: Any, field: str) -> int | None:
  """The rank axis of an adapter field (the `None` axis after the batch axes in the variant's
  layout), or None for a field with no (or no single) rank axis."""
  lay = variants.get(ad.spec.variant).layout(ad.spec)[field]
  nb = len(ad.spec.batch_shape)
  rest = [i for i, a in enumerate(lay) if a is None and i >= nb]
  return rest[0] if len(rest) == 1 else None


def _cut(ad: Any, idx: np.ndarray) -> Any:
  s = ad.spec
  spec = dataclasses.replace(s, rank=int(idx.size), scaling='constant', alpha=float(s.scale))
  fields = {}
  for f in _fields(ad):
    axis = rank_axis(ad, f)
    x = getattr(ad, f)
    fields[f] = x if axis is None else jnp.take(x, jnp.asarray(idx), axis=axis)
  return dataclasses.replace(ad, spec=spec, **fields)


def resizable(ad: Any) -> bool:
  """Whether the ranks of `ad`'s variant can be cut: the variant declares it
  (`Variant.resizable`: its ranks are independent terms, so cutting its arrays along their rank
  axes gives exactly the cut of its factored A and B; `cut_is_exact` checks that claim)."""
  return variants.get(ad.spec.variant).resizable


def cut_is_exact(ad: Any) -> bool:
  """Checks a variant's `resizable` claim on a random state shaped like `ad` (rank >= 2): its
  factored form with every other rank cut equals the cut of its full factored form, and its
  structure allows a cut (a layout with at most one rank axis per array, a factored form
  independent of W, no arrays shared across leaves)."""
  v = variants.get(ad.spec.variant)
  s = ad.spec
  if v.layout is None or v.factored is None or v.tie is not None or v.unmerge is not None:
    return False
  lay = v.layout(s)
  nb = len(s.batch_shape)
  fs = _fields(ad)
  if not (all(sum(a is None for a in lay[f][nb:]) <= 1 for f in fs) and any(
      rank_axis(ad, f) is not None for f in fs)):
    return False
  keys = jax.random.split(jax.random.key(0), len(fs))
  rnd = dataclasses.replace(ad, **{f: jax.random.normal(k, getattr(ad, f).shape, jnp.float32)
                                   for f, k in zip(fs, keys)})
  w = jnp.zeros(s.shape, jnp.float32)
  idx = np.arange(0, s.rank, 2)
  try:
    full, cut = v.factored(w, rnd), v.factored(w, _cut(rnd, idx))
  except (ValueError, TypeError):   # the cut arrays do not even fit the variant's math (NOLA)
    return False
  if full is None or cut is None or full.out_scale is not None or cut.out_scale is not None:
    return False
  want_a = jnp.take(full.a, jnp.asarray(idx), axis=full.a.ndim - 1) * full.scale
  want_b = jnp.take(full.b, jnp.asarray(idx), axis=nb)
  return bool(np.allclose(cut.a * cut.scale, want_a, rtol=1e-5, atol=1e-6) and
              np.allclose(cut.b, want_b, rtol=1e-5, atol=1e-6))


def resize(adapters: Any, keep: dict[str, Any]) -> Any:
  """Really resizes adapters: keeps the ranks `keep[path]` (indices) of each listed leaf.

  The leaf's spec gets the new rank with its scale kept (`scaling='constant'`, alpha = the old
  scale), so the kept ranks compute exactly what they did.

  Raises:
    ValueError: for a variant whose rank axis cannot be cut (`resizable`), an empty or
      out-of-range `keep`.
  """
  states = base.flat(adapters)
  new = {}
  for path, idx in keep.items():
    ad = states[path]
    s = ad.spec
    if s.variant == FULL or not resizable(ad):
      raise ValueError(f'Cannot resize {path!r}: the ranks of variant {s.variant!r} are not '
                       'independent terms that can be cut (see `dynamics.resizable`).')
    idx = np.asarray(idx, np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= s.rank:
      raise ValueError(f'keep for {path!r} must be 1 to {s.rank} rank indices in [0, {s.rank}); '
                       f'got {idx.tolist()}.')
    new[path] = _cut(ad, idx)
  return base.replace_leaves(adapters, new)


def resize_opt_state(tx: optax.GradientTransformation, opt_state: Any, old: Any, new: Any,
                     keep: dict[str, Any]) -> Any:
  """The optimizer state for `new = resize(old, keep)`: moments of resized leaves sliced to
  the kept ranks, everything else (other leaves, step counts) kept."""
  def cut_of(path, ad, field):
    axis = rank_axis(ad, field) if path in keep else None
    return _Leaf(None if axis is None else (axis, jnp.asarray(np.asarray(keep[path]))))

  def cut(x, c):
    return x if c.value is None else jnp.take(x, c.value[1], axis=c.value[0])

  sliced = _map_opt_state(tx, cut, opt_state, _with_fields(old, cut_of))
  # The same leaves in the structure `tx.init(new)` has (the resized specs are static fields).
  target = jax.tree_util.tree_structure(jax.eval_shape(tx.init, new))
  leaves = jax.tree_util.tree_leaves(sliced)
  out = jax.tree_util.tree_unflatten(target, leaves)
  assert all(np.shape(a) == np.shape(b) for a, b in zip(
      leaves, jax.tree_util.tree_leaves(jax.eval_shape(tx.init, new))))
  return out


# ---------------------------------------------------------------------------------------------
# Pruning optimizer moments, folding adapters into the base.


def prune_by_magnitude(x: jax.Array, fraction: float) -> jax.Array:
  """Zeroes the `fraction` of `x`'s entries with the smallest magnitudes (1.0: all)."""
  if fraction >= 1.0:
    return jnp.zeros_like(x)
  if fraction <= 0.0 or x.size == 0:
    return x
  k = int(math.floor(fraction * x.size))
  if k == 0:
    return x
  mag = jnp.abs(x).reshape(-1)
  thresh = jnp.sort(mag)[k - 1]
  return jnp.where(jnp.abs(x) > thresh, x, jnp.zeros_like(x))


def prune_opt_state(tx: optax.GradientTransformation, opt_state: Any, adapters: Any,
                    paths_: set[str], fraction: float) -> Any:
  """The optimizer state with the moments of the adapters at `paths_` magnitude-pruned (ReLoRA:
  99%; `fraction=1` resets them). Step counts (and so schedules) are kept.

  The positions are chosen by the magnitude of each array's first copy in the state (Adam's
  mu) and the same positions are zeroed in every copy (nu too): no kept first moment meets a
  zeroed second moment, whose division would blow the next update up.
  """
  if fraction <= 0.0:
    return opt_state
  ids = _with_fields(adapters, lambda path, ad, f: _Leaf((path, f) if path in paths_ else None))

  def prune(state):
    keep = {}

    def first(x, i):
      if i.value is not None and i.value not in keep:
        keep[i.value] = prune_by_magnitude(x, fraction) != 0
      return x

    _map_opt_state(tx, first, state, ids)
    return _map_opt_state(
        tx, lambda x, i: x if i.value is None else jnp.where(keep[i.value], x, jnp.zeros_like(x)),
        state, ids)

  return jax.jit(prune)(opt_state)


def _leaf_key(key: jax.Array, path: str) -> jax.Array:
  # As `adapters.init`: keyed by the path, so a leaf's init does not depend on the others.
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def merge_and_reinit(state: base.TrainState, key: jax.Array, *, prune: float,
                     tx: optax.GradientTransformation) -> base.TrainState:
  """ReLoRA's and COLA's primitive: W <- W + dW for every low-rank adapter, fresh adapters
  (the variant's own init, kaiming or gaussian: B = 0, so the function is unchanged), and the
  optimizer moments of those adapters magnitude-pruned by `prune` (1.0: reset). Fully trained
  leaves are kept. Tied and quantized leaves are refused by the methods' `check`."""
  low = base.low_rank(state.adapters)
  fresh = {}

  def leaf(kp, w):
    path = paths.path_str(kp)
    ad = low.get(path)
    if ad is None:
      return w
    merged = variants.merged_leaf(w, ad)
    s = ad.spec
    if s.init not in ('kaiming', 'gaussian'):
      s = dataclasses.replace(s, init='kaiming')
    _, fresh[path] = variants.get(s.variant).init(_leaf_key(key, path), merged, s)
    return merged

  params = jax.tree_util.tree_map_with_path(leaf, state.params, is_leaf=quant_lib.is_quantized)
  adapters = base.replace_leaves(state.adapters, fresh)
  opt_state = prune_opt_state(tx, state.opt_state, state.adapters, set(low), prune)
  return state._replace(params=params, adapters=adapters, opt_state=opt_state)


def check_mergeable(name: str, params: Any, spec: Any) -> None:
  """ValueError for leaves a method that folds adapters into the base cannot take: variants
  whose arrays are shared across leaves, and quantized base leaves."""
  if spec is None:
    return
  leaves = spec_leaves(spec)
  for path, s in leaves.items():
    if s.variant != FULL and variants.get(s.variant).tie is not None:
      raise ValueError(f'Dynamics {name!r} folds adapters into the base; {path!r} uses '
                       f'{s.variant!r}, whose arrays are shared across leaves. Use an untied '
                       'variant.')
  for path, _, leaf in paths.leaves_with_paths(params):
    s = leaves.get(path)
    if s is not None and s.variant != FULL and quant_lib.is_quantized(leaf):
      raise ValueError(f'Dynamics {name!r} folds adapters into the base, but {path!r} is '
                       'quantized: merging would requantize it at every fold. Use a float base.')


def update_ranks(initial_params: Any, params: Any, adapters: Any, *, rtol: float = 1e-3
                 ) -> dict[str, Any]:
  """Numerical rank of each adapted matrix's total update, merge(params, adapters) - W_0
  (singular values above `rtol` x the largest; per layer of stacked leaves).

  For methods that fold into the base (ReLoRA, COLA, Delta-LoRA) this is the rank the whole
  run added, which can exceed the adapters' rank. Quantized leaves are compared dequantized.
  """
  low = base.with_ties(base.low_rank(adapters))
  w_now = {p: x for p, _, x in paths.leaves_with_paths(params) if p in low}
  w_0 = {p: x for p, _, x in paths.leaves_with_paths(quant_lib.dequantize(initial_params))}
  out = {}
  for p, ad in low.items():
    s = ad.spec
    d = (np.asarray(variants.merged_leaf(w_now[p], ad), np.float64) -
         np.asarray(w_0[p], np.float64))
    mat = np.asarray(layout.to_matrix(jnp.asarray(d), s.batch_axes, s.in_axes, s.out_axes)
                     ).reshape((-1, math.prod(s.in_shape), math.prod(s.out_shape)))
    ranks = []
    for m in mat:
      sv = np.linalg.svd(m, compute_uv=False)
      ranks.append(int(np.sum(sv > rtol * sv[0])) if sv.size and sv[0] > 0 else 0)
    out[p] = ranks if s.batch_shape else ranks[0]
  return out
