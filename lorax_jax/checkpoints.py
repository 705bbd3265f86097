"""Run checkpoints with orbax: self-describing, so a run restores without replaying its setup.

`Checkpoints(directory, interval, max_to_keep)` wraps an orbax `CheckpointManager` and is a
context manager (`with Checkpoints(d) as ckpts:` waits for pending saves and closes on every
exit path, errors included). A corrupt or truncated latest checkpoint falls back to the previous
one with a warning; a checkpoint that does not fit the target is refused with a `ValueError`.

The run checkpoint (`save_run` / `restore_run`), one orbax `Composite` per step. This is the
schema (`SCHEMA`); nothing else writes or reads it:

  item          what                                                  restore target from
  'train'       {'step': int32, 'rng': uint32 key data}               the stored description
  'adapters'    the adapter tree being trained (resized ranks)        the stored description
  'opt_state'   the optimizer state of 'adapters'                     `like` (tx.init's shapes)
  'initial'     the adapters as the init made them (`to_lora` of      the stored description
                residual inits needs them)
  'base_changes' the base leaves the init replaced (the residual of    the stored description
                PiSSA-like inits, LoftQ's quantized W), nested like
                the base; only when an init changed the base
  'stats'       a dynamics method's statistics; only when it has some `like`
  'params'      the whole base, only when training changes it          `like`
  'meta'        JSON: the caller's metadata, plus
                  'schema'  SCHEMA
                  'items'   the names of the items above that are present
                  'spec'    {path: LeafSpec} of the run's selection (`spec_json`)
                  'ranks'   {path: rank} of adapters a dynamics resized
                  'trees'   a description of 'train', 'adapters', 'initial', 'base_changes':
                            every array's shape and dtype, every adapter state's class and
                            static fields (its LeafSpec), so targets are rebuilt without
                            re-running selection, inits or calibration

A description (`describe`) is JSON: `None`; `{"array": [shape, dtype]}`; `{"dict": {...}}`,
`{"list": [...]}`, `{"tuple": [...]}`; `{"node": class name, "data": {field: description},
"static": {field: encoded value}}` for a dataclass pytree node registered with
`register_node` (every variant's adapter state, `FullParams` and `QuantizedArray` are).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lorax_jax import quant
from lorax_jax import spec_json
from lorax_jax import variants
from lorax_jax.leafspec import LeafSpec

SCHEMA = 'lorax_jax.run/1'
ITEMS = ('train', 'adapters', 'opt_state', 'initial', 'base_changes', 'stats', 'params')
DESCRIBED = ('train', 'adapters', 'initial', 'base_changes')
_NODES: dict[str, type] = {}


def register_node(cls: type) -> type:
  """Lets run checkpoints describe (and rebuild) pytree nodes of the dataclass `cls`: the
  adapter state of a variant registered from outside the package. Returns `cls`."""
  if not dataclasses.is_dataclass(cls):
    raise ValueError(f'{cls!r} is not a dataclass; only dataclass pytree nodes can be described.')
  _NODES[cls.__name__] = cls
  return cls


for _name in variants.__all__:
  if _name.endswith('Params'):
    register_node(getattr(variants, _name))
register_node(quant.QuantizedArray)


def abstract(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s (with shardings, where the leaves have them) for `tree`."""
  def leaf(x):
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree_util.tree_map(leaf, tree)


def describe(tree: Any) -> Any:
  """A JSON description of `tree`'s structure, shapes and dtypes (see the module docstring).

  Raises:
    ValueError: for a node that is not a dict, list, tuple, None, array or registered node.
  """
  if tree is None:
    return None
  if isinstance(tree, dict):
    return {'dict': {str(k): describe(v) for k, v in tree.items()}}
  if isinstance(tree, (list, tuple)) and type(tree) in (list, tuple):
    return {type(tree).__name__: [describe(v) for v in tree]}
  if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
    if _NODES.get(type(tree).__name__) is not type(tree):
      raise ValueError(f'{type(tree).__name__} is not a registered node; '
                       'checkpoints.register_node it.')
    data, static = {}, {}
    for f in dataclasses.fields(tree):
      value = getattr(tree, f.name)
      if f.metadata.get('static'):
        static[f.name] = spec_json.encode_value(value)
      else:
        data[f.name] = describe(value)
    return {'node': type(tree).__name__, 'data': data, 'static': static}
  if hasattr(tree, 'shape') and hasattr(tree, 'dtype'):
    return {'array': [list(tree.shape), jnp.dtype(tree.dtype).name]}
  raise ValueError(f'Cannot describe a {type(tree).__name__} in a checkpoint; allowed: dicts, '
                   'lists, tuples, None, arrays and registered nodes.')


def build(description: Any, sharding: Any = None) -> Any:
  """The tree of `jax.ShapeDtypeStruct`s (each with `sharding`) that `describe` described.

  Raises:
    ValueError: for a description of an unregistered node or an unknown form.
  """
  d = description
  if d is None:
    return None
  if isinstance(d, dict) and 'node' in d:
    cls = _NODES.get(d['node'])
    if cls is None:
      raise ValueError(f'Checkpoint node {d["node"]!r} is not registered; registered: '
                       f'{sorted(_NODES)}.')
    return cls(**{k: build(v, sharding) for k, v in d['data'].items()},
               **{k: spec_json.decode_value(v) for k, v in d['static'].items()})
  if not isinstance(d, dict) or len(d) != 1:
    raise ValueError(f'Not a checkpoint description: {str(d)[:200]}.')
  (tag, inner), = d.items()
  if tag == 'array':
    shape, dtype = inner
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)
  if tag == 'dict':
    return {k: build(v, sharding) for k, v in inner.items()}
  if tag in ('list', 'tuple'):
    items = [build(v, sharding) for v in inner]
    return items if tag == 'list' else tuple(items)
  raise ValueError(f'Not a checkpoint description: {str(d)[:200]}.')


def with_shardings(target: Any, shardings: Any) -> Any:
  """`target` (arrays or `ShapeDtypeStruct`s) as `ShapeDtypeStruct`s with `shardings`."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)


@dataclasses.dataclass(frozen=True)
class RunState:
  """Everything a run checkpoint holds (see the module docstring for the schema).

  Attributes:
    step: the number of steps done (an int32 scalar array).
    rng: the run's key data (`jax.random.key_data`).
    adapters: the adapter tree being trained.
    opt_state: its optimizer state.
    initial: the adapter tree the init made.
    spec: `{path: LeafSpec}` of the run's selection (`spec_leaves(spec)`).
    ranks: `{path: rank}` of the adapters a dynamics resized.
    stats: a dynamics method's statistics, or `()`.
    params: the base when training changes it, else None.
    base_changes: the base leaves the init replaced, nested like the base, or `{}`.
  """
  step: Any
  rng: Any
  adapters: Any
  opt_state: Any
  initial: Any
  spec: dict[str, LeafSpec]
  ranks: dict[str, int] = dataclasses.field(default_factory=dict)
  stats: Any = ()
  params: Any = None
  base_changes: dict[str, Any] = dataclasses.field(default_factory=dict)

  def items(self) -> dict[str, Any]:
    """The orbax items of this state, the empty ones left out."""
    out = {'train': {'step': self.step, 'rng': self.rng}, 'adapters': self.adapters,
           'opt_state': self.opt_state, 'initial': self.initial,
           'base_changes': self.base_changes, 'stats': self.stats, 'params': self.params}
    return {k: v for k, v in out.items() if jax.tree_util.tree_leaves(v)}


class CheckpointIOError(OSError):
  """A checkpoint could not be written (a read-only directory, a full disk...); the message
  names the path and the cause, and the checkpoints written before stay usable."""


# How storage errors read when orbax or TensorStore re-raise them as another type.
_IO_MARKS = ('PERMISSION_DENIED', 'RESOURCE_EXHAUSTED', 'No space left', 'Read-only file system',
             'Permission denied', 'Disk quota exceeded')


def _is_io_error(e: BaseException) -> bool:
  return isinstance(e, OSError) or any(m in str(e) for m in _IO_MARKS)


def _cause(e: BaseException) -> str:
  if isinstance(e, OSError) and e.errno:
    where = f' ({e.filename})' if getattr(e, 'filename', None) else ''
    return f'{os.strerror(e.errno)}{where}'
  return f'{type(e).__name__}: {str(e)[:300]}'


class Checkpoints:
  """Periodic, resumable checkpoints; a context manager.

  Args:
    directory: where checkpoints live (one sub-directory per step).
    interval: save every `interval` steps (`save(..., force=True)` saves regardless).
    max_to_keep: how many recent checkpoints to keep.

  Raises:
    ValueError: for a non-positive interval or max_to_keep.
    CheckpointIOError: for a directory that cannot be created or written (here, or when a save
      fails: the message names the path and the cause; earlier checkpoints stay usable).

  Example:
    >>> with Checkpoints(directory) as ckpts:                  # doctest: +SKIP
    ...   restored = ckpts.restore_run(like)
    ...   ckpts.save_run(step, run_state, {'config': digest})
  """

  def __init__(self, directory: str, interval: int = 100, max_to_keep: int = 2):
    if interval <= 0 or max_to_keep <= 0:
      raise ValueError(f'interval={interval} and max_to_keep={max_to_keep} must be > 0.')
    self.directory = os.path.abspath(directory)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(save_interval_steps=interval,
                                               max_to_keep=max_to_keep))
    except Exception as e:  # pylint: disable=broad-except
      if not _is_io_error(e):
        raise
      raise CheckpointIOError(f'Cannot use the checkpoint directory {self.directory}: '
                              f'{_cause(e)}.') from e

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is None:
      self.close()
      return
    try:   # an error is on its way: closing must not replace it
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Closing the checkpoints in %s after an error failed too: %s',
                      self.directory, _cause(e))

  def _written(self, what: str, step: int | None, write: Callable[[], Any]) -> Any:
    """`write()`, with a storage error turned into a `CheckpointIOError` naming the path, the
    cause and the last checkpoint kept."""
    try:
      return write()
    except Exception as e:  # pylint: disable=broad-except
      if not _is_io_error(e):
        raise
      try:
        done = [s for s in self._manager.all_steps() if s != step]
      except Exception:  # pylint: disable=broad-except
        done = []
      kept = (f'the checkpoint of step {max(done)} is kept and still restores' if done else
              'no earlier checkpoint exists')
      at = f' of step {step}' if step is not None else ''
      raise CheckpointIOError(f'Could not {what} the checkpoint{at} in {self.directory}: '
                              f'{_cause(e)}; {kept}. Free space or fix the permissions, then '
                              'rerun to resume.') from e

  def _check_writable(self, step: int) -> None:
    """Refuses a save into a directory this process cannot write, before orbax starts one."""
    if os.path.isdir(self.directory) and not os.access(self.directory, os.W_OK | os.X_OK):
      def refuse():
        raise PermissionError(errno.EACCES, 'the directory is not writable', self.directory)
      self._written('write', step, refuse)

  def save(self, step: int, state: Any, metadata: dict[str, Any], *, force: bool = False) -> bool:
    """Saves a plain `state` tree (and JSON `metadata`) at `step` if the interval says so or
    `force`; returns whether it saved. Runs use `save_run`."""
    if not force and not self.should_save(step):
      return False
    self._check_writable(step)
    saved = self._written('write', step, lambda: self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(metadata)), force=force))
    return bool(saved)

  def save_run(self, step: int, run: RunState, metadata: dict[str, Any], *,
               force: bool = False) -> bool:
    """Saves the run checkpoint of `run` (schema in the module docstring) with the caller's
    JSON `metadata` at `step` if the interval says so or `force`; returns whether it saved."""
    if not force and not self.should_save(step):
      return False
    items = run.items()
    meta = {**metadata, 'schema': SCHEMA, 'items': sorted(items),
            'spec': spec_json.specs_to_json(run.spec), 'ranks': dict(run.ranks),
            'trees': {k: describe(items[k]) for k in DESCRIBED if k in items}}
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    self._check_writable(step)
    saved = self._written('write', step, lambda: self._manager.save(
        step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)), force=force))
    return bool(saved)

  def should_save(self, step: int) -> bool:
    """Whether `save_run(step, ...)` without `force` would write a checkpoint."""
    return bool(self._manager.should_save(step))

  def wait(self) -> None:
    """Waits for pending saves (a failed one raises `CheckpointIOError`)."""
    self._written('finish writing', None, self._manager.wait_until_finished)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _metadata(self, step: int) -> dict[str, Any]:
    got = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(got['meta'])

  def latest_metadata(self) -> dict[str, Any] | None:
    """The JSON metadata of the newest checkpoint that has readable metadata, or None."""
    for step in reversed(self.steps()):
      try:
        return self._metadata(step)
      except Exception:  # pylint: disable=broad-except
        continue
    return None

  def _newest(self, attempt: Callable[[int], Any]) -> Any:
    """`attempt(step)` for the newest step where it succeeds (None if there are no steps)."""
    steps = self.steps()
    if not steps:
      return None
    errors = []
    for step in reversed(steps):
      try:
        return attempt(step)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f'step {step}: {type(e).__name__}: {e}')
        logging.warning('Checkpoint at step %d in %s could not be restored (%s: %s); '
                        'falling back to the previous one.', step, self.directory,
                        type(e).__name__, str(e)[:200])
    raise ValueError(f'No checkpoint in {self.directory} fits the model; tried:\n' +
                     '\n'.join(e[:500] for e in errors))

  def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """`(step, state, metadata)` of the newest `save`d checkpoint that restores, or None if
    none exist.

    Args:
      target: a tree like the state (arrays or `jax.ShapeDtypeStruct`s with shardings).

    Raises:
      ValueError: if checkpoints exist but none fits `target`.
    """
    def attempt(step):
      got = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract(target)),
                                        meta=ocp.args.JsonRestore()))
      return step, got['state'], dict(got['meta'])
    return self._newest(attempt)

  def restore_run(self, like: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None, *,
                  sharding: Any = None, items: tuple[str, ...] = ITEMS
                  ) -> tuple[int, RunState, dict[str, Any]] | None:
    """`(step, run_state, metadata)` of the newest run checkpoint that restores, or None if
    none exist. Items not in `items` come back as None (`()` / `{}` where empty).

    Args:
      like: `(adapters, metadata) -> {item: target}` given the stored adapters' abstract tree
        (`ShapeDtypeStruct`s); it must give 'opt_state' (and 'stats', 'params' where the
        checkpoint has them and they are in `items`), and may give sharded targets for the
        described items. None for restores of described items only.
      sharding: the sharding of described items `like` gives no target for (None: the first
        local device).
      items: which items to restore.

    Raises:
      ValueError: if checkpoints exist but none restores (another schema, a missing target,
        shapes that do not fit).
    """
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def attempt(step):
      meta = self._metadata(step)
      if meta.get('schema') != SCHEMA:
        raise ValueError(f'checkpoint schema {meta.get("schema")!r}; this code reads {SCHEMA!r}.')
      present = [k for k in meta['items'] if k in items]
      described = {k: build(meta['trees'][k], sharding) for k in DESCRIBED if k in meta['trees']}
      targets = dict(described)
      if like is not None:
        targets.update(like(build(meta['trees']['adapters']), meta))
      missing = [k for k in present if targets.get(k) is None]
      if missing:
        raise ValueError(f'no restore target for items {missing}.')
      args = {k: ocp.args.StandardRestore(abstract(targets[k])) for k in present}
      got = self._manager.restore(step, args=ocp.args.Composite(**args))
      get = lambda k, empty=None: got[k] if k in present else empty
      train = get('train', {'step': None, 'rng': None})
      run = RunState(
          step=train['step'], rng=train['rng'], adapters=get('adapters'),
          opt_state=get('opt_state'), initial=get('initial'),
          spec=spec_json.specs_from_json(meta['spec']), ranks=dict(meta.get('ranks') or {}),
          stats=get('stats', ()), params=get('params'), base_changes=get('base_changes', {}))
      return step, run, meta
    return self._newest(attempt)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()
