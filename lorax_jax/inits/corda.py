"""CorDA (Yang et al., 2024; PEFT's corda): covariance-oriented SVD of W; a residual base.

C = the mean of x x^T over the layer's input tokens, damped: C_d = C + `damping` * mean(diag C)
* I; the SVD W_t C_d = U S V^T (W_t the (out, in) weight), V_hat = C_d^-1 V; `mode='ipm'` keeps
the largest r components, `'kpm'` the smallest. A = V_hat_r sqrt(S_r / s), B = sqrt(S_r / s)
U_r^T; the base becomes W - s*A@B. PEFT normalizes each sample's activations by their maximum
before averaging: that rescales C, which leaves s*A@B unchanged and only moves a constant factor
between A and B.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax_jax.inits import linalg
from lorax_jax.inits.base import ACTIVATIONS, WEIGHT, Init, bad_option
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common


def corda(w: jax.Array, spec: LeafSpec, stats):
  """CorDA factors from the input statistics `(sum X^T X, sum X, count)`: `(base, a, b)`."""
  c = stats[0] / stats[2][..., None, None]                  # mean X^T X, batch + (d_in, d_in)
  d_in = c.shape[-1]
  damp = spec.init_opt('damping') * jnp.mean(jnp.diagonal(c, axis1=-2, axis2=-1), -1)
  c = c + damp[..., None, None] * jnp.eye(d_in, dtype=c.dtype)
  m = common.matrix(w.astype(common.compute_dtype(w, c)), spec)   # batch + (d_in, d_out)
  c = c.astype(m.dtype)
  # torch: svd(W_t @ C) with W_t = m^T: W_t C = U S V^T  ->  C m = V S U^T (here: svd(C m)).
  p, s, qh = linalg.svd(linalg.t(m) @ c)                    # (d_out, d_in) = P S Qh
  v_hat = jnp.linalg.solve(c, linalg.t(qh))                 # C^-1 V: (d_in, k)
  r = spec.rank
  sl = slice(0, r) if spec.init_opt('mode') == 'ipm' else slice(-r, None)
  a, b = linalg.split_sqrt(v_hat[..., :, sl], s[..., sl], linalg.t(p[..., :, sl]), spec.scale)
  return linalg.residual(w, spec, a, b)


def _calibrate(key, ws, specs, data):
  del key
  return {p: (*corda(ws[p], s, data[p][ACTIVATIONS]), s) for p, s in specs.items()}


def _check(path: str, spec: LeafSpec) -> None:
  if spec.init_opt('mode') not in ('ipm', 'kpm'):
    raise bad_option(path, spec, 'mode', "'ipm' or 'kpm'")
  damping = spec.init_opt('damping')
  if not isinstance(damping, (int, float)) or damping < 0:
    raise bad_option(path, spec, 'damping', 'a number >= 0')


CORDA = Init('corda', options={'mode': 'ipm', 'damping': 0.01},
             needs=frozenset({WEIGHT, ACTIVATIONS}), changes_base=True, residual=True,
             check=_check, calibrate=_calibrate)
