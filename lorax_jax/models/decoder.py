"""A compact Llama-style decoder LM: RMSNorm, rotary grouped-query attention on DenseGeneral
kernels, SwiGLU MLP, causal mask; greedy or temperature sampling for demos.

Layers can be stacked with `nn.scan` (one kernel per layer kind with a leading layer axis) and
rematerialized with `nn.remat`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def rotary(x: jnp.ndarray, base: float = 10000.0) -> jnp.ndarray:
  # The "rotate half" convention of Hugging Face Llama checkpoints.
  """Rotary position embedding over the last axis of x: (batch, seq, heads, head_dim)."""
  seq, dim = x.shape[1], x.shape[-1]
  freqs = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


class Block(nn.Module):
  """Pre-norm decoder block with grouped-query attention (`num_kv_heads` divides `num_heads`)."""
  d_model: int
  num_heads: int
  mlp_dim: int
  num_kv_heads: int | None = None
  dtype: jnp.dtype = jnp.float32
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0

  @nn.compact
  def __call__(self, x, _=None):
    head_dim = self.d_model // self.num_heads
    kv_heads = self.num_kv_heads or self.num_heads
    groups = self.num_heads // kv_heads
    h = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, name='attn_norm')(x)
    proj = lambda name, heads: nn.DenseGeneral((heads, head_dim), use_bias=False,
                                               dtype=self.dtype, name=name)(h)
    q = rotary(proj('query', self.num_heads), self.rope_theta)
    k, v = rotary(proj('key', kv_heads), self.rope_theta), proj('value', kv_heads)
    b, seq = x.shape[:2]
    q = q.reshape(b, seq, kv_heads, groups, head_dim)
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    logits = jnp.einsum('bqhgd,bkhd->bhgqk', q, k) / jnp.sqrt(head_dim).astype(self.dtype)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    o = jnp.einsum('bhgqk,bkhd->bqhgd', attn, v).reshape(b, seq, self.num_heads, head_dim)
    x = x + nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                            name='out')(o)
    h = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, name='mlp_norm')(x)
    gate = nn.Dense(self.mlp_dim, use_bias=False, dtype=self.dtype, name='gate')(h)
    up = nn.Dense(self.mlp_dim, use_bias=False, dtype=self.dtype, name='up')(h)
    x = x + nn.Dense(self.d_model, use_bias=False, dtype=self.dtype, name='down')(
        nn.silu(gate) * up)
    return x, None


class Decoder(nn.Module):
  """Decoder-only LM returning next-token logits (batch, seq, vocab).

  Attributes:
    vocab_size, d_model, num_layers, num_heads, mlp_dim: sizes.
    num_kv_heads: key/value heads for grouped-query attention (default `num_heads`).
    scan_layers: stack the layers with `nn.scan` (kernels get a leading layer axis).
    remat: rematerialize each block in the backward pass.
    dtype: compute dtype (parameters stay float32).
  """
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 1024
  num_kv_heads: int | None = None
  scan_layers: bool = False
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    x = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype, name='embed')(tokens)
    block = nn.remat(Block) if self.remat else Block
    if self.d_model % self.num_heads or self.num_heads % (self.num_kv_heads or self.num_heads):
      raise ValueError(f'num_heads={self.num_heads} must divide d_model={self.d_model} and be a '
                       f'multiple of num_kv_heads={self.num_kv_heads}.')
    kw = dict(d_model=self.d_model, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
              num_kv_heads=self.num_kv_heads, dtype=self.dtype, norm_eps=self.norm_eps,
              rope_theta=self.rope_theta)
    if self.scan_layers:
      x, _ = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                     length=self.num_layers)(**kw, name='layers')(x, None)
    else:
      for i in range(self.num_layers):
        x, _ = block(**kw, name=f'layer{i}')(x)
    x = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, name='final_norm')(x)
    return nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, name='head')(x)


def generate(apply_fn, params, prompt: jnp.ndarray, steps: int, *, temperature: float = 0.0,
             key: jax.Array | None = None) -> jnp.ndarray:
  """Extends `prompt` (batch, length) by `steps` tokens: greedy at temperature 0, else sampled.

  `apply_fn(params, tokens) -> logits` may be `lora(model.apply)` with joined parameters. Each
  step reruns the whole (fixed-length, causal) sequence, which keeps the model cache-free; this is
  for demos, not serving.

  Raises:
    ValueError: for a negative temperature, or a positive one without a `key`.
  """
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0.')
  if temperature > 0 and key is None:
    raise ValueError('Sampling with temperature > 0 needs a PRNG key.')
  b, n = prompt.shape
  tokens = jnp.concatenate([prompt, jnp.zeros((b, steps), prompt.dtype)], axis=1)

  def body(i, carry):
    tokens, key = carry
    logits = apply_fn(params, tokens)
    last = jax.lax.dynamic_index_in_dim(logits, n + i - 1, axis=1, keepdims=False)
    if temperature > 0:
      key, sub = jax.random.split(key)
      nxt = jax.random.categorical(sub, last.astype(jnp.float32) / temperature, axis=-1)
    else:
      nxt = jnp.argmax(last, axis=-1)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt.astype(tokens.dtype), n + i, axis=1)
    return tokens, key

  key = key if key is not None else jax.random.key(0)
  return jax.lax.fori_loop(0, steps, body, (tokens, key))[0]


def _llama_dims(c: dict[str, Any]) -> tuple[int, int, int, int]:
  d, heads = c['hidden_size'], c['num_attention_heads']
  kv = c.get('num_key_value_heads') or heads
  head_dim = c.get('head_dim') or d // heads
  if head_dim * heads != d:
    raise ValueError(f'head_dim={head_dim} x heads={heads} != hidden_size={d}: not supported.')
  return d, heads, kv, head_dim


def hf_mapping(config: dict[str, Any] | str, *, scan_layers: bool = False) -> list:
  """The name map of `Decoder` to Hugging Face `LlamaForCausalLM` names (a config.json dict or a
  checkpoint directory). With `scan_layers`, each layer's tensor is one slice (`index`) of the
  stacked `layers/...` leaf."""
  from lorax_jax.models import hf  # pylint: disable=g-import-not-at-top
  c = hf.read_config(config)
  d, heads, kv, head_dim = _llama_dims(c)
  mlp, vocab = c['intermediate_size'], c['vocab_size']
  t = lambda w: w.T
  per_layer = {
      'self_attn.q_proj.weight': ('query/kernel', lambda w: w.T.reshape(d, heads, head_dim),
                                  (d, d)),
      'self_attn.k_proj.weight': ('key/kernel', lambda w: w.T.reshape(d, kv, head_dim),
                                  (kv * head_dim, d)),
      'self_attn.v_proj.weight': ('value/kernel', lambda w: w.T.reshape(d, kv, head_dim),
                                  (kv * head_dim, d)),
      'self_attn.o_proj.weight': ('out/kernel', lambda w: w.T.reshape(heads, head_dim, d),
                                  (d, d)),
      'mlp.gate_proj.weight': ('gate/kernel', t, (mlp, d)),
      'mlp.up_proj.weight': ('up/kernel', t, (mlp, d)),
      'mlp.down_proj.weight': ('down/kernel', t, (d, mlp)),
      'input_layernorm.weight': ('attn_norm/scale', None, (d,)),
      'post_attention_layernorm.weight': ('mlp_norm/scale', None, (d,)),
  }
  entries = [hf.Entry('model.embed_tokens.weight', 'embed/embedding', None, (vocab, d)),
             hf.Entry('model.norm.weight', 'final_norm/scale', None, (d,)),
             hf.Entry('lm_head.weight', 'head/kernel', t, (vocab, d))]
  for i in range(c['num_hidden_layers']):
    for name, (path, fn, shape) in per_layer.items():
      key = f'model.layers.{i}.{name}'
      entries.append(hf.Entry(key, f'layers/{path}', fn, shape, index=i) if scan_layers else
                     hf.Entry(key, f'layer{i}/{path}', fn, shape))
  return entries


def hf_config(model: 'Decoder') -> dict[str, Any]:
  """A Hugging Face `LlamaForCausalLM` config.json for `model` (for exports)."""
  return dict(architectures=['LlamaForCausalLM'], model_type='llama',
              vocab_size=model.vocab_size, hidden_size=model.d_model,
              num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
              num_key_value_heads=model.num_kv_heads or model.num_heads,
              intermediate_size=model.mlp_dim, hidden_act='silu', rms_norm_eps=model.norm_eps,
              rope_theta=model.rope_theta, max_position_embeddings=4096,
              attention_bias=False, mlp_bias=False, tie_word_embeddings=False)


def load_hf_llama(directory: str, *, scan_layers: bool = False) -> tuple[Decoder, dict]:
  """Loads a Hugging Face `LlamaForCausalLM` directory (config.json + model.safetensors).

  Args:
    directory: the checkpoint directory.
    scan_layers: build the `nn.scan` variant (per-layer tensors stacked on a leading axis).

  Raises:
    ValueError: for an unsupported config (biases, non-SiLU activation, scaled RoPE), or listing
      missing/unexpected/mis-shaped tensors.
  """
  import os  # pylint: disable=g-import-not-at-top
  from lorax_jax.models import hf  # pylint: disable=g-import-not-at-top
  c = hf.read_config(directory)
  rope = c.get('rope_parameters') or c.get('rope_scaling') or {}
  unsupported = {k: c[k] for k in ('attention_bias', 'mlp_bias') if c.get(k)}
  if c.get('hidden_act', 'silu') != 'silu':
    unsupported['hidden_act'] = c['hidden_act']
  if rope.get('rope_type', 'default') not in ('default', None):
    unsupported['rope_type'] = rope['rope_type']
  if unsupported:
    raise ValueError(f'Unsupported Llama config fields {unsupported}; supported: no biases, '
                     "silu, default RoPE.")
  d, heads, kv, _ = _llama_dims(c)
  model = Decoder(vocab_size=c['vocab_size'], d_model=d, num_layers=c['num_hidden_layers'],
                  num_heads=heads, mlp_dim=c['intermediate_size'], num_kv_heads=kv,
                  scan_layers=scan_layers, norm_eps=c.get('rms_norm_eps', 1e-6),
                  rope_theta=rope.get('rope_theta', c.get('rope_theta', 10000.0)))
  tensors = hf.load_safetensors(os.path.join(directory, 'model.safetensors'))
  if 'lm_head.weight' not in tensors and c.get('tie_word_embeddings'):
    tensors['lm_head.weight'] = tensors['model.embed_tokens.weight']
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  params = hf.convert(tensors, hf_mapping(c, scan_layers=scan_layers), abstract['params'],
                      ignore=(r'rotary_emb\.inv_freq$',))
  return model, {'params': params}
