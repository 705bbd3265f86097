"""The plain inits: A random, B = 0, the base unchanged (every variant, its own `init`).

  kaiming   A from torch's `kaiming_uniform_(a=sqrt(5))`, U(+-1/sqrt(d_in)) (the default)
  gaussian  A from N(0, 1/r^2)

The variant draws its arrays itself (`variants.common.lora_a` reads `spec.init`).
"""

from __future__ import annotations

from lorax_jax.inits.base import Init

KAIMING = Init('kaiming')
GAUSSIAN = Init('gaussian')
