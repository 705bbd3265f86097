"""Runs every tutorial notebook's code cells in order (no Jupyter needed); they must not fail."""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))
pytestmark = pytest.mark.slow


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize('path', [
    pytest.param(p, marks=helpers.needs_8_devices) if p.endswith('03_sharding.ipynb') else p
    for p in NOTEBOOKS], ids=os.path.basename)
def test_notebook_runs_and_is_committed_without_outputs(path):
  with open(path) as f:
    nb = json.load(f)
  namespace = {'__name__': '__notebook__'}
  for cell in nb['cells']:
    if cell['cell_type'] != 'code':
      continue
    assert not cell.get('outputs'), f'{path}: commit notebooks without outputs'
    exec(compile(''.join(cell['source']), path, 'exec'), namespace)  # pylint: disable=exec-used
