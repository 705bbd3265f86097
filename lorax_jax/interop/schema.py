"""The PEFT LoRA schema: file and tensor names, the config fields and their defaults, what
`load_peft` refuses, and PEFT's rank/alpha pattern rules."""

from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

from lorax_jax import inits

CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
# The PEFT release whose LoRA config fields `save_peft` writes.
PEFT_FORMAT_VERSION = '0.21.2'
# Every field PEFT 0.21 writes to a LoRA adapter_config.json, with its default.
LORA_DEFAULTS: dict[str, Any] = {
    'task_type': None, 'peft_type': 'LORA', 'auto_mapping': None, 'peft_version': None,
    'base_model_name_or_path': None, 'revision': None, 'inference_mode': True, 'r': 8,
    'target_modules': None, 'exclude_modules': None, 'lora_alpha': 8, 'lora_dropout': 0.0,
    'fan_in_fan_out': False, 'bias': 'none', 'use_rslora': False, 'modules_to_save': None,
    'init_lora_weights': True, 'layers_to_transform': None, 'layers_pattern': None,
    'rank_pattern': {}, 'alpha_pattern': {}, 'megatron_config': None,
    'megatron_core': 'megatron.core', 'trainable_token_indices': None, 'loftq_config': {},
    'eva_config': None, 'corda_config': None, 'lora_ga_config': None, 'use_dora': False,
    'velora_config': None, 'alora_invocation_tokens': None, 'use_qalora': False,
    'qalora_group_size': 16, 'monteclora_config': None, 'layer_replication': None,
    'lora_bias': False, 'target_parameters': None, 'use_bdlora': None, 'arrow_config': None,
    'kasa_config': None, 'ensure_weight_tying': False,
}
# Fields that change the adapted model's math and that `load_peft` does not implement: a value
# other than these defaults is refused.
UNSUPPORTED = {
    'lora_bias': False, 'use_qalora': False, 'alora_invocation_tokens': None,
    'layer_replication': None, 'target_parameters': None, 'use_bdlora': None,
    'arrow_config': None, 'kasa_config': None, 'trainable_token_indices': None,
    'monteclora_config': None,
}
# Tensor name suffixes of a LoRA module -> the part they hold (A, B, DoRA's magnitude).
SUFFIXES = {'lora_A.weight': 'a', 'lora_B.weight': 'b', 'lora_embedding_A': 'a',
            'lora_embedding_B': 'b', 'lora_magnitude_vector': 'm'}
PART_NAMES = {'a': 'lora_A', 'b': 'lora_B', 'm': 'lora_magnitude_vector'}


def _empty(value: Any) -> bool:
  return value is None or value is False or value == {} or value == [] or value == ''


def tensor_name(module: str, part: str, kind: str) -> str:
  """The file's name of a LoRA module's part (`'a'`, `'b'`, `'m'`) for a module of `kind`."""
  if part == 'm':
    return f'{PREFIX}{module}.lora_magnitude_vector'
  if kind == 'embedding':
    return f'{PREFIX}{module}.lora_embedding_{part.upper()}'
  return f'{PREFIX}{module}.lora_{part.upper()}.weight'


def module_scale_alpha(scale: float, rank: int, rslora: bool) -> float:
  """PEFT's `lora_alpha` of a module whose adapter has `scale` at `rank`."""
  return scale * (math.sqrt(rank) if rslora else rank)


def module_scale(alpha: float, rank: int, rslora: bool) -> float:
  """The scale PEFT applies for `lora_alpha` at `rank`."""
  return alpha / (math.sqrt(rank) if rslora else rank)


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
  """PEFT's `get_pattern_key`: the first key `k` with `re.match(rf'(.*\\.)?({k})$', name)`."""
  for key, value in patterns.items():
    if re.match(rf'(.*\.)?({key})$', name):
      return value
  return default


def pattern_keys(modules: Sequence[str]) -> dict[str, str]:
  """Pattern keys for `rank_pattern` / `alpha_pattern`: the module names, escaped if a plain name
  would also match another module under PEFT's rule."""
  plain = {m: m for m in modules}
  for m in modules:
    for other in modules:
      if other != m and re.match(rf'(.*\.)?({m})$', other):
        return {x: re.escape(x) for x in modules}
  return plain


def _most_common(values, default):
  return collections.Counter(values).most_common(1)[0][0] if values else default


def lora_config(ranks: Mapping[str, int], alphas: Mapping[str, float], *, dropouts: Sequence[float],
                kinds: set, rslora: bool, use_dora: bool, lora_biases: bool,
                modules_to_save: Sequence[str], task_type: str | None,
                base_model_name_or_path: str | None) -> dict[str, Any]:
  """A complete PEFT LoRA config: the most common rank and alpha as `r` / `lora_alpha`, the
  others as `rank_pattern` / `alpha_pattern` (keys: module names)."""
  r = _most_common(list(ranks.values()), LORA_DEFAULTS['r'])
  alpha = _most_common(list(alphas.values()), LORA_DEFAULTS['lora_alpha'])
  keys = pattern_keys(sorted(ranks))
  config = dict(LORA_DEFAULTS)
  config.update(
      task_type=task_type, base_model_name_or_path=base_model_name_or_path,
      peft_version=f'{PEFT_FORMAT_VERSION}@lorax_jax', r=int(r),
      lora_alpha=float(alpha) if not float(alpha).is_integer() else int(alpha),
      target_modules=sorted(ranks), use_rslora=rslora, use_dora=use_dora,
      lora_dropout=_most_common(list(dropouts), 0.0),
      fan_in_fan_out=kinds == {'conv1d'}, bias='lora_only' if lora_biases else 'none',
      modules_to_save=list(modules_to_save) or None,
      rank_pattern={keys[m]: int(v) for m, v in ranks.items() if v != r},
      alpha_pattern={keys[m]: float(v) for m, v in alphas.items() if v != alpha})
  return config


def write_config(directory: str, config: Mapping[str, Any]) -> None:
  with open(os.path.join(directory, CONFIG_NAME), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)


def read_peft_config(directory: str) -> dict[str, Any]:
  """The adapter_config.json of a PEFT adapter directory, checked for what `load_peft` supports.

  Raises:
    ValueError: for a missing or invalid file, a `peft_type` other than LORA, a config field
      that changes the math and is not supported (named), or an unknown field with a value.
  """
  path = os.path.join(directory, CONFIG_NAME)
  try:
    with open(path) as f:
      config = json.load(f)
  except FileNotFoundError:
    raise ValueError(f'No PEFT adapter config at {path}.') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from None
  if not isinstance(config, dict):
    raise ValueError(f'{path} must hold a JSON object, got {type(config).__name__}.')
  _check_fields(path, config)
  return config


def _check_fields(path: str, config: dict[str, Any]) -> None:
  peft_type = config.get('peft_type')
  if peft_type != 'LORA':
    raise ValueError(f'{path}: peft_type={peft_type!r} is not supported; load_peft reads '
                     "'LORA' adapters (LoRA, rsLoRA, DoRA).")
  bad = {k: config[k] for k in UNSUPPORTED if not _empty(config.get(k))}
  if bad:
    raise ValueError(f'{path}: config fields that change the math and are not supported: {bad} '
                     f'(supported: {UNSUPPORTED}).')
  unknown = {k: v for k, v in config.items() if k not in LORA_DEFAULTS and not _empty(v)}
  if unknown:
    raise ValueError(f'{path}: unknown config fields {sorted(unknown)} (from a newer PEFT?) with '
                     'values that may change the math; refusing to guess.')
  init = config.get('init_lora_weights', True)
  if inits.changes_base(init):
    raise ValueError(
        f"{path}: init_lora_weights={init!r}: this adapter belongs to PEFT's residual (or "
        'quantized) base, not to the original weights. Save it from PEFT with '
        'path_initial_model_for_weight_conversion= to get a LoRA of the original base.')
  if config.get('bias', 'none') not in ('none', 'all', 'lora_only'):
    raise ValueError(f"{path}: bias={config['bias']!r}; allowed: 'none', 'all', 'lora_only'.")
  for key in ('r', 'lora_alpha'):
    value = config.get(key, 1)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise ValueError(f'{path}: {key}={value!r} must be a number.')
    if not (math.isfinite(value) and value > 0):
      raise ValueError(f'{path}: {key}={value!r} must be a finite number > 0.')
