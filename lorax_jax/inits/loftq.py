"""LoftQ (Li et al., 2024): a quantized base and the adapter that best corrects its error.

The base becomes quant(W - s*A@B), alternating `iters` times with the rank-r SVD of the
quantization error; the init returns a `QuantizedArray` base (in the `quant` format). Its error
is not low-rank, so LoftQ adapters have no plain-LoRA form against the float W (`to_lora`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorax_jax import quant as quant_lib
from lorax_jax.inits import linalg
from lorax_jax.inits.base import WEIGHT, Init, bad_option, is_int
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common

quant_setting = quant_lib.quant_setting


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

  Raises:
    ValueError: for `iters` < 1 or a quantization setting the leaf cannot take.
  """
  if not is_int(iters, 1):
    raise ValueError(f'loftq iters={iters!r} must be an int >= 1.')
  setting = quant_setting(quant, spec)
  quant_lib.resolve_setting(setting, 'kernel', tuple(w.shape))
  wf = linalg.f32(w)
  dtype = common.adapter_dtype(spec, w)
  norm = jnp.linalg.norm(wf)
  low = jnp.zeros_like(wf)
  errors = []
  for _ in range(iters):
    q = quant_lib.quantize_array((wf - low).astype(w.dtype), setting, path='kernel')
    err = wf - quant_lib.dequantize_array(q, wf.dtype)
    u, s, vh = linalg.svd(common.matrix(err, spec))
    a_m, b_m = linalg.split_sqrt(u[..., :spec.rank], s[..., :spec.rank],
                                 vh[..., :spec.rank, :], spec.scale)
    a_m, b_m = a_m.astype(dtype), b_m.astype(dtype)
    low = common.unmatrix(spec.scale * (a_m.astype(wf.dtype) @ b_m.astype(wf.dtype)), spec)
    errors.append(jnp.linalg.norm(err - low) / norm)
  return q, common.unflat_a(a_m, spec), common.unflat_b(b_m, spec), errors


def quantization_error(w: jax.Array, quant: Any = 'nf4') -> jax.Array:
  """||W - dequant(quant(W))||_F / ||W||_F: the error LoftQ starts from."""
  setting = dict(quant) if isinstance(quant, tuple) else quant
  q = quant_lib.quantize_array(w, setting)
  wf = linalg.f32(w)
  return jnp.linalg.norm(wf - quant_lib.dequantize_array(q, wf.dtype)) / jnp.linalg.norm(wf)


def _factors(key, w, spec: LeafSpec):
  del key
  q, a, b, _ = loftq(w, spec, spec.init_opt('quant'), spec.init_opt('iters'))
  return q, a, b


def _check(path: str, spec: LeafSpec) -> None:
  if not is_int(spec.init_opt('iters'), 1):
    raise bad_option(path, spec, 'iters', 'an int >= 1')
  quant_lib.resolve_setting(quant_setting(spec.init_opt('quant'), spec), path, spec.shape)


# A DoRA magnitude over a quantized base is not composed here: LoftQ serves plain LoRA.
LOFTQ = Init('loftq', options={'quant': 'nf4', 'iters': 1}, needs=frozenset({WEIGHT}),
             changes_base=True, variants=('lora',), check=_check, factors=_factors)
