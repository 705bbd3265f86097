"""GPT-2 (decoder-only, learned positions, LayerNorm, GELU MLP, head tied to the token embedding),
compatible with Hugging Face GPT-2 checkpoints.

Attention kernels are `DenseGeneral` like the other reference models (query/key/value:
(d, heads, head_dim); out: (heads, head_dim, d)); `load_hf_gpt2` splits Hugging Face's fused
`c_attn` Conv1D weight, which is stored (in, out), into them.
"""

from __future__ import annotations

import json
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


def load_hf_gpt2(directory: str) -> tuple[GPT2, dict[str, Any]]:
  """Loads a Hugging Face GPT-2 directory (config.json + model.safetensors).

  Raises:
    ValueError: for an unsupported activation, or listing missing/unexpected/mis-shaped tensors.
  """
  with open(os.path.join(directory, 'config.json')) as f:
    c = json.load(f)
  if c.get('activation_function', 'gelu_new') not in ('gelu_new', 'gelu_pytorch_tanh'):
    raise ValueError(f"activation_function={c['activation_function']!r}; supported: "
                     "'gelu_new', 'gelu_pytorch_tanh'.")
  if c.get('n_inner') not in (None, 4 * c['n_embd']):
    raise ValueError(f"n_inner={c['n_inner']} is not 4 * n_embd: not supported.")
  d, heads = c['n_embd'], c['n_head']
  model = GPT2(vocab_size=c['vocab_size'], n_positions=c['n_positions'], d_model=d,
               num_layers=c['n_layer'], num_heads=heads, eps=c.get('layer_norm_epsilon', 1e-5))
  tensors = {k[len('transformer.'):] if k.startswith('transformer.') else k: v
             for k, v in hf.load_safetensors(os.path.join(directory, 'model.safetensors')).items()}
  hd = d // heads
  entries = [hf.Entry('wte.weight', 'wte/embedding'), hf.Entry('wpe.weight', 'wpe/embedding'),
             hf.Entry('ln_f.weight', 'ln_f/scale'), hf.Entry('ln_f.bias', 'ln_f/bias')]
  bad = [f'{k}: {tuple(tensors[k].shape)}, expected {want}'
         for i in range(c['n_layer'])
         for k, want in ((f'h.{i}.attn.c_attn.weight', (d, 3 * d)),
                         (f'h.{i}.attn.c_attn.bias', (3 * d,)))
         if k in tensors and tuple(tensors[k].shape) != want]
  if bad:
    raise ValueError(f'Checkpoint does not fit the model:\n  mis-shaped keys ({len(bad)}): {bad}')
  for i in range(c['n_layer']):
    p, o = f'h.{i}.', f'h{i}/'
    for kind in ('weight', 'bias'):
      fused = tensors.pop(f'{p}attn.c_attn.{kind}', None)
      if fused is not None:
        for j, n in enumerate(('query', 'key', 'value')):
          tensors[f'{p}attn.c_attn.{kind}[{n}]'] = fused[..., j * d:(j + 1) * d]
    for n in ('query', 'key', 'value'):
      entries += [hf.Entry(f'{p}attn.c_attn.weight[{n}]', f'{o}{n}/kernel',
                           lambda w: w.reshape(d, heads, hd)),
                  hf.Entry(f'{p}attn.c_attn.bias[{n}]', f'{o}{n}/bias',
                           lambda b: b.reshape(heads, hd))]
    entries += [hf.Entry(f'{p}attn.c_proj.weight', f'{o}out/kernel',
                         lambda w: w.reshape(heads, hd, d)),
                hf.Entry(f'{p}attn.c_proj.bias', f'{o}out/bias'),
                hf.Entry(f'{p}ln_1.weight', f'{o}ln_1/scale'),
                hf.Entry(f'{p}ln_1.bias', f'{o}ln_1/bias'),
                hf.Entry(f'{p}ln_2.weight', f'{o}ln_2/scale'),
                hf.Entry(f'{p}ln_2.bias', f'{o}ln_2/bias'),
                hf.Entry(f'{p}mlp.c_fc.weight', f'{o}fc/kernel'),
                hf.Entry(f'{p}mlp.c_fc.bias', f'{o}fc/bias'),
                hf.Entry(f'{p}mlp.c_proj.weight', f'{o}proj/kernel'),
                hf.Entry(f'{p}mlp.c_proj.bias', f'{o}proj/bias')]
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  params = hf.convert(tensors, entries, abstract['params'],
                      ignore=(r'\.attn\.bias$', r'\.attn\.masked_bias$', r'^lm_head\.weight$'))
  return model, {'params': params}
