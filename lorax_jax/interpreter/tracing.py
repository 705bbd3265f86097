"""Tracing a function with array leaves as inputs and everything else static."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from lorax_jax.quant import is_quantized


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def trace_input(w):
  """What a leaf is traced as: a quantized one as the float array it stands for."""
  if is_quantized(w):
    return jax.ShapeDtypeStruct(w.shape, w.dtype)
  return w


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
