"""Tied-LoRA (Renduchintala et al., NAACL 2024): one low-rank pair shared across layers.

    dW_l = s * (A * v_l) @ B * u_l        A: (d_in, r), B: (r, d_out) shared; u_l (d_out), v_l (r)

A and B are shared by every kernel of a tie group: the kernels with the same `group` option
(a string, default '') and the same in/out shape, rank and dtype (so by default every layer's
query projection ties with the others of its shape, as in the paper); a stacked (scanned)
kernel shares them across its stack. The first kernel of a group (in parameter order) holds them in the adapter tree; the others hold only their u, v, and `join` /
`merge` give them the shared pair. Init: A as LoRA, B = 0, u = v = 1 (first forward = base).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import layout
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common
from lorax_jax.variants.base import Factored, Tie, Variant, b_field, static_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TiedLoraParams:
  """Tied-LoRA state: shared `a` (in + (r,)), `b` ((r,) + out), None on non-owning leaves;
  per-kernel `u` (batch + out) and `v` (batch + (r,))."""
  a: Optional[jax.Array]
  b: Optional[jax.Array] = b_field()
  u: jax.Array
  v: jax.Array
  spec: LeafSpec = static_field()
  owner: bool = static_field(default=True)


def _key(spec: LeafSpec):
  return (spec.opt('group'), spec.in_shape, spec.out_shape, spec.rank, spec.dtype)


def reference(w, p):
  """The paper's merged kernel, W + s (A diag(v)) (B diag(u)), in float64 NumPy for a 2-D
  kernel `w` (the law tests check `merge` against it)."""
  f = lambda x: np.asarray(x, np.float64)
  w = f(w)
  return w + p.spec.scale * (f(p.a) * f(p.v)[None]) @ (f(p.b) * f(p.u)[None])


def tied_lora() -> Variant:
  """Builds the Tied-LoRA variant (factored: A * v and B * u are rank-r factors)."""

  def init(key, w, spec: LeafSpec):
    dtype = common.adapter_dtype(spec, w)
    a = common.lora_a(key, spec, dtype, spec.in_shape + (spec.rank,))
    b = jnp.zeros((spec.rank,) + spec.out_shape, dtype)
    u = jnp.ones(spec.batch_shape + spec.out_shape, dtype)
    v = jnp.ones(spec.batch_shape + (spec.rank,), dtype)
    return w, TiedLoraParams(a, b, u, v, spec)

  def factored(w, p: TiedLoraParams):
    del w
    s = p.spec
    if p.a is None:
      raise ValueError('A Tied-LoRA leaf has no shared pair: pass it through `join` '
                       '(or `merge`) with the whole adapter tree.')
    nb, ni = len(s.batch_shape), len(s.in_shape)
    a = p.a.reshape((1,) * nb + p.a.shape) * p.v.reshape(s.batch_shape + (1,) * ni + (-1,))
    b = p.b.reshape((1,) * nb + p.b.shape) * jnp.expand_dims(p.u, nb)
    return Factored(a, b, s.scale)

  def delta(w, p: TiedLoraParams):
    f = factored(w, p)
    return (f.scale * layout.delta_canonical(f.a, f.b, p.spec.kinds, w.dtype)).astype(w.dtype)

  def num_params(spec: LeafSpec):
    """Per-kernel vectors; the shared pair is `shared_params`, counted once per group."""
    return math.prod(spec.batch_shape) * (spec.rank + math.prod(spec.out_shape))

  def check(path, spec):
    if not isinstance(spec.opt('group'), str):
      raise ValueError(f'group={spec.opt("group")!r} for {path!r} (tied_lora) must be a string.')

  tie = Tie(
      key=_key,
      strip=lambda p: dataclasses.replace(p, a=None, b=None, owner=False),
      fill=lambda member, owner: dataclasses.replace(member, a=owner.a, b=owner.b),
      is_owner=lambda p: p.owner,
      shared_params=lambda spec: spec.rank * (
          math.prod(spec.in_shape) + math.prod(spec.out_shape)))
  return Variant('tied_lora', init, delta, factored, num_params, check,
                 options={'group': ''}, tie=tie,
                 layout=lambda s: {'a': common.axes_a(s, stacked=False),
                                   'b': common.axes_b(s, stacked=False),
                                   'u': common.axes_out(s), 'v': common.axes_batch(s, 1)},
                 reference=reference)
