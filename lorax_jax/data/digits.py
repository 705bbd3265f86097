"""scikit-learn's `load_digits`: 1,797 real 8x8 handwritten digits, shipped with the package."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def digits(classes: Sequence[int] = tuple(range(10)), *, split: str = 'train',
           test_fraction: float = 0.25, seed: int = 0, size: int = 8
           ) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images, labels)` of the chosen classes: images (N, size, size, 1) float32 in [0, 1].

  The train/test split is a deterministic function of `seed` (stratified by class). `size` is a
  multiple of 8; larger images repeat each pixel (nearest-neighbour upsampling), e.g. 16 for a
  ViT with 4x4 patches. A pretrain/adaptation shift is a choice of classes: pretrain on
  `range(5)`, adapt on `range(5, 10)`.

  Raises:
    ValueError: for an unknown split, a class outside 0..9, no classes or a repeated one, a bad
      test fraction or size.
  """
  if size < 8 or size % 8:
    raise ValueError(f'size={size} must be a positive multiple of 8.')
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  if split not in ('train', 'test'):
    raise ValueError(f"split={split!r}; allowed: 'train', 'test'.")
  if not 0 < test_fraction < 1:
    raise ValueError(f'test_fraction={test_fraction} must be in (0, 1).')
  classes = list(classes)
  bad = [c for c in classes if c not in range(10)]
  if bad:
    raise ValueError(f'classes {bad} are not digits; allowed: 0..9.')
  if not classes or len(set(classes)) < len(classes):
    raise ValueError(f'classes={tuple(classes)} must be distinct digits, at least one.')
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
  x = x[idx]
  if size != 8:
    k = size // 8
    x = np.repeat(np.repeat(x, k, axis=1), k, axis=2)
  return x, y[idx]
