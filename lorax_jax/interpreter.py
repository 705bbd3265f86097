"""`lora(fn)`: run any JAX function on joined (base + adapter) parameters, factored.

The function is traced to a jaxpr with the public API and evaluated by an interpreter in which
each adapted kernel is a `LowRank` value: the base W plus factors A, B in broadcast layout (see
`lorax_jax.layout`). Ops that only move W's axes (transpose, reshape within in/out groups,
slicing, casts) act on the pieces; consumers compute `x@W + s*((x@A)@B)`:

  dot_general   contracting over all in-axes (or all out-axes: a tied embedding used as a head)
  conv          A as a conv with the kernel's window, B as a 1x1 conv
  gather        rows of A (an embedding lookup), then @ B

Higher-order primitives (jit, scan, while, cond, remat) are re-traced through `jax.lax` /
`jax.checkpoint` with interpreted bodies when an adapted value flows in, and bound untouched
otherwise. Anything else materializes W + dW with a `MaterializeWarning` naming the primitive and
the path; `strict=True` (or the environment variable `LORAX_JAX_STRICT=1`) raises instead.

Primitive names and parameters drift between JAX releases; they are all in this module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Callable

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from lorax_jax import adapters as adapters_lib
from lorax_jax import layout
from lorax_jax import paths
from lorax_jax import usage
from lorax_jax import variants


class MaterializeWarning(UserWarning):
  """W + dW was formed where a factored form was expected."""


class MaterializeError(ValueError):
  """Raised in strict mode instead of `MaterializeWarning`."""


def _strict_default() -> bool:
  return os.environ.get('LORAX_JAX_STRICT', '0').lower() in ('1', 'true', 'yes')


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
  """An adapted kernel inside the interpreter: (w + scale * sum_r a * b) * g (broadcast layout).

  `g` (optional, B-like layout with r = 1) scales each output unit (DoRA's m / ||W + sAB||).
  """
  w: jax.Array
  a: jax.Array
  b: jax.Array
  kinds: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  scale: float = dataclasses.field(metadata=dict(static=True))
  path: str = dataclasses.field(metadata=dict(static=True))
  dropout: float = dataclasses.field(metadata=dict(static=True), default=0.0)
  g: Any = None

  def replace(self, **kw) -> 'LowRank':
    return dataclasses.replace(self, **kw)

  def move(self, fa, fb, **kw) -> 'LowRank':
    """Applies an axis move to the factors: `fa` to A, `fb` to B and to g (same layout)."""
    g = None if self.g is None else fb(self.g)
    return dataclasses.replace(self, a=fa(self.a), b=fb(self.b), g=g, **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dense:
  """An adapted kernel of a variant without a factored form: dW is formed (allowed)."""
  w: jax.Array
  adapter: Any
  path: str = dataclasses.field(metadata=dict(static=True))


class _Ctx:
  """Interpreter state: strictness and the dropout key stream."""

  def __init__(self, strict: bool, rng: jax.Array | None):
    self.strict = strict
    self.rng = rng
    self.counter = 0

  def next_key(self) -> jax.Array | None:
    if self.rng is None:
      return None
    self.counter += 1
    return jax.random.fold_in(self.rng, self.counter)

  def child(self, rng) -> '_Ctx':
    return _Ctx(self.strict, rng)


def _materialize(v, ctx: _Ctx | None, why: str | None):
  """W + dW as a plain array; warns (or raises when strict) if `why` is given."""
  if isinstance(v, Dense):
    return adapters_lib.merged_leaf(v.w, v.adapter)
  if not isinstance(v, LowRank):
    return v
  if why is not None:
    msg = f'lorax_jax: materializing W + dW for {v.path!r} at primitive {why}.'
    if ctx is not None and ctx.strict:
      raise MaterializeError(msg + ' (strict mode)')
    warnings.warn(msg, MaterializeWarning, stacklevel=3)
  dw = layout.product(v.a, v.b, v.kinds, v.w.dtype)
  w = v.w + (v.scale * dw).astype(v.w.dtype)
  if v.g is not None:
    w = (w * v.g[..., 0]).astype(v.w.dtype)
  return w


def _is_special(x) -> bool:
  return isinstance(x, (LowRank, Dense))


def _bind(eqn, invals):
  # `get_bind_params` returns `(subfuns, params)` up to JAX 0.8 and `params` since.
  got = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = got if isinstance(got, tuple) else ((), got)
  return eqn.primitive.bind(*subfuns, *invals, **params)


def _bind_on_w(eqn, v: LowRank):
  return _bind(eqn, [v.w])


def _add_scaled(y, d, scale: float):
  return y + (d if scale == 1.0 else scale * d).astype(y.dtype)


def _scale_at(y, v: LowRank, positions):
  """y * g, with g's non-in axes (W order) placed at `positions` of y; computed in g's dtype."""
  if v.g is None:
    return y
  g = layout.squeeze_in(v.g, v.kinds)
  order = np.argsort(positions)
  g = jax.lax.broadcast_in_dim(jnp.transpose(g, order), y.shape,
                               tuple(int(positions[q]) for q in order))
  return (y * g).astype(y.dtype)


def _dropout(x, rate: float, ctx: _Ctx):
  key = ctx.next_key() if rate > 0 else None
  if key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rules for primitives that consume or move an adapted kernel. Each returns a list of outputs, or
# None to fall back to materializing.


def _dot_general(eqn, invals, ctx):
  lhs, rhs = invals
  if isinstance(lhs, LowRank) and isinstance(rhs, LowRank):
    return None
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  on_left = isinstance(lhs, LowRank)
  v, x = (lhs, rhs) if on_left else (rhs, lhs)
  vc, xc = (lc, rc) if on_left else (rc, lc)
  vb, xb = (lb, rb) if on_left else (rb, lb)
  kinds = v.kinds
  contracted = {kinds[d] for d in vc}
  if len(contracted) != 1 or contracted == {'b'}:
    return None
  cg = contracted.pop()   # the contracted group
  f = 'o' if cg == 'i' else 'i'
  if sorted(vc) != [d for d, k in enumerate(kinds) if k == cg]:
    return None
  if sorted(vb) != [d for d, k in enumerate(kinds) if k == 'b']:
    return None
  precision = eqn.params.get('precision')
  pet = eqn.params.get('preferred_element_type')
  n = len(kinds)
  not_in = [d for d in range(n) if kinds[d] != 'i']
  if cg == 'o' and v.g is not None:
    # The output units are contracted (a tied embedding as a head): scale x on those axes.
    x = _scale_at(x, v, [xb[list(vb).index(d)] if d in vb else xc[list(vc).index(d)]
                         for d in not_in])
  y = _bind(eqn, [v.w, x] if on_left else [x, v.w])
  dtype = v.w.dtype
  ag, af = (v.a, v.b) if cg == 'i' else (v.b, v.a)
  f_axes = tuple(d for d in range(n) if kinds[d] == f)
  g_axes = tuple(d for d in range(n) if kinds[d] == cg)
  ag = jnp.squeeze(ag, f_axes).astype(dtype)      # non-F axes in W order, r
  af = jnp.squeeze(af, g_axes).astype(dtype)      # non-G axes in W order, r
  pos_g = [d for d in range(n) if d not in f_axes]
  pos_f = [d for d in range(n) if d not in g_axes]
  x = _dropout(x, v.dropout, ctx)
  nb = len(vb)
  if not on_left:
    t = jax.lax.dot_general(
        x, ag, ((xc, [pos_g.index(d) for d in vc]), (xb, [pos_g.index(d) for d in vb])),
        precision=precision, preferred_element_type=pet).astype(dtype)
    d = jax.lax.dot_general(
        t, af, (([t.ndim - 1], [af.ndim - 1]), (list(range(nb)), [pos_f.index(d) for d in vb])),
        precision=precision, preferred_element_type=pet)
  else:
    t = jax.lax.dot_general(
        ag, x, (([pos_g.index(d) for d in vc], xc), ([pos_g.index(d) for d in vb], xb)),
        precision=precision, preferred_element_type=pet).astype(dtype)
    d = jax.lax.dot_general(
        af, t, (([af.ndim - 1], [nb]), ([pos_f.index(d) for d in vb], list(range(nb)))),
        precision=precision, preferred_element_type=pet)
  out = _add_scaled(y, d, v.scale)
  if cg == 'i' and v.g is not None:
    x_free = x.ndim - len(xc) - nb
    w_free = [q for q in range(n) if q not in vc and q not in vb]
    start = nb if on_left else nb + x_free
    out = _scale_at(out, v, [list(vb).index(q) if q in vb else start + w_free.index(q)
                             for q in not_in])
  return [out]


def _conv(eqn, invals, ctx):
  x, v = invals
  if isinstance(x, LowRank) or not isinstance(v, LowRank):
    return None
  p = eqn.params
  if p['feature_group_count'] != 1 or p['batch_group_count'] != 1:
    return None
  dn = p['dimension_numbers']
  o, i = dn.rhs_spec[0], dn.rhs_spec[1]
  kinds = v.kinds
  if kinds[o] != 'o' or any(k != 'i' for d, k in enumerate(kinds) if d != o):
    return None
  y = _bind(eqn, [x, v.w])
  dtype = v.w.dtype
  a_k = jnp.swapaxes(v.a, o, -1)[..., 0].astype(dtype)   # out-feature position holds r
  b_k = jnp.swapaxes(v.b, i, -1)[..., 0].astype(dtype)   # in-feature position holds r; 1x1
  nsp = len(dn.rhs_spec) - 2
  x = _dropout(x, v.dropout, ctx)
  common = dict(dimension_numbers=dn, precision=p.get('precision'),
                preferred_element_type=p.get('preferred_element_type'))
  t = jax.lax.conv_general_dilated(x, a_k, p['window_strides'], p['padding'], p['lhs_dilation'],
                                   p['rhs_dilation'], **common).astype(dtype)
  d = jax.lax.conv_general_dilated(t, b_k, (1,) * nsp, [(0, 0)] * nsp, (1,) * nsp, (1,) * nsp,
                                   **common)
  return [_scale_at(_add_scaled(y, d, v.scale), v, [dn.out_spec[1]])]


def _gather(eqn, invals, ctx):
  v, idx = invals
  if not isinstance(v, LowRank) or isinstance(idx, LowRank):
    return None
  p = eqn.params
  dn = p['dimension_numbers']
  kinds = v.kinds
  n = len(kinds)
  if dn.operand_batching_dims or 'b' in kinds:
    return None
  outs = [d for d in range(n) if kinds[d] == 'o']
  if any(d in dn.collapsed_slice_dims or d in dn.start_index_map or
         p['slice_sizes'][d] != v.w.shape[d] for d in outs):
    return None
  y = _bind(eqn, [v.w, idx])
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
  d = jax.lax.dot_general(ga, b_sq, (([ga.ndim - 1], [b_sq.ndim - 1]), ([], [])))
  order = [q for q in range(out_rank) if q not in o_pos] + o_pos
  d = jnp.transpose(d, np.argsort(order))
  return [_scale_at(_add_scaled(y, d, v.scale), v, o_pos)]


def _transpose(eqn, invals, ctx):
  (v,) = invals
  perm = tuple(eqn.params['permutation'])
  full = perm + (len(perm),)
  tr = lambda arr: jnp.transpose(arr, full)
  return [v.move(tr, tr, w=_bind_on_w(eqn, v), kinds=tuple(v.kinds[q] for q in perm))]


def _passthrough(eqn, invals, ctx):
  """Ops that change only W's dtype, placement or identity (cast, copy, sharding constraint)."""
  v = invals[0]
  if len(invals) != 1 or eqn.primitive.multiple_results:
    return None
  return [v.replace(w=_bind_on_w(eqn, v))]


def _reshape(eqn, invals, ctx):
  v = invals[0]
  if len(invals) != 1 or eqn.params.get('dimensions') is not None:
    return None
  new = tuple(eqn.params['new_sizes'])
  groups = layout.reshape_groups(v.w.shape, new)
  if groups is None:
    return None
  kinds = [None] * len(new)
  for gi, gj in groups:
    ks = {v.kinds[q] for q in gi if v.w.shape[q] != 1} or {v.kinds[gi[0]]}
    if len(ks) != 1:
      return None
    for q in gj:
      kinds[q] = next(iter(ks))
  return [_regroup(eqn, v, kinds, new)]


def _regroup(eqn, v: LowRank, kinds, shape) -> LowRank:
  """W reshaped to `shape` (axis kinds `kinds`); the factors follow with 1 on unspanned axes."""
  fa = lambda arr: arr.reshape(
      tuple(1 if k == 'o' else s for k, s in zip(kinds, shape)) + (arr.shape[-1],))
  fb = lambda arr: arr.reshape(
      tuple(1 if k == 'i' else s for k, s in zip(kinds, shape)) + (arr.shape[-1],))
  return v.move(fa, fb, w=_bind_on_w(eqn, v), kinds=tuple(kinds))


def _broadcast_in_dim(eqn, invals, ctx):
  """Only the unit-axis insertions of `expand_dims` / `w[None]`; real broadcasts materialize."""
  v = invals[0]
  if len(invals) != 1:
    return None
  shape, dims = tuple(eqn.params['shape']), tuple(eqn.params['broadcast_dimensions'])
  if list(dims) != sorted(dims) or tuple(shape[d] for d in dims) != v.w.shape or any(
      shape[q] != 1 for q in range(len(shape)) if q not in dims):
    return None
  kinds, last = [], None
  for q in range(len(shape)):
    if q in dims:
      last = v.kinds[dims.index(q)]
    kinds.append(last)
  first = v.kinds[0]
  kinds = [k or first for k in kinds]
  return [_regroup(eqn, v, kinds, shape)]


def _drop_unit_axes(eqn, v: LowRank, axes):
  kinds = tuple(k for d, k in enumerate(v.kinds) if d not in axes)
  if 'i' not in kinds or 'o' not in kinds:
    return None
  sq = lambda arr: jnp.squeeze(arr, axes)
  return [v.move(sq, sq, w=_bind_on_w(eqn, v), kinds=kinds)]


def _squeeze(eqn, invals, ctx):
  (v,) = invals
  return _drop_unit_axes(eqn, v, tuple(d % v.w.ndim for d in eqn.params['dimensions']))


def _reduce_sum(eqn, invals, ctx):
  """Summing over unit axes (what einsum does with a size-1 label) is a squeeze."""
  (v,) = invals
  axes = tuple(d % v.w.ndim for d in eqn.params['axes'])
  if any(v.w.shape[d] != 1 for d in axes):
    return None
  return _drop_unit_axes(eqn, v, axes)


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

  return [v.move(lambda arr: sl(arr, 'o'), lambda arr: sl(arr, 'i'), w=_bind_on_w(eqn, v))]


def _dynamic_slice(eqn, invals, ctx):
  v, *starts = invals
  if any(_is_special(s) for s in starts):
    return None
  sizes = eqn.params['slice_sizes']
  zero = jnp.zeros((), jnp.asarray(starts[0]).dtype) if starts else 0

  def sl(arr, skip):
    st = [zero if k == skip else s for k, s in zip(v.kinds, starts)] + [zero]
    sz = tuple(1 if k == skip else s for k, s in zip(v.kinds, sizes)) + (arr.shape[-1],)
    return jax.lax.dynamic_slice(arr, st, sz)

  w = _bind(eqn, [v.w, *starts])
  return [v.move(lambda arr: sl(arr, 'o'), lambda arr: sl(arr, 'i'), w=w)]


def _materialize_outs(outs, ctx, why):
  return [_materialize(o, ctx, why) for o in outs]


def _inline(key):
  def rule(eqn, invals, ctx):
    closed = eqn.params[key]
    return _eval(closed.jaxpr, closed.consts, invals, ctx)
  return rule


def _remat(eqn, invals, ctx):
  jaxpr = eqn.params['jaxpr']
  name = eqn.primitive.name

  def body(*args):
    return _materialize_outs(_eval(jaxpr, [], list(args), ctx), ctx, name + ' output')

  kw = {}
  if 'policy' in eqn.params:
    kw['policy'] = eqn.params['policy']
  return jax.checkpoint(body, prevent_cse=eqn.params.get('prevent_cse', True), **kw)(*invals)


def _scan(eqn, invals, ctx):
  p = eqn.params
  closed = p['jaxpr']
  nc, ncar = p['num_consts'], p['num_carry']
  consts, carry, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
  carry = [_materialize(c, ctx, 'scan carry') for c in carry]
  packed, kinds = [], []
  for x in xs:
    if isinstance(x, LowRank) and x.kinds[0] == 'b':
      packed.append((x.w, x.a, x.b, x.g))
      kinds.append(x)
    else:
      packed.append(_materialize(x, ctx, 'scan xs (kernel not stacked on the scanned axis)'))
      kinds.append(None)
  keys = None
  if ctx.rng is not None:
    keys = jax.random.split(ctx.next_key(), p['length'])

  def body(c, xk):
    xs_in, key = xk
    xs_v = []
    for x, tmpl in zip(xs_in, kinds):
      if tmpl is None:
        xs_v.append(x)
      else:
        w, a, b, g = x
        xs_v.append(tmpl.replace(w=w, a=a, b=b, g=g, kinds=tmpl.kinds[1:]))
    sub = ctx.child(key)
    outs = _eval(closed.jaxpr, closed.consts, list(consts) + list(c) + xs_v, sub)
    outs = _materialize_outs(outs, ctx, 'scan output')
    return outs[:ncar], outs[ncar:]

  c, ys = jax.lax.scan(body, carry, (packed, keys), length=p['length'], reverse=p['reverse'],
                       unroll=p['unroll'])
  return list(c) + list(ys)


def _while(eqn, invals, ctx):
  p = eqn.params
  cn, bn = p['cond_nconsts'], p['body_nconsts']
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  init = [_materialize(c, ctx, 'while carry') for c in init]
  cj, bj = p['cond_jaxpr'], p['body_jaxpr']

  def cond(c):
    return _materialize(_eval(cj.jaxpr, cj.consts, list(cconsts) + list(c), ctx)[0], ctx, 'while')

  def body(c):
    outs = _eval(bj.jaxpr, bj.consts, list(bconsts) + list(c), ctx)
    return _materialize_outs(outs, ctx, 'while output')

  return list(jax.lax.while_loop(cond, body, list(init)))


def _cond(eqn, invals, ctx):
  index, *ops = invals
  branches = eqn.params['branches']

  def make(br):
    return lambda *args: _materialize_outs(_eval(br.jaxpr, br.consts, list(args), ctx), ctx,
                                           'cond output')

  return list(jax.lax.switch(index, [make(b) for b in branches], *ops))


_RULES: dict[str, Callable] = {
    'dot_general': _dot_general,
    'conv_general_dilated': _conv,
    'gather': _gather,
    'transpose': _transpose,
    'reshape': _reshape,
    'squeeze': _squeeze,
    'broadcast_in_dim': _broadcast_in_dim,
    'reduce_sum': _reduce_sum,
    'slice': _slice,
    'dynamic_slice': _dynamic_slice,
    'convert_element_type': _passthrough,
    'copy': _passthrough,
    'copy_p': _passthrough,
    'sharding_constraint': _passthrough,
    'pjit': _inline('jaxpr'),
    'jit': _inline('jaxpr'),
    'closed_call': _inline('call_jaxpr'),
    'core_call': _inline('call_jaxpr'),
    'remat': _remat,
    'remat2': _remat,
    'checkpoint': _remat,
    'scan': _scan,
    'while': _while,
    'cond': _cond,
}


def _literal_or(v, env):
  if isinstance(v, jex.core.Literal):
    return v.val
  return env[v]


def _eval(jaxpr, consts, args, ctx: _Ctx):
  env: dict[Any, Any] = {}
  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [_literal_or(v, env) for v in eqn.invars]
    outvals = None
    if any(_is_special(x) for x in invals):
      dense = [x for x in invals if isinstance(x, Dense)]
      rule = _RULES.get(eqn.primitive.name)
      if rule is not None and not dense:
        outvals = rule(eqn, invals, ctx)
      if outvals is None:
        invals = [_materialize(x, ctx, f'{eqn.primitive.name!r}') for x in invals]
    if outvals is None:
      outvals = _bind(eqn, invals)
      if not eqn.primitive.multiple_results:
        outvals = [outvals]
    for var, val in zip(eqn.outvars, outvals):
      env[var] = val  # dropped outputs (DropVar) are written but never read
  return [_literal_or(v, env) for v in jaxpr.outvars]


def _to_value(adapted: adapters_lib.Adapted, path: str):
  ad = adapted.adapter
  if isinstance(ad, variants.FullParams):
    return ad.value
  variant = variants.get(ad.spec.variant)
  f = None if variant.factored is None else variant.factored(adapted.w, ad)
  if f is None:
    return Dense(adapted.w, ad, path)
  kinds = ad.spec.kinds
  a, b = layout.to_broadcast(f.a, f.b, kinds)
  g = None if f.out_scale is None else layout.scale_to_broadcast(f.out_scale, kinds)
  return LowRank(adapted.w, a, b, kinds, float(f.scale), path, ad.spec.dropout, g)


def lora(fn: Callable, *, strict: bool | None = None) -> Callable:
  """Transforms `fn` to run on joined parameters without materializing W + dW.

  Args:
    fn: any JAX function (a linen `apply`, an NNX `merge`-and-call, plain jnp code).
    strict: raise `MaterializeError` instead of warning when an adapted kernel reaches an op
      with no factored rule. Defaults to the `LORAX_JAX_STRICT` environment variable.

  Returns:
    A function with `fn`'s signature plus an optional keyword `lora_rng`: a PRNG key that turns
    on LoRA dropout (training); without it dropout is off. Arguments may contain `Adapted`
    leaves from `join(params, adapters)`; non-array leaves (flags, strings) stay static.

  Each call traces `fn` (as `jax.make_jaxpr` does): call the result under `jax.jit`, or inside a
  jitted train step, so that this happens once per compilation.

  Example:
    >>> y = jax.jit(lora(model.apply))(join(params, adapters), x)     # doctest: +SKIP
  """

  @functools.wraps(fn)
  def wrapped(*args, lora_rng=None, **kwargs):
    ctx = _Ctx(_strict_default() if strict is None else strict, lora_rng)

    def replace(kp, leaf):
      if not isinstance(leaf, adapters_lib.Adapted):
        return None
      val = _to_value(leaf, paths.path_str(kp[2:]))
      return (leaf.w if _is_special(val) else val), val

    closed, vals, _, out_tree = usage.trace(fn, args, kwargs, is_leaf=adapters_lib.is_adapted,
                                            replace=replace)
    outs = _eval(closed.jaxpr, closed.consts, vals, ctx)
    outs = [_materialize(o, ctx, 'output of the function') for o in outs]
    return jax.tree_util.tree_unflatten(out_tree, outs)

  return wrapped
