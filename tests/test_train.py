"""The training loop: smoke runs per model and method, base caching, resume after SIGKILL,
checkpoint fallback, NaN stops, config errors, metrics files."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import decoder_lm
from configs import minilm_docstrings
from configs import vit_digits
from experiments import train
from lorax_jax import checkpoints as ckpt_lib
from lorax_jax import metrics as metrics_lib
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CONFIGS = {'vit_digits': vit_digits, 'decoder_lm': decoder_lm,
           'minilm_docstrings': minilm_docstrings}


def _config(tmp_path, arg='quick', module=vit_digits, **train_overrides):
  c = module.get_config(arg)
  c.base.steps = 3
  c.base.dir = str(tmp_path / 'bases')
  c.train.steps = 3
  c.train.warmup_steps = 1
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


@pytest.mark.slow
@pytest.mark.parametrize('arg', ['quick', 'quick,model=cnn', 'quick,model=resnet',
                                 'quick,method=full', 'quick,method=head'])
def test_one_run_per_model_and_method(tmp_path, arg):
  c = _config(tmp_path, arg)
  r = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert r['steps'] == 3 and 0.0 <= r['accuracy'] <= 1.0
  assert r['base_pretrained_now']
  if c.method == 'full':
    assert r['trainable_params'] == r['total_params']
  else:
    assert 0 < r['trainable_fraction'] < 0.5
  saved = json.load(open(tmp_path / 'run' / 'results.json'))
  assert saved['accuracy'] == r['accuracy']
  lines = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert [l['step'] for l in lines if 'loss' in l] == [1, 2, 3]
  events = glob.glob(str(tmp_path / 'run' / 'events.out.tfevents.*'))
  assert len(events) == 1 and len(metrics_lib.read_tfrecords(events[0])) >= 4


@pytest.mark.slow
@pytest.mark.parametrize('name', ['decoder_lm', 'minilm_docstrings'])
def test_one_run_per_config(tmp_path, name):
  c = _config(tmp_path, 'quick', CONFIGS[name])
  r = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert r['task'] == c.task and r['steps'] == 3
  assert np.isfinite(r[r['metric']]) and np.isfinite(r['base_' + r['metric']])
  assert 0 < r['trainable_fraction'] < 0.5
  assert train.summary(r).splitlines()[0].startswith(f'{c.task} / {c.model.name} / lora')


@pytest.mark.parametrize('name', sorted(CONFIGS))
@pytest.mark.parametrize('arg', [None, 'quick', 'quick,method=full,rank=2', 'method=head'])
def test_every_config_builds(name, arg):
  c = CONFIGS[name].get_config(arg)
  assert c.task in ('digits', 'docstrings', 'lm') and c.train.steps > 0
  assert c.method == ('lora' if arg in (None, 'quick') else arg.split('method=')[1].split(',')[0])


@pytest.mark.slow
def test_rules_from_the_config(tmp_path):
  c = _config(tmp_path)
  c.rules = [(r'head/', 'full'), (r'block0/query/kernel', {'rank': 2, 'alpha': 4.0})]
  r = train.train_and_evaluate(c, str(tmp_path / 'run'))
  head = 64 * 10 + 10
  assert r['trainable_params'] == head + 2 * (64 + 64)


def test_resumed_metrics_drop_steps_after_the_checkpoint(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n{"step": 2')
  w = metrics_lib.MetricWriter(str(tmp_path), resume_step=10)
  w.write(20, {'loss': 0.25})
  w.close()
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert lines == [{'step': 10, 'loss': 1.0}, {'step': 20, 'loss': 0.25}]


def test_tfrecord_framing():
  assert metrics_lib.crc32c(b'123456789') == 0xE3069283  # the standard CRC-32C check value
  data = metrics_lib.encode_event(1.5, 7, scalars={'loss': 0.25})
  assert metrics_lib.read_tfrecords_bytes(metrics_lib.tfrecord(data)) == [data]


@pytest.mark.slow
def test_base_is_cached_and_reused(tmp_path):
  c = _config(tmp_path)
  r1 = train.train_and_evaluate(c, str(tmp_path / 'a'))
  r2 = train.train_and_evaluate(c, str(tmp_path / 'b'))
  assert r1['base_pretrained_now'] and not r2['base_pretrained_now']
  assert r1['base_accuracy_pretrain_classes'] == r2['base_accuracy_pretrain_classes']
  assert r1['accuracy'] == r2['accuracy']          # same config and seed, same numbers
  assert len(glob.glob(str(tmp_path / 'bases' / '*.msgpack'))) == 1


# The variants whose state has more than LoRA's kind of arrays: a magnitude, frozen arrays,
# shared arrays held by one leaf (None elsewhere), a Kronecker factor.
@pytest.mark.slow
@pytest.mark.parametrize('variant', ['dora', 'lora_fa', 'tied_lora', 'lokr'])
def test_variants_train_checkpoint_and_resume(tmp_path, variant):
  c = _config(tmp_path, f'quick,variant={variant},rank=4')
  if variant == 'lokr':
    c.adapter.options.factor = 4
  r1 = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert r1['steps'] == 3 and 0 < r1['trainable_fraction'] < 0.5
  r2 = train.train_and_evaluate(c, str(tmp_path / 'a'))   # restores frozen and shared arrays
  assert r2['resumed_from'] == 3 and r2['accuracy'] == r1['accuracy']


# QLoRA (an NF4 base), QPiSSA (PiSSA's residual quantized), LoftQ and the calibrated inits: the
# base is rebuilt the same way on resume, so the restored adapters continue exactly.
@pytest.mark.slow
@pytest.mark.parametrize('arg', ['init=pissa_niter_4,quant=nf4', 'init=loftq',
                                 'init=eva,quant=int8'])
def test_inits_and_quantized_bases_train_and_resume(tmp_path, arg):
  c = _config(tmp_path, f'quick,rank=4,{arg}')
  c.adapter.calibration_batches = 2
  r1 = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert r1['steps'] == 3 and 0 < r1['trainable_fraction'] < 0.5
  r2 = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert r2['resumed_from'] == 3 and r2['accuracy'] == r1['accuracy']


@pytest.mark.slow
def test_rerun_of_a_finished_run_resumes_at_the_end(tmp_path):
  c = _config(tmp_path)
  r1 = train.train_and_evaluate(c, str(tmp_path / 'a'))
  r2 = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert r2['resumed_from'] == 3 and r2['accuracy'] == r1['accuracy']


@pytest.mark.slow
def test_checkpoint_of_another_config_is_refused(tmp_path):
  train.train_and_evaluate(_config(tmp_path), str(tmp_path / 'a'))
  other = _config(tmp_path, 'quick,rank=4')
  with pytest.raises(ValueError, match='written by another config or base'):
    train.train_and_evaluate(other, str(tmp_path / 'a'))


@pytest.mark.slow
def test_nan_stops_training_naming_the_step(tmp_path):
  c = _config(tmp_path, learning_rate=float('nan'), checkpoint_every=1)
  with pytest.raises(ValueError, match=re.escape('became NaN or infinite at step 1')):
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert not os.path.exists(tmp_path / 'a' / 'checkpoints' / '1')


@pytest.mark.parametrize('arg,message', [
    ('quick,method=magic', "Unknown method 'magic'; allowed: ['lora', 'full', 'head']"),
    ('quick,model=mlp', "Unknown model 'mlp' for task 'digits'; allowed: ['vit', 'cnn', "
                        "'resnet']"),
])
def test_bad_config_values(tmp_path, arg, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    train.train_and_evaluate(_config(tmp_path, arg), str(tmp_path / 'a'))


@pytest.mark.parametrize('arg,message', [
    ('quick,rnak=3', "Unknown config argument 'rnak'; allowed: ['dynamics', 'init', 'method', "
                     "'model', 'quant', 'quick', 'rank', 'variant']"),
    ('dynamics=magic', "Unknown dynamics 'magic'; allowed: ['', 'adalora', 'dylora', 'sora', "
                       "'relora', 'cola', 'delta_lora']"),
    ('quant=fp3', "Unknown quant 'fp3'; allowed: ['', 'nf4', 'int4', 'int8']"),
    ('init=svd', "Unknown init 'svd'; allowed: ['kaiming',"),
    ('variant=dorra', "Unknown variant 'dorra'; allowed: ['adalora', 'dora',"),
    ('rank=three', "Config argument rank='three' is not a int"),
    ('model', "Config argument 'model' needs a value"),
])
def test_bad_config_arguments(arg, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    vit_digits.get_config(arg)


def test_parse_arg_types():
  a = common.parse_arg('quick,rank=4,lr=0.5', quick=False, rank=8, lr=1.0, name='x')
  assert (a.quick, a.rank, a.lr, a.name) == (True, 4, 0.5, 'x')


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  ck = ckpt_lib.Checkpoints(str(tmp_path / 'ck'), interval=1, max_to_keep=3)
  state = {'w': jnp.arange(6.0).reshape(2, 3), 'step': jnp.int32(0)}
  for step in (1, 2):
    ck.save(step, {'w': state['w'] * step, 'step': jnp.int32(step)}, {'tag': step})
  ck.close()
  for f in glob.glob(str(tmp_path / 'ck' / '2' / 'state' / '**' / '*'), recursive=True):
    if os.path.isfile(f):
      with open(f, 'r+b') as fh:
        fh.truncate(max(0, os.path.getsize(f) // 3))
  ck = ckpt_lib.Checkpoints(str(tmp_path / 'ck'), interval=1, max_to_keep=3)
  step, restored, meta = ck.restore_latest(state)
  assert step == 1 and meta == {'tag': 1}
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert 'falling back' in caplog.text
  with pytest.raises(ValueError, match='fits the model'):
    ck.restore_latest({'w': jnp.zeros((5,)), 'step': jnp.int32(0)})


def _cmd(workdir, cache):
  return ([sys.executable, '-m', 'experiments.train',
           '--config', 'configs/vit_digits.py:quick,model=cnn', '--workdir', workdir,
           '--config.train.steps=60', '--config.train.checkpoint_every=10',
           '--config.base.steps=20', f'--config.base.dir={cache}'])


@pytest.mark.slow
def test_sigkill_and_rerun_gives_the_same_final_metrics(tmp_path):
  env = helpers.subprocess_env()
  cache = str(tmp_path / 'bases')
  ref_dir, dir_ = str(tmp_path / 'ref'), str(tmp_path / 'killed')
  subprocess.run(_cmd(ref_dir, cache), cwd=ROOT, env=env, check=True, capture_output=True,
                 timeout=600)
  proc = subprocess.Popen(_cmd(dir_, cache), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  # Killed once its step-20 checkpoint exists, however long the machine takes to get there (as
  # long as the other runs' timeout); a run that ends first cannot be killed mid-way.
  ckdir, deadline, reached = os.path.join(dir_, 'checkpoints'), time.time() + 600, False
  while not reached and proc.poll() is None and time.time() < deadline:
    steps = [d for d in (os.listdir(ckdir) if os.path.isdir(ckdir) else []) if d.isdigit()]
    reached = bool(steps) and max(map(int, steps)) >= 20
    time.sleep(0.05)
  alive = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert reached and alive, 'the run ended or hung before its step-20 checkpoint'
  assert not os.path.exists(os.path.join(dir_, 'results.json'))
  out = subprocess.run(_cmd(dir_, cache), cwd=ROOT, env=env, check=True, capture_output=True,
                       text=True, timeout=600)
  ref = json.load(open(os.path.join(ref_dir, 'results.json')))
  got = json.load(open(os.path.join(dir_, 'results.json')))
  assert 0 < got['resumed_from'] < 60
  for key in ('accuracy', 'accuracy_pretrain_classes', 'base_accuracy'):
    assert got[key] == ref[key], (key, out.stdout)
  last = lambda d: [json.loads(l) for l in open(os.path.join(d, 'metrics.jsonl'))
                    if '"loss"' in l][-1]
  assert last(dir_)['loss'] == last(ref_dir)['loss']
