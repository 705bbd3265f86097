"""Calibration capture: statistics of the inputs of selected kernels, by the interpreter.

Each captured kernel becomes a probe: a `LowRank` with `capture=True` whose A is the identity
over the kernel's canonical (flattened) in-axes and whose B is empty. The dot_general rule
computes the plain output and records the statistics of x @ A, which is x with its contracted
axes flattened in spec order whatever moves W went through; other consumers use W as it is.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lorax_jax import layout
from lorax_jax import paths
from lorax_jax import quant
from lorax_jax.interpreter import rules  # noqa: F401  (registers the built-in rules)
from lorax_jax.interpreter.engine import eval_jaxpr
from lorax_jax.interpreter.quantw import QuantW
from lorax_jax.interpreter.tracing import trace, trace_input
from lorax_jax.interpreter.values import Ctx, LowRank, materialize


def probe(leaf, spec, path: str) -> LowRank:
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
    ctx = Ctx(False, None, {})

    def replace(kp, leaf):
      path = paths.path_str(kp[2:])
      if kp and isinstance(kp[1], jax.tree_util.SequenceKey) and kp[1].idx == 0 and (
          path in specs):
        return trace_input(leaf), probe(leaf, specs[path], path)
      if quant.is_quantized(leaf):
        return trace_input(leaf), QuantW.of(leaf)
      return None

    closed, vals, _, out_tree = trace(fn, (params,) + tuple(args), kwargs,
                                      is_leaf=quant.is_quantized, replace=replace)
    outs = eval_jaxpr(closed.jaxpr, closed.consts, vals, ctx)
    outs = [materialize(o, ctx, None) for o in outs]
    return jax.tree_util.tree_unflatten(out_tree, outs), ctx.stats

  return wrapped
