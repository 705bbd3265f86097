"""`lora(fn)`: run any JAX function on joined (base + adapter) parameters, factored.

The function is traced to a jaxpr with the public API and evaluated by an interpreter
(`engine`) in which each adapted kernel is a `LowRank` value: the base W plus factors A, B in
broadcast layout (see `lorax_jax.layout`). Each primitive the interpreter knows has one record
(`base.PrimitiveRule`: its factored rule, whether it only moves axes, whether it is
higher-order, and its axis inference for `infer_axes`), in the module of its group:

  dot_general    contracting over all in-axes (or all out-axes: a tied embedding as a head)
  conv           A as a conv with the kernel's window, B as a 1x1 conv (grouped: both grouped)
  gather         rows of A (an embedding lookup), then @ B
  moves          transpose, reshape, unit axes, slices, casts, copies: act on the pieces
  higher_order   jit, calls, checkpoint, scan, while, cond: bodies re-traced when an adapted
                 value flows in, bound untouched otherwise

A quantized base leaf (`lorax_jax.quant.QuantizedArray`, adapted or not) is a `QuantW`
(`quantw`): ops that only move its axes are recorded, and it is dequantized by the op that
consumes it. Anything else materializes W + dW with a `MaterializeWarning` naming the primitive,
the path and, where a rule declines (`base.decline`), why; `strict=True` (or the environment
variable `LORAX_JAX_STRICT=1`) raises instead.
Calibration (`capture_inputs`) runs the same interpreter with probes (`capture`). Primitive
names that differ between JAX releases are in `compat`.
"""

from lorax_jax.interpreter import base  # noqa: F401
from lorax_jax.interpreter import compat  # noqa: F401
from lorax_jax.interpreter.api import infer_axes, lora
from lorax_jax.interpreter.base import PrimitiveRule, register
from lorax_jax.interpreter.capture import capture_inputs
from lorax_jax.interpreter.quantw import QuantW
from lorax_jax.interpreter.tracing import trace
from lorax_jax.interpreter.values import Dense, LowRank, MaterializeError, MaterializeWarning

__all__ = [
    'Dense', 'LowRank', 'MaterializeError', 'MaterializeWarning', 'PrimitiveRule', 'QuantW',
    'capture_inputs', 'infer_axes', 'lora', 'register', 'trace',
]
