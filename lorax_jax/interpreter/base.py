"""The protocol of an interpreter rule: one record per primitive, and the registry.

A `PrimitiveRule` says everything the package knows about one primitive:

  factored      `(eqn, invals, ctx) -> outputs | None | Declined` when an adapted kernel
                (`LowRank`) or a quantized leaf (`QuantW`) flows in; None falls back to
                materializing W + dW (with a `MaterializeWarning`, or `MaterializeError` in
                strict mode), and `decline(why)` does too, with `why` (what about this use
                prevents a factored form) in the message.
  moves_axes    the op only moves, casts or annotates its operand: on a bare quantized leaf it
                is recorded, and the leaf is dequantized later by the op that consumes it.
  quant         `(eqn, invals) -> outputs | None` for a bare quantized leaf, where that needs
                more than recording the move (slicing the codes of leading axes).
  higher_order  the primitive has bodies (jit, scan, ...): quantized leaves enter them as they
                are, and `factored` re-traces the bodies through the interpreter.
  infer         `(eqn, tracks, usage) -> track | None` for `infer_axes`: records what a consumer
                tells about the in/out/batch axes of a tracked parameter (`usage.record`),
                walks bodies (`usage.walk`), and returns the track of the (single) output of an
                op that moves axes; None stops following the value.

Adding a rule is one record: `register(PrimitiveRule('name', factored=..., infer=...))` in the
module of its group (or a module of its own listed in `interpreter.rules`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

from lorax_jax.interpreter import compat

Factored = Callable[[Any, list, Any], Optional[list]]
Infer = Callable[[Any, list, Any], Any]


@dataclasses.dataclass(frozen=True)
class PrimitiveRule:
  """What the interpreter and `infer_axes` do with one primitive (see the module docstring)."""
  name: str
  factored: Optional[Factored] = None
  moves_axes: bool = False
  higher_order: bool = False
  infer: Optional[Infer] = None
  quant: Optional[Callable[[Any, list], Optional[list]]] = None


class Declined(NamedTuple):
  """What a `factored` rule returns where it does not apply: `why`, for the warning."""
  why: str


def decline(why: str) -> Declined:
  """The return value of a `factored` rule that does not apply to this use, saying why (e.g.
  `'feature_group_count=2 has no factored rule'`)."""
  return Declined(why)


_RULES: dict[str, PrimitiveRule] = {}


def register(rule: PrimitiveRule) -> PrimitiveRule:
  """Registers `rule` under its canonical primitive name (`compat.canonical`).

  Raises:
    ValueError: a rule for that primitive (under any of its names) is already registered.
  """
  name = compat.canonical(rule.name)
  if name in _RULES:
    raise ValueError(f'An interpreter rule for primitive {rule.name!r} is already registered '
                     f'(as {name!r}); registered: {sorted(_RULES)}.')
  _RULES[name] = dataclasses.replace(rule, name=name)
  return _RULES[name]


def get(name: str) -> Optional[PrimitiveRule]:
  """The rule for primitive `name` (any of its names across JAX releases), or None."""
  return _RULES.get(compat.canonical(name))


def names() -> tuple[str, ...]:
  """The canonical names of the registered rules."""
  return tuple(_RULES)
