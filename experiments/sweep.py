"""Run a config's sweep: every trial in its own process and workdir, N at a time, resumable.

    python -m experiments.sweep --config configs/vit_digits.py:quick --workdir /tmp/sweep
    python -m experiments.sweep --config configs/vit_digits.py --workdir DIR --print_commands

The config file's `sweep(add, arg)` declares the trials: `add(name, arg, **overrides)` is one
`experiments.train` run of `get_config(f'{sweep_arg},{arg}')` with dotted overrides
(`{'adapter.scaling': 'rslora'}`), in `DIR/trials/<name>`, sharing the pretrained base in
`DIR/bases` (unless the config names a base directory). Every trial config is built and checked
before anything runs: an unknown argument or override key, or two trials with one name, is an
error.

- `--workers N` runs N trials at a time (default 1); a progress line shows done / running /
  failed. A trial that fails is recorded (exit code and the end of its log in
  `DIR/trials/<name>/error.txt`) and the sweep goes on.
- Rerunning skips finished trials (their `results.json` exists) and resumes interrupted ones
  from their checkpoints.
- Every trial runs in a process group of its own. SIGTERM or SIGINT (Ctrl-C) of the sweep
  forwards SIGTERM to each running trial's group: the trainer finishes its step, saves a
  checkpoint and exits, recorded as 'interrupted' (`DIR/trials/<name>/interrupted.txt`); a
  rerun resumes them. A second signal kills the trials at once. On Linux a trial dies with the
  sweep (SIGKILL of the sweep included), and a trainer refuses a workdir another one holds.
- `--print_commands` writes one shell command per trial instead of running them, for any
  scheduler (the workers of a TPU pod slice, a SLURM array, a job queue); then
  `--gather_only` collects what they wrote.
- At the end (and with `--gather_only`) the results gather into `DIR/results.csv` and
  `DIR/results.md`: variant, rank, alpha, scaling, init, quantization, trainable parameters and
  fraction, final metrics, step time and compiled memory, and the plots of
  `python -m experiments.report DIR` are drawn.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import dataclasses
import functools
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from absl import app
from absl import flags

from experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.+=-]*$')


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  arg: str                      # the full config argument: the sweep's, then the trial's
  overrides: tuple[tuple[str, Any], ...]


def resolve(path: str) -> str:
  """A config file path as given, or relative to the repository root."""
  if not os.path.isfile(path) and os.path.isfile(os.path.join(ROOT, path)):
    return os.path.join(ROOT, path)
  if not os.path.isfile(path):
    raise ValueError(f'Config file {path!r} does not exist; allowed: a config file with '
                     'get_config(arg) and sweep(add, arg), e.g. configs/vit_digits.py:quick.')
  return os.path.abspath(path)


def load_module(path: str):
  """The config module at `path` (a file, e.g. configs/vit_digits.py)."""
  path = resolve(path)
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location(
      'sweep_config_' + re.sub(r'\W', '_', os.path.basename(path)[:-3]), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _join(*args: str | None) -> str:
  return ','.join(a for a in args if a)


def trials(config_path: str, arg: str | None = None,
           extra: dict[str, Any] | None = None) -> list[Trial]:
  """The trials `sweep(add, arg)` of the config at `config_path` declares, each checked.

  `extra` overrides (dotted keys) are added to every trial; a trial's own override of the same
  key wins.

  Raises:
    ValueError: a config without `sweep`, a trial name used twice or not a plain file name, or a
      trial whose argument or override key the config does not have.
  """
  from configs import common  # pylint: disable=g-import-not-at-top
  module = load_module(config_path)
  if not hasattr(module, 'sweep'):
    raise ValueError(f'{config_path} has no sweep(add, arg) function.')
  out: dict[str, Trial] = {}

  def add(name: str, trial_arg: str = '', **overrides):
    if not isinstance(name, str) or not _NAME.match(name):
      raise ValueError(f'Trial name {name!r} must be letters, digits and _.+=- (a directory).')
    if name in out:
      raise ValueError(f'Two trials are named {name!r}: {out[name]} and '
                       f'{Trial(name, _join(arg, trial_arg), tuple(overrides.items()))}; '
                       'trial names must be unique (they name the workdirs).')
    full = _join(arg, trial_arg)
    config = module.get_config(full)
    overrides = {**(extra or {}), **overrides}
    common.apply_overrides(config, overrides)
    out[name] = Trial(name, full, tuple(sorted(overrides.items())))

  module.sweep(add, arg)
  if not out:
    raise ValueError(f'The sweep of {config_path}:{arg or ""} declares no trials.')
  return list(out.values())


def _value(v: Any) -> str:
  if isinstance(v, (tuple, list)):
    return '(' + ','.join(_value(x) for x in v) + (',)' if len(v) == 1 else ')')
  return str(v)


def command(config_path: str, trial: Trial, workdir: str, base_dir: str | None) -> list[str]:
  """The `experiments.train` command line of one trial."""
  config_path = os.path.relpath(resolve(config_path), ROOT)   # the command runs in ROOT
  cmd = [sys.executable, '-m', 'experiments.train', '--config',
         f'{config_path}:{trial.arg}' if trial.arg else config_path,
         '--workdir', os.path.join(workdir, 'trials', trial.name)]
  if base_dir:
    cmd.append(f'--config.base.dir={base_dir}')
  cmd += [f'--config.{k}={_value(v)}' for k, v in trial.overrides]
  return cmd


def _finished(workdir: str, trial: Trial) -> bool:
  return os.path.exists(os.path.join(workdir, 'trials', trial.name, 'results.json'))


def _tail(path: str, lines: int = 20) -> str:
  try:
    with open(path, errors='replace') as f:
      return ''.join(f.readlines()[-lines:])
  except OSError:
    return ''


# Exit statuses of a trainer that a signal stopped: its own clean stop (128 + signal number,
# `experiments.stop_signals`), or the signal's default action before its handler was installed.
_STOPPED = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}


def _libc():
  """The C library (loaded in the sweep: a child between fork and exec should not dlopen)."""
  return ctypes.CDLL(ctypes.util.find_library('c') or None, use_errno=True)


_PR_SET_PDEATHSIG = 1


def _die_with_parent(libc, sweep_pid: int) -> None:
  """In a trial's process, before exec: SIGKILL when the sweep dies (Linux), so that a killed
  sweep leaves no trainer training on. The kernel delivers it whatever the trainer is doing
  (a watchdog thread polling `os.getppid()` needs a live interpreter, the GIL, and a poll
  interval, and the trainer's own code to start it). The setting survives exec; a sweep that
  died before it took effect is caught by the parent check.

  The death signal follows the sweep's thread that started the trial: `run` starts them all
  from the thread it runs in.
  """
  if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
    return   # no death signal: the sweep's own cleanup still stops its trials
  if os.getppid() != sweep_pid:
    os._exit(1)   # pylint: disable=protected-access


class _Stop:
  """The sweep's SIGTERM / SIGINT handler while it runs trials: the first signal stops starting
  trials and forwards SIGTERM to every running trial's process group (each trainer finishes its
  step, checkpoints and exits); a second one SIGKILLs them."""

  def __init__(self, running):
    self.running, self.signum, self._previous = running, None, {}
    self._termed = set()   # a trainer's second SIGTERM would stop it without a checkpoint

  def _handle(self, signum, frame):
    del frame
    again, self.signum = self.signum is not None, signum
    self.kill(signal.SIGKILL if again else signal.SIGTERM)

  def kill(self, sig) -> None:
    for proc, _ in list(self.running.values()):
      if proc.poll() is None and not (sig == signal.SIGTERM and proc.pid in self._termed):
        self._termed.add(proc.pid)
        try:
          os.killpg(proc.pid, sig)   # the trial's group: the trainer and anything it started
        except (ProcessLookupError, PermissionError):
          pass

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, signal.SIG_DFL if previous is None else previous)
    self.kill(signal.SIGKILL)   # on every way out, no trial outlives the sweep


def run(config_path: str, arg: str | None, workdir: str, workers: int = 1,
        only: str | None = None, extra: dict[str, Any] | None = None,
        out=sys.stderr) -> dict[str, str]:
  """Runs the sweep's unfinished trials, `workers` at a time; returns `{name: status}`
  (`'done'`, `'skipped'` (finished earlier), `'failed'`, `'interrupted'` (stopped by a signal,
  with a checkpoint to resume from) or `'pending'` (not started: the sweep was stopped)).

  Every trial runs in a process group of its own. SIGTERM or SIGINT of the sweep forwards
  SIGTERM to the running trials and waits for them to checkpoint and exit; a second signal
  kills them. On Linux a trial also dies with the sweep (SIGKILL of the sweep included).
  """
  if workers < 1:
    raise ValueError(f'--workers={workers} must be >= 1.')
  todo = trials(config_path, arg, extra)
  if only:
    todo = [t for t in todo if re.search(only, t.name)]
  base_dir = _base_dir(config_path, arg, workdir)
  status = {t.name: 'skipped' for t in todo if _finished(workdir, t)}
  queue = [t for t in todo if t.name not in status]
  running: dict[str, tuple[subprocess.Popen, Any]] = {}
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  total = len(todo)

  def show():
    done = sum(s in ('done', 'skipped') for s in status.values())
    failed = sum(s == 'failed' for s in status.values())
    interrupted = sum(s == 'interrupted' for s in status.values())
    print(f'[sweep] {done}/{total} done ({sum(s == "skipped" for s in status.values())} '
          f'skipped), {len(running)} running, {failed} failed, '
          + (f'{interrupted} interrupted, ' if interrupted else '') + f'{len(queue)} queued',
          file=out, flush=True)

  with _Stop(running) as stop:
    _run_trials(config_path, workdir, base_dir, queue, running, status, env, workers, show,
                stop)
  for t in queue:
    status[t.name] = 'pending'
  show()
  return status


def _run_trials(config_path, workdir, base_dir, queue, running, status, env, workers, show,
                stop):
  """`run`'s loop: starts trials while there are free workers, records them as they end."""
  changed = True
  while (queue and stop.signum is None) or running:
    while queue and len(running) < workers and stop.signum is None:
      t = queue.pop(0)
      tdir = os.path.join(workdir, 'trials', t.name)
      os.makedirs(tdir, exist_ok=True)
      for name in ('error.txt', 'interrupted.txt'):   # of an earlier run
        if os.path.exists(os.path.join(tdir, name)):
          os.remove(os.path.join(tdir, name))
      log = open(os.path.join(tdir, 'log.txt'), 'a')
      running[t.name] = (subprocess.Popen(
          command(config_path, t, workdir, base_dir), cwd=ROOT, env=env, stdout=log,
          stderr=subprocess.STDOUT, start_new_session=True,
          preexec_fn=functools.partial(_die_with_parent, _libc(), os.getpid())
          if sys.platform.startswith('linux') else None), log)
      if stop.signum is not None:   # the signal came while this trial was starting
        stop.kill(signal.SIGTERM)
    if changed:
      show()
      changed = False
    time.sleep(0.2)
    for name, (proc, log) in list(running.items()):
      if proc.poll() is None:
        continue
      log.close()
      del running[name]
      tdir = os.path.join(workdir, 'trials', name)
      if proc.returncode == 0 and os.path.exists(os.path.join(tdir, 'results.json')):
        status[name] = 'done'
      elif proc.returncode in _STOPPED or (stop.signum is not None and
                                           proc.returncode == -signal.SIGKILL):   # 2nd signal
        status[name] = 'interrupted'
        with open(os.path.join(tdir, 'interrupted.txt'), 'w') as f:
          f.write(f'exit code {proc.returncode}\n{_tail(os.path.join(tdir, "log.txt"), 3)}')
      else:
        status[name] = 'failed'
        with open(os.path.join(tdir, 'error.txt'), 'w') as f:
          f.write(f'exit code {proc.returncode}\n{_tail(os.path.join(tdir, "log.txt"))}')
      changed = True


def _base_dir(config_path, arg, workdir):
  module = load_module(config_path)
  if module.get_config(arg).get('base', {}).get('dir'):
    return None
  return os.path.join(workdir, 'bases')


COLUMNS = ('name', 'status', 'method', 'variant', 'rank', 'alpha', 'scaling', 'init', 'quant',
           'dynamics', 'loraplus_ratio', 'trainable_params', 'trainable_fraction', 'metric',
           'final', 'base', 'step_ms', 'step_memory_mib')


def gather(config_path: str, arg: str | None, workdir: str,
           extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """One row per trial from its config and `results.json` (also failed and pending ones);
  written to `DIR/results.csv` and `DIR/results.md`."""
  rows = []
  for t in trials(config_path, arg, extra):
    tdir = os.path.join(workdir, 'trials', t.name)
    cfg_path, res_path = os.path.join(tdir, 'config.json'), os.path.join(tdir, 'results.json')
    status = ('done' if os.path.exists(res_path) else
              'failed' if os.path.exists(os.path.join(tdir, 'error.txt')) else
              'interrupted' if os.path.exists(os.path.join(tdir, 'interrupted.txt')) else
              'pending')
    row = {'name': t.name, 'status': status}
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        c = json.load(f)
      a = c.get('adapter', {})
      row['method'] = c.get('method')
      if row['method'] == 'lora':   # the baselines have no adapter settings
        row.update(variant=a.get('variant'), rank=a.get('rank'), alpha=a.get('alpha'),
                   scaling=a.get('scaling'), init=a.get('init'),
                   quant=(c.get('quant') or {}).get('type') or '',
                   dynamics=(c.get('dynamics') or {}).get('name') or '',
                   loraplus_ratio=c.get('train', {}).get('loraplus_ratio'))
    if status == 'done':
      with open(res_path) as f:
        r = json.load(f)
      metric = r.get('metric')
      row.update(trainable_params=r.get('trainable_params'),
                 trainable_fraction=r.get('trainable_fraction'), metric=metric,
                 final=r.get(metric), base=r.get(f'base_{metric}'),
                 step_ms=None if r.get('step_seconds') is None else 1e3 * r['step_seconds'],
                 step_memory_mib=None if r.get('step_memory_bytes') is None else
                 r['step_memory_bytes'] / 2**20)
      for k, v in r.items():   # every other final metric
        if isinstance(v, float) and k not in row and not k.startswith(('base_', 'step_')) and (
            k not in ('trainable_fraction', 'seconds')):
          row[k] = v
    rows.append(row)
  extra = sorted({k for r in rows for k in r} - set(COLUMNS))
  cols = list(COLUMNS) + extra
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, cols)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, '') for k in cols})
  fmt = lambda v: (f'{v:.4g}' if isinstance(v, float) else ('' if v is None else str(v)))
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('| ' + ' | '.join(cols) + ' |\n|' + ' --- |' * len(cols) + '\n')
    for r in rows:
      f.write('| ' + ' | '.join(fmt(r.get(k)) for k in cols) + ' |\n')
  return rows


def _split(config: str) -> tuple[str, str | None]:
  path, _, arg = config.partition(':')
  return path, (arg or None)


def parse_sets(items: list[str]) -> dict[str, Any]:
  """`['train.steps=10', 'adapter.dropout=0.1']` -> typed overrides (int, float, bool, str)."""
  out = {}
  for item in items:
    key, eq, value = item.partition('=')
    if not eq or not key:
      raise ValueError(f'--set {item!r} must be key=value.')
    for conv in (int, float):
      try:
        out[key] = conv(value)
        break
      except ValueError:
        continue
    else:
      out[key] = {'true': True, 'false': False}.get(value.lower(), value)
  return out


def check_only(only: str | None, declared: list[Trial]) -> None:
  """Refuses an `--only` that is not a regex or matches none of the `declared` trials."""
  if not only:
    return
  try:
    pattern = re.compile(only)
  except re.error as e:
    raise cli.UserError(f'--only {only!r} is not a valid regex ({e}); allowed: a Python regex '
                        'searched in the trial names, e.g. --only "^lora_r(4|8)"') from None
  names = [t.name for t in declared]
  if not any(pattern.search(n) for n in names):
    raise cli.UserError(f'--only {only!r} matches no trial; the sweep declares '
                        f'{names[:40]}{" ..." if len(names) > 40 else ""}.')


def _define_flags():
  """The command line (defined only when run as a program, so that importing this module next to
  `experiments.train`, whose flags have the same names, works)."""
  flags.DEFINE_string('config', None, 'configs/<name>.py[:arg]: the sweep to run.')
  flags.DEFINE_string('workdir', None, 'Directory of the sweep.')
  flags.DEFINE_integer('workers', 1, 'Trials run at a time.')
  flags.DEFINE_bool('print_commands', False, 'Print one command per trial and exit.')
  flags.DEFINE_bool('gather_only', False, 'Only gather finished trials into the table.')
  flags.DEFINE_string('only', None, 'Regex: run only the trials whose name matches.')
  flags.DEFINE_multi_string('set', [], 'key=value: a dotted config override added to every '
                            'trial (e.g. --set train.steps=10); repeatable.')


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.config or not f.workdir:
    raise app.UsageError('--config and --workdir are required.')
  path, arg = _split(f.config)
  workdir = os.path.abspath(f.workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise cli.UserError(f'--workdir {f.workdir} is a file; allowed: a directory.')
  extra = parse_sets(f.set)
  check_only(f.only, trials(path, arg, extra))
  if f.print_commands:
    base_dir = _base_dir(path, arg, workdir)
    for t in trials(path, arg, extra):
      if not f.only or re.search(f.only, t.name):
        cmd = ['python'] + command(path, t, workdir, base_dir)[1:]
        print(f'cd {shlex.quote(ROOT)} && ' + ' '.join(shlex.quote(c) for c in cmd))
    return
  if not f.gather_only:
    status = run(path, arg, workdir, f.workers, f.only, extra)
  rows = gather(path, arg, workdir, extra)
  done = sum(r['status'] == 'done' for r in rows)
  print(f'{done} of {len(rows)} trials finished; table: {os.path.join(workdir, "results.md")}')
  if done:
    try:
      from experiments import report  # pylint: disable=g-import-not-at-top
      print('plots:', ' '.join(report.plot(workdir)))
    except ImportError:
      print('plots: install matplotlib (pip install "lorax_jax[report]") and run '
            f'python -m experiments.report {workdir}')
  if not f.gather_only and any(s in ('failed', 'interrupted') for s in status.values()):
    for kind, hint in (('failed', 'see trials/<name>/error.txt'),
                       ('interrupted', 'rerun the sweep to resume them')):
      names = sorted(n for n, s in status.items() if s == kind)
      if names:
        print(f'{kind}: {names} ({hint})')
    sys.exit(1)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
