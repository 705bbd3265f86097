"""Helpers shared by configs: a typed parser for the `--config file.py:ARG` argument."""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `'quick,rank=4,model=cnn'` into a ConfigDict typed by `defaults`.

  A bare name sets a boolean default to True. Values are converted to the default's type.

  Raises:
    ValueError: for a key that is not in `defaults`, or a value of the wrong type.
  """
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; allowed: {sorted(defaults)}.')
    default = defaults[key]
    if not _:
      if not isinstance(default, bool):
        raise ValueError(f'Config argument {key!r} needs a value ({key}=...).')
      out[key] = True
      continue
    try:
      if isinstance(default, bool):
        if value.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(value)
        out[key] = value.lower() in ('true', '1')
      else:
        out[key] = type(default)(value)
    except ValueError:
      raise ValueError(f'Config argument {key}={value!r} is not a {type(default).__name__}.'
                       ) from None
  return ml_collections.ConfigDict(out)


def adapter(rank: int, variant: str = 'lora', init: str = 'kaiming') -> ml_collections.ConfigDict:
  """The adapter settings of the configs: alpha = 2 * rank, alpha/r scaling, `options`: the
  variant's own settings with their defaults (e.g. LoKr's `factor`), so that they can be set
  with `--config.adapter.options.factor=4`, the `init` (`'pissa'`, `'eva'`, ...) with its
  `init_options` prefilled the same way, and `calibration_batches` for calibrated inits.

  Raises:
    ValueError: for an unknown variant or init (naming the allowed ones).
  """
  from lorax_jax import inits, variants  # pylint: disable=g-import-not-at-top
  if inits.resolve(init) is None:
    raise ValueError(f'Unknown init {init!r}; allowed: {list(inits.names())}.')
  base_init = inits.resolve(init)[0]
  return ml_collections.ConfigDict(dict(
      variant=variant, rank=rank, alpha=2.0 * rank, scaling='alpha/r', dropout=0.0,
      options=ml_collections.ConfigDict(dict(variants.get(variant).options)),
      init=init, init_options=ml_collections.ConfigDict(
          dict(inits.get(base_init).options)), calibration_batches=8))


def dynamics(name: str, rank: int, steps: int) -> ml_collections.ConfigDict:
  """A training-time method (`lorax_jax.dynamics`) with settings scaled to a run of `steps`:
  `name` '' (none), 'adalora' (target half the rank, budget schedule over the middle 70%),
  'dylora', 'sora' (prune every tenth of the run), 'relora' (3 restarts), 'cola' (3 links),
  'delta_lora'. Every factory keyword can be set as `--config.dynamics.KEY=...`.

  Raises:
    ValueError: for an unknown name (naming the allowed ones).
  """
  from lorax_jax import dynamics as dyn  # pylint: disable=g-import-not-at-top
  if name and name not in dyn.names():
    raise ValueError(f'Unknown dynamics {name!r}; allowed: {[""] + list(dyn.names())}.')
  options = {
      '': {},
      'adalora': dict(target_rank=max(1, rank // 2), warmup=steps // 10, final=steps // 5,
                      every=1, beta1=0.85, beta2=0.85, orth_weight=0.1),
      'dylora': dict(min_rank=1, detach_lower=False),
      'sora': dict(sparsity=1.0, every=max(1, steps // 10)),
      'relora': dict(period=max(1, steps // 4), warmup=max(1, steps // 20), prune=0.99),
      'cola': dict(links=3),
      'delta_lora': dict(scale=2.0, start=0),
  }[name]
  return ml_collections.ConfigDict(dict(name=name, **options))


def quant(qtype: str = '') -> ml_collections.ConfigDict:
  """The frozen base's quantization (`lorax_jax.quant`): `type` '' (float), 'nf4' (QLoRA),
  'int4' or 'int8'; blockwise types take `block_size` and `double_quant`. With `init=loftq`
  the LoftQ init quantizes the base in this format."""
  if qtype not in ('', 'nf4', 'int4', 'int8'):
    raise ValueError(f"Unknown quant {qtype!r}; allowed: ['', 'nf4', 'int4', 'int8'].")
  return ml_collections.ConfigDict(dict(type=qtype, block_size=64,
                                        double_quant=qtype == 'nf4'))


def parallel() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """The device mesh (`data`, `fsdp`, `tensor` sizes; -1 = the rest) and the parameter sharding
  (`preset`: replicated | fsdp | tensor | fsdp_tensor, or `rules`: [(regex, PartitionSpec axes)],
  which take precedence) of the configs. Default: data parallel over every device."""
  mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  sharding = ml_collections.ConfigDict(dict(preset='fsdp', rules=()))
  return mesh, sharding


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]
                    ) -> ml_collections.ConfigDict:
  """Sets dotted keys (`'adapter.scaling'`) as `--config.adapter.scaling=...` would.

  Raises:
    ValueError: for a key that is not in the config, naming the allowed keys at that level, or
      a value of another type than the field's.
  """
  for key, value in overrides.items():
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        where = '.'.join(parts[:i]) or 'the config'
        close = difflib.get_close_matches(part, allowed, n=3, cutoff=0.6)
        hint = f'did you mean {" or ".join(repr(c) for c in close)}? ' if close else ''
        raise ValueError(f'Unknown override key {key!r}: {where} has no field {part!r}; '
                         f'{hint}allowed: {allowed}.')
      if i == len(parts) - 1:
        try:
          node[part] = value
        except TypeError:   # ml_collections refuses a value of another type than the field's
          raise ValueError(f'Override {key}={value!r}: {key} is of type '
                           f'{type(node[part]).__name__} (now {node[part]!r}); got type '
                           f'{type(value).__name__}.') from None
      else:
        node = node[part]
  return config


SCALINGS = {'alpha/r': 'ar', 'rslora': 'rs'}


def standard_sweep(add, *, quick: bool, variants, ranks, inits=(), quick_variants=(),
                   quick_ranks=(), quant: dict[str, Any] | None = None,
                   max_rank: dict[str, int] | None = None, dynamics=()) -> None:
  """The grid every config sweeps: full fine-tuning and head-only baselines; every variant x
  rank x scaling mode (alpha/r, rsLoRA) with plain LoRA's single learning rate; LoRA+ (lambda
  16) per rank; each weight-aware init per rank; QLoRA (an NF4 base) per rank.

  `quick` keeps the baselines and `quick_variants` x `quick_ranks` with alpha/r: a sweep that
  runs in minutes on a laptop CPU (each trial with the config's `quick` settings).

  `add(name, arg, **overrides)` declares one trial: its config is `get_config(arg)` with dotted
  `overrides` applied. `max_rank` caps the ranks of a variant or init whose rank is bounded by
  more than the layer's size (LoKr by its Kronecker factor, LoRA-GA's 2r directions).
  `dynamics` adds each training-time method (AdaLoRA, ReLoRA, ...) per rank, for configs that
  take a `dynamics=` argument.
  """
  cap = lambda name: [r for r in ranks if r <= (max_rank or {}).get(name, r)]
  add('full', 'method=full')
  add('head', 'method=head')
  plain = {'train.loraplus_ratio': 1.0}
  if quick:
    for v in quick_variants:
      for r in quick_ranks:
        add(f'{v}_r{r}', f'variant={v},rank={r}', **plain)
    return
  for v in variants:
    for r in cap(v):
      for scaling, tag in SCALINGS.items():
        add(f'{v}_r{r}_{tag}', f'variant={v},rank={r}', **plain, **{'adapter.scaling': scaling})
  for r in ranks:
    add(f'lora+_r{r}', f'rank={r}', **{'train.loraplus_ratio': 16.0})
    q = {f'quant.{k}': v for k, v in (quant or {}).items()}
    for init in inits:   # LoftQ quantizes the base itself, in the config's format
      if r not in cap(init):
        continue
      if init == 'loftq':
        add(f'{init}_r{r}', f'init={init},quant=nf4,rank={r}', **plain, **q)
      else:
        add(f'{init}_r{r}', f'init={init},rank={r}', **plain)
    add(f'qlora_r{r}', f'quant=nf4,rank={r}', **plain, **q)
    for d in dynamics:
      add(f'{d}_r{r}', f'dynamics={d},rank={r}', **plain)
