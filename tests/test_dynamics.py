"""Training-time dynamics (`lorax_jax.dynamics`): AdaLoRA, DyLoRA, SoRA, ReLoRA, COLA, Delta-LoRA.

Each method on a small task built so that its behaviour shows: AdaLoRA gives the rank budget to
the layer that matters, DyLoRA works at every rank, ReLoRA's restarts add up to an update of
rank > r, Delta-LoRA moves the base by exactly the change of its update without a base
gradient, SoRA's pruning really shrinks the adapters without changing the function, COLA's
knots keep the function. Bad settings fail when the method is built.
"""

from __future__ import annotations

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_jax as lj
from lorax_jax import dynamics as D
from tests import helpers

D_IN, D_OUT = 12, 10


def _linear(params, x):
  """Two inputs, two layers: y = x1 @ Wa + x2 @ Wb."""
  return x[0] @ params['a']['kernel'] + x[1] @ params['b']['kernel']


def _params(key=0):
  ka, kb = jax.random.split(jax.random.key(key))
  return {'a': {'kernel': jax.random.normal(ka, (D_IN, D_OUT)) / np.sqrt(D_IN)},
          'b': {'kernel': jax.random.normal(kb, (D_IN, D_OUT)) / np.sqrt(D_IN)}}


def _low_rank_target(key, singular_values):
  """A D_IN x D_OUT matrix with the given singular values (random orthonormal factors)."""
  ku, kv = jax.random.split(jax.random.key(key))
  r = len(singular_values)
  u = np.linalg.qr(np.asarray(jax.random.normal(ku, (D_IN, r))))[0]
  v = np.linalg.qr(np.asarray(jax.random.normal(kv, (D_OUT, r))))[0]
  return jnp.asarray(u @ np.diag(singular_values) @ v.T, jnp.float32)


def _batch(i, change_a, change_b=None, n=64):
  """Inputs and targets of the original layers plus a change: y = x1 (Wa + dA) + x2 (Wb + dB).
  The targets are fixed however the base moves (ReLoRA, Delta-LoRA fold into it)."""
  w0 = _params()
  k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(99), i))
  x = (jax.random.normal(k1, (n, D_IN)), jax.random.normal(k2, (n, D_IN)))
  y = x[0] @ (w0['a']['kernel'] + change_a) + x[1] @ (
      w0['b']['kernel'] + (change_b if change_b is not None else 0.0))
  return x, y


def _loss(joined, batch, rng):
  del rng
  x, y = batch
  return jnp.mean(jnp.square(lj.lora(_linear)(joined, x) - y))


def _fit(params, setting, dyn, steps, target, lr=2e-2):
  """Trains the adapters of `setting` with `dyn`; returns (state, losses, reshaped steps)."""
  params = jax.tree_util.tree_map(jnp.array, params)   # a copy: methods may donate the base
  spec = lj.make_spec(params, [('kernel', setting)])
  params, adapters = lj.init(jax.random.key(1), params, spec)
  dyn.check(spec, params)
  schedule = optax.constant_schedule(lr)
  if dyn.learning_rate is not None:
    schedule = dyn.learning_rate(schedule)
  tx = lj.optimizer(schedule)
  state = D.init_state(params, adapters, tx, dyn)
  step = lj.make_train_step(_loss, tx, dyn)
  losses, reshaped = [], []
  for i in range(steps):
    state, loss = step(state, _batch(i, *target), jax.random.key(i))
    losses.append(float(loss))
    state, changed = D.apply_schedule(dyn, i + 1, state, tx)
    if changed:
      reshaped.append(i + 1)
  return state, losses, reshaped


def _eval_loss(state, adapters, target, n=512):
  return float(_loss(lj.join(state.params, adapters), _batch(10**6, *target, n=n), None))


# ---------------------------------------------------------------------------------------------
# AdaLoRA


def test_adalora_gives_the_budget_to_the_layer_that_matters():
  """Only layer a's input carries the task (a rank-4 change); the budget (4 of the initial 8)
  ends up with a, and the final total rank is exactly the budget."""
  target = (_low_rank_target(3, [3.0, 2.5, 2.0, 1.5]),)
  steps = 80
  dyn = D.adalora(target_rank=2, total_steps=steps, warmup=10, final=15, orth_weight=0.1)
  state, losses, reshaped = _fit(_params(), {'variant': 'adalora', 'rank': 4}, dyn, steps,
                                 target)
  report = dyn.report(state)
  assert report['total_rank'] == report['target_total_rank'] == 4
  assert report['initial_total_rank'] == 8
  alloc = report['rank_allocation']
  assert alloc['a/kernel'] >= 3 and alloc['a/kernel'] > alloc['b/kernel'], alloc
  assert not reshaped                          # masks: static shapes, no recompilation
  assert losses[-1] < 0.2 * losses[0]
  masks = {p: np.asarray(a.mask) for p, a in lj.paths.flat(
      state.adapters, lj.adapters.is_adapter).items()}
  lams = {p: np.asarray(a.lam) for p, a in lj.paths.flat(
      state.adapters, lj.adapters.is_adapter).items()}
  for p in masks:   # pruned triplets are zeroed (as PEFT) and stay out of the update
    assert np.all(lams[p][masks[p] == 0] == 0)


def test_adalora_budget_schedule_and_orthogonality():
  b = lambda t: D.adalora_budget(t, initial=100, target=40, total_steps=110, warmup=10,
                                 final=20)
  assert [b(0), b(10), b(110 - 20), b(109)] == [100, 100, 40, 40]
  assert b(11) <= 100 and b(50) == int(60 * (1 - 40 / 80) ** 3 + 40)
  assert all(b(t) >= b(t + 1) for t in range(110))
  # ||P^T P - I||_F + ||Q Q^T - I||_F, averaged over matrices: 0 for orthonormal factors.
  params = {'w': jnp.zeros((6, 5))}
  spec = lj.make_spec(params, [('w', {'variant': 'adalora', 'rank': 3})])
  _, ad = lj.init(jax.random.key(0), params, spec)
  reg = D.adalora(target_rank=1, total_steps=10, orth_weight=0.5).regularizer
  p = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 3)))[0]
  q = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 3)))[0].T
  ortho = {'w': lj.AdaloraParams(jnp.asarray(p, jnp.float32), ad['w'].lam,
                                 jnp.asarray(q, jnp.float32), ad['w'].mask, ad['w'].spec)}
  assert float(reg(ortho)) < 1e-5
  scaled = jax.tree_util.tree_map(lambda x: 2 * x, ortho)   # P^T P = 4I: ||3I||_F = 3 sqrt(3)
  np.testing.assert_allclose(float(reg(scaled)), 0.5 * 3 * np.sqrt(3), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# DyLoRA


def test_dylora_is_usable_at_every_rank():
  """Trained with random truncation, the adapter's loss falls with the rank it is cut to, and
  beats a plain LoRA of the same training cut to the same small rank."""
  target = (_low_rank_target(5, [4.0, 2.0, 1.0, 0.5]),)
  params = _params()
  dy, _, _ = _fit(params, {'variant': 'lora', 'rank': 4, 'alpha': 4.0}, D.dylora(), 250,
                  target)
  plain, _, _ = _fit(params, {'variant': 'lora', 'rank': 4, 'alpha': 4.0}, D.none(), 250,
                     target)
  base = _eval_loss(dy, jax.tree_util.tree_map(jnp.zeros_like, dy.adapters), target)
  by_rank = [_eval_loss(dy, D.truncate(dy.adapters, r), target) for r in range(1, 5)]
  assert all(l < 0.5 * base for l in by_rank), (base, by_rank)
  assert all(a >= b * 0.98 for a, b in zip(by_rank, by_rank[1:])), by_rank   # monotone-ish
  assert by_rank[-1] < 0.3 * by_rank[0]
  plain_r1 = _eval_loss(plain, D.truncate(plain.adapters, 1), target)
  assert by_rank[0] < 0.5 * plain_r1, (by_rank[0], plain_r1)
  # Truncating to the full rank is the adapter itself.
  np.testing.assert_allclose(_eval_loss(dy, D.truncate(dy.adapters, 4), target),
                             _eval_loss(dy, dy.adapters, target), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# SoRA


def test_sora_proximal_step_and_pruning_really_shrink_the_adapters():
  target = (_low_rank_target(7, [3.0, 1.0]),)
  params = _params()
  spec = lj.make_spec(params, [('kernel', {'variant': 'sora', 'rank': 6})])
  params, adapters = lj.init(jax.random.key(1), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(2), scale=0.5)
  lr, xi = 1e-2, 20.0
  dyn = D.sora(learning_rate=lr, sparsity=xi, every=1)
  tx = lj.optimizer(lr)
  state = D.init_state(params, adapters, tx, dyn)
  plain = lj.make_train_step(_loss, tx, D.none(), donate=False)
  batch = _batch(0, *target)
  ref, _ = plain(state, batch, None)
  new, _ = lj.make_train_step(_loss, tx, dyn, donate=False)(state, batch, None)
  for p in ('a/kernel', 'b/kernel'):   # the gate's proximal L1 step after the Adam update
    g = lj.paths.flat(ref.adapters, lj.adapters.is_adapter)[p].gate
    got = lj.paths.flat(new.adapters, lj.adapters.is_adapter)[p].gate
    np.testing.assert_allclose(got, np.sign(g) * np.maximum(np.abs(g) - lr * xi, 0), atol=1e-7)
  # Zero some gates by hand: the schedule cuts those ranks, the function is unchanged.
  flat = lj.paths.flat(new.adapters, lj.adapters.is_adapter)
  gate = np.array(flat['a/kernel'].gate)
  gate[[0, 2, 5]] = 0
  ad = D.base.replace_leaves(new.adapters, {'a/kernel': lj.SoraParams(
      flat['a/kernel'].a, flat['a/kernel'].b, jnp.asarray(gate), flat['a/kernel'].spec)})
  state = new._replace(adapters=ad)
  x, _ = batch
  before = lj.lora(_linear)(lj.join(state.params, state.adapters), x)
  mu_before = np.asarray(state.opt_state.inner_states['lora_a'].inner_state[0].mu['a'][
      'kernel'].a)
  gate_b = np.asarray(flat['b/kernel'].gate)
  pruned, changed = D.apply_schedule(dyn, 1, state, tx)
  assert changed
  a = lj.paths.flat(pruned.adapters, lj.adapters.is_adapter)['a/kernel']
  b_leaf = lj.paths.flat(pruned.adapters, lj.adapters.is_adapter)['b/kernel']
  assert a.spec.rank == int(np.sum(gate != 0)) and a.a.shape == (D_IN, a.spec.rank)
  assert a.b.shape == (a.spec.rank, D_OUT) and a.gate.shape == (a.spec.rank,)
  assert b_leaf.spec.rank == max(1, int(np.sum(gate_b != 0)))
  assert a.spec.scale == flat['a/kernel'].spec.scale   # the kept ranks compute what they did
  after = lj.lora(_linear)(lj.join(pruned.params, pruned.adapters), x)
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
  mu = np.asarray(pruned.opt_state.inner_states['lora_a'].inner_state[0].mu['a']['kernel'].a)
  np.testing.assert_array_equal(mu, mu_before[:, gate != 0])   # moments sliced, not reset
  assert lj.count_params(pruned.adapters) < lj.count_params(state.adapters)
  # Training goes on at the new shapes; with no zero gate the schedule changes nothing.
  keep_all = D.sora(learning_rate=lr, sparsity=0.0, every=1)
  pruned, loss = lj.make_train_step(_loss, tx, keep_all)(pruned, batch, None)
  assert np.isfinite(float(loss))
  if all(np.all(np.asarray(l.gate) != 0) for l in lj.paths.flat(
      pruned.adapters, lj.adapters.is_adapter).values()):
    assert not D.apply_schedule(keep_all, 2, pruned, tx)[1]


# ---------------------------------------------------------------------------------------------
# ReLoRA, COLA


def test_relora_restarts_add_up_to_an_update_of_rank_above_r():
  """Rank-2 adapters with 4 restarts fit a full-rank change: the accumulated update
  W_T - W_0 has more than 2 significant singular values."""
  sv = [3.0, 2.7, 2.4, 2.1, 1.8, 1.5, 1.2, 0.9]
  target = (_low_rank_target(11, sv),)
  params = _params()
  w0 = np.asarray(params['a']['kernel'])
  steps, period = 250, 50
  dyn = D.relora(period=period, total_steps=steps, warmup=10, prune=0.99)
  state, losses, reshaped = _fit(params, {'variant': 'lora', 'rank': 2, 'alpha': 4.0}, dyn,
                                 steps, target, lr=3e-2)
  assert not reshaped
  merged = np.asarray(lj.merge(state.params, state.adapters)['a']['kernel'])
  s = np.linalg.svd(merged - w0, compute_uv=False)
  assert np.sum(s > 0.05 * s[0]) > 2, s
  assert D.update_ranks({'a': {'kernel': w0}, 'b': {'kernel': np.asarray(
      _params()['b']['kernel'])}}, state.params, state.adapters)['a/kernel'] > 2
  # A plain rank-2 LoRA cannot: its update has rank 2.
  plain, plain_losses, _ = _fit(params, {'variant': 'lora', 'rank': 2, 'alpha': 4.0},
                                D.none(), steps, target, lr=3e-2)
  assert D.update_ranks(_params(), plain.params, plain.adapters)['a/kernel'] == 2
  assert losses[-1] < plain_losses[-1]


def test_merge_and_reinit_keeps_the_function_and_prunes_the_optimizer_state():
  target = (_low_rank_target(4, [2.0, 1.0]),)
  params = _params()
  spec = lj.make_spec(params, [('a/kernel', {'rank': 3}), ('b/kernel', 'full')])
  params, adapters = lj.init(jax.random.key(1), params, spec)
  tx = lj.optimizer(1e-2)
  state = D.init_state(params, adapters, tx)
  step = lj.make_train_step(_loss, tx, donate=False)
  for i in range(3):
    state, _ = step(state, _batch(i, *target), None)
  x, _ = _batch(0, *target)
  before = lj.lora(_linear)(lj.join(state.params, state.adapters), x)
  for prune, kept in ((0.9, True), (1.0, False)):
    new = D.merge_and_reinit(state, jax.random.key(5), prune=prune, tx=tx)
    np.testing.assert_allclose(lj.lora(_linear)(lj.join(new.params, new.adapters), x), before,
                               rtol=1e-5, atol=1e-5)
    fresh = new.adapters['a']['kernel']
    assert not np.any(np.asarray(fresh.b))                              # B = 0 again
    assert not np.allclose(fresh.a, state.adapters['a']['kernel'].a)    # a new A
    adam = new.opt_state.inner_states['lora_a'].inner_state[0]
    old = state.opt_state.inner_states['lora_a'].inner_state[0]
    mu, nu = np.asarray(adam.mu['a']['kernel'].a), np.asarray(adam.nu['a']['kernel'].a)
    assert np.sum(mu != 0) <= mu.size - int(np.floor(prune * mu.size))
    assert np.all((mu != 0) == (nu != 0))
    if kept:   # the largest first moments survive
      big = np.abs(np.asarray(old.mu['a']['kernel'].a)) >= np.quantile(
          np.abs(np.asarray(old.mu['a']['kernel'].a)), 0.95)
      np.testing.assert_array_equal(mu[big], np.asarray(old.mu['a']['kernel'].a)[big])
    assert int(adam.count) == int(old.count) == 3                      # schedules go on
    # The fully trained leaf keeps its value and its optimizer state.
    np.testing.assert_array_equal(new.adapters['b']['kernel'].value,
                                  state.adapters['b']['kernel'].value)
    np.testing.assert_array_equal(new.opt_state.inner_states['full'].inner_state[0].mu['b'][
        'kernel'].value, state.opt_state.inner_states['full'].inner_state[0].mu['b'][
            'kernel'].value)


def test_jagged_schedule_and_cola_links():
  lr = D.jagged(optax.constant_schedule(1.0), period=10, warmup=4)
  got = [float(lr(t)) for t in (0, 9, 10, 11, 13, 14, 20)]
  np.testing.assert_allclose(got, [1.0, 1.0, 0.25, 0.5, 1.0, 1.0, 0.25])
  target = (_low_rank_target(8, [2.0, 1.5, 1.0, 0.5]),)
  dyn = D.cola(links=3, total_steps=60)
  state, losses, _ = _fit(_params(), {'variant': 'lora', 'rank': 1}, dyn, 60, target, lr=5e-2)
  assert dyn.every == 20 and dyn.report(state) == {'restarts': 2}
  assert D.update_ranks(_params(), state.params, state.adapters)['a/kernel'] >= 2
  assert losses[-1] < 0.6 * losses[0]


# ---------------------------------------------------------------------------------------------
# Delta-LoRA


def test_delta_lora_moves_the_base_by_the_change_of_the_update():
  target = (_low_rank_target(6, [2.0, 1.0]),)
  params = _params()
  spec = lj.make_spec(params, [('kernel', {'rank': 2})])
  params, adapters = lj.init(jax.random.key(1), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(2), scale=0.3)
  tx = lj.optimizer(1e-2)
  dyn = D.delta_lora(scale=2.0)
  state = D.init_state(params, adapters, tx, dyn)
  new, _ = lj.make_train_step(_loss, tx, dyn, donate=False)(state, _batch(0, *target), None)
  plain, _ = lj.make_train_step(_loss, tx, donate=False)(state, _batch(0, *target), None)
  # The adapters train as LoRA: bitwise op by op (the same ops on the same inputs); the two
  # compiled steps are different programs (one also updates the base): Adam divides by sqrt(v),
  # which amplifies their last-bit differences in small gradients, hence 1e-5.
  with jax.disable_jit():
    eager_new, _ = lj.make_train_step(_loss, tx, dyn, donate=False)(state, _batch(0, *target),
                                                                     None)
    eager_plain, _ = lj.make_train_step(_loss, tx, donate=False)(state, _batch(0, *target),
                                                                 None)
  helpers.assert_trees_equal(eager_plain.adapters, eager_new.adapters)
  for a, b in zip(jax.tree_util.tree_leaves(new.adapters),
                  jax.tree_util.tree_leaves(plain.adapters)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
  with helpers.enable_x64():
    for p in ('a', 'b'):
      old, upd = state.adapters[p]['kernel'], new.adapters[p]['kernel']
      d = lambda ad: ad.spec.scale * np.asarray(ad.a, np.float64) @ np.asarray(ad.b, np.float64)
      expect = np.asarray(params[p]['kernel'], np.float64) + 2.0 * (d(upd) - d(old))
      np.testing.assert_allclose(new.params[p]['kernel'], expect, rtol=1e-5, atol=1e-6)
  # `start`: no base update before it.
  late = D.delta_lora(scale=2.0, start=5)
  held, _ = lj.make_train_step(_loss, tx, late, donate=False)(state, _batch(0, *target), None)
  helpers.assert_trees_equal(held.params, params)


def test_delta_lora_stores_no_base_gradient():
  """XLA's compiled memory of a Delta-LoRA step against full fine-tuning of the same kernels:
  no base gradient and no base optimizer state, the base updated in place (donated)."""
  d = 512
  params = {f'l{i}': {'kernel': jax.random.normal(jax.random.key(i), (d, d)) / np.sqrt(d)}
            for i in range(4)}

  def mlp(p, x):
    for i in range(4):
      x = jnp.tanh(x @ p[f'l{i}']['kernel'])
    return x

  def loss(joined, batch, rng):
    return jnp.mean(jnp.square(lj.lora(mlp)(joined, batch[0]) - batch[1]))

  x = (jax.random.normal(jax.random.key(9), (32, d)), jax.random.normal(jax.random.key(8),
                                                                        (32, d)))
  tx = lj.optimizer(1e-3)

  def memory(setting, dyn):
    spec = lj.make_spec(params, [('kernel', setting)])
    p, ad = lj.init(jax.random.key(1), params, spec)
    state = jax.eval_shape(lambda: D.init_state(p, ad, tx, dyn))
    m = lj.make_train_step(loss, tx, dyn).lower(state, x, None).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
            m.alias_size_in_bytes), m.temp_size_in_bytes

  w_bytes = 4 * d * d * 4
  delta_total, delta_temp = memory({'rank': 8}, D.delta_lora())
  full_total, _ = memory('full', None)
  # Full fine-tuning holds W, its gradient and two Adam moments (>= 4x the kernels); Delta-LoRA
  # the kernels (in place) plus per-layer temporaries.
  assert full_total >= 4 * w_bytes
  assert delta_total < 0.5 * full_total, (delta_total, full_total)
  assert delta_temp < 0.6 * w_bytes, (delta_temp, w_bytes)


# ---------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize('build,message', [
    (lambda: D.adalora(target_rank=2, total_steps=100, warmup=60, final=40),
     'adalora: the budget schedule ends after training: warmup=60 + final=40 must be < '
     'total_steps=100'),
    (lambda: D.adalora(target_rank=0, total_steps=100), 'adalora: target_rank=0 must be an int'),
    (lambda: D.adalora(target_rank=2, total_steps=100, beta1=1.0),
     'adalora: beta1=1.0 must be a number in [0.0, 1.0)'),
    (lambda: D.adalora(target_rank=2, total_steps=0), 'adalora: total_steps=0 must be a positive'),
    (lambda: D.relora(period=0, total_steps=100), 'relora: period=0 must be an int >= 1 (steps '
     'between restarts)'),
    (lambda: D.relora(period=100, total_steps=100), 'relora: period=100 must be < '
     'total_steps=100: the first restart would come after training'),
    (lambda: D.relora(period=10, total_steps=100, warmup=20), 'relora: warmup=20 must be an int '
     'in [1, 10]'),
    (lambda: D.relora(period=10, total_steps=100, prune=1.5), 'relora: prune=1.5 must be a '
     'number in [0.0, 1.0]'),
    (lambda: D.cola(links=1, total_steps=100), 'cola: links=1 must be an int in [2, 100]'),
    (lambda: D.delta_lora(start=100, total_steps=100), 'delta_lora: start=100 must be < '
     'total_steps=100'),
    (lambda: D.sora(learning_rate=1e-3, every=0), 'sora: every=0 must be an int >= 1'),
    (lambda: D.dylora(min_rank=0), 'dylora: min_rank=0 must be an int >= 1'),
    (lambda: D.get('adalorra'), "Unknown dynamics 'adalorra'; allowed: ['adalora', 'cola', "
     "'delta_lora', 'dylora', 'relora', 'sora']"),
    (lambda: D.get('relora', period=5, total_steps=50, restarts=3),
     "Unknown options ['restarts'] for dynamics 'relora'; allowed: ['period', 'prune', "
     "'warmup']"),
])
def test_bad_settings_fail_when_built(build, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    build()


def test_selections_a_method_cannot_take():
  params = _params()

  def check(dyn, setting, p=params):
    spec = lj.make_spec(p, [('kernel', setting)])
    dyn.check(spec, p)

  with pytest.raises(ValueError, match=re.escape(
      "adalora: target_rank=6 is above the initial rank 4 of 'a/kernel'")):
    check(D.adalora(target_rank=6, total_steps=10), {'variant': 'adalora', 'rank': 4})
  with pytest.raises(ValueError, match=re.escape(
      "Dynamics 'adalora' needs leaves adapted with variant ['adalora']; the selection has "
      "['lora']")):
    check(D.adalora(target_rank=1, total_steps=10), {'rank': 4})
  with pytest.raises(ValueError, match=re.escape("Dynamics 'sora' needs leaves adapted with")):
    check(D.sora(learning_rate=1e-3), {'variant': 'adalora', 'rank': 2})
  with pytest.raises(ValueError, match=re.escape(
      "delta_lora: 'a/kernel' uses 'dora', whose update depends on W")):
    check(D.delta_lora(), {'variant': 'dora', 'rank': 2})
  with pytest.raises(ValueError, match=re.escape("'tied_lora', whose arrays are shared")):
    check(D.relora(period=5, total_steps=10), {'variant': 'tied_lora', 'rank': 2})
  big = {'a': {'kernel': jax.random.normal(jax.random.key(0), (64, 64))}}
  spec = lj.make_spec(big, [('kernel', {'rank': 2})])
  q = lj.quantize(big, spec, type='nf4')
  with pytest.raises(ValueError, match=re.escape(
      "Dynamics 'relora' folds adapters into the base, but 'a/kernel' is quantized")):
    D.relora(period=5, total_steps=10).check(spec, q)
  with pytest.raises(ValueError, match=re.escape('Cannot resize')):
    D.resize({'a': {'kernel': lj.init(jax.random.key(0), params, lj.make_spec(
        params, [('a/kernel', {'variant': 'dora', 'rank': 2})]))[1]['a']['kernel']}},
             {'a/kernel': [0]})


# ---------------------------------------------------------------------------------------------
# In the training loop: reported, checkpointed, resumed after a crash with the same numbers.


@pytest.mark.parametrize('name,options', [
    ('sora', dict(sparsity=100.0, every=2)),                # resized adapters
    ('relora', dict(period=2, warmup=1)),                   # a changed base
    ('adalora', dict(target_rank=2, warmup=1, final=1)),    # statistics and masks
])
@pytest.mark.slow
def test_train_loop_runs_checkpoints_and_resumes(tmp_path, name, options):
  from configs import vit_digits   # pylint: disable=g-import-not-at-top
  from experiments import train   # pylint: disable=g-import-not-at-top
  from tests.test_train import _config   # pylint: disable=g-import-not-at-top
  c = _config(tmp_path, f'quick,dynamics={name},rank=4,model=cnn', vit_digits, steps=6,
              checkpoint_every=2)
  c.dynamics.update(options)
  r1 = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert r1['dynamics'] == name and r1['effective_rank'] > 0
  text = train.summary(r1)
  if name == 'sora':
    assert r1['reshaped_at'] and r1['trainable_params_final'] < r1['trainable_params']
    assert 'adapter shapes changed after steps' in text
  if name == 'adalora':
    assert r1['total_rank'] == r1['target_total_rank'] and 'total rank' in text
  if name == 'relora':
    assert r1['restarts'] == 2
  # A crash after step 4: the last checkpoint is lost; the rerun resumes at 4 and ends the same.
  shutil.rmtree(tmp_path / 'run' / 'checkpoints' / '6')
  r2 = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert r2['resumed_from'] == 4
  assert r2['accuracy'] == r1['accuracy'] and r2['effective_rank'] == r1['effective_rank']


def test_config_time_errors_of_the_training_loop(tmp_path):
  from configs import vit_digits   # pylint: disable=g-import-not-at-top
  from experiments import train   # pylint: disable=g-import-not-at-top
  from tests.test_train import _config   # pylint: disable=g-import-not-at-top
  c = _config(tmp_path, 'quick,dynamics=relora', vit_digits)
  c.dynamics.period = 0
  with pytest.raises(ValueError, match=re.escape('relora: period=0 must be an int >= 1')):
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  c = _config(tmp_path, 'quick,dynamics=adalora', vit_digits)   # 3 steps: 10 + 20 do not fit
  with pytest.raises(ValueError, match=re.escape('adalora: the budget schedule ends after '
                                                 'training')):
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  c = _config(tmp_path, 'quick,dynamics=adalora,rank=2', vit_digits)
  c.dynamics.update(dict(target_rank=4, warmup=0, final=0))
  with pytest.raises(ValueError, match=re.escape('adalora: target_rank=4 is above the initial '
                                                 'rank 2')):
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  c = _config(tmp_path, 'quick,dynamics=sora,variant=lora', vit_digits)
  c.adapter.variant = 'lora'
  with pytest.raises(ValueError, match=re.escape("dynamics 'sora' trains variant 'sora'; the "
                                                 "config has adapter.variant='lora'")):
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert not (tmp_path / 'a' / 'checkpoints').exists()


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dylora', 'cola', 'delta_lora'])
def test_train_loop_reports_the_other_methods(tmp_path, name):
  from configs import vit_digits   # pylint: disable=g-import-not-at-top
  from experiments import train   # pylint: disable=g-import-not-at-top
  from tests.test_train import _config   # pylint: disable=g-import-not-at-top
  c = _config(tmp_path, f'quick,dynamics={name},rank=2,model=cnn', vit_digits, steps=4)
  if name == 'cola':
    c.dynamics.links = 2
  r = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert r['dynamics'] == name and not r['reshaped_at']
  if name == 'dylora':   # evaluated at every rank
    assert sorted(r['accuracy_by_rank']) == ['1', '2']
    assert r['accuracy_by_rank']['2'] == r['accuracy']
    assert 'accuracy by rank: 1:' in train.summary(r)
  if name == 'cola':     # one knot: the update has the rank of two links
    assert r['restarts'] == 1 and r['effective_rank'] > 2
  if name == 'delta_lora':   # W_T - W_0 = (1 + 2) s A_T B_T: rank 2
    assert r['effective_rank'] == 2


# ---------------------------------------------------------------------------------------------
# The family's protocol: what methods declare, the registry, resizable variants.


def test_resizable_variants_follow_from_what_variants_declare():
  """No list of names: each variant declares `resizable`, and the claim holds: exactly the
  variants whose ranks are independent terms (slicing their arrays slices their factored A
  and B) declare it."""
  params = {'w': jax.random.normal(jax.random.key(0), (8, 6))}
  got = {}
  for v in lj.variants.names():
    spec = lj.make_spec(params, [('w', {'variant': v, 'rank': 2 if v == 'lokr' else 4})])
    _, ad = lj.init(jax.random.key(1), params, spec)
    got[v] = D.resizable(ad['w'])
    assert got[v] == D.surgery.cut_is_exact(ad['w']), v
  assert sorted(v for v, ok in got.items() if ok) == ['adalora', 'lora', 'lora_fa', 'sora'], got
  # A resized LoRA computes exactly its kept ranks (scale kept).
  spec = lj.make_spec(params, [('w', {'rank': 4, 'alpha': 8.0})])
  _, ad = lj.init(jax.random.key(1), params, spec)
  ad = helpers.randomize(ad, jax.random.key(2))
  cut = D.resize(ad, {'w': [1, 3]})['w']
  full = ad['w']
  with helpers.enable_x64():
    want = full.spec.scale * (np.asarray(full.a, np.float64)[:, [1, 3]] @
                              np.asarray(full.b, np.float64)[[1, 3]])
    np.testing.assert_allclose(cut.spec.scale * np.asarray(cut.a, np.float64) @ np.asarray(
        cut.b, np.float64), want, rtol=1e-6)
  assert cut.spec.rank == 2 and cut.spec.scale == full.spec.scale


def test_methods_declare_what_the_loop_needs_and_register():
  assert [D.default_variant(n) for n in D.names()] == ['adalora', 'lora', 'sora', 'lora',
                                                        'lora', 'lora']
  built = {n: D.get(n, **{'adalora': dict(target_rank=1), 'relora': dict(period=2),
                          'cola': dict(links=2)}.get(n, {}), total_steps=10,
                     learning_rate=1e-3, seed=0) for n in D.names()}
  assert [n for n, d in built.items() if d.resizes] == ['sora']
  assert [n for n, d in built.items() if d.changes_base] == ['relora', 'cola', 'delta_lora']
  assert built['adalora'].variants == ('adalora',) and built['dylora'].variants == ('lora',)
  with pytest.raises(ValueError, match=re.escape('adalora: target_rank=1 is above the initial '
                                                 'rank 0')):
    built['adalora'].check_rank(0, None)
  views = built['dylora'].views({'w': lj.init(jax.random.key(0), {'w': jnp.ones((4, 3))},
                                              lj.make_spec({'w': jnp.ones((4, 3))}, [
                                                  ('w', {'rank': 2})]))[1]['w']})
  assert sorted(views['by_rank']) == ['1', '2']
  with pytest.raises(ValueError, match=re.escape("Dynamics 'sora' is already registered")):
    D.register(D.Method('sora', D.sora, 'sora'))
  # A research method: one registration, found by name with the loop's options.
  D.register(D.Method('noop_test', lambda *, total_steps: D.Dynamics('noop_test', every=1),
                      'lora'))
  try:
    assert D.get('noop_test', total_steps=5, seed=1).every == 1
    assert D.default_variant('noop_test') == 'lora'
  finally:
    D.base._METHODS.pop('noop_test')


def test_a_dynamics_step_needs_a_train_state():
  params = _params()
  spec = lj.make_spec(params, [('kernel', {'rank': 2})])
  params, adapters = lj.init(jax.random.key(1), params, spec)
  tx = lj.optimizer(1e-2)
  step = lj.make_train_step(_loss, tx, D.dylora())
  with pytest.raises(ValueError, match=re.escape("A step with dynamics 'dylora' takes a "
                                                 'TrainState')):
    step(params, adapters, tx.init(adapters), _batch(0, _low_rank_target(1, [1.0])))
