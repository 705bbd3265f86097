"""The training loop: smoke runs per model and method, base caching, resume after SIGKILL (from
the checkpoint alone: no selection, init or calibration replayed), self-describing run
checkpoints, spec JSON, checkpoint fallback, NaN stops, config errors, metrics files."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from configs import decoder_lm
from configs import minilm_docstrings
from configs import vit_digits
from experiments import train
from experiments import workdir_lock
import lorax_jax as lj
from lorax_jax import checkpoints as ckpt_lib
from lorax_jax import metrics as metrics_lib
from lorax_jax import spec_json
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CONFIGS = {'vit_digits': vit_digits, 'decoder_lm': decoder_lm,
           'minilm_docstrings': minilm_docstrings}


@pytest.fixture(scope='session')
def bases(tmp_path_factory):
  """A base cache shared by the training tests that do not test the cache (one per worker)."""
  return tmp_path_factory.mktemp('bases')


def _config(tmp_path, arg='quick', module=vit_digits, bases=None, **train_overrides):
  c = module.get_config(arg)
  c.base.steps = 3
  c.base.dir = str(bases or tmp_path / 'bases')
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
  if 'per_class' in c.data:
    c.data.per_class = 12   # a few batches: the run, not the data, is under test
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
def test_rules_from_the_config(tmp_path, bases):
  c = _config(tmp_path, bases=bases)
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


def _forbid_setup(monkeypatch):
  """Makes selection, inits and calibration fail: a resume must not need them."""
  def fail(*args, **kwargs):
    raise AssertionError('a resumed run re-ran selection, inits or calibration')
  monkeypatch.setattr(train, '_select_and_init', fail)
  monkeypatch.setattr(lj, 'make_spec', fail)
  monkeypatch.setattr(lj, 'init', fail)
  monkeypatch.setattr(lj.calibration, 'run', fail)


# The variants whose state has more than LoRA's kind of arrays, in one run (one per kind of
# kernel; a rule that matched nothing would be an error): a magnitude (DoRA), frozen arrays
# (LoRA-FA), shared arrays held by one leaf and None elsewhere (Tied-LoRA), a Kronecker factor
# (LoKr).
@pytest.mark.slow
def test_variants_train_checkpoint_and_resume(tmp_path, monkeypatch, bases):
  c = _config(tmp_path, 'quick,rank=4', bases=bases)
  c.rules = [(r'head/', 'full'), (r'query/kernel$', {'variant': 'dora', 'rank': 4}),
             (r'key/kernel$', {'variant': 'lora_fa', 'rank': 4}),
             (r'value/kernel$', {'variant': 'tied_lora', 'rank': 4}),
             (r'mlp1/kernel$', {'variant': 'lokr', 'rank': 4, 'factor': 4})]
  r1 = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert r1['steps'] == 3 and 0 < r1['trainable_fraction'] < 0.5
  os.remove(tmp_path / 'a' / 'results.json')   # killed before its results: it resumes at 3
  _forbid_setup(monkeypatch)
  r2 = train.train_and_evaluate(c, str(tmp_path / 'a'))   # restores frozen and shared arrays
  assert r2['resumed_from'] == 3 and r2['accuracy'] == r1['accuracy']


# QLoRA (an NF4 base), QPiSSA (PiSSA's residual quantized), LoftQ and the calibrated inits: the
# base is rebuilt the same way on resume, so the restored adapters continue exactly.
@pytest.mark.slow
@pytest.mark.parametrize('arg', ['init=pissa_niter_4,quant=nf4', 'init=loftq',
                                 'init=eva,quant=int8'])
def test_inits_and_quantized_bases_train_and_resume(tmp_path, arg, monkeypatch, bases):
  c = _config(tmp_path, f'quick,rank=4,{arg}', bases=bases)
  c.adapter.calibration_batches = 2
  r1 = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert r1['steps'] == 3 and 0 < r1['trainable_fraction'] < 0.5
  os.remove(tmp_path / 'a' / 'results.json')   # killed before its results: it resumes at 3
  _forbid_setup(monkeypatch)   # the residual, LoftQ's base, EVA's ranks: from the checkpoint
  r2 = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert r2['resumed_from'] == 3 and r2['accuracy'] == r1['accuracy']
  assert r2['base_accuracy'] == r1['base_accuracy']


def _files(workdir):
  out = {}
  for f in sorted(glob.glob(os.path.join(workdir, '**', '*'), recursive=True)):
    if os.path.isfile(f):
      with open(f, 'rb') as fh:
        out[os.path.relpath(f, workdir)] = fh.read()
  return out


def _final_lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [l for l in f if 'final_accuracy' in l]


@pytest.fixture(scope='module')
def finished(tmp_path_factory, bases):
  """One finished run, `(config, workdir, results)`, trained once per module (and worker)."""
  root = tmp_path_factory.mktemp('finished')
  c = _config(root, bases=bases)
  return c, str(root / 'a'), train.train_and_evaluate(c, str(root / 'a'))


def _copy_of(finished, tmp_path):
  """`finished` in a workdir of this test's own: `(config, workdir, results)`."""
  c, workdir, results = finished
  shutil.copytree(workdir, tmp_path / 'a')
  return c, str(tmp_path / 'a'), results


@pytest.mark.slow
def test_rerun_of_a_finished_run_changes_nothing(finished, tmp_path, monkeypatch):
  c, workdir, r1 = _copy_of(finished, tmp_path)
  before = _files(workdir)
  _forbid_setup(monkeypatch)   # nothing is set up, trained or evaluated again
  monkeypatch.setattr(train, 'setup', lambda *a, **k: pytest.fail('setup ran'))
  r2 = train.train_and_evaluate(c, workdir)
  assert r2 == r1 and _files(workdir) == before and len(_final_lines(workdir)) == 1


@pytest.mark.slow
def test_run_killed_before_its_results_resumes_at_the_end_with_every_figure(finished, tmp_path):
  c, workdir, r1 = _copy_of(finished, tmp_path)
  os.remove(os.path.join(workdir, 'results.json'))   # killed after the last checkpoint
  r2 = train.train_and_evaluate(c, workdir)
  assert r2['resumed_from'] == 3 and r2['accuracy'] == r1['accuracy']
  for k in ('step_memory_bytes', 'step_temp_bytes', 'step_flops'):
    assert r2[k] is not None and r2[k] == r1[k], k
  assert len(_final_lines(workdir)) == 1
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['resumed_from'] == 3


@pytest.mark.slow
def test_checkpoint_of_another_config_is_refused_naming_the_fields(finished, tmp_path):
  c, workdir, _ = _copy_of(finished, tmp_path)
  other = common.apply_overrides(c.copy_and_resolve_references(), {'adapter.rank': 4,
                                                                   'adapter.alpha': 8.0})
  with pytest.raises(ValueError, match=re.escape(
      'written by another config or base; differences: adapter.alpha: 16.0 in the checkpoint, '
      '8.0 now; adapter.rank: 8 in the checkpoint, 4 now. Use a new workdir.')):
    train.train_and_evaluate(other, workdir)
  # More steps for a finished run are refused too (its schedule decays over train.steps).
  more = common.apply_overrides(c.copy_and_resolve_references(), {'train.steps': 5})
  with pytest.raises(ValueError, match=re.escape('train.steps: 3 in the checkpoint, 5 now')):
    train.train_and_evaluate(more, workdir)


def _nan_schedule(monkeypatch):
  """A learning rate that becomes NaN (a config's NaN is refused before anything runs)."""
  monkeypatch.setattr(train, '_base_schedule', lambda config: lambda step: jnp.float32(jnp.nan))


@pytest.mark.slow
@pytest.mark.parametrize('checkpoint_every', [1, 2])
def test_nan_stops_training_naming_the_step(tmp_path, monkeypatch, checkpoint_every):
  # With checkpoint_every=2 orbax still writes its first checkpoint at step 1: it is checked too.
  _nan_schedule(monkeypatch)
  c = _config(tmp_path, checkpoint_every=checkpoint_every)
  with pytest.raises(ValueError, match=re.escape('became NaN or infinite at step 1')) as e:
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert 'No checkpoint was written' in str(e.value)
  assert not glob.glob(str(tmp_path / 'a' / 'checkpoints' / '[0-9]*'))


@pytest.mark.parametrize('field,value', [
    ('learning_rate', float('nan')), ('learning_rate', float('inf')),
    ('learning_rate', -0.003), ('learning_rate', 0.0)])
def test_bad_learning_rates_are_refused_before_anything_runs(tmp_path, field, value):
  c = _config(tmp_path, **{field: value})
  with pytest.raises(ValueError, match=re.escape(f'train.{field}={value!r} must be a finite')):
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert not os.path.exists(tmp_path / 'a')


@pytest.mark.parametrize('field,value,message', [
    ('seed', -1, 'seed=-1 must be an int >= 0'),
    ('train.max_to_keep', 0, 'train.max_to_keep=0 must be > 0'),
    ('train.log_every', 0, 'train.log_every=0 must be > 0'),
    ('train.warmup_steps', 3, 'train.warmup_steps=3 must be in [0, train.steps=3)'),
    ('data.batch_size', 0, 'data.batch_size=0 must be > 0'),
    ('model.num_classes', 3, 'data.pretrain_classes has [3, 4], but model.num_classes=3'),
])
def test_bad_config_fields_are_refused_before_anything_runs(tmp_path, field, value, message):
  c = common.apply_overrides(_config(tmp_path), {field: value})
  with pytest.raises(ValueError, match=re.escape(message)):
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert not os.path.exists(tmp_path / 'bases')   # no base was pretrained
  assert not glob.glob(str(tmp_path / 'a' / 'checkpoints' / '[0-9]*'))


def test_override_of_another_type_is_refused_naming_the_field():
  with pytest.raises(ValueError, match=re.escape(
      "Override train.steps='abc': train.steps is of type int (now 100); got type str.")):
    common.apply_overrides(vit_digits.get_config('quick'), {'train.steps': 'abc'})


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


def _train_cli(*args, module='experiments.train'):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT,
                        env=helpers.subprocess_env(), capture_output=True, text=True, timeout=300)


CLI_ERRORS = [
    ('missing-config', ['--config', 'configs/nope.py:quick'],
     "config file 'configs/nope.py' (from --config configs/nope.py:quick) does not exist; "
     "allowed: a config file with get_config(arg)"),
    ('misspelled-field', ['--config.train.stepz=10'],
     "--config.train.stepz: train has no field 'stepz'; did you mean 'steps'? allowed: ["),
    ('misspelled-section', ['--config', 'configs/vit_digits.py:quick', '--config.trian.steps=3'],
     "the config has no field 'trian'; did you mean 'train'?"),
    ('config-argument', ['--config', 'configs/vit_digits.py:quick,rnak=3'],
     "Unknown config argument 'rnak'; allowed: ["),
    ('flag-type', ['--config', 'configs/vit_digits.py:quick', '--config.train.steps=abc'],
     'flag --config.train.steps=abc: invalid literal'),
    ('unknown-flag', ['--bogus'], "Unknown command line flag 'bogus'"),
    ('workdir-file', ['--config', 'configs/vit_digits.py:quick', '--workdir', '{file}'],
     'is a file; allowed: a directory'),
    ('workdir-empty', ['--config', 'configs/vit_digits.py:quick', '--workdir', ''],
     '--workdir is empty; allowed: a directory path'),
    ('unknown-model', ['--config', 'configs/vit_digits.py:quick,model=mlp'],
     "Unknown model 'mlp' for task 'digits'; allowed: ['vit', 'cnn', 'resnet']"),
    ('unknown-method', ['--config', 'configs/vit_digits.py:quick', '--config.method=magic'],
     "Unknown method 'magic'; allowed: ['lora', 'full', 'head']"),
    ('unknown-variant', ['--config', 'configs/vit_digits.py:quick',
                         '--config.adapter.variant=lorra'], "Unknown variant 'lorra' for"),
    ('unknown-init', ['--config', 'configs/vit_digits.py:quick', '--config.adapter.init=svd'],
     "Unknown init 'svd' for"),
    ('rank-0', ['--config', 'configs/vit_digits.py:quick', '--config.adapter.rank=0'],
     'rank=0 for'),
    ('negative-lr', ['--config', 'configs/vit_digits.py:quick',
                     '--config.train.learning_rate=-0.003'],
     'train.learning_rate=-0.003 must be a finite number > 0'),
    ('nan-alpha', ['--config', 'configs/vit_digits.py:quick', '--config.adapter.alpha=nan'],
     'alpha=nan for'),
]


@pytest.mark.slow
@pytest.mark.parametrize('args,message', [c[1:] for c in CLI_ERRORS],
                         ids=[c[0] for c in CLI_ERRORS])
def test_cli_errors_exit_2_with_one_message_before_any_work(tmp_path, args, message):
  (tmp_path / 'f').write_text('')
  args = [a.format(file=tmp_path / 'f') for a in args]
  if '--workdir' not in args:
    args += ['--workdir', str(tmp_path / 'run')]
  t0 = time.time()
  p = _train_cli(*args, f'--config.base.dir={tmp_path / "bases"}')
  assert p.returncode == 2, p.stderr[-3000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, p.stderr[-3000:]
  assert 'Traceback' not in p.stderr, p.stderr[-3000:]
  # Found on the abstract shapes: no base was pretrained, no checkpoint written.
  assert not os.path.exists(tmp_path / 'bases')
  assert not glob.glob(str(tmp_path / 'run' / 'checkpoints' / '[0-9]*'))
  assert time.time() - t0 < 60


@pytest.mark.slow
def test_export_without_a_run_exits_2(tmp_path):
  p = _train_cli('--config', 'configs/vit_digits.py:quick', '--workdir', str(tmp_path / 'run'),
                 f'--config.base.dir={tmp_path / "bases"}', '--config.base.steps=2',
                 module='experiments.export')
  assert p.returncode == 2 and 'error: No checkpoint in' in p.stderr, p.stderr[-3000:]
  assert 'Traceback' not in p.stderr
  p = _train_cli('--config', 'configs/nope.py', module='experiments.export')
  assert p.returncode == 2 and "config file 'configs/nope.py'" in p.stderr, p.stderr[-3000:]


def test_internal_errors_are_not_user_errors():
  from experiments import cli  # pylint: disable=g-import-not-at-top
  try:
    np.zeros(3).reshape(2)   # a ValueError raised inside NumPy: a bug, not bad input
  except ValueError as e:
    assert not cli.is_user_error(e)
  try:
    train._check_rate('train.learning_rate', -1.0)
  except ValueError as e:
    assert cli.is_user_error(e)
  assert not cli.is_user_error(KeyError('x'))


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


def _saved_once(directory):
  ck = ckpt_lib.Checkpoints(directory, interval=1, max_to_keep=3)
  ck.save(1, {'w': jnp.arange(3.0)}, {'tag': 1})
  ck.wait()
  return ck


def _restores_step_1(directory):
  with ckpt_lib.Checkpoints(directory, interval=1, max_to_keep=3) as ck:
    step, restored, meta = ck.restore_latest({'w': jnp.zeros(3)})
  assert step == 1 and meta == {'tag': 1}
  np.testing.assert_array_equal(restored['w'], np.arange(3.0))


def test_disk_full_is_a_clear_error_and_the_previous_checkpoint_restores(tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  d = str(tmp_path / 'ck')
  ck = _saved_once(d)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device', os.path.join(d, '2'))
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full)
  with pytest.raises(ckpt_lib.CheckpointIOError, match=re.escape(
      f'Could not write the checkpoint of step 2 in {d}: No space left on device ({d}/2); the '
      'checkpoint of step 1 is kept and still restores')) as e:
    ck.save(2, {'w': jnp.arange(3.0) * 2}, {'tag': 2})
  assert cli.is_user_error(e.value)   # the command line prints it and exits 2
  monkeypatch.undo()
  ck.close()
  _restores_step_1(d)


@pytest.mark.slow
def test_run_stops_on_a_full_disk_and_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  real, calls = ocp.CheckpointManager.save, []

  def save(self, step, *args, **kwargs):
    calls.append(step)
    if step == 3:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  c = _config(tmp_path)
  with pytest.raises(ckpt_lib.CheckpointIOError, match='of step 3 .* No space left on device; '
                     'the checkpoint of step 2 is kept'):
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  monkeypatch.undo()
  r = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert r['resumed_from'] == 2 and r['steps'] == 3


def test_read_only_directory_is_a_clear_error(tmp_path):
  d = str(tmp_path / 'ck')
  ck = _saved_once(d)
  os.chmod(d, 0o555)
  try:
    if os.access(d, os.W_OK):
      pytest.skip('chmod does not make the directory read-only here (running as root)')
    with pytest.raises(ckpt_lib.CheckpointIOError, match=re.escape(
        f'Could not write the checkpoint of step 2 in {d}: Permission denied ({d})')):
      ck.save(2, {'w': jnp.arange(3.0) * 2}, {'tag': 2})
    ck.close()
  finally:
    os.chmod(d, 0o755)
  _restores_step_1(d)


def test_unwritable_directory_is_refused_before_orbax_writes(tmp_path, monkeypatch):
  # What a read-only directory looks like to a non-root user, also where chmod cannot show it.
  d = str(tmp_path / 'ck')
  ck = _saved_once(d)
  monkeypatch.setattr(ckpt_lib.os, 'access', lambda path, mode: path != d)
  with pytest.raises(ckpt_lib.CheckpointIOError, match=re.escape(
      f'Could not write the checkpoint of step 2 in {d}: Permission denied ({d}); the '
      'checkpoint of step 1 is kept and still restores')):
    ck.save(2, {'w': jnp.arange(3.0) * 2}, {'tag': 2})
  monkeypatch.undo()
  ck.close()
  _restores_step_1(d)


@pytest.mark.parametrize('kind', ['file', 'read-only', 'empty'])
def test_bad_workdirs_are_refused(tmp_path, monkeypatch, kind):
  if kind == 'empty':
    with pytest.raises(ValueError, match=re.escape('--workdir is empty; allowed: a directory')):
      train.check_workdir('')
    return
  if kind == 'file':
    (tmp_path / 'w').write_text('')
    with pytest.raises(ValueError, match='is a file; allowed: a directory'):
      train.check_workdir(str(tmp_path / 'w'))
    return
  monkeypatch.setattr(train.os, 'access', lambda path, mode: False)
  with pytest.raises(ValueError, match=re.escape(
      f'--workdir {tmp_path}/new/run: {tmp_path} is not writable; allowed: a directory')):
    train.check_workdir(str(tmp_path / 'new' / 'run'))


def test_unusable_checkpoint_directory_is_a_clear_error(tmp_path):
  (tmp_path / 'f').write_text('')
  with pytest.raises(ckpt_lib.CheckpointIOError, match=re.escape(
      f'Cannot use the checkpoint directory {tmp_path / "f" / "ck"}:')):
    ckpt_lib.Checkpoints(str(tmp_path / 'f' / 'ck'))


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


# Every option kind a LeafSpec holds: variant options (LoKr's factor, NOLA's bound basis salt,
# Tied-LoRA's group), init options (PiSSA's niter), a fully trained leaf, dtypes.
_SPEC_RULES = [
    (r'^a/', {'variant': 'lokr', 'rank': 2, 'factor': 4}),
    (r'^b/', {'variant': 'nola', 'rank': 2}),
    (r'^c/', {'variant': 'tied_lora', 'rank': 2, 'alpha': 3.5, 'scaling': 'rslora'}),
    (r'^d/', {'rank': 3, 'init': 'pissa_niter_2', 'dtype': 'bfloat16', 'dropout': 0.25}),
    (r'^e/', 'full'),
]


def _params():
  keys = jax.random.split(jax.random.key(0), 6)
  return {'a': {'kernel': jax.random.normal(keys[0], (8, 16))},
          'b': {'kernel': jax.random.normal(keys[1], (16, 8))},
          'c': {'kernel': jax.random.normal(keys[2], (8, 8))},
          'd': {'kernel': jax.random.normal(keys[3], (8, 12))},
          'e': {'bias': jax.random.normal(keys[4], (12,))},
          'f': {'kernel': jax.random.normal(keys[5], (12, 4))}}


def test_spec_json_round_trips_every_leaf_spec_exactly():
  params = _params()
  spec = lj.make_spec(params, _SPEC_RULES)
  specs = lj.spec.spec_leaves(spec)
  back = spec_json.specs_from_json(json.loads(json.dumps(spec_json.specs_to_json(specs))))
  assert back == specs and list(back) == list(specs)
  for path, s in specs.items():
    for f in ('shape', 'in_axes', 'out_axes', 'batch_axes', 'options', 'init_options'):
      assert type(getattr(back[path], f)) is tuple, (path, f)
    assert all(type(kv) is tuple for kv in back[path].options + back[path].init_options)
    assert hash(back[path]) == hash(s)
  assert spec_json.spec_tree(params, back) == spec
  with pytest.raises(ValueError, match='no JSON form'):
    spec_json.encode_value(np.zeros(2))
  with pytest.raises(ValueError, match='Not a LeafSpec'):
    spec_json.leaf_from_json({'variant': 'lora', 'rnak': 2})
  with pytest.raises(ValueError, match='not leaves of the parameters'):
    spec_json.spec_tree(params, {'z/kernel': specs['a/kernel']})


def test_run_checkpoint_restores_from_its_own_description(tmp_path):
  """The adapters (shared and stripped arrays, Kronecker factors, full leaves) and the initial
  adapters come back with their pytree structure and LeafSpecs from the checkpoint's
  description alone; the optimizer state from `like`."""
  params = _params()
  spec = lj.make_spec(params, _SPEC_RULES)
  changed, initial = lj.init(jax.random.key(1), params, spec)
  adapters = helpers.randomize(initial, jax.random.key(2))
  tx = optax.adam(1e-3)
  changes = train.base_changes(params, changed)
  assert list(lj.paths.flat(changes, lambda x: False)) == ['d/kernel']   # PiSSA's residual
  state = ckpt_lib.RunState(step=jnp.int32(7), rng=jax.random.key_data(jax.random.key(3)),
                            adapters=adapters, opt_state=tx.init(adapters), initial=initial,
                            spec=lj.spec.spec_leaves(spec), ranks={'c/kernel': 2},
                            base_changes=changes)
  with ckpt_lib.Checkpoints(str(tmp_path / 'ck'), interval=1) as ck:
    assert ck.restore_run() is None
    ck.save_run(7, state, {'tag': 'x'})
  with ckpt_lib.Checkpoints(str(tmp_path / 'ck')) as ck:
    meta = ck.latest_metadata()
  assert meta['schema'] == ckpt_lib.SCHEMA and meta['tag'] == 'x'
  assert meta['items'] == ['adapters', 'base_changes', 'initial', 'opt_state', 'train']
  seen = []

  def like(abstract_adapters, meta):
    seen.append(meta['ranks'])
    return {'opt_state': jax.eval_shape(tx.init, abstract_adapters)}

  with ckpt_lib.Checkpoints(str(tmp_path / 'ck')) as ck:
    step, got, meta = ck.restore_run(like)
    _, only, _ = ck.restore_run(items=('initial',))
  assert step == 7 and meta['tag'] == 'x' and seen == [{'c/kernel': 2}]
  for mine, ref in ((got.adapters, adapters), (got.initial, initial), (only.initial, initial),
                    (got.opt_state, state.opt_state), (got.base_changes, changes)):
    assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(ref)
    helpers.assert_trees_equal(mine, ref)
    for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(ref)):
      assert a.dtype == b.dtype
  assert int(got.step) == 7 and got.spec == state.spec and got.ranks == {'c/kernel': 2}
  np.testing.assert_array_equal(got.rng, state.rng)
  assert only.adapters is None and only.opt_state is None
  with ckpt_lib.Checkpoints(str(tmp_path / 'ck')) as ck:
    with pytest.raises(ValueError, match='no restore target'):
      ck.restore_run()


def test_checkpoints_close_on_every_exit_path(tmp_path):
  with pytest.raises(RuntimeError, match='boom'):
    with ckpt_lib.Checkpoints(str(tmp_path / 'ck'), interval=1) as ck:
      ck.save(1, {'w': jnp.arange(3.0)}, {'tag': 1})
      raise RuntimeError('boom')
  with ckpt_lib.Checkpoints(str(tmp_path / 'ck')) as ck:
    assert ck.steps() == [1]     # the pending save was finished on the way out
    step, got, meta = ck.restore_latest({'w': jnp.zeros(3)})
  assert step == 1 and meta == {'tag': 1}
  np.testing.assert_array_equal(got['w'], np.arange(3.0))


def test_description_round_trip_and_errors():
  q = lj.quantize({'k': jax.random.normal(jax.random.key(0), (64, 64))},
                  {'k': lj.LeafSpec('lora', rank=2, shape=(64, 64), in_axes=(0,),
                                    out_axes=(1,))})['k']
  tree = {'q': q, 'l': [jnp.zeros((2,), jnp.bfloat16), None], 't': (jnp.int32(1),)}
  built = ckpt_lib.build(json.loads(json.dumps(ckpt_lib.describe(tree))))
  assert jax.tree_util.tree_structure(built) == jax.tree_util.tree_structure(tree)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), built) == jax.tree.map(
      lambda x: (x.shape, x.dtype), tree)

  class Unknown:
    pass

  with pytest.raises(ValueError, match='Cannot describe a Unknown'):
    ckpt_lib.describe({'x': Unknown()})
  with pytest.raises(ValueError, match="node 'Nope' is not registered"):
    ckpt_lib.build({'node': 'Nope', 'data': {}, 'static': {}})


def test_workdir_lock_refuses_a_second_holder_names_its_pid_and_is_released(tmp_path):
  d = str(tmp_path / 'run')
  with workdir_lock.hold(d) as path:
    assert workdir_lock.holder(d) == os.getpid() and path == os.path.join(d, 'trainer.lock')
    # flock conflicts between open files, also of one process.
    with pytest.raises(workdir_lock.WorkdirLocked, match=f'in use by process {os.getpid()},'):
      with workdir_lock.hold(d):
        pass
  with workdir_lock.hold(d):   # released on exit
    pass


def _long_cmd(workdir, cache):
  """A run that does not end by itself in any test's time: it is stopped by a signal."""
  return _cmd(workdir, cache)[:-4] + ['--config.train.steps=100000', '--config.train.log_every=1',
                                      '--config.train.checkpoint_every=100000',
                                      '--config.base.steps=20', f'--config.base.dir={cache}']


@pytest.mark.slow
def test_second_trainer_in_a_locked_workdir_exits_2_and_sigkill_releases_the_lock(tmp_path):
  env = helpers.subprocess_env()
  dir_, cache = str(tmp_path / 'run'), str(tmp_path / 'bases')
  first = subprocess.Popen(_long_cmd(dir_, cache), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    helpers.wait_for(lambda: workdir_lock.holder(dir_) == first.pid, first, 'the lock')
    second = subprocess.run(_long_cmd(dir_, cache), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f'is in use by process {first.pid},' in second.stderr
    assert 'Traceback' not in second.stderr
    assert first.poll() is None
  finally:
    first.kill()
    first.wait(timeout=60)
  with workdir_lock.hold(dir_):   # the kernel released the killed holder's flock
    pass


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_trainer_after_its_step_with_a_checkpoint(tmp_path, sig):
  env = helpers.subprocess_env()
  dir_, cache = str(tmp_path / 'run'), str(tmp_path / 'bases')
  proc = subprocess.Popen(_long_cmd(dir_, cache), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  try:
    helpers.wait_for(lambda: helpers.has_loss(dir_), proc, 'a training step')
    proc.send_signal(sig)
    err = proc.communicate(timeout=300)[1]
  finally:
    proc.kill()
  assert proc.returncode == 128 + sig, err[-3000:]
  steps = [int(d) for d in os.listdir(os.path.join(dir_, 'checkpoints')) if d.isdigit()]
  # The interval is never reached (orbax also keeps the first step's).
  assert f'Stopped by {sig.name}; checkpoint of step {max(steps)} saved' in err
  assert 'Traceback' not in err and not os.path.exists(os.path.join(dir_, 'results.json'))
  with workdir_lock.hold(dir_):
    pass


@pytest.mark.slow
def test_a_signal_to_one_process_of_two_stops_both_after_the_same_step(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = helpers.subprocess_env(4, JAX_PLATFORMS='cpu')
  dir_, cache = str(tmp_path / 'run'), str(tmp_path / 'bases')
  procs = [subprocess.Popen(
      _long_cmd(dir_, cache) + ['--coordinator_address', f'127.0.0.1:{port}',
                                '--num_processes', '2', '--process_id', str(i)],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    helpers.wait_for(lambda: helpers.has_loss(dir_), procs[0], 'a training step')   # process 0 writes it
    procs[1].send_signal(signal.SIGTERM)     # only the other one is told
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, errs[0][-2000:] + errs[1][
      -2000:]
  saved = [re.search(r'checkpoint of step (\d+) saved', e).group(1) for e in errs]
  assert saved[0] == saved[1]
  assert int(saved[0]) == max(int(d) for d in os.listdir(os.path.join(dir_, 'checkpoints'))
                              if d.isdigit())
