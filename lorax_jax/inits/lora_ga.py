"""LoRA-GA (Wang, Yu and Li, 2024): factors from the SVD of the mean gradient; a residual base.

G = the mean gradient of the loss w.r.t. W over the calibration batches; from G's (exact) SVD
A = the first r input-side singular vectors, B = the output-side ones r+1..2r
(`direction='ArB2r'`), both times d_out^(1/4) / sqrt(gamma) (`scale='stable'`, gamma 16); the
base becomes W - s*A@B. As the official LoRA-GA code; PEFT's port scales only B and multiplies
it by the singular values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.inits import linalg
from lorax_jax.inits.base import GRADIENTS, WEIGHT, Init, bad_option
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common

DIRECTIONS = ('ArBr', 'A2rBr', 'ArB2r', 'random')
SCALES = ('stable', 'weight_svd', 'gd_scale', 'unit')


def lora_ga(w: jax.Array, spec: LeafSpec, grad: jax.Array):
  """LoRA-GA factors from the mean gradient `grad` (W's shape): `(base, a, b)`."""
  g = common.matrix(grad.astype(common.compute_dtype(grad)), spec)   # batch + (d_in, d_out)
  u, s, vh = linalg.svd(g)            # u: input side, vh: output side
  r = spec.rank
  direction = spec.init_opt('direction')
  if direction == 'ArB2r':
    a, b = u[..., :, :r], vh[..., r:2 * r, :]
  elif direction == 'A2rBr':
    a, b = u[..., :, r:2 * r], vh[..., :r, :]
  elif direction == 'ArBr':
    a, b = u[..., :, :r], vh[..., :r, :]
  else:   # 'random': r of the first 2r directions each, without replacement
    perm = np.random.RandomState(0).permutation(2 * r)
    a, b = u[..., :, perm[:r]], vh[..., perm[r:], :]
  d_out = g.shape[-1]
  mode = spec.init_opt('scale')
  gamma = float(spec.init_opt('stable_gamma'))
  if mode == 'stable':
    a = a * d_out ** 0.25 / math.sqrt(gamma)
    b = b * d_out ** 0.25 / math.sqrt(gamma)
  elif mode == 'weight_svd':   # both times mean(sqrt(sigma_W[:r] / s))
    sw = linalg.svd(common.matrix(w.astype(common.compute_dtype(w)), spec))[1]
    f = jnp.mean(jnp.sqrt(sw[..., :r] / spec.scale), -1)[..., None, None]
    a, b = a * f, b * f
  elif mode == 'gd_scale':
    a, b = a / spec.scale, b / spec.scale
  return linalg.residual(w, spec, a, b)


def _calibrate(key, ws, specs, data):
  del key
  return {p: (*lora_ga(ws[p], s, data[p][GRADIENTS]), s) for p, s in specs.items()}


def _check(path: str, spec: LeafSpec) -> None:
  if spec.init_opt('direction') not in DIRECTIONS:
    raise bad_option(path, spec, 'direction', f'one of {list(DIRECTIONS)}')
  if spec.init_opt('scale') not in SCALES:
    raise bad_option(path, spec, 'scale', f'one of {list(SCALES)}')
  gamma = spec.init_opt('stable_gamma')
  if not isinstance(gamma, (int, float)) or gamma <= 0:
    raise bad_option(path, spec, 'stable_gamma', 'a number > 0')
  d_in, d_out = math.prod(spec.in_shape), math.prod(spec.out_shape)
  if 2 * spec.rank > min(d_in, d_out) and spec.init_opt('direction') != 'ArBr':
    raise bad_option(path, spec, 'direction', f"'ArBr' for rank {spec.rank}: 2r directions "
                     f'exceed the layer ({d_in} x {d_out})')


LORA_GA = Init('lora_ga', options={'direction': 'ArB2r', 'scale': 'stable', 'stable_gamma': 16.0},
               needs=frozenset({WEIGHT, GRADIENTS}), changes_base=True, residual=True,
               check=_check, calibrate=_calibrate)
