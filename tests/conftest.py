"""Test setup, before JAX is imported: 8 fake CPU devices (unless XLA_FLAGS already asks for a
count: the suite also runs with more), strict factored execution, and a base-model cache of this
test session's own (never the user's ~/.cache, whose contents would depend on earlier runs)."""

import os
import shutil
import tempfile

_COUNT = '--xla_force_host_platform_device_count'
if _COUNT not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_COUNT}=8".strip()
os.environ['LORAX_JAX_STRICT'] = '1'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  # One cache per test run, shared by its xdist workers (the controller sets it before they
  # start; writes are atomic renames) and inherited by the subprocesses the tests start.
  if not hasattr(config, 'workerinput'):
    os.environ['LORAX_JAX_CACHE'] = tempfile.mkdtemp(prefix='lorax_jax_test_bases_')


def pytest_unconfigure(config):
  if not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ.pop('LORAX_JAX_CACHE', ''), ignore_errors=True)


@pytest.fixture
def key():
  return jax.random.key(1234)
