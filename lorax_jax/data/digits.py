"""scikit-learn's `load_digits`: 1,797 real 8x8 handwritten digits, shipped with the package."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def digits(classes: Sequence[int] = tuple(range(10)), *, split: str = 'train',
           test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images, labels)` of the chosen classes: images (N, 8, 8, 1) float32 in [0, 1].

  The train/test split is a deterministic function of `seed` (stratified by class).

  Raises:
    ValueError: for an unknown split, a class outside 0..9 or a bad test fraction.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  if split not in ('train', 'test'):
    raise ValueError(f"split={split!r}; allowed: 'train', 'test'.")
  if not 0 < test_fraction < 1:
    raise ValueError(f'test_fraction={test_fraction} must be in (0, 1).')
  bad = [c for c in classes if c not in range(10)]
  if bad:
    raise ValueError(f'classes {bad} are not digits; allowed: 0..9.')
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  keep = []
  for c in sorted(set(classes)):
    idx = np.flatnonzero(y == c)
    idx = idx[rng.permutation(len(idx))]
    n_test = int(round(len(idx) * test_fraction))
    keep.append(idx[:n_test] if split == 'test' else idx[n_test:])
  idx = np.sort(np.concatenate(keep))
  return x[idx], y[idx]
