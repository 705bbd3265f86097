"""Chain of LoRA (Xia, Qin and Hazan, ICML 2024): equal stages, each ending in a merge into the
base and a fresh LoRA with a fresh optimizer state."""

from __future__ import annotations

from lorax_jax.dynamics import base
from lorax_jax.dynamics import engine


def cola(*, links: int, total_steps: int, seed: int = 0) -> base.Dynamics:
  """Chain of LoRA (Xia, Qin and Hazan, ICML 2024): training split into `links` equal stages;
  at the end of each, the adapters are merged into the base ("tie a knot") and a fresh LoRA
  with a fresh optimizer state starts ("extend the chain").

  Returns:
    The method (it `changes_base`).

  Raises:
    ValueError: for links < 2 or more links than steps.
  """
  name = 'cola'
  total_steps = base.check_steps(name, total_steps)
  links = base.check_int(name, 'links', links, 2, total_steps,
                         why=f' (chain links, at most total_steps={total_steps})')
  return engine.restarting(name, total_steps // links, 1.0, seed, total_steps)


METHOD = base.Method('cola', cola, variant='lora')
