"""The PEFT codec of `full` leaves: whole modules as `modules_to_save`, and the trained biases of
LoRA modules as PEFT's `bias='lora_only'` (kept under the module's `base_layer`)."""

from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

import numpy as np

from lorax_jax import paths
from lorax_jax import quant
from lorax_jax.interop.codecs import to_numpy
from lorax_jax.interop.schema import PREFIX
from lorax_jax.models import hf


def encode(entries: Sequence[hf.Entry], full: Mapping[str, Any], lora_modules: set,
           params: Any, module_prefix: str, dtype: Any) -> tuple[dict, list, list]:
  """`(tensors, lora_biases, to_save)`: the file tensors of the fully trained leaves `full`, the
  LoRA modules whose biases are trained and the modules saved whole.

  Raises:
    ValueError: for a fully trained weight inside a LoRA module, or a module to save with a
      tensor that is neither trained nor in `params`.
  """
  trained = {e.torch_module for e in entries if e.path in full}
  lora_biases = sorted(trained & lora_modules)
  bad = [e.path for e in entries if e.path in full and e.torch_module in lora_modules and
         not e.hf_key.endswith('.bias')]
  if bad:
    raise ValueError(f'{bad[:10]} are trained fully inside modules that LoRA adapts; PEFT can '
                     'only train the biases of LoRA modules.')
  to_save = sorted(trained - lora_modules)
  base = {p: l for p, _, l in paths.leaves_with_paths(params)} if params is not None else {}
  tensors = {}
  for module in lora_biases + to_save:
    module_entries = [e for e in entries if e.torch_module == module and (
        module in to_save or e.hf_key.endswith('.bias'))]
    values = {}
    for e in module_entries:
      if e.path in full:
        values[e.path] = full[e.path].value
      elif e.path in base:
        leaf = base[e.path]
        values[e.path] = quant.dequantize_array(leaf) if quant.is_quantized(leaf) else leaf
      else:
        raise ValueError(f'modules_to_save {module!r}: {e.path!r} is not trained; pass params= '
                         'so that the whole module can be written.')
    tree = paths.nest({tuple(p.split('/')): v for p, v in values.items()})
    # A LoRA module keeps its own tensors under `base_layer` (PEFT's bias='lora_only').
    inner = f'{module}.base_layer' if module in lora_modules else module
    for key, value in hf.to_hf(tree, module_entries).items():
      tensors[f'{PREFIX}{module_prefix}{inner}.{key.rsplit(".", 1)[1]}'] = to_numpy(value, dtype)
  return tensors, lora_biases, to_save


def decode(full_tensors: Mapping[str, np.ndarray], by_key: Mapping[str, list[hf.Entry]],
           leaves: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax leaves (whole) from the HF tensors of `modules_to_save` / trained biases; stacked
  leaves keep the base's layers the file does not hold.

  Raises:
    ValueError: for a tensor whose shape does not fit the model.
  """
  parts: dict[str, dict] = collections.defaultdict(dict)
  problems = []
  for key, value in full_tensors.items():
    for e in by_key[key]:
      if e.hf_shape is not None and tuple(value.shape) != tuple(e.hf_shape):
        problems.append(f'{key}: {tuple(value.shape)}, expected {tuple(e.hf_shape)}')
        break
      piece = value if e.columns is None else value[..., e.columns[0]:e.columns[1]]
      piece = e.transform(piece) if e.transform is not None else piece
      parts[e.path][e.index] = piece
  if problems:
    raise ValueError('Saved modules do not fit the model: ' + '; '.join(problems[:20]))
  out = {}
  for path, got in parts.items():
    leaf = leaves[path]
    base = np.asarray(quant.dequantize_array(leaf) if quant.is_quantized(leaf) else leaf)
    if None in got:
      value = got[None]
    else:
      value = base.copy()
      for i, piece in got.items():
        value[i] = piece
    if tuple(value.shape) != tuple(base.shape):
      raise ValueError(f'Saved tensor for {path!r} has shape {tuple(value.shape)}; the model '
                       f'has {tuple(base.shape)}.')
    out[path] = value.astype(base.dtype)
  return out
