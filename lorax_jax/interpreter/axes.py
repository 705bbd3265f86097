"""The walker behind `infer_axes`: parameters followed through a jaxpr by the rules' `infer`.

A track is `(path, axes)`: for each axis of the current value, the tuple of the parameter's own
axes it spans. Each equation with a tracked operand runs its rule's `infer` (see `base`); a
primitive without a rule whose first nested jaxpr takes the equation's operands (custom_jvp,
custom_vjp and other call-like primitives) is walked into, anything else ends the track.
"""

from __future__ import annotations

from lorax_jax import layout
from lorax_jax.interpreter import base
from lorax_jax.interpreter import compat


def origins(axes, dims) -> set:
  """The parameter axes that the value's axes `dims` span."""
  out = set()
  for d in dims:
    out |= set(axes[d])
  return out


def reshape_axes(axes, old, new):
  """The track's axes after a reshape from `old` to `new` (None: axes mixed across groups)."""
  groups = layout.reshape_groups(old, new)
  if groups is None:
    return None
  out = [None] * len(new)
  for gi, gj in groups:
    u = tuple(sorted(origins(axes, gi)))
    for q in gj:
      out[q] = u
  return tuple(out)


class Usage:
  """What the walk learned: the first consumer's axes per path, the axes scans iterate, and the
  primitive where each path's first track ended (`consumer`: the op that consumes it)."""

  def __init__(self):
    self.first: dict[str, tuple[set, set, set]] = {}
    self.scanned: dict[str, set] = {}
    self.consumer: dict[str, str] = {}   # path -> the primitive where its first track ended

  def record(self, path, batch, ins, outs) -> None:
    if path not in self.first:
      self.first[path] = (set(batch), set(ins), set(outs))

  def walk_into(self, jaxpr, tracks) -> None:
    """Walks a body whose inputs carry `tracks` (aligned with `jaxpr.invars`, None: untracked)."""
    self.walk(jaxpr, {v: t for v, t in zip(jaxpr.invars, tracks) if t is not None})

  def walk(self, jaxpr, tracks: dict) -> None:
    for eqn in jaxpr.eqns:
      ins = [None if isinstance(v, compat.Literal) else tracks.get(v) for v in eqn.invars]
      if not any(t is not None for t in ins):
        continue
      rule = base.get(eqn.primitive.name)
      if rule is not None:
        out = rule.infer(eqn, ins, self) if rule.infer is not None else None
      else:
        out = None
        subs = compat.sub_jaxprs(eqn.params)
        if subs and len(subs[0].invars) == len(ins):
          self.walk_into(subs[0], ins)
      if out is not None and out[1] is not None and len(eqn.outvars) == 1:
        tracks[eqn.outvars[0]] = out
      else:   # the track ends here (a body walked into has named its own consumer first)
        for t in ins:
          if t is not None:
            self.consumer.setdefault(t[0], eqn.primitive.name)


def same(eqn, ins, usage):
  """`infer` of ops that keep the axes (casts, copies, sharding constraints, slices)."""
  del eqn, usage
  return ins[0]


def call(eqn, ins, usage):
  """`infer` of call-like primitives: their first nested jaxpr, on the same operands."""
  subs = compat.sub_jaxprs(eqn.params)
  if subs and len(subs[0].invars) == len(ins):
    usage.walk_into(subs[0], ins)
  return None
