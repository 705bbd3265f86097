"""Training-time dynamics: methods that change ranks or the base while training.

The survey's rank refinement (AdaLoRA, DyLoRA, SoRA) and rank augmentation (ReLoRA, COLA,
Delta-LoRA) methods need hooks in the training loop. A method is a `Dynamics`: a NamedTuple of
pure functions, built by a factory (`adalora(...)`, `relora(...)`, ...) like a variant or an optax
transform. The training state they act on is a `TrainState` of (step, base, adapters, optimizer
state, statistics):

    dyn = dynamics.relora(period=200, total_steps=1000)
    step = dynamics.make_step(loss_fn, tx, dyn)          # jitted; loss_fn(joined, batch, rng)
    state = dynamics.init_state(params, adapters, tx, dyn)
    for i in range(1000):
      state, loss = step(state, batch(i), jax.random.key(i))
      state, reshaped = dynamics.apply_schedule(dyn, i + 1, state, tx)
      if reshaped:                                        # only when shapes really changed
        step = dynamics.make_step(loss_fn, tx, dyn)       # (or let jit retrace)

Hooks (all optional):
  prepare(adapters, step, rng)  adapters as used by the loss, differentiable (DyLoRA's random
                                truncation); the stored adapters are untouched.
  regularizer(adapters)         added to the loss (AdaLoRA's orthogonality term).
  observe(stats, step, adapters, grads)   statistics updated inside the step (AdaLoRA's
                                sensitivity EMAs).
  after(state, old_adapters)    inside the step, after the optimizer update (SoRA's proximal
                                step, Delta-LoRA's base update).
  schedule(step, state, tx)     called by the loop every `every` steps, outside the step: may
                                mask or really resize adapters (resetting or slicing the
                                optimizer state of resized leaves), or fold adapters into the
                                base (ReLoRA, COLA). `apply_schedule` reports whether shapes
                                changed, i.e. whether the step recompiles.
  learning_rate(schedule)       the learning-rate schedule the method needs (ReLoRA's jagged
                                cosine).

Every factory validates its settings when it is built (config time), and `check(spec, params)`
validates them against the selection before the first step: bad settings never fail mid-run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_jax import adapters as adapters_lib
from lorax_jax import layout
from lorax_jax import paths
from lorax_jax import quant as quant_lib
from lorax_jax import spec as spec_lib
from lorax_jax import variants
from lorax_jax.variants.adalora import AdaloraParams
from lorax_jax.variants import common


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
  """A training-time method (see the module docstring for the hooks).

  Attributes:
    name: the registry name configs use.
    init: `(params, adapters) -> stats`.
    every: interval of `schedule` calls in steps (0: never).
    schedule: `(step, state, tx) -> state`, with `step` the (Python int) steps done.
    prepare: `(adapters, step, rng) -> adapters` used by the loss.
    regularizer: `(adapters) -> scalar` added to the loss.
    observe: `(stats, step, adapters, grads) -> stats` inside the step.
    after: `(state, old_adapters) -> state` inside the step, after the update.
    learning_rate: `(schedule) -> schedule`.
    check: `(spec, params) -> None`; ValueError for a selection the method cannot take.
    report: `(state) -> dict` of JSON-able figures at the end of training (rank allocation).
    changes_base: whether the base is part of the trained state (checkpointed, donated).
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
  report: Callable[[TrainState], dict] = lambda state: {}
  changes_base: bool = False


# ---------------------------------------------------------------------------------------------
# The step, the state and the loop's schedule call.


def init_state(params, adapters, tx: optax.GradientTransformation, dyn: Dynamics | None = None
               ) -> TrainState:
  """The state at step 0."""
  dyn = dyn or none()
  return TrainState(jnp.int32(0), params, adapters, tx.init(adapters), dyn.init(params, adapters))


def make_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation,
              dyn: Dynamics | None = None, *, donate: bool = True, shardings: Any = None
              ) -> Callable:
  """A jitted `step(state, batch, rng) -> (state, loss)` with the method's in-step hooks.

  Args:
    loss_fn: `(joined_params, batch, rng) -> loss`, with `joined = join(params, adapters)`.
    tx: the optimizer over the adapters.
    dyn: the method (None: plain training, as `training.make_train_step`).
    donate: donate the state's buffers (the base only for methods that change it).
    shardings: optional `(state_shardings, batch_shardings, replicated)`, `state_shardings` a
      `TrainState` of shardings: the step is jitted with them as in/out shardings.

  Returns:
    The jitted step (with `.lower(state, batch, rng)`); `loss` is the data loss (without the
    method's regularizer). Only the adapters are differentiated: no base-sized gradient exists.
  """
  dyn = dyn or none()

  def inner(count, params, adapters, opt_state, stats, batch, rng):
    state = TrainState(count, params, adapters, opt_state, stats)

    def objective(ad):
      used = dyn.prepare(ad, state.step, rng) if dyn.prepare else ad
      loss = loss_fn(adapters_lib.join(state.params, used), batch, rng)
      total = loss + dyn.regularizer(ad) if dyn.regularizer else loss
      return total, loss

    (_, loss), grads = jax.value_and_grad(objective, has_aux=True)(state.adapters)
    stats = (dyn.observe(state.stats, state.step, state.adapters, grads) if dyn.observe
             else state.stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.adapters)
    adapters = optax.apply_updates(state.adapters, updates)
    new = TrainState(state.step + 1, state.params, adapters, opt_state, stats)
    if dyn.after:
      new = dyn.after(new, state.adapters)
    return new, loss

  # The base is donated only by methods that change it: the caller's base stays valid otherwise.
  donated = ((0, 1, 2, 3, 4) if dyn.changes_base else (0, 2, 3, 4)) if donate else ()
  kw = dict(donate_argnums=donated)
  if shardings is not None:
    state_sh, batch_sh, rep = shardings
    kw.update(in_shardings=tuple(state_sh) + (batch_sh, rep), out_shardings=(state_sh, rep))
  jitted = jax.jit(inner, **kw)

  def step(state: TrainState, batch, rng=None):
    return jitted(*state, batch, rng)

  step.lower = lambda state, batch, rng=None: jitted.lower(*state, batch, rng)
  return step


def shapes(tree: Any) -> Any:
  """The tree's structure (static fields included: a resized adapter's spec) and leaf shapes."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(getattr(x, 'dtype', type(x)))) for x in leaves)


def apply_schedule(dyn: Dynamics | None, step: int, state: TrainState,
                   tx: optax.GradientTransformation) -> tuple[TrainState, bool]:
  """Runs `dyn.schedule` if `step` (steps done) is on its interval.

  Returns:
    `(state, reshaped)`: `reshaped` is True when the adapters' or optimizer state's shapes (or
    the adapters' specs) changed, i.e. when a jitted step must recompile.
  """
  if dyn is None or not dyn.every or dyn.schedule is None or step % dyn.every:
    return state, False
  new = dyn.schedule(step, state, tx)
  if new is state:   # nothing done (most calls of a per-step schedule)
    return state, False
  parts = lambda s: (s.adapters, s.opt_state, s.stats)
  return new, shapes(parts(new)) != shapes(parts(state))


def none() -> Dynamics:
  """Plain training: no hooks."""
  return Dynamics('none')


# ---------------------------------------------------------------------------------------------
# Shared pieces: selecting leaves, tree surgery on adapters and optimizer state.


def _flat(adapters) -> dict[str, Any]:
  return paths.flat(adapters, adapters_lib.is_adapter)


def _replace_leaves(adapters, new: dict[str, Any]):
  """`adapters` with the adapter states at the paths of `new` replaced."""
  def leaf(kp, x):
    return new.get(paths.path_str(kp), x)
  return jax.tree_util.tree_map_with_path(leaf, adapters, is_leaf=adapters_lib.is_adapter)


def _of(adapters, cls) -> dict[str, Any]:
  return {p: a for p, a in _flat(adapters).items() if isinstance(a, cls)}


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
  """An adapter tree holding just the adapter states of `{path: state}`."""
  return paths.nest({tuple(p.split('/')): a for p, a in flat.items()})


def _low_rank(adapters) -> dict[str, Any]:
  return {p: a for p, a in _flat(adapters).items() if not isinstance(a, variants.FullParams)}


def _need(name: str, spec: Any, allowed: tuple[str, ...]) -> None:
  """ValueError unless the selection adapts some leaf with one of `allowed` variants."""
  if spec is None:
    return
  leaves = spec_lib.spec_leaves(spec)
  found = [s.variant for s in leaves.values() if s.variant != spec_lib.FULL]
  if not any(v in allowed for v in found):
    raise ValueError(f'Dynamics {name!r} needs leaves adapted with variant {list(allowed)}; '
                     f'the selection has {sorted(set(found)) or "none"}.')
  other = sorted({v for v in found if v not in allowed})
  if other:
    raise ValueError(f'Dynamics {name!r} acts on variant(s) {list(allowed)}; the selection also '
                     f'has {other}: select only those for {name!r}.')


def _param_matches(tree: Any, adapters: Any) -> dict[tuple, tuple[str, str]]:
  """For each leaf of `tree` (optimizer state, statistics) that copies an adapter array: its
  key path -> (adapter path, field). Matched by key-path suffix and shape."""
  targets = {}
  for path, ad in _flat(adapters).items():
    for f in dataclasses.fields(ad):
      x = getattr(ad, f.name)
      if f.metadata.get('static') or x is None:
        continue
      keys = tuple(path.split('/')) + (f.name,)
      targets[keys] = (path, f.name, tuple(np.shape(x)))
  out = {}
  for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = paths.path_keys(kp)
    for n in range(len(keys), 0, -1):
      hit = targets.get(keys[-n:])
      if hit is not None and hit[2] == tuple(np.shape(x)):
        out[tuple(kp)] = hit[:2]
        break
  return out


def _map_matching(fn, tree: Any, adapters: Any, paths_: set[str] | None = None):
  """Applies `fn(x, path, field)` to the leaves of `tree` that copy adapter arrays (of
  `paths_`, if given); other leaves (step counts) pass through."""
  matches = _param_matches(tree, adapters)

  def leaf(kp, x):
    hit = matches.get(tuple(kp))
    if hit is None or (paths_ is not None and hit[0] not in paths_):
      return x
    return fn(x, *hit)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def prune_by_magnitude(x: jax.Array, fraction: float) -> jax.Array:
  """Zeroes the `fraction` of `x`'s entries with the smallest magnitudes (1.0: all)."""
  if fraction >= 1.0:
    return jnp.zeros_like(x)
  if fraction <= 0.0 or x.size == 0:
    return x
  k = int(math.floor(fraction * x.size))
  if k == 0:
    return x
  mag = jnp.abs(x).reshape(-1)
  thresh = jnp.sort(mag)[k - 1]
  return jnp.where(jnp.abs(x) > thresh, x, jnp.zeros_like(x))


def prune_opt_state(opt_state: Any, adapters: Any, paths_: set[str], fraction: float) -> Any:
  """The optimizer state with the moments of the adapters at `paths_` magnitude-pruned (ReLoRA:
  99%; `fraction=1` resets them). Step counts (and so schedules) are kept.

  The positions are chosen by the magnitude of each array's first moment-like copy (Adam's mu)
  and the same positions are zeroed in every copy (nu too): no kept first moment meets a zeroed
  second moment, whose division would blow the next update up.
  """
  def prune(state):
    matches = _param_matches(state, adapters)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    keep = {}
    for kp, x in flat:
      hit = matches.get(tuple(kp))
      if hit is not None and hit[0] in paths_ and hit not in keep:
        keep[hit] = prune_by_magnitude(x, fraction) != 0

    def leaf(kp, x):
      hit = matches.get(tuple(kp))
      if hit is None or hit[0] not in paths_:
        return x
      return jnp.where(keep[hit], x, jnp.zeros_like(x))

    return jax.tree_util.tree_map_with_path(leaf, state)

  if fraction <= 0.0:
    return opt_state
  return jax.jit(prune)(opt_state)


def _rank_axis(ad: Any, field: str) -> int | None:
  """The rank axis of an adapter field (the `None` axis after the batch axes in the variant's
  layout), or None for a field with no rank axis."""
  lay = variants.get(ad.spec.variant).layout(ad.spec)[field]
  nb = len(ad.spec.batch_shape)
  rest = [i for i, a in enumerate(lay) if a is None and i >= nb]
  return rest[0] if len(rest) == 1 else None


RESIZABLE = ('lora', 'sora', 'adalora', 'lora_fa')


def resize(adapters: Any, keep: dict[str, Any]) -> Any:
  """Really resizes adapters: keeps the ranks `keep[path]` (indices) of each listed leaf.

  The leaf's spec gets the new rank with its scale kept (`scaling='constant'`, alpha = the old
  scale), so the kept ranks compute exactly what they did.

  Raises:
    ValueError: for a variant whose rank axis cannot be cut, an empty or out-of-range `keep`.
  """
  flat = _flat(adapters)
  new = {}
  for path, idx in keep.items():
    ad = flat[path]
    s = ad.spec
    if s.variant not in RESIZABLE:
      raise ValueError(f'Cannot resize {path!r}: variant {s.variant!r}; resizable: '
                       f'{list(RESIZABLE)}.')
    idx = np.asarray(idx, np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= s.rank:
      raise ValueError(f'keep for {path!r} must be 1 to {s.rank} rank indices in [0, {s.rank}); '
                       f'got {idx.tolist()}.')
    spec = dataclasses.replace(s, rank=int(idx.size), scaling='constant', alpha=float(s.scale))
    fields = {}
    for f in dataclasses.fields(ad):
      if f.metadata.get('static'):
        continue
      x = getattr(ad, f.name)
      axis = _rank_axis(ad, f.name)
      fields[f.name] = x if axis is None else jnp.take(x, jnp.asarray(idx), axis=axis)
    new[path] = type(ad)(**fields, spec=spec)
  return _replace_leaves(adapters, new)


def resize_opt_state(tx: optax.GradientTransformation, opt_state: Any, old: Any, new: Any,
                     keep: dict[str, Any]) -> Any:
  """The optimizer state for `new = resize(old, keep)`: moments of resized leaves sliced to
  the kept ranks, everything else (other leaves, step counts) kept."""
  flat_old = _flat(old)

  def cut(x, path, field):
    if path not in keep:
      return x
    axis = _rank_axis(flat_old[path], field)
    return x if axis is None else jnp.take(x, jnp.asarray(np.asarray(keep[path])), axis=axis)

  sliced = _map_matching(cut, opt_state, old, set(keep))
  by_path = {tuple(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(sliced)[0]}
  fresh, treedef = jax.tree_util.tree_flatten_with_path(tx.init(new))
  out = []
  for kp, x in fresh:
    y = by_path.get(tuple(kp))
    out.append(y if y is not None and np.shape(y) == np.shape(x) else x)
  return jax.tree_util.tree_unflatten(treedef, out)


def merge_and_reinit(state: TrainState, key: jax.Array, *, prune: float) -> TrainState:
  """ReLoRA's and COLA's primitive: W <- W + dW for every low-rank adapter, fresh adapters
  (the variant's own init: B = 0, so the function is unchanged), and the optimizer moments of
  those adapters magnitude-pruned by `prune` (1.0: reset). Fully trained leaves are kept."""
  low = _low_rank(state.adapters)
  specs = {p: a.spec for p, a in low.items()}
  # The base in full: merged leaves replaced (as `merge`, ties resolved).
  merged = adapters_lib.merge(state.params, _nested(low))
  spec_tree = _spec_tree(state.params, {
      p: dataclasses.replace(s, init='kaiming') if s.init not in ('kaiming', 'gaussian') else s
      for p, s in specs.items()})
  _, fresh = adapters_lib.init(key, merged, spec_tree)
  fresh = _flat(fresh)
  adapters = _replace_leaves(state.adapters, fresh)
  opt_state = prune_opt_state(state.opt_state, state.adapters, set(low), prune)
  return state._replace(params=merged, adapters=adapters, opt_state=opt_state)


def _spec_tree(params, specs: dict[str, Any]):
  """A spec tree shaped like `params` with `specs` at their paths and None elsewhere."""
  def leaf(kp, x):
    del x
    return specs.get(paths.path_str(kp))
  return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=quant_lib.is_quantized)


def _check_mergeable(name, params, spec):
  if spec is None:
    return
  leaves = spec_lib.spec_leaves(spec)
  for path, s in leaves.items():
    if s.variant == spec_lib.FULL:
      continue
    v = variants.get(s.variant)
    if v.tie is not None:
      raise ValueError(f'Dynamics {name!r} folds adapters into the base; {path!r} uses '
                       f'{s.variant!r}, whose arrays are shared across leaves. Use an untied '
                       'variant.')
  for path, _, leaf in paths.leaves_with_paths(params):
    s = leaves.get(path)
    if s is not None and s.variant != spec_lib.FULL and quant_lib.is_quantized(leaf):
      raise ValueError(f'Dynamics {name!r} folds adapters into the base, but {path!r} is '
                       'quantized: merging would requantize it at every fold. Use a float base.')


def _check_steps(name: str, total_steps: Any) -> int:
  if not isinstance(total_steps, (int, np.integer)) or isinstance(total_steps, bool) or (
      total_steps <= 0):
    raise ValueError(f'{name}: total_steps={total_steps!r} must be a positive int (the length '
                     'of training).')
  return int(total_steps)


def _check_int(name: str, key: str, value: Any, lo: int, hi: int | None = None, why: str = ''):
  if (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo or
      (hi is not None and value > hi)):
    allowed = f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'
    raise ValueError(f'{name}: {key}={value!r} must be an int {allowed}{why}.')
  return int(value)


def _check_float(name: str, key: str, value: Any, lo: float, hi: float | None = None,
                 open_lo: bool = False, open_hi: bool = False):
  ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
  if ok:
    v = float(value)
    ok = (v > lo if open_lo else v >= lo) and (hi is None or (v < hi if open_hi else v <= hi))
  if not ok:
    lb, rb = '(' if open_lo else '[', ')' if open_hi else ']'
    rng = f'{lb}{lo}, {hi}{rb}' if hi is not None else f'{">" if open_lo else ">="} {lo}'
    raise ValueError(f'{name}: {key}={value!r} must be a number in {rng}.')
  return float(value)


# ---------------------------------------------------------------------------------------------
# AdaLoRA


def _triplet_scores(stats, adapters) -> dict[str, jax.Array]:
  """Per AdaLoRA leaf: score(lambda_i) + mean score of P's i-th column + mean score of Q's i-th
  row (batch + (r,)), with score = EMA(importance) * EMA(uncertainty)."""
  out = {}
  ipt, unc = _flat(stats['ipt']), _flat(stats['unc'])
  for path, ad in _of(adapters, AdaloraParams).items():
    s = ad.spec
    nb, ni = len(s.batch_shape), len(s.in_shape)
    score = lambda f: (getattr(ipt[path], f) * getattr(unc[path], f)).astype(jnp.float32)
    p_axes = tuple(range(nb, nb + ni))
    q_axes = tuple(range(nb + 1, nb + 1 + len(s.out_shape)))
    out[path] = score('lam') + jnp.mean(score('p'), axis=p_axes) + jnp.mean(score('q'),
                                                                            axis=q_axes)
  return out


def adalora_budget(step: int, *, initial: int, target: int, total_steps: int, warmup: int,
                   final: int) -> int:
  """AdaLoRA's cubic budget b(t) (PEFT's `budget_schedule`): the initial total rank until
  `warmup`, then b_T + (b_0 - b_T) (1 - (t - warmup) / (T - final - warmup))^3, then b_T."""
  if step <= warmup:
    return initial
  if step >= total_steps - final:
    return target
  frac = 1.0 - (step - warmup) / (total_steps - final - warmup)
  return int((initial - target) * frac ** 3 + target)


def adalora(*, target_rank: int, total_steps: int, warmup: int = 0, final: int = 0,
            every: int = 1, beta1: float = 0.85, beta2: float = 0.85,
            orth_weight: float = 0.5) -> Dynamics:
  """AdaLoRA's training-time allocation for `adalora` leaves (Zhang et al., ICLR 2023; PEFT).

  Every step (inside the jitted step) the sensitivity I = |w * dL/dw| of each P, lambda, Q
  entry updates the EMAs I_bar <- beta1 I_bar + (1 - beta1) I and
  U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|. Every `every` steps after `warmup`, the total
  rank budget b(t) (`adalora_budget`, cubic from the initial total rank to
  `target_rank` x the number of adapted matrices) is met by keeping the b(t) triplets of highest
  score (I_bar * U_bar of lambda_i + the mean over P's column and Q's row), across all layers;
  the others are masked (their lambda zeroed, as PEFT). From `total_steps - final` on the mask is
  fixed at the target budget. The loss gets `orth_weight` x the mean over P and Q matrices of
  ||P^T P - I||_F and ||Q Q^T - I||_F.

  Args:
    target_rank: the final average rank per adapted matrix (PEFT's `target_r`).
    total_steps: training length (PEFT's `total_step`).
    warmup: steps at the initial budget (PEFT's `tinit`).
    final: steps at the final budget (PEFT's `tfinal`).
    every: steps between allocations (PEFT's `deltaT`).
    beta1, beta2: EMA factors of importance and uncertainty.
    orth_weight: weight of the orthogonality regularizer (the paper: 0.1 to 0.5).

  Raises:
    ValueError: at build time for bad numbers or a schedule that ends after training
      (warmup + final >= total_steps); in `check`, for a target rank above a leaf's initial
      rank or a selection without `adalora` leaves.
  """
  name = 'adalora'
  total_steps = _check_steps(name, total_steps)
  target_rank = _check_int(name, 'target_rank', target_rank, 1)
  warmup = _check_int(name, 'warmup', warmup, 0)
  final = _check_int(name, 'final', final, 0)
  every = _check_int(name, 'every', every, 1)
  if warmup + final >= total_steps:
    raise ValueError(f'{name}: the budget schedule ends after training: warmup={warmup} + '
                     f'final={final} must be < total_steps={total_steps}.')
  beta1 = _check_float(name, 'beta1', beta1, 0.0, 1.0, open_hi=True)
  beta2 = _check_float(name, 'beta2', beta2, 0.0, 1.0, open_hi=True)
  orth_weight = _check_float(name, 'orth_weight', orth_weight, 0.0)

  def budgets(adapters) -> tuple[int, int]:
    ads = _of(adapters, AdaloraParams).values()
    matrices = sum(math.prod(a.spec.batch_shape) for a in ads)
    initial = sum(math.prod(a.spec.batch_shape) * a.spec.rank for a in ads)
    return initial, target_rank * matrices

  def check(spec, params):
    _need(name, spec, ('adalora',))
    for path, s in spec_lib.spec_leaves(spec).items():
      if s.variant == 'adalora' and target_rank > s.rank:
        raise ValueError(f'{name}: target_rank={target_rank} is above the initial rank '
                         f'{s.rank} of {path!r}: the budget can only shrink. Use a target_rank '
                         f'<= {s.rank} (or a larger initial rank).')

  def init(params, adapters):
    del params
    sub = _nested(_of(adapters, AdaloraParams))
    return {'ipt': jax.tree_util.tree_map(jnp.zeros_like, sub),
            'unc': jax.tree_util.tree_map(jnp.zeros_like, sub),
            'budget': jnp.int32(budgets(adapters)[0])}

  def observe(stats, step, adapters, grads):
    del step
    own = _of(adapters, AdaloraParams)
    ads = _nested(own)
    gs = _nested({p: g for p, g in _flat(grads).items() if p in own})

    sens = lambda w, g, ref: jnp.abs(w * g).astype(ref.dtype)
    ipt = jax.tree_util.tree_map(lambda w, g, i: beta1 * i + (1 - beta1) * sens(w, g, i),
                                 ads, gs, stats['ipt'])
    unc = jax.tree_util.tree_map(
        lambda w, g, i, u: beta2 * u + (1 - beta2) * jnp.abs(sens(w, g, i) - i),
        ads, gs, ipt, stats['unc'])
    return {**stats, 'ipt': ipt, 'unc': unc}

  def after(state, old_adapters):
    del old_adapters   # pruned triplets stay at lambda = 0 (Adam's momentum would move them)
    new = {p: dataclasses.replace(a, lam=a.lam * a.mask.astype(a.lam.dtype))
           for p, a in _of(state.adapters, AdaloraParams).items()}
    return state._replace(adapters=_replace_leaves(state.adapters, new))

  def regularizer(adapters):
    terms = []
    for ad in _of(adapters, AdaloraParams).values():
      s = ad.spec
      p = common.flat_a(ad.p, s).astype(jnp.float32)         # batch + (d_in, r)
      q = common.flat_b(ad.q, s).astype(jnp.float32)         # batch + (r, d_out)
      eye = jnp.eye(s.rank, dtype=jnp.float32)
      ptp = jnp.einsum('...ir,...is->...rs', p, p) - eye
      qqt = jnp.einsum('...ro,...so->...rs', q, q) - eye
      terms.append(jnp.sqrt(jnp.sum(jnp.square(ptp), axis=(-2, -1))).reshape(-1))
      terms.append(jnp.sqrt(jnp.sum(jnp.square(qqt), axis=(-2, -1))).reshape(-1))
    if not terms or orth_weight == 0:
      return jnp.float32(0)
    return orth_weight * jnp.mean(jnp.concatenate(terms))

  @jax.jit
  def allocate(adapters, stats, budget):
    scores = _triplet_scores(stats, adapters)
    order = sorted(scores)
    flat = jnp.concatenate([scores[p].reshape(-1) for p in order])
    # Rank of every triplet by score (0 = highest); ties broken by position, so exactly
    # `budget` triplets are kept.
    rank_of = jnp.empty_like(flat, dtype=jnp.int32).at[jnp.argsort(-flat, stable=True)].set(
        jnp.arange(flat.size, dtype=jnp.int32))
    keep = rank_of < budget
    new, start = {}, 0
    ads = _of(adapters, AdaloraParams)
    for p in order:
      ad = ads[p]
      n = scores[p].size
      m = keep[start:start + n].reshape(scores[p].shape).astype(ad.mask.dtype)
      start += n
      new[p] = dataclasses.replace(ad, mask=m, lam=ad.lam * m.astype(ad.lam.dtype))
    return _replace_leaves(adapters, new)

  def schedule(step, state, tx):
    # Called every step (`every=1`): allocations at the interval during the budget phase, and
    # once at its end (step T - final) at the target budget, which stays fixed after it.
    del tx
    end = total_steps - final
    if not ((warmup < step < end and step % every == 0) or step == end):
      return state
    initial, target = budgets(state.adapters)
    b = adalora_budget(step, initial=initial, target=target, total_steps=total_steps,
                       warmup=warmup, final=final)
    adapters = allocate(state.adapters, state.stats, jnp.int32(b))
    return state._replace(adapters=adapters, stats={**state.stats, 'budget': jnp.int32(b)})

  def report(state):
    alloc = {}
    for p, ad in _of(state.adapters, AdaloraParams).items():
      kept = np.asarray(jax.device_get(ad.mask)).sum(axis=-1).astype(int)
      alloc[p] = kept.tolist() if kept.ndim else int(kept)
    total = int(sum(np.sum(v) for v in alloc.values()))
    initial, target = budgets(state.adapters)
    return {'rank_allocation': alloc, 'total_rank': total, 'initial_total_rank': initial,
            'target_total_rank': target}

  return Dynamics(name, init=init, every=1, schedule=schedule, regularizer=regularizer,
                  observe=observe, after=after, check=check, report=report)


# ---------------------------------------------------------------------------------------------
# DyLoRA


def truncate(adapters: Any, rank: int | jax.Array, *, detach_lower: bool = False) -> Any:
  """LoRA leaves cut to their first `rank` ranks (at most their own), DyLoRA-scaled.

  A[:, :b] and B[:b] are each multiplied by sqrt(r / b), so the update's scale is alpha / b
  (for alpha/r scaling) as DyLoRA's; shapes stay static (the other ranks are zeroed), so one
  compiled function serves every rank. `rank` may be traced. With `detach_lower`, ranks below
  the b-th get no gradient (DyLoRA's "frozen" mode).
  """
  new = {}
  for path, ad in _of(adapters, variants.LoraParams).items():
    s = ad.spec
    b = jnp.clip(jnp.asarray(rank, jnp.int32), 1, s.rank)
    idx = jnp.arange(s.rank)
    w = jnp.where(idx < b, jnp.sqrt(s.rank / b.astype(jnp.float32)), 0.0)
    a, bb = ad.a, ad.b
    if detach_lower:
      top = idx == b - 1
      a = jnp.where(top, a, jax.lax.stop_gradient(a))
      bb = jnp.where(_expand_rank(top, ad, 'b'), bb, jax.lax.stop_gradient(bb))
    new[path] = dataclasses.replace(ad, a=a * w.astype(a.dtype),
                                    b=bb * _expand_rank(w, ad, 'b').astype(bb.dtype))
  return _replace_leaves(adapters, new)


def _expand_rank(v, ad, field):
  """A (r,) vector broadcast along the rank axis of `field`."""
  x = getattr(ad, field)
  axis = _rank_axis(ad, field)
  shape = [1] * x.ndim
  shape[axis] = x.shape[axis]
  return v.reshape(shape)


def dylora(*, min_rank: int = 1, detach_lower: bool = False) -> Dynamics:
  """DyLoRA (Valipour et al., EACL 2023) for `lora` leaves: every step trains at a random
  truncation rank b ~ U{min_rank..r} (one draw per step, from the step's rng; per leaf
  b = min(b, its rank)), so the trained adapters work at every rank <= r (`truncate`).

  Raises:
    ValueError: for `min_rank` < 1 (build time) or above a leaf's rank (`check`).
  """
  name = 'dylora'
  min_rank = _check_int(name, 'min_rank', min_rank, 1)

  def check(spec, params):
    _need(name, spec, ('lora',))
    for path, s in spec_lib.spec_leaves(spec).items():
      if s.variant == 'lora' and min_rank > s.rank:
        raise ValueError(f'{name}: min_rank={min_rank} is above the rank {s.rank} of {path!r}.')

  def prepare(adapters, step, rng):
    del step
    if rng is None:
      raise ValueError('dylora samples a rank per step: the step needs an rng.')
    ranks = [a.spec.rank for a in _of(adapters, variants.LoraParams).values()]
    r_max = max(ranks)
    b = jax.random.randint(jax.random.fold_in(rng, 0x0D1), (), min_rank, r_max + 1)
    return truncate(adapters, b, detach_lower=detach_lower)

  def report(state):
    return {'ranks': sorted({a.spec.rank for a in _of(state.adapters,
                                                         variants.LoraParams).values()})}

  return Dynamics(name, prepare=prepare, check=check, report=report)


# ---------------------------------------------------------------------------------------------
# SoRA


def soft_threshold(x: jax.Array, t) -> jax.Array:
  """The proximal operator of t * ||x||_1: sign(x) * max(|x| - t, 0)."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0).astype(x.dtype)


def sora(*, learning_rate: float | optax.Schedule, sparsity: float = 3e-4, every: int = 100
         ) -> Dynamics:
  """SoRA (Ding et al., EMNLP 2023) for `sora` leaves: after every optimizer update the gates
  take the proximal step of the L1 penalty, g <- sign(g) max(|g| - eta_t * sparsity, 0) (eta_t:
  the learning rate at that step), and every `every` steps the ranks whose gate is zero (in all
  layers of a stacked leaf) are cut from A, B, the gate and their optimizer moments: the
  adapters really shrink (same function), and the step recompiles.

  Raises:
    ValueError: for a negative `sparsity` or `every` < 1.
  """
  name = 'sora'
  sparsity = _check_float(name, 'sparsity', sparsity, 0.0)
  every = _check_int(name, 'every', every, 1)
  lr = learning_rate if callable(learning_rate) else (lambda step: learning_rate)

  def check(spec, params):
    _need(name, spec, ('sora',))

  def after(state, old_adapters):
    del old_adapters
    t = lr(state.step - 1) * sparsity
    new = {p: dataclasses.replace(a, gate=soft_threshold(a.gate, t))
           for p, a in _of(state.adapters, variants.SoraParams).items()}
    return state._replace(adapters=_replace_leaves(state.adapters, new))

  def schedule(step, state, tx):
    del step
    keep = {}
    for p, a in _of(state.adapters, variants.SoraParams).items():
      g = np.asarray(jax.device_get(a.gate))
      alive = np.any(g.reshape(-1, g.shape[-1]) != 0, axis=0)
      if not alive.all():
        kept = np.nonzero(alive)[0]
        keep[p] = kept if kept.size else np.array([0])   # a rank-1 remnant (gate 0: no-op)
    if not keep:
      return state
    adapters = resize(state.adapters, keep)
    opt_state = resize_opt_state(tx, state.opt_state, state.adapters, adapters, keep)
    return state._replace(adapters=adapters, opt_state=opt_state)

  def report(state):
    alloc = {p: int(np.sum(np.any(np.asarray(jax.device_get(a.gate)).reshape(
        -1, a.gate.shape[-1]) != 0, axis=0))) for p, a in _of(state.adapters,
                                                              variants.SoraParams).items()}
    return {'rank_allocation': alloc, 'total_rank': int(sum(alloc.values()))}

  return Dynamics(name, every=every, schedule=schedule, after=after, check=check, report=report)


# ---------------------------------------------------------------------------------------------
# ReLoRA, COLA: merge and restart


def jagged(schedule: optax.Schedule | float, period: int, warmup: int) -> optax.Schedule:
  """ReLoRA's jagged schedule: `schedule`, times a linear re-warmup over `warmup` steps after
  every restart (at multiples of `period`; the first segment keeps `schedule`'s own warmup)."""
  base = schedule if callable(schedule) else (lambda count: schedule)

  def lr(count):
    count = jnp.asarray(count)
    since = count % period
    factor = jnp.where(count >= period, jnp.minimum(1.0, (since + 1) / warmup), 1.0)
    return base(count) * factor

  return lr


def relora(*, period: int, total_steps: int, warmup: int | None = None, prune: float = 0.99,
           seed: int = 0) -> Dynamics:
  """ReLoRA (Lialin et al., ICLR 2024): every `period` steps W <- W + s A B, A and B
  re-initialized (B = 0: the function is unchanged), `prune` of the adapters' Adam moments
  zeroed by magnitude, and the learning rate restarted from 0 over `warmup` steps (`jagged`;
  `learning_rate` wraps the run's schedule; default min(50, period // 4), the paper re-warms
  over 50 to 100 steps of 5,000-step periods). The accumulated update has rank up to
  (restarts + 1) x r.

  Raises:
    ValueError: for period < 1, a period not shorter than training (no restart would happen),
      warmup not in [1, period], prune not in [0, 1]; in `check`, tied or quantized leaves.
  """
  name = 'relora'
  total_steps = _check_steps(name, total_steps)
  period = _check_int(name, 'period', period, 1, why=' (steps between restarts)')
  if period >= total_steps:
    raise ValueError(f'{name}: period={period} must be < total_steps={total_steps}: the first '
                     'restart would come after training.')
  if warmup is None:
    warmup = max(1, min(50, period // 4))
  warmup = _check_int(name, 'warmup', warmup, 1, period)
  prune = _check_float(name, 'prune', prune, 0.0, 1.0)
  return _restarting(name, period, prune, seed, total_steps,
                     learning_rate=lambda s: jagged(s, period, warmup))


def cola(*, links: int, total_steps: int, seed: int = 0) -> Dynamics:
  """Chain of LoRA (Xia, Qin and Hazan, ICML 2024): training split into `links` equal stages;
  at the end of each, the adapters are merged into the base ("tie a knot") and a fresh LoRA
  with a fresh optimizer state starts ("extend the chain").

  Raises:
    ValueError: for links < 2 or more links than steps.
  """
  name = 'cola'
  total_steps = _check_steps(name, total_steps)
  links = _check_int(name, 'links', links, 2, total_steps,
                     why=f' (chain links, at most total_steps={total_steps})')
  return _restarting(name, total_steps // links, 1.0, seed, total_steps)


def _restarting(name, period, prune, seed, total_steps, learning_rate=None) -> Dynamics:

  def check(spec, params):
    if spec is not None and not any(s.variant != spec_lib.FULL
                                    for s in spec_lib.spec_leaves(spec).values()):
      raise ValueError(f'Dynamics {name!r} needs low-rank adapted leaves; the selection has '
                       'none.')
    _check_mergeable(name, params, spec)

  def schedule(step, state, tx):
    del tx
    if step >= total_steps:
      return state      # training is over: keep the last adapters for evaluation and export
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x5E5), step)
    return merge_and_reinit(state, key, prune=prune)

  def report(state):
    return {'restarts': max(0, (total_steps - 1) // period)}

  return Dynamics(name, every=period, schedule=schedule, learning_rate=learning_rate,
                  check=check, report=report, changes_base=True)


# ---------------------------------------------------------------------------------------------
# Delta-LoRA


def _change(w, old, new) -> jax.Array:
  """dW(new) - dW(old) in float32: one rank-2r product [A1 s1, -A0 s0] @ [B1; B0] for factored
  variants (one kernel-sized temporary, not two), else the difference of the two deltas."""
  v = variants.get(new.spec.variant)
  f1 = v.factored(w, new) if v.factored else None
  f0 = v.factored(w, old) if v.factored else None
  if f1 is None or f0 is None or f1.out_scale is not None or f0.out_scale is not None:
    return v.delta(w, new).astype(jnp.float32) - v.delta(w, old).astype(jnp.float32)
  nb = len(new.spec.batch_shape)
  a = jnp.concatenate([f1.a.astype(jnp.float32) * f1.scale,
                       -f0.a.astype(jnp.float32) * f0.scale], axis=-1)
  b = jnp.concatenate([f1.b.astype(jnp.float32), f0.b.astype(jnp.float32)], axis=nb)
  return layout.delta_canonical(a, b, new.spec.kinds, jnp.float32)


def delta_lora(*, scale: float = 2.0, start: int = 0, total_steps: int | None = None
               ) -> Dynamics:
  """Delta-LoRA (Zi et al., 2023): after every optimizer update (from step `start` on), the
  base also moves by the change of the low-rank update, W <- W + scale * (dW_{t+1} - dW_t)
  (dW = s A B). W gets no gradient and no optimizer state: the step carries the base in and out
  (donated, updated in place).

  Raises:
    ValueError: for a negative start, a start not before the end of training, or a negative
      scale; in `check`, variants whose update depends on W (DoRA), tied or quantized leaves.
  """
  name = 'delta_lora'
  scale = _check_float(name, 'scale', scale, 0.0)
  start = _check_int(name, 'start', start, 0)
  if total_steps is not None:
    total_steps = _check_steps(name, total_steps)
    if start >= total_steps:
      raise ValueError(f'{name}: start={start} must be < total_steps={total_steps}: the base '
                       'would never be updated.')

  def check(spec, params):
    _check_mergeable(name, params, spec)
    if spec is None:
      return
    for path, s in spec_lib.spec_leaves(spec).items():
      if s.variant != spec_lib.FULL and variants.get(s.variant).unmerge is not None:
        raise ValueError(f'{name}: {path!r} uses {s.variant!r}, whose update depends on W; '
                         'Delta-LoRA needs an additive one (lora, lora_fa, vera, ...).')

  def after(state, old_adapters):
    old = _low_rank(old_adapters)
    new = _low_rank(state.adapters)
    on = (state.step - 1 >= start).astype(jnp.float32)

    def leaf(kp, w):
      path = paths.path_str(kp)
      if path not in new:
        return w
      return (w.astype(jnp.float32) + (on * scale) * _change(w, old[path], new[path])
              ).astype(w.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, state.params)
    return state._replace(params=params)

  return Dynamics(name, after=after, check=check, changes_base=True)


# ---------------------------------------------------------------------------------------------
# The registry configs use, and the effective rank of an update.

_FACTORIES: dict[str, Callable[..., Dynamics]] = {
    'adalora': adalora, 'dylora': dylora, 'sora': sora, 'relora': relora, 'cola': cola,
    'delta_lora': delta_lora,
}
# The variant each method trains.
VARIANT = {'adalora': 'adalora', 'dylora': 'lora', 'sora': 'sora', 'relora': 'lora',
           'cola': 'lora', 'delta_lora': 'lora'}


def names() -> tuple[str, ...]:
  return tuple(_FACTORIES)


def get(name: str, **options: Any) -> Dynamics:
  """The method `name` built with `options` (each factory's keyword arguments; the loop's
  `total_steps`, `learning_rate` and `seed` are passed only to factories that take them).

  Raises:
    ValueError: for an unknown name, unknown options, or bad settings (from the factory).
  """
  if not name or name == 'none':
    return none()
  if name not in _FACTORIES:
    raise ValueError(f'Unknown dynamics {name!r}; allowed: {sorted(_FACTORIES)}.')
  import inspect  # pylint: disable=g-import-not-at-top
  params = inspect.signature(_FACTORIES[name]).parameters
  loop = {'total_steps', 'learning_rate', 'seed'}
  unknown = sorted(k for k in options if k not in params and k not in loop)
  if unknown:
    raise ValueError(f'Unknown options {unknown} for dynamics {name!r}; allowed: '
                     f'{sorted(k for k in params if k not in loop)}.')
  return _FACTORIES[name](**{k: v for k, v in options.items() if k in params})


def update_ranks(initial_params: Any, params: Any, adapters: Any, *, rtol: float = 1e-3
                 ) -> dict[str, Any]:
  """Numerical rank of each adapted matrix's total update, merge(params, adapters) - W_0
  (singular values above `rtol` x the largest; per layer of stacked leaves).

  For methods that fold into the base (ReLoRA, COLA, Delta-LoRA) this is the rank the whole
  run added, which can exceed the adapters' rank. Quantized leaves are compared dequantized.
  """
  low = _low_rank(adapters)
  merged = adapters_lib.merge(params, _nested(low))
  m_flat = {p: x for p, _, x in paths.leaves_with_paths(quant_lib.dequantize(merged))}
  w_flat = {p: x for p, _, x in paths.leaves_with_paths(quant_lib.dequantize(initial_params))}
  out = {}
  for p, ad in low.items():
    s = ad.spec
    d = (np.asarray(m_flat[p], np.float64) - np.asarray(w_flat[p], np.float64))
    mat = np.asarray(common.matrix(jnp.asarray(d), s)).reshape(
        (-1, math.prod(s.in_shape), math.prod(s.out_shape)))
    ranks = []
    for m in mat:
      sv = np.linalg.svd(m, compute_uv=False)
      ranks.append(int(np.sum(sv > rtol * sv[0])) if sv.size and sv[0] > 0 else 0)
    out[p] = ranks if s.batch_shape else ranks[0]
  return out
