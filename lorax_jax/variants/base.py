"""The protocol every variant implements, and the adapter state of fully trained leaves."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax

from lorax_jax.spec import LeafSpec


class Factored(NamedTuple):
  """A low-rank update in canonical layout: dW = scale * A @ B (see `lorax_jax.layout`)."""
  a: jax.Array
  b: jax.Array
  scale: float


class Variant(NamedTuple):
  """A variant: a NamedTuple of pure functions, built by a factory (like an optax transform).

  Attributes:
    name: the registry name configs use.
    init: `(key, w, spec) -> (w, adapter)`; returns the (possibly changed) base leaf.
    delta: `(w, adapter) -> dW` in the kernel's own layout.
    factored: optional `(w, adapter) -> Factored`; `lora(fn)` uses it to run without ever
      forming dW. Variants without it materialize dW (allowed in strict mode).
    num_params: `(spec) -> int` trainable parameters of one adapted leaf.
    check: `(path, spec) -> None`; raises ValueError for settings the variant cannot take.
  """
  name: str
  init: Callable[[jax.Array, jax.Array, LeafSpec], tuple[jax.Array, Any]]
  delta: Callable[[jax.Array, Any], jax.Array]
  factored: Optional[Callable[[jax.Array, Any], Factored]]
  num_params: Callable[[LeafSpec], int]
  check: Callable[[str, LeafSpec], None] = lambda path, spec: None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullParams:
  """A fully trained leaf: `value` replaces the base leaf."""
  value: jax.Array
  spec: LeafSpec = dataclasses.field(metadata=dict(static=True))
