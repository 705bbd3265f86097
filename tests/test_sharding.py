"""Sharding: meshes, parameter rules and presets, derived adapter shardings for every variant,
training that gives the same numbers on every layout and across processes, and checkpoints that
restore onto another topology. 8 fake CPU devices (conftest); multi-process runs use gloo."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lorax_jax as lj
from configs import vit_digits
from experiments import train
from lorax_jax import data as data_lib
from lorax_jax import sharding as sh
from lorax_jax.models import Decoder
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = helpers.needs_8_devices


def _decoder(d=64, layers=2):
  model = Decoder(vocab_size=64, d_model=d, num_layers=layers, num_heads=4, mlp_dim=2 * d,
                  num_kv_heads=2)
  x = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
  return model, model.init(jax.random.key(1), x), x


def _specs(shardings):
  return {p: tuple(s.spec) for p, s in lj.paths.flat(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding)).items()}


def _pad(spec, n):
  return tuple(spec) + (None,) * (n - len(spec))


def test_make_mesh():
  n = jax.device_count()    # 8 (conftest), or what XLA_FLAGS asked for
  mesh = sh.make_mesh({'fsdp': 4, 'tensor': 2})
  assert dict(mesh.shape) == {'data': n // 8, 'fsdp': 4, 'tensor': 2}   # data: the rest
  assert dict(sh.make_mesh().shape) == {'data': n, 'fsdp': 1, 'tensor': 1}
  assert dict(sh.make_mesh({'data': 2, 'fsdp': -1}).shape) == {'data': 2, 'fsdp': n // 2,
                                                                'tensor': 1}
  one = sh.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  assert one.devices.size == 1 and sh.make_mesh({'data': 3}).devices.size == 3  # the first
  if hasattr(jax.sharding, 'AxisType'):
    assert all(t == jax.sharding.AxisType.Auto for t in one.axis_types)
  for shape, message in [({'model': 2}, "Unknown mesh axes ['model']"),
                         ({'data': -1, 'fsdp': -1}, 'at most one may be -1'),
                         ({'data': 2 * n}, f'multiply to {2 * n}, but there are {n} devices'),
                         ({'data': 3, 'fsdp': -1}, f'do not divide the {n} devices')][
                             :4 if n % 3 else 3]:
    with pytest.raises(ValueError, match=re.escape(message)):
      sh.make_mesh(shape)


def test_presets_on_the_reference_decoder(caplog):
  _, params, _ = _decoder()
  mesh = sh.make_mesh({'fsdp': 2, 'tensor': 4})
  with caplog.at_level(logging.INFO):
    specs = _specs(sh.param_shardings(params, mesh, sh.preset('tensor')))
  p = 'params/layer0/'
  assert specs[p + 'query/kernel'] == (None, 'tensor', None)     # column-parallel heads
  assert specs[p + 'up/kernel'] == (None, 'tensor')
  assert specs[p + 'gate/kernel'] == (None, 'tensor')
  assert specs[p + 'out/kernel'] == ('tensor', None, None)       # row-parallel
  assert specs[p + 'down/kernel'] == ('tensor', None)
  assert specs['params/embed/embedding'] == ()
  # 2 kv heads do not split 4 ways: replicated, with a note.
  assert specs[p + 'key/kernel'] == (None, None, None)
  assert "replicating axis 1 of 'params/layer0/key/kernel'" in caplog.text
  specs = _specs(sh.param_shardings(params, mesh, sh.preset('fsdp_tensor')))
  assert specs[p + 'query/kernel'] == ('fsdp', 'tensor', None)
  assert specs[p + 'down/kernel'] == ('tensor', 'fsdp')
  assert specs['params/embed/embedding'] == ('fsdp', None)       # ties go to the first axis
  specs = _specs(sh.param_shardings(params, sh.make_mesh({'fsdp': 8}), sh.preset('fsdp')))
  assert specs[p + 'up/kernel'] == (None, 'fsdp')                # the largest divisible axis
  assert specs[p + 'attn_norm/scale'] == ('fsdp',)
  assert all(s == () for s in _specs(sh.param_shardings(
      params, mesh, sh.preset('replicated'))).values())
  # Rules: first match wins; unmatched leaves are replicated.
  specs = _specs(sh.param_shardings(params, mesh, [('query/kernel', P('fsdp')),
                                                   ('kernel', P(None, 'tensor'))]))
  assert specs[p + 'query/kernel'] == ('fsdp',) and specs[p + 'up/kernel'] == (None, 'tensor')
  assert specs[p + 'attn_norm/scale'] == ()


def test_sharding_errors():
  _, params, _ = _decoder()
  mesh = sh.make_mesh({'fsdp': 8})
  with pytest.raises(ValueError, match=re.escape("names mesh axes ['model']")):
    sh.param_shardings(params, mesh, [('kernel', P('model'))])
  with pytest.raises(ValueError, match=re.escape("has 3 entries, but the leaf has shape (64,)")):
    sh.param_shardings(params, mesh, [('scale', P(None, None, 'fsdp'))])
  with pytest.raises(ValueError, match='not a valid regex'):
    sh.param_shardings(params, mesh, [('(', P())])
  with pytest.raises(ValueError, match=re.escape("Unknown sharding preset 'zero3'")):
    sh.preset('zero3')


def test_flax_logical_axis_annotations_are_honoured():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'mlp'))
      h = nn.Dense(16, kernel_init=init, name='up')(x)
      return nn.Dense(8, name='down')(h)

  boxed = M().init(jax.random.key(0), jnp.ones((2, 8)))
  mesh = sh.make_mesh({'fsdp': 2, 'tensor': 4})
  shardings = sh.param_shardings(boxed, mesh, [('down/kernel', P('fsdp'))],
                                 logical_axis_rules=[('embed', 'fsdp'), ('mlp', 'tensor')])
  specs = _specs(shardings)
  assert specs['params/up/kernel'] == ('fsdp', 'tensor')
  assert specs['params/down/kernel'] == ('fsdp',)
  params = nn.unbox(boxed)
  placed = sh.place(params, shardings)
  assert placed['params']['up']['kernel'].sharding.spec == P('fsdp', 'tensor')


def _expected(variant, bt, i, o):
  """Each variant's arrays as the issue states them: A takes the base's in-axis (and stacked)
  partitioning, B (and per-output vectors) the out-axis one, rank/coefficient axes replicated."""
  a, b = bt + (i, None), bt + (None, o)
  return {
      'lora': {'a': a, 'b': b},
      'lora_fa': {'a': a, 'b': b},
      'dora': {'a': a, 'b': b, 'magnitude': bt + (o,)},
      'vera': {'d': bt + (None,), 'b': bt + (o,)},
      'loha': {'a1': a, 'b1': b, 'a2': a, 'b2': b},
      'lokr': {'c': bt + (None, None), 'a': bt + (None, None), 'b': bt + (None, None)},
      'lora_xs': {'core': bt + (None, None), 'a': a, 'b': b},
      'tied_lora': {'a': (i, None), 'b': (None, o), 'u': bt + (o,), 'v': bt + (None,)},
      'nola': {'alpha': bt + (None,), 'beta': bt + (None,)},
      'adalora': {'p': a, 'lam': bt + (None,), 'q': b, 'mask': bt + (None,)},
      'sora': {'a': a, 'b': b, 'gate': bt + (None,)},
  }[variant]


@pytest.mark.parametrize('variant', lj.variants.names())
def test_adapter_shardings_are_derived_for_every_variant(variant):
  params = {'w': jax.random.normal(jax.random.key(0), (32, 16)),
            'stack': jax.random.normal(jax.random.key(1), (4, 16, 32))}
  mesh = sh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  base = sh.param_shardings(params, mesh, [('w', P('fsdp', 'tensor')),
                                           ('stack', P('data', None, 'tensor'))])
  extra = {'num_basis': 8} if variant == 'nola' else {}   # any number of bases shards alike
  spec = lj.make_spec(params, [('w', {'variant': variant, 'rank': 2, **extra}),
                               ('stack', {'variant': variant, 'rank': 2, 'batch_axes': 0,
                                          'in_axes': 1, 'out_axes': 2, **extra})])
  params, adapters = lj.init(jax.random.key(2), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(5), scale=0.3)
  derived = sh.adapter_shardings(adapters, base)
  for path, (bt, i, o) in {'w': ((), 'fsdp', 'tensor'), 'stack': (('data',), None, 'tensor')
                          }.items():
    state, shard = adapters[path], derived[path]
    for field, want in _expected(variant, bt, i, o).items():
      value = getattr(state, field)
      if value is None:
        continue
      got = getattr(shard, field).spec
      assert _pad(got, np.ndim(value)) == want, (path, field, got, want)
  # The derived shardings place the adapters, and a sharded forward equals the unsharded one.
  placed = sh.place(adapters, derived)
  params_p = sh.place(params, base)
  xs = jax.random.normal(jax.random.key(3), (4, 16))
  fn = lambda p: jnp.einsum('bi,bio->bo', xs, p['stack']) @ p['w']
  f = jax.jit(lambda p, a: lj.lora(fn)(lj.join(p, a)))
  np.testing.assert_allclose(f(params_p, placed), f(params, adapters), rtol=1e-5, atol=1e-5)


def test_opt_state_follows_the_adapters():
  params = {'w': jnp.ones((32, 16))}
  mesh = sh.make_mesh({'fsdp': 8})
  base = sh.param_shardings(params, mesh, [('w', P('fsdp'))])
  _, adapters = lj.init(jax.random.key(0), params, lj.make_spec(params, [('w', {'rank': 2})]))
  ad_sh = sh.adapter_shardings(adapters, base)
  tx = lj.optimizer(1e-3, loraplus_ratio=4)
  opt_sh = sh.like_params(jax.eval_shape(tx.init, adapters), adapters, ad_sh)
  got = [s.spec for s in jax.tree_util.tree_leaves(
      opt_sh, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))]
  assert P('fsdp', None) in got and P(None, None) in got and P() in got   # mu/nu of A, B; count


def test_fsdp_holds_an_eighth_of_the_base_per_device():
  model, params, x = _decoder(d=128, layers=2)
  out = {}
  for name, mesh_shape in (('replicated', {'data': 8}), ('fsdp', {'fsdp': 8})):
    mesh = sh.make_mesh(mesh_shape)
    base_sh = sh.param_shardings(params, mesh, sh.preset(name))
    compiled = jax.jit(model.apply, in_shardings=(base_sh, sh.replicated(mesh))).lower(
        params, x).compile()
    x_bytes = x.size * x.dtype.itemsize
    out[name] = compiled.memory_analysis().argument_size_in_bytes - x_bytes
    assert out[name] == sh.per_device_bytes(params, base_sh)
  assert out['fsdp'] <= out['replicated'] / 8 * 1.05, out


def _config(tmp_path, steps=4, **mesh):
  c = vit_digits.get_config('quick')
  c.base.steps = 5
  c.base.dir = str(tmp_path / 'bases')
  c.train.update(dict(steps=steps, warmup_steps=1, eval_every=2, checkpoint_every=2, log_every=1))
  for k, v in mesh.items():
    if k == 'preset':
      c.sharding.preset = v
    else:
      c.mesh[k] = v
  return c


def _losses(workdir):
  return [json.loads(l)['loss'] for l in open(os.path.join(workdir, 'metrics.jsonl'))
          if '"loss"' in l]


def _final_adapters(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'adapters')   # lorax_jax.checkpoints
  restored = ocp.StandardCheckpointer().restore(path)
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(restored)]


@pytest.mark.slow
def test_same_losses_and_adapters_on_every_layout_and_restore_across_layouts(tmp_path):
  layouts = {'dp8': dict(data=8),
             'fsdp4_tensor2': dict(data=1, fsdp=4, tensor=2, preset='fsdp_tensor'),
             'one_device': dict(data=1, fsdp=1, tensor=1)}
  runs = {}
  for name, mesh in layouts.items():
    r = train.train_and_evaluate(_config(tmp_path, **mesh), str(tmp_path / name))
    runs[name] = (_losses(tmp_path / name), _final_adapters(tmp_path / name, 4), r['accuracy'])
  ref_losses, ref_adapters, ref_acc = runs['one_device']
  # Each layout is its own compiled program, so logits agree to rounding only: one test image
  # whose top two logits tie to within that may be classified either way.
  c = _config(tmp_path)
  one_image = 1.0 / len(data_lib.digits(c.data.adapt_classes, split='test',
                                        size=c.data.image_size, seed=c.seed)[1])
  for name, (losses, adapters, acc) in runs.items():
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(adapters, ref_adapters):
      # Adam divides by sqrt(v): reduction-order rounding of tiny gradients shows up at ~1e-6.
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))
    assert abs(acc - ref_acc) <= 1.01 * one_image
  # fsdp x tensor checkpoint -> tensor parallel (on another mesh shape): resumes at the end.
  # (Restoring onto one device is tests/test_train.py's everyday case.)
  r = train.train_and_evaluate(_config(tmp_path, data=4, tensor=2, preset='tensor'),
                               str(tmp_path / 'fsdp4_tensor2'))
  assert r['resumed_from'] == 4 and abs(r['accuracy'] - ref_acc) <= 1.01 * one_image


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _cli(workdir, bases, devices, extra=()):
  env = helpers.subprocess_env(devices, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'experiments.train', '--config', 'configs/vit_digits.py:quick',
         '--workdir', str(workdir), f'--config.base.dir={bases}', '--config.base.steps=5',
         '--config.train.steps=4', '--config.train.warmup_steps=1',
         '--config.train.eval_every=2', '--config.train.checkpoint_every=2',
         '--config.train.log_every=1', *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
  bases = tmp_path / 'bases'
  for attempt in range(3):
    # A port free a moment ago may be taken by another program before the coordinator binds it:
    # then the run is retried on a fresh one.
    port = _free_port()
    procs = [_cli(tmp_path / 'two', bases, 4, ['--coordinator_address', f'127.0.0.1:{port}',
                                               '--num_processes', '2', '--process_id', str(i)])
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if all(p.returncode == 0 for p in procs) or attempt == 2 or not any(
        re.search('address already in use|failed to bind', o, re.IGNORECASE) for o in outs):
      break
    shutil.rmtree(tmp_path / 'two', ignore_errors=True)
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  assert 'adapted' in outs[0] and 'adapted' not in outs[1]    # process 0 prints the summary
  one = _cli(tmp_path / 'one', bases, 8)
  out = one.communicate(timeout=600)[0]
  assert one.returncode == 0, out[-3000:]
  np.testing.assert_allclose(_losses(tmp_path / 'two'), _losses(tmp_path / 'one'), rtol=1e-5)
  # The 2-process checkpoint restores in a 1-process, 1-device run: it resumes at the end.
  rerun = _cli(tmp_path / 'two', bases, 1, ['--config.mesh.data=1'])
  out = rerun.communicate(timeout=600)[0]
  assert rerun.returncode == 0 and '(resumed from step 4)' in out, out[-3000:]


def test_train_step_with_shardings_matches_unsharded():
  model, params, x = _decoder()
  spec = lj.make_spec(params, lj.dense_kernels(variant='dora', rank=4), fn=model.apply,
                      args=(x,))
  params, adapters = lj.init(jax.random.key(3), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(4), scale=0.05)
  apply = lj.lora(model.apply)
  loss_fn = lambda j, batch, rng: jnp.mean(jnp.square(apply(j, batch)))
  tx = lj.optimizer(1e-2)
  plain = lj.make_train_step(loss_fn, tx, donate=False)
  a1, _, l1 = plain(params, adapters, tx.init(adapters), x)
  mesh = sh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  base_sh = sh.param_shardings(params, mesh, sh.preset('fsdp_tensor'))
  ad_sh = sh.adapter_shardings(adapters, base_sh)
  opt_sh = sh.like_params(jax.eval_shape(tx.init, adapters), adapters, ad_sh)
  step = lj.make_train_step(loss_fn, tx, shardings=sh.TrainShardings(
      base_sh, ad_sh, opt_sh, sh.batch_sharding(mesh, 2), mesh))
  a_p = sh.place(adapters, ad_sh)
  a2, s2, l2 = step(sh.place(params, base_sh), a_p, jax.jit(tx.init, out_shardings=opt_sh)(a_p),
                    sh.global_batch(x, mesh))
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  for u, v in zip(jax.tree_util.tree_leaves(a2), jax.tree_util.tree_leaves(a1)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
  for leaf, want in zip(jax.tree_util.tree_leaves(a2), jax.tree_util.tree_leaves(
      ad_sh, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def test_sharding_rule_that_matches_nothing_raises():
  """One rule engine (`lorax_jax.select`), one policy: a mistyped rule is never ignored."""
  _, params, _ = _decoder()
  mesh = sh.make_mesh({'fsdp': 8})
  with pytest.raises(ValueError, match=re.escape("Sharding rule 'qurey/kernel' matches no")):
    sh.param_shardings(params, mesh, [('qurey/kernel', P('fsdp')), ('.*', P())])
  with pytest.raises(ValueError, match=re.escape("Sharding rule 'query' has no effect")):
    sh.param_shardings(params, mesh, [('.*', P()), ('query', P('fsdp'))])
