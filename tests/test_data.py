"""Offline data: deterministic splits, upsampling, resumable batching, stdlib text domains."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from lorax_jax.data import Batches, Windows, digits, stdlib_text, text


def test_digits_splits_are_disjoint_stratified_and_deterministic():
  x_tr, y_tr = digits(range(5), split='train')
  x_te, y_te = digits(range(5), split='test')
  assert set(y_tr) == set(y_te) == set(range(5))
  assert x_tr.shape[1:] == (8, 8, 1) and x_tr.dtype == np.float32
  assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
  assert abs(len(x_te) / (len(x_tr) + len(x_te)) - 0.25) < 0.02
  np.testing.assert_array_equal(digits(range(5), split='train')[0], x_tr)
  assert not np.array_equal(digits(range(5), split='train', seed=1)[1], y_tr)


def test_digits_upsampling_repeats_pixels():
  x8, _ = digits([3], split='test')
  x16, _ = digits([3], split='test', size=16)
  assert x16.shape == (len(x8), 16, 16, 1)
  np.testing.assert_array_equal(x16[:, ::2, ::2], x8)
  np.testing.assert_array_equal(x16[:, 1::2, 1::2], x8)


@pytest.mark.parametrize('kwargs,message', [
    (dict(split='val'), "split='val'; allowed: 'train', 'test'"),
    (dict(classes=[3, 11]), 'classes [11] are not digits'),
    (dict(classes=()), 'classes=() must be distinct digits, at least one'),
    (dict(classes=(5, 5)), 'classes=(5, 5) must be distinct digits, at least one'),
    (dict(size=12), 'size=12 must be a positive multiple of 8'),
    (dict(test_fraction=1.0), 'test_fraction=1.0 must be in (0, 1)'),
])
def test_digits_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    digits(**kwargs)


def test_batches_are_resumable_and_cover_each_epoch():
  x = np.arange(50)
  b = Batches((x, x * 10), batch_size=8, seed=3)
  assert b.steps_per_epoch == 6
  full = [t[0] for t in itertools.islice(b.iterate(0), 20)]
  resumed = [t[0] for t in itertools.islice(Batches((x, x * 10), 8, seed=3).iterate(13), 7)]
  for u, v in zip(full[13:], resumed):
    np.testing.assert_array_equal(u, v)
  epoch0 = np.concatenate(full[:6])
  assert len(set(epoch0.tolist())) == 48
  assert not np.array_equal(np.concatenate(full[6:12]), epoch0)
  xb, yb = b.batch(4)
  np.testing.assert_array_equal(yb, xb * 10)


def test_batches_bad_arguments():
  with pytest.raises(ValueError, match=re.escape('Arrays have different lengths [3, 4]')):
    Batches((np.zeros(3), np.zeros(4)), 2)
  with pytest.raises(ValueError, match=re.escape('batch_size=5 must be in [1, 4]')):
    Batches((np.zeros(4),), 5)


def test_stdlib_text_domains():
  code = stdlib_text('code', max_bytes=200_000)
  prose = stdlib_text('prose', max_bytes=200_000)
  assert code.dtype == np.uint8 and len(code) == len(prose) == 200_000
  c, p = bytes(code).decode('utf-8', 'replace'), bytes(prose).decode('utf-8', 'replace')
  assert c.count('def ') > 100 and c.count('import ') > 20
  assert p.count('def ') < c.count('def ') / 10
  letters = sum(ch.isalpha() or ch.isspace() for ch in p) / len(p)
  assert letters > 0.85
  np.testing.assert_array_equal(stdlib_text.__wrapped__('prose', 200_000), prose)
  train, test = text.split(prose, 'train'), text.split(prose, 'test')
  assert len(train) + len(test) == len(prose)
  with pytest.raises(ValueError, match=re.escape("kind='poetry'; allowed: ['code', 'prose']")):
    stdlib_text('poetry')


def test_windows_targets_and_resume():
  data = stdlib_text('code', max_bytes=50_000)
  w = Windows(data, seq_len=16, batch_size=4, seed=1)
  b = w.batch(7)
  assert b.shape == (4, 17) and b.dtype == np.int32
  np.testing.assert_array_equal(next(Windows(data, 16, 4, seed=1).iterate(7)), b)
  with pytest.raises(ValueError, match='too short'):
    Windows(data[:10], seq_len=16, batch_size=4)
