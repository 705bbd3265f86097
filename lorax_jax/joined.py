"""The joined value: a base leaf paired with its adapter state (layer 0: plain data).

`adapters.join(params, adapters)` puts an `Adapted` at every adapted leaf; `lora(fn)` runs `fn`
on such a tree without forming W + dW where the math allows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from lorax_jax.leafspec import LeafSpec


def is_adapter(x: Any) -> bool:
  """True for per-leaf adapter states (they carry their `LeafSpec` as `.spec`)."""
  return dataclasses.is_dataclass(x) and isinstance(getattr(x, 'spec', None), LeafSpec)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
  """A base leaf joined with its adapter; what `lora(fn)` sees in place of the leaf."""
  w: jax.Array
  adapter: Any


def is_adapted(x: Any) -> bool:
  return isinstance(x, Adapted)
