"""Selection: which leaves get adapters, of which variant, rank and scale.

A spec is a nested dict shaped like the parameters (the same '/'-joined paths) whose leaves are a
`LeafSpec` or `None` (frozen). It is built from ordered `(regex, setting)` rules, first match wins:

>>> params = {'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)},
...           'head': {'kernel': jnp.ones((8, 2))}}
>>> spec = make_spec(params, [(r'head', 'full'), (r'kernel$', {'rank': 4, 'alpha': 8})])
>>> spec['dense']['kernel'].rank, spec['dense']['kernel'].scale, spec['head']['kernel'].variant
(4, 2.0, 'full')
>>> print(summary(params, spec, print_fn=None).splitlines()[-1])
trainable 112 of 152 base parameters (73.6842%)
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from lorax_jax import inits
from lorax_jax import paths
from lorax_jax import usage as usage_lib
from lorax_jax import variants
from lorax_jax.leafspec import FULL, SCALINGS, LeafSpec, spec_leaves  # noqa: F401
from lorax_jax.select import Rule, as_rule, select  # noqa: F401

SETTING_KEYS = ('variant', 'rank', 'alpha', 'scaling', 'dropout', 'init', 'init_options', 'dtype',
                'in_axes', 'out_axes', 'batch_axes')


def dense_kernels(exclude: Sequence[str] = ('embed', 'head', 'classifier', 'logits', 'lm_head'),
                  **setting) -> list[Rule]:
  """Preset: every `kernel` leaf except embeddings and the output head.

  Args:
    exclude: substrings of paths left frozen (embedding tables are never named `kernel`).
    **setting: the adapter setting (rank, alpha, variant, ...).

  Returns:
    Rules for `make_spec`.
  """
  rules = [Rule(f'(^|/)[^/]*{re.escape(e)}[^/]*/', None, optional=True) for e in exclude]
  rules.append(Rule(r'(^|/)kernel$', dict(setting) or {}))
  return rules


def _normalize_axes(value, ndim, path, name):
  if value is None:
    return None
  axes = (value,) if isinstance(value, int) else tuple(value)
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
      raise ValueError(f'{name}={value!r} for {path!r}: axes must be ints in [-{ndim}, {ndim}).')
    out.append(int(a) % ndim)
  return tuple(out)


class AxesAssumedWarning(UserWarning):
  """`make_spec` assumed the `(in, out)` layout of 2-D kernels it was not told the axes of."""


# Leaf names whose layout the naming tells: Flax's `kernel` (Dense, Einsum, Conv: `(..., in,
# out)`) and `embedding` (Embed: `(vocab, features)`, looked up by rows).
_FLAX_LAYOUT_NAMES = ('kernel', 'embedding')


def _says_layout(path: str) -> bool:
  return path.rsplit('/', 1)[-1] in _FLAX_LAYOUT_NAMES


def _resolve_axes(path, shape, setting, inferred, consumer=None, assumed=None):
  ndim = len(shape)
  in_axes = _normalize_axes(setting.get('in_axes'), ndim, path, 'in_axes')
  out_axes = _normalize_axes(setting.get('out_axes'), ndim, path, 'out_axes')
  batch_axes = _normalize_axes(setting.get('batch_axes'), ndim, path, 'batch_axes')
  if in_axes is None and out_axes is None:
    if inferred is not None:
      batch_axes, in_axes, out_axes = inferred
    elif consumer is not None:
      raise ValueError(
          f'Kernel {path!r} (shape {shape}) is selected for an adapter, but fn consumes it at '
          f'primitive {consumer!r}, not in a contraction (dot_general, conv_general_dilated, '
          'gather) that has in- and out-axes, so it has no low-rank factored form. Leave it '
          "out of the rules (or train it with 'full'), or give in_axes and out_axes in its rule "
          '(lora(fn) then materializes W + dW there).')
    elif ndim - len(batch_axes or ()) == 2:
      rest = [d for d in range(ndim) if d not in (batch_axes or ())]
      in_axes, out_axes = (rest[0],), (rest[1],)
      if assumed is not None and not _says_layout(path):
        assumed.append(path)
    else:
      raise ValueError(
          f'Kernel {path!r} has shape {shape}: its in/out axes are ambiguous. Give in_axes and '
          'out_axes in the rule, or pass fn= (and args=) to make_spec to infer them from use.')
  taken = set(in_axes or ()) | set(out_axes or ())
  if in_axes is None:
    in_axes = tuple(d for d in range(ndim) if d not in taken and d not in (batch_axes or ()))
  if out_axes is None:
    out_axes = tuple(d for d in range(ndim) if d not in taken and d not in (batch_axes or ()))
  if batch_axes is None:
    batch_axes = tuple(d for d in range(ndim) if d not in set(in_axes) | set(out_axes))
  all_axes = list(batch_axes) + list(in_axes) + list(out_axes)
  if sorted(all_axes) != list(range(ndim)) or not in_axes or not out_axes:
    raise ValueError(
        f'Axes of {path!r} (shape {shape}) must split all {ndim} axes into non-empty in_axes and '
        f'out_axes plus batch_axes; got batch={batch_axes}, in={in_axes}, out={out_axes}.')
  # Canonical factor layouts list each group's axes in W's order.
  return tuple(sorted(batch_axes)), tuple(sorted(in_axes)), tuple(sorted(out_axes))


def _hashable(value):
  if isinstance(value, dict):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  if isinstance(value, list):
    return tuple(_hashable(v) for v in value)
  return value


def serves(init: str, variant: str) -> bool:
  """Whether the registered init `init` can initialize variant `variant`: the init's record
  lists it (or lists none), and an init that sets the factors needs `Variant.from_factors`."""
  record = inits.get(init)
  if record.variants is not None and variant not in record.variants:
    return False
  return not record.sets_factors or variants.get(variant).from_factors is not None


def _number(path: str, name: str, value: Any) -> float:
  """`value` of setting `name` as a float; a string, bool or other non-number is refused."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f'{name}={value!r} for {path!r} must be a number; got a '
                     f'{type(value).__name__}.')
  return float(value)


def _init_setting(path, variant, init, options):
  """Validated `(init, init_options)`; other spellings (PEFT's `'pissa_niter_K'`, `'pissa'`
  with niter K) resolve through the init registry."""
  options = dict(options or {})
  got = inits.resolve(init)
  if got is None:
    if not isinstance(init, str):
      raise ValueError(f'init={init!r} for {path!r} must be one of {list(inits.names())}.')
    raise ValueError(f'Unknown init {init!r} for {path!r}; allowed: {list(inits.names())} (and '
                     "'pissa_niter_K').")
  init, implied = got
  options = {**options, **implied}
  allowed = inits.get(init).options
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f'Unknown init_options {unknown} for init {init!r} at {path!r}; allowed: '
                     f'{sorted(allowed)}.')
  if not serves(init, variant):
    served = [v for v in variants.names() if serves(init, v)]
    raise ValueError(f'init {init!r} for {path!r} sets the factors (and the base) from data; it '
                     f'serves the variants {served}, not {variant!r}.')
  out = []
  for key in sorted(allowed):
    value = _hashable(options.get(key, allowed[key]))
    try:
      hash(value)
    except TypeError:
      raise ValueError(f'init_options {key}={value!r} for {path!r} must be hashable.') from None
    out.append((key, value))
  return init, tuple(out)


def _variant_options() -> set[str]:
  return {k for name in variants.names() for k in variants.get(name).options}


def _leaf_spec(path, leaf, setting, defaults, inferred, consumer=None,
               assumed=None) -> LeafSpec | None:
  if setting is None:
    return None
  if isinstance(setting, str):
    setting = {'variant': setting}
  if isinstance(setting, LeafSpec):
    setting = {**{f.name: getattr(setting, f.name) for f in dataclasses.fields(setting)
                  if f.name not in ('shape', 'options', 'init_options')},
               'init_options': dict(setting.init_options),
               **dict(setting.options)}
  if not isinstance(setting, dict):
    raise ValueError(f'Setting for {path!r} must be None, "full", a dict or a LeafSpec; '
                     f'got {setting!r}.')
  merged = {**defaults, **setting}
  variant = merged.get('variant', 'lora')
  own = dict(variants.get(variant).options) if variant in variants.names() else {}
  unknown = sorted(set(setting) - set(SETTING_KEYS) - set(own))
  if unknown:
    raise ValueError(f'Unknown setting keys {unknown} for {path!r} (variant {variant!r}); '
                     f'allowed: {list(SETTING_KEYS) + sorted(own)}.')
  shape = tuple(getattr(leaf, 'shape', ()))
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'Rule matched {path!r}, which is not a float array (dtype {dtype}); only '
                     'floating-point leaves can be adapted or trained.')
  if variant == FULL:
    return LeafSpec(variant=FULL, shape=shape)
  if variant not in variants.names():
    raise ValueError(f'Unknown variant {variant!r} for {path!r}; allowed: '
                     f'{sorted(list(variants.names()) + [FULL])}.')
  if len(shape) < 2:
    raise ValueError(f'Rule matched {path!r} with shape {shape}: adapters need an array of rank '
                     '>= 2 (use "full" to train a bias or norm scale).')
  scaling = merged.get('scaling', 'alpha/r')
  if scaling not in SCALINGS:
    raise ValueError(f'Unknown scaling {scaling!r} for {path!r}; allowed: {list(SCALINGS)}.')
  init, init_options = _init_setting(path, variant, merged.get('init', 'kaiming'),
                                     merged.get('init_options'))
  dropout = _number(path, 'dropout', merged.get('dropout', 0.0))
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'dropout={dropout} for {path!r} must be in [0, 1).')
  batch_axes, in_axes, out_axes = _resolve_axes(path, shape, merged, inferred, consumer,
                                                assumed)
  rank = merged.get('rank', 8)
  d_in = math.prod(shape[d] for d in in_axes)
  d_out = math.prod(shape[d] for d in out_axes)
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0 or (
      rank > min(d_in, d_out)):
    raise ValueError(f'rank={rank!r} for {path!r} (in {d_in}, out {d_out}) must be an int in '
                     f'[1, {min(d_in, d_out)}].')
  alpha = merged.get('alpha')
  alpha = _number(path, 'alpha', rank if alpha is None else alpha)
  if not (math.isfinite(alpha) and alpha > 0):
    raise ValueError(f'alpha={alpha!r} for {path!r} must be a finite number > 0.')
  adapter_dtype = merged.get('dtype')
  if adapter_dtype is not None:
    try:
      adapter_dtype = jnp.dtype(adapter_dtype).name
    except TypeError:
      raise ValueError(f'dtype={adapter_dtype!r} for {path!r} is not a dtype.') from None
    if not jnp.issubdtype(adapter_dtype, jnp.floating):
      raise ValueError(f'dtype={adapter_dtype!r} for {path!r}: adapters need a float dtype.')
  options = []
  for key in sorted(own):
    value = merged.get(key, own[key])
    try:
      hash(value)
    except TypeError:
      raise ValueError(f'{key}={value!r} for {path!r} must be a hashable value (a number, '
                       'string or tuple).') from None
    options.append((key, value))
  spec = LeafSpec(variant=variant, rank=int(rank), alpha=alpha, scaling=scaling, dropout=dropout,
                  init=init, dtype=adapter_dtype, shape=shape, batch_axes=batch_axes,
                  in_axes=in_axes, out_axes=out_axes, options=tuple(options),
                  init_options=init_options)
  variants.get(variant).check(path, spec)
  if variants.get(variant).bind is not None:
    spec = variants.get(variant).bind(path, spec)
  inits.get(init).check(path, spec)
  return spec


def make_spec(params: Any, rules: Sequence[Any], *, fn: Callable | None = None,
              args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
              **defaults) -> dict[str, Any]:
  """Builds the adapter spec of `params` from ordered `(regex, setting)` rules.

  Each rule's regex is searched (`re.search`) in the '/'-joined path of every leaf; the first
  rule that matches a leaf decides it. A setting is `None` (frozen), `'full'` (train the leaf
  fully: a classifier head, norms) or a dict with keys from `SETTING_KEYS` and the variant's own
  options (`variants.get(name).options`, e.g. LoKr's `factor`); missing keys come from
  `**defaults` (variant `'lora'`, rank 8, alpha = rank, scaling `'alpha/r'`).

  Axes come from the rule (`in_axes`, `out_axes`, `batch_axes`), else, when `fn` is given, from
  how `fn(params, *args, **kwargs)` uses each kernel (contracted axes are the in-axes, scanned
  axes are batch axes), else a 2-D kernel is taken as `(in, out)`: an `AxesAssumedWarning`
  (once per call) lists the kernels so taken, except leaves named `kernel` or `embedding`,
  whose Flax layouts are `(in, out)`.

  Args:
    params: a parameter pytree (linen dict or NNX State).
    rules: ordered rules, `(regex, setting)` tuples or `Rule`s.
    fn: optional function of `(params, *args)` whose use of each kernel gives its axes.
    args: example positional arguments for `fn` (arrays or `jax.ShapeDtypeStruct`s).
    kwargs: example keyword arguments for `fn`.
    **defaults: default setting values.

  Returns:
    A nested dict shaped like `params` with a `LeafSpec` or `None` at every leaf.

  Raises:
    ValueError: rules that select nothing to adapt or train, a kernel selected for an adapter
      that `fn` consumes outside any contraction
      (e.g. elementwise, `x * w`: the error names the primitive), a rule that matches no path
      (or only paths earlier rules decide), an unknown
      variant, scaling, init or setting key, a rank outside [1, min(d_in, d_out)], a variant
      option its variant rejects, or a rule on a leaf that is not a float array of rank >= 2.
  """
  unknown = sorted(set(defaults) - set(SETTING_KEYS) - _variant_options())
  if unknown:
    raise ValueError(f'Unknown defaults {unknown}; allowed: {list(SETTING_KEYS)} and the '
                     f'variant options {sorted(_variant_options())}.')
  leaves = list(paths.leaves_with_paths(params))
  decided = select([p for p, _, _ in leaves], rules, what='Rule')
  if all(r.setting is None for r in decided.values()):
    raise ValueError(f'The rules {rules!r} select no leaf to adapt or train (every match is None '
                     'or nothing matched), so there would be nothing to train. Paths are: '
                     f'{[p for p, _, _ in leaves][:20]}')
  inferred, consumers = {}, {}
  if fn is not None:
    try:
      inferred, consumers = usage_lib.infer_usage(fn, params, *args, **(kwargs or {}))
    except Exception as e:
      e.add_note(f'(raised by fn={getattr(fn, "__qualname__", fn)}, which make_spec traces '
                 'on the parameters and args= to infer how each kernel is used)')
      raise
  items = {}
  assumed = [] if fn is None else None
  for path, keys, leaf in leaves:
    setting = decided[path].setting if path in decided else None
    items[keys] = _leaf_spec(path, leaf, setting, defaults, inferred.get(path),
                             consumers.get(path), assumed)
  if assumed:
    shown = ', '.join(repr(p) for p in assumed[:5]) + (
        f' and {len(assumed) - 5} more' if len(assumed) > 5 else '')
    warnings.warn(
        f'make_spec assumed the layout (in, out) for the 2-D kernels {shown}. Kernels stored '
        '(out, in) (PyTorch-style weights, equinox Linear) would get transposed adapters: pass '
        "fn= (and args=) to infer the axes from use, or give 'in_axes' and 'out_axes' in the "
        "rule. (Leaves named 'kernel' or 'embedding', Flax's (in, out) layouts, are not "
        'reported.)', AxesAssumedWarning, stacklevel=2)
  return paths.nest(items)


def summary(params: Any, spec: dict[str, Any], *, print_fn: Callable[[str], Any] | None = print
            ) -> str:
  """Prints (and returns) a table of what is adapted: path, shape, variant, rank, parameters.

  The last line gives the total trainable parameters and their fraction of the base model.

  Raises:
    ValueError: for a spec of other parameters (a path or shape `params` does not have).
  """
  validate_against(params, spec)
  specs = spec_leaves(spec)
  total = 0
  rows = []
  groups = set()
  for path, _, leaf in paths.leaves_with_paths(params):
    total += int(np.prod(np.shape(leaf)))
    s = specs.get(path)
    if s is None:
      continue
    if s.variant == FULL:
      n = int(np.prod(s.shape))
    else:
      variant = variants.get(s.variant)
      n = variant.num_params(s)
      if variant.tie is not None and (s.variant, variant.tie.key(s)) not in groups:
        groups.add((s.variant, variant.tie.key(s)))   # shared arrays, counted at their owner
        n += variant.tie.shared_params(s)
    rows.append((path, 'x'.join(map(str, s.shape)), s.variant,
                 '-' if s.variant == FULL else str(s.rank), n))
  trainable = sum(r[4] for r in rows)
  header = ('path', 'shape', 'variant', 'rank', 'params')
  widths = [max([len(header[i])] + [len(str(r[i])) for r in rows]) for i in range(5)]
  fmt = lambda r: '  '.join(str(c).ljust(w) if i < 4 else str(c).rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths)))
  lines = [fmt(header), fmt(['-' * w for w in widths])] + [fmt(r) for r in rows]
  frac = trainable / max(total, 1)
  lines.append(f'trainable {trainable:,} of {total:,} base parameters ({100 * frac:.4f}%)')
  text = '\n'.join(lines)
  if print_fn is not None:
    print_fn(text)
  return text


def validate_against(params: Any, spec: dict[str, Any]) -> None:
  """Raises ValueError if a spec leaf's shape differs from the parameter at its path."""
  shapes = {p: tuple(np.shape(l)) for p, _, l in paths.leaves_with_paths(params)}
  for path, s in spec_leaves(spec).items():
    if path not in shapes:
      raise ValueError(f'Spec path {path!r} is not a parameter path.')
    if shapes[path] != s.shape:
      raise ValueError(f'Spec for {path!r} expects shape {s.shape}, parameter has {shapes[path]}.')

