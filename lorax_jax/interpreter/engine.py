"""The evaluation engine: a jaxpr evaluated with adapted and quantized values, rule by rule.

An equation whose operands are all plain arrays is bound as it is. Otherwise the registered
rule of its primitive (`base.get`) runs: for a bare quantized operand of a first-order primitive
its deferred-dequantization handling (`quantw.deferred`), else its `factored` rule. Where no
rule applies (none registered, or it returns None or `base.decline(why)`), adapted operands are
materialized, with a `MaterializeWarning` that says why where known, and the equation is bound
with its quantized operands dequantized in place.
"""

from __future__ import annotations

from typing import Any

from lorax_jax.interpreter import base
from lorax_jax.interpreter import compat
from lorax_jax.interpreter import quantw
from lorax_jax.interpreter.quantw import QuantW
from lorax_jax.interpreter.values import Ctx, Dense, is_special, materialize


def _read(v, env):
  if isinstance(v, compat.Literal):
    return v.val
  return env[v]


def eval_jaxpr(jaxpr, consts, args, ctx: Ctx) -> list:
  """Evaluates `jaxpr` on `consts` and `args` (arrays, `LowRank`, `Dense` or `QuantW` values)."""
  env: dict[Any, Any] = {}
  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [_read(v, env) for v in eqn.invars]
    outvals = None
    if any(is_special(x) for x in invals):
      name = eqn.primitive.name
      rule = base.get(name)
      why = 'has no factored rule' if rule is None or rule.factored is None else None
      if not any(isinstance(x, Dense) for x in invals):
        if any(isinstance(x, QuantW) for x in invals) and not (rule and rule.higher_order):
          outvals = quantw.deferred(rule, eqn, invals)
        elif rule is not None and rule.factored is not None:
          outvals = rule.factored(eqn, invals, ctx)
      if isinstance(outvals, base.Declined):
        why, outvals = outvals.why, None
      if outvals is None:
        where = f'{name!r}' + (f': {why}' if why else '')
        invals = [x if isinstance(x, QuantW) else materialize(x, ctx, where) for x in invals]
    if outvals is None:
      outvals = quantw.bind_quant(eqn, invals)
      if not eqn.primitive.multiple_results:
        outvals = [outvals]
    for var, val in zip(eqn.outvars, outvals):
      env[var] = val  # dropped outputs (DropVar) are written but never read
  return [_read(v, env) for v in jaxpr.outvars]
