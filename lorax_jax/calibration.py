"""Calibrated initializations: LoRA-GA, EVA and CorDA from a few batches of data.

`init(key, params, spec, fn=loss_fn, batches=iterator, num_batches=8)` runs them for the leaves
whose spec `init` is `'lora_ga'`, `'eva'` or `'corda'`. `fn(params, batch)` is the loss (a
scalar): LoRA-GA differentiates it, EVA and CorDA run it forward and capture each selected
kernel's input activations (`interpreter.capture_inputs`), inside scanned layers too.

  lora_ga  G = the mean gradient of the loss w.r.t. W over the batches; from G's (exact) SVD
           A = the first r input-side singular vectors, B = the output-side ones r+1..2r
           (`direction='ArB2r'`), both times d_out^(1/4) / sqrt(gamma) (`scale='stable'`,
           gamma 16); the base becomes W - s*A@B. As the official LoRA-GA code (Wang, Yu and
           Li, 2024); PEFT's port scales only B and multiplies it by the singular values.
  eva      C = the (centered) covariance of the layer's inputs, accumulated batch by batch
           until, for every layer, its first r_l components agree with the previous batch's
           to cosine `tau` (or `num_batches` are used); A = the top r_l eigenvectors (as rows
           of PEFT's lora_A, largest entry positive), B = 0, base unchanged. The ranks r_l are
           redistributed across the eva layers by explained-variance ratio under the budget
           sum(r), at most round(`rho` * r) each; with `adjust_scaling` alpha becomes
           alpha * r_l / r, keeping the scale (Paischer et al., 2024; PEFT's EvaConfig).
  corda    C = the mean of x x^T over the layer's input tokens, damped: C_d = C + `damping` *
           mean(diag C) * I; the SVD W_t C_d = U S V^T (W_t the (out, in) weight),
           V_hat = C_d^-1 V; `mode='ipm'` keeps the largest r components, `'kpm'` the
           smallest. A = V_hat_r sqrt(S_r / s), B = sqrt(S_r / s) U_r^T; the base becomes
           W - s*A@B (Yang et al., 2024; PEFT's corda). PEFT normalizes each sample's
           activations by their maximum before averaging: that rescales C, which leaves
           s*A@B unchanged and only moves a constant factor between A and B.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import inits
from lorax_jax import interpreter
from lorax_jax import paths
from lorax_jax import quant
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


def mean_gradients(loss_fn: Callable, params: Any, selected: Iterable[str], batches: Iterable,
                   num_batches: int) -> dict[str, jax.Array]:
  """The mean over `num_batches` of dL/dW for the selected leaves (quantized ones dequantized).

  Only the selected leaves are differentiated; the rest of `params` is a constant.
  """
  _check_fn(loss_fn, 'lora_ga')
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
  for batch in _take(batches, num_batches, 'lora_ga'):
    acc = step(acc, ws, batch)
  return jax.tree_util.tree_map(lambda a: a / num_batches, acc)


def _scalar(out):
  loss = out[0] if isinstance(out, (tuple, list)) else out
  if jnp.ndim(loss) != 0:
    raise ValueError(f'The calibration fn must return a scalar loss (or (loss, aux)); got shape '
                     f'{jnp.shape(loss)}.')
  return loss


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
  capture = jax.jit(interpreter.capture_inputs(fn, specs))

  @jax.jit
  def add(acc, new):
    return jax.tree_util.tree_map(jnp.add, acc, new)

  stats = None
  used = 0
  for batch in _take(batches, num_batches, what):
    _, new = capture(params, batch)
    missing = sorted(set(specs) - set(new))
    if missing:
      raise ValueError(f'{what}: no dense (dot_general) use of {missing} was found, so their '
                       'inputs cannot be captured (conv kernels and embedding tables are not '
                       'supported by activation-based inits).')
    stats = new if stats is None else add(stats, new)
    used += 1
    if stop is not None and stop(stats):
      break
  return stats, used


# ---------------------------------------------------------------------------------------------
# Per-leaf math.


def lora_ga(w: jax.Array, spec: LeafSpec, grad: jax.Array):
  """LoRA-GA factors from the mean gradient `grad` (W's shape): `(base, a, b)`."""
  g = common.matrix(grad.astype(common.compute_dtype(grad)), spec)   # batch + (d_in, d_out)
  u, s, vh = inits.svd(g)            # u: input side, vh: output side
  r = spec.rank
  direction = spec.init_opt('direction')
  if direction == 'ArB2r':
    a, b = u[..., :, :r], vh[..., r:2 * r, :]
  elif direction == 'A2rBr':
    a, b = u[..., :, r:2 * r], vh[..., :r, :]
  elif direction == 'ArBr':
    a, b = u[..., :, :r], vh[..., :r, :]
  else:   # 'random': r of the first 2r directions each, without replacement
    perm = np.random.RandomState(0).permutation(2 * r)
    a, b = u[..., :, perm[:r]], vh[..., perm[r:], :]
  d_in, d_out = g.shape[-2:]
  mode = spec.init_opt('scale')
  gamma = float(spec.init_opt('stable_gamma'))
  if mode == 'stable':
    a = a * d_out ** 0.25 / math.sqrt(gamma)
    b = b * d_out ** 0.25 / math.sqrt(gamma)
  elif mode == 'weight_svd':   # both times mean(sqrt(sigma_W[:r] / s))
    sw = inits.svd(common.matrix(w.astype(common.compute_dtype(w)), spec))[1]
    f = jnp.mean(jnp.sqrt(sw[..., :r] / spec.scale), -1)[..., None, None]
    a, b = a * f, b * f
  elif mode == 'gd_scale':
    a, b = a / spec.scale, b / spec.scale
  return inits._finish(w, spec, a, b)  # pylint: disable=protected-access


def covariance(stats, center: bool):
  gram, total, count = stats
  n = count[..., None, None]
  if not center:
    return gram / n
  mean = total / count[..., None]
  return (gram - n * mean[..., :, None] * mean[..., None, :]) / jnp.maximum(n - 1, 1)


def _eigh_desc(c):
  vals, vecs = jnp.linalg.eigh(c)
  return vals[..., ::-1], vecs[..., :, ::-1]


def corda(w: jax.Array, spec: LeafSpec, stats):
  """CorDA factors from the input statistics: `(base, a, b)`."""
  c = stats[0] / stats[2][..., None, None]                  # mean X^T X, batch + (d_in, d_in)
  d_in = c.shape[-1]
  damp = spec.init_opt('damping') * jnp.mean(jnp.diagonal(c, axis1=-2, axis2=-1), -1)
  c = c + damp[..., None, None] * jnp.eye(d_in, dtype=c.dtype)
  m = common.matrix(w.astype(common.compute_dtype(w, c)), spec)   # batch + (d_in, d_out)
  c = c.astype(m.dtype)
  # torch: svd(W_t @ C) with W_t = m^T: W_t C = U S V^T  ->  C m = V S U^T (here: svd(C m)).
  p, s, qh = inits.svd(jnp.swapaxes(m, -1, -2) @ c)         # (d_out, d_in) = P S Qh
  v_hat = jnp.linalg.solve(c, jnp.swapaxes(qh, -1, -2))     # C^-1 V: (d_in, k)
  r = spec.rank
  sl = slice(0, r) if spec.init_opt('mode') == 'ipm' else slice(-r, None)
  a, b = inits.split_sqrt(v_hat[..., :, sl], s[..., sl], jnp.swapaxes(p[..., :, sl], -1, -2),
                          spec.scale)
  return inits._finish(w, spec, a, b)  # pylint: disable=protected-access


def eva_ranks(ratios: dict[str, np.ndarray], specs: dict[str, LeafSpec]) -> dict[str, int]:
  """EVA's rank redistribution: the largest explained-variance ratios across all eva leaves
  (each leaf offering its top round(rho * r) components) win the budget sum(r)."""
  budget = sum(s.rank * max(1, math.prod(s.batch_shape)) for s in specs.values())
  entries = []
  for path, ratio in ratios.items():
    ratio = np.asarray(ratio).reshape(-1, np.shape(ratio)[-1])   # (stack, k)
    for j, row in enumerate(ratio):
      for v in row:
        entries.append((float(v), path, j))
  entries.sort(key=lambda e: -e[0])
  counts: dict[tuple[str, int], int] = {}
  for _, path, j in entries[:budget]:
    counts[(path, j)] = counts.get((path, j), 0) + 1
  # A stacked (scanned) kernel needs one rank for all its layers: the largest its layers won.
  out = {}
  for path in ratios:
    stack = max(1, math.prod(specs[path].batch_shape))
    out[path] = max(counts.get((path, j), 0) for j in range(stack))
  return out


def eva(key, params, specs: dict[str, LeafSpec], fn, batches, num_batches):
  """EVA for the leaves in `specs`: `{path: (a, new_spec) or None}` (None: rank 0, no adapter)."""
  del key
  max_k = {p: min(int(round(s.init_opt('rho') * s.rank)), math.prod(s.in_shape))
           for p, s in specs.items()}
  tau = min(s.init_opt('tau') for s in specs.values())
  previous: dict[str, Any] = {}

  def components(st, k):
    vals, vecs = _eigh_desc(covariance(st, center=True))
    vecs = vecs[..., :, :k]
    # PEFT's sign convention (svd_flip on V^T): each component's largest entry is positive.
    big = jnp.take_along_axis(vecs, jnp.argmax(jnp.abs(vecs), -2)[..., None, :], -2)
    return jnp.maximum(vals, 0), vecs * jnp.sign(big)

  def converged(stats) -> bool:
    """PEFT's test: every layer's first r_l components (for the current r_l) have cosine
    similarity >= tau with the previous batch's."""
    got = {p: components(st, max_k[p]) for p, st in stats.items()}
    ratios = {p: np.asarray(v[..., :max_k[p]] / jnp.sum(v, -1, keepdims=True))
              for p, (v, _) in got.items()}
    ranks = eva_ranks(ratios, specs)
    done = bool(previous)
    for path, (_, vecs) in got.items():
      r = ranks[path]
      if r and path in previous:
        cos = jnp.sum(vecs[..., :r] * previous[path][..., :r], axis=-2)
        done = done and bool(jnp.all(cos >= tau))
      previous[path] = vecs
    return done

  stats, _ = input_statistics(fn, params, specs, batches, num_batches, what='eva',
                              stop=converged)
  ratios, vectors = {}, {}
  for path, st in stats.items():
    vals, vecs = components(st, max_k[path])
    ratios[path] = np.asarray(vals[..., :max_k[path]] / jnp.sum(vals, -1, keepdims=True))
    vectors[path] = vecs
  ranks = eva_ranks(ratios, specs)
  out = {}
  for path, s in specs.items():
    r = ranks[path]
    if r == 0:
      out[path] = None
      continue
    alpha = s.alpha * r / s.rank if s.init_opt('adjust_scaling') else s.alpha
    if s.scaling == 'constant':
      alpha = s.alpha
    elif s.scaling == 'rslora' and s.init_opt('adjust_scaling'):
      alpha = s.alpha * math.sqrt(r / s.rank)
    new = dataclasses.replace(s, rank=r, alpha=float(alpha))
    out[path] = (vectors[path][..., :, :r], new)
  return out


def run(key: jax.Array, params: Any, specs: dict[str, LeafSpec], fn: Callable,
        batches: Iterable, num_batches: int):
  """All calibrated inits of `specs`: `{path: (base, a, b, spec) or None}` (None: EVA gave the
  leaf rank 0). Each kind takes its own `num_batches` batches from `batches`."""
  flat = {p: leaf for p, _, leaf in paths.leaves_with_paths(params)}
  by_kind: dict[str, dict[str, LeafSpec]] = {}
  for path, s in specs.items():
    by_kind.setdefault(s.init, {})[path] = s
  if not isinstance(batches, (list, tuple)) and len(by_kind) > 1:
    batches = list(itertools.islice(iter(batches), num_batches))
  out = {}
  # LoRA-GA and CorDA are residual inits, which `adapters.init` refuses on quantized leaves.
  if 'lora_ga' in by_kind:
    grads = mean_gradients(fn, params, by_kind['lora_ga'], batches, num_batches)
    for path, s in by_kind['lora_ga'].items():
      out[path] = (*lora_ga(flat[path], s, grads[path]), s)
  if 'corda' in by_kind:
    stats, _ = input_statistics(fn, params, by_kind['corda'], batches, num_batches, what='corda')
    for path, s in by_kind['corda'].items():
      out[path] = (*corda(flat[path], s, stats[path]), s)
  if 'eva' in by_kind:
    for path, got in eva(key, params, by_kind['eva'], fn, batches, num_batches).items():
      if got is None:
        out[path] = None
        continue
      a_mat, s = got
      dtype = common.adapter_dtype(s, flat[path])
      a = common.unflat_a(a_mat.astype(dtype), s)
      b = jnp.zeros(s.batch_shape + (s.rank,) + s.out_shape, dtype)
      out[path] = (flat[path], a, b, s)
  return out
