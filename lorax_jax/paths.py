"""'/'-joined parameter paths, the one naming scheme of rules, logs and checkpoints.

Linen parameters are nested dicts; NNX `State` leaves sit under a `value` attribute of their
`Variable`. Both are named the same way here: the dict keys and sequence indices on the way to
the leaf, joined by '/', with NNX's trailing `value` dropped (the same keys as
`nnx.State.to_pure_dict()`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax

# Pytree node types that stand in for ONE parameter leaf (a quantized base leaf): their classes
# register here (`register_leaf`) so this bottom layer needs no knowledge of them.
_WHOLE: list[type] = []


def register_leaf(cls: type) -> type:
  """Declares a pytree node class whose instances count as one parameter leaf (a decorator)."""
  if cls not in _WHOLE:
    _WHOLE.append(cls)
  return cls


def is_whole(x: Any) -> bool:
  """Whether `x` is a registered one-leaf node (e.g. a `QuantizedArray`)."""
  return isinstance(x, tuple(_WHOLE))


def key_name(key: Any) -> str:
  """Returns the path component of one `jax.tree_util` key entry."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_keys(keypath: tuple[Any, ...]) -> tuple[str, ...]:
  """Converts a `jax.tree_util` key path to its tuple of names (NNX's `value` dropped)."""
  names = tuple(key_name(k) for k in keypath)
  if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and names[-1] == 'value':
    names = names[:-1]
  return names


def path_str(keypath: tuple[Any, ...]) -> str:
  """The '/'-joined name of a `jax.tree_util` key path, e.g. `'Dense_0/kernel'`."""
  return '/'.join(path_keys(keypath))


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None
                      ) -> Iterator[tuple[str, tuple[str, ...], Any]]:
  """Yields `(path, keys, leaf)` for every leaf of `tree`, in tree order.

  A registered one-leaf node (`register_leaf`: a `QuantizedArray`, a quantized base leaf) is one
  leaf.
  """
  leaf_fn = is_whole if is_leaf is None else (lambda x: is_whole(x) or is_leaf(x))
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf_fn)[0]:
    keys = path_keys(keypath)
    yield '/'.join(keys), keys, leaf


def nest(items: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  """Builds a nested dict from `{keys_tuple: value}`."""
  out: dict[str, Any] = {}
  for keys, value in items.items():
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return out


def flat(nested: dict[str, Any], is_leaf: Callable[[Any], bool]) -> dict[str, Any]:
  """The inverse of `nest` keyed by '/'-joined paths: `{path: value}`."""
  out: dict[str, Any] = {}

  def visit(node, prefix):
    if is_leaf(node) or not isinstance(node, dict):
      out['/'.join(prefix)] = node
      return
    for k, v in node.items():
      visit(v, prefix + (str(k),))

  visit(nested, ())
  return out
