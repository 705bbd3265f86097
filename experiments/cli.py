"""The command line of the experiments: every user error is one line on stderr and exit status 2.

`run(main)` replaces `absl.app.run(main)` in `experiments.train`, `export`, `report` and
`sweep`. It turns into `error: <message>` (stderr, exit 2, no traceback):

  - flag errors (an unknown flag, a value of the wrong type: absl's `flags.Error`);
  - a `--config` file that does not exist, a config argument the config refuses, and a
    `--config.a.b=...` override of a field the config does not have (with the closest field
    names, by `difflib`), all checked before absl parses the flags;
  - a `UserError`, and a `ValueError`, `TypeError` or `OSError` raised by the project's own code
    (`lorax_jax`, `experiments`, `configs`): there they mean bad input (STYLE.md).

Anything else (an error raised inside JAX, NumPy or orbax that the project's validation did not
catch first, an `AssertionError`, a `KeyError`) is an internal bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import traceback
from typing import Any, Callable, Sequence

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN = tuple(os.path.join(ROOT, d) + os.sep for d in ('lorax_jax', 'experiments', 'configs'))
EXIT_USER_ERROR = 2


class UserError(ValueError):
  """Bad input of the user (a flag, a file, a config value): `run` prints it and exits 2."""


def is_user_error(e: BaseException) -> bool:
  """Whether `e` is a user error: a `UserError` or absl flag error, or a `ValueError`,
  `TypeError` or `OSError` raised by the project's own code (its innermost frame is there)."""
  if isinstance(e, (UserError, flags.Error, app.UsageError)):
    return True
  if not isinstance(e, (ValueError, TypeError, OSError)):
    return False
  frames = traceback.extract_tb(e.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OWN)


def fail(message: str) -> None:
  """Prints `error: message` to stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The last value of `--name VALUE` / `--name=VALUE` in `argv` (None: not given)."""
  value = None
  for i, a in enumerate(argv):
    for prefix in (f'--{name}', f'-{name}'):
      if a == prefix and i + 1 < len(argv):
        value = argv[i + 1]
      elif a.startswith(prefix + '='):
        value = a[len(prefix) + 1:]
  return value


def _overrides(argv: Sequence[str], name: str) -> list[tuple[str, str]]:
  """`(flag as given, dotted field)` of every `--name.a.b[=v]` / `--noname.a.b` in `argv`."""
  out = []
  for a in argv:
    for prefix in (f'--{name}.', f'-{name}.', f'--no{name}.', f'-no{name}.'):
      if a.startswith(prefix):
        out.append((a.split('=', 1)[0], a[len(prefix):].split('=', 1)[0]))
        break
  return out


def load_config_file(value: str) -> Any:
  """`get_config(arg)` of the config file of `value` (`path.py[:arg]`), as ml_collections'
  `config_flags` loads it.

  Raises:
    UserError: for a file that does not exist or has no `get_config`.
  """
  path, _, arg = value.partition(':')
  if not os.path.isfile(path):
    known = sorted(f for f in os.listdir(os.path.join(ROOT, 'configs'))
                   if f.endswith('.py') and not f.startswith(('_', 'common')))
    raise UserError(f'config file {path!r} (from --config {value}) does not exist; allowed: a '
                    f'config file with get_config(arg), e.g. configs/vit_digits.py:quick '
                    f'(configs/ has {known}).')
  spec = importlib.util.spec_from_file_location('cli_config_check', path)
  module = importlib.util.module_from_spec(spec)
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise UserError(f'config file {path!r} has no get_config(arg) function.')
  try:
    return module.get_config(*([arg] if arg else []))
  except (ValueError, TypeError) as e:   # the config refuses its argument
    raise UserError(f'--config {value}: {e}') from e


def check_field(config: Any, field: str, flag: str) -> None:
  """Refuses the dotted `field` (of the override `flag`) if `config` does not have it, naming
  the closest fields (`difflib`) and those allowed."""
  node, parts = config, field.split('.')
  for i, part in enumerate(parts):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      where = '.'.join(parts[:i]) or 'the config'
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
      hint = f'did you mean {" or ".join(repr(c) for c in close)}? ' if close else ''
      raise UserError(f'{flag}: {where} has no field {part!r}; {hint}allowed: {sorted(keys)}.')
    node = node[part]


def define_config_file(name: str, default: str, help_string: str):
  """`config_flags.DEFINE_config_file(name, default, help_string)`; an override of a field the
  default config does not have is a `fail` (ml_collections applies the command line's
  overrides to the default config when the flag is defined, if `--name` is not given)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except Exception:  # pylint: disable=broad-except
    try:
      config = load_config_file(default)
      for flag, field in _overrides(sys.argv[1:], name):
        check_field(config, field, flag)
    except UserError as e:
      fail(str(e))
    raise


def parse_flags(argv: Sequence[str], config_flags: Sequence[str] = ()) -> list[str]:
  """absl's flag parsing, with the config files of `config_flags` and their overrides checked
  first; every error is a `fail`."""
  try:
    for name in config_flags:
      value = _flag_value(argv[1:], name)
      if value is not None:
        config = load_config_file(value)
      elif name in flags.FLAGS:
        config = flags.FLAGS[name].default   # the default config file, loaded
      else:
        continue
      for flag, field in _overrides(argv[1:], name):
        check_field(config, field, flag)
    return flags.FLAGS(list(argv))
  except Exception as e:  # pylint: disable=broad-except
    if not is_user_error(e):
      raise
    fail(str(e).strip())


def run(main: Callable[[list[str]], Any], config_flags: Sequence[str] = ()) -> None:
  """`absl.app.run(main)`, with every user error printed as one line and exit status 2.

  Args:
    main: the program's `main(argv)`.
    config_flags: the names of its `config_flags.DEFINE_config_file` flags.
  """
  def wrapped(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if not is_user_error(e):
        raise
      fail(str(e).strip())

  app.run(wrapped, flags_parser=lambda argv: parse_flags(argv, config_flags))
