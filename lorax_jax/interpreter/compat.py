"""Everything about JAX's primitives that differs between the releases supported (0.7 on).

`NAMES` maps each rule's canonical primitive name to every name the primitive has had; the
registry (`base`) looks rules up through it, so a rename in a new JAX release is one line here.
"""

from __future__ import annotations

import jax.extend as jex

# canonical name -> the names JAX has given that primitive (canonical first).
NAMES: dict[str, tuple[str, ...]] = {
    'jit': ('jit', 'pjit'),                        # `pjit` before JAX 0.7
    'checkpoint': ('checkpoint', 'remat2', 'remat'),   # `remat2` is `jax.checkpoint`'s name today
    'closed_call': ('closed_call', 'core_call'),
    'copy': ('copy', 'copy_p'),
}

# The parameter holding the body of the call-like primitives, by canonical name.
CALL_JAXPR: dict[str, str] = {'jit': 'jaxpr', 'closed_call': 'call_jaxpr'}

_CANONICAL = {alias: name for name, aliases in NAMES.items() for alias in aliases}

Literal = jex.core.Literal


def canonical(name: str) -> str:
  """The canonical name of primitive `name` (itself when it has only ever had one)."""
  return _CANONICAL.get(name, name)


def aliases(name: str) -> tuple[str, ...]:
  """Every name of the primitive whose canonical name is `name`."""
  return NAMES.get(name, (name,))


def bind(eqn, invals):
  """Binds `eqn`'s primitive to `invals` with its own parameters."""
  # `get_bind_params` returns `(subfuns, params)` up to JAX 0.8 and `params` since.
  got = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = got if isinstance(got, tuple) else ((), got)
  return eqn.primitive.bind(*subfuns, *invals, **params)


def sub_jaxprs(params) -> list:
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


def remat_kwargs(params) -> dict:
  """`jax.checkpoint` keyword arguments that reproduce a checkpoint equation."""
  kw = {'prevent_cse': params.get('prevent_cse', True)}
  if 'policy' in params:
    kw['policy'] = params['policy']
  return kw
