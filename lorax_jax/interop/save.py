"""`save_peft`: an adapter tree as a Hugging Face PEFT LoRA adapter directory."""

from __future__ import annotations

import collections
import math
import os
from typing import Any, Sequence

import numpy as np

from lorax_jax import adapters as adapters_lib
from lorax_jax import inits
from lorax_jax import paths
from lorax_jax import spec as spec_lib
from lorax_jax.interop import codecs
from lorax_jax.interop import full as full_lib
from lorax_jax.interop import hf_layout
from lorax_jax.interop import schema
from lorax_jax.models import hf

LORA_VARIANTS = codecs.LORA.variants


def save_peft(directory: str, adapters: Any, spec: Any, name_map: Any, *, params: Any = None,
              module_prefix: str = '', exclude: Sequence[str] = (), task_type: str | None = None,
              base_model_name_or_path: str | None = None, dtype: Any = None) -> dict[str, Any]:
  """Writes `adapters` as a Hugging Face PEFT LoRA adapter (`adapter_config.json` +
  `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(hf_model, directory)` loads.

  Args:
    directory: created if needed; existing adapter files are overwritten.
    adapters: the adapter tree (`init` / training).
    spec: its spec (`make_spec`); checked against the adapters.
    name_map: the model's name map (see `lorax_jax.interop`).
    params: the base parameters; needed only when a `modules_to_save` module has tensors that
      are not fully trained (e.g. a head whose kernel is trained and bias frozen). A
      `{path: module}` name map takes its shapes from the adapters when `params` is not given.
    module_prefix: prepended to every HF module name (e.g. `'bert.'` when PEFT wraps a
      `BertForSequenceClassification` while the name map is `BertModel`'s).
    exclude: regexes of adapter paths to leave out of the file (e.g. a head with no HF module).
    task_type / base_model_name_or_path: PEFT's config fields of the same names.
    dtype: tensor dtype in the file (default: float32, or the adapters' float16/float64).

  Returns:
    The config dict written.

  Raises:
    ValueError: for a `directory` that is a file, an `exclude` regex that is not one, a variant
      PEFT has no LoRA format for, an adapter against a residual base,
      adapted paths with no entry in the name map, DoRA mixed with LoRA (PEFT's `use_dora` is
      global), or a fused module that DoRA adapts only in part.
  """
  flat = paths.flat(adapters, is_leaf=adapters_lib.is_adapter)
  exclude = hf_layout.excludes(exclude)
  flat = {p: a for p, a in flat.items() if not any(rx.search(p) for rx in exclude)}
  # A {path: module} map takes its shapes from `params`, else from the adapters' specs.
  shapes = {p: tuple(a.spec.shape) for p, a in flat.items() if hasattr(a, 'spec')}
  entries = hf_layout.name_map_entries(name_map, params, shapes=shapes)
  by_key: dict[str, list[hf.Entry]] = {}
  for e in entries:
    by_key.setdefault(e.hf_key, []).append(e)
  lora_members, full = _members(flat, spec_lib.spec_leaves(spec), entries)
  codec = codecs.codec(_use_dora(lora_members))
  rslora = {a.spec.scaling for ms in lora_members.values() for _, a in ms} == {'rslora'}
  tensors, ranks, alphas, dropouts, kinds = {}, {}, {}, [], set()
  for module, members in sorted(lora_members.items()):
    name = module_prefix + module
    tensors.update(_module_tensors(codec, name, members, by_key, dtype))
    ranks[name] = sum(a.spec.rank for _, a in members)
    alphas[name] = schema.module_scale_alpha(members[0][1].spec.scale, ranks[name], rslora)
    dropouts += [a.spec.dropout for _, a in members]
    kinds.add(members[0][0].module_kind())
  full_tensors, lora_biases, to_save = full_lib.encode(entries, full, set(lora_members), params,
                                                       module_prefix, dtype)
  tensors.update(full_tensors)
  if not ranks:
    raise ValueError('Nothing for PEFT to adapt: a PEFT LoRA adapter needs at least one LoRA or '
                     'DoRA leaf in the name map (modules_to_save alone do not load).')
  config = schema.lora_config(
      ranks, alphas, dropouts=dropouts, kinds=kinds, rslora=rslora, use_dora=codec.use_dora,
      lora_biases=bool(lora_biases), modules_to_save=[module_prefix + m for m in to_save],
      task_type=task_type, base_model_name_or_path=base_model_name_or_path)
  hf_layout.output_directory(directory)
  hf.save_safetensors(tensors, os.path.join(directory, schema.WEIGHTS_NAME))
  schema.write_config(directory, config)
  return config


def _members(flat: dict[str, Any], specs: dict[str, Any], entries: Sequence[hf.Entry]):
  """`({torch module: [(entry, adapter)]}, {path: full adapter})`, checked for what PEFT holds.

  Raises:
    ValueError: for adapters the spec does not know, variants without a PEFT codec, adapters
      against a residual base, or adapted paths with no entry in the name map.
  """
  extra = sorted(set(flat) - set(specs))
  if extra:
    raise ValueError(f'Adapters at paths the spec does not adapt: {extra[:20]}')
  weights = hf_layout.weight_entries(entries)
  unmapped, lora_members, full = [], collections.defaultdict(list), {}
  for path, ad in flat.items():
    s = ad.spec
    if s.variant == spec_lib.FULL:
      full[path] = ad
      if not any(e.path == path for e in entries):
        unmapped.append(path)
      continue
    if s.variant not in codecs.CODECS:
      raise ValueError(
          f'{path!r} uses variant {s.variant!r}, which has no PEFT LoRA format: save_peft '
          f"writes 'lora', 'lora_fa' (as LoRA), 'dora' and 'full' leaves (modules_to_save). "
          'Leave it out with exclude=, or keep the native (orbax) format.')
    if inits.get(s.init).changes_base:
      raise ValueError(
          f'{path!r} was initialized with {s.init!r}, so it adapts a changed base (the residual '
          'W - s*A0@B0, or a quantized W), not the original weights PEFT would load it onto. '
          'Convert it first: save_peft(..., lj.to_lora(trained, initial), ...) (a rank-2r LoRA '
          "of the original base; PEFT's path_initial_model_for_weight_conversion).")
    if path not in weights:
      unmapped.append(path)
      continue
    for entry in weights[path]:
      lora_members[entry.torch_module].append((entry, ad))
  if unmapped:
    raise ValueError(f'Adapted paths with no Hugging Face name in the name map: {unmapped[:20]}; '
                     'pass exclude= to leave them out.')
  return lora_members, full


def _use_dora(lora_members: dict[str, list]) -> bool:
  """Whether the file is DoRA (PEFT's `use_dora` holds for every module, so all or none)."""
  dora_modules = {m for m, ms in lora_members.items()
                  if any(codecs.CODECS[a.spec.variant].use_dora for _, a in ms)}
  if dora_modules and dora_modules != set(lora_members):
    raise ValueError(
        "PEFT's use_dora applies to every adapted module; these are DoRA: "
        f'{sorted(dora_modules)[:10]}, these are not: '
        f'{sorted(set(lora_members) - dora_modules)[:10]}.')
  return bool(dora_modules)


def _module_tensors(codec: codecs.LoraCodec, name: str, members: list, by_key: dict,
                    dtype: Any) -> dict[str, np.ndarray]:
  """The file tensors of one LoRA module (`name` with its prefix) from its members' adapters."""
  first = members[0][0]
  in_shape, d_out, hf_shape = hf_layout.module_shapes(first)
  d_in = math.prod(in_shape)
  parts = codec.encode(members, d_in, d_out, by_key)
  a0 = members[0][1].a
  out_dtype = dtype or (a0.dtype if str(a0.dtype) in ('float16', 'float64') else np.float32)
  return codecs.hf_tensors(codec, name, first.module_kind(), parts, in_shape, hf_shape,
                           out_dtype)
