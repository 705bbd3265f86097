"""Specs as JSON: `LeafSpec`s and `{path: LeafSpec}` maps, round-tripped exactly (layer 0).

JSON has no tuples, so static values are written with a small tagged encoding: a tuple is
`{"tuple": [...]}`, a dict `{"dict": {...}}`, a `LeafSpec` `{"leafspec": {...}}`; numbers,
strings, booleans and None are written as they are (floats with `repr` precision, NaN and
infinities as JSON's `NaN` / `Infinity`). Decoding gives back equal values of the same types,
so a decoded `LeafSpec` equals (and hashes as) the one written.

>>> import json
>>> s = LeafSpec('lora', rank=4, alpha=8.0, shape=(16, 32), in_axes=(0,), out_axes=(1,))
>>> leaf_from_json(json.loads(json.dumps(leaf_to_json(s)))) == s
True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lorax_jax import paths
from lorax_jax.leafspec import LeafSpec

_FIELDS = tuple(f.name for f in dataclasses.fields(LeafSpec))


def encode_value(value: Any) -> Any:
  """`value` (tuples, dicts, lists, LeafSpecs and JSON scalars, nested) as plain JSON data.

  Raises:
    ValueError: for a value of another type (an array, an object), naming it.
  """
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, LeafSpec):
    return {'leafspec': leaf_to_json(value)}
  if isinstance(value, tuple):
    return {'tuple': [encode_value(v) for v in value]}
  if isinstance(value, list):
    return [encode_value(v) for v in value]
  if isinstance(value, dict):
    if not all(isinstance(k, str) for k in value):
      raise ValueError(f'Only string keys can be written as JSON; got {list(value)!r}.')
    return {'dict': {k: encode_value(v) for k, v in value.items()}}
  raise ValueError(f'{value!r} of type {type(value).__name__} has no JSON form; allowed: None, '
                   'bool, int, float, str, and tuples, lists, dicts or LeafSpecs of them.')


def decode_value(data: Any) -> Any:
  """The value `encode_value` wrote as `data`.

  Raises:
    ValueError: for data `encode_value` does not write.
  """
  if data is None or isinstance(data, (bool, int, float, str)):
    return data
  if isinstance(data, list):
    return [decode_value(v) for v in data]
  if isinstance(data, dict) and len(data) == 1:
    (tag, inner), = data.items()
    if tag == 'tuple':
      return tuple(decode_value(v) for v in inner)
    if tag == 'dict':
      return {k: decode_value(v) for k, v in inner.items()}
    if tag == 'leafspec':
      return leaf_from_json(inner)
  raise ValueError(f'{data!r} is not an encoded value; allowed: JSON scalars, lists and '
                   "{'tuple': ...}, {'dict': ...} or {'leafspec': ...}.")


def leaf_to_json(spec: LeafSpec) -> dict[str, Any]:
  """A `LeafSpec` as JSON data: `{field: encoded value}` for every field."""
  return {name: encode_value(getattr(spec, name)) for name in _FIELDS}


def leaf_from_json(data: dict[str, Any]) -> LeafSpec:
  """The `LeafSpec` `leaf_to_json` wrote.

  Raises:
    ValueError: for a field `LeafSpec` does not have, or a missing `variant`.
  """
  unknown = sorted(set(data) - set(_FIELDS))
  if unknown or 'variant' not in data:
    raise ValueError(f'Not a LeafSpec: fields {sorted(data)}; allowed: {list(_FIELDS)} '
                     "(with 'variant').")
  return LeafSpec(**{k: decode_value(v) for k, v in data.items()})


def specs_to_json(specs: dict[str, LeafSpec]) -> dict[str, Any]:
  """`{path: LeafSpec}` (e.g. `spec_leaves(spec)`) as `{path: JSON data}`."""
  return {path: leaf_to_json(s) for path, s in specs.items()}


def specs_from_json(data: dict[str, Any]) -> dict[str, LeafSpec]:
  """The `{path: LeafSpec}` map `specs_to_json` wrote."""
  return {path: leaf_from_json(d) for path, d in data.items()}


def spec_tree(params: Any, specs: dict[str, LeafSpec]) -> dict[str, Any]:
  """The spec tree (`make_spec`'s shape: a nested dict like `params` with a `LeafSpec` or None
  at every leaf) of the `{path: LeafSpec}` map `specs` over `params`.

  Raises:
    ValueError: for paths of `specs` that are not leaves of `params`.
  """
  items = {keys: specs.get(path) for path, keys, _ in paths.leaves_with_paths(params)}
  missing = sorted(set(specs) - {'/'.join(k) for k in items})
  if missing:
    raise ValueError(f'Spec paths {missing[:5]} are not leaves of the parameters; leaves: '
                     f'{sorted("/".join(k) for k in items)[:5]}...')
  return paths.nest(items)
