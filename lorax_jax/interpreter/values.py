"""The values the interpreter carries for adapted kernels, its state, and materialization."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import layout
from lorax_jax import variants
from lorax_jax.interpreter import quantw
from lorax_jax.interpreter.quantw import QuantW


class MaterializeWarning(UserWarning):
  """W + dW was formed where a factored form was expected."""


class MaterializeError(ValueError):
  """Raised in strict mode instead of `MaterializeWarning`."""


def strict_default() -> bool:
  return os.environ.get('LORAX_JAX_STRICT', '0').lower() in ('1', 'true', 'yes')


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
  """An adapted kernel inside the interpreter: (w + scale * sum_r a * b) * g (broadcast layout).

  `g` (optional, B-like layout with r = 1) scales each output unit (DoRA's m / ||W + sAB||).
  `capture` marks a calibration probe (see `interpreter.capture`).

  A mixed-adapter batch (`lora(fn)(..., adapter_ids=ids)`) carries `n_adapters` adapters at once:
  a, b and g get a leading adapter axis (axis moves act on each adapter: vmapped), and `ids`
  (rows,) says which one each row of the layer's input uses (-1: none); the rules that consume
  W pick each row's factors. Until W moves, `canon` also holds the stacked factors as the
  adapter tree stores them, `(A, B)` in canonical layout with `canon_axes` = the kernel's
  (batch, in, out) axes, which the dense rule gathers rows from without any relayout.
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
  ids: Any = None
  n_adapters: int = dataclasses.field(metadata=dict(static=True), default=0)
  canon: Any = None
  canon_axes: tuple = dataclasses.field(metadata=dict(static=True), default=())

  def replace(self, **kw) -> 'LowRank':
    return dataclasses.replace(self, **kw)

  def move(self, fa, fb, **kw) -> 'LowRank':
    """Applies an axis move to the factors: `fa` to A, `fb` to B and to g (same layout)."""
    if self.n_adapters:
      fa, fb = jax.vmap(fa), jax.vmap(fb)
      kw = {'canon': None, 'canon_axes': (), **kw}
    g = None if self.g is None else fb(self.g)
    return dataclasses.replace(self, a=fa(self.a), b=fb(self.b), g=g, **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dense:
  """An adapted kernel of a variant without a factored form: dW is formed (allowed)."""
  w: jax.Array
  adapter: Any
  path: str = dataclasses.field(metadata=dict(static=True))


class Ctx:
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

  def child(self, rng, stats: Any = None) -> 'Ctx':
    return Ctx(self.strict, rng, stats)

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


def is_special(x) -> bool:
  return isinstance(x, (LowRank, Dense, QuantW))


def materialize(v, ctx: Ctx | None, why: str | None):
  """W + dW as a plain array; warns (or raises when strict) if `why` is given."""
  if isinstance(v, Dense):
    return variants.merged_leaf(v.w, v.adapter)
  if isinstance(v, QuantW):
    return v.force()
  if not isinstance(v, LowRank):
    return v
  if v.capture:   # a calibration probe: dW = 0, and this use of W is not captured
    return quantw.arr(v.w)
  if v.n_adapters:
    raise ValueError(f'adapter_ids: the kernel {v.path!r} reaches primitive {why or "(none)"}, '
                     'which has no mixed-adapter rule, and a mixed batch has no single W + dW to '
                     'form. Mixed-adapter batches run through dot_general (dense layers, '
                     'attention projections, einsums) and embedding gathers, with the rows of '
                     'the batch on the leading axis of the layer input.')
  if why is not None:
    msg = f'lorax_jax: materializing W + dW for {v.path!r} at primitive {why}.'
    if ctx is not None and ctx.strict:
      raise MaterializeError(msg + ' (strict mode)')
    warnings.warn(msg, MaterializeWarning, stacklevel=3)
  dw = layout.product(v.a, v.b, v.kinds, v.w.dtype)
  w = quantw.arr(v.w) + (v.scale * dw).astype(v.w.dtype)
  if v.g is not None:
    w = (w * v.g[..., 0]).astype(v.w.dtype)
  return w


def materialize_all(outs, ctx, why):
  return [materialize(o, ctx, why) for o in outs]


def scaled(t, scale: float):
  """`scale * t` in t's dtype. The factored rules scale the rank-r product (x @ A), the
  smallest array of the side path, not the layer's output, so that neither the forward nor
  the backward pass makes an extra pass over an output-sized array for it."""
  return t if scale == 1.0 else t * jnp.asarray(scale, t.dtype)


def add_side(y, d):
  """The layer's output plus its side path, in the output's dtype."""
  return y + d.astype(y.dtype)


def scale_at(y, v: LowRank, positions):
  """y * g, with g's non-in axes (W order) placed at `positions` of y; computed in g's dtype."""
  if v.g is None:
    return y
  g = layout.squeeze_in(v.g, v.kinds)
  order = np.argsort(positions)
  g = jax.lax.broadcast_in_dim(jnp.transpose(g, order), y.shape,
                               tuple(int(positions[q]) for q in order))
  return (y * g).astype(y.dtype)


def row_pick(v: LowRank):
  """Each row's adapter index, clipped into range (rows without one are masked separately)."""
  return jnp.where((v.ids >= 0) & (v.ids < v.n_adapters), v.ids, 0)


def row_select(v: LowRank, factor, fill=0.0):
  """Each row's slice of a mixed value's factor (leading axis: the adapters): shape
  (rows,) + factor.shape[1:]; rows without an adapter get `fill` (None: left as gathered)."""
  out = factor[row_pick(v)]
  if fill is None:
    return out
  valid = (v.ids >= 0) & (v.ids < v.n_adapters)
  mask = valid.reshape((-1,) + (1,) * (out.ndim - 1))
  return jnp.where(mask, out, jnp.asarray(fill, out.dtype))


def row_valid(v: LowRank, ndim: int, dtype):
  """1 for rows with an adapter, 0 for the others, shaped (rows,) + (1,) * (ndim - 1)."""
  valid = (v.ids >= 0) & (v.ids < v.n_adapters)
  return valid.astype(dtype).reshape((-1,) + (1,) * (ndim - 1))


def scale_rows_at(y, v: LowRank, positions, row_pos: int):
  """`scale_at` for a mixed value: each row (axis `row_pos` of y) scaled by its adapter's g."""
  if v.g is None:
    return y
  ins = tuple(1 + d for d, k in enumerate(v.kinds) if k == 'i')
  g = row_select(v, jnp.squeeze(v.g, ins + (v.g.ndim - 1,)), fill=1.0)   # rows, non-in axes
  pos = [row_pos] + list(positions)
  order = np.argsort(pos)
  g = jax.lax.broadcast_in_dim(jnp.transpose(g, order), y.shape, tuple(int(pos[q]) for q in order))
  return (y * g).astype(y.dtype)


def dropout(x, rate: float, ctx: Ctx):
  key = ctx.next_key() if rate > 0 else None
  if key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)
