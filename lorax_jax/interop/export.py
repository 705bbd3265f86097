"""`export_hf`: (merged) parameters as a Hugging Face `model.safetensors` checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from lorax_jax.interop import hf_layout
from lorax_jax.models import hf

# Files of a source checkpoint that hold weights (not copied: the export writes its own).
WEIGHT_FILES = ('.safetensors', '.bin', '.h5', '.msgpack')


def export_hf(directory: str, params: Any, name_map: Any, *, config: dict[str, Any] | None = None,
              source: str | None = None, dtype: Any = None) -> list[str]:
  """Writes `params` (e.g. `merge(params, adapters)`) as a Hugging Face `model.safetensors` with
  the original names and layouts, loadable by `transformers` and by the model's loader here.

  Args:
    directory: created if needed.
    params: the (merged) parameters; quantized leaves are dequantized.
    name_map: the model's name map.
    config: a config.json dict to write (e.g. `models.vit.hf_config(model, 8)`).
    source: the original Hugging Face checkpoint directory: its other files (config.json,
      tokenizer files, ...) are copied, and its tensors the name map does not cover (e.g. BERT's
      pooler) are kept, so the export is a complete checkpoint.
    dtype: tensor dtype (default: the leaves').

  Returns:
    The tensor names written.

  Raises:
    ValueError: for a `directory` that is a file or a name map that is not one.
  """
  tensors = hf.to_hf(params, hf_layout.name_map_entries(name_map, params), dtype=dtype)
  hf_layout.output_directory(directory)
  if source is not None:
    tensors = _with_source(tensors, source, directory)
  if config is not None:
    with open(os.path.join(directory, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
  hf.save_safetensors(tensors, os.path.join(directory, 'model.safetensors'))
  return sorted(tensors)


def _with_source(tensors: dict[str, np.ndarray], source: str,
                 directory: str) -> dict[str, np.ndarray]:
  """Copies the source checkpoint's other files into `directory`; returns `tensors` under the
  source's name prefix, completed with the source tensors they do not replace."""
  for name in os.listdir(source):
    src = os.path.join(source, name)
    if os.path.isfile(src) and not name.endswith(WEIGHT_FILES):
      shutil.copy(src, os.path.join(directory, name))
  original = hf.load_safetensors(os.path.join(source, 'model.safetensors'))
  # The source may name the same tensors under a task model's prefix (e.g. 'bert.').
  probe = max(tensors, key=len)
  prefixes = sorted((k[:len(k) - len(probe)] for k in original if k.endswith(probe)), key=len)
  prefix = prefixes[0] if prefixes else ''
  tensors = {prefix + k: v for k, v in tensors.items()}
  for key, value in original.items():
    tensors.setdefault(key, value)
  return tensors
