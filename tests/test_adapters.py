"""The two trees: join/split, merge/unmerge with donation, and the variant registry."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
from lorax_jax import variants
from tests import helpers


def _setup():
  params = {'enc': {'kernel': jax.random.normal(jax.random.key(0), (6, 5)),
                    'bias': jax.random.normal(jax.random.key(1), (5,))},
            'head': {'kernel': jax.random.normal(jax.random.key(2), (5, 3))}}
  spec = lj.make_spec(params, [('head', 'full'), ('enc/kernel', {'rank': 2})])
  params, adapters = lj.init(jax.random.key(3), params, spec)
  return params, helpers.randomize(adapters, jax.random.key(4))


def test_split_inverts_join():
  params, adapters = _setup()
  p2, a2 = lj.split(lj.join(params, adapters))
  assert jax.tree_util.tree_structure(p2) == jax.tree_util.tree_structure(params)
  assert jax.tree_util.tree_structure(a2) == jax.tree_util.tree_structure(adapters)
  for x, y in zip(jax.tree_util.tree_leaves((params, adapters)),
                  jax.tree_util.tree_leaves((p2, a2))):
    assert x is y


def test_adapter_tree_holds_only_selected_leaves():
  _, adapters = _setup()
  assert set(adapters) == {'enc', 'head'}
  assert set(adapters['enc']) == {'kernel'}
  assert isinstance(adapters['head']['kernel'], lj.FullParams)
  assert lj.count_params(adapters) == 2 * (6 + 5) + 5 * 3


def test_full_leaves_replace_the_base_in_lora_and_merge():
  params, adapters = _setup()
  fn = lambda p, x: (x @ p['enc']['kernel'] + p['enc']['bias']) @ p['head']['kernel']
  x = jax.random.normal(jax.random.key(5), (4, 6))
  out = lj.lora(fn, strict=True)(lj.join(params, adapters), x)
  ref = helpers.f64_reference(fn, params, adapters, x)
  assert helpers.rel_err(out, ref) < 1e-5
  np.testing.assert_array_equal(lj.merge(params, adapters)['head']['kernel'],
                                adapters['head']['kernel'].value)


@pytest.mark.parametrize('variant', ['lora', 'dora', 'lokr'])
def test_merged_inference_costs_exactly_the_base_flops(variant):
  """After `merge`, the plain model runs at the base's cost: the same FLOPs, and the merged
  tree has the base's shapes and dtypes (so it is the same compiled program)."""
  from lorax_jax.models import Decoder  # pylint: disable=g-import-not-at-top
  model = Decoder(vocab_size=64, d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  params = model.init(jax.random.key(1), tokens)
  spec = lj.make_spec(params, lj.dense_kernels(variant=variant, rank=2), fn=model.apply,
                      args=(tokens,))
  base, adapters = lj.init(jax.random.key(2), params, spec)
  merged = lj.merge(base, helpers.randomize(adapters, jax.random.key(3)))
  same = lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(same, merged, base))
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  flops = lambda p: common.compiled_cost(jax.jit(model.apply).lower(p, tokens).compile())[0]
  assert flops(merged) == flops(base) > 0


def test_merge_and_unmerge_with_donation():
  params, adapters = _setup()
  expected = np.asarray(params['enc']['kernel']) + np.asarray(
      adapters['enc']['kernel'].a, np.float64) @ np.asarray(adapters['enc']['kernel'].b,
                                                           np.float64) * 1.0
  copy = jax.tree_util.tree_map(jnp.copy, params)
  merged = lj.merge(copy, adapters, donate=True)
  np.testing.assert_allclose(merged['enc']['kernel'], expected, rtol=1e-5, atol=1e-6)
  back = lj.unmerge(merged, adapters, donate=True)
  np.testing.assert_allclose(back['enc']['kernel'], params['enc']['kernel'], atol=1e-6)
  np.testing.assert_array_equal(back['enc']['bias'], params['enc']['bias'])


def _dense_only_lora():
  base = variants.lora()
  return base._replace(name='lora_dense_only', factored=None)


def test_variant_without_factored_form_materializes_silently_in_strict_mode():
  variants.register('lora_dense_only', _dense_only_lora)
  try:
    params = {'w': jax.random.normal(jax.random.key(0), (6, 5))}
    spec = lj.make_spec(params, [('w', {'variant': 'lora_dense_only', 'rank': 2})])
    params, adapters = lj.init(jax.random.key(1), params, spec)
    adapters = helpers.randomize(adapters, jax.random.key(2))
    fn = lambda p, x: jnp.tanh(x @ p['w'])
    x = jax.random.normal(jax.random.key(3), (4, 6))
    out = lj.lora(fn, strict=True)(lj.join(params, adapters), x)
    assert helpers.rel_err(out, helpers.f64_reference(fn, params, adapters, x)) < 1e-5
    g = jax.grad(lambda a: lj.lora(fn, strict=True)(lj.join(params, a), x).sum())(adapters)
    assert np.any(np.asarray(g['w'].b) != 0)
  finally:
    variants._FACTORIES.pop('lora_dense_only')  # pylint: disable=protected-access
    variants._CACHE.pop('lora_dense_only', None)  # pylint: disable=protected-access


def test_registry_errors():
  with pytest.raises(ValueError, match=re.escape("Variant 'lora' is already registered")):
    variants.register('lora', variants.lora)
  allowed = ("['adalora', 'dora', 'loha', 'lokr', 'lora', 'lora_fa', 'lora_xs', 'nola', 'sora', "
             "'tied_lora', 'vera']")
  with pytest.raises(ValueError, match=re.escape(f"Unknown variant 'nope'; allowed: {allowed}")):
    variants.get('nope')


@pytest.mark.parametrize('variant', ['lora', 'dora', 'nola', 'tied_lora'])
def test_trees_from_differently_worded_rules_combine(variant):
  """Adapter states carry no path or rule text: arithmetic and stacking are plain tree ops."""
  params = {'enc': {'kernel': jax.random.normal(jax.random.key(0), (6, 5))},
            'dec': {'kernel': jax.random.normal(jax.random.key(1), (5, 6))}}
  setting = {'variant': variant, 'rank': 2}
  spec1 = lj.make_spec(params, [(r'(enc|dec)/kernel$', setting)])
  spec2 = lj.make_spec(params, [(r'^enc/', setting), (r'kernel', setting)])
  _, a1 = lj.init(jax.random.key(2), params, spec1)
  _, a2 = lj.init(jax.random.key(3), params, spec2)
  a1 = helpers.randomize(a1, jax.random.key(4))
  a2 = helpers.randomize(a2, jax.random.key(5))
  mean = jax.tree.map(lambda x, y: (x + y) / 2, a1, a2)
  stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), a1, a2)
  assert jax.tree.map(lambda s: s.shape[0], stacked) == jax.tree.map(lambda _: 2, a1)

  def fn(p, x):
    return jnp.tanh(x @ p['enc']['kernel']) @ p['dec']['kernel']

  x = jax.random.normal(jax.random.key(6), (4, 6))
  out = jax.jit(lj.lora(fn, strict=True))(lj.join(params, mean), x)
  ref = helpers.f64_reference(fn, params, mean, x)
  assert helpers.rel_err(out, ref) < helpers.TOL[jnp.float32]
  # The average of the trees is a different model from either one.
  assert helpers.rel_err(helpers.f64_reference(fn, params, a1, x), ref) > 1e-3


@pytest.mark.parametrize('key,got', [
    (0, 'int 0'), (1.5, 'float 1.5'),
    (jax.random.split(jax.random.key(0), 3), 'a batch of 3 typed keys (shape (3,))'),
    (jax.random.split(jax.random.PRNGKey(0), 3),
     'a batch of legacy keys (uint32 array of shape (3, 2))'),
    (jnp.zeros((2,), jnp.float32), 'an array of shape (2,) and dtype float32')])
def test_init_names_a_bad_key(key, got):
  params = {'w': jax.random.normal(jax.random.key(0), (6, 5))}
  spec = lj.make_spec(params, [('w', {'rank': 2})])
  with pytest.raises(ValueError, match=re.escape(
      f'key must be a single PRNG key from jax.random.key(seed) (or the legacy '
      f'jax.random.PRNGKey(seed), uint32[2]); got {got}.')):
    lj.init(key, params, spec)


def test_what_is_not_an_adapter_tree_is_refused_naming_it():
  params = {'w': jax.random.normal(jax.random.key(0), (6, 5))}
  message = ('adapters must be the adapter tree from lorax_jax.init (a dict of adapter states); '
             'got a ')
  for call, got in ((lambda: lj.merge(params, 3), 'int'), (lambda: lj.unmerge(params, 3), 'int'),
                    (lambda: lj.join(params, [1]), 'list'),
                    (lambda: lj.count_params((1, 2)), 'tuple')):
    with pytest.raises(ValueError, match=re.escape(message + got + '.')):
      call()


def test_init_takes_typed_and_legacy_keys_alike():
  """A legacy uint32[2] key and the typed key wrapping the same bits give the same adapters."""
  params = {'w': jax.random.normal(jax.random.key(0), (6, 5))}
  spec = lj.make_spec(params, [('w', {'rank': 2, 'init': 'gaussian'})])
  _, typed = lj.init(jax.random.key(7), params, spec)
  _, legacy = lj.init(jax.random.PRNGKey(7), params, spec)
  assert np.any(np.asarray(typed['w'].a))
  np.testing.assert_array_equal(typed['w'].a, legacy['w'].a)
