"""The variant registry: configs and rules name variants by string.

A new variant is a new module with a factory returning a `Variant`, and one entry here.
"""

from __future__ import annotations

from typing import Callable

from lorax_jax.variants.base import Factored, FullParams, Variant
from lorax_jax.variants.lora import LoraParams, lora

_FACTORIES: dict[str, Callable[[], Variant]] = {
    'lora': lora,
}
_CACHE: dict[str, Variant] = {}


def register(name: str, factory: Callable[[], Variant]) -> None:
  """Registers a variant factory under `name` (a plugin hook for research code)."""
  if name in _FACTORIES or name == 'full':
    raise ValueError(f'Variant {name!r} is already registered.')
  _FACTORIES[name] = factory


def names() -> tuple[str, ...]:
  return tuple(_FACTORIES)


def get(name: str) -> Variant:
  """Returns the variant registered as `name`; ValueError naming the allowed ones otherwise."""
  if name not in _FACTORIES:
    raise ValueError(f'Unknown variant {name!r}; allowed: {sorted(_FACTORIES)}.')
  if name not in _CACHE:
    _CACHE[name] = _FACTORIES[name]()
  return _CACHE[name]


__all__ = ['Factored', 'FullParams', 'LoraParams', 'Variant', 'get', 'lora', 'names', 'register']
