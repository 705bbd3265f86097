"""NF4 (Dettmers et al., 2023, QLoRA): 4-bit NormalFloat levels, blockwise, double-quantized.

16 values at quantiles of N(0, 1), normalized to [-1, 1], with an exact zero; built by
`nf4_code_book()` from the normal quantile function. Blocks of 64 with double quantization (int8
absmax in blocks of 256) cost 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter. The storage is
`blockwise`'s.
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.quant.blockwise import Blockwise4Bit


@functools.lru_cache(maxsize=None)
def nf4_code_book() -> np.ndarray:
  """The 16 NF4 values, from the normal quantile function (bitsandbytes' `create_normal_map`).

  The positive half is 8 quantiles of N(0, 1) at probabilities evenly spaced from
  `offset = 0.9677083` (the mean of the 1 - 1/(2*15) and 1 - 1/(2*16) quantiles) to 0.5, the
  negative half 7 such quantiles, plus an exact zero; all divided by the largest.
  """
  offset = 0.9677083
  ppf = statistics.NormalDist().inv_cdf
  pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  values = np.array(sorted(pos + [0.0] + neg), np.float64)
  return values / values.max()


class NF4(Blockwise4Bit):
  """The NF4 format: the nearest code-book value (ties to the lower one)."""
  name = 'nf4'
  defaults = dict(block_size=64, double_quant=True, dq_block_size=256)

  def levels(self) -> jax.Array:
    return jnp.asarray(nf4_code_book(), jnp.float32)

  def encode_unit(self, x: jax.Array) -> jax.Array:
    levels = self.levels()
    mids = (levels[1:] + levels[:-1]) / 2
    return jnp.searchsorted(mids, x, side='left').astype(jnp.uint8)


FORMAT = NF4()
