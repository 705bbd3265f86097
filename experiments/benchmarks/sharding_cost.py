"""What each mesh layout puts on a device, and what the step communicates.

    python -m experiments.benchmarks.sharding_cost [--d_model 256 --layers 4 --rank 8]

A Llama-style decoder with LoRA (or `--variant`) on every dense kernel, trained by
`make_train_step(..., shardings=...)` on 8 devices (8 fake CPU devices unless real ones exist)
under several layouts: data parallel (replicated base), FSDP, tensor parallel and both. Prints,
per layout, the bytes one device holds of the frozen base, the adapters and the optimizer state,
XLA's compiled per-device argument and temporary bytes (`memory_analysis()`), and the bytes the
compiled step moves in collectives (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute), summed from the output shapes of those ops in the optimized HLO, with
ratios to data parallel.
"""

from __future__ import annotations

import os
import re

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

import lorax_jax as lj  # pylint: disable=g-import-not-at-top,wrong-import-position
from lorax_jax import sharding as sh  # pylint: disable=g-import-not-at-top,wrong-import-position
from lorax_jax.models import Decoder  # pylint: disable=g-import-not-at-top,wrong-import-position

_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Model width.')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Decoder layers.')
_RANK = flags.DEFINE_integer('rank', 8, 'Adapter rank on every dense kernel.')
_VARIANT = flags.DEFINE_string('variant', 'lora', 'Adapter variant.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Tokens per sequence.')

LAYOUTS = {
    'data8': ({'data': 8}, 'replicated'),
    'fsdp8': ({'fsdp': 8}, 'fsdp'),
    'data2_fsdp4': ({'data': 2, 'fsdp': 4}, 'fsdp'),
    'data4_tensor2': ({'data': 4, 'tensor': 2}, 'tensor'),
    'fsdp4_tensor2': ({'fsdp': 4, 'tensor': 2}, 'fsdp_tensor'),
}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_BYTES = {'f64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 's8': 1, 'u8': 1,
          'pred': 1, 's64': 8, 'u64': 8}


def collective_bytes(hlo: str) -> dict[str, int]:
  """Bytes produced by each kind of collective op in an optimized HLO module's text."""
  out = {c: 0 for c in _COLLECTIVES}
  for line in hlo.splitlines():
    m = re.search(r'=\s*(.*?)\s+(' + '|'.join(_COLLECTIVES) + r')(-start)?\(', line)
    if not m:
      continue
    for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', m.group(1)):
      if dtype in _BYTES:
        out[m.group(2)] += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d]))
  return out


def measure(d_model=256, layers=4, rank=8, variant='lora', batch=8, seq=128):
  model = Decoder(vocab_size=256, d_model=d_model, num_layers=layers,
                  num_heads=max(2, d_model // 64), mlp_dim=4 * d_model)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  tokens = jax.random.randint(k1, (batch, seq + 1), 0, 256)
  params = model.init(k2, tokens[:, :-1])
  spec = lj.make_spec(params, lj.dense_kernels(variant=variant, rank=rank, alpha=16),
                      fn=model.apply, args=(tokens[:, :-1],))
  params, adapters = lj.init(k3, params, spec)
  apply = lj.lora(model.apply)
  tx = lj.optimizer(1e-4)

  def loss_fn(joined, batch_, rng):
    logits = apply(joined, batch_[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_[:, 1:]).mean()

  results = {}
  for name, (mesh_shape, preset) in LAYOUTS.items():
    mesh = sh.make_mesh(mesh_shape)
    base_sh = sh.param_shardings(params, mesh, sh.preset(preset))
    ad_sh = sh.adapter_shardings(adapters, base_sh)
    opt_abstract = jax.eval_shape(tx.init, adapters)
    opt_sh = sh.like_params(opt_abstract, adapters, ad_sh, mesh=mesh)
    shardings = sh.TrainShardings(base_sh, ad_sh, opt_sh, sh.batch_sharding(mesh, 2), mesh)
    step = lj.make_train_step(loss_fn, tx, shardings=shardings)
    args = (params, adapters, opt_abstract, tokens, None)
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    results[name] = dict(
        base=sh.per_device_bytes(params, base_sh),
        adapters=sh.per_device_bytes(adapters, ad_sh),
        opt_state=sh.per_device_bytes(opt_abstract, opt_sh),
        arguments=int(mem.argument_size_in_bytes), temp=int(mem.temp_size_in_bytes),
        collectives=collective_bytes(compiled.as_text()))
  return results


def report(results) -> str:
  ref = results['data8']
  mib = lambda b: b / 2**20
  lines = [f'{"layout":<15}{"base MiB":>10}{"x":>7}{"adapt MiB":>11}{"opt MiB":>9}'
           f'{"args MiB":>10}{"x":>7}{"temp MiB":>10}{"comm MiB":>10}  by kind (MiB)']
  for name, r in results.items():
    comm = sum(r['collectives'].values())
    kinds = ', '.join(f'{k} {mib(v):.2f}' for k, v in r['collectives'].items() if v)
    lines.append(f'{name:<15}{mib(r["base"]):>10.2f}{r["base"] / ref["base"]:>7.3f}'
                 f'{mib(r["adapters"]):>11.3f}{mib(r["opt_state"]):>9.3f}'
                 f'{mib(r["arguments"]):>10.2f}{r["arguments"] / ref["arguments"]:>7.3f}'
                 f'{mib(r["temp"]):>10.2f}{mib(comm):>10.2f}  {kinds or "-"}')
  return '\n'.join(lines)


def main(argv):
  del argv
  if jax.device_count() < 8:
    raise SystemExit(f'sharding_cost needs 8 devices; found {jax.device_count()}.')
  results = measure(_D_MODEL.value, _LAYERS.value, _RANK.value, _VARIANT.value, _BATCH.value,
                    _SEQ.value)
  print(f'decoder d_model={_D_MODEL.value} layers={_LAYERS.value} {_VARIANT.value} '
        f'rank={_RANK.value} batch={_BATCH.value}x{_SEQ.value} on {jax.device_count()} '
        f'{jax.devices()[0].platform} devices')
  print(report(results))


if __name__ == '__main__':
  app.run(main)
