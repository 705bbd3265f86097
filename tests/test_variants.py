"""Every variant, LoRA included: one law table on a spread of layer kinds, its paper's formula in
float64 (`Variant.reference`, declared next to the variant's code), and what is special to it
(sharing, frozen arrays, DoRA's detached norm, LoRA-FA's optimizer).

Law tests: identity at init (bitwise op by op, a few ulps compiled), factored == float64 merged
reference, unmerge(merge(W)) == W, trainable count == the method's formula, gradients exactly
where the method says (frozen arrays get zero gradient and no update) and a bitwise-unchanged
base. tests/test_layers.py runs LoRA's laws on the other layer kinds.
"""

from __future__ import annotations

import functools
import importlib
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
# The modules (the package's `dora`, `vera`, ... are the factories).
dora_lib = importlib.import_module('lorax_jax.variants.dora')
lokr_lib = importlib.import_module('lorax_jax.variants.lokr')
nola_lib = importlib.import_module('lorax_jax.variants.nola')
vera_lib = importlib.import_module('lorax_jax.variants.vera')
from tests import helpers
from tests.test_layers import CASES, VARIANT_BF16_LAYERS, VARIANT_LAYERS

R = 2
VARIANTS = list(lj.variants.names())
# Variants with a weight-aware init ('variant+init'): the base becomes the residual W - s*A@B.
VARIANTS += ['dora+pissa', 'dora+olora']
# Dense, multi-axis in / in+out, transposed einsum, conv, embedding lookup, tied embedding as a
# head (contracting the out-axes), scanned and vmapped (stacked) kernels.
LAYERS = VARIANT_LAYERS
BF16_LAYERS = VARIANT_BF16_LAYERS
# Trainable fields of each variant's state; the others are frozen.
TRAINABLE = {
    'lora': ('a', 'b'), 'dora': ('a', 'b', 'magnitude'), 'vera': ('d', 'b'), 'lora_fa': ('b',),
    'loha': ('a1', 'b1', 'a2', 'b2'), 'lokr': ('c', 'a', 'b'), 'lora_xs': ('core',),
    'tied_lora': ('a', 'b', 'u', 'v'), 'nola': ('alpha', 'beta'),
    'adalora': ('p', 'lam', 'q'), 'sora': ('a', 'b', 'gate'),
}


def _name(variant: str) -> str:
  """The variant of a row ('dora+pissa' -> 'dora')."""
  return variant.partition('+')[0]


def expected_count(variant: str, stack: int, d_in: int, d_out: int, spec) -> int:
  """Trainable parameters of one kernel, from each method's paper (independent of the code)."""
  variant = _name(variant)
  if variant == 'lora':
    return stack * R * (d_in + d_out)
  if variant == 'dora':
    return stack * (R * (d_in + d_out) + d_out)
  if variant == 'vera':
    return stack * (R + d_out)
  if variant == 'lora_fa':
    return stack * R * d_out
  if variant == 'loha':
    return stack * 2 * R * (d_in + d_out)
  if variant == 'lokr':
    p, q = lokr_lib.factorization(d_in)
    u, v = lokr_lib.factorization(d_out)
    return stack * (p * u + R * (q + v))
  if variant == 'lora_xs':
    return stack * R * R
  if variant == 'tied_lora':
    return stack * (R + d_out) + R * (d_in + d_out)
  if variant == 'nola':
    return stack * 2 * spec.opt('num_basis')
  if variant in ('adalora', 'sora'):    # P, lambda, Q / A, gate, B
    return stack * R * (d_in + d_out + 1)
  raise AssertionError(variant)


# Law-table settings: NOLA's laws hold for any number of bases; 8 instead of the default 64 keeps
# the regenerated bases (and the compile) small.
LAW_SETTINGS = {'nola': {'num_basis': 8}}


@functools.lru_cache(maxsize=None)
def _setup(variant, name, dtype):
  """A row's case, base, inputs and fresh adapters; deterministic and immutable, so each worker
  builds a row once for all its laws."""
  case = CASES[name]()
  params = helpers.cast_tree(case.params, dtype)
  args = tuple(helpers.cast_tree(a, dtype) for a in case.args)
  variant, _, init = variant.partition('+')
  setting = {'variant': variant, 'rank': R, 'alpha': 3.0, 'dtype': 'float32',
             **LAW_SETTINGS.get(variant, {}), **({'init': init} if init else {})}
  spec = lj.make_spec(params, [(case.pattern, setting)], fn=case.fn, args=args)
  params, adapters = lj.init(jax.random.key(7), params, spec)
  return case, params, args, adapters


def _randomize(adapters, key, scale):
  """Fresh random adapters; DoRA magnitudes stay near the column norms (positive and O(1)),
  as training keeps them, since unmerging divides by them."""
  out = helpers.randomize(adapters, key, scale)

  def fix(new, old):
    if isinstance(new, lj.DoraParams):
      noise = jax.random.normal(jax.random.fold_in(key, 1), old.magnitude.shape)
      return lj.DoraParams(new.a, new.b, old.magnitude * jnp.exp(0.3 * noise), new.spec)
    return new

  return jax.tree_util.tree_map(fix, out, adapters, is_leaf=lj.adapters.is_adapter)


def _adapter_states(adapters):
  return lj.paths.flat(adapters, lj.adapters.is_adapter)


ALL = [(v, n) for v in VARIANTS for n in LAYERS]
ALL_BF16 = [(v, n, d) for v in VARIANTS for n in LAYERS for d in (jnp.float32, jnp.bfloat16)
            if d == jnp.float32 or n in BF16_LAYERS]
ids = lambda x: jnp.dtype(x).name if not isinstance(x, str) else x


@pytest.mark.parametrize('variant,name,dtype', ALL_BF16, ids=ids)
def test_identity_at_init(variant, name, dtype):
  case, params, args, adapters = _setup(variant, name, dtype)
  if '+' in variant:   # a residual base: W_res + s*A@B equals W up to rounding, not bitwise
    out = jax.jit(lj.lora(case.fn, strict=True))(lj.join(params, adapters), *args)
    ref = case.fn(helpers.cast_tree(case.params, dtype), *args)
    assert helpers.rel_err(out, np.asarray(jnp.asarray(ref, jnp.float32), np.float64)) < (
        helpers.TOL[dtype])
    return
  helpers.assert_identity_at_init(case.fn, params, adapters, *args)


@pytest.mark.parametrize('variant,name,dtype', ALL_BF16, ids=ids)
def test_factored_matches_float64_merged(variant, name, dtype):
  case, params, args, adapters = _setup(variant, name, dtype)
  # O(1) factors: a product of three (VeRA, AdaLoRA, Tied-LoRA) at 0.3 would barely show.
  adapters = helpers.randomize(adapters, jax.random.key(3), scale=1.0)
  helpers.assert_factored_and_merged_match_float64(case.fn, params, adapters, args, dtype)


@pytest.mark.parametrize('variant,name', ALL)
def test_unmerge_merge_roundtrip(variant, name):
  _, params, _, adapters = _setup(variant, name, jnp.float32)
  adapters = _randomize(adapters, jax.random.key(4), scale=0.3)
  merged, cache = lj.merge(params, adapters, return_cache=True)
  back = lj.unmerge(merged, adapters, cache=cache)
  for w, w2, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back),
                      jax.tree_util.tree_leaves(merged)):
    w, w2 = np.asarray(w), np.asarray(w2)
    # DoRA divides by the merged column norms: one more rounding than W + dW - dW.
    tol = 1e-6 if variant == 'lora' else 2e-6
    assert np.max(np.abs(w - w2)) <= tol * max(1.0, np.max(np.abs(w)))
  assert any(np.max(np.abs(np.asarray(m) - np.asarray(w))) > 1e-4 for m, w in zip(
      jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)))


@pytest.mark.parametrize('variant,name', ALL)
def test_param_count_and_summary(variant, name):
  case, params, _, adapters = _setup(variant, name, jnp.float32)
  states = _adapter_states(adapters)
  assert sorted(states) == sorted(case.expected)
  expected = sum(expected_count(variant, *case.expected[p], states[p].spec) for p in states)
  assert lj.count_params(adapters) == expected
  spec = lj.make_spec(params, [(case.pattern, {'variant': _name(variant), 'rank': R,
                                               **LAW_SETTINGS.get(_name(variant), {})})],
                      fn=case.fn, args=case.args)
  text = lj.summary(params, spec, print_fn=None)
  assert f'trainable {expected:,} of' in text


@pytest.mark.parametrize('variant,name', ALL)
def test_gradients_where_the_method_says(variant, name):
  case, params, args, adapters = _setup(variant, name, jnp.float32)
  adapters = helpers.randomize(adapters, jax.random.key(5), scale=0.1)
  base_copy = jax.tree_util.tree_map(np.array, params)
  loss_fn = helpers.mean_square_loss(case.fn)
  grads = jax.jit(jax.grad(lambda a: loss_fn(lj.join(params, a), args, None)))(adapters)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
  for path, g in _adapter_states(grads).items():
    for field in TRAINABLE[_name(variant)]:
      value = getattr(g, field)
      if value is None:  # a tied member: the shared pair lives at its owner
        assert variant == 'tied_lora' and field in ('a', 'b')
        continue
      assert np.any(np.asarray(value) != 0), (path, field)
    for field in set(lj.variants.base.field_labels(g)) - set(TRAINABLE[_name(variant)]):
      np.testing.assert_array_equal(np.asarray(getattr(g, field)), 0)
  tx = lj.optimizer(1e-2, weight_decay=0.1)
  step = lj.make_train_step(loss_fn, tx)
  opt_state = tx.init(adapters)
  before = _adapter_states(jax.tree_util.tree_map(np.array, adapters))
  for _ in range(2):
    adapters, opt_state, _ = step(params, adapters, opt_state, args)
  for path, state in _adapter_states(adapters).items():
    for field, label in lj.variants.base.field_labels(state).items():
      old, new = getattr(before[path], field), getattr(state, field)
      if label == 'frozen':
        np.testing.assert_array_equal(np.asarray(new), old)  # no update, no weight decay
      elif new is not None:
        assert np.any(np.asarray(new) != old), (path, field)
  helpers.assert_trees_equal(params, base_copy)


# ---------------------------------------------------------------------------------------------
# Each method's formula, in float64, against a direct NumPy implementation.


def _dense_setup(variant, shape=(12, 10), rank=3, **setting):
  with helpers.enable_x64():
    w = jax.random.normal(jax.random.key(11), shape, jnp.float64)
    params = {'w': w}
    spec = lj.make_spec(params, [('w', {'variant': variant, 'rank': rank, 'alpha': 5.0,
                                        'dtype': 'float64', **setting})])
    params, adapters = lj.init(jax.random.key(1), params, spec)
    adapters = helpers.randomize(adapters, jax.random.key(2), scale=0.5)
    adapters = helpers.cast_tree(adapters, jnp.float64)
    merged = lj.merge(params, adapters)['w']
    return np.asarray(w), adapters['w'], np.asarray(merged)


def _np(x):
  return np.asarray(x, np.float64)


FORMULA_CASES = [(v, (12, 10), 3, {}) for v in lj.variants.names() if v not in ('lokr', 'nola')] + [
    ('lokr', (12, 18), 2, {'factor': f}) for f in (-1, 2, 3)] + [
    ('nola', (12, 10), 3, {'num_basis': 5})]


@pytest.mark.parametrize('variant,shape,rank,setting', FORMULA_CASES,
                         ids=lambda x: x if isinstance(x, str) else None)
def test_merge_is_the_papers_formula(variant, shape, rank, setting):
  """merge(W) == the variant's `reference` (its paper's formula) in float64, 1e-12."""
  w, p, merged = _dense_setup(variant, shape=shape, rank=rank, **setting)
  with helpers.enable_x64():
    ref = lj.variants.get(variant).reference(w, p)
  np.testing.assert_allclose(merged, ref, rtol=1e-12, atol=1e-13)
  assert np.max(np.abs(merged - w)) > 1e-3   # the random adapter is not a no-op


def test_every_variant_declares_its_formula():
  assert all(lj.variants.get(v).reference is not None for v in lj.variants.names())


def test_dora_column_norm_is_the_expanded_norm():
  w, p, _ = _dense_setup('dora')
  wa = w + p.spec.scale * _np(p.a) @ _np(p.b)
  with helpers.enable_x64():
    n = dora_lib.column_norm(jnp.asarray(w), p.a, p.b, p.spec)   # the factored form's expansion
  np.testing.assert_allclose(_np(n), np.linalg.norm(wa, axis=0), rtol=1e-12)


def test_vera_projection_bounds():
  _, p, _ = _dense_setup('vera')
  with helpers.enable_x64():
    a_sh, b_sh = map(_np, vera_lib.projections(p.spec, jnp.float64))
  # Kaiming-uniform bounds as PEFT: 1/sqrt(d_in) for A, 1/sqrt(r) for B.
  assert np.abs(a_sh).max() <= 1 / math.sqrt(12) and np.abs(b_sh).max() <= 1 / math.sqrt(3)


def test_lokr_factorization_matches_peft():
  # Values of PEFT's / LyCORIS' `factorization`.
  assert lokr_lib.factorization(768) == (24, 32)
  assert lokr_lib.factorization(4096, 8) == (8, 512)
  assert lokr_lib.factorization(4096, 16) == (16, 256)
  assert lokr_lib.factorization(11) == (1, 11)
  assert lokr_lib.factorization(12, 4) == (3, 4)


def test_lora_xs_frozen_factors_are_the_truncated_svd():
  w, p, _ = _dense_setup('lora_xs')
  with helpers.enable_x64():   # the frozen factors as init makes them
    _, fresh = lj.init(jax.random.key(1), {'w': jnp.asarray(w)}, {'w': p.spec})
  u, sv, vt = np.linalg.svd(w, full_matrices=False)
  a, b = _np(fresh['w'].a), _np(fresh['w'].b)
  # A @ B is the rank-r truncation of W (U_r and S_r V_r^T up to the sign of each vector).
  np.testing.assert_allclose(a @ b, (u[:, :3] * sv[:3]) @ vt[:3], rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(np.abs(a), np.abs(u[:, :3]), atol=1e-10)
  np.testing.assert_array_equal(fresh['w'].core, 0)   # core_std=0: identity at init


def test_adalora_scale_is_alpha_over_r():
  _, p, _ = _dense_setup('adalora')
  assert p.spec.scale == 5.0 / 3


def test_adalora_and_sora_inits():
  params = {'w': jax.random.normal(jax.random.key(0), (64, 48))}
  spec = lj.make_spec(params, [('w', {'variant': 'adalora', 'rank': 8})])
  _, ad = lj.init(jax.random.key(1), params, spec)
  ad = ad['w']   # PEFT: lambda = 0, P and Q ~ N(0, 0.02^2), nothing masked
  assert not np.any(np.asarray(ad.lam)) and np.all(np.asarray(ad.mask) == 1)
  assert abs(float(jnp.std(ad.p)) - 0.02) < 3e-3 and abs(float(jnp.std(ad.q)) - 0.02) < 3e-3
  spec = lj.make_spec(params, [('w', {'variant': 'sora', 'rank': 48})])
  _, ad = lj.init(jax.random.key(1), params, spec)
  ad = ad['w']   # SoRA: B = 0, gate ~ N(0, 1), A as LoRA (Kaiming uniform)
  assert not np.any(np.asarray(ad.b)) and 0.7 < float(jnp.std(ad.gate)) < 1.3
  assert float(jnp.max(jnp.abs(ad.a))) <= 1 / math.sqrt(64)


def test_nola_basis_shapes_and_bounds():
  _, p, _ = _dense_setup('nola', num_basis=5)
  with helpers.enable_x64():
    a0, a_i, b_j = map(_np, nola_lib.bases(p.spec, jnp.float64))
  assert a_i.shape == (5, 12, 3) and b_j.shape == (5, 3, 10)
  assert np.abs(a_i).max() <= 1 / math.sqrt(5) and np.abs(b_j).max() <= 1 / math.sqrt(5)


# ---------------------------------------------------------------------------------------------
# What is special to each method.


def _two_layers(variant, rank=2, d=16, **setting):
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.Dense(d, name='l0')(x))
      h = jnp.tanh(nn.Dense(d, name='l1')(h))
      return nn.Dense(5, name='l2')(h)

  model = Two()
  x = jax.random.normal(jax.random.key(0), (4, d))
  params = model.init(jax.random.key(1), x)
  spec = lj.make_spec(params, [('kernel', {'variant': variant, 'rank': rank, **setting})])
  params, adapters = lj.init(jax.random.key(2), params, spec)
  return model, params, adapters, x


def test_vera_projections_are_shared_seeded_and_not_stored():
  model, params, adapters, x = _two_layers('vera')
  assert lj.count_params(adapters) == 2 * (2 + 16) + (2 + 5)
  leaves = jax.tree_util.tree_leaves(adapters)
  assert sum(l.size for l in leaves) == lj.count_params(adapters)  # nothing else is stored
  s0 = adapters['params']['l0']['kernel'].spec
  s1 = adapters['params']['l1']['kernel'].spec
  s2 = adapters['params']['l2']['kernel'].spec
  a0, b0 = vera_lib.projections(s0)
  a1, b1 = vera_lib.projections(s1)
  np.testing.assert_array_equal(a0, a1)    # same shape: the same matrices
  np.testing.assert_array_equal(b0, b1)
  assert vera_lib.projections(s2)[1].shape == (2, 5)
  _, _, other, _ = _two_layers('vera', seed=3)
  a3, _ = vera_lib.projections(other['params']['l0']['kernel'].spec)
  assert not np.allclose(a0, a3)
  # d_initial is the init of d.
  np.testing.assert_array_equal(adapters['params']['l0']['kernel'].d, np.float32(0.1))


def test_nola_bases_differ_per_layer_and_seed():
  _, _, adapters, _ = _two_layers('nola', num_basis=8)
  s0 = adapters['params']['l0']['kernel'].spec
  s1 = adapters['params']['l1']['kernel'].spec
  assert not np.allclose(nola_lib.bases(s0)[1], nola_lib.bases(s1)[1])
  np.testing.assert_array_equal(nola_lib.bases(s0)[1], nola_lib.bases(s0)[1])  # regenerated
  assert lj.count_params(adapters) == 3 * 2 * 8


def test_tied_lora_shares_one_pair_across_a_group():
  model, params, adapters, x = _two_layers('tied_lora', rank=3)
  l0, l1, l2 = (adapters['params'][k]['kernel'] for k in ('l0', 'l1', 'l2'))
  assert l0.owner and l0.a is not None and l1.a is None and not l1.owner
  assert l2.owner and l2.a.shape == (16, 3)   # another shape: its own group
  assert lj.count_params(adapters) == (2 * (3 + 16) + 3 * 32) + (3 + 5 + 3 * 21)
  adapters = helpers.randomize(adapters, jax.random.key(3), scale=0.3)
  apply = lj.lora(model.apply)
  loss = lambda a: jnp.sum(jnp.square(apply(lj.join(params, a), x)))
  grads = jax.grad(loss)(adapters)

  # Reference: the shared pair used in both layers, written by hand.
  def ref_loss(a, b, us, vs, rest):
    p = params['params']
    h = x
    for k, u, v in zip(('l0', 'l1'), us, vs):
      w = p[k]['kernel'] + 1.0 * (a * v) @ (b * u)
      h = jnp.tanh(h @ w + p[k]['bias'])
    w2 = p['l2']['kernel'] + 1.0 * (rest.a * rest.v) @ (rest.b * rest.u)
    return jnp.sum(jnp.square(h @ w2 + p['l2']['bias']))

  l0, l1, l2 = (adapters['params'][k]['kernel'] for k in ('l0', 'l1', 'l2'))
  ga, gb, gus, gvs = jax.grad(ref_loss, argnums=(0, 1, 2, 3))(
      l0.a, l0.b, (l0.u, l1.u), (l0.v, l1.v), l2)
  g0, g1 = grads['params']['l0']['kernel'], grads['params']['l1']['kernel']
  np.testing.assert_allclose(g0.a, ga, rtol=2e-5, atol=1e-6)   # both layers' contributions
  np.testing.assert_allclose(g0.b, gb, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(g1.u, gus[1], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(g1.v, gvs[1], rtol=2e-5, atol=1e-6)
  # split(join(...)) gives back the stripped tree; merge sees the shared pair everywhere.
  _, back = lj.split(lj.join(params, adapters))
  assert back['params']['l1']['kernel'].a is None
  merged = lj.merge(params, adapters)
  np.testing.assert_allclose(model.apply(merged, x), apply(lj.join(params, adapters), x),
                             rtol=1e-5, atol=1e-5)
  # Separate groups by option.
  spec = lj.make_spec(params, [('l0/kernel', {'variant': 'tied_lora', 'rank': 3, 'group': 'x'}),
                               ('l1/kernel', {'variant': 'tied_lora', 'rank': 3, 'group': 'y'})])
  _, sep = lj.init(jax.random.key(0), params, spec)
  assert sep['params']['l1']['kernel'].owner
  # A member without its owner cannot be used.
  with pytest.raises(ValueError, match="owning leaf is not in the adapter tree"):
    lj.join(params, {'params': {'l1': adapters['params']['l1']}})


def test_dora_norm_is_detached_in_the_backward_pass():
  case, params, args, adapters = _setup('dora', 'linen_dense', jnp.float32)
  adapters = helpers.randomize(adapters, jax.random.key(6), scale=0.3)
  apply = lj.lora(case.fn)
  loss = lambda a: jnp.sum(jnp.sin(apply(lj.join(params, a), *args)))
  grads = jax.grad(loss)(adapters)['params']['kernel']
  p = adapters['params']['kernel']
  w = params['params']['kernel']

  def ref(a, b, m):
    wa = w + p.spec.scale * a @ b
    n = jax.lax.stop_gradient(jnp.linalg.norm(wa, axis=0))
    merged = {'params': {**params['params'], 'kernel': m * wa / n}}
    return jnp.sum(jnp.sin(case.fn(merged, *args)))

  ga, gb, gm = jax.grad(ref, argnums=(0, 1, 2))(p.a, p.b, p.magnitude)
  for got, want in ((grads.a, ga), (grads.b, gb), (grads.magnitude, gm)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # And it differs from the gradient through the norm (the detach is real).
  def through(a, b, m):
    wa = w + p.spec.scale * a @ b
    merged = {'params': {**params['params'], 'kernel': m * wa / jnp.linalg.norm(wa, axis=0)}}
    return jnp.sum(jnp.sin(case.fn(merged, *args)))
  assert not np.allclose(jax.grad(through)(p.a, p.b, p.magnitude), ga, rtol=1e-3)


def test_dora_magnitude_init_is_the_column_norm():
  case, params, args, adapters = _setup('dora', 'linen_scan', jnp.float32)
  w = np.asarray(params['params']['layers']['dense']['kernel'])
  m = np.asarray(adapters['params']['layers']['dense']['kernel'].magnitude)
  np.testing.assert_allclose(m, np.linalg.norm(w, axis=1), rtol=1e-6)   # per stacked layer


def test_dora_unmerge_needs_the_cache():
  _, params, _, adapters = _setup('dora', 'linen_dense', jnp.float32)
  merged = lj.merge(params, adapters)
  with pytest.raises(ValueError, match=re.escape("return_cache=True")):
    lj.unmerge(merged, adapters)


def test_lora_fa_preconditioner():
  case, params, args, adapters = _setup('lora_fa', 'linen_scan', jnp.float32)
  adapters = helpers.randomize(adapters, jax.random.key(8))
  grads = helpers.randomize(adapters, jax.random.key(9))
  tx = lj.variants.lora_fa_preconditioner(delta=1e-3)
  out, _ = tx.update(grads, tx.init(adapters), adapters)
  p, g, o = (t['params']['layers']['dense']['kernel'] for t in (adapters, grads, out))
  a, gb = _np(p.a), _np(g.b)
  for layer in range(3):
    want = np.linalg.solve(a[layer].T @ a[layer] + 1e-3 * np.eye(R), gb[layer])
    np.testing.assert_allclose(o.b[layer], want / p.spec.scale ** 2, rtol=1e-4)
  np.testing.assert_array_equal(o.a, g.a)
  # Through `optimizer`: a step still moves only B.
  tx = lj.optimizer(1e-2, lora_fa_precondition=True)
  state = tx.init(adapters)
  upd, _ = tx.update(grads, state, adapters)
  u = upd['params']['layers']['dense']['kernel']
  np.testing.assert_array_equal(u.a, 0)
  assert np.all(np.isfinite(u.b)) and np.any(u.b != 0)


@pytest.mark.parametrize('variant,setting', [('loha', {}), ('lokr', {'factor': 2})])
def test_structured_variants_factor_where_cheaper(variant, setting):
  """Wide enough kernels run LoHa (Khatri-Rao, rank r^2) and LoKr (small factor) factored: the
  traced step has no d_in x d_out product; narrow ones form dW (allowed in strict mode)."""
  for d, factored in ((64, True), (8, False)):
    model = nn.Dense(d + 8)
    x = jax.random.normal(jax.random.key(0), (5, d))
    params = model.init(jax.random.key(1), x)
    spec = lj.make_spec(params, [('kernel', {'variant': variant, 'rank': 2, **setting})])
    params, adapters = lj.init(jax.random.key(2), params, spec)
    adapters = helpers.randomize(adapters, jax.random.key(3), scale=0.3)
    apply = lj.lora(model.apply, strict=True)
    loss = lambda a: jnp.sum(jnp.square(apply(lj.join(params, a), x)))
    jaxpr = jax.make_jaxpr(jax.grad(loss))(adapters)
    shapes = [tuple(v.aval.shape) for e in jaxpr.eqns for v in e.outvars]
    assert ((d, d + 8) in shapes) != factored, (d, shapes)
    out = apply(lj.join(params, adapters), x)
    ref = helpers.f64_reference(model.apply, params, adapters, x)
    assert helpers.rel_err(out, ref) < 1e-5


def test_variant_options_and_errors():
  params = {'w': jnp.ones((12, 8)), 'v': jnp.ones((7, 5))}

  def spec(setting, path='w'):
    return lj.make_spec(params, [(path, setting)])

  assert spec({'variant': 'lokr', 'factor': 4, 'rank': 2})['w'].opt('factor') == 4
  assert spec({'variant': 'nola'})['w'].opt('num_basis') == 64
  cases = [
      ({'variant': 'lora', 'factor': 2}, "Unknown setting keys ['factor'] for 'w' (variant "
       "'lora'); allowed:"),
      ({'variant': 'lokr', 'factor': 5}, "factor=5 for 'w' (lokr) does not divide its in size 12"),
      ({'variant': 'lokr', 'factor': 0}, "factor=0 for 'w' (lokr)"),
      ({'variant': 'lokr', 'factor': 4, 'rank': 5}, "rank=5 for 'w' (lokr) must be <= 4"),
      ({'variant': 'nola', 'num_basis': 0}, "num_basis=0 for 'w' (nola) must be an int >= 1"),
      ({'variant': 'vera', 'd_initial': 'big'}, "d_initial='big' for 'w' (vera) must be a number"),
      ({'variant': 'vera', 'seed': -1}, "seed=-1 for 'w' (vera) must be an int >= 0"),
      ({'variant': 'lora_xs', 'core_std': -1.0}, "core_std=-1.0 for 'w' (lora_xs) must be a "
       'number >= 0.0'),
      ({'variant': 'tied_lora', 'group': 3}, "group=3 for 'w' (tied_lora) must be a string"),
      ({'variant': 'nola', 'num_basis': [3]}, "num_basis=[3] for 'w' must be a hashable value"),
  ]
  for setting, message in cases:
    with pytest.raises(ValueError, match=re.escape(message)):
      spec(setting)
  with pytest.raises(ValueError, match=re.escape("Unknown defaults ['nope']")):
    lj.make_spec(params, [('w', {})], nope=1)
  # A variant option as a default applies to the leaves of that variant only.
  s = lj.make_spec(params, [('w', {'variant': 'lokr', 'rank': 2}), ('v', {'rank': 2})], factor=4)
  assert s['w'].opt('factor') == 4 and s['v'].options == ()


@pytest.mark.slow   # a training run per variant
def test_every_variant_trains_a_small_model():
  """Ten steps of each variant on one task lower the loss (the configs' path, end to end)."""
  model, params, _, x = _two_layers('lora')
  y = jax.random.normal(jax.random.key(5), (4, 5))
  for variant in VARIANTS:
    init = variant.partition('+')[2] or 'kaiming'
    spec = lj.make_spec(params, [('kernel', {'variant': _name(variant), 'rank': 2, 'init': init})])
    p, adapters = lj.init(jax.random.key(2), params, spec)
    apply = lj.lora(model.apply)

    def loss_fn(joined, batch, rng):
      return jnp.mean(jnp.square(apply(joined, batch[0]) - batch[1]))

    tx = lj.optimizer({'vera': 0.3, 'nola': 0.1}.get(variant, 3e-2))  # few params: larger LR
    step = lj.make_train_step(loss_fn, tx)
    state = tx.init(adapters)
    losses = []
    for _ in range(10):
      adapters, state, loss = step(p, adapters, state, (x, y))
      losses.append(float(loss))
    assert losses[-1] < 0.95 * losses[0], (variant, losses)
