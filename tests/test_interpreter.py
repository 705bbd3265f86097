"""The interpreter beyond single layers: control flow, slicing, strictness, no base copies."""

from __future__ import annotations

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
from lorax_jax.models import Decoder
from tests import helpers


def _plain(shape=(6, 5), stacked=None, rank=2, key=0):
  w = jax.random.normal(jax.random.key(key), ((stacked,) if stacked else ()) + shape)
  params = {'w': w}
  setting = {'rank': rank}
  if stacked:
    setting['batch_axes'] = 0
  spec = lj.make_spec(params, [('w', setting)])
  params, adapters = lj.init(jax.random.key(key + 1), params, spec)
  return params, helpers.randomize(adapters, jax.random.key(key + 2))


def _check(fn, params, adapters, *args, tol=1e-5):
  out = jax.jit(lj.lora(fn, strict=True))(lj.join(params, adapters), *args)
  ref = helpers.f64_reference(fn, params, adapters, *args)
  assert helpers.rel_err(out, ref) < tol
  return out


X = jax.random.normal(jax.random.key(99), (4, 6))


def test_weight_on_the_left():
  params, adapters = _plain()
  _check(lambda p, x: jnp.dot(p['w'].T, x.T).T, params, adapters, X)


def test_cond_and_while_with_adapted_weights():
  params, adapters = _plain(shape=(6, 6))

  def fn(p, x, flag):
    x = jax.lax.cond(flag, lambda h: jnp.tanh(h @ p['w']), lambda h: h @ p['w'].T, x)
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p['w']), x)

  _check(fn, params, adapters, X, True)
  _check(fn, params, adapters, X, False)


def test_indexing_stacked_weights_static_and_traced():
  params, adapters = _plain(shape=(6, 6), stacked=3)

  def static(p, x):
    for i in range(3):
      x = jnp.tanh(x @ p['w'][i])
    return x

  def traced(p, x):
    return jax.lax.fori_loop(
        0, 3, lambda i, h: jnp.tanh(h @ jax.lax.dynamic_index_in_dim(p['w'], i, 0, False)), x)

  _check(static, params, adapters, X)
  _check(traced, params, adapters, X)


def test_reshape_and_cast_of_the_weight():
  params = {'w': jax.random.normal(jax.random.key(0), (6, 2, 3))}
  spec = lj.make_spec(params, [('w', {'rank': 2, 'in_axes': 0})])
  _, adapters = lj.init(jax.random.key(0), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(1))
  fn = lambda p, x: x @ p['w'].reshape(6, 6).astype(jnp.float32)
  _check(fn, params, adapters, X)


def test_unit_axes_inserted_into_the_weight():
  params, adapters = _plain()
  fn = lambda p, x: jnp.einsum('bi,zio->bo', x, jnp.expand_dims(p['w'], 0))
  _check(fn, params, adapters, X)
  fn2 = lambda p, x: jnp.einsum('bi,iyo->bo', x, p['w'][:, None, :])
  _check(fn2, params, adapters, X)


def test_real_broadcast_of_the_weight_materializes():
  params, adapters = _plain()
  fn = lambda p, x: jnp.einsum('bi,zio->bzo', x, jnp.broadcast_to(p['w'], (2, 6, 5)))
  with pytest.raises(lj.MaterializeError, match='broadcast_in_dim'):
    lj.lora(fn, strict=True)(lj.join(params, adapters), X)


def test_static_arguments_pass_through():
  class M(nn.Module):

    @nn.compact
    def __call__(self, x, *, train: bool, mode: str = 'a'):
      h = nn.Dense(5)(x)
      h = nn.Dropout(0.5, deterministic=not train)(h)
      return h * (2.0 if mode == 'b' else 1.0)

  m = M()
  params = m.init(jax.random.key(0), X, train=False)
  spec = lj.make_spec(params, [('kernel', {'rank': 2})])
  params, adapters = lj.init(jax.random.key(1), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(2))
  fn = lambda p, x: m.apply(p, x, train=False, mode='b')
  _check(fn, params, adapters, X)
  out = lj.lora(m.apply)(lj.join(params, adapters), X, train=True,
                         rngs={'dropout': jax.random.key(3)})
  assert np.isfinite(out).all()


def test_strict_mode_raises_and_default_warns():
  params, adapters = _plain()
  fn = lambda p, x: x @ jnp.sin(p['w'])
  joined = lj.join(params, adapters)
  with pytest.raises(lj.MaterializeError, match=re.escape(
      "materializing W + dW for 'w' at primitive 'sin': has no factored rule.")):
    lj.lora(fn, strict=True)(joined, X)
  with pytest.warns(lj.MaterializeWarning, match="'w' at primitive 'sin'"):
    out = lj.lora(fn, strict=False)(joined, X)
  ref = helpers.f64_reference(fn, params, adapters, X)
  assert helpers.rel_err(out, ref) < 1e-5


@pytest.mark.parametrize('groups,shape', [(3, (6, 2, 3, 3)), (6, (12, 1, 3, 3))],
                         ids=['grouped', 'depthwise_multiplier_2'])
def test_grouped_conv_in_oihw_layout_with_dilations_is_factored(groups, shape):
  x = jax.random.normal(jax.random.key(1), (2, 6, 7, 7))
  fn = lambda p, x: jax.lax.conv_general_dilated(
      x, p['w'], (2, 1), [(1, 1), (0, 2)], lhs_dilation=(1, 2), rhs_dilation=(2, 1),
      dimension_numbers=('NCHW', 'OIHW', 'NCHW'), feature_group_count=groups)
  params = {'w': jax.random.normal(jax.random.key(0), shape)}
  spec = lj.make_spec(params, [('w', {'rank': 2})], fn=fn, args=(x,))
  assert lj.spec.spec_leaves(spec)['w'].out_axes == (0,)
  params, adapters = lj.init(jax.random.key(2), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(3))
  apply = lj.lora(fn, strict=True)
  out = jax.jit(apply)(lj.join(params, adapters), x)
  ref = helpers.f64_reference(fn, params, adapters, x)
  assert helpers.rel_err(out, ref) < 1e-5 < helpers.rel_err(fn(params, x), ref)
  grads = jax.grad(lambda a: apply(lj.join(params, a), x).sum())(adapters)
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads))


def test_returning_the_weight_materializes():
  params, adapters = _plain()
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', lj.MaterializeWarning)
    out = lj.lora(lambda p: p['w'], strict=False)(lj.join(params, adapters))
  np.testing.assert_allclose(out, lj.merge(params, adapters)['w'], rtol=1e-6)


def test_scan_does_not_copy_the_base():
  model = Decoder(vocab_size=32, d_model=32, num_layers=3, num_heads=2, mlp_dim=64,
                  scan_layers=True, remat=True)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  params = model.init(jax.random.key(1), tokens)
  spec = lj.make_spec(params, lj.dense_kernels(rank=2), fn=model.apply, args=(tokens,))
  assert lj.spec.spec_leaves(spec)['params/layers/up/kernel'].batch_axes == (0,)
  params, adapters = lj.init(jax.random.key(2), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(3), scale=0.1)
  fn = lambda p, a: lj.lora(model.apply, strict=True)(lj.join(p, a), tokens)
  jaxpr = jax.make_jaxpr(fn)(params, adapters).jaxpr
  flat_params = jax.tree_util.tree_leaves(params)
  kernel_vars = [v for v, leaf in zip(jaxpr.invars, flat_params) if leaf.ndim == 3 and
                 leaf.shape[0] == 3 and leaf.size >= 32 * 32 * 3]
  assert kernel_vars
  scans = [e for e in jaxpr.eqns if e.primitive.name == 'scan']
  assert len(scans) == 1
  for v in kernel_vars:  # every stacked kernel goes straight into the one scan, uncopied
    assert v in scans[0].invars
    assert all(v not in e.invars for e in jaxpr.eqns if e is not scans[0])
  out = jax.jit(fn)(params, adapters)
  ref = helpers.f64_reference(model.apply, params, adapters, tokens)
  assert helpers.rel_err(out, ref) < 1e-5
  grads = jax.grad(lambda a: fn(params, a).sum())(adapters)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)


def test_bf16_base_f32_adapters_gradients_are_f32():
  params = {'w': jax.random.normal(jax.random.key(0), (6, 5)).astype(jnp.bfloat16)}
  spec = lj.make_spec(params, [('w', {'rank': 2, 'dtype': jnp.float32})])
  params, adapters = lj.init(jax.random.key(1), params, spec)
  fn = lambda p, x: x @ p['w']
  g = jax.grad(lambda a: lj.lora(fn)(lj.join(params, a), X.astype(jnp.bfloat16)).astype(
      jnp.float32).sum())(adapters)
  assert g['w'].a.dtype == jnp.float32 and g['w'].b.dtype == jnp.float32
  assert np.any(np.asarray(g['w'].b) != 0)


def test_infer_axes_reports_usage():
  model = Decoder(vocab_size=32, d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(1), tokens)
  axes = lj.infer_axes(model.apply, params, tokens)
  assert axes['params/layer0/query/kernel'] == ((), (0,), (1, 2))
  assert axes['params/layer0/out/kernel'] == ((), (0, 1), (2,))
  assert axes['params/embed/embedding'] == ((), (0,), (1,))
  assert axes['params/head/kernel'] == ((), (0,), (1,))


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


def test_compiles_to_the_same_flops_as_hand_written_lora():
  class Mlp(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = jax.nn.relu(nn.Dense(256, use_bias=False, name='up')(x))
      return nn.Dense(64, use_bias=False, name='down')(h)

  model = Mlp()
  x = jax.random.normal(jax.random.key(0), (128, 64))
  params = model.init(jax.random.key(1), x)
  spec = lj.make_spec(params, [('kernel', {'rank': 4})])
  params, adapters = lj.init(jax.random.key(2), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(3))

  def via_lora(p, a):
    return jax.grad(lambda a: (lj.lora(model.apply)(lj.join(p, a), x) ** 2).mean())(a)

  def by_hand(p, a):
    def loss(a):
      up, down = a['params']['up']['kernel'], a['params']['down']['kernel']
      w_up, w_down = p['params']['up']['kernel'], p['params']['down']['kernel']
      h = jax.nn.relu(x @ w_up + (x @ up.a) @ up.b)
      return ((h @ w_down + (h @ down.a) @ down.b) ** 2).mean()
    return jax.grad(loss)(a)

  np.testing.assert_allclose(_flops(via_lora, params, adapters), _flops(by_hand, params, adapters),
                             rtol=1e-3)
  g1, g2 = via_lora(params, adapters), by_hand(params, adapters)
  for u, v in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-7)
