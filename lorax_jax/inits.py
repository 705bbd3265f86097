"""Weight-aware LoRA initializations: the base becomes a residual (or a quantized base).

Selected per leaf by the spec's `init` (variant `'lora'`), run by `init(key, params, spec)`:

  pissa    A, B from the top-r singular triplets of W, sqrt(sigma / s) on each side; the base
           becomes W - s*A@B (Meng et al., 2024). `niter` > 0 (or PEFT's `'pissa_niter_K'`) uses
           a randomized SVD with K subspace iterations instead of the exact one.
  milora   the same with the r smallest triplets (Wang et al., 2025): the principal part stays.
  olora    A = R[:r]^T, B = Q[:, :r]^T from the QR decomposition W^T = Q R (Buyukakyuz, 2024).
  loftq    the base becomes quant(W - s*A@B), alternating `iters` times with the rank-r SVD of
           the quantization error (Li et al., 2024); returns a `QuantizedArray` base.

and, from calibration batches, by `init(key, params, spec, fn=loss_fn, batches=iterator)`
(`lorax_jax.calibration`): `lora_ga` (gradient SVD), `eva` (activation SVD, B = 0, ranks
redistributed), `corda` (covariance-oriented SVD).

Every init that sets both A and B replaces the base by W - s*A@B computed from the factors as
stored (in the adapter dtype), so that the model's output is unchanged at step 0.
`to_lora(...)` turns such adapters into plain LoRA adapters against the ORIGINAL base.

Shapes: kernels are viewed as batch_shape + (d_in, d_out) matrices (`variants.common.matrix`);
A is batch + in + (r,) and B batch + (r,) + out, as for LoRA.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lorax_jax import quant as quant_lib
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common

WEIGHT = ('pissa', 'milora', 'olora', 'loftq')
CALIBRATED = ('lora_ga', 'eva', 'corda')
LORA_GA_DIRECTIONS = ('ArBr', 'A2rBr', 'ArB2r', 'random')
LORA_GA_SCALES = ('stable', 'weight_svd', 'gd_scale', 'unit')


def _is_int(v, lo):
  return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def check(path: str, spec: LeafSpec) -> None:
  """Raises ValueError for init options the init cannot take."""
  init = spec.init
  bad = None
  if init == 'pissa':
    if spec.init_opt('niter') is not None and not _is_int(spec.init_opt('niter'), 0):
      bad = ('niter', 'None (exact SVD) or an int >= 0')
    elif not _is_int(spec.init_opt('oversample'), 0):
      bad = ('oversample', 'an int >= 0')
  elif init == 'loftq':
    if not _is_int(spec.init_opt('iters'), 1):
      bad = ('iters', 'an int >= 1')
    else:
      q = spec.init_opt('quant')
      quant_lib.resolve_setting(
          quant_setting(q, spec), path, spec.shape)
  elif init == 'lora_ga':
    if spec.init_opt('direction') not in LORA_GA_DIRECTIONS:
      bad = ('direction', f'one of {list(LORA_GA_DIRECTIONS)}')
    elif spec.init_opt('scale') not in LORA_GA_SCALES:
      bad = ('scale', f'one of {list(LORA_GA_SCALES)}')
    elif not isinstance(spec.init_opt('stable_gamma'), (int, float)) or spec.init_opt(
        'stable_gamma') <= 0:
      bad = ('stable_gamma', 'a number > 0')
    elif 2 * spec.rank > min(math.prod(spec.in_shape), math.prod(spec.out_shape)) and (
        spec.init_opt('direction') != 'ArBr'):
      bad = ('direction', f"'ArBr' for rank {spec.rank}: 2r directions exceed the layer "
             f'({math.prod(spec.in_shape)} x {math.prod(spec.out_shape)})')
  elif init == 'eva':
    if not isinstance(spec.init_opt('rho'), (int, float)) or spec.init_opt('rho') < 1:
      bad = ('rho', 'a number >= 1')
    elif not isinstance(spec.init_opt('tau'), (int, float)) or not 0 < spec.init_opt('tau') <= 1:
      bad = ('tau', 'a number in (0, 1]')
  elif init == 'corda':
    if spec.init_opt('mode') not in ('ipm', 'kpm'):
      bad = ('mode', "'ipm' or 'kpm'")
    elif not isinstance(spec.init_opt('damping'), (int, float)) or spec.init_opt('damping') < 0:
      bad = ('damping', 'a number >= 0')
  if bad is not None:
    key, allowed = bad
    raise ValueError(f'init_options {key}={spec.init_opt(key)!r} for {path!r} ({init}) must be '
                     f'{allowed}.')


# ---------------------------------------------------------------------------------------------
# Decompositions (batched over leading axes, jit-able).


def _t(m):
  return jnp.swapaxes(m, -1, -2)


def svd(m: jax.Array):
  """Exact thin SVD: m = U diag(S) Vh, singular values descending."""
  return jnp.linalg.svd(m, full_matrices=False)


def randomized_svd(key: jax.Array, m: jax.Array, rank: int, niter: int,
                   oversample: int = 10):
  """The top-`rank` singular triplets of `m` (batch + (p, q)) by randomized subspace iteration.

  Halko, Martinsson and Tropp (2011), Algorithm 4.4: a Gaussian sketch of `rank + oversample`
  columns, `niter` power iterations re-orthonormalized by QR (as `torch.svd_lowrank`), then the
  exact SVD of the small projected matrix. Costs O(p q (rank + oversample) (2 niter + 2)).

  Returns:
    `(U, S, Vh)` with `rank` columns / values / rows.
  """
  p, q = m.shape[-2:]
  k = min(rank + oversample, p, q)
  omega = jax.random.normal(key, m.shape[:-2] + (q, k), m.dtype)
  basis, _ = jnp.linalg.qr(m @ omega)
  for _ in range(niter):
    z, _ = jnp.linalg.qr(_t(m) @ basis)
    basis, _ = jnp.linalg.qr(m @ z)
  u, s, vh = jnp.linalg.svd(_t(basis) @ m, full_matrices=False)
  return (basis @ u)[..., :rank], s[..., :rank], vh[..., :rank, :]


def split_sqrt(u, s, vh, scale: float):
  """A = U sqrt(S / scale), B = sqrt(S / scale) Vh, so that scale * A @ B = U S Vh."""
  root = jnp.sqrt(s / scale)
  return u * root[..., None, :], root[..., :, None] * vh


# ---------------------------------------------------------------------------------------------
# Per-leaf inits. Each returns `(base, a, b)` in kernel / canonical layouts.


def _f32(w):
  return w.astype(common.compute_dtype(w))


def _finish(w, spec: LeafSpec, a_mat, b_mat):
  """Casts the factors to the adapter dtype and returns (W - s*A@B, A, B) in spec layouts."""
  dtype = common.adapter_dtype(spec, w)
  a = common.unflat_a(a_mat.astype(dtype), spec)
  b = common.unflat_b(b_mat.astype(dtype), spec)
  cd = common.compute_dtype(w, a)
  dw = spec.scale * (a_mat.astype(dtype).astype(cd) @ b_mat.astype(dtype).astype(cd))
  res = _f32(w).astype(cd) - common.unmatrix(dw, spec)
  return res.astype(w.dtype), a, b


def pissa(key: jax.Array, w: jax.Array, spec: LeafSpec, *, minor: bool = False):
  """PiSSA (or MiLoRA with `minor=True`): the residual base and (A, B) from W's SVD."""
  m = common.matrix(_f32(w), spec)
  r = spec.rank
  niter = spec.init_opt('niter') if spec.init == 'pissa' else None
  if niter is not None and not minor:
    u, s, vh = randomized_svd(key, m, r, niter, spec.init_opt('oversample'))
  else:
    u, s, vh = svd(m)
    sl = slice(-r, None) if minor else slice(0, r)
    u, s, vh = u[..., :, sl], s[..., sl], vh[..., sl, :]
  return _finish(w, spec, *split_sqrt(u, s, vh, spec.scale))


def olora(key: jax.Array, w: jax.Array, spec: LeafSpec):
  """OLoRA: QR of W^T (PEFT's QR of the torch (out, in) weight); no division by the scale."""
  del key
  m = common.matrix(_f32(w), spec)
  q, rr = jnp.linalg.qr(_t(m))          # W^T = Q R: Q (d_out, k), R (k, d_in)
  r = spec.rank
  return _finish(w, spec, _t(rr[..., :r, :]), _t(q[..., :, :r]))


def loftq(w: jax.Array, spec: LeafSpec, quant: Any = 'nf4', iters: int = 1):
  """LoftQ: alternately Q_t = quant(W - s*A@B) and (A, B) = rank-r SVD of (W - Q_t) / s.

  Args:
    w: the float kernel.
    spec: its `LeafSpec` (rank, scale, axes).
    quant: the quantization setting of the base (see `quant.quantize_array`).
    iters: alternations T >= 1 (PEFT's `loftq_iter`; 1 = quantize W, then fit its error).

  Returns:
    `(q, a, b, errors)`: the quantized base Q_T, the adapter factors, and the relative error
    ||W - dequant(Q_t) - s*A_t@B_t||_F / ||W||_F after each iteration t (a list of T floats, a
    traced array under jit). The error of quantization alone is `quantization_error(w, quant)`.
  """
  if not _is_int(iters, 1):
    raise ValueError(f'loftq iters={iters!r} must be an int >= 1.')
  setting = quant_setting(quant, spec)
  quant_lib.resolve_setting(setting, 'kernel', tuple(w.shape))
  wf = _f32(w)
  dtype = common.adapter_dtype(spec, w)
  norm = jnp.linalg.norm(wf)
  low = jnp.zeros_like(wf)
  errors = []
  for _ in range(iters):
    q = quant_lib.quantize_array((wf - low).astype(w.dtype), setting, path='kernel')
    err = wf - quant_lib.dequantize_array(q, wf.dtype)
    u, s, vh = svd(common.matrix(err, spec))
    a_m, b_m = split_sqrt(u[..., :spec.rank], s[..., :spec.rank], vh[..., :spec.rank, :],
                          spec.scale)
    a_m, b_m = a_m.astype(dtype), b_m.astype(dtype)
    low = common.unmatrix(spec.scale * (a_m.astype(wf.dtype) @ b_m.astype(wf.dtype)), spec)
    errors.append(jnp.linalg.norm(err - low) / norm)
  return q, common.unflat_a(a_m, spec), common.unflat_b(b_m, spec), errors


quant_setting = quant_lib.quant_setting


def quantization_error(w: jax.Array, quant: Any = 'nf4') -> jax.Array:
  """||W - dequant(quant(W))||_F / ||W||_F: the error LoftQ starts from."""
  setting = dict(quant) if isinstance(quant, tuple) else quant
  q = quant_lib.quantize_array(w, setting)
  wf = _f32(w)
  return jnp.linalg.norm(wf - quant_lib.dequantize_array(q, wf.dtype)) / jnp.linalg.norm(wf)


def weight_init(key: jax.Array, w: Any, spec: LeafSpec):
  """The weight-only inits (`WEIGHT`): `(base, a, b)`; the base may be a `QuantizedArray`."""
  if spec.init == 'loftq':
    if quant_lib.is_quantized(w):
      raise ValueError(f'LoftQ init needs the float base, but the leaf is '
                       'already quantized: initialize before quantizing (LoftQ quantizes it).')
    q, a, b, _ = loftq(w, spec, spec.init_opt('quant'), spec.init_opt('iters'))
    return q, a, b
  if quant_lib.is_quantized(w):
    raise ValueError(
        f'init {spec.init!r} replaces the base by a residual, but the leaf is '
        'already quantized: its rounding would be compounded. Initialize on the float base, '
        'then quantize the residual (QPiSSA: quantize(params, spec) after init).')
  if spec.init in ('pissa', 'milora'):
    return pissa(key, w, spec, minor=spec.init == 'milora')
  if spec.init == 'olora':
    return olora(key, w, spec)
  raise ValueError(f'init {spec.init!r} is not a weight-only init; '
                   f'allowed: {list(WEIGHT)}.')


RESIDUAL = ('pissa', 'milora', 'olora', 'lora_ga', 'corda')
