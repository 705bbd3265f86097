"""The dynamics protocol: the train state, a method's hooks, what it declares, and the registry.

A method is a `Dynamics`: a NamedTuple of pure functions built by a factory, like a variant or
an optax transform. Besides its hooks it DECLARES what the training loop and configs would
otherwise hard-code: the variants it acts on, whether its schedule really resizes adapters,
the statistics it keeps (`init`), when its schedule runs (`every`), the learning-rate schedule
it needs, the extra evaluations it wants at the end (`views`). A registered `Method` adds the
variant a config selects for it. Nothing outside a member's own file names a member.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_jax import paths
from lorax_jax import variants
from lorax_jax.joined import is_adapter
from lorax_jax.leafspec import FULL, spec_leaves


class TrainState(NamedTuple):
  """What a training step and a schedule act on.

  Attributes:
    step: steps done (an int32 scalar).
    params: the frozen base (changed only by methods that fold into it).
    adapters: the adapter tree.
    opt_state: the optimizer state over `adapters`.
    stats: the method's statistics (a pytree; `()` when it keeps none).
  """
  step: Any
  params: Any
  adapters: Any
  opt_state: Any
  stats: Any = ()


class Dynamics(NamedTuple):
  """A training-time method: hooks (all optional) and declarations.

  Attributes:
    name: the registry name configs use.
    init: `(params, adapters) -> stats`: the statistics the method keeps (`()`: none).
    every: interval of `schedule` calls in steps (0: never).
    schedule: `(step, state, tx) -> state`, with `step` the (Python int) steps done; outside
      the jitted step. It may mask, resize or fold adapters into the base; it returns `state`
      itself when it did nothing.
    prepare: `(adapters, step, rng) -> adapters` as used by the loss, differentiable
      (DyLoRA's random truncation); the stored adapters are untouched.
    regularizer: `(adapters) -> scalar` added to the loss (AdaLoRA's orthogonality term).
    observe: `(stats, step, adapters, grads) -> stats` inside the step (AdaLoRA's EMAs).
    after: `(state, old_adapters) -> state` inside the step, after the optimizer update
      (SoRA's proximal step, Delta-LoRA's base update).
    learning_rate: `(schedule) -> schedule`: the learning-rate schedule it needs (ReLoRA).
    check: `(spec, params) -> None`; ValueError for a selection the method cannot take.
    check_rank: `(rank, path) -> None`; ValueError for an initial rank the method cannot
      take (`path` None at config time, before any selection exists).
    report: `(state) -> dict` of JSON-able figures at the end of training (rank allocation).
    views: `(adapters) -> {name: {label: adapters}}`: extra evaluations at the end (DyLoRA's
      adapters at every rank).
    changes_base: whether the base is part of the trained state (checkpointed, donated).
    resizes: whether `schedule` may really change the adapters' shapes (the step recompiles).
    variants: the variants it acts on (None: any low-rank variant).
  """
  name: str
  init: Callable[[Any, Any], Any] = lambda params, adapters: ()
  every: int = 0
  schedule: Optional[Callable[[int, TrainState, optax.GradientTransformation], TrainState]] = None
  prepare: Optional[Callable[[Any, Any, Any], Any]] = None
  regularizer: Optional[Callable[[Any], Any]] = None
  observe: Optional[Callable[[Any, Any, Any, Any], Any]] = None
  after: Optional[Callable[[TrainState, Any], TrainState]] = None
  learning_rate: Optional[Callable[[Any], Any]] = None
  check: Callable[[Any, Any], None] = lambda spec, params: None
  check_rank: Callable[[int, Optional[str]], None] = lambda rank, path: None
  report: Callable[[TrainState], dict] = lambda state: {}
  views: Callable[[Any], Mapping[str, Mapping[str, Any]]] = lambda adapters: {}
  changes_base: bool = False
  resizes: bool = False
  variants: Optional[tuple[str, ...]] = None


def none() -> Dynamics:
  """Plain training: no hooks."""
  return Dynamics('none')


def init_state(params, adapters, tx: optax.GradientTransformation, dyn: Dynamics | None = None
               ) -> TrainState:
  """The state at step 0: step 0, the base, the adapters, `tx.init(adapters)` and the method's
  statistics.

  Raises:
    ValueError: for adapters the method cannot train (its `check`: e.g. DyLoRA's `min_rank`
      above a leaf's rank, AdaLoRA without `adalora` leaves).
  """
  dyn = dyn or none()
  dyn.check(spec_of(adapters), params)
  return TrainState(jnp.int32(0), params, adapters, tx.init(adapters), dyn.init(params, adapters))


# ---------------------------------------------------------------------------------------------
# The registry.


class Method(NamedTuple):
  """A registered method.

  Attributes:
    name: the name configs use (`config.dynamics.name`).
    build: the factory: keyword settings -> `Dynamics`.
    variant: the variant a config selects for it (`configs.vit_digits:dynamics=NAME`).
  """
  name: str
  build: Callable[..., Dynamics]
  variant: str


_METHODS: dict[str, Method] = {}
# Settings the training loop passes to every factory; each takes the ones it needs.
LOOP_OPTIONS = ('total_steps', 'learning_rate', 'seed')


def register(method: Method) -> None:
  """Registers a method under `method.name` (a plugin hook for research code).

  Raises:
    ValueError: for a name already registered or 'none'.
  """
  if method.name in _METHODS or method.name == 'none':
    raise ValueError(f'Dynamics {method.name!r} is already registered.')
  _METHODS[method.name] = method


def names() -> tuple[str, ...]:
  return tuple(_METHODS)


def method(name: str) -> Method:
  """The registered method `name`; ValueError naming the allowed ones otherwise."""
  if name not in _METHODS:
    raise ValueError(f'Unknown dynamics {name!r}; allowed: {sorted(_METHODS)}.')
  return _METHODS[name]


def default_variant(name: str) -> str:
  """The variant a config selects for method `name`."""
  return method(name).variant


def get(name: str, **options: Any) -> Dynamics:
  """The method `name` built with `options` (each factory's keyword arguments; the loop's
  `total_steps`, `learning_rate` and `seed` are passed only to factories that take them).

  Raises:
    ValueError: for an unknown name, unknown options, or bad settings (from the factory).
  """
  if not name or name == 'none':
    return none()
  build = method(name).build
  params = inspect.signature(build).parameters
  unknown = sorted(k for k in options if k not in params and k not in LOOP_OPTIONS)
  if unknown:
    raise ValueError(f'Unknown options {unknown} for dynamics {name!r}; allowed: '
                     f'{sorted(k for k in params if k not in LOOP_OPTIONS)}.')
  return build(**{k: v for k, v in options.items() if k in params})


# ---------------------------------------------------------------------------------------------
# Adapter subtrees the members share.


def flat(adapters) -> dict[str, Any]:
  """`{path: adapter state}` of an adapter tree."""
  return paths.flat(adapters, is_adapter)


def replace_leaves(adapters, new: dict[str, Any]):
  """`adapters` with the adapter states at the paths of `new` replaced."""
  def leaf(kp, x):
    return new.get(paths.path_str(kp), x)
  return jax.tree_util.tree_map_with_path(leaf, adapters, is_leaf=is_adapter)


def of(adapters, cls) -> dict[str, Any]:
  """`{path: state}` of the adapter states of type `cls`."""
  return {p: a for p, a in flat(adapters).items() if isinstance(a, cls)}


def nested(states: dict[str, Any]) -> dict[str, Any]:
  """An adapter tree holding just the adapter states of `{path: state}`."""
  return paths.nest({tuple(p.split('/')): a for p, a in states.items()})


def low_rank(adapters) -> dict[str, Any]:
  """`{path: state}` of the low-rank (not fully trained) adapter states."""
  return {p: a for p, a in flat(adapters).items() if a.spec.variant != FULL}


with_ties = variants.resolve_ties   # one tie resolution, the variants' own


# ---------------------------------------------------------------------------------------------
# Checks of settings and selections.


def need(dyn: Dynamics, spec: Any) -> None:
  """ValueError unless the selection adapts some leaf with a low-rank variant, all of them among
  `dyn.variants` (when the method declares them)."""
  if spec is None:
    return
  found = [s.variant for s in spec_leaves(spec).values() if s.variant != FULL]
  allowed = dyn.variants
  if allowed is None:
    if not found:
      raise ValueError(f'Dynamics {dyn.name!r} needs low-rank adapted leaves; the selection has '
                       'none.')
    return
  if not any(v in allowed for v in found):
    raise ValueError(f'Dynamics {dyn.name!r} needs leaves adapted with variant {list(allowed)}; '
                     f'the selection has {sorted(set(found)) or "none"}.')
  other = sorted({v for v in found if v not in allowed})
  if other:
    raise ValueError(f'Dynamics {dyn.name!r} acts on variant(s) {list(allowed)}; the selection '
                     f'also has {other}: select only those for {dyn.name!r}.')


def spec_of(adapters: Any) -> dict[str, Any]:
  """The spec (`{..: LeafSpec}`) the adapter states of `adapters` were made from."""
  flat = paths.flat(adapters, is_leaf=is_adapter) if adapters else {}
  return paths.nest({tuple(p.split('/')): a.spec for p, a in flat.items() if is_adapter(a)})


def check_ranks(dyn: Dynamics, spec: Any) -> None:
  """`dyn.check_rank` for every leaf of the variants it acts on."""
  for path, s in spec_leaves(spec).items():
    if s.variant != FULL and (dyn.variants is None or s.variant in dyn.variants):
      dyn.check_rank(s.rank, path)


def check_steps(name: str, total_steps: Any) -> int:
  if not isinstance(total_steps, (int, np.integer)) or isinstance(total_steps, bool) or (
      total_steps <= 0):
    raise ValueError(f'{name}: total_steps={total_steps!r} must be a positive int (the length '
                     'of training).')
  return int(total_steps)


def check_int(name: str, key: str, value: Any, lo: int, hi: int | None = None, why: str = ''):
  if (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo or
      (hi is not None and value > hi)):
    allowed = f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'
    raise ValueError(f'{name}: {key}={value!r} must be an int {allowed}{why}.')
  return int(value)


def check_float(name: str, key: str, value: Any, lo: float, hi: float | None = None,
                open_lo: bool = False, open_hi: bool = False):
  ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
  if ok:
    v = float(value)
    ok = (v > lo if open_lo else v >= lo) and (hi is None or (v < hi if open_hi else v <= hi))
  if not ok:
    lb, rb = '(' if open_lo else '[', ')' if open_hi else ']'
    rng = f'in {lb}{lo}, {hi}{rb}' if hi is not None else f'{">" if open_lo else ">="} {lo}'
    raise ValueError(f'{name}: {key}={value!r} must be a number {rng}.')
  return float(value)


def is_number(x: Any) -> bool:
  """Whether `x` is a Python or NumPy int or float (not a bool, a string or an array)."""
  return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def check_learning_rate(name: str, lr: Any) -> Any:
  """`lr` if it is a finite number > 0 or a schedule (a callable); ValueError naming `name`."""
  if callable(lr):
    return lr
  if not is_number(lr):
    raise ValueError(f'{name}={lr!r} must be a number or an optax schedule; got a '
                     f'{type(lr).__name__}.')
  if not (np.isfinite(lr) and lr > 0):
    raise ValueError(f'{name}={lr!r} must be a finite number > 0.')
  return lr
