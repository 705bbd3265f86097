"""Test setup, before JAX is imported: 8 fake CPU devices (unless XLA_FLAGS already asks for a
count: the suite also runs with more), strict factored execution, and a base-model cache of this
test session's own (never the user's ~/.cache, whose contents would depend on earlier runs).

Compile time, not run time, is what the suite spends (thousands of small programs), so the test
process compiles fast and once:
- XLA's CPU backend without LLVM's expensive optimizations and with its older loop emitters for
  fusions (`FAST_COMPILE`): the suite's programs compile about 5x faster (2.2x of it from the
  emitters) and, being small, run hardly slower. They compute the same functions, and every
  comparison of two programs is within a per-dtype tolerance anyway (tests/helpers.py). The
  training runs and benchmarks that tests start compile the same way (`helpers.subprocess_env`:
  what the tests check of a benchmark, FLOP and byte counts, does not depend on code
  generation).
  `LORAX_JAX_TEST_FAST_COMPILE=0` tests the fully optimized code everywhere (.ci/run does, for
  the law tests).
- A persistent compilation cache of this test run's own, shared by its xdist workers and the
  scripts they start: the same program (e.g. the base model's forward, traced again by each
  variant's test) compiles once. It starts empty and is removed at the end, so no result depends
  on an earlier run (unless `JAX_COMPILATION_CACHE_DIR` names one of the user's, which is kept).
"""

import gc
import os
import shutil
import tempfile

_COUNT = '--xla_force_host_platform_device_count'
FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true',
                '--xla_cpu_use_fusion_emitters=false')
_flags = os.environ.get('XLA_FLAGS', '').split()
if not any(f.startswith(_COUNT) for f in _flags):
  _flags.append(f'{_COUNT}=8')
if os.environ.get('LORAX_JAX_TEST_FAST_COMPILE', '1') != '0':
  _flags += [f for f in FAST_COMPILE if f.partition('=')[0] not in ' '.join(_flags)]
os.environ['XLA_FLAGS'] = ' '.join(_flags)
os.environ['LORAX_JAX_STRICT'] = '1'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  # One base-model cache and one compilation cache per test run, shared by its xdist workers (the
  # controller sets them before they start) and inherited by the subprocesses the tests start.
  # Base-model writes are atomic renames; a compiled program read while another process is still
  # writing it is compiled again (JAX warns and goes on).
  if not hasattr(config, 'workerinput'):
    os.environ['LORAX_JAX_CACHE'] = tempfile.mkdtemp(prefix='lorax_jax_test_bases_')
    if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):   # a cache the user names is theirs
      os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='lorax_jax_test_xla_')
      config.lorax_jax_own_xla_cache = True
    # Every program, however quick to compile (the defaults keep only those over a second).
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  # JAX read its settings when conftest imported it; workers (started later) read them from the
  # environment above, and this sets them for a run without workers.
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def pytest_unconfigure(config):
  if not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ.pop('LORAX_JAX_CACHE', ''), ignore_errors=True)
    if getattr(config, 'lorax_jax_own_xla_cache', False):
      shutil.rmtree(os.environ.pop('JAX_COMPILATION_CACHE_DIR'), ignore_errors=True)


@pytest.fixture
def key():
  return jax.random.key(1234)


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_programs():
  """Each test module's compiled programs are dropped when it ends (a worker runs many modules;
  what a later module needs again loads from the compilation cache in milliseconds)."""
  yield
  jax.clear_caches()
  gc.collect()
