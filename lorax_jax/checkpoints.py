"""Adapter checkpoints with orbax: adapters and optimizer state only, plus JSON metadata.

`Checkpoints(directory, interval, max_to_keep)` wraps an orbax `CheckpointManager`. Restoring
takes an abstract target tree (shapes, dtypes and, where given, shardings), so a checkpoint that
does not fit the model is refused with a `ValueError`, and a corrupt or truncated latest
checkpoint falls back to the previous one with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s (with shardings, where the leaves have them) for `tree`."""
  def leaf(x):
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree_util.tree_map(leaf, tree)


class Checkpoints:
  """Periodic, resumable checkpoints of a training state pytree.

  Args:
    directory: where checkpoints live (one sub-directory per step).
    interval: save every `interval` steps (`save(..., force=True)` saves regardless).
    max_to_keep: how many recent checkpoints to keep.

  Raises:
    ValueError: for a non-positive interval or max_to_keep.
  """

  def __init__(self, directory: str, interval: int = 100, max_to_keep: int = 2):
    if interval <= 0 or max_to_keep <= 0:
      raise ValueError(f'interval={interval} and max_to_keep={max_to_keep} must be > 0.')
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(save_interval_steps=interval,
                                             max_to_keep=max_to_keep))

  def save(self, step: int, state: Any, metadata: dict[str, Any], *, force: bool = False) -> bool:
    """Saves `state` (and JSON `metadata`) at `step` if the interval says so or `force`."""
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(metadata)), force=force)
    return bool(saved)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_metadata(self) -> dict[str, Any] | None:
    """The JSON metadata of the newest checkpoint that has readable metadata, or None."""
    for step in reversed(self.steps()):
      try:
        got = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(got['meta'])
      except Exception:  # pylint: disable=broad-except
        continue
    return None

  def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """`(step, state, metadata)` of the newest checkpoint that restores, or None if none exist.

    Args:
      target: a tree like the state (arrays or `jax.ShapeDtypeStruct`s with shardings).

    Raises:
      ValueError: if checkpoints exist but none fits `target`.
    """
    steps = self.steps()
    if not steps:
      return None
    errors = []
    for step in reversed(steps):
      try:
        got = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract(target)),
                                          meta=ocp.args.JsonRestore()))
        return step, got['state'], dict(got['meta'])
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f'step {step}: {type(e).__name__}: {e}')
        logging.warning('Checkpoint at step %d in %s could not be restored (%s: %s); '
                        'falling back to the previous one.', step, self.directory,
                        type(e).__name__, str(e)[:200])
    raise ValueError(f'No checkpoint in {self.directory} fits the model; tried:\n' +
                     '\n'.join(e[:500] for e in errors))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
