"""Sharding over device meshes: a mesh from the config, parameter shardings from rules, and adapter
(and optimizer-state) shardings derived from the base's.

    mesh = make_mesh({'data': 2, 'fsdp': -1, 'tensor': 2})          # all devices, all processes
    base_sh = param_shardings(params, mesh, preset('fsdp_tensor'))  # or [(regex, PartitionSpec)]
    adapter_sh = adapter_shardings(adapters, base_sh)               # A: base in-axes, B: out-axes
    opt_sh = like_params(opt_state, adapters, adapter_sh)            # Adam moments follow params

A train step is then `jax.jit` with these as `in_shardings` / `out_shardings` (see
`training.make_train_step(..., shardings=...)`): what `pjit` was. Meshes use `Auto` axis types, so
the compiler propagates shardings inside the step (JAX's default became `Explicit`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, NamedTuple, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from lorax_jax import adapters as adapters_lib
from lorax_jax import paths
from lorax_jax import quant
from lorax_jax import variants
from lorax_jax.mesh import (BATCH_AXES, MESH_AXES, batch_sharding, global_batch,  # noqa: F401
                            make_mesh, per_device_bytes, place, process_rows, replicated)
from lorax_jax.select import Rule, select

P = PartitionSpec


# ---------------------------------------------------------------------------------------------
# Parameter shardings from rules.

# A rule: (regex, PartitionSpec | tuple | None | callable(path, shape, mesh) -> spec).


def _fsdp_rule(axis: str = 'fsdp', min_size: int = 0):
  """Shards the largest axis divisible by the mesh's `axis` size (leaves >= min_size)."""

  def rule(path, shape, mesh, spec=None):
    del path
    spec = list(spec or ())
    spec += [None] * (len(shape) - len(spec))
    n = mesh.shape[axis]
    if n == 1 or math.prod(shape) < min_size:
      return P(*spec)
    free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % n == 0]
    if free:
      d = max(free, key=lambda q: (shape[q], -q))
      spec[d] = axis
    return P(*spec)

  return rule


# Column-parallel (output features split) and row-parallel (input features split) kernels of the
# reference transformers (Decoder, ViT, GPT-2, BERT).
_COLUMN = r'(^|/)(query|key|value|gate|up|mlp1|fc|intermediate)/'
_ROW = r'(^|/)(out|down|mlp2|proj|output)/'


def _tensor_rule(axis='tensor'):
  def rule(path, shape, mesh):
    del mesh
    nd = len(shape)
    if re.search(_COLUMN + r'kernel$', path):
      # (d, heads, head_dim) or (d, d_ff): split heads / features.
      return P(*([None, axis] + [None] * (nd - 2)))
    if re.search(_COLUMN + r'bias$', path):
      return P(*([axis] + [None] * (nd - 1)))
    if re.search(_ROW + r'kernel$', path):
      return P(*([axis] + [None] * (nd - 1)))
    return P()
  return rule


def preset(name: str, *, min_size: int = 0) -> list[Rule]:
  """Rules for a named layout.

  `'replicated'`: every leaf on every device. `'fsdp'`: each leaf's largest divisible axis over
  `fsdp` (leaves under `min_size` elements replicated). `'tensor'`: column-parallel q/k/v and
  MLP-up kernels, row-parallel attention-output and MLP-down kernels over `tensor` (Megatron
  style, for the reference transformers).
  `'fsdp_tensor'`: both (tensor first, then fsdp on the largest remaining axis).

  Raises:
    ValueError: for an unknown name.
  """
  fsdp, tensor = _fsdp_rule(min_size=min_size), _tensor_rule()
  if name == 'replicated':
    return [('.*', P())]
  if name == 'fsdp':
    return [('.*', fsdp)]
  if name == 'tensor':
    return [('.*', tensor)]
  if name == 'fsdp_tensor':
    return [('.*', lambda path, shape, mesh: fsdp(path, shape, mesh, tensor(path, shape, mesh)))]
  raise ValueError(f'Unknown sharding preset {name!r}; allowed: '
                   "['replicated', 'fsdp', 'tensor', 'fsdp_tensor'].")


def _is_boxed(x) -> bool:
  try:
    from flax.core import meta  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return isinstance(x, meta.AxisMetadata)


def _fit(path: str, shape, spec, mesh: Mesh) -> PartitionSpec:
  """Checks axis names; replaces entries whose dimension is not divisible with None (logged)."""
  spec = tuple(spec)
  if len(spec) > len(shape):
    raise ValueError(f'PartitionSpec {P(*spec)} for {path!r} has {len(spec)} entries, but the '
                     f'leaf has shape {tuple(shape)}.')
  out = []
  for d, entry in enumerate(spec):
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    bad = [n for n in names if n not in mesh.shape]
    if bad:
      raise ValueError(f'PartitionSpec {P(*spec)} for {path!r} names mesh axes {bad}; the mesh '
                       f'has {list(mesh.shape)}.')
    n = math.prod(mesh.shape[a] for a in names)
    if names and shape[d] % n:
      logging.info('Sharding: replicating axis %d of %r (size %d is not divisible by %s = %d).',
                   d, path, shape[d], names, n)
      entry = None
    out.append(entry)
  return P(*out)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[Rule] = (),
                    *, logical_axis_rules: Sequence[tuple[str, Any]] | None = None) -> Any:
  """A tree like `params` of `NamedSharding`s, from ordered `(regex, spec)` rules.

  The first rule whose regex `re.search`es a leaf's '/'-joined path decides it; a spec is a
  `PartitionSpec`, a tuple, None (replicated) or a function `(path, shape, mesh) -> spec` (see
  `preset`). Leaves that carry Flax partitioning metadata (`nn.with_partitioning`,
  `nn.with_logical_partitioning`; logical names mapped by `logical_axis_rules`) use it unless a
  rule matches them; other leaves are replicated. A dimension that its mesh axes do not divide is
  replicated instead, with a logged note. A quantized leaf (`lorax_jax.quant.QuantizedArray`)
  gets a `QuantizedArray` of shardings: the rules see its logical path and shape, and each
  stored array follows the leaf axes it spans (`quant.layout`): codes shard like the float leaf.

  Returns:
    Shardings for the unboxed parameters (`flax.linen.unbox(params)`).

  Raises:
    ValueError: for a bad regex, a rule that matches no path or is shadowed by earlier rules (the
      one policy of `lorax_jax.select`), a spec naming axes the mesh lacks, or a spec longer than
      the leaf's rank.
  """
  is_leaf = lambda x: _is_boxed(x) or quant.is_quantized(x)
  names = [p for p, _, _ in paths.leaves_with_paths(params, is_leaf=is_leaf)]
  decided = select(names, rules, what='Sharding rule')

  def leaf(kp, x):
    path = paths.path_str(kp)
    boxed = _is_boxed(x)
    value = x.unbox() if boxed else x
    shape = tuple(np.shape(value))
    spec = None
    if path in decided:
      s = decided[path].setting
      spec = s(path, shape, mesh) if callable(s) else s
      spec = P() if spec is None else spec
    elif boxed:
      spec = _boxed_spec(x, logical_axis_rules)
    spec = _fit(path, shape, spec or P(), mesh)
    if quant.is_quantized(value):
      return _quantized_shardings(path, value, spec, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_leaf)


def _quantized_shardings(path: str, q, spec: PartitionSpec, mesh: Mesh):
  """A `QuantizedArray` of shardings: each stored array takes the mesh axes of the leaf axes it
  spans (`quant.layout`), where they divide it."""
  spec = tuple(spec) + (None,) * (q.ndim - len(spec))

  def names(d):
    e = spec[d]
    return () if e is None else ((e,) if isinstance(e, str) else tuple(e))

  fields = {}
  for field, axes in quant.layout(q).items():
    arr = getattr(q, field)
    entries = []
    for size, leaf_axes in zip(np.shape(arr), axes):
      ns = tuple(n for d in leaf_axes for n in names(d))
      ok = ns and size % math.prod(mesh.shape[n] for n in ns) == 0
      entries.append((ns[0] if len(ns) == 1 else ns) if ok else None)
    fields[field] = NamedSharding(mesh, P(*entries))
  return dataclasses.replace(q, **{f: fields.get(f) for f in ('codes', 'scales', 'dq_scales',
                                                               'dq_offset')})


def _logical_sharding(s):
  """The sharding a quantized leaf's float value would have (from its codes' sharding)."""
  if quant.is_quantized(s):
    return s.codes
  return s


def _boxed_spec(x, logical_axis_rules):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  names = tuple(x.names)
  if isinstance(x, nn.LogicallyPartitioned):
    rules = logical_axis_rules if logical_axis_rules is not None else tuple(
        getattr(x, 'rules', None) or ())
    return nn.logical_to_mesh_axes(names, rules)
  return P(*names)


# ---------------------------------------------------------------------------------------------
# Derived shardings.


def adapter_shardings(adapters: Any, base_shardings: Any) -> Any:
  """Shardings for an adapter tree, derived from the base's by a pure function.

  Every array of an adapter state follows the base axes it spans (`Variant.layout`): LoRA's A
  keeps the base's in-axis (and stacked-axis) partitioning and B its out-axis partitioning, the
  rank axis replicated; DoRA magnitudes and VeRA/Tied-LoRA vectors follow the out-axes; arrays
  that span no base axis (LoKr's Kronecker factors, NOLA coefficients, LoRA-XS cores) are
  replicated over the non-stacked axes. Fully trained leaves take the base's sharding.
  """
  flat_base = {p: _logical_sharding(s) for p, s in paths.flat(
      base_shardings, is_leaf=lambda x: isinstance(x, NamedSharding) or quant.is_quantized(x)
  ).items()}

  def visit(kp, state):
    if not adapters_lib.is_adapter(state):
      raise ValueError(f'Not an adapter state at {paths.path_str(kp)!r}: {type(state)}.')
    path = paths.path_str(kp)
    if path not in flat_base:
      raise ValueError(f'Adapter at {path!r} has no base sharding; base paths: '
                       f'{sorted(flat_base)[:10]}.')
    base = flat_base[path]
    mesh = base.mesh
    if isinstance(state, variants.FullParams):
      return variants.FullParams(base, state.spec)
    spec = tuple(base.spec) + (None,) * (len(state.spec.shape) - len(base.spec))
    variant = variants.get(state.spec.variant)
    if variant.layout is None:
      raise ValueError(f'Variant {variant.name!r} declares no `layout`: its adapter shardings '
                       'cannot be derived.')
    layout = variant.layout(state.spec)
    fields = {}
    for name in variants.base.field_labels(state):
      value = getattr(state, name)
      if value is None:
        fields[name] = None
        continue
      axes = layout[name]
      if len(axes) != np.ndim(value):
        raise ValueError(f'{state.spec.variant!r} layout of field {name!r} at {path!r} has '
                         f'{len(axes)} axes; the array has shape {np.shape(value)}.')
      fields[name] = NamedSharding(mesh, P(*(None if d is None else spec[d] for d in axes)))
    return type(state)(**fields, **{f: getattr(state, f) for f in _static_fields(state)})

  return jax.tree_util.tree_map_with_path(visit, adapters, is_leaf=adapters_lib.is_adapter)


def _static_fields(state) -> list[str]:
  return [f.name for f in dataclasses.fields(state) if f.metadata.get('static')]


def like_params(tree: Any, params: Any, param_shardings_tree: Any, *, mesh: Mesh | None = None
                ) -> Any:
  """Shardings for a tree that holds copies of `params` (optimizer state: Adam's moments).

  A leaf whose key path ends with a parameter's key path and has its shape takes that
  parameter's sharding; every other leaf (step counts, scalars) is replicated.
  """
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree_util.tree_leaves(param_shardings_tree,
                                     is_leaf=lambda x: isinstance(x, NamedSharding))
  if len(flat_p) != len(flat_s):
    raise ValueError('param_shardings_tree does not match params.')
  by_path = {tuple(kp): (np.shape(x), s) for (kp, x), s in zip(flat_p, flat_s)}
  mesh = mesh or (flat_s[0].mesh if flat_s else None)
  replicated = NamedSharding(mesh, P())
  longest = max((len(k) for k in by_path), default=0)

  def leaf(kp, x):
    kp = tuple(kp)
    for n in range(min(len(kp), longest), 0, -1):
      hit = by_path.get(kp[-n:])
      if hit is not None and tuple(hit[0]) == tuple(np.shape(x)):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(leaf, tree)


class TrainShardings(NamedTuple):
  """Shardings of a train step's arguments: base, adapters, optimizer state, batch, and the
  statistics of a training-time method (None: replicated; `training.state_shardings` derives
  them all)."""
  params: Any
  adapters: Any
  opt_state: Any
  batch: Any
  mesh: Mesh
  stats: Any = None


__all__ = ['MESH_AXES', 'TrainShardings', 'adapter_shardings', 'batch_sharding', 'global_batch',
           'like_params', 'make_mesh', 'param_shardings', 'per_device_bytes', 'place', 'preset',
           'process_rows', 'replicated']
