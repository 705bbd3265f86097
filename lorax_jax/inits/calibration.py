"""Calibration: one pass over a few batches computing what the selected inits need.

`init(key, params, spec, fn=loss_fn, batches=iterator, num_batches=8)` runs the calibrated inits
(records whose `needs` include `'gradients'` or `'activations'`: LoRA-GA, EVA, CorDA) for their
leaves. `fn(params, batch)` is the loss (a scalar, or `(loss, aux)`). Each batch is drawn once:
the gradient w.r.t. the leaves whose init needs gradients is accumulated, and the inputs of the
kernels whose init needs activations are captured (`interpreter.capture_inputs`, inside scanned
layers too) and summed as `(X^T X, X, token count)`. An init with a `stop` test (EVA) ends its
accumulation when it has converged; the pass ends when no init needs more.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from lorax_jax import interpreter
from lorax_jax import paths
from lorax_jax import quant
from lorax_jax.inits.base import ACTIVATIONS, GRADIENTS, get
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common


def _take(batches: Iterable[Any], num_batches: int, what: str):
  """Yields exactly `num_batches` batches; a clear error when the iterator runs dry."""
  if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
    raise ValueError(f'num_batches={num_batches!r} must be an int >= 1.')
  if batches is None:
    raise ValueError(f'{what} needs calibration batches: pass batches= (an iterable of batches '
                     'for fn).')
  it = iter(batches)
  for i in range(num_batches):
    try:
      yield next(it)
    except StopIteration:
      raise ValueError(f'The calibration batches ran dry after {i} of num_batches={num_batches} '
                       f'({what}); pass more batches or a smaller num_batches.') from None


def _check_fn(fn, what):
  if fn is None or not callable(fn):
    raise ValueError(f'{what} needs fn=: a function (params, batch) -> scalar loss; got {fn!r}.')


def _scalar(out):
  loss = out[0] if isinstance(out, (tuple, list)) else out
  if jnp.ndim(loss) != 0:
    raise ValueError(f'The calibration fn must return a scalar loss (or (loss, aux)); got shape '
                     f'{jnp.shape(loss)}.')
  return loss


def _gradients(loss_fn: Callable, params: Any, selected: Iterable[str]):
  """`(ws, acc, step)`: the selected leaves (dequantized), a zero sum, and the jitted
  `step(acc, ws, batch) -> acc + dL/dW`."""
  selected = set(selected)
  flat = {p: leaf for p, _, leaf in paths.leaves_with_paths(params)}
  missing = sorted(selected - set(flat))
  if missing:
    raise ValueError(f'No parameters at {missing}.')
  ws = {p: quant.dequantize_array(flat[p]) if quant.is_quantized(flat[p]) else flat[p]
        for p in sorted(selected)}

  def with_ws(ws):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: ws.get(paths.path_str(kp), x), params, is_leaf=quant.is_quantized)

  @jax.jit
  def step(acc, ws, batch):
    def loss(ws):   # lora(): the other leaves may be quantized
      return _scalar(interpreter.lora(loss_fn)(with_ws(ws), batch))
    g = jax.grad(loss)(ws)
    return jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), acc, g)

  acc = jax.tree_util.tree_map(lambda w: jnp.zeros(w.shape, common.compute_dtype(w)), ws)
  return ws, acc, step


@jax.jit
def _add(acc, new):
  return jax.tree_util.tree_map(jnp.add, acc, new)


def _capture(fn: Callable, specs: dict[str, LeafSpec], what: str):
  """`batch -> {path: (X^T X, X, count)}` for one batch; ValueError for uncaptured kernels."""
  capture = jax.jit(interpreter.capture_inputs(fn, specs))

  def run(params, batch):
    _, new = capture(params, batch)
    missing = sorted(set(specs) - set(new))
    if missing:
      raise ValueError(f'{what}: no dense (dot_general) use of {missing} was found, so their '
                       'inputs cannot be captured (conv kernels and embedding tables are not '
                       'supported by activation-based inits).')
    return new

  return run


def mean_gradients(loss_fn: Callable, params: Any, selected: Iterable[str], batches: Iterable,
                   num_batches: int) -> dict[str, jax.Array]:
  """The mean over `num_batches` of dL/dW for the selected leaves (quantized ones dequantized).

  Only the selected leaves are differentiated; the rest of `params` is a constant.
  """
  _check_fn(loss_fn, 'lora_ga')
  ws, acc, step = _gradients(loss_fn, params, selected)
  for batch in _take(batches, num_batches, 'lora_ga'):
    acc = step(acc, ws, batch)
  return jax.tree_util.tree_map(lambda a: a / num_batches, acc)


def input_statistics(fn: Callable, params: Any, specs: dict[str, LeafSpec], batches: Iterable,
                     num_batches: int, *, what: str = 'calibration',
                     stop: Callable[[dict], bool] | None = None) -> tuple[dict, int]:
  """Sums of X^T X, X and token counts of the inputs of the kernels in `specs`.

  Args:
    fn: `(params, batch) -> anything` (run forward only).
    params: the base parameters.
    specs: `{path: LeafSpec}` of the kernels to capture.
    batches: an iterable of batches.
    num_batches: how many to use (at most, with `stop`).
    what: the init named in errors.
    stop: optional `(stats) -> bool` called after every batch; True ends the pass early.

  Returns:
    `(stats, batches_used)`.

  Raises:
    ValueError: when the batches run dry, or a kernel's input could not be captured (a kernel
      used only by a conv or an embedding lookup).
  """
  _check_fn(fn, what)
  capture = _capture(fn, specs, what)
  stats = None
  used = 0
  for batch in _take(batches, num_batches, what):
    new = capture(params, batch)
    stats = new if stats is None else _add(stats, new)
    used += 1
    if stop is not None and stop(stats):
      break
  return stats, used


def run(key: jax.Array, params: Any, specs: dict[str, LeafSpec], fn: Callable,
        batches: Iterable, num_batches: int):
  """All calibrated inits of `specs` in one pass: `{path: (base, a, b, spec) or None}` (None:
  no adapter, e.g. EVA gave the leaf rank 0). Every init sees the same first `num_batches`
  batches (fewer for one whose `stop` test ended its accumulation)."""
  by_init: dict[str, dict[str, LeafSpec]] = {}
  for path, s in specs.items():
    by_init.setdefault(s.init, {})[path] = s
  what = ', '.join(sorted(by_init))
  _check_fn(fn, what)
  records = {name: get(name) for name in by_init}
  grad_paths = sorted(p for p, s in specs.items() if GRADIENTS in records[s.init].needs)
  active = {p: s for p, s in specs.items() if ACTIVATIONS in records[s.init].needs}
  stops = {name: rec.stop(by_init[name]) for name, rec in records.items()
           if rec.stop is not None and ACTIVATIONS in rec.needs}
  if grad_paths:
    ws, acc, step = _gradients(fn, params, grad_paths)
  captures: dict[frozenset, Callable] = {}
  stats: dict[str, Any] = {}
  for batch in _take(batches, num_batches, what):
    if grad_paths:
      acc = step(acc, ws, batch)
    if active:
      group = frozenset(active)
      if group not in captures:
        captures[group] = _capture(fn, dict(active), what)
      new = captures[group](params, batch)
      stats = {**stats, **(new if not stats else _add({p: stats[p] for p in new}, new))}
      for name, stop in stops.items():
        mine = by_init[name]
        if all(p in active for p in mine) and stop({p: stats[p] for p in mine}):
          active = {p: s for p, s in active.items() if p not in mine}
    if not grad_paths and not active:
      break
  if grad_paths:
    grads = jax.tree_util.tree_map(lambda a: a / num_batches, acc)
  flat = {p: leaf for p, _, leaf in paths.leaves_with_paths(params)}
  out = {}
  for name, mine in by_init.items():
    data = {p: {} for p in mine}
    for p in mine:
      if GRADIENTS in records[name].needs:
        data[p][GRADIENTS] = grads[p]
      if ACTIVATIONS in records[name].needs:
        data[p][ACTIVATIONS] = stats[p]
    out.update(records[name].calibrate(key, {p: flat[p] for p in mine}, mine, data))
  return out
