"""Helpers shared by configs: a typed parser for the `--config file.py:ARG` argument."""

from __future__ import annotations

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
  from lorax_jax import spec, variants  # pylint: disable=g-import-not-at-top
  base_init = 'pissa' if init.startswith('pissa_niter_') else init
  if base_init not in spec.INITS:
    raise ValueError(f'Unknown init {init!r}; allowed: {list(spec.INITS)}.')
  return ml_collections.ConfigDict(dict(
      variant=variant, rank=rank, alpha=2.0 * rank, scaling='alpha/r', dropout=0.0,
      options=ml_collections.ConfigDict(dict(variants.get(variant).options)),
      init=init, init_options=ml_collections.ConfigDict(
          dict(spec.INIT_OPTIONS.get(base_init, {}))), calibration_batches=8))


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
