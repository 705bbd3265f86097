"""int4: symmetric absmax 4-bit integers, blockwise (the storage is `blockwise`'s).

The 15 levels k/7 for k in -7..7 (code k + 7; code 15 is unused), round to nearest. Blocks of
64 without double quantization cost 4 + 32/64 = 4.5 bits per parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax_jax.quant.blockwise import Blockwise4Bit


class Int4(Blockwise4Bit):
  """The int4 format."""
  name = 'int4'
  defaults = dict(block_size=64, double_quant=False, dq_block_size=256)

  def levels(self) -> jax.Array:
    return jnp.arange(-7, 8, dtype=jnp.float32) / 7.0

  def encode_unit(self, x: jax.Array) -> jax.Array:
    return (jnp.clip(jnp.round(x * 7.0), -7, 7) + 7).astype(jnp.uint8)


FORMAT = Int4()
