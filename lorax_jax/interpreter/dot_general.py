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
from lorax_jax.interpreter.values import LowRank, add_side, dropout, scale_at, scaled


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
