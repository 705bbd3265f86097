"""Selection: rules, first match, presets, summary, and every bad input's message."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj


class _Net(nn.Module):

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(20, 16, name='embed')(ids)
    x = nn.DenseGeneral((2, 8), name='attn_q')(x)
    x = nn.DenseGeneral(16, axis=(-2, -1), name='attn_out')(x)
    x = nn.LayerNorm(name='norm')(x)
    x = nn.Dense(32, name='mlp')(x)
    return nn.Dense(5, name='head')(x)


@pytest.fixture(scope='module')
def net():
  ids = jnp.arange(12).reshape(3, 4)
  model = _Net()
  return model, model.init(jax.random.key(0), ids), ids


def _leaves(spec):
  return lj.spec.spec_leaves(spec)


def test_first_match_wins_and_none_freezes(net):
  _, params, _ = net
  rules = [(r'mlp/kernel', {'rank': 3, 'alpha': 6}), (r'mlp', None),
           (r'attn_q/kernel', {'rank': 2, 'in_axes': 0, 'out_axes': (1, 2)}),
           (r'head', 'full'), (r'attn_out', None), (r'norm/scale', 'full')]
  specs = _leaves(lj.make_spec(params, rules))
  assert specs['params/mlp/kernel'].rank == 3
  assert specs['params/mlp/kernel'].scale == 2.0
  assert 'params/mlp/bias' not in specs
  assert specs['params/attn_q/kernel'].out_axes == (1, 2)
  assert specs['params/head/kernel'].variant == 'full'
  assert specs['params/head/bias'].variant == 'full'
  assert 'params/embed/embedding' not in specs
  assert specs['params/norm/scale'].variant == 'full'
  assert 'params/attn_out/kernel' not in specs


def test_scaling_modes(net):
  _, params, _ = net
  scales = {}
  for mode in lj.spec.SCALINGS:
    s = _leaves(lj.make_spec(params, [('mlp/kernel', {'rank': 4, 'alpha': 8,
                                                      'scaling': mode})]))
    scales[mode] = s['params/mlp/kernel'].scale
  assert scales == {'alpha/r': 2.0, 'rslora': 4.0, 'constant': 8.0}


def test_defaults_apply(net):
  _, params, _ = net
  s = _leaves(lj.make_spec(params, [('mlp/kernel', {})], rank=5, dropout=0.1))
  assert s['params/mlp/kernel'].rank == 5
  assert s['params/mlp/kernel'].alpha == 5.0
  assert s['params/mlp/kernel'].dropout == 0.1


def test_dense_preset_excludes_embeddings_and_head(net):
  model, params, ids = net
  spec = lj.make_spec(params, lj.dense_kernels(rank=2), fn=model.apply, args=(ids,))
  assert sorted(_leaves(spec)) == ['params/attn_out/kernel', 'params/attn_q/kernel',
                                   'params/mlp/kernel']
  s = _leaves(spec)
  assert (s['params/attn_out/kernel'].in_axes, s['params/attn_out/kernel'].out_axes) == (
      (0, 1), (2,))
  assert (s['params/attn_q/kernel'].in_axes, s['params/attn_q/kernel'].out_axes) == (
      (0,), (1, 2))


def test_summary_table(net):
  model, params, ids = net
  spec = lj.make_spec(params, [('head', 'full')] + lj.dense_kernels(rank=2), fn=model.apply,
                      args=(ids,))
  text = lj.summary(params, spec, print_fn=None)
  lines = text.splitlines()
  assert lines[0].split() == ['path', 'shape', 'variant', 'rank', 'params']
  row = next(l for l in lines if l.startswith('params/mlp/kernel'))
  assert row.split() == ['params/mlp/kernel', '16x32', 'lora', '2', str(2 * (16 + 32))]
  _, adapters = lj.init(jax.random.key(0), params, spec)
  total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  n = lj.count_params(adapters)
  assert lines[-1] == (f'trainable {n:,} of {total:,} base parameters '
                       f'({100 * n / total:.4f}%)')


def test_stacked_kernels_get_stacked_adapters():
  params = {'layers': {'kernel': jnp.ones((3, 8, 4))}}
  spec = lj.make_spec(params, [('kernel', {'rank': 2, 'batch_axes': 0})])
  _, adapters = lj.init(jax.random.key(0), params, spec)
  a = adapters['layers']['kernel']
  assert a.a.shape == (3, 8, 2) and a.b.shape == (3, 2, 4)
  assert not np.allclose(a.a[0], a.a[1]), 'each layer gets its own init'


def test_adapter_dtype_independent_of_base():
  params = {'kernel': jnp.ones((8, 4), jnp.bfloat16)}
  spec = lj.make_spec(params, [('kernel', {'rank': 2, 'dtype': 'float32'})])
  _, adapters = lj.init(jax.random.key(0), params, spec)
  assert adapters['kernel'].a.dtype == jnp.float32
  assert adapters['kernel'].b.dtype == jnp.float32
  spec = lj.make_spec(params, [('kernel', {'rank': 2})])
  assert lj.init(jax.random.key(0), params, spec)[1]['kernel'].a.dtype == jnp.bfloat16


@pytest.mark.parametrize('init', ['kaiming', 'gaussian'])
def test_init_distributions(init):
  d_in, d_out, r = 400, 300, 16
  params = {'kernel': jnp.ones((d_in, d_out))}
  spec = lj.make_spec(params, [('kernel', {'rank': r, 'init': init})])
  _, adapters = lj.init(jax.random.key(0), params, spec)
  a = np.asarray(adapters['kernel'].a)
  assert np.all(adapters['kernel'].b == 0)
  if init == 'kaiming':
    bound = 1 / np.sqrt(d_in)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound
  else:
    assert abs(a.std() - 1 / r) < 0.05 / r


def test_init_is_deterministic_and_per_path(net):
  _, params, _ = net
  spec = lj.make_spec(params, [('kernel', {'rank': 2, 'in_axes': 0})])
  _, a1 = lj.init(jax.random.key(0), params, spec)
  _, a2 = lj.init(jax.random.key(0), params, spec)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a1, a2)
  # A leaf's init does not depend on which other leaves are adapted.
  spec_one = lj.make_spec(params, [('mlp/kernel', {'rank': 2})])
  _, a3 = lj.init(jax.random.key(0), params, spec_one)
  np.testing.assert_array_equal(a1['params']['mlp']['kernel'].a,
                                a3['params']['mlp']['kernel'].a)


BAD = [
    ([('nothing_here', {'rank': 2})], {}, "Rule 'nothing_here' matches no parameter path"),
    ([('mlp/kernel', {'rank': 0})], {}, "rank=0 for 'params/mlp/kernel' (in 16, out 32) must be"
                                        " an int in [1, 16]"),
    ([('mlp/kernel', {'rank': -3})], {}, 'rank=-3'),
    ([('mlp/kernel', {'rank': 17})], {}, 'rank=17 for \'params/mlp/kernel\' (in 16, out 32) '
                                         'must be an int in [1, 16]'),
    ([('mlp/kernel', {'rank': 2.5})], {}, 'rank=2.5'),
    ([('mlp/kernel', {'variant': 'lorra'})], {},
     "Unknown variant 'lorra' for 'params/mlp/kernel'; allowed: ['adalora', 'dora', 'full', "
     "'loha', 'lokr', 'lora', 'lora_fa', 'lora_xs', 'nola', 'sora', 'tied_lora', 'vera']"),
    ([('mlp/kernel', {'scaling': 'sqrt'})], {},
     "Unknown scaling 'sqrt' for 'params/mlp/kernel'; allowed: ['alpha/r', 'rslora', 'constant']"),
    ([('mlp/kernel', {'init': 'zeros'})], {}, "Unknown init 'zeros'"),
    ([('mlp/kernel', {'rnak': 2})], {}, "Unknown setting keys ['rnak']"),
    ([('mlp/bias', {'rank': 2})], {}, "Rule matched 'params/mlp/bias' with shape (32,): adapters "
                                      'need an array of rank >= 2'),
    ([('attn_q/kernel', {'rank': 2})], {}, "Kernel 'params/attn_q/kernel' has shape (16, 2, 8): "
                                           'its in/out axes are ambiguous'),
    ([('mlp/kernel', {'dropout': 1.0})], {}, 'dropout=1.0'),
    ([('mlp/kernel', {'dtype': 'int8'})], {}, 'adapters need a float dtype'),
    ([('mlp/kernel', {'alpha': float('nan')})], {},
     "alpha=nan for 'params/mlp/kernel' must be a finite number > 0"),
    ([('mlp/kernel', {'alpha': float('inf')})], {}, 'alpha=inf'),
    ([('mlp/kernel', {'alpha': 0})], {}, "alpha=0.0 for 'params/mlp/kernel' must be a finite"),
    ([('mlp/kernel', {'alpha': -2})], {}, 'alpha=-2.0'),
    ([('mlp/kernel', {'alpha': 'big'})], {},
     "alpha='big' for 'params/mlp/kernel' must be a number; got a str"),
    ([('mlp/kernel', {'dropout': '0.1'})], {}, "dropout='0.1' for 'params/mlp/kernel' must be a "
                                               'number'),
    ([('mlp/kernel', {})], {'rnak': 3}, "Unknown defaults ['rnak']"),
    ([('(unclosed', {})], {}, "Rule pattern '(unclosed' is not a valid regex"),
    ([('mlp', None), ('mlp/kernel', {})], {}, "Rule 'mlp/kernel' has no effect: every path it "
                                              'matches is decided by an earlier rule'),
    # One rule given without its list, or a list's third entry that is not `optional`.
    (('mlp/kernel', {'rank': 2}), {}, "Rules must be a list of (regex, setting) rules; got "
                                      "('mlp/kernel', {'rank': 2})"),
    ('mlp/kernel', {}, "Rules must be a list of (regex, setting) rules; got 'mlp/kernel'"),
    ([('mlp/kernel', {'rank': 2}, 4)], {}, 'A rule must be (regex, setting), (regex, setting, '
                                            'optional: bool) or Rule(...)'),
    # Nothing to train: no rules, or rules that only freeze.
    ([], {}, 'The rules [] select no leaf to adapt or train'),
    ([('mlp', None)], {}, "The rules [('mlp', None)] select no leaf to adapt or train"),
]


@pytest.mark.parametrize('rules,defaults,message', BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_messages(net, rules, defaults, message):
  _, params, _ = net
  with pytest.raises(ValueError, match=re.escape(message)):
    lj.make_spec(params, rules, **defaults)


def test_an_error_of_fn_says_make_spec_traced_it(net):
  model, params, ids = net
  with pytest.raises(ValueError, match='Input type must be an integer') as e:
    lj.make_spec(params, [('mlp/kernel', {})], fn=model.apply, args=(ids * 0.5,))
  assert any('(raised by fn=Module.apply, which make_spec traces on the parameters and args=' in n
             for n in getattr(e.value, '__notes__', ())), e.value


def test_summary_of_a_spec_of_other_params_is_refused(net):
  _, params, _ = net
  spec = lj.make_spec(params, [('mlp/kernel', {'rank': 2})])
  with pytest.raises(ValueError, match=re.escape("Spec path 'params/mlp/kernel' is not a "
                                                 'parameter path')):
    lj.summary({'params': {'other': jnp.ones((3, 3))}}, spec, print_fn=None)


def test_non_float_leaf_is_refused():
  params = {'table': jnp.zeros((4, 4), jnp.int32), 'kernel': jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=re.escape("Rule matched 'table', which is not a float "
                                                 'array (dtype int32)')):
    lj.make_spec(params, [('table', {'rank': 1})])


def test_mismatched_adapters_are_refused(net):
  _, params, _ = net
  spec = lj.make_spec(params, [('mlp/kernel', {'rank': 2})])
  _, adapters = lj.init(jax.random.key(0), params, spec)
  other = {'params': {'mlp': {'kernel': jnp.ones((16, 33))}}}
  with pytest.raises(ValueError, match=re.escape(
      "Adapter for 'params/mlp/kernel' was made for shape (16, 32), but the parameter has "
      'shape (16, 33)')):
    lj.join(other, adapters)
  with pytest.raises(ValueError, match='Adapters for paths that are not in params'):
    lj.join({'params': {'x': jnp.ones(3)}}, adapters)


def _temporal_conv(params, x):
  """A recurrentgemma-style temporal Conv1D: its weight (width, features) is used elementwise,
  `x[t - k] * w[k]` summed over k, never contracted."""
  w = params['conv_1d']['w']
  out = 0.0
  for k in range(w.shape[0]):
    out = out + jnp.pad(x, ((0, 0), (k, 0), (0, 0)))[:, :x.shape[1]] * w[k]
  return out + params['conv_1d']['b']


def _temporal_params():
  return {'conv_1d': {'w': jax.random.normal(jax.random.key(0), (4, 8)), 'b': jnp.zeros(8)},
          'proj': {'w': jax.random.normal(jax.random.key(1), (8, 8))}}


def test_kernel_without_a_contraction_is_refused_naming_its_consumer():
  params, x = _temporal_params(), jnp.ones((2, 5, 8))
  with pytest.raises(ValueError, match=re.escape(
      "Kernel 'conv_1d/w' (shape (4, 8)) is selected for an adapter, but fn consumes it at "
      "primitive 'mul', not in a contraction")):
    lj.make_spec(params, [('conv_1d/w', {'rank': 2})], fn=_temporal_conv, args=(x,))
  # Told the axes, it is adapted (and lora(fn) materializes it, with a warning saying so).
  spec = lj.make_spec(params, [('conv_1d/w', {'rank': 2, 'in_axes': 0, 'out_axes': 1})],
                      fn=_temporal_conv, args=(x,))
  assert _leaves(spec)['conv_1d/w'].in_axes == (0,)
  # Inside a jitted sub-function the consumer is the op in the body.
  jitted = lambda p, x: jax.jit(_temporal_conv)(p, x)
  with pytest.raises(ValueError, match="at primitive 'mul'"):
    lj.make_spec(params, [('conv_1d/w', {'rank': 2})], fn=jitted, args=(x,))
  # Leaves fn does not use are not refused (nothing says how they are used).
  spec = lj.make_spec(params, [('proj/w', {'rank': 2})], fn=_temporal_conv, args=(x,))
  assert _leaves(spec)['proj/w'].out_axes == (1,)


def test_assumed_2d_layout_warns_once_per_call():
  params = _temporal_params()
  with pytest.warns(lj.AxesAssumedWarning, match=re.escape(
      "assumed the layout (in, out) for the 2-D kernels 'conv_1d/w', 'proj/w'.")) as record:
    lj.make_spec(params, [('/w$', {'rank': 2})])
  assert len([w for w in record if issubclass(w.category, lj.AxesAssumedWarning)]) == 1
  assert "fn=" in str(record[0].message) and 'in_axes' in str(record[0].message)


@pytest.mark.filterwarnings('error::lorax_jax.AxesAssumedWarning')
def test_no_layout_warning_when_the_layout_is_known(net):
  _, params, _ = net
  # Flax's names say the layout: 'kernel' (in, out) and 'embedding' (vocab, features).
  lj.make_spec(params, [('mlp/kernel|head/kernel|embedding', {'rank': 2})])
  lj.make_spec(_temporal_params(), [('proj/w', {'rank': 2, 'in_axes': 0})])   # told
  lj.make_spec({'w': jnp.ones((8, 8))}, [('w', {'rank': 2})], fn=lambda p, x: x @ p['w'],
               args=(jnp.ones((2, 8)),))                                        # inferred
