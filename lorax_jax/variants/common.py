"""Helpers shared by variant modules: dtypes, initializers, seeded frozen arrays, matrix views."""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp

from lorax_jax import layout
from lorax_jax.leafspec import LeafSpec


def adapter_dtype(spec: LeafSpec, w) -> jnp.dtype:
  return jnp.dtype(spec.dtype or w.dtype)


def compute_dtype(*xs) -> jnp.dtype:
  """At least float32: norms, SVDs and merges are computed in it."""
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def kaiming_uniform(key, shape, fan_in: int, dtype):
  """torch's `kaiming_uniform_(a=sqrt(5))` (the `nn.Linear` default): U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def lora_a(key, spec: LeafSpec, dtype, shape=None):
  """LoRA's A init (`spec.init`): Kaiming-uniform over d_in, or Gaussian N(0, 1/r^2)."""
  shape = shape or spec.batch_shape + spec.in_shape + (spec.rank,)
  if spec.init == 'kaiming':
    return kaiming_uniform(key, shape, math.prod(spec.in_shape), dtype)
  return (jax.random.normal(key, shape, jnp.float32) / spec.rank).astype(dtype)


def lora_pair(key, w, spec: LeafSpec):
  """LoRA's (A, B = 0) in canonical layout and the adapter dtype."""
  dtype = adapter_dtype(spec, w)
  b = jnp.zeros(spec.batch_shape + (spec.rank,) + spec.out_shape, dtype)
  return lora_a(key, spec, dtype), b


def seeded_key(seed: int, *salt) -> jax.Array:
  """A PRNG key from a static seed and static salt (shapes, a path): frozen random arrays are
  regenerated from it inside every step instead of being stored."""
  key = jax.random.key(int(seed))
  for s in salt:
    key = jax.random.fold_in(key, zlib.crc32(repr(s).encode()) & 0x7FFFFFFF)
  return key


def matrix(w, spec: LeafSpec):
  """The kernel as batch_shape + (d_in, d_out)."""
  return layout.to_matrix(w, spec.batch_axes, spec.in_axes, spec.out_axes)


def unmatrix(m, spec: LeafSpec):
  return layout.from_matrix(m, spec.shape, spec.batch_axes, spec.in_axes, spec.out_axes)


def flat_a(a, spec: LeafSpec):
  """Canonical A (batch + in + (r,)) -> batch + (d_in, r)."""
  return a.reshape(spec.batch_shape + (math.prod(spec.in_shape), a.shape[-1]))


def flat_b(b, spec: LeafSpec):
  """Canonical B (batch + (r,) + out) -> batch + (r, d_out)."""
  nb = len(spec.batch_shape)
  return b.reshape(spec.batch_shape + (b.shape[nb], math.prod(spec.out_shape)))


def unflat_a(a, spec: LeafSpec):
  return a.reshape(spec.batch_shape + spec.in_shape + (a.shape[-1],))


def unflat_b(b, spec: LeafSpec):
  nb = len(spec.batch_shape)
  return b.reshape(spec.batch_shape + (b.shape[nb],) + spec.out_shape)


def cheaper_factored(rank: int, spec: LeafSpec) -> bool:
  """Whether a rank-`rank` factored form beats forming dW for a training step.

  Per token, the factored branch costs about 6 * rank * (d_in + d_out) FLOPs (forward and
  backward); forming dW costs 2 * d_in * d_out for the weight gradient of the backward pass.
  """
  d_in, d_out = math.prod(spec.in_shape), math.prod(spec.out_shape)
  return 3 * rank * (d_in + d_out) < d_in * d_out


def check_int(path, spec, key, lo, hi=None):
  v = spec.opt(key)
  if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
    allowed = f'[{lo}, {hi}]' if hi is not None else f'>= {lo}'
    raise ValueError(f'{key}={v!r} for {path!r} ({spec.variant}) must be an int {allowed}.')
  return v


def check_float(path, spec, key, lo=None):
  v = spec.opt(key)
  if not isinstance(v, (int, float)) or isinstance(v, bool) or (lo is not None and v < lo):
    raise ValueError(f'{key}={v!r} for {path!r} ({spec.variant}) must be a number'
                     + (f' >= {lo}.' if lo is not None else '.'))
  return float(v)


# Layouts (`Variant.layout`): the kernel axis each array axis spans, None for rank axes.
def axes_a(spec: LeafSpec, stacked: bool = True) -> tuple:
  """Canonical A: batch + in + (r,)."""
  return (spec.batch_axes if stacked else ()) + spec.in_axes + (None,)


def axes_b(spec: LeafSpec, stacked: bool = True) -> tuple:
  """Canonical B: batch + (r,) + out."""
  return (spec.batch_axes if stacked else ()) + (None,) + spec.out_axes


def axes_out(spec: LeafSpec) -> tuple:
  """A per-output-unit vector: batch + out."""
  return spec.batch_axes + spec.out_axes


def axes_batch(spec: LeafSpec, n: int) -> tuple:
  """batch + n axes that span no kernel axis."""
  return spec.batch_axes + (None,) * n


def lora_layout(spec: LeafSpec) -> dict[str, tuple]:
  return {'a': axes_a(spec), 'b': axes_b(spec)}
