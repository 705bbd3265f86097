"""Hugging Face PEFT adapters in and out, and merged Hugging Face exports.

    save_peft(directory, adapters, spec, name_map)          # adapter_config.json + safetensors
    spec, adapters = load_peft(directory, params, name_map)
    export_hf(directory, merge(params, adapters), name_map)  # model.safetensors, HF names

A name map is the model's list of `hf.Entry` (`lorax_jax.models.hf_mapping('bert', config)`, or a
model module's `hf_mapping`), the same one its Hugging Face loader uses; a plain
`{path: hf_module}` dict also works for 2-D `(in, out)` kernels of `nn.Linear` layers. Each
entry's transform says which axis of the Hugging Face weight every kernel axis comes from, so
the layouts follow: PEFT's `lora_A.weight` is `(r, in)` and `lora_B.weight` `(out, r)` (for
GPT-2's `Conv1D` too), embeddings have `lora_embedding_A` `(r, num)` and `lora_embedding_B`
`(dim, r)`, multi-axis attention kernels flatten their in- and out-axes in the order of the HF
weight, stacked (scanned) leaves hold one HF module per layer, and fused modules (GPT-2's
`c_attn`, one Conv1D for query/key/value) hold their members' adapters side by side: a rank
`r_q + r_k + r_v` LoRA with block-diagonal B on save, and one A shared by the members on load.

What maps to what:
  variant `lora` (and `lora_fa`, whose A is frozen)  PEFT LoRA; `scaling='rslora'` ->
                                                  `use_rslora`, other scales by `alpha_pattern`
  variant `dora`                                  `use_dora` + `lora_magnitude_vector`
  `full` leaves                                   `modules_to_save` (whole modules)
  ranks / alphas that differ per module           `rank_pattern` / `alpha_pattern`
Everything else (VeRA, LoHa, LoKr, ... and adapters against a residual base: PiSSA, OLoRA,
LoRA-GA, CorDA, LoftQ, unless converted with `to_lora`) is refused with a `ValueError`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from lorax_jax import adapters as adapters_lib
from lorax_jax import inits
from lorax_jax import paths
from lorax_jax import quant
from lorax_jax import spec as spec_lib
from lorax_jax.models import hf
from lorax_jax.variants import DoraParams, FullParams, LoraParams

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
LORA_VARIANTS = ('lora', 'lora_fa')
_SUFFIXES = {'lora_A.weight': 'a', 'lora_B.weight': 'b', 'lora_embedding_A': 'a',
             'lora_embedding_B': 'b', 'lora_magnitude_vector': 'm'}


def _empty(value: Any) -> bool:
  return value is None or value is False or value == {} or value == [] or value == ''


def _name_map(name_map: Any, params: Any = None) -> list[hf.Entry]:
  """A list of `hf.Entry` from a name map (entries, or `{path: module}` for (in, out) Linears)."""
  if isinstance(name_map, Mapping):
    shapes = ({p: np.shape(l) for p, _, l in paths.leaves_with_paths(params)}
              if params is not None else {})
    out = []
    for path, module in name_map.items():
      shape = shapes.get(path)
      if path.endswith('embedding'):
        out.append(hf.Entry(f'{module}.weight', path, None, shape, kind='embedding'))
      else:
        out.append(hf.Entry(f'{module}.weight', path, np.transpose,
                            None if shape is None else tuple(shape)[::-1], kind='linear'))
    return out
  entries = list(name_map)
  bad = [e for e in entries if not isinstance(e, hf.Entry)]
  if bad:
    raise ValueError(f'A name map is a list of lorax_jax.models.hf.Entry or a {{path: module}} '
                     f'dict; got {bad[0]!r}.')
  return entries


def _weight_entries(entries: Sequence[hf.Entry]) -> dict[str, list[hf.Entry]]:
  """`{path: [entries]}` for the weights (the tensors PEFT adapts) of the name map."""
  out: dict[str, list[hf.Entry]] = {}
  for e in entries:
    if e.hf_key.endswith('.weight'):
      out.setdefault(e.path, []).append(e)
  return out


def _hf_axes(entry: hf.Entry) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(in axes, out axes) of the HF weight (slice)."""
  n = len(entry.slice_shape)
  kind = entry.module_kind()
  if kind not in hf.KINDS:
    raise ValueError(f'Unknown module kind {kind!r} of {entry.hf_key!r}; allowed: {hf.KINDS}.')
  if kind in ('linear', 'conv'):
    return tuple(range(1, n)), (0,)
  return (0,), (1,)


_LAYOUTS: dict[Any, Any] = {}


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


def _layer_axes(entry: hf.Entry, s: spec_lib.LeafSpec) -> tuple[tuple, tuple, tuple]:
  """The per-layer shape and in/out axes of a (possibly stacked) kernel."""
  if entry.index is None:
    if s.batch_axes:
      raise ValueError(f'{entry.path!r} is stacked over axes {s.batch_axes}: its name map needs one '
                       'entry per layer (Entry.index).')
    return s.shape, s.in_axes, s.out_axes
  if s.batch_axes != (0,):
    raise ValueError(f'{entry.path!r}: per-layer name-map entries need the layer axis first '
                     f'(batch_axes (0,)), got {s.batch_axes}.')
  return s.shape[1:], tuple(a - 1 for a in s.in_axes), tuple(a - 1 for a in s.out_axes)


def _flat_hf(entry: hf.Entry) -> tuple[np.ndarray, np.ndarray]:
  """For every element of the per-layer leaf: its flat HF in-index and out-index."""

  def compute():
    j = hf.index_map(entry)
    shape = entry.slice_shape
    coords = np.unravel_index(j, shape)
    hf_in, hf_out = _hf_axes(entry)
    flat = lambda axes: np.ravel_multi_index([coords[a] for a in axes],
                                             [shape[a] for a in axes])
    return flat(hf_in), flat(hf_out)
  return compute()   # leaf-sized: not cached (layout and _leaf_axes cache what they derive)


def layout(entry: hf.Entry, s: spec_lib.LeafSpec) -> tuple[np.ndarray, np.ndarray]:
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
    raise ValueError(f'The in/out axes of {entry.path!r} (in {s.in_axes}, out {s.out_axes}) do not '
                     f'match the in/out axes of the Hugging Face weight {entry.hf_key!r}.')
  return perm_in, perm_out


def _leaf_axes(entry: hf.Entry, leaf_shape) -> tuple[tuple, tuple, tuple]:
  """(batch, in, out) axes of a leaf from the name map alone (for load_peft's spec)."""
  return _cached(_AXES, _layout_key(entry, entry.index is not None, tuple(leaf_shape)),
                 lambda: _leaf_axes_uncached(entry, leaf_shape))


_AXES: dict[Any, Any] = {}


def _leaf_axes_uncached(entry: hf.Entry, leaf_shape) -> tuple[tuple, tuple, tuple]:
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


def _np(x, dtype=None) -> np.ndarray:
  x = np.asarray(jax.device_get(x))
  if dtype is not None:
    return x.astype(dtype)
  return x if x.dtype in (np.float32, np.float64, np.float16) else x.astype(np.float32)


def _module_scale_alpha(scale: float, rank: int, rslora: bool) -> float:
  return scale * (math.sqrt(rank) if rslora else rank)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
  """PEFT's `get_pattern_key`: the first key `k` with `re.match(rf'(.*\\.)?({k})$', name)`."""
  for key, value in patterns.items():
    if re.match(rf'(.*\.)?({key})$', name):
      return value
  return default


def _pattern_keys(modules: Sequence[str]) -> dict[str, str]:
  """Pattern keys for `rank_pattern` / `alpha_pattern`: the module names, escaped if a plain name
  would also match another module under PEFT's rule."""
  plain = {m: m for m in modules}
  for m in modules:
    for other in modules:
      if other != m and re.match(rf'(.*\.)?({m})$', other):
        return {x: re.escape(x) for x in modules}
  return plain


def save_peft(directory: str, adapters: Any, spec: Any, name_map: Any, *, params: Any = None,
              module_prefix: str = '', exclude: Sequence[str] = (), task_type: str | None = None,
              base_model_name_or_path: str | None = None, dtype: Any = None) -> dict[str, Any]:
  """Writes `adapters` as a Hugging Face PEFT LoRA adapter (`adapter_config.json` +
  `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(hf_model, directory)` loads.

  Args:
    directory: created if needed; existing adapter files are overwritten.
    adapters: the adapter tree (`init` / training).
    spec: its spec (`make_spec`); checked against the adapters.
    name_map: the model's name map (see the module docstring).
    params: the base parameters; needed only when a `modules_to_save` module has tensors that
      are not fully trained (e.g. a head whose kernel is trained and bias frozen).
    module_prefix: prepended to every HF module name (e.g. `'bert.'` when PEFT wraps a
      `BertForSequenceClassification` while the name map is `BertModel`'s).
    exclude: regexes of adapter paths to leave out of the file (e.g. a head with no HF module).
    task_type / base_model_name_or_path: PEFT's config fields of the same names.
    dtype: tensor dtype in the file (default: float32, or the adapters' float16/float64).

  Returns:
    The config dict written.

  Raises:
    ValueError: for a variant PEFT has no LoRA format for, an adapter against a residual base,
      adapted paths with no entry in the name map, DoRA mixed with LoRA (PEFT's `use_dora` is
      global), or a fused module that DoRA adapts only in part.
  """
  entries = _name_map(name_map, params)
  weights = _weight_entries(entries)
  by_key: dict[str, list[hf.Entry]] = {}
  for e in entries:
    by_key.setdefault(e.hf_key, []).append(e)
  specs = spec_lib.spec_leaves(spec)
  flat = paths.flat(adapters, is_leaf=adapters_lib.is_adapter)
  flat = {p: a for p, a in flat.items() if not any(re.search(rx, p) for rx in exclude)}
  extra = sorted(set(flat) - set(specs))
  if extra:
    raise ValueError(f'Adapters at paths the spec does not adapt: {extra[:20]}')
  unmapped, lora_members, full = [], collections.defaultdict(list), {}
  for path, ad in flat.items():
    s = ad.spec
    if s.variant == spec_lib.FULL:
      full[path] = ad
      if not any(e.path == path for e in entries):
        unmapped.append(path)
      continue
    if s.variant not in LORA_VARIANTS + ('dora',):
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
  dora_modules = {m for m, ms in lora_members.items() if any(a.spec.variant == 'dora'
                                                              for _, a in ms)}
  if dora_modules and dora_modules != set(lora_members):
    raise ValueError(
        "PEFT's use_dora applies to every adapted module; these are DoRA: "
        f'{sorted(dora_modules)[:10]}, these are not: '
        f'{sorted(set(lora_members) - dora_modules)[:10]}.')
  use_dora = bool(dora_modules)
  scalings = {a.spec.scaling for ms in lora_members.values() for _, a in ms}
  rslora = scalings == {'rslora'}
  tensors: dict[str, np.ndarray] = {}
  ranks, alphas, dropouts, kinds = {}, {}, [], set()
  for module, members in sorted(lora_members.items()):
    name = module_prefix + module
    first = members[0][0]
    kind = first.module_kind()
    kinds.add(kind)
    hf_shape = first.hf_shape
    hf_in, hf_out = _hf_axes(dataclasses.replace(first, columns=None))
    in_shape = tuple(hf_shape[a] for a in hf_in)
    d_out = math.prod(hf_shape[a] for a in hf_out)
    rank = sum(a.spec.rank for _, a in members)
    s0 = members[0][1].spec.scale
    a_hf = np.zeros((rank, math.prod(in_shape)), np.float64)
    b_hf = np.zeros((d_out, rank), np.float64)
    m_hf = np.full((d_out,), np.nan)
    offset = 0
    for entry, ad in members:
      s = ad.spec
      perm_in, perm_out = layout(entry, s)
      if entry.columns is not None:
        if hf_out != (len(hf_shape) - 1,):
          raise ValueError(f'{entry.hf_key!r}: column slices must be on the out axis.')
        perm_out = perm_out + entry.columns[0]
      take = (lambda x: x) if entry.index is None else (lambda x, i=entry.index: x[i])
      a2 = _np(take(ad.a), np.float64).reshape(len(perm_in), s.rank)
      b2 = _np(take(ad.b), np.float64).reshape(s.rank, len(perm_out))
      a_hf[offset:offset + s.rank][:, perm_in] = a2.T
      b_hf[perm_out, offset:offset + s.rank] = b2.T * (s.scale / s0)
      if use_dora:
        m_hf[perm_out] = _np(take(ad.magnitude), np.float64).reshape(-1)
      offset += s.rank
      dropouts.append(s.dropout)
    if use_dora and np.isnan(m_hf).any():
      raise ValueError(f'DoRA adapts only part of the fused module {module!r}; adapt all of its '
                       f'members ({[e.path for e in by_key[first.hf_key]]}) with DoRA.')
    ranks[name] = rank
    alphas[name] = _module_scale_alpha(s0, rank, rslora)
    out_dtype = dtype or (members[0][1].a.dtype if str(members[0][1].a.dtype) in (
        'float16', 'float64') else np.float32)
    if kind == 'embedding':
      tensors[f'{PREFIX}{name}.lora_embedding_A'] = a_hf.astype(out_dtype)
      tensors[f'{PREFIX}{name}.lora_embedding_B'] = b_hf.astype(out_dtype)
    else:
      tensors[f'{PREFIX}{name}.lora_A.weight'] = a_hf.reshape(
          (rank,) + in_shape).astype(out_dtype)
      tail = (1,) * (len(hf_shape) - 2) if kind == 'conv' else ()
      tensors[f'{PREFIX}{name}.lora_B.weight'] = b_hf.reshape(
          (d_out, rank) + tail).astype(out_dtype)
    if use_dora:
      tensors[f'{PREFIX}{name}.lora_magnitude_vector'] = m_hf.astype(out_dtype)
  # Fully trained leaves: biases of LoRA modules as PEFT's bias='lora_only'; the others' whole
  # modules as modules_to_save.
  trained = {e.torch_module for e in entries if e.path in full}
  lora_biases = sorted(trained & set(lora_members))
  bad = [e.path for e in entries if e.path in full and e.torch_module in lora_members and
         not e.hf_key.endswith('.bias')]
  if bad:
    raise ValueError(f'{bad[:10]} are trained fully inside modules that LoRA adapts; PEFT can '
                     'only train the biases of LoRA modules.')
  to_save = sorted(trained - set(lora_members))
  base = {p: l for p, _, l in paths.leaves_with_paths(params)} if params is not None else {}
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
    inner = f'{module}.base_layer' if module in lora_members else module
    for key, value in hf.to_hf(tree, module_entries).items():
      tensors[f'{PREFIX}{module_prefix}{inner}.{key.rsplit(".", 1)[1]}'] = _np(value, dtype)
  if not ranks:
    raise ValueError('Nothing for PEFT to adapt: a PEFT LoRA adapter needs at least one LoRA or '
                     'DoRA leaf in the name map (modules_to_save alone do not load).')
  rank_counts = collections.Counter(ranks.values())
  r = rank_counts.most_common(1)[0][0] if ranks else LORA_DEFAULTS['r']
  alpha_counts = collections.Counter(alphas.values())
  alpha = alpha_counts.most_common(1)[0][0] if alphas else LORA_DEFAULTS['lora_alpha']
  keys = _pattern_keys(sorted(ranks))
  config = dict(LORA_DEFAULTS)
  config.update(
      task_type=task_type, base_model_name_or_path=base_model_name_or_path,
      peft_version=f'{PEFT_FORMAT_VERSION}@lorax_jax', r=int(r),
      lora_alpha=float(alpha) if not float(alpha).is_integer() else int(alpha),
      target_modules=sorted(ranks), use_rslora=rslora, use_dora=use_dora,
      lora_dropout=collections.Counter(dropouts).most_common(1)[0][0] if dropouts else 0.0,
      fan_in_fan_out=kinds == {'conv1d'}, bias='lora_only' if lora_biases else 'none',
      modules_to_save=[module_prefix + m for m in to_save] or None,
      rank_pattern={keys[m]: int(v) for m, v in ranks.items() if v != r},
      alpha_pattern={keys[m]: float(v) for m, v in alphas.items() if v != alpha})
  os.makedirs(directory, exist_ok=True)
  hf.save_safetensors(tensors, os.path.join(directory, WEIGHTS_NAME))
  with open(os.path.join(directory, CONFIG_NAME), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return config


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
    if not isinstance(config.get(key, 1), (int, float)) or isinstance(config.get(key), bool):
      raise ValueError(f'{path}: {key}={config.get(key)!r} must be a number.')
  return config


def load_peft(directory: str, params: Any, name_map: Any, *, module_prefix: str = '',
              dtype: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a Hugging Face PEFT LoRA adapter into a spec and an adapter tree for `params`.

  Args:
    directory: holds `adapter_config.json` and `adapter_model.safetensors`.
    params: the base parameters the adapter belongs to (shapes, dtypes; DoRA's norms for stacked
      layers PEFT did not adapt).
    name_map: the model's name map (see the module docstring).
    module_prefix: the prefix of the HF module names in the file (e.g. `'bert.'` for a
      `BertForSequenceClassification` adapter and `BertModel`'s name map).
    dtype: adapter dtype (default: the base leaf's).

  Returns:
    `(spec, adapters)`: `lora(fn)(join(params, adapters), ...)` runs the adapted model; LoRA and
    rsLoRA leaves are variant `lora`, DoRA leaves `dora`, `modules_to_save` and trained biases are
    `full` leaves.

  Raises:
    ValueError: for what `read_peft_config` refuses, a missing or corrupt safetensors file,
      missing or unknown tensors, modules not in the name map, wrong shapes, or ranks that do not
      match the config.
  """
  config = read_peft_config(directory)
  tensors = hf.load_safetensors(os.path.join(directory, WEIGHTS_NAME))
  entries = _name_map(name_map, params)
  weights = _weight_entries(entries)
  by_module: dict[str, list[hf.Entry]] = collections.defaultdict(list)
  by_key: dict[str, list[hf.Entry]] = collections.defaultdict(list)
  for e in entries:
    param = e.hf_key.rsplit('.', 1)[1]
    # PEFT files name modules as the torch model does; older files may use checkpoint names.
    for module in dict.fromkeys((e.torch_module, e.module)):
      by_key[f'{module}.{param}'].append(e)
      if e.hf_key.endswith('.weight') and e.path in weights:
        by_module[module].append(e)
  leaves = {p: l for p, _, l in paths.leaves_with_paths(params)}
  lora: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  full_tensors, unknown = {}, []
  for key, value in tensors.items():
    if not key.startswith(PREFIX + module_prefix):
      unknown.append(key)
      continue
    name = key[len(PREFIX + module_prefix):].replace('.base_layer.', '.')
    for suffix, part in _SUFFIXES.items():
      if name.endswith('.' + suffix):
        lora[name[:-len(suffix) - 1]][part] = np.asarray(value)
        break
    else:
      if name in by_key:
        full_tensors[name] = np.asarray(value)
      else:
        unknown.append(key)
  not_mapped = sorted(m for m in lora if m not in by_module)
  if unknown or not_mapped:
    raise ValueError(
        f'{directory}: tensors the name map does not know: '
        f'{(unknown + [PREFIX + module_prefix + m for m in not_mapped])[:20]} (module_prefix='
        f'{module_prefix!r}; the map knows e.g. {sorted(by_module)[:5]}).')
  use_dora, rslora = bool(config.get('use_dora')), bool(config.get('use_rslora'))
  r0, alpha0 = config.get('r', 8), config.get('lora_alpha', 8)
  rank_pattern, alpha_pattern = config.get('rank_pattern') or {}, config.get('alpha_pattern') or {}
  problems = []
  per_path: dict[str, dict[Any, tuple]] = collections.defaultdict(dict)
  for module, parts in sorted(lora.items()):
    members = by_module[module]
    first = members[0]
    want = ('a', 'b', 'm') if use_dora else ('a', 'b')
    missing = [p for p in want if p not in parts]
    if missing:
      names = {'a': 'lora_A', 'b': 'lora_B', 'm': 'lora_magnitude_vector'}
      problems.append(f'{module}: missing {[names[p] for p in missing]}')
      continue
    if 'm' in parts and not use_dora:
      problems.append(f'{module}: has lora_magnitude_vector but use_dora is false')
      continue
    hf_shape = first.hf_shape
    hf_in, hf_out = _hf_axes(dataclasses.replace(first, columns=None))
    in_shape = tuple(hf_shape[a] for a in hf_in)
    d_out = math.prod(hf_shape[a] for a in hf_out)
    a, b = parts['a'], parts['b']
    rank = a.shape[0] if a.ndim else 0
    kind = first.module_kind()
    want_a = (rank,) + (in_shape if kind != 'embedding' else (math.prod(in_shape),))
    want_b = (d_out, rank) + ((1,) * (len(hf_shape) - 2) if kind == 'conv' else ())
    if a.shape != want_a or b.shape != want_b:
      problems.append(f'{module}: lora_A {a.shape} / lora_B {b.shape}, expected {want_a} / '
                      f'{want_b} for the {kind} weight {hf_shape}')
      continue
    if use_dora and parts['m'].shape != (d_out,):
      problems.append(f'{module}: lora_magnitude_vector {parts["m"].shape}, expected {(d_out,)}')
      continue
    full_name = module_prefix + module
    want_rank = _pattern_value(rank_pattern, full_name, r0)
    if rank != want_rank:
      problems.append(f'{module}: tensors have rank {rank}, the config says {want_rank}')
      continue
    alpha = float(_pattern_value(alpha_pattern, full_name, alpha0))
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    a2 = a.reshape(rank, -1).astype(np.float64)
    b2 = b.reshape(d_out, rank).astype(np.float64)
    for entry in members:
      per_path[entry.path][entry.index] = (entry, a2, b2, parts.get('m'), rank, alpha, scale)
  if problems:
    raise ValueError(f'{directory}: adapter tensors do not fit the model:\n  ' +
                     '\n  '.join(problems[:20]))
  dropout = float(config.get('lora_dropout') or 0.0)
  rules, arrays = [], {}
  for path, layers in per_path.items():
    leaf = leaves[path]
    entry0 = next(iter(layers.values()))[0]
    batch, ins, outs = _leaf_axes(entry0, np.shape(leaf))
    ranks = {v[4] for v in layers.values()}
    scales = {v[6] for v in layers.values()}
    stacked = entry0.index is not None
    if not stacked or (len(ranks) == 1 and len(scales) == 1 and
                       len(layers) == np.shape(leaf)[0]):
      _, _, _, _, rank, alpha, scale = next(iter(layers.values()))
    else:  # stacked layers with different ranks / scales, or some not adapted: pad and fold
      rank, scale = max(ranks), next(iter(layers.values()))[6]
      alpha = _module_scale_alpha(scale, rank, rslora)
    setting = dict(variant='dora' if use_dora else 'lora', rank=int(rank), alpha=float(alpha),
                   scaling='rslora' if rslora else 'alpha/r', dropout=dropout,
                   batch_axes=batch, in_axes=ins, out_axes=outs)
    rules.append((f'^{re.escape(path)}$', setting))
    arrays[path] = (layers, rank, scale)
  full_values = _full_leaves(full_tensors, by_key, leaves)
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
    out[tuple(path.split('/'))] = _assemble(s, layers, rank, scale, leaves[path], dtype)
  for path, value in full_values.items():
    out[tuple(path.split('/'))] = FullParams(jax.numpy.asarray(value), specs[path])
  return spec, paths.nest(out)


def _assemble(s: spec_lib.LeafSpec, layers, rank: int, scale: float, leaf, dtype):
  """The adapter of one leaf from its per-layer PEFT factors (zero-padded to `rank`, with each
  layer's scale folded into B where it differs from the leaf's)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  out_dtype = jnp.dtype(dtype or leaf.dtype)
  n_layers = s.batch_shape[0] if s.batch_axes else None
  d_in, d_out = math.prod(s.in_shape), math.prod(s.out_shape)

  def one(index):
    got = layers.get(index)
    a = np.zeros((d_in, rank))
    b = np.zeros((rank, d_out))
    m = None
    if got is not None:
      entry, a2, b2, mag, r, _, sc = got
      perm_in, perm_out = layout(entry, s)
      off = entry.columns[0] if entry.columns is not None else 0
      a[:, :r] = a2[:, perm_in].T
      b[:r] = b2[off + perm_out].T * (sc / scale)
      if mag is not None:
        m = np.asarray(mag, np.float64)[off + perm_out]
    return a, b, m

  parts = [one(i) for i in range(n_layers)] if n_layers is not None else [one(None)]
  a = np.stack([p[0] for p in parts]) if n_layers is not None else parts[0][0]
  b = np.stack([p[1] for p in parts]) if n_layers is not None else parts[0][1]
  a = jnp.asarray(a.reshape(s.batch_shape + s.in_shape + (rank,)), out_dtype)
  b = jnp.asarray(b.reshape(s.batch_shape + (rank,) + s.out_shape), out_dtype)
  if s.variant != 'dora':
    return LoraParams(a, b, s)
  if any(p[2] is None for p in parts):  # layers PEFT did not adapt: m = ||W||, so m / n = 1
    from lorax_jax.variants.dora import column_norm  # pylint: disable=g-import-not-at-top
    w = quant.dequantize_array(leaf) if quant.is_quantized(leaf) else jnp.asarray(leaf)
    norms = np.asarray(column_norm(w, a, b, s), np.float64).reshape(
        (n_layers or 1, d_out))
    parts = [(x, y, m if m is not None else norms[i]) for i, (x, y, m) in enumerate(parts)]
  m = np.stack([p[2] for p in parts]) if n_layers is not None else parts[0][2]
  return DoraParams(a, b, jnp.asarray(m.reshape(s.batch_shape + s.out_shape), out_dtype), s)


def _full_leaves(full_tensors, by_key, leaves) -> dict[str, np.ndarray]:
  """Flax leaves (whole) from the HF tensors of `modules_to_save` / trained biases."""
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
  """
  tensors = hf.to_hf(params, _name_map(name_map, params), dtype=dtype)
  os.makedirs(directory, exist_ok=True)
  if source is not None:
    for name in os.listdir(source):
      src = os.path.join(source, name)
      if os.path.isfile(src) and not name.endswith(('.safetensors', '.bin', '.h5', '.msgpack')):
        shutil.copy(src, os.path.join(directory, name))
    original = hf.load_safetensors(os.path.join(source, 'model.safetensors'))
    # The source may name the same tensors under a task model's prefix (e.g. 'bert.').
    probe = max(tensors, key=len)
    prefixes = sorted((k[:len(k) - len(probe)] for k in original if k.endswith(probe)), key=len)
    prefix = prefixes[0] if prefixes else ''
    tensors = {prefix + k: v for k, v in tensors.items()}
    for key, value in original.items():
      tensors.setdefault(key, value)
  if config is not None:
    with open(os.path.join(directory, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
  hf.save_safetensors(tensors, os.path.join(directory, 'model.safetensors'))
  return sorted(tensors)


__all__ = ['LORA_DEFAULTS', 'UNSUPPORTED', 'export_hf', 'layout', 'load_peft',
           'read_peft_config', 'save_peft']
