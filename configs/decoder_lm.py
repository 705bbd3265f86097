"""Pretrain a small Llama-style byte-level decoder on Python standard-library code, then adapt it
to the library's English docstrings (prose); the metric is next-byte cross-entropy (nats/byte).

    python -m experiments.train --config configs/decoder_lm.py:quick --workdir /tmp/run

Arguments: `quick`, `method=lora|full|head`, `rank=N`.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, method='lora', rank=8, variant='lora',
                       init='kaiming', quant='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'lm'
  c.model = ml_collections.ConfigDict(dict(
      name='decoder', d_model=64 if a.quick else 128, num_layers=2, num_heads=4,
      num_kv_heads=2, mlp_dim=128 if a.quick else 512))
  c.data = ml_collections.ConfigDict(dict(
      seq_len=32 if a.quick else 64, batch_size=8 if a.quick else 32,
      max_bytes=100_000 if a.quick else 400_000, eval_windows=16 if a.quick else 64))
  c.base = ml_collections.ConfigDict(dict(
      steps=30 if a.quick else 800, learning_rate=3e-3, dir=''))
  c.method = a.method
  c.adapter = common.adapter(a.rank, a.variant, a.init)
  c.quant = common.quant(a.quant)
  c.mesh, c.sharding = common.parallel()
  c.train = ml_collections.ConfigDict(dict(
      steps=20 if a.quick else 400, learning_rate=3e-3 if a.method != 'full' else 1e-3,
      warmup_steps=2 if a.quick else 40, weight_decay=1e-4, loraplus_ratio=4.0,
      eval_every=10 if a.quick else 100, checkpoint_every=10 if a.quick else 100,
      max_to_keep=2, log_every=5 if a.quick else 20))
  return c


def sweep(add, arg: str | None = None) -> None:
  """Variant x rank x scaling, LoRA+, weight-aware inits, QLoRA and the baselines on the decoder
  LM (ranks up to 32 with `quick`'s narrower model)."""
  a = common.parse_arg(arg, quick=False)
  from lorax_jax import variants  # pylint: disable=g-import-not-at-top
  common.standard_sweep(
      add, quick=a.quick, variants=variants.names(), ranks=(1, 2, 4, 8, 16, 32, 64),
      inits=('pissa', 'milora', 'olora', 'loftq', 'lora_ga', 'eva', 'corda'),
      max_rank={'lokr': 8, 'lora_ga': 32},
      quick_variants=('lora', 'dora', 'vera', 'loha'), quick_ranks=(2, 4, 8),
      quant={'block_size': 32})
