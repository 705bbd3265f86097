"""gather: an embedding lookup takes rows of A, then multiplies by B."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.interpreter import axes
from lorax_jax.interpreter import base
from lorax_jax.interpreter.quantw import bind_quant
from lorax_jax.interpreter.values import LowRank, add_side, row_pick, row_select, row_valid
from lorax_jax.interpreter.values import scale_at
from lorax_jax.interpreter.values import scale_rows_at, scaled


def factored(eqn, invals, ctx):
  del ctx
  v, idx = invals
  if not isinstance(v, LowRank) or isinstance(idx, LowRank) or v.capture:
    return None
  p = eqn.params
  dn = p['dimension_numbers']
  kinds = v.kinds
  n = len(kinds)
  if dn.operand_batching_dims or 'b' in kinds:
    return base.decline('a gather from a stacked (batch-axis) kernel has no factored rule')
  outs = [d for d in range(n) if kinds[d] == 'o']
  if any(d in dn.collapsed_slice_dims or d in dn.start_index_map or
         p['slice_sizes'][d] != v.w.shape[d] for d in outs):
    return base.decline(f'it indexes or slices the kernel\'s out-axes {tuple(outs)}; an '
                        'embedding lookup (rows of A, then @ B) indexes in-axes only')
  y = bind_quant(eqn, [v.w, idx])
  out_rank = y.ndim
  r = v.a.shape[-1]
  dn_a = jax.lax.GatherDimensionNumbers(
      offset_dims=tuple(dn.offset_dims) + (out_rank,),
      collapsed_slice_dims=dn.collapsed_slice_dims, start_index_map=dn.start_index_map,
      operand_batching_dims=(), start_indices_batching_dims=())
  sizes = tuple(1 if kinds[d] == 'o' else p['slice_sizes'][d] for d in range(n)) + (r,)
  rows_of = lambda a: jax.lax.gather(a.astype(v.w.dtype), idx, dn_a, sizes,
                                     indices_are_sorted=p['indices_are_sorted'],
                                     unique_indices=p['unique_indices'], mode=p['mode'],
                                     fill_value=p['fill_value'])
  noncollapsed = [d for d in range(n) if d not in dn.collapsed_slice_dims]
  out_pos = {d: dn.offset_dims[k] for k, d in enumerate(noncollapsed)}
  o_pos = [out_pos[d] for d in outs]
  ins = tuple(d for d in range(n) if kinds[d] == 'i')
  if v.n_adapters:
    ga = jnp.squeeze(jax.vmap(rows_of)(v.a), tuple(1 + q for q in o_pos))   # n, other dims, r
    b_sq = jnp.squeeze(v.b, tuple(1 + d for d in ins)).astype(v.w.dtype)  # n, out axes, r
    return [_mixed(v, y, ga, b_sq, o_pos, out_rank)]
  ga = jnp.squeeze(rows_of(v.a), tuple(o_pos))            # other output dims, r
  b_sq = jnp.squeeze(v.b, ins).astype(v.w.dtype)          # out axes in W order, r
  # On 2-D views with r first in B, as in `dot_general` (its weight gradient then contracts the
  # tokens of dy as dy is laid out); the scale on the rank-r rows.
  b2 = jnp.moveaxis(b_sq, -1, 0).reshape(r, -1)
  d = jax.lax.dot(scaled(ga.reshape(-1, r), v.scale), b2).reshape(ga.shape[:-1] + b_sq.shape[:-1])
  order = [q for q in range(out_rank) if q not in o_pos] + o_pos
  d = jnp.transpose(d, np.argsort(order))
  return [scale_at(add_side(y, d), v, o_pos)]


def _mixed(v: LowRank, y, ga, b_sq, o_pos, out_rank):
  """A mixed-adapter batch: the looked-up rows of every adapter's A (`ga`: n, lookup dims, r),
  each row's adapter picked; then each row's B."""
  rows = v.ids.shape[0]
  if ga.ndim < 3 or ga.shape[1] != rows or 0 in o_pos:
    raise ValueError(f'adapter_ids: the lookup of {v.path!r} gives shape {tuple(y.shape)}, but a '
                     f'mixed-adapter batch needs its {rows} rows on the leading axis.')
  k = ga.shape[-1]
  pick = row_pick(v).reshape((1, rows) + (1,) * (ga.ndim - 2))
  t = jnp.take_along_axis(ga, pick, axis=0)[0]                          # rows, other dims, r
  t = scaled(t * row_valid(v, t.ndim, t.dtype), v.scale)
  br = row_select(v, b_sq, None)                                       # rows, out axes, r
  b2 = jnp.moveaxis(br, -1, 1).reshape(rows, k, -1)
  d = jax.lax.dot_general(t.reshape(rows, -1, k), b2, (([2], [1]), ([0], [0])))
  d = d.reshape(t.shape[:-1] + br.shape[1:-1])
  order = [q for q in range(out_rank) if q not in o_pos] + list(o_pos)
  d = jnp.transpose(d, np.argsort(order))
  return scale_rows_at(add_side(y, d), v, o_pos, 0)


def infer(eqn, ins, usage):
  """The indexed axes are in-axes (the vocabulary), the sliced-whole axes out-axes."""
  if ins[0] is not None:
    path, ax = ins[0]
    p = eqn.params
    dn = p['dimension_numbers']
    shape = eqn.invars[0].aval.shape
    indexed = [d for d in range(len(ax)) if d in dn.start_index_map or
               d in dn.collapsed_slice_dims or p['slice_sizes'][d] != shape[d]]
    usage.record(path, set(), axes.origins(ax, indexed),
                 axes.origins(ax, [d for d in range(len(ax)) if d not in indexed]))
  return None


base.register(base.PrimitiveRule('gather', factored=factored, infer=infer))
