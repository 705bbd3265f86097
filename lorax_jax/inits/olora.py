"""OLoRA (Buyukakyuz, 2024): A = R[:r]^T, B = Q[:, :r]^T from the QR decomposition W^T = Q R.

PEFT's QR of the torch (out, in) weight; no division by the scale. The base becomes W - s*A@B.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax_jax.inits import linalg
from lorax_jax.inits.base import WEIGHT, Init
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common


def olora(key: jax.Array, w: jax.Array, spec: LeafSpec):
  """OLoRA: `(W - s*A@B, A, B)` from the QR decomposition of W^T."""
  del key
  m = common.matrix(linalg.f32(w), spec)
  q, rr = jnp.linalg.qr(linalg.t(m))          # W^T = Q R: Q (d_out, k), R (k, d_in)
  r = spec.rank
  return linalg.residual(w, spec, linalg.t(rr[..., :r, :]), linalg.t(q[..., :, :r]))


OLORA = Init('olora', needs=frozenset({WEIGHT}), changes_base=True, residual=True,
             factors=olora)
