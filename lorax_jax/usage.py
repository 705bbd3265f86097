"""Inference of a kernel's in/out/batch axes from how a function uses it, and tracing.

Both live in the interpreter package now (`interpreter.api.infer_axes` walks with the same rule
records as `lora`; `interpreter.tracing.trace`); this module keeps their old names.
"""

from lorax_jax.interpreter.api import infer_axes, infer_usage
from lorax_jax.interpreter.tracing import trace

__all__ = ['infer_axes', 'infer_usage', 'trace']
