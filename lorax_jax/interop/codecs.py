"""PEFT codecs of the factorized variants: how a module's adapters become PEFT LoRA tensors and
back (`LORA` for variants `lora` and `lora_fa`, `DORA` for `dora`; `full` leaves are
`modules_to_save`, in `interop.full`).

On save, the members of a fused module (GPT-2's `c_attn`) are written side by side: a rank
`r_q + r_k + r_v` LoRA with block-diagonal B, each member's scale folded into its B relative to
the first member's. On load, a module's factors are checked against its weight and placed into
each member's kernel layout, zero-padded to the leaf's rank where stacked layers differ.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import quant
from lorax_jax.interop import hf_layout
from lorax_jax.interop.schema import PART_NAMES, tensor_name
from lorax_jax.leafspec import LeafSpec
from lorax_jax.models import hf
from lorax_jax.variants import DoraParams, LoraParams
from lorax_jax.variants.dora import column_norm


def to_numpy(x, dtype=None) -> np.ndarray:
  """A host array in `dtype` (default: its float dtype, other dtypes as float32)."""
  x = np.asarray(jax.device_get(x))
  if dtype is not None:
    return x.astype(dtype)
  return x if x.dtype in (np.float32, np.float64, np.float16) else x.astype(np.float32)


def _placements(members: Sequence[tuple[hf.Entry, Any]]) -> Iterator[tuple]:
  """`(entry, adapter, take, perm_in, perm_out, offset)` per member of a module: where its
  factors go in the module's `(rank, d_in)` A and `(d_out, rank)` B."""
  first = members[0][0]
  _, hf_out = hf_layout.hf_axes(dataclasses.replace(first, columns=None))
  n = len(first.hf_shape)
  offset = 0
  for entry, ad in members:
    perm_in, perm_out = hf_layout.layout(entry, ad.spec)
    if entry.columns is not None:
      if hf_out != (n - 1,):
        raise ValueError(f'{entry.hf_key!r}: column slices must be on the out axis.')
      perm_out = perm_out + entry.columns[0]
    take = (lambda x: x) if entry.index is None else (lambda x, i=entry.index: x[i])
    yield entry, ad, take, perm_in, perm_out, offset
    offset += ad.spec.rank


class LoraCodec:
  """PEFT LoRA: `lora_A` `(r, in...)` and `lora_B` `(out, r)` (embeddings: `lora_embedding_A`
  `(r, num)`, `lora_embedding_B` `(dim, r)`)."""
  variants = ('lora', 'lora_fa')
  parts = ('a', 'b')
  use_dora = False

  def encode(self, members: Sequence[tuple[hf.Entry, Any]], d_in: int, d_out: int,
             by_key: dict) -> dict[str, np.ndarray]:
    """The module's float64 `{'a': (rank, d_in), 'b': (d_out, rank)}` from its members."""
    del by_key
    rank = sum(ad.spec.rank for _, ad in members)
    s0 = members[0][1].spec.scale
    a_hf = np.zeros((rank, d_in), np.float64)
    b_hf = np.zeros((d_out, rank), np.float64)
    for _, ad, take, perm_in, perm_out, offset in _placements(members):
      s = ad.spec
      a2 = to_numpy(take(ad.a), np.float64).reshape(len(perm_in), s.rank)
      b2 = to_numpy(take(ad.b), np.float64).reshape(s.rank, len(perm_out))
      a_hf[offset:offset + s.rank][:, perm_in] = a2.T
      b_hf[perm_out, offset:offset + s.rank] = b2.T * (s.scale / s0)
    return {'a': a_hf, 'b': b_hf}

  def check(self, module: str, parts: dict[str, np.ndarray], d_out: int) -> str | None:
    """What is wrong with a module's tensors beyond the factors' shapes (None: nothing)."""
    del d_out
    if 'm' in parts:
      return f'{module}: has lora_magnitude_vector but use_dora is false'
    return None

  def params(self, a: jax.Array, b: jax.Array, s: LeafSpec, mags: list, leaf: Any,
             dtype: Any) -> Any:
    """The adapter of a leaf from its assembled factors (`mags`: per layer, DoRA only)."""
    del mags, leaf, dtype
    return LoraParams(a, b, s)


class DoraCodec(LoraCodec):
  """PEFT DoRA (`use_dora`): LoRA's tensors plus `lora_magnitude_vector` `(out,)`."""
  variants = ('dora',)
  parts = ('a', 'b', 'm')
  use_dora = True

  def encode(self, members, d_in, d_out, by_key):
    out = super().encode(members, d_in, d_out, by_key)
    m_hf = np.full((d_out,), np.nan)
    for _, ad, take, _, perm_out, _ in _placements(members):
      m_hf[perm_out] = to_numpy(take(ad.magnitude), np.float64).reshape(-1)
    if np.isnan(m_hf).any():
      first = members[0][0]
      raise ValueError(f'DoRA adapts only part of the fused module {first.torch_module!r}; adapt '
                       f'all of its members ({[e.path for e in by_key[first.hf_key]]}) with DoRA.')
    out['m'] = m_hf
    return out

  def check(self, module, parts, d_out):
    if parts['m'].shape != (d_out,):
      return f'{module}: lora_magnitude_vector {parts["m"].shape}, expected {(d_out,)}'
    return None

  def params(self, a, b, s, mags, leaf, dtype):
    n_layers = s.batch_shape[0] if s.batch_axes else None
    if any(m is None for m in mags):  # layers PEFT did not adapt: m = ||W||, so m / n = 1
      w = quant.dequantize_array(leaf) if quant.is_quantized(leaf) else jnp.asarray(leaf)
      norms = np.asarray(column_norm(w, a, b, s), np.float64).reshape(
          (n_layers or 1, math.prod(s.out_shape)))
      mags = [m if m is not None else norms[i] for i, m in enumerate(mags)]
    m = np.stack(mags) if n_layers is not None else mags[0]
    return DoraParams(a, b, jnp.asarray(m.reshape(s.batch_shape + s.out_shape), dtype), s)


LORA = LoraCodec()
DORA = DoraCodec()
CODECS = {name: codec for codec in (LORA, DORA) for name in codec.variants}


def codec(use_dora: bool) -> LoraCodec:
  """The codec of a file (PEFT's `use_dora` holds for every module)."""
  return DORA if use_dora else LORA


def hf_tensors(codec_: LoraCodec, name: str, kind: str, parts: dict[str, np.ndarray],
               in_shape: tuple, hf_shape: tuple, dtype: Any) -> dict[str, np.ndarray]:
  """A module's file tensors from its float64 parts (`encode`)."""
  rank, d_out = parts['a'].shape[0], parts['b'].shape[0]
  out = {}
  if kind == 'embedding':
    out[tensor_name(name, 'a', kind)] = parts['a'].astype(dtype)
    out[tensor_name(name, 'b', kind)] = parts['b'].astype(dtype)
  else:
    tail = (1,) * (len(hf_shape) - 2) if kind == 'conv' else ()
    out[tensor_name(name, 'a', kind)] = parts['a'].reshape((rank,) + in_shape).astype(dtype)
    out[tensor_name(name, 'b', kind)] = parts['b'].reshape((d_out, rank) + tail).astype(dtype)
  if codec_.use_dora:
    out[tensor_name(name, 'm', kind)] = parts['m'].astype(dtype)
  return out


def expected_factors(entry: hf.Entry, rank: int) -> tuple[tuple, tuple]:
  """The shapes of `lora_A` and `lora_B` at `rank` for the module of `entry`."""
  in_shape, d_out, hf_shape = hf_layout.module_shapes(entry)
  kind = entry.module_kind()
  want_a = (rank,) + (in_shape if kind != 'embedding' else (math.prod(in_shape),))
  want_b = (d_out, rank) + ((1,) * (len(hf_shape) - 2) if kind == 'conv' else ())
  return want_a, want_b


def missing_parts(codec_: LoraCodec, module: str, parts: dict) -> str | None:
  missing = [p for p in codec_.parts if p not in parts]
  if missing:
    return f'{module}: missing {[PART_NAMES[p] for p in missing]}'
  return None


def assemble(codec_: LoraCodec, s: LeafSpec, layers: dict, rank: int, scale: float, leaf: Any,
             dtype: Any) -> Any:
  """The adapter of one leaf from its per-layer PEFT factors (zero-padded to `rank`, with each
  layer's scale folded into B where it differs from the leaf's)."""
  out_dtype = jnp.dtype(dtype or leaf.dtype)
  n_layers = s.batch_shape[0] if s.batch_axes else None
  d_in, d_out = math.prod(s.in_shape), math.prod(s.out_shape)

  def one(index):
    got = layers.get(index)
    a = np.zeros((d_in, rank))
    b = np.zeros((rank, d_out))
    m = None
    if got is not None:
      entry, a2, b2, mag, r, _, sc = got
      perm_in, perm_out = hf_layout.layout(entry, s)
      off = entry.columns[0] if entry.columns is not None else 0
      a[:, :r] = a2[:, perm_in].T
      b[:r] = b2[off + perm_out].T * (sc / scale)
      if mag is not None:
        m = np.asarray(mag, np.float64)[off + perm_out]
    return a, b, m

  parts = [one(i) for i in range(n_layers)] if n_layers is not None else [one(None)]
  a = np.stack([p[0] for p in parts]) if n_layers is not None else parts[0][0]
  b = np.stack([p[1] for p in parts]) if n_layers is not None else parts[0][1]
  a = jnp.asarray(a.reshape(s.batch_shape + s.in_shape + (rank,)), out_dtype)
  b = jnp.asarray(b.reshape(s.batch_shape + (rank,) + s.out_shape), out_dtype)
  return codec_.params(a, b, s, [p[2] for p in parts], leaf, out_dtype)
