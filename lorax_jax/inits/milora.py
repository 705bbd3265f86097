"""MiLoRA (Wang et al., 2025): PiSSA with the r SMALLEST singular triplets.

The principal part stays in the residual base; the adapter starts in W's minor subspace.
"""

from __future__ import annotations

from lorax_jax.inits.base import WEIGHT, Init
from lorax_jax.inits.pissa import pissa


def milora(key, w, spec):
  """`(W - s*A@B, A, B)` from the r smallest singular triplets of W."""
  return pissa(key, w, spec, minor=True)


MILORA = Init('milora', needs=frozenset({WEIGHT}), changes_base=True, residual=True,
              factors=milora)
