"""`load_peft`: a Hugging Face PEFT LoRA adapter directory as a spec and an adapter tree."""

from __future__ import annotations

import collections
import os
import re
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from lorax_jax import paths
from lorax_jax import spec as spec_lib
from lorax_jax.interop import codecs
from lorax_jax.interop import full as full_lib
from lorax_jax.interop import hf_layout
from lorax_jax.interop import schema
from lorax_jax.models import hf
from lorax_jax.variants import FullParams


def load_peft(directory: str, params: Any, name_map: Any, *, module_prefix: str = '',
              exclude: Sequence[str] = (),
              dtype: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a Hugging Face PEFT LoRA adapter into a spec and an adapter tree for `params`.

  Modules of the file that the name map does not know (no entry for any of their tensors) are
  skipped, with one `UserWarning` naming their tensors: e.g. `target_modules=['dense', ...]` on
  `BertModel` also adapts `pooler.dense`, which the encoder's `last_hidden_state` does not use
  and `hf_mapping('bert', ...)` leaves out. Modules the name map knows must fit: missing parts,
  wrong shapes and ranks are errors. A file none of whose modules the map knows is an error (a
  wrong `module_prefix`, or the adapter of another model).

  Args:
    directory: holds `adapter_config.json` and `adapter_model.safetensors`.
    params: the base parameters the adapter belongs to (shapes, dtypes; DoRA's norms for stacked
      layers PEFT did not adapt).
    name_map: the model's name map (see `lorax_jax.interop`).
    module_prefix: the prefix of the HF module names in the file (e.g. `'bert.'` for a
      `BertForSequenceClassification` adapter and `BertModel`'s name map).
    exclude: regexes (`re.search`) of modules to leave out, silently: a module is left out when
      one matches its name as the file has it (after `base_model.model.`, `module_prefix`
      included, e.g. `r'^pooler\\.'`) or a '/'-joined path it maps to (so `save_peft`'s
      `exclude=` works here too). Like `save_peft`, a regex that matches nothing is no error.
    dtype: adapter dtype (default: the base leaf's).

  Returns:
    `(spec, adapters)`: `lora(fn)(join(params, adapters), ...)` runs the adapted model; LoRA and
    rsLoRA leaves are variant `lora`, DoRA leaves `dora`, `modules_to_save` and trained biases are
    `full` leaves.

  Raises:
    ValueError: for a name map or `exclude` regex that is not one, what `read_peft_config`
      refuses, a missing or corrupt safetensors file,
      tensors holding NaN or inf (named), tensor names that are not PEFT's, missing tensors or
      wrong shapes of modules the name map knows, ranks that do not match the config, or a file
      with nothing the name map knows.
  """
  exclude = hf_layout.excludes(exclude)
  config = schema.read_peft_config(directory)
  tensors = hf.load_safetensors(os.path.join(directory, schema.WEIGHTS_NAME))
  _check_finite(directory, tensors)
  by_module, by_key = _index(hf_layout.name_map_entries(name_map, params))
  lora, full_tensors = _split(directory, tensors, by_module, by_key, module_prefix, exclude)
  codec = codecs.codec(bool(config.get('use_dora')))
  per_path = _modules(directory, codec, lora, by_module, config, module_prefix)
  leaves = {p: l for p, _, l in paths.leaves_with_paths(params)}
  rules, arrays = _lora_rules(codec, per_path, leaves, config)
  full_values = full_lib.decode(full_tensors, by_key, leaves)
  overlap = sorted(set(full_values) & set(arrays))
  if overlap:
    raise ValueError(f'{directory}: {overlap[:10]} are both adapted and saved whole.')
  rules += [(f'^{re.escape(p)}$', 'full') for p in full_values]
  if not rules:
    raise ValueError(f'{directory}: the adapter holds no tensors.')
  spec = spec_lib.make_spec(params, rules)
  specs = spec_lib.spec_leaves(spec)
  out = {}
  for path, (layers, rank, scale) in arrays.items():
    s = specs[path]
    out[tuple(path.split('/'))] = codecs.assemble(codecs.CODECS[s.variant], s, layers, rank,
                                                  scale, leaves[path], dtype)
  for path, value in full_values.items():
    out[tuple(path.split('/'))] = FullParams(jax.numpy.asarray(value), specs[path])
  return spec, paths.nest(out)


def _index(entries: list[hf.Entry]) -> tuple[dict, dict]:
  """`({module: [weight entries]}, {tensor name: [entries]})` under both names of a module."""
  weights = hf_layout.weight_entries(entries)
  by_module: dict[str, list[hf.Entry]] = collections.defaultdict(list)
  by_key: dict[str, list[hf.Entry]] = collections.defaultdict(list)
  for e in entries:
    param = e.hf_key.rsplit('.', 1)[1]
    # PEFT files name modules as the torch model does; older files may use checkpoint names.
    for module in dict.fromkeys((e.torch_module, e.module)):
      by_key[f'{module}.{param}'].append(e)
      if e.hf_key.endswith('.weight') and e.path in weights:
        by_module[module].append(e)
  return by_module, by_key


def _check_finite(directory: str, tensors: dict) -> None:
  """Raises for tensors holding NaN or inf (a diverged run, or a corrupt file).

  Raises:
    ValueError: naming every such tensor and how many entries are not finite.
  """
  bad = []
  for key, value in sorted(tensors.items()):
    value = np.asarray(value)
    if value.dtype.kind in 'fcV':  # 'V': ml_dtypes' bfloat16 / float8
      finite = np.isfinite(value)
      if not finite.all():
        bad.append(f'{key} ({int(finite.size - finite.sum())} of {finite.size} entries)')
  if bad:
    raise ValueError(f'{directory}: tensors holding NaN or inf: {bad[:20]}; the file is corrupt '
                     'or was saved from a diverged run.')


def _parse(file_name: str) -> tuple[str, str | None]:
  """`(module, part)` of a tensor name (after `base_model.model.`): part `'a'`, `'b'`, `'m'` for
  LoRA tensors, None for whole tensors (`modules_to_save`, biases)."""
  for suffix, part in schema.SUFFIXES.items():
    if file_name.endswith('.' + suffix):
      return file_name[:-len(suffix) - 1], part
  return file_name.rsplit('.', 1)[0], None


def _split(directory: str, tensors: dict, by_module: dict, by_key: dict, module_prefix: str,
           exclude: Sequence[re.Pattern]) -> tuple[dict, dict]:
  """`({module: {part: array}}, {tensor name: array})`: the LoRA parts and the whole tensors of
  the modules the name map knows and `exclude` keeps; the others are skipped with a warning.

  Raises:
    ValueError: for tensor names that are not PEFT's (no `base_model.model.`), tensors the name
      map lacks in modules it knows, or a file with no module the name map knows.
  """
  known = {k.rsplit('.', 1)[0] for k in by_key}
  lora: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  full_tensors, not_peft, misfit, skipped = {}, [], [], []
  for key, value in tensors.items():
    if not key.startswith(schema.PREFIX):
      not_peft.append(key)
      continue
    file_name = key[len(schema.PREFIX):].replace('.base_layer.', '.')
    file_module, part = _parse(file_name)
    ours = file_module.startswith(module_prefix)
    module, name = file_module[len(module_prefix):], file_name[len(module_prefix):]
    targets = ([f'{module}.weight'] if part else [name]) if ours else []
    if any(rx.search(file_module) or
           any(rx.search(e.path) for k in targets for e in by_key.get(k, ()))
           for rx in exclude):
      continue
    if not ours:
      skipped.append(key)
    elif part is not None:
      if module in by_module:
        lora[module][part] = np.asarray(value)
      elif module in known:
        misfit.append(f'{key} (the name map has no weight of this module)')
      else:
        skipped.append(key)
    elif name in by_key:
      full_tensors[name] = np.asarray(value)
    elif module in known:
      misfit.append(f'{key} (the name map knows other tensors of this module)')
    else:
      skipped.append(key)
  if not_peft or misfit:
    raise ValueError(
        f'{directory}: tensors the name map does not know: {(not_peft + misfit)[:20]} '
        f'(PEFT names tensors {schema.PREFIX}<module>...; module_prefix={module_prefix!r}).')
  if skipped and not lora and not full_tensors:
    raise ValueError(
        f'{directory}: no tensor of the file belongs to a module the name map knows: '
        f'{sorted(skipped)[:10]} (module_prefix={module_prefix!r}; the map knows e.g. '
        f'{sorted(by_module)[:5]}).')
  if skipped:
    warnings.warn(
        f'{directory}: skipping {len(skipped)} tensors of modules the name map does not know: '
        f'{sorted(skipped)[:20]}. Pass exclude= to skip them silently.', UserWarning,
        stacklevel=3)
  return lora, full_tensors


def _modules(directory: str, codec: codecs.LoraCodec, lora: dict, by_module: dict,
             config: dict, module_prefix: str) -> dict[str, dict]:
  """`{path: {layer index: (entry, A (r, in), B (out, r), magnitude, rank, alpha, scale)}}`
  from the LoRA modules of the file, checked against the model and the config.

  Raises:
    ValueError: listing every module whose tensors do not fit.
  """
  rslora = bool(config.get('use_rslora'))
  r0, alpha0 = config.get('r', 8), config.get('lora_alpha', 8)
  rank_pattern, alpha_pattern = config.get('rank_pattern') or {}, config.get('alpha_pattern') or {}
  problems = []
  per_path: dict[str, dict[Any, tuple]] = collections.defaultdict(dict)
  for module, parts in sorted(lora.items()):
    members = by_module[module]
    first = members[0]
    problem = codecs.missing_parts(codec, module, parts)
    a, b = parts.get('a'), parts.get('b')
    rank = a.shape[0] if a is not None and a.ndim else 0
    want_a, want_b = codecs.expected_factors(first, rank)
    if problem is None and (a.shape != want_a or b.shape != want_b):
      problem = (f'{module}: lora_A {a.shape} / lora_B {b.shape}, expected {want_a} / {want_b} '
                 f'for the {first.module_kind()} weight {first.hf_shape}')
    problem = problem or codec.check(module, parts, want_b[0])
    want_rank = schema.pattern_value(rank_pattern, module_prefix + module, r0)
    if problem is None and rank != want_rank:
      problem = f'{module}: tensors have rank {rank}, the config says {want_rank}'
    if problem is not None:
      problems.append(problem)
      continue
    alpha = float(schema.pattern_value(alpha_pattern, module_prefix + module, alpha0))
    scale = schema.module_scale(alpha, rank, rslora)
    a2 = a.reshape(rank, -1).astype(np.float64)
    b2 = b.reshape(want_b[0], rank).astype(np.float64)
    for entry in members:
      per_path[entry.path][entry.index] = (entry, a2, b2, parts.get('m'), rank, alpha, scale)
  if problems:
    raise ValueError(f'{directory}: adapter tensors do not fit the model:\n  ' +
                     '\n  '.join(problems[:20]))
  return per_path


def _lora_rules(codec: codecs.LoraCodec, per_path: dict, leaves: dict,
                config: dict) -> tuple[list, dict]:
  """`(rules, {path: (layers, rank, scale)})`: a `make_spec` rule per adapted leaf (stacked
  layers of different ranks or scales are padded to the largest rank, scales folded into B)."""
  rslora = bool(config.get('use_rslora'))
  dropout = float(config.get('lora_dropout') or 0.0)
  rules, arrays = [], {}
  for path, layers in per_path.items():
    leaf = leaves[path]
    entry0 = next(iter(layers.values()))[0]
    batch, ins, outs = hf_layout.leaf_axes(entry0, np.shape(leaf))
    ranks = {v[4] for v in layers.values()}
    scales = {v[6] for v in layers.values()}
    stacked = entry0.index is not None
    if not stacked or (len(ranks) == 1 and len(scales) == 1 and
                       len(layers) == np.shape(leaf)[0]):
      _, _, _, _, rank, alpha, scale = next(iter(layers.values()))
    else:  # stacked layers with different ranks / scales, or some not adapted: pad and fold
      rank, scale = max(ranks), next(iter(layers.values()))[6]
      alpha = schema.module_scale_alpha(scale, rank, rslora)
    setting = dict(variant=codec.variants[0], rank=int(rank), alpha=float(alpha),
                   scaling='rslora' if rslora else 'alpha/r', dropout=dropout,
                   batch_axes=batch, in_axes=ins, out_axes=outs)
    rules.append((f'^{re.escape(path)}$', setting))
    arrays[path] = (layers, rank, scale)
  return rules, arrays
