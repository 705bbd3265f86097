"""The LoRA training step of lorax_jax next to its JAX peers, on one model, in one process.

    python -m experiments.benchmarks.peers [--d_model 512 --layers 4 --batch 8 --seq 128]

One Llama-style decoder (RMSNorm, rotary attention, SwiGLU MLP; Flax NNX `Linear` layers), with
rank-r LoRA on every block kernel (q, k, v, out, gate, up, down), trained with Adam, five ways:
  full      full fine-tuning (every parameter, Adam);
  nnx       Flax NNX `LoRALinear` in place of every block `Linear`, gradients for `LoRAParam`
            only (what `nnx.DiffState(0, nnx.LoRAParam)` differentiates);
  qwix      Qwix `apply_lora_to_model(model, LoraProvider(...))`, gradients for its LoRA
            parameters only;
  lorax     lorax_jax: `lora(apply)(join(params, adapters), ...)`, gradients for the adapters;
  floor     the forward and the backward to the activations, no weight gradient at all: what
            any LoRA step must at least compute.
Every side is compiled first, then the steps are timed interleaved (one step of each side per
round) and the median of `--rounds` rounds is reported, so that drifts of the machine's speed
hit every side alike. No buffers are donated. Printed per side: XLA's FLOPs
(`cost_analysis()`), compiled bytes (arguments + outputs + temporaries, `memory_analysis()`),
the bytes the step reads and writes (`cost_analysis()`'s 'bytes accessed': copies of
activations show here on any machine) and the median wall time, each as a ratio to full fine-tuning and to the best peer (the better
of nnx and qwix).

The peers come from the `bench` extra (`pip install -e ".[bench]"`, Qwix pinned). Every side has
the same base weights; the LoRA scale is 1 on every side (NNX's `LoRALinear` has none; alpha =
rank elsewhere) and B is non-zero. The benchmark exits non-zero unless every loss is finite and
each LoRA side's is within 5% of the base model's (same model, small adapters).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from absl import app
from absl import flags
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_jax as lj
from experiments.benchmarks import common
from lorax_jax.models.decoder import rotary

_D_MODEL = flags.DEFINE_integer('d_model', 512, 'Model width.')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Decoder blocks.')
_MLP = flags.DEFINE_integer('mlp_dim', 0, 'SwiGLU width (0: 11/4 of d_model, 1408 at 512).')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Attention head width.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Tokens per sequence.')
_RANK = flags.DEFINE_integer('rank', 8, 'LoRA rank on every block kernel.')
_ROUNDS = flags.DEFINE_integer('rounds', 15, 'Timed rounds (one step of every side each).')

VOCAB = 256
SIDES = ('full', 'nnx', 'qwix', 'lorax', 'floor')
PEERS = ('nnx', 'qwix')


class Block(nnx.Module):
  """Pre-norm block: causal multi-head attention and a SwiGLU MLP on `linear` layers."""

  def __init__(self, d, mlp, head_dim, linear: Callable[..., nnx.Module], rngs):
    self.heads, self.head_dim = d // head_dim, head_dim
    self.attn_norm, self.mlp_norm = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
    self.q, self.k, self.v, self.o = (linear(d, d, rngs=rngs) for _ in range(4))
    self.gate, self.up = linear(d, mlp, rngs=rngs), linear(d, mlp, rngs=rngs)
    self.down = linear(mlp, d, rngs=rngs)

  def __call__(self, x):
    b, n, d = x.shape
    h = self.attn_norm(x)
    split = lambda y: y.reshape(b, n, self.heads, self.head_dim)
    q, k, v = rotary(split(self.q(h))), rotary(split(self.k(h))), split(self.v(h))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(self.head_dim).astype(np.float32)
    logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, jnp.finfo(logits.dtype).min)
    o = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v).reshape(b, n, d)
    x = x + self.o(o)
    h = self.mlp_norm(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class Decoder(nnx.Module):
  """Embedding, `layers` blocks, final norm, output head. `delta` is added to the embedded
  tokens (the floor differentiates with respect to it)."""

  def __init__(self, d, layers, mlp, head_dim, linear, rngs):
    self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, mlp, head_dim, linear, rngs) for _ in range(layers)])
    self.norm = nnx.RMSNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, tokens, delta=None):
    x = self.embed(tokens)
    if delta is not None:
      x = x + delta
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _nonzero(tree, key, std):
  """`tree` with every leaf replaced by normal noise of scale `std` (non-zero LoRA factors)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([std * jax.random.normal(k, l.shape, l.dtype)
                            for k, l in zip(keys, leaves)])


def build(d_model=512, layers=4, mlp_dim=0, head_dim=64, batch=8, seq=128, rank=8
          ) -> dict[str, tuple[Callable, tuple]]:
  """`{side: (step, args)}`: every side's training step (`step(*args) -> (..., loss)`)."""
  import qwix  # pylint: disable=g-import-not-at-top

  mlp_dim = mlp_dim or 11 * d_model // 4
  tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, VOCAB)
  inputs, labels = tokens[:, :-1], tokens[:, 1:]
  tx = optax.adam(1e-4)
  plain = lambda i, o, rngs: nnx.Linear(i, o, use_bias=False, rngs=rngs)
  make = lambda linear: Decoder(d_model, layers, mlp_dim, head_dim, linear, nnx.Rngs(0))
  runs = {}

  # Full fine-tuning and the floor, on the plain model.
  graph, params = nnx.split(make(plain), nnx.Param)
  apply = lambda p, *a: nnx.merge(graph, p)(*a)

  def full_step(p, s):
    loss, g = jax.value_and_grad(lambda p: _xent(apply(p, inputs), labels))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  runs['full'] = (full_step, (params, tx.init(params)))

  def floor_step(p, delta):
    loss, g = jax.value_and_grad(lambda z: _xent(apply(p, inputs, z), labels))(delta)
    return g, loss

  runs['floor'] = (floor_step, (params, jnp.zeros((batch, seq, d_model), jnp.float32)))

  # lorax_jax on the same parameters: LoRA on every block kernel.
  spec = lj.make_spec(params, [(r'blocks/\d+/\w+/kernel$', {'rank': rank, 'alpha': rank})],
                      fn=apply, args=(inputs,))
  base, adapters = lj.init(jax.random.key(2), params, spec)
  adapters = jax.tree_util.tree_map(lambda x: x + 0.01, adapters)
  lora_apply = lj.lora(apply, strict=True)

  def lorax_step(p, a, s):
    loss, g = jax.value_and_grad(lambda a: _xent(lora_apply(lj.join(p, a), inputs), labels))(a)
    u, s = tx.update(g, s, a)
    return optax.apply_updates(a, u), s, loss

  runs['lorax'] = (lorax_step, (base, adapters, tx.init(adapters)))

  def peer(model):
    """The step of an NNX model whose LoRA parameters are `nnx.LoRAParam`s."""
    graph, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    lora = _nonzero(lora, jax.random.key(3), 0.01)

    def step(l, r, s):
      loss, g = jax.value_and_grad(
          lambda l: _xent(nnx.merge(graph, l, r)(inputs), labels))(l)
      u, s = tx.update(g, s, l)
      return optax.apply_updates(l, u), s, loss

    return step, (lora, rest, tx.init(lora))

  with_lora = make(lambda i, o, rngs: nnx.LoRALinear(i, o, lora_rank=rank, use_bias=False,
                                                     rngs=rngs))
  nnx.update(with_lora, params)   # the same base weights as every other side
  runs['nnx'] = peer(with_lora)
  provider = qwix.LoraProvider(module_path=r'blocks/\d+/\w+', rank=rank, alpha=float(rank))
  runs['qwix'] = peer(qwix.apply_lora_to_model(make(plain), provider, inputs,
                                               rngs=nnx.Rngs(4)))
  return {side: runs[side] for side in SIDES}


def measure(rounds=15, **sizes) -> dict[str, dict[str, Any]]:
  """`{side: dict(flops, bytes..., seconds)}`: compiled first, then timed interleaved."""
  runs = build(**sizes)
  compiled, results = {}, {}
  for side, (step, args) in runs.items():
    compiled[side] = jax.jit(step).lower(*args).compile()
    flops, mem = common.compiled_cost(compiled[side])
    loss = float(compiled[side](*args)[-1])
    results[side] = dict(flops=flops, moved=common.bytes_accessed(compiled[side]), **mem,
                         loss=loss)
  times = {side: [] for side in runs}
  for _ in range(rounds):
    for side, (_, args) in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(compiled[side](*args))
      times[side].append(time.perf_counter() - t)
  for side in runs:
    results[side]['seconds'] = float(np.median(times[side]))
  return results


def report(results) -> str:
  full = results['full']
  best = lambda key: min(results[p][key] for p in PEERS)
  total = common.total_bytes
  for r in results.values():
    r['bytes'] = total(r)
  head = (f'{"side":<7}{"GFLOPs":>9}{"x full":>8}{"x peer":>8}{"MiB":>9}{"x full":>8}'
          f'{"x peer":>8}{"GB moved":>9}{"x full":>8}{"x peer":>8}{"step ms":>9}{"x full":>8}'
          f'{"x peer":>8}{"loss":>9}')
  lines = [head]
  for side, r in results.items():
    cells = [f'{side:<7}']
    for key, scale, fmt in (('flops', 1e9, '9.3f'), ('bytes', 2**20, '9.1f'),
                            ('moved', 1e9, '9.3f'), ('seconds', 1e-3, '9.2f')):
      cells.append(f'{r[key] / scale:{fmt}}{r[key] / full[key]:8.3f}{r[key] / best(key):8.3f}')
    cells.append(f'{r["loss"]:9.4f}')
    lines.append(''.join(cells))
  return '\n'.join(lines)


def check(results) -> list[str]:
  """What must hold for the comparison to mean anything: every side finite, and the LoRA
  sides computing the same loss (same base, same scale; their factors differ, so the losses
  agree only to the size of the LoRA update)."""
  failed = [f'{side}: loss {r["loss"]} is not finite' for side, r in results.items()
            if not np.isfinite(r['loss'])]
  ref = results['full']['loss']
  for side in ('nnx', 'qwix', 'lorax'):
    if abs(results[side]['loss'] - ref) > 0.05 * abs(ref):
      failed.append(f'{side}: loss {results[side]["loss"]:.4f} is not near the base model\'s '
                    f'{ref:.4f}')
  return failed


def main(argv):
  del argv
  sizes = dict(d_model=_D_MODEL.value, layers=_LAYERS.value, mlp_dim=_MLP.value,
               head_dim=_HEAD_DIM.value, batch=_BATCH.value, seq=_SEQ.value, rank=_RANK.value)
  results = measure(_ROUNDS.value, **sizes)
  mlp = sizes['mlp_dim'] or 11 * sizes['d_model'] // 4
  common.finish(
      f'decoder d_model={sizes["d_model"]} layers={sizes["layers"]} mlp={mlp} '
      f'batch={sizes["batch"]}x{sizes["seq"]} rank={sizes["rank"]}, median of {_ROUNDS.value} '
      f'interleaved rounds on {jax.devices()[0].platform} ({jax.device_count()} devices)',
      report(results), check(results))


if __name__ == '__main__':
  app.run(main)
