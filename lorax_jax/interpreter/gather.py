"""gather: an embedding lookup takes rows of A, then multiplies by B."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.interpreter import axes
from lorax_jax.interpreter import base
from lorax_jax.interpreter.quantw import bind_quant
from lorax_jax.interpreter.values import LowRank, add_side, scale_at, scaled


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
  ga = jax.lax.gather(v.a.astype(v.w.dtype), idx, dn_a, sizes,
                      indices_are_sorted=p['indices_are_sorted'],
                      unique_indices=p['unique_indices'], mode=p['mode'],
                      fill_value=p['fill_value'])
  noncollapsed = [d for d in range(n) if d not in dn.collapsed_slice_dims]
  out_pos = {d: dn.offset_dims[k] for k, d in enumerate(noncollapsed)}
  o_pos = [out_pos[d] for d in outs]
  ga = jnp.squeeze(ga, tuple(o_pos))                      # other output dims, r
  ins = tuple(d for d in range(n) if kinds[d] == 'i')
  b_sq = jnp.squeeze(v.b, ins).astype(v.w.dtype)          # out axes in W order, r
  # On 2-D views with r first in B, as in `dot_general` (its weight gradient then contracts the
  # tokens of dy as dy is laid out); the scale on the rank-r rows.
  b2 = jnp.moveaxis(b_sq, -1, 0).reshape(r, -1)
  d = jax.lax.dot(scaled(ga.reshape(-1, r), v.scale), b2).reshape(ga.shape[:-1] + b_sq.shape[:-1])
  order = [q for q in range(out_rank) if q not in o_pos] + o_pos
  d = jnp.transpose(d, np.argsort(order))
  return [scale_at(add_side(y, d), v, o_pos)]


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
