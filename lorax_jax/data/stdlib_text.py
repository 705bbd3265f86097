"""Byte-level language-modelling text from the Python standard library (on every machine).

Two domains for pretrain-then-adapt: `'code'` (the library's source files) and `'prose'` (the
English docstrings of its modules, classes and functions). Files are read in sorted order, so the
text is a deterministic function of the Python version.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig

import numpy as np

KINDS = ('code', 'prose')
_SKIP_DIRS = {'test', 'tests', 'idlelib', 'site-packages', 'dist-packages', 'lib2to3',
              'turtledemo', '__pycache__', 'ensurepip', 'pydoc_data'}


def _files() -> list[str]:
  root = sysconfig.get_paths()['stdlib']
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith('.py'))
  return out


def _read(path: str) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read()


def _docstrings(source: str) -> list[str]:
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  docs = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc and len(doc) >= 40:
        docs.append(doc)
  return docs


@functools.lru_cache(maxsize=8)
def stdlib_text(kind: str = 'code', max_bytes: int = 2_000_000) -> np.ndarray:
  """The first `max_bytes` bytes of the chosen domain as a uint8 array (a 256-token vocabulary).

  Raises:
    ValueError: for an unknown kind or a non-positive `max_bytes`.
  """
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r}; allowed: {list(KINDS)}.')
  if max_bytes <= 0:
    raise ValueError(f'max_bytes={max_bytes} must be > 0.')
  chunks, total = [], 0
  for path in _files():
    source = _read(path)
    pieces = [source] if kind == 'code' else _docstrings(source)
    for piece in pieces:
      data = (piece + '\n\n').encode('utf-8')
      chunks.append(data)
      total += len(data)
      if total >= max_bytes:
        return np.frombuffer(b''.join(chunks)[:max_bytes], np.uint8).copy()
  return np.frombuffer(b''.join(chunks), np.uint8).copy()


def split(data: np.ndarray, part: str, test_fraction: float = 0.1) -> np.ndarray:
  """The `'train'` (leading) or `'test'` (trailing `test_fraction`) part of a byte stream."""
  if part not in ('train', 'test'):
    raise ValueError(f"part={part!r}; allowed: 'train', 'test'.")
  if not 0 < test_fraction < 1:
    raise ValueError(f'test_fraction={test_fraction} must be in (0, 1).')
  cut = int(len(data) * (1 - test_fraction))
  return data[:cut] if part == 'train' else data[cut:]


class Windows:
  """Random windows of `seq_len + 1` bytes (inputs and next-byte targets), resumable by step.

  Batch `step` depends only on `(seed, step)`: `batch(step)` returns int32 (batch, seq_len + 1).
  """

  def __init__(self, data: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
    if len(data) < seq_len + 2:
      raise ValueError(f'{len(data)} bytes is too short for seq_len={seq_len}.')
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1.')
    self.data, self.seq_len, self.batch_size, self.seed = data, seq_len, batch_size, seed

  def batch(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, step])
    starts = rng.integers(0, len(self.data) - self.seq_len - 1, self.batch_size)
    idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
    return self.data[idx].astype(np.int32)

  def iterate(self, start_step: int = 0):
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


DOCSTRING_FAMILIES = ('asyncio', 'email', 'importlib', 'multiprocessing', 'unittest', 'xml')


@functools.lru_cache(maxsize=4)
def _family_docstrings(family: str) -> tuple[str, ...]:
  root = os.path.join(sysconfig.get_paths()['stdlib'], family)
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for f in sorted(filenames):
      if f.endswith('.py'):
        docs.extend(_docstrings(_read(os.path.join(dirpath, f))))
  return tuple(dict.fromkeys(docs))  # unique, in file order


def docstrings(split: str = 'train', *, families=DOCSTRING_FAMILIES, per_class: int = 150,
               test_fraction: float = 0.25, seed: int = 0) -> tuple[list[str], np.ndarray]:
  """Real English text classification: standard-library docstrings labelled by the package they
  document (`families`), at most `per_class` per package, split deterministically by `seed`.

  Returns:
    `(texts, labels)` with labels indexing `families`.

  Raises:
    ValueError: for an unknown split or a family with too few docstrings.
  """
  if split not in ('train', 'test'):
    raise ValueError(f"split={split!r}; allowed: 'train', 'test'.")
  texts, labels = [], []
  for label, family in enumerate(families):
    docs = _family_docstrings(family)
    if len(docs) < 20:
      raise ValueError(f'Package {family!r} has {len(docs)} docstrings here; need >= 20.')
    order = np.random.default_rng([seed, label]).permutation(len(docs))[:per_class]
    n_test = int(round(len(order) * test_fraction))
    chosen = order[:n_test] if split == 'test' else order[n_test:]
    texts.extend(docs[i] for i in sorted(chosen))
    labels.extend([label] * len(chosen))
  return texts, np.asarray(labels, np.int32)
