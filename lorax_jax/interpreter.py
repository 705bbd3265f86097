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
otherwise. A quantized base leaf (`lorax_jax.quant.QuantizedArray`, adapted or not) is a
`QuantW`: ops that only move its axes are recorded, and it is dequantized (to the dtype the
function expects) by the op that consumes it, inside a scanned layer's body for stacked kernels,
so the float weight exists only as a temporary of that op. Anything else materializes W + dW
with a `MaterializeWarning` naming the primitive and the path; `strict=True` (or the
environment variable `LORAX_JAX_STRICT=1`) raises instead.

Primitive names and parameters drift between JAX releases; they are all in this module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from typing import Any, Callable

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from lorax_jax import joined
from lorax_jax import layout
from lorax_jax import paths
from lorax_jax import quant
from lorax_jax import usage
from lorax_jax import variants


class MaterializeWarning(UserWarning):
  """W + dW was formed where a factored form was expected."""


class MaterializeError(ValueError):
  """Raised in strict mode instead of `MaterializeWarning`."""


def _strict_default() -> bool:
  return os.environ.get('LORAX_JAX_STRICT', '0').lower() in ('1', 'true', 'yes')


class _Ops(tuple):
  """Recorded equations (static pytree metadata, compared by identity)."""
  __hash__ = object.__hash__

  def __eq__(self, other):
    return self is other


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantW:
  """A quantized base leaf: dequantized where consumed, after the recorded axis moves `ops`."""
  q: quant.QuantizedArray
  ops: _Ops = dataclasses.field(metadata=dict(static=True), default=_Ops())
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
  dtype_name: str = dataclasses.field(metadata=dict(static=True), default='float32')

  @classmethod
  def of(cls, q: quant.QuantizedArray) -> 'QuantW':
    return cls(q, _Ops(), tuple(q.shape), q.dtype_name)

  @property
  def dtype(self):
    return jnp.dtype(self.dtype_name)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def then(self, eqn) -> 'QuantW':
    aval = eqn.outvars[0].aval
    return QuantW(self.q, _Ops(self.ops + (eqn,)), tuple(aval.shape), jnp.dtype(aval.dtype).name)

  def force(self) -> jax.Array:
    x = quant.dequantize_array(self.q)
    for eqn in self.ops:
      x = _bind(eqn, [x])
    return x


def _arr(w):
  """A base weight as an array (dequantizing a `QuantW`)."""
  return w.force() if isinstance(w, QuantW) else w


def _bind_quant(eqn, invals):
  """Binds `eqn` with its `QuantW` operands dequantized inside a `jax.checkpoint`.

  The backward pass then dequantizes again (as QLoRA's kernels do) instead of keeping the float
  weight alive from the forward pass: only the codes are residuals.
  """
  pos = [i for i, x in enumerate(invals) if isinstance(x, QuantW)]
  if not pos:
    return _bind(eqn, invals)
  arrays = [i for i, x in enumerate(invals) if i not in pos and isinstance(x, (jax.Array,
                                                                                np.ndarray))]

  def f(qs, xs):
    vals = list(invals)
    for i, q in zip(pos, qs):
      vals[i] = dataclasses.replace(invals[i], q=q).force()
    for i, x in zip(arrays, xs):
      vals[i] = x
    return _bind(eqn, vals)

  return jax.checkpoint(f)([invals[i].q for i in pos], [invals[i] for i in arrays])


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
  capture: bool = dataclasses.field(metadata=dict(static=True), default=False)

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
  """Interpreter state: strictness, the dropout key stream and captured layer-input statistics.

  `stats` is None when no capture runs, a dict `{path: (gram, sum, count)}` when it does, and
  `False` inside bodies that cannot return statistics (while, cond).
  """

  def __init__(self, strict: bool, rng: jax.Array | None, stats: Any = None):
    self.strict = strict
    self.rng = rng
    self.counter = 0
    self.stats = stats

  def next_key(self) -> jax.Array | None:
    if self.rng is None:
      return None
    self.counter += 1
    return jax.random.fold_in(self.rng, self.counter)

  def child(self, rng, stats: Any = None) -> '_Ctx':
    return _Ctx(self.strict, rng, stats)

  def fresh(self) -> Any:
    """The `stats` of a child whose statistics are returned through a traced body."""
    return None if self.stats is None else ({} if self.stats is not False else False)

  def record(self, path: str, stats) -> None:
    if self.stats is False:
      raise ValueError(f'Calibration cannot capture the inputs of {path!r} inside a '
                       'lax.while_loop or lax.cond body; unroll the loop or use lax.scan.')
    old = self.stats.get(path)
    self.stats[path] = stats if old is None else jax.tree_util.tree_map(jnp.add, old, stats)

  def merge(self, stats: dict, reduce_axis0: bool = False, keep=()) -> None:
    """Adds statistics returned from a body (stacked over a scan's steps on axis 0: summed,
    except for `keep` paths, whose kernels the scan slices per step)."""
    for path, st in stats.items():
      if reduce_axis0 and path not in keep:
        st = jax.tree_util.tree_map(lambda x: x.sum(0), st)
      self.record(path, st)


def _materialize(v, ctx: _Ctx | None, why: str | None):
  """W + dW as a plain array; warns (or raises when strict) if `why` is given."""
  if isinstance(v, Dense):
    return variants.merged_leaf(v.w, v.adapter)
  if isinstance(v, QuantW):
    return v.force()
  if not isinstance(v, LowRank):
    return v
  if v.capture:   # a calibration probe: dW = 0, and this use of W is not captured
    return _arr(v.w)
  if why is not None:
    msg = f'lorax_jax: materializing W + dW for {v.path!r} at primitive {why}.'
    if ctx is not None and ctx.strict:
      raise MaterializeError(msg + ' (strict mode)')
    warnings.warn(msg, MaterializeWarning, stacklevel=3)
  dw = layout.product(v.a, v.b, v.kinds, v.w.dtype)
  w = _arr(v.w) + (v.scale * dw).astype(v.w.dtype)
  if v.g is not None:
    w = (w * v.g[..., 0]).astype(v.w.dtype)
  return w


def _is_special(x) -> bool:
  return isinstance(x, (LowRank, Dense, QuantW))


def _bind(eqn, invals):
  # `get_bind_params` returns `(subfuns, params)` up to JAX 0.8 and `params` since.
  got = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = got if isinstance(got, tuple) else ((), got)
  return eqn.primitive.bind(*subfuns, *invals, **params)


def _bind_on_w(eqn, v: LowRank):
  if isinstance(v.w, QuantW):
    return v.w.then(eqn)
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
  if v.capture:
    return _capture_dot(eqn, v, x, on_left, vc, xc, vb, xb, ctx) if cg == 'i' else None
  precision = eqn.params.get('precision')
  pet = eqn.params.get('preferred_element_type')
  n = len(kinds)
  not_in = [d for d in range(n) if kinds[d] != 'i']
  if cg == 'o' and v.g is not None:
    # The output units are contracted (a tied embedding as a head): scale x on those axes.
    x = _scale_at(x, v, [xb[list(vb).index(d)] if d in vb else xc[list(vc).index(d)]
                         for d in not_in])
  y = _bind_quant(eqn, [v.w, x] if on_left else [x, v.w])
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


def _capture_dot(eqn, v: LowRank, x, on_left, vc, xc, vb, xb, ctx):
  """A calibration probe: y = x @ W, and the statistics of x in the kernel's canonical in-order.

  The probe's A is the identity over the canonical (flattened) in-axes, so x @ A is x with its
  contracted axes flattened as the spec orders them, whatever moves W went through.
  """
  n = len(v.kinds)
  y = _bind_quant(eqn, [v.w, x] if on_left else [x, v.w])
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


def _conv(eqn, invals, ctx):
  x, v = invals
  if isinstance(x, LowRank) or not isinstance(v, LowRank) or v.capture:
    return None
  p = eqn.params
  if p['feature_group_count'] != 1 or p['batch_group_count'] != 1:
    return None
  dn = p['dimension_numbers']
  o, i = dn.rhs_spec[0], dn.rhs_spec[1]
  kinds = v.kinds
  if kinds[o] != 'o' or any(k != 'i' for d, k in enumerate(kinds) if d != o):
    return None
  y = _bind_quant(eqn, [x, v.w])
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
  if not isinstance(v, LowRank) or isinstance(idx, LowRank) or v.capture:
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
  y = _bind_quant(eqn, [v.w, idx])
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

  w = _dynamic_slice_w(eqn, v.w, starts)
  return [v.move(lambda arr: sl(arr, 'o'), lambda arr: sl(arr, 'i'), w=w)]


def _dynamic_slice_w(eqn, w, starts):
  if isinstance(w, QuantW):
    if not w.ops:
      got = quant.slice_leading(w.q, starts, eqn.params['slice_sizes'], dynamic=True)
      if got is not None:
        return QuantW.of(got)
    w = w.force()
  return _bind(eqn, [w, *starts])


# Ops that only move, cast or annotate a weight: recorded on a `QuantW` until it is consumed.
_MOVES = ('transpose', 'reshape', 'squeeze', 'broadcast_in_dim', 'convert_element_type', 'copy',
          'copy_p', 'sharding_constraint', 'slice', 'reduce_sum', 'expand_dims')


def _quant_rule(eqn, invals, ctx):
  """A bare quantized leaf: record moves, slice leading axes, dequantize for anything else."""
  del ctx
  name = eqn.primitive.name
  if name in _MOVES and len(invals) == 1:
    v = invals[0]
    if name == 'slice' and not v.ops:
      p = eqn.params
      if p['strides'] is None or all(st == 1 for st in p['strides']):
        sizes = [hi - lo for lo, hi in zip(p['start_indices'], p['limit_indices'])]
        got = quant.slice_leading(v.q, p['start_indices'], sizes, dynamic=False)
        if got is not None:
          return [QuantW.of(got)]
    return [v.then(eqn)]
  if name == 'dynamic_slice' and isinstance(invals[0], QuantW) and not any(
      _is_special(x) for x in invals[1:]):
    return [_dynamic_slice_w(eqn, invals[0], invals[1:])]
  return None


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
    saved, ctx.stats = ctx.stats, ctx.fresh()   # statistics leave the body as outputs
    try:
      outs = _materialize_outs(_eval(jaxpr, [], list(args), ctx), ctx, name + ' output')
      stats = ctx.stats
    finally:
      ctx.stats = saved
    return outs, (stats or {})

  kw = {}
  if 'policy' in eqn.params:
    kw['policy'] = eqn.params['policy']
  outs, stats = jax.checkpoint(body, prevent_cse=eqn.params.get('prevent_cse', True),
                               **kw)(*invals)
  if stats:
    ctx.merge(stats)
  return outs


def _scan(eqn, invals, ctx):
  p = eqn.params
  closed = p['jaxpr']
  nc, ncar = p['num_consts'], p['num_carry']
  consts, carry, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
  carry = [_materialize(c, ctx, 'scan carry') for c in carry]
  packed, kinds = [], []
  for x in xs:
    if isinstance(x, QuantW) and not x.ops and quant.scannable(x.q):
      packed.append(x.q)        # sliced per step: dequantized inside the body, one layer at a time
      kinds.append('quant')
    elif isinstance(x, LowRank) and x.kinds[0] == 'b' and not (
        isinstance(x.w, QuantW) and (x.w.ops or not quant.scannable(x.w.q))):
      packed.append((x.w.q if isinstance(x.w, QuantW) else x.w, x.a, x.b, x.g))
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
      elif isinstance(tmpl, str):   # a bare quantized leaf
        xs_v.append(QuantW.of(quant.unstack(x)))
      else:
        w, a, b, g = x
        if isinstance(w, quant.QuantizedArray):
          w = QuantW.of(quant.unstack(w))
        xs_v.append(tmpl.replace(w=w, a=a, b=b, g=g, kinds=tmpl.kinds[1:]))
    sub = ctx.child(key, ctx.fresh())
    outs = _eval(closed.jaxpr, closed.consts, list(consts) + list(c) + xs_v, sub)
    outs = _materialize_outs(outs, ctx, 'scan output')
    return outs[:ncar], (outs[ncar:], sub.stats or {})

  c, (ys, stats) = jax.lax.scan(body, carry, (packed, keys), length=p['length'],
                                reverse=p['reverse'], unroll=p['unroll'])
  if stats:
    sliced = {t.path for t in kinds if isinstance(t, LowRank)}
    ctx.merge(stats, reduce_axis0=True, keep=sliced)
  return list(c) + list(ys)


def _while(eqn, invals, ctx):
  p = eqn.params
  cn, bn = p['cond_nconsts'], p['body_nconsts']
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  init = [_materialize(c, ctx, 'while carry') for c in init]
  cj, bj = p['cond_jaxpr'], p['body_jaxpr']
  if ctx.stats is not None:   # a calibration capture: statistics cannot leave these bodies
    ctx = ctx.child(ctx.rng, False)

  def cond(c):
    return _materialize(_eval(cj.jaxpr, cj.consts, list(cconsts) + list(c), ctx)[0], ctx, 'while')

  def body(c):
    outs = _eval(bj.jaxpr, bj.consts, list(bconsts) + list(c), ctx)
    return _materialize_outs(outs, ctx, 'while output')

  return list(jax.lax.while_loop(cond, body, list(init)))


def _cond(eqn, invals, ctx):
  index, *ops = invals
  branches = eqn.params['branches']
  if ctx.stats is not None:   # a calibration capture: statistics cannot leave these bodies
    ctx = ctx.child(ctx.rng, False)

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


# Higher-order primitives: they take quantized leaves into their bodies as they are.
_STRUCTURAL = ('pjit', 'jit', 'closed_call', 'core_call', 'remat', 'remat2', 'checkpoint', 'scan',
               'while', 'cond')


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
      name = eqn.primitive.name
      rule = _RULES.get(name)
      if any(isinstance(x, QuantW) for x in invals) and name not in _STRUCTURAL:
        rule = _quant_rule
      if rule is not None and not dense:
        outvals = rule(eqn, invals, ctx)
      if outvals is None:
        invals = [x if isinstance(x, QuantW) else _materialize(x, ctx, f'{name!r}')
                  for x in invals]
    if outvals is None:
      outvals = _bind_quant(eqn, invals)
      if not eqn.primitive.multiple_results:
        outvals = [outvals]
    for var, val in zip(eqn.outvars, outvals):
      env[var] = val  # dropped outputs (DropVar) are written but never read
  return [_literal_or(v, env) for v in jaxpr.outvars]


def _to_value(adapted: joined.Adapted, path: str):
  ad = adapted.adapter
  if isinstance(ad, variants.FullParams):
    return ad.value
  variant = variants.get(ad.spec.variant)
  w = adapted.w
  qw = quant.is_quantized(w)
  f = None
  if variant.factored is not None:
    w_in = w
    if qw:   # dequantized only for variants whose factored form reads W (DoRA's norm)
      w_in = jax.ShapeDtypeStruct(w.shape, w.dtype)
      if _reads_w(variant, w_in, ad):
        w_in = quant.dequantize_array(w)
    f = variant.factored(w_in, ad)
  if f is None:
    return Dense(w, ad, path)
  kinds = ad.spec.kinds
  a, b = layout.to_broadcast(f.a, f.b, kinds)
  g = None if f.out_scale is None else layout.scale_to_broadcast(f.out_scale, kinds)
  return LowRank(QuantW.of(w) if qw else w, a, b, kinds, float(f.scale), path, ad.spec.dropout, g)


def _reads_w(variant, w_abstract, adapter) -> bool:
  """Whether `variant.factored` uses the values of W (traced on an abstract W to find out)."""
  jaxpr = jax.make_jaxpr(lambda w: variant.factored(w, adapter))(w_abstract).jaxpr
  v = jaxpr.invars[0]
  return any(any(x is v for x in e.invars) for e in jaxpr.eqns) or any(
      x is v for x in jaxpr.outvars)


def _is_input(x) -> bool:
  return joined.is_adapted(x) or quant.is_quantized(x)


def _trace_input(w):
  if quant.is_quantized(w):
    return jax.ShapeDtypeStruct(w.shape, w.dtype)
  return w


def lora(fn: Callable, *, strict: bool | None = None) -> Callable:
  """Transforms `fn` to run on joined parameters without materializing W + dW.

  Args:
    fn: any JAX function (a linen `apply`, an NNX `merge`-and-call, plain jnp code).
    strict: raise `MaterializeError` instead of warning when an adapted kernel reaches an op
      with no factored rule. Defaults to the `LORAX_JAX_STRICT` environment variable.

  Returns:
    A function with `fn`'s signature plus an optional keyword `lora_rng`: a PRNG key that turns
    on LoRA dropout (training); without it dropout is off. Arguments may contain `Adapted`
    leaves from `join(params, adapters)` and `QuantizedArray` leaves (a quantized base, adapted
    or not); non-array leaves (flags, strings) stay static.

  Each call traces `fn` (as `jax.make_jaxpr` does): call the result under `jax.jit`, or inside a
  jitted train step, so that this happens once per compilation.

  Example:
    >>> y = jax.jit(lora(model.apply))(join(params, adapters), x)     # doctest: +SKIP
  """

  @functools.wraps(fn)
  def wrapped(*args, lora_rng=None, **kwargs):
    ctx = _Ctx(_strict_default() if strict is None else strict, lora_rng)

    def replace(kp, leaf):
      if quant.is_quantized(leaf):
        return _trace_input(leaf), QuantW.of(leaf)
      if not isinstance(leaf, joined.Adapted):
        return None
      val = _to_value(leaf, paths.path_str(kp[2:]))
      return (_trace_input(leaf.w) if _is_special(val) else val), val

    closed, vals, _, out_tree = usage.trace(fn, args, kwargs, is_leaf=_is_input,
                                            replace=replace)
    outs = _eval(closed.jaxpr, closed.consts, vals, ctx)
    outs = [_materialize(o, ctx, 'output of the function') for o in outs]
    return jax.tree_util.tree_unflatten(out_tree, outs)

  return wrapped


def _probe(leaf, spec, path: str) -> LowRank:
  """A calibration probe for one kernel: A is the identity over its canonical in-axes, B empty."""
  d_in = math.prod(spec.in_shape)
  eye = jnp.eye(d_in, dtype=jnp.float32).reshape(spec.in_shape + (d_in,))
  a = jnp.broadcast_to(eye, spec.batch_shape + eye.shape)
  b = jnp.zeros(spec.batch_shape + (0,) + spec.out_shape, jnp.float32)
  a, b = layout.to_broadcast(a, b, spec.kinds)
  w = QuantW.of(leaf) if quant.is_quantized(leaf) else leaf
  return LowRank(w, a, b, spec.kinds, 0.0, path, 0.0, None, capture=True)


def capture_inputs(fn: Callable, specs: dict[str, Any]) -> Callable:
  """`fn(params, *args)` that also returns statistics of the inputs of selected kernels.

  Args:
    fn: a function of `(params, *args, **kwargs)` (a model's apply or a loss).
    specs: `{path: LeafSpec}` of the kernels whose inputs to capture.

  Returns:
    A function returning `(fn's output, {path: (gram, sum, count)})`: for every captured kernel,
    over all tokens that met it (every use, every scan step for shared kernels), the sums
    X^T X (batch + (d_in, d_in)) and X (batch + (d_in,)) and the token count (batch shape), with
    X's columns the kernel's flattened in-axes in spec order. Kernels used only by convs or
    embedding lookups get no entry.
  """

  def wrapped(params, *args, **kwargs):
    ctx = _Ctx(False, None, {})

    def replace(kp, leaf):
      path = paths.path_str(kp[2:])
      if kp and isinstance(kp[1], jax.tree_util.SequenceKey) and kp[1].idx == 0 and (
          path in specs):
        return _trace_input(leaf), _probe(leaf, specs[path], path)
      if quant.is_quantized(leaf):
        return _trace_input(leaf), QuantW.of(leaf)
      return None

    closed, vals, _, out_tree = usage.trace(fn, (params,) + tuple(args), kwargs,
                                            is_leaf=quant.is_quantized, replace=replace)
    outs = _eval(closed.jaxpr, closed.consts, vals, ctx)
    outs = [_materialize(o, ctx, None) for o in outs]
    return jax.tree_util.tree_unflatten(out_tree, outs), ctx.stats

  return wrapped
