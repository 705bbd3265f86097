"""Higher-order primitives (jit, calls, checkpoint, scan, while, cond): their bodies run through
the interpreter, re-traced with `jax.lax` / `jax.checkpoint`, when an adapted or quantized value
flows in (otherwise they are bound untouched).

A scan slices kernels stacked on its axis per step (a quantized one is dequantized inside the
body, one layer at a time); other adapted inputs of carries and loops are materialized.
Statistics of a calibration capture leave checkpoint and scan bodies as extra outputs; while and
cond bodies cannot return them.
"""

from __future__ import annotations

import jax

from lorax_jax import quant
from lorax_jax.interpreter import axes
from lorax_jax.interpreter import base
from lorax_jax.interpreter import compat
from lorax_jax.interpreter.engine import eval_jaxpr
from lorax_jax.interpreter.quantw import QuantW
from lorax_jax.interpreter.values import LowRank, materialize, materialize_all


def _inline(name):
  key = compat.CALL_JAXPR[name]

  def rule(eqn, invals, ctx):
    closed = eqn.params[key]
    return eval_jaxpr(closed.jaxpr, closed.consts, invals, ctx)

  return rule


def _checkpoint(eqn, invals, ctx):
  jaxpr = eqn.params['jaxpr']
  name = eqn.primitive.name

  def body(*args):
    saved, ctx.stats = ctx.stats, ctx.fresh()   # statistics leave the body as outputs
    try:
      outs = materialize_all(eval_jaxpr(jaxpr, [], list(args), ctx), ctx, name + ' output')
      stats = ctx.stats
    finally:
      ctx.stats = saved
    return outs, (stats or {})

  outs, stats = jax.checkpoint(body, **compat.remat_kwargs(eqn.params))(*invals)
  if stats:
    ctx.merge(stats)
  return outs


def _scan(eqn, invals, ctx):
  p = eqn.params
  closed = p['jaxpr']
  nc, ncar = p['num_consts'], p['num_carry']
  consts, carry, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
  carry = [materialize(c, ctx, 'scan carry (a carried kernel may change per step)') for c in carry]
  packed, kinds = [], []
  for x in xs:
    if isinstance(x, QuantW) and not x.ops and quant.scannable(x.q):
      packed.append(x.q)        # sliced per step: dequantized inside the body, one layer at a time
      kinds.append('quant')
    elif isinstance(x, LowRank) and x.kinds[0] == 'b' and not (
        isinstance(x.w, QuantW) and (x.w.ops or not quant.scannable(x.w.q))):
      pieces = (x.a, x.b, x.g, x.canon)
      if x.n_adapters:   # the adapter axis leads: slice the layer axis behind it
        pieces = jax.tree_util.tree_map(lambda arr: jax.numpy.moveaxis(arr, 1, 0), pieces)
      packed.append((x.w.q if isinstance(x.w, QuantW) else x.w,) + pieces)
      kinds.append(x)
    else:
      packed.append(materialize(x, ctx, 'scan xs (kernel not stacked on the scanned axis)'))
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
        w, a, b, g, canon = x
        if isinstance(w, quant.QuantizedArray):
          w = QuantW.of(quant.unstack(w))
        axes = tmpl.canon_axes
        if axes:   # the scanned axis is the kernel's first batch axis
          axes = tuple(tuple(d - 1 for d in group if d != 0) for group in axes)
        xs_v.append(tmpl.replace(w=w, a=a, b=b, g=g, kinds=tmpl.kinds[1:], canon=canon,
                                 canon_axes=axes))
    sub = ctx.child(key, ctx.fresh())
    outs = eval_jaxpr(closed.jaxpr, closed.consts, list(consts) + list(c) + xs_v, sub)
    outs = materialize_all(outs, ctx, 'scan output')
    return outs[:ncar], (outs[ncar:], sub.stats or {})

  c, (ys, stats) = jax.lax.scan(body, carry, (packed, keys), length=p['length'],
                                reverse=p['reverse'], unroll=p['unroll'])
  if stats:
    sliced = {t.path for t in kinds if isinstance(t, LowRank)}
    ctx.merge(stats, reduce_axis0=True, keep=sliced)
  return list(c) + list(ys)


def _scan_axes(eqn, ins, usage):
  """An axis the scan iterates over is a batch (stacked) axis."""
  p = eqn.params
  body = p['jaxpr'].jaxpr
  n = p['num_consts'] + p['num_carry']
  tracks = []
  for k, t in enumerate(ins):
    if t is not None and k >= n:
      path, ax = t
      usage.scanned.setdefault(path, set()).update(ax[0])
      t = (path, ax[1:])
    tracks.append(t)
  usage.walk_into(body, tracks)
  return None


def _while(eqn, invals, ctx):
  p = eqn.params
  cn, bn = p['cond_nconsts'], p['body_nconsts']
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  init = [materialize(c, ctx, 'while carry (a carried kernel may change per step)') for c in init]
  cj, bj = p['cond_jaxpr'], p['body_jaxpr']
  if ctx.stats is not None:   # a calibration capture: statistics cannot leave these bodies
    ctx = ctx.child(ctx.rng, False)

  def cond(c):
    return materialize(eval_jaxpr(cj.jaxpr, cj.consts, list(cconsts) + list(c), ctx)[0], ctx,
                       'while')

  def body(c):
    outs = eval_jaxpr(bj.jaxpr, bj.consts, list(bconsts) + list(c), ctx)
    return materialize_all(outs, ctx, 'while output')

  return list(jax.lax.while_loop(cond, body, list(init)))


def _while_axes(eqn, ins, usage):
  p = eqn.params
  cn, bn = p['cond_nconsts'], p['body_nconsts']
  usage.walk_into(p['cond_jaxpr'].jaxpr, ins[:cn] + ins[cn + bn:])
  usage.walk_into(p['body_jaxpr'].jaxpr, ins[cn:cn + bn] + ins[cn + bn:])
  return None


def _cond(eqn, invals, ctx):
  index, *ops = invals
  branches = eqn.params['branches']
  if ctx.stats is not None:   # a calibration capture: statistics cannot leave these bodies
    ctx = ctx.child(ctx.rng, False)

  def make(br):
    return lambda *args: materialize_all(eval_jaxpr(br.jaxpr, br.consts, list(args), ctx), ctx,
                                         'cond output (a kernel returned by a branch)')

  return list(jax.lax.switch(index, [make(b) for b in branches], *ops))


def _cond_axes(eqn, ins, usage):
  for br in eqn.params['branches']:
    usage.walk_into(br.jaxpr, ins[1:])
  return None


_R = base.PrimitiveRule
for _rule in (
    _R('jit', factored=_inline('jit'), higher_order=True, infer=axes.call),
    _R('closed_call', factored=_inline('closed_call'), higher_order=True, infer=axes.call),
    _R('checkpoint', factored=_checkpoint, higher_order=True, infer=axes.call),
    _R('scan', factored=_scan, higher_order=True, infer=_scan_axes),
    _R('while', factored=_while, higher_order=True, infer=_while_axes),
    _R('cond', factored=_cond, higher_order=True, infer=_cond_axes),
):
  base.register(_rule)
