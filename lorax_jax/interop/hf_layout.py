"""The Hugging Face layout math: which kernel element is which element of a Hugging Face weight.

A name map is the model's list of `hf.Entry` (or a `{path: hf_module}` dict for 2-D `(in, out)`
kernels of `nn.Linear` layers). Each entry's transform says which axis of the Hugging Face weight
every kernel axis comes from; from it follow the permutations between a kernel's flattened in-
and out-axes and the HF weight's (`layout`), and, for a file without a spec, the in- and out-axes
of a leaf (`leaf_axes`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lorax_jax import paths
from lorax_jax.leafspec import LeafSpec
from lorax_jax.models import hf


def name_map_entries(name_map: Any, params: Any = None,
                     shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[hf.Entry]:
  """A list of `hf.Entry` from a name map (entries, or `{path: module}` for (in, out) Linears).

  Args:
    name_map: a list of `hf.Entry`, or a `{path: module}` dict.
    params: for a dict: the base parameters, whose shapes the entries take.
    shapes: for a dict: `{path: shape}` of leaves `params` does not give (e.g. from the
      adapters' specs, when there is no `params`).

  Returns:
    The entries (a dict's with `hf_shape` where `params` or `shapes` know the leaf).

  Raises:
    ValueError: for a name map that is neither.
  """
  if isinstance(name_map, Mapping):
    shapes = dict(shapes or {})
    if params is not None:
      shapes.update({p: np.shape(l) for p, _, l in paths.leaves_with_paths(params)})
    out = []
    for path, module in name_map.items():
      shape = shapes.get(path)
      if path.endswith('embedding'):
        out.append(hf.Entry(f'{module}.weight', path, None, shape, kind='embedding'))
      else:
        out.append(hf.Entry(f'{module}.weight', path, np.transpose,
                            None if shape is None else tuple(shape)[::-1], kind='linear'))
    return out
  if isinstance(name_map, (str, bytes)) or not isinstance(name_map, Iterable):
    raise ValueError(f'A name map is a list of lorax_jax.models.hf.Entry or a {{path: module}} '
                     f'dict; got a {type(name_map).__name__}: {name_map!r}.')
  entries = list(name_map)
  bad = [e for e in entries if not isinstance(e, hf.Entry)]
  if bad:
    raise ValueError(f'A name map is a list of lorax_jax.models.hf.Entry or a {{path: module}} '
                     f'dict; got {bad[0]!r}.')
  return entries


def excludes(exclude: Any) -> list[re.Pattern]:
  """The compiled `exclude=` regexes of `save_peft` / `load_peft`; ValueError for a bad one."""
  if isinstance(exclude, (str, bytes)):
    raise ValueError(f'exclude={exclude!r} must be a list of regexes, not one string (which '
                     f'would be read as single characters); e.g. exclude=[{exclude!r}].')
  out = []
  for rx in exclude:
    try:
      out.append(re.compile(rx))
    except (re.error, TypeError) as e:
      raise ValueError(f'exclude= pattern {rx!r} is not a valid regex: {e}') from None
  return out


def output_directory(directory: str) -> str:
  """Creates `directory` (and its parents) to write files into; ValueError if it is a file."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f'{directory} is a file; allowed: a directory (created if missing).')
  os.makedirs(directory, exist_ok=True)
  return directory


def weight_entries(entries: Sequence[hf.Entry]) -> dict[str, list[hf.Entry]]:
  """`{path: [entries]}` for the weights (the tensors PEFT adapts) of the name map."""
  out: dict[str, list[hf.Entry]] = {}
  for e in entries:
    if e.hf_key.endswith('.weight'):
      out.setdefault(e.path, []).append(e)
  return out


def hf_axes(entry: hf.Entry) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(in axes, out axes) of the HF weight (slice)."""
  n = len(entry.slice_shape)
  kind = entry.module_kind()
  if kind not in hf.KINDS:
    raise ValueError(f'Unknown module kind {kind!r} of {entry.hf_key!r}; allowed: {hf.KINDS}.')
  if kind in ('linear', 'conv'):
    return tuple(range(1, n)), (0,)
  return (0,), (1,)


def module_shapes(entry: hf.Entry) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
  """`(in_shape, d_out, hf_shape)` of the whole HF module weight an entry belongs to."""
  hf_shape = entry.hf_shape
  hf_in, hf_out = hf_axes(dataclasses.replace(entry, columns=None))
  return (tuple(hf_shape[a] for a in hf_in), math.prod(hf_shape[a] for a in hf_out),
          tuple(hf_shape))


_LAYOUTS: dict[Any, Any] = {}
_AXES: dict[Any, Any] = {}


def _cached(store: dict, key, compute):
  if key is None:
    return compute()
  if key not in store:
    if len(store) >= 64:
      store.pop(next(iter(store)))
    store[key] = compute()
  return store[key]


def _layout_key(entry: hf.Entry, *extra):
  key = hf._transform_key(entry)  # pylint: disable=protected-access
  return None if key is None else (key, entry.columns, entry.module_kind()) + extra


def _layer_axes(entry: hf.Entry, s: LeafSpec) -> tuple[tuple, tuple, tuple]:
  """The per-layer shape and in/out axes of a (possibly stacked) kernel."""
  if entry.index is None:
    if s.batch_axes:
      raise ValueError(f'{entry.path!r} is stacked over axes {s.batch_axes}: its name map needs '
                       'one entry per layer (Entry.index).')
    return s.shape, s.in_axes, s.out_axes
  if s.batch_axes != (0,):
    raise ValueError(f'{entry.path!r}: per-layer name-map entries need the layer axis first '
                     f'(batch_axes (0,)), got {s.batch_axes}.')
  return s.shape[1:], tuple(a - 1 for a in s.in_axes), tuple(a - 1 for a in s.out_axes)


def _flat_hf(entry: hf.Entry) -> tuple[np.ndarray, np.ndarray]:
  """For every element of the per-layer leaf: its flat HF in-index and out-index (leaf-sized:
  not cached; `layout` and `leaf_axes` cache what they derive)."""
  j = hf.index_map(entry)
  shape = entry.slice_shape
  coords = np.unravel_index(j, shape)
  hf_in, hf_out = hf_axes(entry)
  flat = lambda axes: np.ravel_multi_index([coords[a] for a in axes], [shape[a] for a in axes])
  return flat(hf_in), flat(hf_out)


def layout(entry: hf.Entry, s: LeafSpec) -> tuple[np.ndarray, np.ndarray]:
  """`(perm_in, perm_out)`: the HF in-index (within the entry's slice) of each canonical in-index
  of the kernel (its in-axes flattened in order), and the HF out-index of each out-index.

  Raises:
    ValueError: if a kernel axis mixes HF in- and out-axes (the spec's axes do not fit the map).
  """
  shape, in_axes, out_axes = _layer_axes(entry, s)
  return _cached(_LAYOUTS, _layout_key(entry, shape, in_axes, out_axes),
                 lambda: _layout(entry, s, shape, in_axes, out_axes))


def _layout(entry, s, shape, in_axes, out_axes):
  hin, hout = _flat_hf(entry)
  if hin.shape != tuple(shape):
    raise ValueError(f'{entry.path!r} has per-layer shape {tuple(shape)}; the name map gives '
                     f'{hin.shape} for {entry.hf_key!r}.')
  d_in = math.prod(shape[a] for a in in_axes)
  order = tuple(in_axes) + tuple(out_axes)
  hin = np.transpose(hin, order).reshape(d_in, -1)
  hout = np.transpose(hout, order).reshape(d_in, -1)
  perm_in, perm_out = hin[:, 0], hout[0, :]
  if not (np.all(hin == perm_in[:, None]) and np.all(hout == perm_out[None, :])):
    raise ValueError(f'The in/out axes of {entry.path!r} (in {s.in_axes}, out {s.out_axes}) do '
                     f'not match the in/out axes of the Hugging Face weight {entry.hf_key!r}.')
  return perm_in, perm_out


def leaf_axes(entry: hf.Entry, leaf_shape) -> tuple[tuple, tuple, tuple]:
  """(batch, in, out) axes of a leaf from the name map alone (for load_peft's spec)."""
  return _cached(_AXES, _layout_key(entry, entry.index is not None, tuple(leaf_shape)),
                 lambda: _leaf_axes(entry, leaf_shape))


def _leaf_axes(entry: hf.Entry, leaf_shape) -> tuple[tuple, tuple, tuple]:
  batch = (0,) if entry.index is not None else ()
  hin, hout = _flat_hf(entry)
  ins, outs = [], []
  for a in range(hin.ndim):
    moves_in = hin.shape[a] > 1 and np.ptp(hin, axis=a).any()
    moves_out = hout.shape[a] > 1 and np.ptp(hout, axis=a).any()
    if moves_in and moves_out:
      raise ValueError(f'Axis {a} of {entry.path!r} mixes in- and out-axes of {entry.hf_key!r}.')
    (outs if moves_out else ins).append(a + len(batch))
  if len(leaf_shape) != hin.ndim + len(batch):
    raise ValueError(f'{entry.path!r} has shape {tuple(leaf_shape)}; the name map gives '
                     f'{hin.shape} per layer for {entry.hf_key!r}.')
  return batch, tuple(ins), tuple(outs)
