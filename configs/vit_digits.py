"""Pretrain a vision model on digits 0-4, adapt it to digits 5-9 (scikit-learn's real digits).

    python -m experiments.train --config configs/vit_digits.py:quick --workdir /tmp/run

Arguments (comma-separated): `quick` (CPU/test sizes), `model=vit|cnn|resnet`,
`method=lora|full|head` (LoRA, full fine-tuning, or head-only baselines), `rank=N`,
`variant=NAME`, `init=kaiming|pissa|pissa_niter_K|milora|olora|loftq|lora_ga|eva|corda`,
`quant=nf4|int4|int8` (a quantized frozen base: QLoRA with nf4),
`dynamics=adalora|dylora|sora|relora|cola|delta_lora` (a training-time method of
`lorax_jax.dynamics`; it sets the variant it trains).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, model='vit', method='lora', rank=8, variant='lora',
                       init='kaiming', quant='', dynamics='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'digits'
  c.model = ml_collections.ConfigDict(dict(
      name=a.model, size='tiny', num_classes=10))
  c.data = ml_collections.ConfigDict(dict(
      name='digits', image_size=16 if a.model == 'vit' else 8,
      pretrain_classes=(0, 1, 2, 3, 4), adapt_classes=(5, 6, 7, 8, 9), batch_size=64))
  c.base = ml_collections.ConfigDict(dict(
      steps=150 if a.quick else 600, learning_rate=1e-3, dir=''))
  c.method = a.method
  if a.dynamics:
    from lorax_jax import dynamics  # pylint: disable=g-import-not-at-top
    if a.dynamics in dynamics.names():   # else common.dynamics names the allowed ones
      a.variant = dynamics.default_variant(a.dynamics)
  c.adapter = common.adapter(a.rank, a.variant, a.init)
  c.quant = common.quant(a.quant)
  c.mesh, c.sharding = common.parallel()
  c.train = ml_collections.ConfigDict(dict(
      steps=100 if a.quick else 600, learning_rate=3e-3 if a.method != 'full' else 1e-3,
      warmup_steps=20 if a.quick else 50, weight_decay=1e-4, loraplus_ratio=4.0,
      eval_every=50 if a.quick else 200, checkpoint_every=25 if a.quick else 100,
      max_to_keep=2, log_every=10))
  c.dynamics = common.dynamics(a.dynamics, a.rank, c.train.steps)
  return c


def dynamics_names():
  from lorax_jax import dynamics  # pylint: disable=g-import-not-at-top
  return dynamics.names()


def sweep(add, arg: str | None = None) -> None:
  """Variant x rank (1..64) x scaling, LoRA+, weight-aware inits, QLoRA and the baselines on
  the ViT (`quick`: 4 variants x 3 ranks, quick trials)."""
  a = common.parse_arg(arg, quick=False)
  from lorax_jax import variants  # pylint: disable=g-import-not-at-top
  common.standard_sweep(
      add, quick=a.quick, variants=variants.names(), ranks=(1, 2, 4, 8, 16, 32, 64),
      inits=('pissa', 'milora', 'olora', 'loftq', 'lora_ga', 'eva', 'corda'),
      max_rank={'lokr': 8, 'lora_ga': 32}, dynamics=dynamics_names(),
      quick_variants=('lora', 'dora', 'vera', 'loha'), quick_ranks=(2, 4, 8))
