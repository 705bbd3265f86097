"""Multi-head softmax attention shared by the reference models."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attend(q, k, v, mask=None, dtype=None):
  """Softmax attention over (batch, seq, heads, head_dim) tensors, the softmax in float32.

  Args:
    q, k, v: queries, keys and values.
    mask: optional boolean mask broadcastable to (batch, heads, q_len, k_len); False is masked.
    dtype: dtype of the attention weights (default `q.dtype`).
  """
  dtype = dtype or q.dtype
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def causal_mask(seq: int):
  return jnp.tril(jnp.ones((seq, seq), bool))
