"""Every supported layer kind, in linen and NNX, for float32 and bfloat16 bases: LoRA's laws.

identity at init; factored == float64 merged reference; unmerge(merge(W)) == W; adapter count
equals the formula, with in/out axes inferred from use. The law table of tests/test_variants.py
runs every variant (LoRA included) on a spread of these layer kinds (`VARIANT_LAYERS`); the laws
here run LoRA on the remaining (layer kind, dtype) pairs, so each pair is tested once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
from tests import helpers

R = 2


@dataclasses.dataclass
class Case:
  fn: Callable[..., Any]
  params: Any
  args: tuple
  pattern: str
  # adapted path -> (stacked layers, d_in, d_out)
  expected: dict[str, tuple[int, int, int]]


def _normal(key, shape):
  return jax.random.normal(key, shape, jnp.float32)


def _ids(key, shape, n):
  return jax.random.randint(key, shape, 0, n)


def _linen(module, *args, pattern='kernel', expected=None):
  params = module.init(jax.random.key(0), *args)
  return Case(module.apply, params, args, pattern, expected)


class _Attend(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(11, 6, name='embed')
    h = jnp.tanh(emb(ids))
    return emb.attend(h)


class _Step(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(6, name='dense')(h)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(_Step, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
    return layers(name='layers')(x, None)[0]


class _Vmapped(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.vmap(nn.Dense, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=0, out_axes=0)
    return dense(6, name='ensemble')(x)


class _Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.remat(_Step)(name='block')(x, None)[0]


class _JitSub(nn.Module):
  @nn.compact
  def __call__(self, x):
    k = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], 7))
    return jax.jit(lambda a, b: jnp.tanh(a @ b))(x, k)


class _Nnx(nnx.Module):

  def __init__(self, kind, rngs):
    self.kind = kind
    if kind == 'linear':
      self.layer = nnx.Linear(8, 6, rngs=rngs)
    elif kind == 'linear_general':
      self.layer = nnx.LinearGeneral((2, 4), (3, 5), axis=(-2, -1), rngs=rngs)
    elif kind == 'conv':
      self.layer = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    else:
      self.layer = nnx.Embed(11, 6, rngs=rngs)

  def __call__(self, x):
    return self.layer(x)


def _nnx(kind, x, expected):
  graphdef, state = nnx.split(_Nnx(kind, nnx.Rngs(0)))
  fn = lambda st, x: nnx.merge(graphdef, st)(x)
  return Case(fn, state, (x,), 'kernel|embedding', expected)


def _cases():
  k = jax.random.split(jax.random.key(42), 8)
  x8 = _normal(k[0], (3, 5, 8))
  img = _normal(k[1], (2, 6, 6, 3))
  ids = _ids(k[2], (3, 5), 11)
  img4 = _normal(k[7], (2, 6, 6, 4))
  return {
      'linen_dense': lambda: _linen(nn.Dense(6), x8, expected={'params/kernel': (1, 8, 6)}),
      'linen_densegeneral_out': lambda: _linen(
          nn.DenseGeneral((2, 3)), x8, expected={'params/kernel': (1, 8, 6)}),
      'linen_densegeneral_in': lambda: _linen(
          nn.DenseGeneral(4, axis=(-2, -1)), _normal(k[3], (3, 2, 5)),
          expected={'params/kernel': (1, 10, 4)}),
      'linen_einsum': lambda: _linen(
          nn.Einsum((8, 5), '...d,dk->...k'), x8, expected={'params/kernel': (1, 8, 5)}),
      'linen_einsum_transposed': lambda: _linen(
          nn.Einsum((5, 8), '...d,kd->...k'), x8, expected={'params/kernel': (1, 8, 5)}),
      'linen_conv': lambda: _linen(nn.Conv(4, (3, 3)), img,
                                   expected={'params/kernel': (1, 27, 4)}),
      'linen_conv_strided': lambda: _linen(
          nn.Conv(4, (3, 2), strides=(2, 1), padding='VALID', kernel_dilation=(1, 2)), img,
          expected={'params/kernel': (1, 18, 4)}),
      'linen_conv_grouped': lambda: _linen(nn.Conv(4, (3, 3), feature_group_count=2), img4,
                                           expected={'params/kernel': (1, 18, 4)}),
      'linen_conv_depthwise': lambda: _linen(
          nn.Conv(8, (3, 3), feature_group_count=4, padding='VALID'), img4,
          expected={'params/kernel': (1, 9, 8)}),
      'linen_embed': lambda: _linen(nn.Embed(11, 6), ids, pattern='embedding',
                                    expected={'params/embedding': (1, 11, 6)}),
      'linen_embed_attend': lambda: _linen(_Attend(), ids, pattern='embedding',
                                           expected={'params/embed/embedding': (1, 11, 6)}),
      'linen_scan': lambda: _linen(_Scanned(), _normal(k[4], (3, 6)),
                                   expected={'params/layers/dense/kernel': (3, 6, 6)}),
      'linen_vmap': lambda: _linen(_Vmapped(), _normal(k[6], (3, 4, 5)),
                                   expected={'params/ensemble/kernel': (3, 5, 6)}),
      'linen_remat': lambda: _linen(_Remat(), _normal(k[4], (3, 6)),
                                    expected={'params/block/dense/kernel': (1, 6, 6)}),
      'linen_jit_subfunction': lambda: _linen(_JitSub(), x8,
                                              expected={'params/kernel': (1, 8, 7)}),
      'nnx_linear': lambda: _nnx('linear', x8, {'layer/kernel': (1, 8, 6)}),
      'nnx_linear_general': lambda: _nnx('linear_general', _normal(k[5], (3, 2, 4)),
                                         {'layer/kernel': (1, 8, 15)}),
      'nnx_conv': lambda: _nnx('conv', img, {'layer/kernel': (1, 27, 4)}),
      'nnx_embed': lambda: _nnx('embed', ids, {'layer/embedding': (1, 11, 6)}),
  }


CASES = _cases()
DTYPES = [jnp.float32, jnp.bfloat16]
# The layer kinds of the variant law table (tests/test_variants.py), float32, and the ones it
# also runs in bfloat16.
VARIANT_LAYERS = ['linen_dense', 'linen_densegeneral_in', 'nnx_linear_general',
                  'linen_einsum_transposed', 'linen_conv', 'linen_conv_grouped', 'linen_embed',
                  'linen_embed_attend', 'linen_scan', 'linen_vmap']
VARIANT_BF16_LAYERS = ['linen_dense', 'linen_embed_attend', 'linen_scan']
_in_variant_table = lambda name, dtype: name in (
    VARIANT_LAYERS if dtype == jnp.float32 else VARIANT_BF16_LAYERS)
REST = [(n, d) for n in CASES for d in DTYPES if not _in_variant_table(n, d)]
REST_F32 = [n for n in CASES if n not in VARIANT_LAYERS]
_case_ids = lambda x: jnp.dtype(x).name if not isinstance(x, str) else x


def _setup(name, dtype):
  case = CASES[name]()
  params = helpers.cast_tree(case.params, dtype)
  args = tuple(helpers.cast_tree(a, dtype) for a in case.args)
  spec = lj.make_spec(params, [(case.pattern, {'rank': R, 'alpha': 3.0, 'dtype': 'float32'})],
                      fn=case.fn, args=args)
  params, adapters = lj.init(jax.random.key(7), params, spec)
  return case, params, args, adapters


@pytest.mark.parametrize('name,dtype', REST, ids=_case_ids)
def test_identity_at_init(name, dtype):
  case, params, args, adapters = _setup(name, dtype)
  helpers.assert_identity_at_init(case.fn, params, adapters, *args)


@pytest.mark.parametrize('name,dtype', REST, ids=_case_ids)
def test_factored_matches_float64_merged(name, dtype):
  case, params, args, adapters = _setup(name, dtype)
  adapters = helpers.randomize(adapters, jax.random.key(3))
  helpers.assert_factored_and_merged_match_float64(case.fn, params, adapters, args, dtype)


@pytest.mark.parametrize('name,dtype', [(n, d) for n in CASES for d in DTYPES
                                        if d == jnp.bfloat16 or n not in VARIANT_LAYERS],
                         ids=_case_ids)
def test_unmerge_merge_roundtrip(name, dtype):
  _, params, _, adapters = _setup(name, dtype)
  adapters = helpers.randomize(adapters, jax.random.key(4), scale=0.1)
  back = lj.unmerge(lj.merge(params, adapters), adapters)
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  for w, w2 in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    w = np.asarray(w.astype(jnp.float32))
    w2 = np.asarray(w2.astype(jnp.float32))
    assert np.max(np.abs(w - w2)) <= tol * max(1.0, np.max(np.abs(w)))


@pytest.mark.parametrize('name', list(CASES))
def test_param_count_and_inferred_axes(name):
  case, params, _, adapters = _setup(name, jnp.float32)
  expected = sum(stack * R * (d_in + d_out) for stack, d_in, d_out in case.expected.values())
  assert lj.count_params(adapters) == expected
  flat = {p: a for p, a in lj.paths.flat(adapters, lj.adapters.is_adapter).items()}
  assert sorted(flat) == sorted(case.expected)
  for path, (stack, d_in, d_out) in case.expected.items():
    s = flat[path].spec
    assert (int(np.prod(s.batch_shape)), int(np.prod(s.in_shape)),
            int(np.prod(s.out_shape))) == (stack, d_in, d_out)


@pytest.mark.parametrize('name', REST_F32)
def test_gradients_only_for_adapters_and_base_unchanged(name):
  case, params, args, adapters = _setup(name, jnp.float32)
  adapters = helpers.randomize(adapters, jax.random.key(5), scale=0.1)
  base_copy = jax.tree_util.tree_map(np.array, params)
  loss_fn = helpers.mean_square_loss(case.fn)
  grads = jax.grad(lambda a: loss_fn(lj.join(params, a), args, None))(adapters)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads))
  tx = lj.optimizer(1e-2)
  step = lj.make_train_step(loss_fn, tx)
  opt_state = tx.init(adapters)
  before = jax.tree_util.tree_map(np.array, adapters)
  for _ in range(2):
    adapters, opt_state, _ = step(params, adapters, opt_state, args)
  assert any(np.any(np.asarray(a) != b) for a, b in zip(
      jax.tree_util.tree_leaves(adapters), jax.tree_util.tree_leaves(before)))
  helpers.assert_trees_equal(params, base_copy)
