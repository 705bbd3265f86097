"""dot_general: `x @ W + s * ((x @ A) @ B)` over all in-axes (or all out-axes: a tied embedding
used as a head), with W on either side; a calibration probe records the statistics of x."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.interpreter import axes
from lorax_jax.interpreter import base
from lorax_jax.interpreter.quantw import bind_quant
from lorax_jax.interpreter.values import LowRank, add_side, dropout, row_pick, row_select
from lorax_jax.interpreter.values import row_valid
from lorax_jax.interpreter.values import scale_at, scale_rows_at, scaled


def factored(eqn, invals, ctx):
  lhs, rhs = invals
  if isinstance(lhs, LowRank) and isinstance(rhs, LowRank):
    return base.decline('both operands are adapted kernels')
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  on_left = isinstance(lhs, LowRank)
  v, x = (lhs, rhs) if on_left else (rhs, lhs)
  vc, xc = (lc, rc) if on_left else (rc, lc)
  vb, xb = (lb, rb) if on_left else (rb, lb)
  kinds = v.kinds
  contracted = {kinds[d] for d in vc}
  if len(contracted) != 1 or contracted == {'b'} or sorted(vc) != [
      d for d, k in enumerate(kinds) if k == next(iter(contracted))]:
    return base.decline(
        f'it contracts the kernel axes {tuple(vc)} of kinds {kinds} (i: in, o: out, b: batch); '
        'a factored form needs exactly all in-axes or all out-axes contracted')
  cg = contracted.pop()   # the contracted group
  f = 'o' if cg == 'i' else 'i'
  if sorted(vb) != [d for d, k in enumerate(kinds) if k == 'b']:
    return base.decline(f'its batch dimensions {tuple(vb)} are not the kernel\'s batch axes '
                        f'(kinds {kinds})')
  if v.capture:
    return _capture(eqn, v, x, on_left, vc, xc, vb, xb, ctx) if cg == 'i' else None
  precision = eqn.params.get('precision')
  pet = eqn.params.get('preferred_element_type')
  n = len(kinds)
  not_in = [d for d in range(n) if kinds[d] != 'i']
  if v.n_adapters:
    return _mixed(eqn, v, x, on_left, vc, xc, vb, xb, cg, ctx)
  if cg == 'o' and v.g is not None:
    # The output units are contracted (a tied embedding as a head): scale x on those axes.
    x = scale_at(x, v, [xb[list(vb).index(d)] if d in vb else xc[list(vc).index(d)]
                        for d in not_in])
  y = bind_quant(eqn, [v.w, x] if on_left else [x, v.w])
  dtype = v.w.dtype
  ag, af = (v.a, v.b) if cg == 'i' else (v.b, v.a)
  f_axes = tuple(d for d in range(n) if kinds[d] == f)
  g_axes = tuple(d for d in range(n) if kinds[d] == cg)
  ag = jnp.squeeze(ag, f_axes).astype(dtype)      # non-F axes in W order, r
  af = jnp.squeeze(af, g_axes).astype(dtype)      # non-G axes in W order, r
  pos_g = [d for d in range(n) if d not in f_axes]
  pos_f = [d for d in range(n) if d not in g_axes]
  x = dropout(x, v.dropout, ctx)
  nb = len(vb)
  if not nb and not on_left and sorted(xc) == list(range(x.ndim - len(xc), x.ndim)):
    d = _side_2d(x, ag, af, xc, [pos_g.index(q) for q in vc], v.scale, precision, pet, dtype)
  else:
    # B with r first, as in `_side_2d`.
    afr = jnp.moveaxis(af, -1, 0)
    if not on_left:
      t = jax.lax.dot_general(
          x, ag, ((xc, [pos_g.index(d) for d in vc]), (xb, [pos_g.index(d) for d in vb])),
          precision=precision, preferred_element_type=pet).astype(dtype)
      d = jax.lax.dot_general(
          scaled(t, v.scale), afr,
          (([t.ndim - 1], [0]), (list(range(nb)), [1 + pos_f.index(d) for d in vb])),
          precision=precision, preferred_element_type=pet)
    else:
      t = jax.lax.dot_general(
          ag, x, (([pos_g.index(d) for d in vc], xc), ([pos_g.index(d) for d in vb], xb)),
          precision=precision, preferred_element_type=pet).astype(dtype)
      d = jax.lax.dot_general(
          afr, scaled(t, v.scale),
          (([0], [nb]), ([1 + pos_f.index(d) for d in vb], list(range(nb)))),
          precision=precision, preferred_element_type=pet)
  out = add_side(y, d)
  if cg == 'i' and v.g is not None:
    x_free = x.ndim - len(xc) - nb
    w_free = [q for q in range(n) if q not in vc and q not in vb]
    start = nb if on_left else nb + x_free
    out = scale_at(out, v, [list(vb).index(q) if q in vb else start + w_free.index(q)
                            for q in not_in])
  return [out]


# A mixed batch computes every adapter's x @ A (then masks) when tokens per row x adapters is at
# most this; above it, each row's A and B are gathered (the cost of the first grows with the
# adapters, that of the second with the rows: on CPU they cross near 32 adapters for decode).
DENSE_MIXED_MAX = 32


def _mixed(eqn, v: LowRank, x, on_left, vc, xc, vb, xb, cg, ctx):
  """A mixed-adapter batch: row j of x (its leading axis) runs with adapter ids[j] (BGMV: each
  row's A and B gathered from the stack, then matmuls batched over the rows; with one token per
  row, B's rows are read inside the multiply-add instead of being copied out)."""
  kinds, n = v.kinds, len(v.kinds)
  rows = v.ids.shape[0]
  if x.ndim == 0 or x.shape[0] != rows or 0 in xc or 0 in xb:
    raise ValueError(
        f'adapter_ids: the input of the adapted kernel {v.path!r} has shape {tuple(x.shape)} '
        f'(contracted axes {tuple(xc)}), but a mixed-adapter batch needs its {rows} rows (one '
        'per adapter id) on the leading, uncontracted axis of every adapted layer\'s input.')
  precision = eqn.params.get('precision')
  pet = eqn.params.get('preferred_element_type')
  dtype = v.w.dtype
  not_in = [d for d in range(n) if kinds[d] != 'i']
  f = 'o' if cg == 'i' else 'i'
  nb = len(vb)
  x_rest = [q for q in range(1, x.ndim) if q not in xc and q not in xb]   # x's free axes but rows
  w_free = [q for q in range(n) if q not in vc and q not in vb]
  row_pos = nb + (len(w_free) if on_left else 0)      # y: batch, lhs free, rhs free
  if cg == 'o' and v.g is not None:   # a tied head: scale x's contracted (output-unit) axes
    x = scale_rows_at(x, v, [xb[list(vb).index(d)] if d in vb else xc[list(vc).index(d)]
                             for d in not_in], 0)
  y = bind_quant(eqn, [v.w, x] if on_left else [x, v.w])
  if v.canon is not None and cg == 'i':
    # The stack as stored: A (n, batch, in, r), B (n, batch, r, out) in the spec's axis order.
    (ag, af), (bax, iax, oax) = v.canon, v.canon_axes
    nbk = len(bax)
    g_pos = lambda d: 1 + (bax.index(d) if d in bax else nbk + iax.index(d))
    f_pos = lambda d: 1 + (bax.index(d) if d in bax else nbk + 1 + oax.index(d))
    r_f, free_w = 1 + nbk, list(oax)
  else:
    f_axes = tuple(d for d in range(n) if kinds[d] == f)
    g_axes = tuple(d for d in range(n) if kinds[d] == cg)
    pos_g = [d for d in range(n) if d not in f_axes]
    pos_f = [d for d in range(n) if d not in g_axes]
    ag, af = (v.a, v.b) if cg == 'i' else (v.b, v.a)
    ag = jnp.squeeze(ag, tuple(1 + d for d in f_axes))             # n, non-F axes (W order), r
    af = jnp.squeeze(af, tuple(1 + d for d in g_axes))             # n, non-G axes (W order), r
    g_pos = lambda d: 1 + pos_g.index(d)
    f_pos = lambda d: 1 + pos_f.index(d)
    r_f, free_w = af.ndim - 1, [d for d in pos_f if kinds[d] == f]
  ag, af = ag.astype(dtype), af.astype(dtype)
  x = dropout(x, v.dropout, ctx)
  rest_shape = tuple(x.shape[q] for q in x_rest)
  free_shape = tuple(v.w.shape[d] for d in free_w)
  if (v.canon is not None and cg == 'i' and not nb
      and math.prod(rest_shape) * v.n_adapters <= DENSE_MIXED_MAX):
    # Few tokens per row (decode) and few adapters: every adapter's x @ A (one matmul over the
    # stack as stored), each row's picked by a one-hot mask, then one matmul with all the Bs.
    # On CPU this beats gathering each row's A and B (XLA's gather copies at a few GB/s).
    n_ad = v.n_adapters
    oh = jax.nn.one_hot(v.ids, n_ad, dtype=dtype)   # rows without an adapter: all zeros
    oh = oh.reshape((rows,) + (1,) * len(x_rest) + (n_ad, 1))
    t_all = jax.lax.dot_general(x, ag, ((xc, [g_pos(d) for d in vc]), ((), ())),
                                precision=precision, preferred_element_type=pet).astype(dtype)
    t = scaled(jnp.sum(t_all * oh, axis=-2), v.scale)                 # rows, x_rest, r
    t_exp = (t[..., None, :] * oh).reshape(t.shape[:-1] + (-1,))       # rows, x_rest, n * r
    d = jax.lax.dot_general(t_exp, af.reshape(t_exp.shape[-1], -1), (([t_exp.ndim - 1], [0]),
                                                                    ((), ())),
                            precision=precision, preferred_element_type=pet)
    return [_finish(v, x, y, d.reshape((rows,) + rest_shape + free_shape), on_left, xc, vb, cg,
                    x_rest, free_w, w_free, not_in, row_pos)]
  t = jax.lax.dot_general(
      x, row_select(v, ag, None), ((xc, [g_pos(d) for d in vc]),
                                   ([0] + list(xb), [0] + [g_pos(d) for d in vb])),
      precision=precision, preferred_element_type=pet).astype(dtype)   # rows, vb, x_rest, r
  t = scaled(t * row_valid(v, t.ndim, t.dtype), v.scale)
  r = t.shape[-1]
  if not nb and math.prod(rest_shape) == 1:
    # One token per row (a decode step): sum_j t[:, j] * B[ids, j], each row of B_j gathered
    # inside the multiply-add (one loop fusion) rather than copied out first.
    t2 = t.reshape(rows, r)
    pick = row_pick(v)
    bj = lambda j: jax.lax.index_in_dim(af, j, axis=r_f, keepdims=False).reshape(
        v.n_adapters, -1)[pick]
    d = sum(t2[:, j, None] * bj(j) for j in range(r)).astype(dtype)
    d = d.reshape((rows,) + rest_shape + free_shape)
  else:
    d = jax.lax.dot_general(
        t, row_select(v, af, None),
        (([t.ndim - 1], [r_f]), (list(range(1 + nb)), [0] + [f_pos(q) for q in vb])),
        precision=precision, preferred_element_type=pet)             # rows, vb, x_rest, free
  return [_finish(v, x, y, d, on_left, xc, vb, cg, x_rest, free_w, w_free, not_in, row_pos)]


def _finish(v, x, y, d, on_left, xc, vb, cg, x_rest, free_w, w_free, not_in, row_pos):
  """y + the side path `d` (rows, vb, x_rest, W's free axes in `free_w` order), in y's layout:
  vb, then (W free, rows, x_rest) with W on the left, else (rows, x_rest, W free), the W free
  axes in W order; then DoRA's per-row output scale."""
  nb = len(vb)
  nr = len(x_rest)
  src_rows, src_vb = [0], list(range(1, 1 + nb))
  src_x = list(range(1 + nb, 1 + nb + nr))
  src_w = [1 + nb + nr + int(q) for q in np.argsort(free_w)]
  order = src_vb + (src_w + src_rows + src_x if on_left else src_rows + src_x + src_w)
  out = add_side(y, jnp.transpose(d, order))
  if cg == 'i' and v.g is not None:
    x_free = x.ndim - len(xc) - nb
    start = nb if on_left else nb + x_free
    out = scale_rows_at(out, v, [list(vb).index(q) if q in vb else start + w_free.index(q)
                                 for q in not_in], row_pos)
  return out


def _side_2d(x, ag, af, xc, ag_pos, scale, precision, pet, dtype):
  """`scale * (x @ A) @ B` for `x` of shape tokens + contracted axes (the dense layer), in the
  layout that XLA's CPU backend runs without copies in the backward pass:
  - on 2-D views, the token axes flattened into one (a bitcast): the weight gradients then
    contract one axis of x and dy as they are laid out (with several token axes XLA's dot
    canonicalization transposes x and dy, each an activation's size: 45 ms of a 600 ms step);
  - B with r first: its gradient is dot(t, dy), thin operand first;
  - A as (r, K) behind an optimization barrier: its gradient is then dot(u, x), thin operand
    first (about 3x faster than dot(x, u), into which XLA would otherwise fold the transpose);
  - the scale on the rank-r product (`scaled`).
  The result has the shape of the layer's output: tokens + B's out-axes.
  """
  lead = x.shape[:x.ndim - len(xc)]
  order = [ag_pos[list(xc).index(j)] for j in sorted(xc)]   # A's in-axes in x's order
  a2t = jax.lax.optimization_barrier(
      jnp.transpose(ag, order + [ag.ndim - 1]).reshape(-1, ag.shape[-1]).T)
  b2 = jnp.moveaxis(af, -1, 0).reshape(af.shape[-1], -1)
  x2 = x.reshape(math.prod(lead), -1)
  t = jax.lax.dot_general(x2, a2t, (([1], [1]), ([], [])), precision=precision,
                          preferred_element_type=pet).astype(dtype)
  d = jax.lax.dot(scaled(t, scale), b2, precision=precision, preferred_element_type=pet)
  return d.reshape(lead + af.shape[:-1])


def _capture(eqn, v: LowRank, x, on_left, vc, xc, vb, xb, ctx):
  """A calibration probe: y = x @ W, and the statistics of x in the kernel's canonical in-order.

  The probe's A is the identity over the canonical (flattened) in-axes, so x @ A is x with its
  contracted axes flattened as the spec orders them, whatever moves W went through.
  """
  n = len(v.kinds)
  y = bind_quant(eqn, [v.w, x] if on_left else [x, v.w])
  f_axes = tuple(d for d in range(n) if v.kinds[d] == 'o')
  cd = jnp.promote_types(x.dtype, jnp.float32)
  ag = jnp.squeeze(v.a, f_axes).astype(cd)
  pos_g = [d for d in range(n) if d not in f_axes]
  x32 = x.astype(cd)
  hp = jax.lax.Precision.HIGHEST
  t = jax.lax.dot_general(
      x32, ag, ((xc, [pos_g.index(d) for d in vc]), (xb, [pos_g.index(d) for d in vb])),
      precision=hp)                                      # batch (vb order), x free, d_in
  nb = len(vb)
  t = jnp.transpose(t, list(np.argsort(vb)) + list(range(nb, t.ndim)))
  rows = t.reshape(t.shape[:nb] + (-1, t.shape[-1]))
  gram = jnp.einsum('...ni,...nj->...ij', rows, rows, precision=hp)
  count = jnp.full(t.shape[:nb], rows.shape[-2], cd)
  ctx.record(v.path, (gram, rows.sum(-2), count))
  return [y]


def infer(eqn, ins, usage):
  """Contracted axes are in-axes, free axes out-axes, batch axes batch axes (either operand)."""
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  for t, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
    if t is not None:
      path, ax = t
      free = [d for d in range(len(ax)) if d not in c and d not in b]
      usage.record(path, axes.origins(ax, b), axes.origins(ax, c), axes.origins(ax, free))
  return None


base.register(base.PrimitiveRule('dot_general', factored=factored, infer=infer))
