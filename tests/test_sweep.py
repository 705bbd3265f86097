"""Configs and their sweeps, the sweep runner (processes, resume, failures, commands), reports."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import pytest

import lorax_jax as lj
from configs import common
from experiments import report
from experiments import sweep
from experiments import tasks
from experiments import workdir_lock
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not os.path.basename(p).startswith(('common', '__')))


def test_every_config_has_a_sweep():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {'vit_digits.py', 'cnn_digits.py', 'minilm_docstrings.py', 'decoder_lm.py'} <= names
  for path in CONFIGS:
    assert hasattr(sweep.load_module(path), 'sweep'), path


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_sweep_expands_and_every_trial_config_builds(path, monkeypatch):
  full = sweep.trials(path)
  names = [t.name for t in full]
  assert len(set(names)) == len(names) and {'full', 'head'} <= set(names)
  by = {t.name: dict(t.overrides) for t in full}
  # Every registered variant x both scaling modes, LoRA+, QLoRA and the weight-aware inits.
  for v in lj.variants.names():
    assert f'{v}_r1_ar' in names and f'{v}_r1_rs' in names, v
  assert by['lora_r1_rs']['adapter.scaling'] == 'rslora'
  assert by['lora+_r1']['train.loraplus_ratio'] == 16.0
  assert {'pissa_r1', 'olora_r1', 'loftq_r1', 'lora_ga_r1', 'qlora_r1'} <= set(names)
  ranks = sorted({int(m.group(1)) for n in names for m in [re.search(r'_r(\d+)', n)] if m})
  assert ranks[0] == 1 and ranks[-1] >= 8
  quick = sweep.trials(path, 'quick')
  lora_like = [t for t in quick if re.search(r'_r\d+$', t.name)]
  assert len({t.name.rsplit('_r', 1)[0] for t in lora_like}) >= 4
  assert len({t.name.rsplit('_r', 1)[1] for t in lora_like}) >= 3
  assert all(t.arg.startswith('quick') for t in quick)
  # Every kind of trial at its largest rank builds its spec on the model (shapes only): ranks
  # fit the layers, variant options and quantization blocks are valid.
  from experiments import train  # pylint: disable=g-import-not-at-top
  module = sweep.load_module(path)
  largest = {}
  for t in full:
    kind = t.name.rsplit('_r', 1)[0] if '_r' in t.name else t.name
    rank = int(re.search(r'_r(\d+)', t.name).group(1)) if '_r' in t.name else 0
    if rank >= largest.get(kind, (-1, None))[0]:
      largest[kind] = (rank, t)
  task = tasks.make_task(module.get_config(largest['lora'][1].arg))
  params = jax.eval_shape(task.model.init, jax.random.key(0), *task.example)
  # One model, one trace: how the model uses its kernels is the same for every trial (tracing
  # the real MiniLM once per kind of trial took most of this test's 20 s).
  traced, infer_usage = [], lj.spec.usage_lib.infer_usage

  def infer_once(*args, **kwargs):
    if not traced:
      traced.append(infer_usage(*args, **kwargs))
    return traced[0]

  monkeypatch.setattr(lj.spec.usage_lib, 'infer_usage', infer_once)
  for kind, (_, t) in largest.items():
    config = common.apply_overrides(module.get_config(t.arg), dict(t.overrides))
    spec = lj.make_spec(params, train._rules(config), fn=task.model.apply, args=task.example)
    q = train._quant_setting(config)
    if q and config.method == 'lora':
      for p, s in lj.spec.spec_leaves(spec).items():
        if s.variant != 'full':
          lj.quant.resolve_setting(lj.inits.quant_setting(dict(q), s), p, s.shape)


def _config_file(tmp_path, body):
  path = tmp_path / 'my_config.py'
  path.write_text('from configs import vit_digits\n'
                  'get_config = vit_digits.get_config\n\n'
                  'def sweep(add, arg=None):\n' + body)
  return str(path)


@pytest.mark.parametrize('body,message', [
    ("  add('a', 'rank=2')\n  add('a', 'rank=4')\n", "Two trials are named 'a'"),
    ("  add('a', 'rank=2', **{'adapter.rnak': 3})\n",
     "Unknown override key 'adapter.rnak': adapter has no field 'rnak'; did you mean 'rank'? "
     "allowed: ['alpha',"),
    ("  add('a', 'rank=2', **{'trian.steps': 3})\n",
     "the config has no field 'trian'; did you mean 'train'?"),
    ("  add('a', 'rnak=2')\n", "Unknown config argument 'rnak'"),
    ("  add('a b', 'rank=2')\n", "Trial name 'a b' must be"),
    ("  pass\n", 'declares no trials'),
])
def test_bad_sweeps_are_refused(tmp_path, body, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    sweep.trials(_config_file(tmp_path, body))


def test_apply_overrides_sets_nested_keys():
  from configs import vit_digits  # pylint: disable=g-import-not-at-top
  c = common.apply_overrides(vit_digits.get_config('quick'), {'adapter.scaling': 'rslora',
                                                              'train.steps': 7})
  assert c.adapter.scaling == 'rslora' and c.train.steps == 7


TINY = {'base.steps': 20, 'train.steps': 6, 'train.warmup_steps': 1, 'train.eval_every': 3,
        'train.checkpoint_every': 3, 'train.log_every': 2}


@pytest.mark.slow
def test_sweep_runs_records_failures_resumes_and_reports(tmp_path):
  path = _config_file(tmp_path, (
      "  add('head', 'quick,method=head')\n"
      "  add('lora_r2', 'quick,rank=2')\n"
      "  add('broken', 'quick,rank=2', **{'train.learning_rate': float('nan')})\n"))
  workdir = str(tmp_path / 'sweep')
  log = tmp_path / 'progress.txt'
  with open(log, 'w') as out:
    status = sweep.run(path, None, workdir, workers=2, extra=TINY, out=out)
  assert status == {'head': 'done', 'lora_r2': 'done', 'broken': 'failed'}
  progress = log.read_text()
  assert re.search(r'2/3 done \(0 skipped\), 0 running, 1 failed', progress), progress
  err = open(os.path.join(workdir, 'trials', 'broken', 'error.txt')).read()
  # A NaN learning rate is a user error, refused before anything runs (exit status 2).
  assert 'exit code 2' in err and 'train.learning_rate=nan must be a finite number > 0' in err
  rows = {r['name']: r for r in sweep.gather(path, None, workdir, TINY)}
  assert rows['broken']['status'] == 'failed' and rows['lora_r2']['status'] == 'done'
  r = rows['lora_r2']
  assert r['variant'] == 'lora' and r['rank'] == 2 and r['scaling'] == 'alpha/r'
  assert 0 < r['trainable_fraction'] < 0.5 and 0 <= r['final'] <= 1
  assert r['step_ms'] > 0 and r['step_memory_mib'] > 0
  with open(os.path.join(workdir, 'results.csv')) as f:
    assert [row['name'] for row in csv.DictReader(f)] == ['head', 'lora_r2', 'broken']
  assert '| lora_r2 | done | lora | lora | 2 |' in open(os.path.join(workdir, 'results.md')).read()

  # Rerun: finished trials are skipped; an interrupted one (no results.json, checkpoints kept)
  # resumes from its last checkpoint.
  os.remove(os.path.join(workdir, 'trials', 'lora_r2', 'results.json'))
  with open(os.devnull, 'w') as out:
    status = sweep.run(path, None, workdir, workers=1, only='head|lora', extra=TINY, out=out)
  assert status == {'head': 'skipped', 'lora_r2': 'done'}
  resumed = json.load(open(os.path.join(workdir, 'trials', 'lora_r2', 'results.json')))
  assert resumed['resumed_from'] == 6 and resumed['accuracy'] == r['final']

  paths = report.plot(workdir)
  assert [os.path.basename(p) for p in paths] == ['metric_vs_params.png', 'metric_vs_rank.png',
                                                  'loss_curves.png']
  assert all(os.path.getsize(p) > 10_000 for p in paths)


def _group_alive(pgid: int) -> list[int]:
  """The live processes of the process group `pgid` (Linux: from /proc): those with a thread
  that is not a zombie. (A killed multithreaded process shows its main thread as a zombie
  while other threads still exit; its files, and its locks, go with the last one.)"""
  alive = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      if int(fields[2]) != pgid:
        continue
      states = []
      for tid in os.listdir(f'/proc/{entry}/task'):
        with open(f'/proc/{entry}/task/{tid}/stat') as f:
          states.append(f.read().rsplit(')', 1)[1].split()[0])
    except OSError:
      continue
    if any(state not in 'ZX' for state in states):
      alive.append(int(entry))
  return alive


# Steps enough that no trial ends before the signal (the first loss line comes at step 1).
LONG = {'base.steps': 20, 'train.steps': 40, 'train.warmup_steps': 1, 'train.eval_every': 20,
        'train.checkpoint_every': 1000, 'train.log_every': 1}


def _sweep_cmd(path, workdir, settings, workers=1):
  return [sys.executable, '-m', 'experiments.sweep', '--config', path, '--workdir', workdir,
          f'--workers={workers}'] + [f'--set={k}={v}' for k, v in settings.items()]


needs_linux = pytest.mark.skipif(not sys.platform.startswith('linux'),
                                 reason='process groups and death signals as Linux has them')


@pytest.mark.slow
@needs_linux
def test_sigterm_of_a_sweep_stops_its_trials_with_checkpoints_and_a_rerun_resumes(tmp_path):
  # Two identical trials: 'a' is interrupted and resumed, 'b' runs uninterrupted after it.
  path = _config_file(tmp_path, "  add('a', 'quick,model=cnn')\n  add('b', 'quick,model=cnn')\n")
  workdir = str(tmp_path / 'sweep')
  tdir = os.path.join(workdir, 'trials', 'a')
  proc = subprocess.Popen(_sweep_cmd(path, workdir, LONG), cwd=ROOT, env=helpers.subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    helpers.wait_for(lambda: helpers.has_loss(tdir), proc, "trial a's first step")
    pid = workdir_lock.holder(tdir)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
  finally:
    proc.kill()
  assert proc.returncode == 1, out[-3000:]
  assert "interrupted: ['a'] (rerun the sweep to resume them)" in out
  assert '[sweep] 0/2 done (0 skipped), 0 running, 0 failed, 1 interrupted, 1 queued' in out
  assert pid and not _group_alive(pid)        # the trainer was its group's leader
  assert open(os.path.join(tdir, 'interrupted.txt')).read().startswith('exit code 143\n')
  steps = [int(d) for d in os.listdir(os.path.join(tdir, 'checkpoints')) if d.isdigit()]
  assert steps and max(steps) < 40 and not os.path.exists(os.path.join(tdir, 'results.json'))
  assert not os.path.exists(os.path.join(workdir, 'trials', 'b'))   # never started
  rows = {r['name']: r['status'] for r in sweep.gather(path, None, workdir, LONG)}
  assert rows == {'a': 'interrupted', 'b': 'pending'}

  with open(os.devnull, 'w') as devnull:
    status = sweep.run(path, None, workdir, extra=LONG, out=devnull)
  assert status == {'a': 'done', 'b': 'done'}
  assert not os.path.exists(os.path.join(tdir, 'interrupted.txt'))
  a, b = (json.load(open(os.path.join(workdir, 'trials', n, 'results.json'))) for n in 'ab')
  assert a['resumed_from'] == max(steps) and b['resumed_from'] == 0
  for key in ('accuracy', 'accuracy_pretrain_classes', 'base_accuracy'):
    assert a[key] == b[key], key
  last = lambda n: [json.loads(l) for l in open(os.path.join(workdir, 'trials', n,
                                                             'metrics.jsonl')) if '"loss"' in l]
  assert last('a')[-1] == last('b')[-1]


@pytest.mark.slow
@needs_linux
def test_sigkill_of_a_sweep_leaves_no_trainer_running(tmp_path):
  path = _config_file(tmp_path, "  add('a', 'quick,model=cnn')\n  add('b', 'quick,model=cnn')\n")
  workdir = str(tmp_path / 'sweep')
  tdirs = [os.path.join(workdir, 'trials', n) for n in 'ab']
  settings = {**LONG, 'train.steps': 100000}   # trials that never end by themselves
  proc = subprocess.Popen(_sweep_cmd(path, workdir, settings, workers=2), cwd=ROOT,
                          env=helpers.subprocess_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  pids = []
  try:
    helpers.wait_for(lambda: all(workdir_lock.holder(d) for d in tdirs), proc, 'both trainers')
    pids = [workdir_lock.holder(d) for d in tdirs]
    assert all(_group_alive(p) for p in pids)
  finally:
    proc.kill()
    proc.wait(timeout=60)
  deadline = time.time() + 30
  while any(_group_alive(p) for p in pids) and time.time() < deadline:
    time.sleep(0.05)
  assert not [_group_alive(p) for p in pids if _group_alive(p)]
  for d in tdirs:
    with workdir_lock.hold(d):   # and their workdirs are free
      pass


@pytest.mark.slow
def test_print_commands_gives_one_runnable_command_per_trial(tmp_path):
  env = helpers.subprocess_env()
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.sweep', '--config', 'configs/vit_digits.py:quick',
       '--workdir', str(tmp_path / 's'), '--print_commands', '--set', 'train.steps=5'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == len(sweep.trials('configs/vit_digits.py', 'quick'))
  assert all(l.startswith('cd ') and ' -m experiments.train ' in l and
             '--config.train.steps=5' in l for l in lines)
  assert any('--config.train.loraplus_ratio=1.0' in l and 'variant=dora,rank=4' in l
             for l in lines)


def test_report_without_results_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='results.csv does not exist'):
    report.plot(str(tmp_path))


def _cli(module, *args, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd,
                        env=helpers.subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize('args,message', [
    (['--config', 'configs/nope.py', '--workdir', '{tmp}'],
     "Config file 'configs/nope.py' does not exist; allowed: a config file"),
    (['--config', 'configs/vit_digits.py:quick', '--workdir', '{tmp}', '--set',
      'train.stepz=3'], "train has no field 'stepz'; did you mean 'steps'?"),
    (['--config', 'configs/vit_digits.py:quick', '--workdir', '{tmp}', '--only', '(lora'],
     "--only '(lora' is not a valid regex"),
    (['--config', 'configs/vit_digits.py:quick', '--workdir', '{tmp}', '--only', 'zzz'],
     "--only 'zzz' matches no trial; the sweep declares ['full', 'head', 'lora_r2'"),
    (['--config', 'configs/vit_digits.py:quick', '--workdir', '{tmp}', '--set',
      'train.steps=abc'], "Override train.steps='abc': train.steps is of type int"),
    (['--workdir', '{tmp}'], '--config and --workdir are required'),
    (['--config', 'configs/vit_digits.py:quick', '--workdir', '{file}'], 'is a file'),
], ids=['missing-config', 'misspelled-set', 'set-type', 'bad-regex', 'only-matches-nothing', 'no-config',
        'workdir-file'])
def test_sweep_argument_errors_exit_2_with_one_message(tmp_path, args, message):
  (tmp_path / 'f').write_text('')
  args = [a.format(tmp=tmp_path / 'sweep', file=tmp_path / 'f') for a in args]
  p = _cli('experiments.sweep', *args)
  assert p.returncode == 2, p.stderr
  assert message in p.stderr and 'Traceback' not in p.stderr, p.stderr
  assert not os.path.exists(tmp_path / 'sweep' / 'trials')


@pytest.mark.slow
@pytest.mark.parametrize('args,message', [
    ([], 'usage: python -m experiments.report SWEEP_DIR'),
    (['{tmp}/nope'], 'is not a directory'),
    (['{tmp}'], 'results.csv does not exist'),
])
def test_report_errors_exit_2_with_one_message(tmp_path, args, message):
  p = _cli('experiments.report', *[a.format(tmp=tmp_path) for a in args])
  assert p.returncode == 2 and message in p.stderr and 'Traceback' not in p.stderr, p.stderr
