"""Training laws: gradients only for adapters, frozen base, LoRA+, weight decay, dropout, jit."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_jax as lj
from tests import helpers


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(11, name='hidden')(x))
    return nn.Dense(3, name='head')(x)


@pytest.fixture
def setup():
  model = _Mlp()
  x = jax.random.normal(jax.random.key(0), (16, 7))
  y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
  params = model.init(jax.random.key(2), x)
  spec = lj.make_spec(params, [('head', 'full'), ('hidden/kernel', {'rank': 2})])
  params, adapters = lj.init(jax.random.key(3), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(4))
  return model, params, adapters, (x, y)


def _loss_fn(model):
  apply = lj.lora(model.apply)

  def loss_fn(joined, batch, rng):
    x, y = batch
    logits = apply(joined, x, lora_rng=rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


def test_gradients_only_for_adapters(setup):
  model, params, adapters, batch = setup
  loss_fn = _loss_fn(model)
  grads = jax.grad(lambda a: loss_fn(lj.join(params, a), batch, None))(adapters)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
  for g, a in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(adapters)):
    assert g.shape == a.shape and np.all(np.isfinite(g)) and np.any(g != 0)
  # No value with the frozen kernel's shape (7, 11) is computed anywhere in the backward pass.
  jaxpr = jax.make_jaxpr(jax.grad(lambda a: loss_fn(lj.join(params, a), batch, None)))(adapters)
  shapes = [v.aval.shape for e in jaxpr.jaxpr.eqns for v in e.outvars]
  assert (7, 11) not in shapes


def test_gradients_match_float64_finite_differences(setup):
  model, params, adapters, batch = setup
  loss_fn = _loss_fn(model)
  with helpers.enable_x64():
    p64 = helpers.cast_tree(params, jnp.float64)
    a64 = helpers.cast_tree(adapters, jnp.float64)
    b64 = (batch[0].astype(jnp.float64), batch[1])
    f = lambda a: loss_fn(lj.join(p64, a), b64, None)
    g = jax.grad(f)(a64)
    a_leaf = a64['params']['hidden']['kernel']
    eps = 1e-6
    bumped = lambda d: jax.tree_util.tree_map(lambda x: x, a64) | {'params': {
        **a64['params'], 'hidden': {'kernel': lj.LoraParams(a_leaf.a, a_leaf.b.at[1, 4].add(d),
                                                            a_leaf.spec)}}}
    fd = (f(bumped(eps)) - f(bumped(-eps))) / (2 * eps)
    np.testing.assert_allclose(g['params']['hidden']['kernel'].b[1, 4], fd, rtol=1e-6)


def test_base_unchanged_and_step_traced_once(setup):
  model, params, adapters, batch = setup
  base_copy = jax.tree_util.tree_map(np.array, params)
  traces = []
  inner = _loss_fn(model)

  def loss_fn(joined, b, rng):
    traces.append(1)
    return inner(joined, b, rng)

  tx = lj.optimizer(1e-2)
  opt_state = tx.init(adapters)
  step = lj.make_train_step(loss_fn, tx)
  losses = []
  for i in range(5):
    adapters, opt_state, loss = step(params, adapters, opt_state, batch, jax.random.key(i))
    losses.append(float(loss))
  assert len(traces) == 1
  assert losses[-1] < losses[0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, base_copy,
                         jax.tree_util.tree_map(np.array, params))


def test_labels():
  params = {'a': {'kernel': jnp.ones((4, 3))}, 'head': {'bias': jnp.ones(3)}}
  spec = lj.make_spec(params, [('head', 'full'), ('kernel', {'rank': 1})])
  _, adapters = lj.init(jax.random.key(0), params, spec)
  labels = lj.labels(adapters)
  assert labels['a']['kernel'].a == 'lora_a'
  assert labels['a']['kernel'].b == 'lora_b'
  assert labels['head']['bias'].value == 'full'


def test_loraplus_scales_b_learning_rate(setup):
  model, params, adapters, batch = setup
  lr, ratio = 1e-3, 16.0
  tx = lj.optimizer(lr, loraplus_ratio=ratio, eps=1e-12)
  opt_state = tx.init(adapters)
  step = lj.make_train_step(_loss_fn(model), tx, donate=False)
  new, _, _ = step(params, adapters, opt_state, batch)
  da = np.abs(np.asarray(new['params']['hidden']['kernel'].a - adapters['params']['hidden'][
      'kernel'].a))
  db = np.abs(np.asarray(new['params']['hidden']['kernel'].b - adapters['params']['hidden'][
      'kernel'].b))
  # Adam's first step moves every parameter with a non-zero gradient by exactly its lr.
  np.testing.assert_allclose(da[da > 0], lr, rtol=1e-3)
  np.testing.assert_allclose(db[db > 0], ratio * lr, rtol=1e-3)


def test_weight_decay_applies_to_adapters_and_full_leaves_only(setup):
  _, params, adapters, batch = setup
  lr, wd = 0.1, 0.5
  tx = lj.optimizer(lr, weight_decay=wd)
  step = lj.make_train_step(lambda joined, b, rng: 0.0 * lj.lora(_Mlp().apply)(
      joined, b[0]).sum(), tx, donate=False)
  new, _, _ = step(params, adapters, tx.init(adapters), batch)
  for old, upd in zip(jax.tree_util.tree_leaves(adapters), jax.tree_util.tree_leaves(new)):
    np.testing.assert_allclose(upd, old * (1 - lr * wd), rtol=1e-6)


@pytest.mark.parametrize('kwargs,message', [
    (dict(loraplus_ratio=0.0), 'loraplus_ratio=0.0 must be a finite number > 0'),
    (dict(loraplus_ratio=float('nan')), 'loraplus_ratio=nan must be a finite number > 0'),
    (dict(loraplus_ratio='16'), "loraplus_ratio='16' must be a finite number > 0"),
    (dict(weight_decay=-1.0), 'weight_decay=-1.0 must be a finite number >= 0'),
    (dict(weight_decay=float('nan')), 'weight_decay=nan must be a finite number >= 0'),
    (dict(weight_decay='0.1'), "weight_decay='0.1' must be a finite number >= 0"),
])
def test_optimizer_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    lj.optimizer(1e-3, **kwargs)


@pytest.mark.parametrize('lr,message', [
    (float('nan'), 'learning_rate=nan must be a finite number > 0'),
    (float('inf'), 'learning_rate=inf must be a finite number > 0'),
    (-0.003, r'learning_rate=-0\.003 must be a finite number > 0'),
    (0.0, r'learning_rate=0\.0 must be a finite number > 0'),
    ('1e-3', "learning_rate='1e-3' must be a number or an optax schedule; got a str"),
    (True, 'learning_rate=True must be a number or an optax schedule; got a bool'),
])
def test_optimizer_bad_learning_rates(lr, message):
  with pytest.raises(ValueError, match=message):
    lj.optimizer(lr)
  with pytest.raises(ValueError, match='full_' + message):
    lj.optimizer(1e-3, full_learning_rate=lr)


def test_make_train_step_and_init_state_refuse_what_they_cannot_run(setup):
  _, params, adapters, _ = setup
  tx = lj.optimizer(1e-3)
  for args, message in [
      ((3, tx), 'loss_fn=3 must be a function (joined_params, batch, rng) -> loss; got a int'),
      ((lambda p, b, r: 0.0, optax.adam), 'must be an optax GradientTransformation'),
      ((lambda p, b, r: 0.0, tx, 'relora'), "dyn='relora' must be a lorax_jax.dynamics method")]:
    with pytest.raises(ValueError, match=re.escape(message)):
      lj.make_train_step(*args)
  # A method's own check runs on the adapters it is given (here rank-2 LoRA leaves).
  with pytest.raises(ValueError, match=re.escape('dylora: min_rank=4 is above the rank 2 of')):
    lj.init_state(params, adapters, tx, lj.dynamics.dylora(min_rank=4))
  with pytest.raises(ValueError, match=re.escape("Dynamics 'adalora' needs leaves adapted with "
                                                 "variant ['adalora']; the selection has")):
    lj.init_state(params, adapters, tx, lj.dynamics.adalora(target_rank=1, total_steps=10))
  with pytest.raises(ValueError, match=re.escape('sora: learning_rate=nan must be a finite')):
    lj.dynamics.sora(learning_rate=float('nan'))


def test_dropout_only_with_rng():
  model = _Mlp()
  x = jax.random.normal(jax.random.key(0), (32, 7))
  params = model.init(jax.random.key(2), x)
  spec = lj.make_spec(params, [('hidden/kernel', {'rank': 2, 'dropout': 0.5})])
  params, adapters = lj.init(jax.random.key(3), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(4))
  apply = jax.jit(lj.lora(model.apply))
  ref = model.apply(lj.merge(params, adapters), x)
  base = model.apply(params, x)
  no_rng = apply(lj.join(params, adapters), x)
  np.testing.assert_allclose(no_rng, ref, rtol=1e-5, atol=1e-6)
  k = jax.random.key(9)
  d1 = apply(lj.join(params, adapters), x, lora_rng=k)
  d2 = apply(lj.join(params, adapters), x, lora_rng=k)
  d3 = apply(lj.join(params, adapters), x, lora_rng=jax.random.key(10))
  np.testing.assert_array_equal(d1, d2)
  assert not np.allclose(d1, ref, atol=1e-4)
  assert not np.allclose(d1, d3, atol=1e-4)
  # Dropout acts on the adapter branch only: with B = 0 it changes nothing. Bitwise op by op
  # (under `disable_jit` the base ops are the same programs on both sides and the branch adds an
  # exact zero); compiled, the two sides are different programs: a few ulps.
  _, fresh = lj.init(jax.random.key(3), params, spec)
  with jax.disable_jit():
    np.testing.assert_array_equal(apply(lj.join(params, fresh), x, lora_rng=k),
                                  model.apply(params, x))
  helpers.assert_close_compiled(apply(lj.join(params, fresh), x, lora_rng=k), base)


def test_one_step_over_a_train_state_and_the_plain_call(setup):
  """The TrainState form and the (params, adapters, opt_state) form are one jitted step: the
  same adapters, optimizer state and loss, bitwise; the step count advances; aux comes back
  (a step with aux is another program: its loss agrees within a few ulps)."""
  model, params, adapters, batch = setup
  tx = lj.optimizer(1e-2)
  loss_fn = _loss_fn(model)
  step = lj.make_train_step(loss_fn, tx, donate=False)
  state = lj.init_state(params, adapters, tx)
  assert isinstance(state, lj.TrainState) and int(state.step) == 0 and state.stats == ()
  new, loss = step(state, batch, jax.random.key(0))
  a, s, l = step(params, adapters, tx.init(adapters), batch, jax.random.key(0))
  helpers.assert_trees_equal(new.adapters, a)
  helpers.assert_trees_equal(new.opt_state, s)
  np.testing.assert_array_equal(loss, l)
  assert int(new.step) == 1 and new.params is not None
  aux_step = lj.make_train_step(lambda j, b, r: (loss_fn(j, b, r), {'two': 2.0}), tx,
                                has_aux=True, donate=False)
  new2, loss2, aux = aux_step(state, batch, jax.random.key(0))
  helpers.assert_close_compiled(loss2, loss)   # another program (it returns aux too)
  assert float(aux['two']) == 2.0
  a2, _, loss3, aux3 = aux_step(params, adapters, tx.init(adapters), batch, jax.random.key(0))
  helpers.assert_trees_equal(a2, new2.adapters)
  helpers.assert_close_compiled(loss3, loss)
  assert float(aux3['two']) == 2.0
  with pytest.raises(TypeError, match='step takes'):
    step(params, adapters, batch)


def test_state_shardings_walk_the_optimizer_state_with_optax(setup):
  """`state_shardings` gives each copy of the adapter tree in the optimizer state the
  adapters' shardings (optax.tree_utils.tree_map_params), as path-and-shape matching did."""
  from lorax_jax import sharding as sh  # pylint: disable=g-import-not-at-top
  _, params, adapters, batch = setup
  tx = lj.optimizer(1e-2)
  mesh = sh.make_mesh({'fsdp': -1})
  base_sh = sh.param_shardings(params, mesh, sh.preset('fsdp'))
  ts = lj.training.state_shardings(tx, params, adapters, base_sh, batch, mesh)
  assert isinstance(ts, sh.TrainShardings)
  want = sh.like_params(jax.eval_shape(tx.init, adapters), adapters, ts.adapters, mesh=mesh)
  is_sh = lambda x: isinstance(x, jax.sharding.NamedSharding)
  got_l, got_t = jax.tree_util.tree_flatten(ts.opt_state, is_leaf=is_sh)
  want_l, want_t = jax.tree_util.tree_flatten(want, is_leaf=is_sh)
  assert got_t == want_t and got_l == want_l
