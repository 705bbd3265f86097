"""Hugging Face safetensors checkpoints to and from the reference models' parameter trees.

A model's name map is a list of `Entry(hf_key, path, transform, hf_shape, ...)`: the tensor named
`hf_key` goes to the '/'-joined `path` of the Flax parameters after `transform` (e.g. a transpose
from torch's (out, in) `Linear` layout to JAX's (in, out), or a reshape into a multi-axis
attention kernel). Transforms only move and reshape entries, so the same map also runs
backwards (`to_hf`, for exports) and tells which HF axis every kernel axis comes from
(`index_map`, for PEFT's adapter layouts). `convert` checks a whole file against the model and
reports every missing, unexpected and mis-shaped tensor at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np

from lorax_jax import paths

KINDS = ('linear', 'conv1d', 'embedding', 'conv')


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one Hugging Face tensor (or a slice of it) lives in the Flax parameters.

  Attributes:
    hf_key: the tensor's name in the checkpoint (e.g.
      `'encoder.layer.0.attention.self.query.weight'`).
    path: the '/'-joined Flax parameter path.
    transform: HF array -> Flax array (a transpose or reshape: it may only move entries), or None.
    hf_shape: the HF tensor's shape (needed to run a transform backwards).
    index: for stacked (scanned) Flax leaves, the position on the leaf's leading axis.
    columns: `(start, stop)` of the HF tensor's last axis that this entry holds (a fused tensor
      such as GPT-2's `c_attn`, split into query / key / value leaves).
    kind: the torch module type of a weight: `'linear'` (`nn.Linear`, (out, in)), `'conv1d'`
      (GPT-2's `Conv1D`, (in, out)), `'embedding'` (`nn.Embedding`, (num, dim)) or `'conv'`
      (`nn.Conv2d`, (out, in, kh, kw)); None infers it from the path (`embedding` leaves) and
      the number of axes.
    peft_module: the module's name in the torch model, where it differs from the checkpoint's
      (transformers 5 renamed some modules in memory but keeps the old checkpoint names; PEFT
      names adapters after the modules in memory).
  """
  hf_key: str
  path: str
  transform: Callable[[np.ndarray], np.ndarray] | None = None
  hf_shape: tuple[int, ...] | None = None
  index: int | None = None
  columns: tuple[int, int] | None = None
  kind: str | None = None
  peft_module: str | None = None

  @property
  def module(self) -> str:
    """The checkpoint's module name (the key without its last component, e.g. `.weight`)."""
    return self.hf_key.rsplit('.', 1)[0]

  @property
  def torch_module(self) -> str:
    """The module's name in the torch model (what PEFT names adapters after)."""
    return self.peft_module or self.module

  @property
  def slice_shape(self) -> tuple[int, ...]:
    """The shape of the part of the HF tensor this entry holds."""
    if self.hf_shape is None:
      raise ValueError(f'Entry {self.hf_key!r} -> {self.path!r} needs hf_shape.')
    if self.columns is None:
      return tuple(self.hf_shape)
    return tuple(self.hf_shape[:-1]) + (self.columns[1] - self.columns[0],)

  def module_kind(self) -> str:
    if self.kind is not None:
      return self.kind
    if self.path.endswith('embedding'):
      return 'embedding'
    return 'conv' if self.hf_shape is not None and len(self.hf_shape) > 2 else 'linear'


def prefixed(mapping: Sequence[Entry], *, path: str = '', key: str = '') -> list[Entry]:
  """The same map for a model nested under Flax path prefix `path` and HF key prefix `key`
  (e.g. `prefixed(bert.hf_mapping(c), path='bert/')` for `BertClassifier`)."""
  return [dataclasses.replace(e, hf_key=key + e.hf_key, path=path + e.path,
                              peft_module=e.peft_module and key + e.peft_module)
          for e in mapping]


def _transform_key(entry: Entry):
  """A hashable identity of what `index_map` computes (the transform's code and closure values
  and the shape), or None where it has none (then nothing is cached)."""
  t = entry.transform
  ident = None
  if t is not None:
    try:
      ident = (t.__code__, tuple(c.cell_contents for c in (t.__closure__ or ())))
      hash(ident)
    except (AttributeError, TypeError, ValueError):
      return None
  return ident, entry.slice_shape


_INDEX_MAPS: dict[Any, np.ndarray] = {}
_CACHE_BYTES = 2**28   # index maps kept for the next layer of the same shape


def index_map(entry: Entry) -> np.ndarray:
  """For every element of the (per-layer) Flax leaf, the flat index of the HF element it holds,
  within `entry.slice_shape`. Cached per transform and shape (a model's layers share them).

  Raises:
    ValueError: if the transform is not a pure reordering of the HF entries.
  """
  key = _transform_key(entry)
  if key is not None and key in _INDEX_MAPS:
    return _INDEX_MAPS[key]
  shape = entry.slice_shape
  n = math.prod(shape)
  src = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64).reshape(shape)
  got = np.asarray(entry.transform(src) if entry.transform is not None else src)
  seen = np.zeros(n, bool)
  if got.size == n and got.dtype == src.dtype:
    seen[got.ravel()] = True
  if not seen.all():
    raise ValueError(f'The transform of {entry.hf_key!r} -> {entry.path!r} is not a reordering '
                     'of the tensor (it must only transpose and reshape).')
  if key is not None and got.nbytes <= _CACHE_BYTES:
    while _INDEX_MAPS and sum(v.nbytes for v in _INDEX_MAPS.values()) + got.nbytes > _CACHE_BYTES:
      _INDEX_MAPS.pop(next(iter(_INDEX_MAPS)))
    _INDEX_MAPS[key] = got
  return got


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file as numpy arrays.

  Raises:
    ValueError: if the file is missing or not a valid safetensors file.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return dict(load_file(path))
  except FileNotFoundError:
    raise ValueError(f'No safetensors file at {path}.') from None
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path} is not a valid safetensors file: {type(e).__name__}: {e}') from None


def save_safetensors(tensors: dict[str, np.ndarray], path: str,
                     metadata: dict[str, str] | None = None) -> None:
  """Writes `{name: array}` as a safetensors file with torch's `format: pt` metadata, which
  `transformers` and `peft` expect."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  save_file(arrays, path, metadata={'format': 'pt', **(metadata or {})})


def read_config(config: dict[str, Any] | str) -> dict[str, Any]:
  """A Hugging Face `config.json` as a dict (from a dict, a file or a checkpoint directory)."""
  if isinstance(config, dict):
    return dict(config)
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(config, 'config.json') if os.path.isdir(config) else config
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ValueError(f'No Hugging Face config at {path}.') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from None


def convert(tensors: dict[str, np.ndarray], mapping: Sequence[Entry], abstract: Any, *,
            strip_prefixes: Sequence[str] = (), ignore: Sequence[str] = ()) -> Any:
  """Builds a parameter tree shaped like `abstract` from checkpoint `tensors`.

  Args:
    tensors: `{hf_key: array}` from `load_safetensors`.
    mapping: where each tensor goes.
    abstract: the model's parameters (arrays or `jax.ShapeDtypeStruct`s) for shapes and dtypes.
    strip_prefixes: key prefixes to drop first (e.g. `'bert.'` of a task model's checkpoint).
    ignore: regexes of checkpoint keys that the model does not use (e.g. a pooler).

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped tensor.
  """
  stripped = {}
  for key, value in tensors.items():
    for prefix in strip_prefixes:
      if key.startswith(prefix):
        key = key[len(prefix):]
        break
    stripped[key] = value
  targets = {p: leaf for p, _, leaf in paths.leaves_with_paths(abstract)}
  by_key: dict[str, list[Entry]] = {}
  for e in mapping:
    by_key.setdefault(e.hf_key, []).append(e)
  missing = sorted(k for k in by_key if k not in stripped)
  unexpected = sorted(k for k in stripped if k not in by_key and
                      not any(re.search(rx, k) for rx in ignore))
  unmapped = sorted(set(targets) - {e.path for e in mapping})
  values, stacks, misshaped = {}, {}, []
  for key, entries in by_key.items():
    if key not in stripped:
      continue
    raw = np.asarray(stripped[key])
    want = entries[0].hf_shape
    if want is not None and tuple(raw.shape) != tuple(want):
      misshaped.append(f'{key}: {tuple(raw.shape)}, expected {tuple(want)}')
      continue
    for entry in entries:
      target = targets.get(entry.path)
      if target is None:
        unmapped.append(f'{entry.path} (mapping target of {key})')
        continue
      part = raw if entry.columns is None else raw[..., entry.columns[0]:entry.columns[1]]
      try:
        value = entry.transform(part) if entry.transform is not None else part
      except ValueError:  # e.g. a reshape that the stored shape does not allow
        value = part
      want = tuple(target.shape) if entry.index is None else tuple(target.shape[1:])
      if tuple(value.shape) != want:
        misshaped.append(f'{key}: {tuple(part.shape)} -> {tuple(value.shape)}, model '
                         f'{entry.path} expects {want}')
        continue
      if entry.index is None:
        values[entry.path] = value.astype(target.dtype)
      else:
        stacks.setdefault(entry.path, {})[entry.index] = value.astype(target.dtype)
  for path, layers in stacks.items():
    n = targets[path].shape[0]
    if sorted(layers) != list(range(n)):
      missing.append(f'{path}: layers {sorted(set(range(n)) - set(layers))} of {n}')
      continue
    values[path] = np.stack([layers[i] for i in range(n)])
  problems = []
  if missing:
    problems.append(f'missing keys ({len(missing)}): {missing[:20]}')
  if unexpected:
    problems.append(f'unexpected keys ({len(unexpected)}): {unexpected[:20]}')
  if misshaped:
    problems.append(f'mis-shaped keys ({len(misshaped)}): {misshaped[:20]}')
  if unmapped:
    problems.append(f'model parameters with no checkpoint tensor: {unmapped[:20]}')
  if problems:
    raise ValueError('Checkpoint does not fit the model:\n  ' + '\n  '.join(problems))
  return jax.tree_util.tree_map_with_path(
      lambda kp, leaf: values[paths.path_str(kp)], abstract)


def to_hf(params: Any, mapping: Sequence[Entry], *, dtype: Any = None) -> dict[str, np.ndarray]:
  """The inverse of `convert`: `{hf_key: array}` in Hugging Face names and layouts.

  Args:
    params: a parameter tree (float leaves; quantized leaves are dequantized).
    mapping: the model's name map; every entry's path must be in `params`.
    dtype: cast every tensor to it (default: keep the leaves' dtypes).

  Raises:
    ValueError: for entries whose path is not in `params`, a shape that does not fit, or a fused
      tensor whose columns the entries do not cover.
  """
  from lorax_jax import quant  # pylint: disable=g-import-not-at-top
  leaves = {p: leaf for p, _, leaf in paths.leaves_with_paths(params)}
  missing = sorted({e.path for e in mapping} - set(leaves))
  if missing:
    raise ValueError(f'Name-map paths not in the parameters ({len(missing)}): {missing[:20]}')
  out: dict[str, np.ndarray] = {}
  covered: dict[str, np.ndarray] = {}
  for entry in mapping:
    leaf = leaves[entry.path]
    leaf = np.asarray(quant.dequantize_array(leaf) if quant.is_quantized(leaf) else leaf)
    value = leaf if entry.index is None else leaf[entry.index]
    if entry.hf_shape is None and entry.transform is None and entry.columns is None:
      part = value
    else:
      if entry.hf_shape is None:
        raise ValueError(f'Entry {entry.hf_key!r} -> {entry.path!r} has a transform but no '
                         'hf_shape: it cannot be run backwards.')
      perm = index_map(entry)
      if perm.shape != value.shape:
        raise ValueError(f'{entry.path} has shape {value.shape}; the name map expects '
                         f'{perm.shape} for {entry.hf_key!r}.')
      flat = np.empty(perm.size, value.dtype)
      flat[perm.ravel()] = value.ravel()
      part = flat.reshape(entry.slice_shape)
    if dtype is not None:
      part = part.astype(dtype)
    if entry.columns is None:
      out[entry.hf_key] = part
      continue
    if entry.hf_key not in out:
      out[entry.hf_key] = np.zeros(entry.hf_shape, part.dtype)
      covered[entry.hf_key] = np.zeros(entry.hf_shape[-1], bool)
    out[entry.hf_key][..., entry.columns[0]:entry.columns[1]] = part
    covered[entry.hf_key][entry.columns[0]:entry.columns[1]] = True
  gaps = sorted(k for k, c in covered.items() if not c.all())
  if gaps:
    raise ValueError(f'Fused tensors whose columns the name map does not cover: {gaps}')
  return out
