"""Tracing helpers and inference of a kernel's in/out/batch axes from how a function uses it.

`infer_axes(fn, params, *args)` traces `fn(params, *args)` and follows every parameter leaf
through axis-moving ops (transpose, reshape, casts, slices) and into nested jaxprs (jit, remat,
scan, cond, while) up to its first consumer: the axes a `dot_general` contracts are in-axes and
its free axes out-axes; a conv's output-feature axis is the out-axis; an embedding gather's
indexed axis is the in-axis; an axis that `scan` iterates over is a batch (stacked) axis.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.extend as jex
import numpy as np

from lorax_jax import layout
from lorax_jax import paths
from lorax_jax.quant import is_quantized


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def trace(fn: Callable, args: tuple, kwargs: dict, is_leaf=None, replace=None):
  """Traces `fn(*args, **kwargs)` with array leaves as inputs and everything else static.

  Args:
    fn: the function.
    args, kwargs: its arguments.
    is_leaf: passed to `tree_flatten_with_path`.
    replace: optional `(keypath, leaf) -> (trace_input, value)`; a leaf it maps to non-None is an
      input traced as `trace_input` and later evaluated as `value`. `QuantizedArray` leaves are
      leaves, traced as their float shape and dtype.

  Returns:
    `(closed_jaxpr, input_values, input_keypaths, out_treedef)`.
  """
  leaf_fn = is_quantized if is_leaf is None else (lambda x: is_quantized(x) or is_leaf(x))
  leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=leaf_fn)
  leaves_only = [l for _, l in leaves]
  pos, ins, vals, kps = [], [], [], []
  for i, (kp, leaf) in enumerate(leaves):
    got = replace(kp, leaf) if replace is not None else None
    if got is not None:
      t, v = got
    elif is_quantized(leaf):   # a quantized base leaf is traced as the float array it stands for
      t, v = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), leaf
    elif _is_array(leaf):
      t, v = leaf, leaf
    else:
      continue
    pos.append(i)
    ins.append(t)
    vals.append(v)
    kps.append(kp)

  def flat_fn(*dyn):
    full = list(leaves_only)
    for p, val in zip(pos, dyn):
      full[p] = val
    a, k = jax.tree_util.tree_unflatten(treedef, full)
    return fn(*a, **k)

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*ins)
  return closed, vals, kps, jax.tree_util.tree_structure(out_shape)


class _Usage:

  def __init__(self):
    self.first: dict[str, tuple[set, set, set]] = {}
    self.scanned: dict[str, set] = {}

  def record(self, path, batch, ins, outs):
    if path not in self.first:
      self.first[path] = (set(batch), set(ins), set(outs))


def _origins(axes, dims):
  out = set()
  for d in dims:
    out |= set(axes[d])
  return out


def _reshape_axes(axes, old, new):
  groups = layout.reshape_groups(old, new)
  if groups is None:
    return None
  out = [None] * len(new)
  for gi, gj in groups:
    u = tuple(sorted(_origins(axes, gi)))
    for q in gj:
      out[q] = u
  return tuple(out)


def _walk(jaxpr, tracks: dict, usage: _Usage):
  for eqn in jaxpr.eqns:
    ins = [tracks.get(v) if not isinstance(v, jex.core.Literal) else None for v in eqn.invars]
    if not any(t is not None for t in ins):
      continue
    name = eqn.primitive.name
    p = eqn.params
    out_track = None
    if name == 'dot_general':
      (lc, rc), (lb, rb) = p['dimension_numbers']
      for t, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
        if t is not None:
          path, axes = t
          free = [d for d in range(len(axes)) if d not in c and d not in b]
          usage.record(path, _origins(axes, b), _origins(axes, c), _origins(axes, free))
    elif name == 'conv_general_dilated' and ins[1] is not None:
      path, axes = ins[1]
      o = p['dimension_numbers'].rhs_spec[0]
      usage.record(path, set(), _origins(axes, [d for d in range(len(axes)) if d != o]),
                   _origins(axes, [o]))
    elif name == 'gather' and ins[0] is not None:
      path, axes = ins[0]
      dn = p['dimension_numbers']
      shape = eqn.invars[0].aval.shape
      indexed = [d for d in range(len(axes)) if d in dn.start_index_map or
                 d in dn.collapsed_slice_dims or p['slice_sizes'][d] != shape[d]]
      usage.record(path, set(), _origins(axes, indexed),
                   _origins(axes, [d for d in range(len(axes)) if d not in indexed]))
    elif name == 'transpose':
      path, axes = ins[0]
      out_track = (path, tuple(axes[q] for q in p['permutation']))
    elif name in ('convert_element_type', 'copy', 'copy_p', 'sharding_constraint', 'slice',
                  'dynamic_slice') and ins[0] is not None:
      out_track = ins[0]
    elif name == 'reshape' and p.get('dimensions') is None:
      path, axes = ins[0]
      new = _reshape_axes(axes, eqn.invars[0].aval.shape, p['new_sizes'])
      out_track = (path, new) if new is not None else None
    elif name == 'squeeze':
      path, axes = ins[0]
      dims = {d % len(axes) for d in p['dimensions']}
      out_track = (path, tuple(a for d, a in enumerate(axes) if d not in dims))
    elif name == 'scan':
      body = p['jaxpr'].jaxpr
      n = p['num_consts'] + p['num_carry']
      sub = {}
      for k, (v, t) in enumerate(zip(body.invars, ins)):
        if t is None:
          continue
        path, axes = t
        if k >= n:
          usage.scanned.setdefault(path, set()).update(axes[0])
          t = (path, axes[1:])
        sub[v] = t
      _walk(body, sub, usage)
    elif name == 'while':
      cn, bn = p['cond_nconsts'], p['body_nconsts']
      cin = ins[:cn] + ins[cn + bn:]
      bin_ = ins[cn:cn + bn] + ins[cn + bn:]
      for sub_jaxpr, sub_ins in ((p['cond_jaxpr'].jaxpr, cin), (p['body_jaxpr'].jaxpr, bin_)):
        _walk(sub_jaxpr, {v: t for v, t in zip(sub_jaxpr.invars, sub_ins) if t is not None},
              usage)
    elif name == 'cond':
      for br in p['branches']:
        _walk(br.jaxpr, {v: t for v, t in zip(br.jaxpr.invars, ins[1:]) if t is not None}, usage)
    else:
      subs = _sub_jaxprs(p)
      if len(subs) >= 1 and len(subs[0].invars) == len(ins):
        sub = subs[0]
        _walk(sub, {v: t for v, t in zip(sub.invars, ins) if t is not None}, usage)
    if out_track is not None and out_track[1] is not None and len(eqn.outvars) == 1:
      tracks[eqn.outvars[0]] = out_track


def _sub_jaxprs(params) -> list:
  """Jaxprs nested in an equation's params (`jax.extend.core.jaxprs_in_params` is newer than
  the oldest JAX supported)."""
  out = []
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jex.core.ClosedJaxpr):
        out.append(x.jaxpr)
      elif isinstance(x, jex.core.Jaxpr):
        out.append(x)
  return out


def infer_axes(fn: Callable, params: Any, *args, **kwargs
               ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
  """Infers `{path: (batch_axes, in_axes, out_axes)}` from how `fn(params, *args)` uses leaves.

  Leaves that `fn` does not feed to a dot, conv or gather (biases, norms) are left out.
  """
  leaf_paths = {}
  closed, _, kps, _ = trace(fn, (params,) + tuple(args), kwargs)
  tracks = {}
  for var, kp in zip(closed.jaxpr.invars, kps):
    if len(kp) > 1 and kp[0] == jax.tree_util.SequenceKey(0) and kp[1] == (
        jax.tree_util.SequenceKey(0)):
      path = paths.path_str(kp[2:])
      leaf_paths[path] = var
      tracks[var] = (path, tuple((d,) for d in range(len(var.aval.shape))))
  usage = _Usage()
  _walk(closed.jaxpr, tracks, usage)
  out = {}
  for path, (batch, ins, outs) in usage.first.items():
    ndim = len(leaf_paths[path].aval.shape)
    batch = batch | usage.scanned.get(path, set())
    batch |= set(range(ndim)) - ins - outs - batch
    if ins & outs or batch & (ins | outs) or not ins or not outs:
      continue
    out[path] = (tuple(sorted(batch)), tuple(sorted(ins)), tuple(sorted(outs)))
  return out
