"""Deterministic, resumable batching: batch `step` is a pure function of (seed, step)."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class Batches:
  """Shuffled minibatches over equal-length arrays, reshuffled every epoch.

  Batch `step` depends only on `(seed, step)`, so a run resumed at step k sees exactly the
  batches an uninterrupted run would: `iterate(start_step=k)`.

  Args:
    arrays: arrays with the same leading size (e.g. `(images, labels)`).
    batch_size: examples per batch; the last partial batch of an epoch is dropped.
    seed: shuffling seed.

  Raises:
    ValueError: for arrays of different lengths, or a batch size outside [1, len].
  """

  def __init__(self, arrays: Sequence[np.ndarray], batch_size: int, seed: int = 0):
    self.arrays = tuple(np.asarray(a) for a in arrays)
    n = {len(a) for a in self.arrays}
    if len(n) != 1:
      raise ValueError(f'Arrays have different lengths {sorted(n)}.')
    self.size = n.pop()
    if not 1 <= batch_size <= self.size:
      raise ValueError(f'batch_size={batch_size} must be in [1, {self.size}].')
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = self.size // batch_size
    self._epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
    return self._perm

  def batch(self, step: int) -> tuple[np.ndarray, ...]:
    """The batch of global step `step` (0-based)."""
    if step < 0:
      raise ValueError(f'step={step} must be >= 0.')
    epoch, i = divmod(step, self.steps_per_epoch)
    idx = self._permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
    return tuple(a[idx] for a in self.arrays)

  def iterate(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
    """Yields batches from `start_step` on, forever."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1
