"""The small CNN (conv LoRA: A as a conv with the kernel's window, B as a 1x1 conv) pretrained on
digits 0-4 and adapted to 5-9.

    python -m experiments.train --config configs/cnn_digits.py:quick --workdir /tmp/run

Arguments: as `vit_digits.py` (`quick`, `method`, `rank`, `variant`, `init`, `quant`), the model
fixed to the CNN.
"""

from __future__ import annotations

import ml_collections

from configs import common
from configs import vit_digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, method='lora', rank=4, variant='lora', init='kaiming',
                       quant='')
  items = [f'{k}={v}' for k, v in a.items() if k != 'quick'] + (['quick'] if a.quick else [])
  return vit_digits.get_config(','.join(items + ['model=cnn']))


def sweep(add, arg: str | None = None) -> None:
  """Variant x rank (1..8: the first conv has 9 inputs) x scaling, LoRA+, the inits that apply
  to convolutions (EVA and CorDA read dense layer inputs only), QLoRA with blocks of 16."""
  a = common.parse_arg(arg, quick=False)
  from lorax_jax import variants  # pylint: disable=g-import-not-at-top
  common.standard_sweep(
      add, quick=a.quick, variants=variants.names(), ranks=(1, 2, 4, 8),
      inits=('pissa', 'milora', 'olora', 'loftq', 'lora_ga'),
      max_rank={'lokr': 2, 'lora_ga': 4},
      quick_variants=('lora', 'dora', 'vera', 'loha'), quick_ranks=(1, 2, 4),
      quant={'block_size': 16})
