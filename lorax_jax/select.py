"""The one rule engine: ordered `(regex, setting)` rules over '/'-joined paths, first match wins.

`make_spec` (adapters), `quantize` (quantized bases) and `sharding.param_shardings` (placements)
all select leaves with it, so they share one error policy: a rule whose regex is invalid, that
matches no path, or whose every match an earlier rule already decides (shadowed) raises a
`ValueError` naming it, unless the rule is `optional` (presets use that).

>>> decided = select(['dense/kernel', 'dense/bias'], [(r'kernel$', 'x'), (r'bias$', None)])
>>> {p: r.setting for p, r in decided.items()}
{'dense/kernel': 'x', 'dense/bias': None}
>>> select(['dense/kernel'], [(r'attn', 'x')])
Traceback (most recent call last):
...
ValueError: Rule 'attn' matches no parameter path; paths are: ['dense/kernel']
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class Rule:
  """One selection rule. `optional=True` rules may match nothing (used by presets)."""
  pattern: str
  setting: Any
  optional: bool = False


def as_rule(rule: Any) -> Rule:
  """A `Rule` from a `(regex, setting[, optional])` tuple (or a `Rule`)."""
  if isinstance(rule, Rule):
    return rule
  if (isinstance(rule, (tuple, list)) and len(rule) in (2, 3) and isinstance(rule[0], str)
      and (len(rule) == 2 or isinstance(rule[2], bool))):
    return Rule(*rule)
  raise ValueError(f'A rule must be (regex, setting), (regex, setting, optional: bool) or '
                   f'Rule(...); got {rule!r}.')


def select(paths: Iterable[str], rules: Sequence[Any], *, what: str = 'Rule'
           ) -> dict[str, Rule]:
  """`{path: rule}` for every path some rule decides (the first whose regex `re.search`es it).

  Args:
    paths: '/'-joined leaf paths, in tree order.
    rules: ordered rules: `(regex, setting)` / `(regex, setting, optional)` tuples or `Rule`s.
    what: how errors name a rule (`'Sharding rule'`, `'Quantization rule'`, ...).

  Returns:
    The deciding `Rule` of each matched path (paths no rule matches are absent).

  Raises:
    ValueError: a rule that is not `(regex, setting)`, an invalid regex, a rule that matches no
      path, or one shadowed by earlier rules (every path it matches is decided before it).
  """
  if isinstance(rules, (str, tuple)) and rules and isinstance(rules[0], str):
    raise ValueError(f'{what}s must be a list of (regex, setting) rules; got {rules!r}.')
  rules = [as_rule(r) for r in rules]
  compiled = []
  for rule in rules:
    try:
      compiled.append(re.compile(rule.pattern))
    except re.error as e:
      raise ValueError(f'{what} pattern {rule.pattern!r} is not a valid regex: {e}') from None
  paths = list(paths)
  hits = [False] * len(rules)
  wins = [False] * len(rules)
  out = {}
  for path in paths:
    for i, rx in enumerate(compiled):
      if rx.search(path):
        hits[i] = True
        if path not in out:
          wins[i] = True
          out[path] = rules[i]
  for rule, hit, win in zip(rules, hits, wins):
    if rule.optional or win:
      continue
    if not hit:
      raise ValueError(f'{what} {rule.pattern!r} matches no parameter path; paths are: '
                       f'{paths[:20]}'
                       + (' ...' if len(paths) > 20 else ''))
    raise ValueError(f'{what} {rule.pattern!r} has no effect: every path it matches is decided '
                     'by an earlier rule (first match wins). Remove it or move it up.')
  return out
