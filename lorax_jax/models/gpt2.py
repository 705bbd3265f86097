"""GPT-2 (decoder-only, learned positions, LayerNorm, GELU MLP, head tied to the token embedding),
compatible with Hugging Face GPT-2 checkpoints.

Attention kernels are `DenseGeneral` like the other reference models (query/key/value:
(d, heads, head_dim); out: (heads, head_dim, d)); `load_hf_gpt2` splits Hugging Face's fused
`c_attn` Conv1D weight, which is stored (in, out), into them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorax_jax.models import attention
from lorax_jax.models import hf


class _Block(nn.Module):
  d_model: int
  num_heads: int
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    head_dim = self.d_model // self.num_heads
    h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name='ln_1')(x)
    q, k, v = [nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=n)(h)
               for n in ('query', 'key', 'value')]
    o = attention.attend(q, k, v, attention.causal_mask(x.shape[1]), self.dtype)
    x = x + nn.DenseGeneral(self.d_model, axis=(-2, -1), dtype=self.dtype, name='out')(o)
    h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name='ln_2')(x)
    h = nn.gelu(nn.Dense(4 * self.d_model, dtype=self.dtype, name='fc')(h), approximate=True)
    return x + nn.Dense(self.d_model, dtype=self.dtype, name='proj')(h)


class GPT2(nn.Module):
  """GPT-2 LM returning next-token logits (batch, seq, vocab); the head is `wte.attend`."""
  vocab_size: int = 50257
  n_positions: int = 1024
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    wte = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype, name='wte')
    x = wte(tokens) + nn.Embed(self.n_positions, self.d_model, dtype=self.dtype, name='wpe')(
        jnp.arange(tokens.shape[1])[None, :])
    for i in range(self.num_layers):
      x = _Block(self.d_model, self.num_heads, self.eps, self.dtype, name=f'h{i}')(x)
    return wte.attend(nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name='ln_f')(x))


def hf_mapping(config: dict[str, Any] | str) -> list[hf.Entry]:
  """The name map of `GPT2` to Hugging Face `GPT2Model` names (a config.json dict or a checkpoint
  directory). The fused `c_attn` (GPT-2's `Conv1D`, (in, out)) holds query, key and value in
  column blocks."""
  c = hf.read_config(config)
  d, heads, layers = c['n_embd'], c['n_head'], c['n_layer']
  hd, inner = d // heads, c.get('n_inner') or 4 * c['n_embd']
  entries = [hf.Entry('wte.weight', 'wte/embedding', None, (c['vocab_size'], d)),
             hf.Entry('wpe.weight', 'wpe/embedding', None, (c['n_positions'], d)),
             hf.Entry('ln_f.weight', 'ln_f/scale', None, (d,)),
             hf.Entry('ln_f.bias', 'ln_f/bias', None, (d,))]
  conv = functools.partial(hf.Entry, kind='conv1d')
  for i in range(layers):
    p, o = f'h.{i}.', f'h{i}/'
    for j, n in enumerate(('query', 'key', 'value')):
      cols = (j * d, (j + 1) * d)
      entries += [conv(f'{p}attn.c_attn.weight', f'{o}{n}/kernel',
                       lambda w: w.reshape(d, heads, hd), (d, 3 * d), columns=cols),
                  hf.Entry(f'{p}attn.c_attn.bias', f'{o}{n}/bias',
                           lambda b: b.reshape(heads, hd), (3 * d,), columns=cols)]
    entries += [conv(f'{p}attn.c_proj.weight', f'{o}out/kernel',
                     lambda w: w.reshape(heads, hd, d), (d, d)),
                hf.Entry(f'{p}attn.c_proj.bias', f'{o}out/bias', None, (d,)),
                hf.Entry(f'{p}ln_1.weight', f'{o}ln_1/scale', None, (d,)),
                hf.Entry(f'{p}ln_1.bias', f'{o}ln_1/bias', None, (d,)),
                hf.Entry(f'{p}ln_2.weight', f'{o}ln_2/scale', None, (d,)),
                hf.Entry(f'{p}ln_2.bias', f'{o}ln_2/bias', None, (d,)),
                conv(f'{p}mlp.c_fc.weight', f'{o}fc/kernel', None, (d, inner)),
                hf.Entry(f'{p}mlp.c_fc.bias', f'{o}fc/bias', None, (inner,)),
                conv(f'{p}mlp.c_proj.weight', f'{o}proj/kernel', None, (inner, d)),
                hf.Entry(f'{p}mlp.c_proj.bias', f'{o}proj/bias', None, (d,))]
  return entries


def load_hf_gpt2(directory: str) -> tuple[GPT2, dict[str, Any]]:
  """Loads a Hugging Face GPT-2 directory (config.json + model.safetensors).

  Raises:
    ValueError: for an unsupported activation, or listing missing/unexpected/mis-shaped tensors.
  """
  c = hf.read_config(directory)
  if c.get('activation_function', 'gelu_new') not in ('gelu_new', 'gelu_pytorch_tanh'):
    raise ValueError(f"activation_function={c['activation_function']!r}; supported: "
                     "'gelu_new', 'gelu_pytorch_tanh'.")
  if c.get('n_inner') not in (None, 4 * c['n_embd']):
    raise ValueError(f"n_inner={c['n_inner']} is not 4 * n_embd: not supported.")
  model = GPT2(vocab_size=c['vocab_size'], n_positions=c['n_positions'], d_model=c['n_embd'],
               num_layers=c['n_layer'], num_heads=c['n_head'],
               eps=c.get('layer_norm_epsilon', 1e-5))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  params = hf.convert(hf.load_safetensors(os.path.join(directory, 'model.safetensors')),
                      hf_mapping(c), abstract['params'], strip_prefixes=('transformer.',),
                      ignore=(r'\.attn\.bias$', r'\.attn\.masked_bias$', r'^lm_head\.weight$'))
  return model, {'params': params}
