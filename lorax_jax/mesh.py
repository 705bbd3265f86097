"""Device meshes and placement: a mesh from the config's axis sizes, batch shardings, and putting
host values on devices (one process or many).

    mesh = make_mesh({'data': 2, 'fsdp': -1, 'tensor': 2})          # all devices, all processes
    batch = global_batch(process_rows(host_batch), mesh)            # rows over data x fsdp

Meshes use `Auto` axis types, so the compiler propagates shardings inside a step (JAX's default
became `Explicit`). Parameter and adapter shardings: `lorax_jax.sharding`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

P = PartitionSpec
MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def make_mesh(shape: Mapping[str, int] | None = None, *, devices: Sequence[Any] | None = None
              ) -> Mesh:
  """A mesh with axes `data`, `fsdp`, `tensor` over all devices of all processes.

  Args:
    shape: axis sizes; missing axes have size 1, except `data`, which defaults to -1. One size
      may be -1: the rest of the devices. Sizes without -1 that multiply to fewer than the
      devices use the first ones (e.g. all 1: a single device).
    devices: defaults to `jax.devices()` (every process's devices).

  Raises:
    ValueError: for an unknown axis, more than one -1, or sizes that do not multiply to the
      device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {'data': -1, 'fsdp': 1, 'tensor': 1}
  shape = dict(shape or {})
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'Unknown mesh axes {unknown}; allowed: {list(MESH_AXES)}.')
  if shape and -1 in shape.values():
    sizes['data'] = 1
  sizes.update({k: int(v) for k, v in shape.items()})
  if list(sizes.values()).count(-1) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f'Mesh sizes {sizes}: each must be >= 1, and at most one may be -1.')
  known = math.prod(v for v in sizes.values() if v != -1)
  if -1 not in sizes.values() and known < len(devices):
    logging.info('Mesh %s uses the first %d of %d devices.', sizes, known, len(devices))
    devices = devices[:known]
  for k, v in sizes.items():
    if v == -1:
      if len(devices) % known:
        raise ValueError(f'Mesh sizes {sizes} do not divide the {len(devices)} devices.')
      sizes[k] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f'Mesh sizes {sizes} multiply to {math.prod(sizes.values())}, but there '
                     f'are {len(devices)} devices.')
  dims = tuple(sizes[a] for a in MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(dims, devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.array(devices).reshape(dims)
  axis_type = getattr(jax.sharding, 'AxisType', None)
  if axis_type is None:
    return Mesh(grid, MESH_AXES)
  return Mesh(grid, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over `data` and `fsdp`; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local: Any, mesh: Mesh) -> Any:
  """A global batch from each process's local rows (`jax.make_array_from_process_local_data`).

  Raises:
    ValueError: if a leaf's global batch size is not divisible by the data-parallel size.
  """
  n = mesh.shape['data'] * mesh.shape['fsdp']

  def leaf(x):
    x = np.asarray(x)
    rows = x.shape[0] * jax.process_count()
    if rows % n:
      raise ValueError(f'Global batch of {rows} rows is not divisible by data x fsdp = {n}.')
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x,
                                                  (rows,) + x.shape[1:])

  return jax.tree_util.tree_map(leaf, local)


def process_rows(batch: Any) -> Any:
  """This process's contiguous share of a global (host-replicated) batch's rows."""
  i, n = jax.process_index(), jax.process_count()

  def leaf(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(f'Batch of {x.shape[0]} rows does not split over {n} processes.')
    k = x.shape[0] // n
    return x[i * k:(i + 1) * k]

  return jax.tree_util.tree_map(leaf, batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def place(tree: Any, shardings: Any) -> Any:
  """`tree`'s arrays on `shardings` (works across processes: every process passes the same
  host values)."""
  def put(x, s):
    if x is None:
      return None
    x = np.asarray(x) if not isinstance(x, jax.Array) or not x.is_fully_addressable else x
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    return jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx])

  return jax.tree_util.tree_map(put, tree, shardings)


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` placed with `shardings` (the largest shard per leaf)."""
  total = 0
  leaves = jax.tree_util.tree_leaves(tree)
  shs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for x, s in zip(leaves, shs):
    shard = s.shard_shape(np.shape(x))
    total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
  return total
