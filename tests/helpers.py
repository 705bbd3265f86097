"""Shared test helpers: random adapters, float64 references, relative errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import lorax_jax as lj


def enable_x64():
  """float64 on, as a context manager (`jax.enable_x64` is newer than the oldest JAX supported)."""
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as ctx  # pylint: disable=g-import-not-at-top
  return ctx()


# Relative tolerance (max abs error / max abs reference) of the factored output against the
# float64 merged reference, per base dtype.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def randomize(adapters, key, scale=0.3):
  """Fresh random values for every adapter array (B included), keeping dtypes."""
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(key, len(leaves))
  new = [(scale * jax.random.normal(k, l.shape, jnp.float32)).astype(l.dtype)
         for k, l in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, new)


def cast_tree(tree, dtype):
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


def f64_reference(fn, params, adapters, *args):
  """fn(W + s*A@B, *args) computed in float64 on float64 copies of everything."""
  with enable_x64():
    p64 = cast_tree(params, jnp.float64)
    a64 = cast_tree(adapters, jnp.float64)
    args64 = cast_tree(list(args), jnp.float64)
    out = fn(lj.merge(p64, a64), *args64)
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), out)


def assert_factored_and_merged_match_float64(fn, params, adapters, args, dtype):
  """`lora(fn)` (jitted) and `fn` on `merge(...)` both match the float64 merged reference within
  `TOL[dtype]`, keep the base's output dtype, and the adapter visibly changes the output."""
  out = jax.jit(lj.lora(fn))(lj.join(params, adapters), *args)
  ref = f64_reference(fn, params, adapters, *args)
  assert out.dtype == fn(params, *args).dtype
  base = np.asarray(fn(params, *args).astype(jnp.float32), np.float64)
  assert rel_err(base, ref) > 1e-2, 'the adapter must change the output'
  assert rel_err(out, ref) < TOL[dtype]
  merged_out = fn(lj.merge(params, adapters), *args)
  assert rel_err(merged_out, ref) < TOL[dtype]


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


def assert_same_as_base(lora_out, base_out):
  """Identity at init: bitwise when both ran op by op (eagerly). JAX 0.7's eager execution is
  itself not bitwise-reproducible against evaluating the same jaxpr (even through JAX's own
  `jaxpr_as_fun`), so there the check allows float32 rounding."""
  a = np.asarray(jnp.asarray(lora_out, jnp.float32))
  b = np.asarray(jnp.asarray(base_out, jnp.float32))
  if tuple(int(x) for x in jax.__version__.split('.')[:2]) >= (0, 8):
    np.testing.assert_array_equal(a, b)
  else:
    assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 1e-30)
