"""Hugging Face safetensors checkpoints into the reference models' parameter trees.

A model's loader is a list of `Entry(hf_key, path, transform)`: the tensor named `hf_key` goes
to the '/'-joined `path` of the Flax parameters after `transform` (e.g. a transpose from torch's
(out, in) `Linear` layout to JAX's (in, out)). `convert` checks the whole file against the
model and reports every missing, unexpected and mis-shaped tensor at once.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np

from lorax_jax import paths


@dataclasses.dataclass(frozen=True)
class Entry:
  hf_key: str
  path: str
  transform: Callable[[np.ndarray], np.ndarray] | None = None


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
  by_key = {e.hf_key: e for e in mapping}
  missing = sorted(k for k in by_key if k not in stripped)
  unexpected = sorted(k for k in stripped if k not in by_key and
                      not any(re.search(rx, k) for rx in ignore))
  unmapped = sorted(set(targets) - {e.path for e in mapping})
  values, misshaped = {}, []
  for key, entry in by_key.items():
    if key not in stripped:
      continue
    raw = np.asarray(stripped[key])
    target = targets.get(entry.path)
    if target is None:
      unmapped.append(f'{entry.path} (mapping target of {key})')
      continue
    try:
      value = entry.transform(raw) if entry.transform is not None else raw
    except ValueError:  # e.g. a reshape that the stored shape does not allow
      value = raw
    if tuple(value.shape) != tuple(target.shape):
      misshaped.append(f'{key}: {tuple(stripped[key].shape)} -> {tuple(value.shape)}, '
                       f'model {entry.path} expects {tuple(target.shape)}')
      continue
    values[entry.path] = value.astype(target.dtype)
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
