"""Deferred dequantization: a quantized base leaf inside the interpreter.

A `QuantW` wraps a `lorax_jax.quant.QuantizedArray` and records the ops that only move its axes
(rules with `moves_axes`); the op that consumes it dequantizes it (to the dtype the function
expects) inside a `jax.checkpoint`, so the float weight exists only as a temporary of that op and
only the codes are residuals of the backward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import quant
from lorax_jax.interpreter import compat


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
      x = compat.bind(eqn, [x])
    return x


def arr(w):
  """A base weight as an array (dequantizing a `QuantW`)."""
  return w.force() if isinstance(w, QuantW) else w


def bind_quant(eqn, invals):
  """Binds `eqn` with its `QuantW` operands dequantized inside a `jax.checkpoint`.

  The backward pass then dequantizes again (as QLoRA's kernels do) instead of keeping the float
  weight alive from the forward pass: only the codes are residuals.
  """
  pos = [i for i, x in enumerate(invals) if isinstance(x, QuantW)]
  if not pos:
    return compat.bind(eqn, invals)
  arrays = [i for i, x in enumerate(invals) if i not in pos and isinstance(x, (jax.Array,
                                                                                np.ndarray))]

  def f(qs, xs):
    vals = list(invals)
    for i, q in zip(pos, qs):
      vals[i] = dataclasses.replace(invals[i], q=q).force()
    for i, x in zip(arrays, xs):
      vals[i] = x
    return compat.bind(eqn, vals)

  return jax.checkpoint(f)([invals[i].q for i in pos], [invals[i] for i in arrays])


def bind_on_w(eqn, w):
  """A one-operand move applied to a base weight: recorded on a `QuantW`, bound otherwise."""
  if isinstance(w, QuantW):
    return w.then(eqn)
  return compat.bind(eqn, [w])


def deferred(rule, eqn, invals):
  """What a quantized operand does at `eqn` (of registered `rule`, or None): the rule's own
  `quant` handler, recording a move, or None (dequantize where consumed)."""
  if rule is None:
    return None
  if rule.quant is not None:
    return rule.quant(eqn, invals)
  if rule.moves_axes and len(invals) == 1:
    return [invals[0].then(eqn)]
  return None
