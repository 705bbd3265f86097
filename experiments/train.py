"""Train one experiment: obtain the base model, adapt it, evaluate, checkpoint, resume.

    python -m experiments.train --config configs/vit_digits.py:quick --workdir /tmp/run

With no flags it runs the default config (a tiny ViT pretrained on digits 0-4, LoRA-adapted to
5-9) in $TMPDIR/lorax_jax/vit_digits.

`train_and_evaluate(config, workdir)` is the importable logic (notebooks and tests call it),
`setup` (a new or restored `Run`), `loop` (training and checkpoints) and `report` (results):
  1. the base: pretrained once on the config's pretraining classes and cached under the base
     directory (`config.base.dir`, else $LORAX_JAX_CACHE, else ~/.cache/lorax_jax/bases), keyed by
     everything that determines it, so later runs and sweeps reuse it;
  2. selection and adapters from the config (`method`: 'lora', or the 'full' and 'head' baselines;
     `adapter.init`: a weight-aware init, calibrated on the first training batches; `quant`: the
     adapted kernels' frozen base quantized after the init, e.g. NF4 for QLoRA / QPiSSA);
  3. optax training (warmup + cosine) of the adapters only, evaluated periodically;
  4. orbax checkpoints of adapters, optimizer state, step and rng that describe themselves (the
     spec, the initial adapters, the base leaves the init replaced, shapes; the schema is in
     `lorax_jax.checkpoints`); data order and dropout keys are functions of the step, so a
     killed run resumes where its last checkpoint left it, from the checkpoint alone (only the
     frozen base is obtained again), and ends with the same numbers; a NaN/inf loss stops the
     run with an error naming the step, and no checkpoint ever holds a non-finite value (the
     check runs before every save); SIGTERM or SIGINT ends the step in progress, saves a
     checkpoint and exits with status 128 + signal (`stop_signals`); one trainer at a time per
     workdir (`workdir_lock`: a second one exits with status 2, naming the holder's pid); a rerun
     of a finished run (its results.json and last-step checkpoint, same config and placement)
     returns its results and writes nothing; a resume into another config is refused naming the
     fields that differ, and so is a larger `train.steps` for a finished run (the schedule decays
     over `train.steps`: a longer run is another run, in a new workdir);
  5. metrics as JSON lines and TensorBoard events in the workdir, `results.json` at the end (the
     `base_*` metrics are the model at step 0: the base, or the residual base with its initial
     adapters, which equals it; with `quant`, the quantized model).

User errors (a missing config file, a misspelled field, an unknown model, method, variant or
init, a bad learning rate, a workdir that is a file) exit with status 2 and one `error: ...` line
(`experiments.cli`); the adapter selection is checked on the model's abstract shapes before any
base is obtained.

Placement: a device mesh from `config.mesh` (`data`, `fsdp`, `tensor`; -1 = the rest) over every
device of every process; the frozen base sharded by `config.sharding` (a preset or rules), the
adapters and optimizer state by shardings derived from it; the step is jitted with them. With
several processes (`--coordinator_address host:port --num_processes N --process_id i`, or
`--distributed` on TPU pods / SLURM), every process runs the same command: each feeds its share of
every global batch, all write the checkpoint together, and process 0 prints and writes metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Any, NamedTuple

from absl import flags
from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax

import lorax_jax as lj
from lorax_jax import checkpoints as ckpt_lib
from lorax_jax import metrics as metrics_lib
from lorax_jax import sharding as sharding_lib
from lorax_jax import spec_json

from experiments import cli
from experiments import stop_signals
from experiments import tasks
from experiments import workdir_lock

METHODS = ('lora', 'full', 'head')

_CONFIG = cli.define_config_file(
    'config', os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'configs', 'vit_digits.py'), 'Experiment config file (`file.py:arg`).')
_WORKDIR = flags.DEFINE_string(
    'workdir', os.path.join(tempfile.gettempdir(), 'lorax_jax', 'vit_digits'),
    'Directory for checkpoints and metrics; rerunning with the same one resumes.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
    'host:port of process 0, when this is one of several processes (GPU clusters; TPU pods and '
    'SLURM are detected without it: pass --distributed).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', int(os.environ['JAX_NUM_PROCESSES']) if os.environ.get(
        'JAX_NUM_PROCESSES') else None, 'Number of processes (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', int(os.environ['JAX_PROCESS_ID']) if os.environ.get('JAX_PROCESS_ID') else None,
    'This process\'s index (with --coordinator_address).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() with auto-detection (TPU pods, '
    'SLURM, Open MPI).')


def _check(config) -> lj.dynamics.Dynamics | None:
  """Validates `config`; returns its dynamics (built here, so bad settings fail first)."""
  if config.method not in METHODS:
    raise ValueError(f'Unknown method {config.method!r}; allowed: {list(METHODS)}.')
  for name in ('steps', 'eval_every', 'checkpoint_every', 'log_every', 'max_to_keep'):
    if name in config.train and config.train[name] <= 0:
      raise ValueError(f'train.{name}={config.train[name]} must be > 0.')
  if config.get('data') and config.data.get('batch_size', 1) <= 0:
    raise ValueError(f'data.batch_size={config.data.batch_size} must be > 0.')
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f'seed={config.seed!r} must be an int >= 0.')
  _check_rate('train.learning_rate', config.train.learning_rate)
  if not 0 <= config.train.warmup_steps < config.train.steps:
    raise ValueError(f'train.warmup_steps={config.train.warmup_steps} must be in '
                     f'[0, train.steps={config.train.steps}).')
  dyn = make_dynamics(config)   # its settings are checked here, before anything runs
  if dyn is not None and config.method != 'lora':
    raise ValueError(f'dynamics {dyn.name!r} needs method=\'lora\'; got {config.method!r}.')
  if dyn is not None and config.get('adapter') and not config.get('rules'):
    variant = lj.dynamics.default_variant(dyn.name)   # what the method declares
    if config.adapter.variant != variant:
      raise ValueError(f'dynamics {dyn.name!r} trains variant {variant!r}; the config has '
                       f'adapter.variant={config.adapter.variant!r}.')
    dyn.check_rank(config.adapter.rank, None)
  return dyn


def _check_rate(name: str, value) -> None:
  """Refuses a learning rate `value` of config field `name` that is not a finite number > 0."""
  if callable(value):
    raise ValueError(f'{name}={value!r} must be a number; got a {type(value).__name__}.')
  lj.dynamics.base.check_learning_rate(name, value)


def check_workdir(workdir: str) -> None:
  """Refuses a `workdir` that is a file, or a directory (or its nearest existing parent) that
  is not writable, before anything runs."""
  if not workdir:
    raise ValueError('--workdir is empty; allowed: a directory path (new or existing).')
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'--workdir {workdir} is a file; allowed: a directory (new or existing).')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f'--workdir {workdir}: {existing} is a file, not a directory.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir {workdir}: {existing} is not writable; allowed: a directory '
                     'this user can write.')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--workdir {workdir} cannot be created: {e.strerror or e}.') from None


def _host(x) -> float:
  """A replicated scalar's value (also when it spans other processes' devices)."""
  if not x.is_fully_addressable:
    x = x.addressable_data(0)
  return float(np.asarray(x))


def _math_config(config) -> dict[str, Any]:
  """The config without placement (mesh, sharding): a checkpoint restores across layouts."""
  d = config.to_dict()
  d.pop('mesh', None)
  d.pop('sharding', None)
  return d


def _memory(compiled) -> dict[str, Any]:
  """XLA's compiled memory (bytes per device) and FLOP count of the train step."""
  m = compiled.memory_analysis()
  get = lambda f: int(getattr(m, f, 0) or 0)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(step_temp_bytes=get('temp_size_in_bytes'),
              step_memory_bytes=get('argument_size_in_bytes') + get('output_size_in_bytes') +
              get('temp_size_in_bytes') - get('alias_size_in_bytes'),
              step_flops=float((cost or {}).get('flops', 0.0)))


def _sharding_rules(config):
  s = config.get('sharding')
  if not s:
    return sharding_lib.preset('fsdp')
  if s.get('rules'):
    return [(pattern, jax.sharding.PartitionSpec(*axes)) for pattern, axes in s.rules]
  return sharding_lib.preset(s.preset)


def _digest(obj) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_dir(config) -> str:
  return (config.base.dir or os.environ.get('LORAX_JAX_CACHE') or
          os.path.join(os.path.expanduser('~'), '.cache', 'lorax_jax', 'bases'))


def obtain_base(config, task: tasks.Task):
  """The base parameters: loaded (`task.load_base`), or pretrained once and cached.

  Returns:
    `(params, cache_path_or_source, pretrained_now)`.
  """
  params = task.model.init(jax.random.key(config.seed), *task.example)
  identity = dict(task=config.task, model=config.model.to_dict(), data=task.identity,
                  base=dict(steps=config.base.steps, learning_rate=config.base.learning_rate,
                            batch_size=config.data.batch_size), seed=config.seed)
  if task.load_base is not None:
    return task.load_base(params), f'{config.task}-{_digest(identity)}', False
  path = os.path.join(base_dir(config), f'{config.model.name}-{_digest(identity)}.msgpack')
  if os.path.exists(path):
    with open(path, 'rb') as f:
      try:
        return flax.serialization.from_bytes(params, f.read()), path, False
      except (ValueError, KeyError) as e:
        raise ValueError(f'Cached base {path} does not fit the model: {e}') from None
  if config.base.steps:   # pretrained here (a loaded base has no use for a learning rate)
    _check_rate('base.learning_rate', config.base.learning_rate)
  tx = optax.adam(config.base.learning_rate)

  @jax.jit
  def step(p, s, inputs, targets):
    loss, g = jax.value_and_grad(lambda p: task.loss(task.model.apply(p, *inputs), targets))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  opt_state = tx.init(params)
  for i in range(config.base.steps):
    params, opt_state, _ = step(params, opt_state, *task.pretrain_batch(i))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(flax.serialization.to_bytes(params))
  os.replace(tmp, path)
  return params, path, True


def _rules(config):
  """The selection rules: `config.rules` if the config gives them, else from `method`."""
  if config.get('rules'):
    return [(pattern, setting.to_dict() if hasattr(setting, 'to_dict') else setting)
            for pattern, setting in config.rules]
  if config.method == 'full':
    return [('.*', 'full')]
  if config.method == 'head':
    return [(r'(^|/)head/', 'full')]
  a = config.adapter
  init_options = a.init_options.to_dict() if a.get('init_options') else {}
  if _quantizing_init(config) and _quant_setting(config):
    init_options['quant'] = _quant_setting(config)   # the init quantizes the base (LoftQ)
  return [(r'(^|/)head/', 'full')] + lj.dense_kernels(
      variant=a.variant, rank=a.rank, alpha=a.alpha, scaling=a.scaling, dropout=a.dropout,
      init=a.get('init', 'kaiming'), init_options=init_options,
      **(a.options.to_dict() if a.get('options') else {}))


def check_selection(config, task: tasks.Task, dyn: lj.dynamics.Dynamics | None = None):
  """The spec of `config`'s selection on the model's abstract parameters (`jax.eval_shape` of
  its init: nothing is computed), so that an unknown variant or init, a bad rank or bad options
  are refused in a second, before any base is pretrained or loaded.

  Raises:
    ValueError: for a selection `make_spec` (or the dynamics method) refuses.
  """
  abstract = jax.eval_shape(task.model.init, jax.random.key(config.seed), *task.example)
  spec = lj.make_spec(abstract, _rules(config), fn=task.model.apply, args=task.example)
  if dyn is not None:
    dyn.check(spec, abstract)
  return spec


def _quantizing_init(config) -> bool:
  """Whether the config's init quantizes the base itself (it takes a `quant` option: LoftQ)."""
  init = config.adapter.get('init', 'kaiming') if config.get('adapter') else 'kaiming'
  got = lj.inits.resolve(init)   # None for an unknown name: make_spec reports it
  return got is not None and 'quant' in lj.inits.get(got[0]).options


def _quant_setting(config) -> dict[str, Any] | None:
  """The base's quantization setting from `config.quant` (None: a float base)."""
  q = config.get('quant')
  if not q or not q.get('type'):
    return None
  if q.type == 'int8':
    return {'type': 'int8'}
  return {'type': q.type, 'block_size': q.block_size, 'double_quant': q.double_quant}


def _select_and_init(config, task: tasks.Task, params):
  """Selection, init and calibration: `(spec, params, adapters)`, `params` with the leaves a
  weight-aware init replaced (the residual, LoftQ's quantized W)."""
  model = task.model
  spec = lj.make_spec(params, _rules(config), fn=model.apply, args=task.example)

  def calibration_loss(p, batch):
    inputs, targets = batch
    return task.loss(model.apply(p, *inputs), targets)

  params, adapters = lj.init(
      jax.random.fold_in(jax.random.key(config.seed), 1), params, spec, fn=calibration_loss,
      batches=(task.train_batch(i) for i in range(10**9)),
      num_batches=config.adapter.get('calibration_batches', 8) if config.get('adapter') else 8)
  return spec, params, adapters


def _quantize_base(config, params, spec):
  """QLoRA: the adapted kernels' base (a residual after PiSSA-like inits: QPiSSA) quantized."""
  quant = _quant_setting(config)
  if quant and config.method == 'lora' and not _quantizing_init(config):
    params = lj.quantize(params, spec, **quant)
  return params


def adapt(config, task: tasks.Task, params):
  """The spec and initial adapters of `config` on the base `params`: `(spec, params, adapters)`,
  with `params` changed where a weight-aware init gives a residual and quantized for QLoRA."""
  spec, params, adapters = _select_and_init(config, task, params)
  return spec, _quantize_base(config, params, spec), adapters


def base_changes(base, params) -> dict[str, Any]:
  """The leaves of `params` that are not those of `base` (what an init replaced), nested."""
  flat = dict((p, x) for p, _, x in lj.paths.leaves_with_paths(base))
  return lj.paths.nest({keys: x for p, keys, x in lj.paths.leaves_with_paths(params)
                        if x is not flat[p]})


def rebuild_base(config, base, spec, changes):
  """The base a run trains on, from the obtained `base` and the checkpoint's spec and base
  changes: the init's replaced leaves put back, then quantized as `adapt` does."""
  flat = lj.paths.flat(changes, is_leaf=lj.quant.is_quantized) if changes else {}
  params = jax.tree_util.tree_map_with_path(
      lambda kp, x: flat.get(lj.paths.path_str(kp), x), base, is_leaf=lj.quant.is_quantized)
  return _quantize_base(config, params, spec)


def restore_setup(config, base, ckpts: ckpt_lib.Checkpoints, sharding=None):
  """`(spec, params, initial, changes)` of a run from its checkpoint: the spec (a tree over
  `base`), the base it trains on, the initial adapters and the init's base changes, without
  re-running selection, inits or calibration.

  Raises:
    ValueError: if no checkpoint of the run restores.
  """
  restored = ckpts.restore_run(sharding=sharding, items=('initial', 'base_changes'))
  if restored is None:
    raise ValueError(f'No checkpoint in {ckpts.directory}: train first '
                     '(python -m experiments.train --config ... --workdir ...).')
  _, run, _ = restored
  spec = spec_json.spec_tree(base, run.spec)
  return spec, rebuild_base(config, base, spec, run.base_changes), run.initial, run.base_changes


def _base_schedule(config) -> optax.Schedule:
  t = config.train
  return optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, t.steps,
                                            end_value=0.1 * t.learning_rate)


def make_dynamics(config) -> lj.dynamics.Dynamics | None:
  """The training-time method of `config.dynamics` (`name` and the factory's options; the
  run's length, learning-rate schedule and seed are filled in), or None.

  Raises:
    ValueError: for an unknown method or bad settings (a target budget above the initial rank,
      a restart period of 0, a schedule that ends after training...).
  """
  d = config.get('dynamics')
  if not d or not d.get('name'):
    return None
  options = {k: v for k, v in d.to_dict().items() if k != 'name'}
  return lj.dynamics.get(d.name, total_steps=config.train.steps,
                         learning_rate=_base_schedule(config), seed=config.seed, **options)


def make_schedule(config, dyn: lj.dynamics.Dynamics | None = None) -> optax.Schedule:
  """Warmup + cosine decay (to 10%), reshaped by the dynamics that need it (ReLoRA's jagged
  restarts); `dyn` is the config's, built if not given."""
  schedule = _base_schedule(config)
  dyn = dyn if dyn is not None else make_dynamics(config)
  if dyn is not None and dyn.learning_rate is not None:
    schedule = dyn.learning_rate(schedule)
  return schedule


def make_optimizer(config, schedule: optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
  """Warmup + cosine AdamW (LoRA+ ratio for `method='lora'`) of `config.train`; `schedule` is
  `make_schedule(config)`, built if not given."""
  t = config.train
  ratio = t.loraplus_ratio if config.method == 'lora' else 1.0
  return lj.optimizer(schedule or make_schedule(config), loraplus_ratio=ratio,
                      weight_decay=t.weight_decay)


def _flat_config(config) -> dict[str, Any]:
  """`{'train.steps': 600, ...}`: the math config's fields as JSON values, dotted keys."""
  out = {}

  def walk(prefix, d):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(f'{prefix}{k}.', v)
      else:
        out[f'{prefix}{k}'] = json.loads(json.dumps(v, default=str))
  walk('', _math_config(config))
  return out


def checkpoint_metadata(config, base_path: str) -> dict[str, Any]:
  """What a checkpoint records to refuse restoring into another config or base (the digest
  decides; the fields name what differs)."""
  return dict(config=_digest(_math_config(config)), base=os.path.basename(base_path),
              method=config.method, fields=_flat_config(config))


def check_metadata(meta: dict[str, Any] | None, want: dict[str, Any], directory: str,
                   hint: str = 'Use a new workdir.') -> None:
  """Refuses a checkpoint (metadata `meta`, None: none) of another config or base, naming the
  config fields that differ (`train.steps: 3 in the checkpoint, 5 now`)."""
  if meta is None or (meta.get('config') == want['config'] and
                      meta.get('base') == want['base']):
    return
  diffs = []
  if meta.get('base') != want['base']:
    diffs.append(f'base: {meta.get("base")!r} in the checkpoint, {want["base"]!r} now')
  old, new = meta.get('fields'), want.get('fields') or {}
  if old is not None:
    diffs += [f'{k}: {old.get(k, "(absent)")!r} in the checkpoint, {new.get(k, "(absent)")!r} now'
              for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  elif meta.get('config') != want['config']:
    diffs.append(f'config digest {meta.get("config")} in the checkpoint, {want["config"]} now '
                 '(a checkpoint of an older version: it does not record its fields)')
  raise ValueError(f'The checkpoint in {directory} was written by another config or base; '
                   f'differences: {"; ".join(diffs) or "none recorded"}. {hint}')


def resized_ranks(adapters, spec) -> dict[str, int]:
  """`{path: rank}` of the adapters a dynamics really resized (SoRA's pruning); checkpoint
  metadata (the stored adapter description already has the resized shapes)."""
  specs = lj.spec.spec_leaves(spec)
  return {p: a.spec.rank for p, a in lj.paths.flat(adapters, lj.adapters.is_adapter).items()
          if not isinstance(a, lj.FullParams) and a.spec.rank != specs[p].rank}


def _update_rank(initial, params, adapters) -> float | None:
  """Mean numerical rank of the adapted matrices' total update (None across processes)."""
  leaves = jax.tree_util.tree_leaves((initial, params, adapters))
  if not all(getattr(x, 'is_fully_addressable', True) for x in leaves):
    return None
  ranks = lj.dynamics.update_ranks(initial, params, adapters)
  flat = [r for v in ranks.values() for r in (v if isinstance(v, list) else [v])]
  return float(np.mean(flat)) if flat else None



@dataclasses.dataclass
class Run:
  """A run's setup (`setup`): the model, its placement, the step's pieces, the restored state.

  `state` is the `TrainState` the loop starts from (at step `start`); `initial` the initial
  adapters and `changes` the base leaves the init replaced, both as the checkpoint keeps them.
  """
  config: Any
  task: tasks.Task
  dyn: lj.dynamics.Dynamics | None
  spec: Any
  initial: Any
  changes: Any
  mesh: Any
  base_sh: Any
  replicated: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  apply: Any
  metric: Any
  eval_sets: dict[str, Any]
  metadata: dict[str, Any]
  rng: Any
  start: int
  state: lj.TrainState
  state_sh: sharding_lib.TrainShardings
  writer: metrics_lib.MetricWriter
  start_metrics: dict[str, float]
  initial_base: Any
  n_trainable: int
  n_total: int
  pretrained_now: bool
  t_start: float

  @property
  def first(self) -> str:
    return next(iter(self.eval_sets))

  @property
  def changes_base(self) -> bool:
    return self.dyn is not None and self.dyn.changes_base

  def evaluate(self, p, a) -> dict[str, float]:
    return {k: _host(self.metric(p, a, *v)) for k, v in self.eval_sets.items()}

  def shardings_of(self, adapters, params) -> sharding_lib.TrainShardings:
    """The step's shardings: adapters, optimizer state and statistics derived from the base's."""
    return lj.training.state_shardings(self.tx, params, adapters, self.base_sh,
                                       self.task.train_batch(0), self.mesh, self.dyn)

  def build_step(self, state_sh):
    task, apply = self.task, self.apply

    def loss_fn(joined, batch, rng):
      inputs, targets = batch
      return task.loss(apply(joined, *inputs, lora_rng=rng), targets)

    return lj.make_train_step(loss_fn, self.tx, self.dyn, shardings=state_sh)

  def run_state(self, state: lj.TrainState) -> ckpt_lib.RunState:
    """What the checkpoint of `state` holds (`lorax_jax.checkpoints` has the schema)."""
    return ckpt_lib.RunState(
        step=state.step, rng=self.rng, adapters=state.adapters, opt_state=state.opt_state,
        initial=self.initial, spec=lj.spec.spec_leaves(self.spec),
        ranks=resized_ranks(state.adapters, self.spec), stats=state.stats,
        params=state.params if self.changes_base else None, base_changes=self.changes)


def setup(config, workdir: str, ckpts: ckpt_lib.Checkpoints,
          dyn: lj.dynamics.Dynamics | None = None) -> Run:
  """The run of `config` in `workdir`, ready to train: a new one (selection, inits and
  calibration), or the one `ckpts` holds, restored from the checkpoint alone (its spec, initial
  adapters, base changes and stored shapes; only the frozen base is obtained again).

  Raises:
    ValueError: for a bad config, or a checkpoint of another config or base, or one that does
      not fit the model.
  """
  dyn = dyn if dyn is not None else _check(config)
  task = tasks.make_task(config)
  model = task.model
  t_start = time.time()
  meta = ckpts.latest_metadata()
  if meta is None:   # a new run: its selection is checked before any base is obtained
    check_selection(config, task, dyn)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  base, base_path, pretrained_now = obtain_base(config, task)
  metadata = checkpoint_metadata(config, base_path)
  check_metadata(meta, metadata, ckpts.directory)
  mesh = sharding_lib.make_mesh(config.get('mesh') or {})
  replicated = sharding_lib.replicated(mesh)
  if meta is None:
    spec, params, initial = _select_and_init(config, task, base)
    changes = base_changes(base, params)
    params = _quantize_base(config, params, spec)
    # Kept in every checkpoint (replicated: every process holds the same values).
    initial, changes = (sharding_lib.place(t, jax.tree_util.tree_map(lambda _: replicated, t))
                        for t in (initial, changes))
  else:
    spec, params, initial, changes = restore_setup(config, base, ckpts, replicated)
  if dyn is not None:
    dyn.check(spec, params)
  n_trainable = lj.count_params(initial)
  n_total = sum(int(np.prod(np.shape(l))) for _, _, l in lj.paths.leaves_with_paths(params))
  changes_base = dyn is not None and dyn.changes_base
  # The base before training, for the rank of the whole update of methods that change it.
  initial_base = jax.device_get(params) if changes_base else None

  # Placement: the frozen base by the config's rules, adapters and optimizer state derived.
  base_sh = sharding_lib.param_shardings(params, mesh, _sharding_rules(config))
  params = sharding_lib.place(params, base_sh)

  apply = lj.lora(model.apply)
  schedule = make_schedule(config, dyn)
  tx = make_optimizer(config, schedule)
  metric = jax.jit(lambda p, a, inputs, targets: task.metric(
      apply(lj.join(p, a), *inputs), targets), out_shardings=replicated)
  eval_sets = {k: sharding_lib.place(v, jax.tree_util.tree_map(lambda _: replicated, v))
               for k, v in task.eval_sets.items()}
  rng = sharding_lib.place(jax.random.key_data(jax.random.key(config.seed)), replicated)
  run = Run(config=config, task=task, dyn=dyn, spec=spec, initial=initial, changes=changes,
            mesh=mesh, base_sh=base_sh, replicated=replicated, tx=tx, schedule=schedule,
            apply=apply, metric=metric, eval_sets=eval_sets,
            metadata=metadata, rng=rng, start=0, state=None, state_sh=None, writer=None,
            start_metrics={}, initial_base=initial_base, n_trainable=n_trainable,
            n_total=n_total, pretrained_now=pretrained_now, t_start=t_start)
  # The model at step 0 (the base, or the residual base plus the initial adapters of a
  # weight-aware init, which equals it; a quantized base as quantized).
  run.start_metrics = run.evaluate(params, sharding_lib.place(
      initial, sharding_lib.adapter_shardings(initial, base_sh)))
  run.state, run.state_sh, run.start = _start_state(run, ckpts, params)
  run.writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0,
                                        resume_step=run.start)
  return run


def _start_state(run: Run, ckpts: ckpt_lib.Checkpoints, params):
  """`(state, state_sh, start)`: the checkpoint's state, restored into targets built from its
  stored adapter shapes, or a new one at step 0 from the initial adapters."""
  tx, dyn = run.tx, run.dyn

  def like(adapters, _):
    """Restore targets from the stored adapter shapes (resized ones included)."""
    sh = run.shardings_of(adapters, params)
    targets = {'adapters': ckpt_lib.with_shardings(adapters, sh.adapters),
               'opt_state': ckpt_lib.with_shardings(jax.eval_shape(tx.init, adapters),
                                                    sh.opt_state),
               'params': ckpt_lib.abstract(params)}
    if dyn is not None:
      targets['stats'] = ckpt_lib.with_shardings(jax.eval_shape(dyn.init, params, adapters),
                                                 sh.stats)
    return targets

  restored = ckpts.restore_run(like, sharding=run.replicated,
                               items=('train', 'adapters', 'opt_state', 'stats', 'params'))
  if restored is None:
    state_sh = run.shardings_of(run.initial, params)
    # From host values: the step donates its state, and `initial` is kept.
    adapters = sharding_lib.place(jax.device_get(run.initial), state_sh.adapters)
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(adapters)
    stats = (jax.jit(dyn.init, out_shardings=state_sh.stats)(params, adapters)
             if dyn is not None else ())
    step = sharding_lib.place(np.int32(0), run.replicated)
    return lj.TrainState(step, params, adapters, opt_state, stats), state_sh, 0
  start, got, _ = restored
  logging.info('Resuming from step %d.', start)
  state = lj.TrainState(
      sharding_lib.place(np.int32(start), run.replicated),
      got.params if got.params is not None else params, got.adapters, got.opt_state, got.stats)
  return state, run.shardings_of(got.adapters, params), start


def _stop_requested(stop: stop_signals.StopRequests | None) -> int | None:
  """The signal `stop` recorded, agreed by every process (a signal may reach them during
  different steps; all must stop after the same one, since they save it together)."""
  requested = None if stop is None else stop.requested
  if jax.process_count() == 1:
    return requested
  return int(np.max(multihost_utils.process_allgather(np.int32(requested or 0)))) or None


def _kept(ckpts: ckpt_lib.Checkpoints) -> str:
  """What a stopped run leaves: its last good checkpoint, or that it has none."""
  try:
    ckpts.wait()
  except ckpt_lib.CheckpointIOError as e:   # the stop's own error is the one to report
    logging.warning('%s', e)
  steps = ckpts.steps()
  if not steps:
    return f'No checkpoint was written (none in {ckpts.directory}).'
  return f'The last good checkpoint (step {steps[-1]}) is kept in {ckpts.directory}.'


class Trained(NamedTuple):
  """What `loop` gives `report`: the final state and the loop's own figures."""
  state: lj.TrainState
  step_times: list[float]
  reshaped_at: list[int]
  step_memory: dict[str, Any]


def loop(run: Run, ckpts: ckpt_lib.Checkpoints,
         stop: stop_signals.StopRequests | None = None) -> Trained:
  """Trains `run` from its start to `config.train.steps`, checkpointing into `ckpts`; when
  `stop` records a signal, the step in progress ends with a checkpoint and the run stops.

  Raises:
    stop_signals.Interrupted: after the checkpoint of a stop `stop` recorded.
    ValueError: for a loss or adapters that become NaN or infinite (the message names the step;
      the last good checkpoint is kept).
  """
  t, dyn, tx, schedule = run.config.train, run.dyn, run.tx, run.schedule
  task, mesh, writer, first = run.task, run.mesh, run.writer, run.first
  metric, eval_sets = run.metric, run.eval_sets
  key = jax.random.key(run.config.seed)
  all_finite = jax.jit(lambda tree: jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(l)) for l in jax.tree_util.tree_leaves(tree)])),
                       out_shardings=run.replicated)
  progress = metrics_lib.Progress(t.steps, run.start, enabled=jax.process_index() == 0)
  state, state_sh = run.state, run.state_sh
  step_fn = run.build_step(state_sh)
  step_times = []
  reshaped_at = []
  step_memory = {}
  compiled = None
  for step in range(run.start, t.steps):
    t0 = time.time()
    batch = sharding_lib.global_batch(sharding_lib.process_rows(task.train_batch(step)), mesh)
    rng = jax.random.fold_in(key, step)
    if compiled is None:   # compiled once (again only when a dynamics changes shapes)
      compiled = step_fn.lower(state, batch, rng).compile()
      if not step_times and not reshaped_at:
        step_memory = _memory(compiled)   # XLA's memory figures go to results.json
    state, loss = compiled(*state, batch, rng)
    loss = _host(loss)
    if not np.isfinite(loss):
      raise ValueError(f'Loss became {loss} at step {step + 1}; training stopped. '
                       f'{_kept(ckpts)}')
    done = step + 1
    state, reshaped = lj.dynamics.apply_schedule(dyn, done, state, tx)
    step_times.append(time.time() - t0)   # the step and the method's schedule
    if reshaped:
      # New shapes (SoRA's pruning): re-derive shardings, place, and recompile the step.
      state_sh = run.shardings_of(state.adapters, state.params)
      state = state._replace(
          adapters=sharding_lib.place(state.adapters, state_sh.adapters),
          opt_state=sharding_lib.place(state.opt_state, state_sh.opt_state),
          stats=sharding_lib.place(state.stats, state_sh.stats))
      step_fn, compiled = run.build_step(state_sh), None
      reshaped_at.append(done)
      logging.info('Step %d: %s changed the adapter shapes (%s); the step recompiles.', done,
                   dyn.name, resized_ranks(state.adapters, run.spec))
      writer.write(done, {'recompiled': 1.0,
                          'trainable_params': float(lj.count_params(state.adapters))})
    if done % t.log_every == 0 or done == t.steps:
      writer.write(done, {'loss': loss, 'learning_rate': float(schedule(step))})
      progress.update(done, loss=loss)
    if done % t.eval_every == 0 or done == t.steps:
      writer.write(done, {first: _host(metric(state.params, state.adapters,
                                              *eval_sets[first]))})
    final = done == t.steps
    requested = None if final else _stop_requested(stop)
    stopping = requested is not None
    # Before every save (orbax's first one included): no checkpoint holds a non-finite value.
    if (final or stopping or ckpts.should_save(done)) and not _host(all_finite(state.adapters)):
      raise ValueError(f'Adapters became NaN or infinite at step {done}; training stopped. '
                       f'{_kept(ckpts)}')
    ckpts.save_run(done, run.run_state(state), run.metadata, force=final or stopping)
    if stopping:
      raise stop_signals.Interrupted(requested, done, ckpts.directory)
  progress.close()
  if not step_memory:   # resumed at the end (killed before results.json): compiled for them
    batch = sharding_lib.global_batch(sharding_lib.process_rows(task.train_batch(run.start)),
                                      mesh)
    step_memory = _memory(step_fn.lower(state, batch, jax.random.fold_in(key, run.start))
                          .compile())
  return Trained(state, step_times, reshaped_at, step_memory)


def report(run: Run, trained: Trained, workdir: str) -> dict[str, Any]:
  """The results of a trained run (also written to WORKDIR/results.json by process 0)."""
  config, dyn, first = run.config, run.dyn, run.first
  state, step_times = trained.state, trained.step_times
  params, adapters = state.params, state.adapters
  extra = {}
  if dyn is not None:
    extra['dynamics'] = dyn.name
    extra.update(dyn.report(state))
    extra['trainable_params_final'] = lj.count_params(adapters)
    extra['reshaped_at'] = trained.reshaped_at
    for view, by_label in dyn.views(adapters).items():   # DyLoRA: the metric at every rank
      extra[f'{first}_{view}'] = {label: _host(run.metric(params, a, *run.eval_sets[first]))
                                  for label, a in by_label.items()}
  if config.method == 'lora':
    extra['effective_rank'] = _update_rank(
        run.initial_base if run.changes_base else params, params, adapters)
  results = dict(
      task=config.task, method=config.method, model=config.model.name, metric=first,
      **{f'base_{k}': v for k, v in run.start_metrics.items()},
      **run.evaluate(params, adapters),
      trainable_params=run.n_trainable, total_params=run.n_total,
      trainable_fraction=run.n_trainable / run.n_total, steps=config.train.steps,
      resumed_from=run.start, base_pretrained_now=run.pretrained_now,
      step_seconds=float(np.median(step_times)) if step_times else None,
      **trained.step_memory, **extra, config_digest=_digest(config.to_dict()),
      seconds=time.time() - run.t_start)
  if not run.writer.has(config.train.steps, f'final_{first}'):   # once, also after a resume
    run.writer.write(config.train.steps, {f'final_{first}': results[first]})
  run.writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
  return results


def finished_results(config, workdir: str, ckpts: ckpt_lib.Checkpoints
                     ) -> dict[str, Any] | None:
  """The results of `workdir` if it holds a finished run of exactly `config` (its
  results.json, of the same config and placement, and its checkpoint of the last step), else
  None: a run with no results (killed before writing them), with its last checkpoint lost, or
  asked for on another mesh or sharding resumes at its last checkpoint instead."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path) or max(ckpts.steps(), default=None) != config.train.steps:
    return None
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None   # cut short: the run resumes at its last checkpoint and writes it again
  if results.get('config_digest') != _digest(config.to_dict()):
    return None   # another config (setup refuses it, naming what differs) or placement
  return results


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the experiment described by `config` in `workdir`; returns its results.

  Raises:
    ValueError: for a bad config, a checkpoint that does not fit the model, or a loss that
      becomes NaN or infinite (the message names the step; the last good checkpoint is kept).
    workdir_lock.WorkdirLocked: if another trainer runs in `workdir` (it names the pid).
    stop_signals.Interrupted: on SIGTERM / SIGINT, after the step in progress and a checkpoint.
  """
  dyn = _check(config)
  check_workdir(workdir)
  # One trainer per workdir (process 0 locks for all processes of a multi-process run).
  lock = workdir_lock.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, stop_signals.StopRequests() as stop, ckpt_lib.Checkpoints(
      os.path.join(workdir, 'checkpoints'), config.train.checkpoint_every,
      config.train.max_to_keep) as ckpts:
    finished = finished_results(config, workdir, ckpts)
    if finished is not None:
      return finished
    run = setup(config, workdir, ckpts, dyn)
    trained = loop(run, ckpts, stop)
    return report(run, trained, workdir)


def summary(results: dict[str, Any]) -> str:
  r = results
  lines = [f'{r["task"]} / {r["model"]} / {r["method"]}: {r["steps"]} adaptation steps']
  names = [k[len('base_'):] for k in r if k.startswith('base_') and k != 'base_pretrained_now']
  for name in names:
    lines.append(f'  {name:<28} base {r["base_" + name]:.4f} -> adapted {r[name]:.4f}')
  lines.append(f'  trainable parameters: {r["trainable_params"]:,} of {r["total_params"]:,} '
               f'({100 * r["trainable_fraction"]:.2f}%)')
  if r.get('dynamics'):
    lines.append(f'  dynamics: {r["dynamics"]}' + (
        f'; adapter shapes changed after steps {r["reshaped_at"]} (the step recompiled)'
        if r.get('reshaped_at') else ''))
    if 'total_rank' in r:
      target = f' (target {r["target_total_rank"]})' if 'target_total_rank' in r else ''
      lines.append(f'  total rank {r["total_rank"]}{target}; per layer: ' + ', '.join(
          f'{p.removeprefix("params/")}={v}' for p, v in r['rank_allocation'].items()))
    by_rank = r.get(f'{r["metric"]}_by_rank')
    if by_rank:
      lines.append(f'  {r["metric"]} by rank: ' + ', '.join(f'{k}: {v:.4f}'
                                                          for k, v in by_rank.items()))
  if r.get('effective_rank') is not None:
    lines.append(f'  effective rank of the update (mean over matrices): '
                 f'{r["effective_rank"]:.2f}')
  lines.append(f'  time: {r["seconds"]:.1f} s' + (
      f' (resumed from step {r["resumed_from"]})' if r['resumed_from'] else ''))
  return '\n'.join(lines)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                           auto=False) -> bool:
  """`jax.distributed.initialize` when this is one of several processes; True if it ran.

  On CPU the processes exchange collectives over gloo.
  """
  if not (coordinator_address or auto):
    return False
  try:  # only the CPU backend reads it
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except (AttributeError, KeyError, ValueError):
    logging.info('This JAX has no gloo CPU collectives option.')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def main(argv):
  del argv
  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _DISTRIBUTED.value)
  try:
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (workdir_lock.WorkdirLocked, stop_signals.Interrupted) as e:
    print(e, file=sys.stderr, flush=True)   # a state to report, not a bug: no traceback
    sys.exit(e.exit_code)
  if jax.process_index() == 0:
    print(summary(results))


if __name__ == '__main__':
  cli.run(main, config_flags=('config',))
