"""Ops that only move, cast or annotate W: they act on the pieces (W, A, B, g) of a `LowRank`.

transpose, reshape within in/out groups, unit-axis insertion and removal, slicing, casts,
copies and sharding constraints. On a bare quantized leaf they are recorded (`moves_axes`), and
slices of leading (stacked) axes slice the codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax_jax import layout
from lorax_jax import quant
from lorax_jax.interpreter import axes
from lorax_jax.interpreter import base
from lorax_jax.interpreter import compat
from lorax_jax.interpreter.quantw import QuantW, bind_on_w
from lorax_jax.interpreter.values import LowRank, is_special


def _transpose(eqn, invals, ctx):
  (v,) = invals
  perm = tuple(eqn.params['permutation'])
  full = perm + (len(perm),)
  tr = lambda arr: jnp.transpose(arr, full)
  return [v.move(tr, tr, w=bind_on_w(eqn, v.w), kinds=tuple(v.kinds[q] for q in perm))]


def _transpose_axes(eqn, ins, usage):
  path, ax = ins[0]
  return (path, tuple(ax[q] for q in eqn.params['permutation']))


def _passthrough(eqn, invals, ctx):
  """Ops that change only W's dtype, placement or identity (cast, copy, sharding constraint)."""
  v = invals[0]
  if len(invals) != 1 or eqn.primitive.multiple_results:
    return None
  return [v.replace(w=bind_on_w(eqn, v.w))]


def _reshape(eqn, invals, ctx):
  v = invals[0]
  if len(invals) != 1 or eqn.params.get('dimensions') is not None:
    return None
  new = tuple(eqn.params['new_sizes'])
  groups = layout.reshape_groups(v.w.shape, new)
  mixes = base.decline(f'the reshape from {tuple(v.w.shape)} to {new} mixes axes of different '
                       f'kinds {v.kinds} (i: in, o: out, b: batch)')
  if groups is None:
    return mixes
  kinds = [None] * len(new)
  for gi, gj in groups:
    ks = {v.kinds[q] for q in gi if v.w.shape[q] != 1} or {v.kinds[gi[0]]}
    if len(ks) != 1:
      return mixes
    for q in gj:
      kinds[q] = next(iter(ks))
  return [_regroup(eqn, v, kinds, new)]


def _reshape_axes(eqn, ins, usage):
  if eqn.params.get('dimensions') is not None:
    return None
  path, ax = ins[0]
  new = axes.reshape_axes(ax, eqn.invars[0].aval.shape, eqn.params['new_sizes'])
  return (path, new) if new is not None else None


def _regroup(eqn, v: LowRank, kinds, shape) -> LowRank:
  """W reshaped to `shape` (axis kinds `kinds`); the factors follow with 1 on unspanned axes."""
  fa = lambda arr: arr.reshape(
      tuple(1 if k == 'o' else s for k, s in zip(kinds, shape)) + (arr.shape[-1],))
  fb = lambda arr: arr.reshape(
      tuple(1 if k == 'i' else s for k, s in zip(kinds, shape)) + (arr.shape[-1],))
  return v.move(fa, fb, w=bind_on_w(eqn, v.w), kinds=tuple(kinds))


def _broadcast_in_dim(eqn, invals, ctx):
  """Only the unit-axis insertions of `expand_dims` / `w[None]`; real broadcasts materialize."""
  v = invals[0]
  if len(invals) != 1:
    return None
  shape, dims = tuple(eqn.params['shape']), tuple(eqn.params['broadcast_dimensions'])
  if list(dims) != sorted(dims) or tuple(shape[d] for d in dims) != v.w.shape or any(
      shape[q] != 1 for q in range(len(shape)) if q not in dims):
    return base.decline(f'it broadcasts the kernel to {shape}; only unit-axis insertions '
                        '(expand_dims, w[None]) have a factored form')
  kinds, last = [], None
  for q in range(len(shape)):
    if q in dims:
      last = v.kinds[dims.index(q)]
    kinds.append(last)
  first = v.kinds[0]
  kinds = [k or first for k in kinds]
  return [_regroup(eqn, v, kinds, shape)]


def _broadcast_in_dim_axes(eqn, ins, usage):
  """Unit-axis insertions keep the track (the new axes span no parameter axis)."""
  path, ax = ins[0]
  shape, dims = tuple(eqn.params['shape']), tuple(eqn.params['broadcast_dimensions'])
  if len(ins) != 1 or list(dims) != sorted(dims) or any(
      shape[q] != 1 for q in range(len(shape)) if q not in dims) or any(
          shape[d] != s for d, s in zip(dims, eqn.invars[0].aval.shape)):
    return None
  return (path, tuple(ax[dims.index(q)] if q in dims else () for q in range(len(shape))))


def _drop_unit_axes(eqn, v: LowRank, dims):
  kinds = tuple(k for d, k in enumerate(v.kinds) if d not in dims)
  if 'i' not in kinds or 'o' not in kinds:
    return base.decline(f'dropping the kernel axes {tuple(dims)} (kinds {v.kinds}) leaves no '
                        'in-axis or no out-axis')
  sq = lambda arr: jnp.squeeze(arr, dims)
  return [v.move(sq, sq, w=bind_on_w(eqn, v.w), kinds=kinds)]


def _squeeze(eqn, invals, ctx):
  (v,) = invals
  return _drop_unit_axes(eqn, v, tuple(d % v.w.ndim for d in eqn.params['dimensions']))


def _squeeze_axes(eqn, ins, usage):
  path, ax = ins[0]
  dims = {d % len(ax) for d in eqn.params['dimensions']}
  return (path, tuple(a for d, a in enumerate(ax) if d not in dims))


def _reduce_sum(eqn, invals, ctx):
  """Summing over unit axes (what einsum does with a size-1 label) is a squeeze."""
  (v,) = invals
  dims = tuple(d % v.w.ndim for d in eqn.params['axes'])
  if any(v.w.shape[d] != 1 for d in dims):
    return base.decline(f'it sums the kernel over its axes {dims} (kinds {v.kinds}); only sums '
                        'over unit axes have a factored form')
  return _drop_unit_axes(eqn, v, dims)


def _reduce_sum_axes(eqn, ins, usage):
  """A sum over unit axes keeps the track (a squeeze); a real sum ends it."""
  path, ax = ins[0]
  shape = eqn.invars[0].aval.shape
  dims = {d % len(ax) for d in eqn.params['axes']}
  if any(shape[d] != 1 for d in dims):
    return None
  return (path, tuple(a for d, a in enumerate(ax) if d not in dims))


def _slice(eqn, invals, ctx):
  (v,) = invals
  p = eqn.params
  strides = p['strides'] or (1,) * v.w.ndim

  def sl(arr, skip):
    start = tuple(0 if k == skip else s for k, s in zip(v.kinds, p['start_indices'])) + (0,)
    limit = tuple(1 if k == skip else s for k, s in zip(v.kinds, p['limit_indices'])) + (
        arr.shape[-1],)
    st = tuple(1 if k == skip else s for k, s in zip(v.kinds, strides)) + (1,)
    return jax.lax.slice(arr, start, limit, st)

  return [v.move(lambda arr: sl(arr, 'o'), lambda arr: sl(arr, 'i'), w=bind_on_w(eqn, v.w))]


def _slice_quant(eqn, invals):
  """A static slice of a bare quantized leaf: of its codes when it slices leading axes only."""
  if len(invals) != 1:
    return None
  (v,) = invals
  p = eqn.params
  if not v.ops and (p['strides'] is None or all(st == 1 for st in p['strides'])):
    sizes = [hi - lo for lo, hi in zip(p['start_indices'], p['limit_indices'])]
    got = quant.slice_leading(v.q, p['start_indices'], sizes, dynamic=False)
    if got is not None:
      return [QuantW.of(got)]
  return [v.then(eqn)]


def _dynamic_slice(eqn, invals, ctx):
  v, *starts = invals
  if not isinstance(v, LowRank) or any(is_special(s) for s in starts):
    return None
  sizes = eqn.params['slice_sizes']
  zero = jnp.zeros((), jnp.asarray(starts[0]).dtype) if starts else 0

  def sl(arr, skip):
    st = [zero if k == skip else s for k, s in zip(v.kinds, starts)] + [zero]
    sz = tuple(1 if k == skip else s for k, s in zip(v.kinds, sizes)) + (arr.shape[-1],)
    return jax.lax.dynamic_slice(arr, st, sz)

  w = _dynamic_slice_w(eqn, v.w, starts)
  return [v.move(lambda arr: sl(arr, 'o'), lambda arr: sl(arr, 'i'), w=w)]


def _dynamic_slice_w(eqn, w, starts):
  if isinstance(w, QuantW):
    if not w.ops:
      got = quant.slice_leading(w.q, starts, eqn.params['slice_sizes'], dynamic=True)
      if got is not None:
        return QuantW.of(got)
    w = w.force()
  return compat.bind(eqn, [w, *starts])


def _dynamic_slice_quant(eqn, invals):
  if not isinstance(invals[0], QuantW) or any(is_special(x) for x in invals[1:]):
    return None
  return [_dynamic_slice_w(eqn, invals[0], invals[1:])]


_R = base.PrimitiveRule
for _rule in (
    _R('transpose', factored=_transpose, moves_axes=True, infer=_transpose_axes),
    _R('reshape', factored=_reshape, moves_axes=True, infer=_reshape_axes),
    _R('squeeze', factored=_squeeze, moves_axes=True, infer=_squeeze_axes),
    _R('broadcast_in_dim', factored=_broadcast_in_dim, moves_axes=True,
       infer=_broadcast_in_dim_axes),
    _R('reduce_sum', factored=_reduce_sum, moves_axes=True, infer=_reduce_sum_axes),
    _R('slice', factored=_slice, moves_axes=True, infer=axes.same, quant=_slice_quant),
    _R('dynamic_slice', factored=_dynamic_slice, infer=axes.same, quant=_dynamic_slice_quant),
    _R('convert_element_type', factored=_passthrough, moves_axes=True, infer=axes.same),
    _R('copy', factored=_passthrough, moves_axes=True, infer=axes.same),
    _R('sharding_constraint', factored=_passthrough, moves_axes=True, infer=axes.same),
):
  base.register(_rule)
