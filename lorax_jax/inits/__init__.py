"""Initializations of adapter factors: one `Init` record per init, and the registry.

Selected per leaf by the spec's `init`, validated by `make_spec` against the record, run by
`init(key, params, spec)` (and with `fn=loss_fn, batches=iterator` for the calibrated ones):

  kaiming  A uniform (torch's Linear default), B = 0: the default, every variant
  gaussian A from N(0, 1/r^2), B = 0
  pissa    A, B from the top-r singular triplets of W; the base becomes W - s*A@B
  milora   the same with the r smallest triplets
  olora    A, B from the QR decomposition of W^T; the base becomes W - s*A@B
  loftq    the base becomes quant(W - s*A@B), alternating with the SVD of the error
  lora_ga  from the SVD of the mean gradient (calibrated); a residual base
  eva      A from the SVD of the layer inputs (calibrated), B = 0, ranks redistributed
  corda    covariance-oriented SVD of W (calibrated); a residual base

An init that sets factors serves every variant that builds its state from them
(`Variant.from_factors`: LoRA, and DoRA, whose magnitude is then the column norm of the
original W = W_res + s*A@B), unless its record lists fewer (LoftQ: LoRA only).
`to_lora(...)` turns adapters trained on a residual base into LoRA adapters of the ORIGINAL
base. Shapes: kernels are viewed as batch_shape + (d_in, d_out) matrices
(`variants.common.matrix`); A is batch + in + (r,) and B batch + (r,) + out, as for LoRA.

A new init is one module with its `Init` record and one `register(...)` line below.
"""

from __future__ import annotations

from lorax_jax.inits.base import (ACTIVATIONS, GRADIENTS, NEEDS, WEIGHT, Init, changes_base,
                                  get, names, register, resolve)
from lorax_jax.inits.corda import CORDA, corda
from lorax_jax.inits.eva import EVA, covariance, eva_ranks
from lorax_jax.inits.linalg import randomized_svd, split_sqrt, svd
from lorax_jax.inits.loftq import LOFTQ, loftq, quant_setting, quantization_error
from lorax_jax.inits.lora_ga import LORA_GA, lora_ga
from lorax_jax.inits.milora import MILORA, milora
from lorax_jax.inits.olora import OLORA, olora
from lorax_jax.inits.pissa import PISSA, pissa
from lorax_jax.inits.plain import GAUSSIAN, KAIMING

register(KAIMING)
register(GAUSSIAN)
register(PISSA)
register(MILORA)
register(OLORA)
register(LOFTQ)
register(LORA_GA)
register(EVA)
register(CORDA)

__all__ = [
    'ACTIVATIONS', 'GRADIENTS', 'NEEDS', 'WEIGHT', 'Init', 'changes_base',
    'corda', 'covariance', 'eva_ranks', 'get', 'loftq', 'lora_ga', 'milora', 'names', 'olora',
    'pissa', 'quant_setting', 'quantization_error', 'randomized_svd', 'register', 'resolve',
    'split_sqrt', 'svd',
]
