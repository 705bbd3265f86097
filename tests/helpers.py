"""Shared test helpers: random adapters, float64 references, relative errors."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj

# For tests whose meshes use 8 devices: conftest gives 8 fake CPU devices unless XLA_FLAGS asks
# for another count (with more, meshes take the first 8).
needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices')


def subprocess_env(devices: int | None = None, **env: str) -> dict[str, str]:
  """The environment for a script a test starts: this one's, with `devices` fake devices (none:
  the script's own default) instead of conftest's count, and the compilation cache kept.

  Scripts compile fast like the test process: a training run's resume, checkpoints and errors
  do not depend on code generation, and what the tests check of a benchmark (XLA's FLOP and
  byte counts, losses, which leaves run factored) comes from XLA's HLO passes, which the fast
  flags leave alone (they change LLVM's code generation, hence wall times, which no test
  checks)."""
  flags = os.environ.get('XLA_FLAGS', '')
  flags = [f for f in flags.split() if not f.startswith('--xla_force_host_platform_device_count')]
  if devices:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  out = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if flags:
    out['XLA_FLAGS'] = ' '.join(flags)
  return {**out, **env}


def enable_x64():
  """float64 on, as a context manager (`jax.enable_x64` is newer than the oldest JAX supported)."""
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as ctx  # pylint: disable=g-import-not-at-top
  return ctx()


# Relative tolerance (max abs error / max abs reference) of the factored output against the
# float64 merged reference, per base dtype. bfloat16: 4 of its roundings (2^-7 each), since the
# stacked cases chain three bfloat16 layers (their error reaches 3e-2 on some draws).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 4 * 2.0 ** -7}
# The factored output is this many times closer to the reference than the base output is: an
# adapter that is ignored or applied at the wrong scale fails, whatever the dtype's tolerance.
CLOSER = 8


def randomize(adapters, key, scale=0.3):
  """Fresh random values for every adapter array (B included), keeping dtypes. Drawn by NumPy
  from a seed that `key` gives (no XLA program per leaf shape to compile)."""
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  new = [jnp.asarray((scale * rng.standard_normal(l.shape)).astype(np.float32).astype(l.dtype))
         for l in leaves]
  return jax.tree_util.tree_unflatten(treedef, new)


def cast_tree(tree, dtype):
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


def jit_arrays(fn, *args):
  """`jax.jit(fn)(*args)` with the non-array leaves of `args` (Python numbers, flags) held fixed
  instead of traced."""
  leaves, treedef = jax.tree_util.tree_flatten(args)
  traced = [isinstance(l, (jax.Array, np.ndarray, np.generic)) for l in leaves]

  def run(arrays):
    it = iter(arrays)
    return fn(*jax.tree_util.tree_unflatten(
        treedef, [next(it) if t else l for l, t in zip(leaves, traced)]))

  return jax.jit(run)([l for l, t in zip(leaves, traced) if t])


def f64_reference(fn, params, adapters, *args):
  """fn(W + s*A@B, *args) computed in float64 on float64 copies of everything."""
  with enable_x64():
    p64 = cast_tree(params, jnp.float64)
    a64 = cast_tree(adapters, jnp.float64)
    args64 = cast_tree(list(args), jnp.float64)
    out = jit_arrays(lambda p, a, rest: fn(lj.merge(p, a), *rest), p64, a64, args64)
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), out)


def assert_factored_and_merged_match_float64(fn, params, adapters, args, dtype):
  """`lora(fn)` (jitted) and `fn` on `merge(...)` both match the float64 merged reference within
  `TOL[dtype]` and `CLOSER` times closer than the base output is, and keep the base's dtype."""
  out = jax.jit(lj.lora(fn))(lj.join(params, adapters), *args)
  ref = f64_reference(fn, params, adapters, *args)
  base_out = jit_arrays(fn, params, *args)
  assert out.dtype == base_out.dtype
  base = np.asarray(base_out.astype(jnp.float32), np.float64)
  effect = rel_err(base, ref)
  merged_out = jit_arrays(fn, lj.merge(params, adapters), *args)
  for name, value in (('factored', out), ('merged', merged_out)):
    err = rel_err(value, ref)
    assert err < TOL[dtype], (name, err, TOL[dtype])
    assert err < effect / CLOSER, f'{name}: error {err:.3g} vs the adapter\'s effect {effect:.3g}'


def mean_square_loss(fn):
  """A train-step loss `(joined, batch, rng) -> mean(lora(fn)(joined, *batch)^2)`."""
  apply = lj.lora(fn)

  def loss_fn(joined, batch, rng):
    del rng
    return jnp.mean(jnp.square(apply(joined, *batch).astype(jnp.float32)))

  return loss_fn


def assert_trees_equal(tree, ref):
  """Bitwise equality of two trees' leaves (e.g. a base that training must not touch)."""
  for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def rel_err(out, ref):
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


# How far two differently compiled programs computing the same function may drift apart, relative
# to the output's scale: XLA fuses, vectorizes and contracts (FMA) differently for each program and
# for each CPU (AVX-512, AVX2 and SSE builds differ in the last bits), so only a few ulps are
# promised. Bitwise equality is asserted where it holds by construction instead (see below).
SAME_TOL = {jnp.dtype(jnp.float32): 16 * float(jnp.finfo(jnp.float32).eps),
            jnp.dtype(jnp.bfloat16): 4 * float(jnp.finfo(jnp.bfloat16).eps)}


def assert_close_compiled(out, ref, dtype=None):
  """`out` and `ref` computed by two different compiled programs agree to `SAME_TOL[dtype]` of
  the reference's scale (dtype: `ref`'s own by default)."""
  dtype = jnp.dtype(jnp.asarray(ref).dtype if dtype is None else dtype)
  a = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  err = float(np.max(np.abs(a - b), initial=0.0))
  assert err <= SAME_TOL[dtype] * max(float(np.max(np.abs(b), initial=0.0)), 1e-30), (
      f'max abs difference {err:.3g} > {SAME_TOL[dtype]:.3g} x max |ref| for {dtype.name}')


def _eager_is_bitwise() -> bool:
  # JAX 0.7's eager execution is itself not bitwise-reproducible against evaluating the same
  # jaxpr (even through JAX's own `jaxpr_as_fun`); from 0.8 on it is.
  return tuple(int(x) for x in jax.__version__.split('.')[:2]) >= (0, 8)


def assert_identity_at_init(fn, params, adapters, *args, strict=True):
  """Identity at init: `lora(fn)` on `join(params, adapters)` gives `fn(params)`.

  1. Op by op, bitwise. Under `jax.disable_jit()` every primitive runs as its own compiled program
     (scan bodies, jitted sub-functions and remat included: they run as Python loops and plain
     calls), so the base's ops and the adapted path's base ops are the same programs on the same
     inputs, and an adapter whose update is zero at init adds an exact zero. This holds on any
     CPU, by construction.
  2. Compiled, within `SAME_TOL`: `jit(lora(fn))` and `jit(fn)` are different XLA programs (the
     side path changes fusion and code generation), so only a few ulps are promised.
  """
  apply = lj.lora(fn, strict=strict)
  joined = lj.join(params, adapters)
  with jax.disable_jit():
    out = np.asarray(jnp.asarray(apply(joined, *args), jnp.float32))
    base_out = fn(params, *args)
  base = np.asarray(jnp.asarray(base_out, jnp.float32))
  if _eager_is_bitwise():
    np.testing.assert_array_equal(out, base)
  else:
    assert np.max(np.abs(out - base)) <= 1e-5 * max(np.max(np.abs(base)), 1e-30)
  assert_close_compiled(jax.jit(apply)(joined, *args), jax.jit(fn)(params, *args),
                        jnp.asarray(base_out).dtype)


def wait_for(predicate, proc, what: str, timeout: float = 300) -> None:
  """Polls `predicate()` until it holds; fails if the process `proc` ends first or `timeout`
  seconds pass."""
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f'the process ended (exit {proc.returncode}) before {what}'
    assert time.time() < deadline, f'no {what} after {timeout} s'
    time.sleep(0.05)


def has_loss(workdir: str) -> bool:
  """Whether the run in `workdir` has logged a training loss (its first step is done)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  return os.path.exists(path) and '"loss"' in open(path).read()
