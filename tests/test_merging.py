"""Merging (lorax_jax.merging): PEFT's merge_utils on random tensors, add_weighted_adapter on the
real MiniLM, the exactness claims, LoRAHub, and the errors."""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
from lorax_jax import merging
from lorax_jax.leafspec import LeafSpec

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
from peft.utils import merge_utils as pmu  # pylint: disable=wrong-import-position

torch.set_num_threads(1)   # as tests/test_interop.py: the suite's workers share the cores
os.environ.setdefault('HF_HUB_OFFLINE', '1')


def _rand(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _t(x):
  return torch.tensor(np.asarray(x))


# ------------------------------------------------------------------------------------------
# Tensor level against peft.utils.merge_utils.

TENSOR_CASES = [
    ('task_arithmetic', {}),
    ('magnitude_prune', {'density': 0.3}),
    ('ties', {'density': 0.4, 'majority_sign_method': 'total'}),
    ('ties', {'density': 0.6, 'majority_sign_method': 'frequency'}),
    ('ties', {'density': 1.0, 'majority_sign_method': 'total'}),
]


@pytest.mark.filterwarnings('ignore:The density 1.0 is greater')   # PEFT's, at density 1
@pytest.mark.parametrize('name,kwargs', TENSOR_CASES)
def test_deterministic_merges_equal_peft(name, kwargs):
  rng = np.random.default_rng(0)
  tensors = [_rand(rng, 12, 20) for _ in range(3)]
  weights = np.array([0.7, -0.4, 1.3], np.float32)
  ours = getattr(merging, name)([jnp.asarray(t) for t in tensors], jnp.asarray(weights), **kwargs)
  theirs = getattr(pmu, name)([_t(t) for t in tensors], _t(weights), **kwargs).numpy()
  assert np.count_nonzero(theirs) > 0
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6 * np.abs(theirs).max())
  # A stacked array works as the list does.
  stacked = getattr(merging, name)(jnp.stack(tensors), jnp.asarray(weights), **kwargs)
  np.testing.assert_allclose(stacked, ours, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('method', ['total', 'frequency'])
def test_sign_mask_disjoint_merge_and_magnitude_pruning_equal_peft(method):
  rng = np.random.default_rng(1)
  stacked = _rand(rng, 4, 7, 9)
  stacked[1, :2] = 0.0    # zeros (pruned entries) never have the elected sign
  ours = merging.calculate_majority_sign_mask(jnp.asarray(stacked), method)
  theirs = pmu.calculate_majority_sign_mask(_t(stacked), method).numpy()
  np.testing.assert_array_equal(np.asarray(ours), theirs)
  got = merging.disjoint_merge(jnp.asarray(stacked), ours)
  want = pmu.disjoint_merge(_t(stacked), _t(theirs)).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  x = _rand(rng, 30, 11)
  for density in (0.0, 0.25, 0.5, 0.999):
    want = pmu.prune(_t(x), density, 'magnitude').numpy()
    np.testing.assert_allclose(merging.prune(jnp.asarray(x), density, 'magnitude'), want,
                               rtol=1e-6, atol=0)
    assert np.count_nonzero(want) == int(density * x.size)
  np.testing.assert_array_equal(merging.prune(jnp.asarray(x), 1.0, 'random'), x)


def test_random_pruning_statistics():
  rng = np.random.default_rng(2)
  x = jnp.asarray(_rand(rng, 300, 200))
  key = jax.random.key(0)
  for density in (0.1, 0.7):
    pruned = np.asarray(merging.prune(x, density, 'random', rescale=True, key=key))
    kept = pruned != 0
    # 60,000 Bernoulli draws: the kept fraction is within 5 standard deviations of density.
    assert abs(kept.mean() - density) < 5 * np.sqrt(density * (1 - density) / x.size)
    np.testing.assert_allclose(pruned[kept], np.asarray(x)[kept] / density, rtol=1e-6)
    plain = np.asarray(merging.random_pruning(x, density, False, key=key))
    np.testing.assert_array_equal(plain[kept], np.asarray(x)[kept])   # same key, same mask
    np.testing.assert_array_equal(plain[~kept], 0)
  # PEFT's draw has the same statistics.
  theirs = pmu.prune(_t(x), 0.7, 'random', rescale=True).numpy()
  assert abs((theirs != 0).mean() - 0.7) < 5 * np.sqrt(0.21 / x.size)
  # DARE: each task gets its own mask (split(key, n)[i]), independent of the others.
  ts = jnp.stack([x, -0.5 * x])
  merged = np.asarray(merging.dare_linear(ts, jnp.array([1.0, 1.0]), 0.5, key=key))
  m0, m1 = [np.asarray(merging.prune(x, 0.5, 'random', rescale=True, key=k)) != 0
            for k in jax.random.split(key, 2)]
  np.testing.assert_allclose(merged, np.asarray(x) * (2.0 * m0 - m1), rtol=1e-6, atol=1e-6)
  assert abs((m0 & m1).mean() - 0.25) < 0.01


class SharedMasks:
  """One keep-mask per tensor (by shape, density and values, in lorax's canonical layout),
  handed to lorax_jax and to PEFT alike. Values are matched to 1e-4 of the tensor's largest
  entry, so a dW that torch and JAX compute with different roundings gets the same mask."""

  def __init__(self, seed=0):
    self.rng = np.random.default_rng(seed)
    self.entries = []
    self.lorax_calls = self.peft_calls = 0

  def mask(self, x, density):
    x = np.asarray(x, np.float64)
    probe = x.ravel()[::max(1, x.size // 256)]
    tol = 1e-4 * np.abs(probe).max()
    for shape, d, p, m in self.entries:
      if shape == x.shape and d == density and np.max(np.abs(p - probe)) <= tol:
        return m
    m = self.rng.random(x.shape) < density
    self.entries.append((x.shape, density, probe, m))
    return m

  def install(self, monkeypatch):
    """Substitutes both sides' mask source. PEFT's tensors are 2-D torch layouts, the
    transposes of lorax's canonical (d_in, r), (r, d_out) and (d_in, d_out) views."""

    def lorax_mask(key, tensor, density):
      del key
      self.lorax_calls += 1
      return jax.pure_callback(lambda t: self.mask(t, density),
                               jax.ShapeDtypeStruct(tensor.shape, jnp.bool_), tensor,
                               vmap_method='sequential')

    def peft_random_pruning(tensor, density, rescale):
      self.peft_calls += 1
      m = torch.tensor(self.mask(tensor.detach().numpy().T, density).T)
      pruned = tensor * m
      return pruned / density if rescale else pruned

    monkeypatch.setattr(merging, '_random_mask', lorax_mask)
    monkeypatch.setattr(pmu, 'random_pruning', peft_random_pruning)


def test_dare_and_random_prune_equal_peft_through_a_shared_mask(monkeypatch):
  shared = SharedMasks()
  shared.install(monkeypatch)
  rng = np.random.default_rng(3)
  tensors = [_rand(rng, 16, 24) for _ in range(3)]
  weights = np.array([0.9, 0.5, -0.6], np.float32)
  key = jax.random.key(5)
  for name, kw in [('dare_linear', {}), ('dare_ties', {'majority_sign_method': 'total'}),
                   ('dare_ties', {'majority_sign_method': 'frequency'})]:
    ours = getattr(merging, name)([jnp.asarray(t) for t in tensors], jnp.asarray(weights), 0.4,
                                  key=key, **kw)
    # PEFT's tensors are the transposes (torch layout) of lorax's.
    theirs = getattr(pmu, name)([_t(t.T) for t in tensors], _t(weights), 0.4, **kw).numpy().T
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6 * np.abs(theirs).max())
  ours = merging.prune(jnp.asarray(tensors[0]), 0.3, 'random', rescale=True, key=key)
  theirs = pmu.prune(_t(tensors[0].T), 0.3, 'random', rescale=True).numpy().T
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  assert shared.lorax_calls and shared.peft_calls


def test_tensor_merges_jit():
  rng = np.random.default_rng(4)
  ts = jnp.asarray(_rand(rng, 3, 8, 5))
  w = jnp.array([0.3, -1.2, 0.8])
  key = jax.random.key(2)
  for fn in (functools.partial(merging.ties, density=0.5, majority_sign_method='frequency'),
             functools.partial(merging.dare_ties, density=0.5, key=key)):
    np.testing.assert_allclose(jax.jit(fn)(ts, w), fn(ts, w), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Adapter trees: small synthetic ones.

# A 2-D kernel and a stacked DenseGeneral kernel (3 layers, in 5, out (2, 4)).
GEOMETRY = {'dense/kernel': ((6, 10), (), (0,), (1,)),
            'stack/kernel': ((3, 5, 2, 4), (0,), (1,), (2, 3))}


def _tree(seed, ranks, scaling='alpha/r', alpha=3.0, geometry=GEOMETRY):
  rng = np.random.default_rng(seed)
  out = {}
  for path, (shape, batch, ins, outs) in geometry.items():
    r = ranks[path] if isinstance(ranks, dict) else ranks
    spec = LeafSpec('lora', rank=r, alpha=alpha, scaling=scaling, shape=shape,
                    batch_axes=batch, in_axes=ins, out_axes=outs)
    a = _rand(rng, *spec.batch_shape, *spec.in_shape, r)
    b = _rand(rng, *spec.batch_shape, r, *spec.out_shape)
    out[tuple(path.split('/'))] = lj.LoraParams(jnp.asarray(a), jnp.asarray(b), spec)
  return lj.paths.nest(out)


def _flat(tree):
  return lj.paths.flat(tree, is_leaf=lj.adapters.is_adapter)


def _delta64(ad):
  """s * A @ B as float64 stacked matrices (stack, d_in, d_out)."""
  s = ad.spec
  n, d_in, d_out = (int(np.prod(s.batch_shape)), int(np.prod(s.in_shape)),
                    int(np.prod(s.out_shape)))
  a = np.asarray(ad.a, np.float64).reshape(n, d_in, -1)
  b = np.asarray(ad.b, np.float64).reshape(n, -1, d_out)
  return s.scale * a @ b


def _kernel_delta(delta, ad):
  """A merge_deltas leaf (kernel layout) as float64 stacked matrices."""
  s = ad.spec
  m = lj.variants.common.matrix(jnp.asarray(delta), s)
  return np.asarray(m, np.float64).reshape(_delta64(ad).shape)


def test_cat_is_exactly_the_weighted_sum_of_the_updates():
  trees = [_tree(0, {'dense/kernel': 2, 'stack/kernel': 1}, alpha=4.0),
           _tree(1, {'dense/kernel': 3, 'stack/kernel': 4}, scaling='rslora', alpha=2.0)]
  w = [0.75, -1.5]
  merged = _flat(merging.combine(trees, w, 'cat'))
  for path, ad in merged.items():
    want = sum(wi * _delta64(_flat(t)[path]) for wi, t in zip(w, trees))
    assert _rel(_delta64(ad), want) < 1e-6, path
    r = sum(_flat(t)[path].spec.rank for t in trees)
    assert (ad.spec.rank, ad.spec.alpha, ad.spec.scale, ad.a.shape[-1]) == (r, r, 1.0, r)
    assert ad.a.shape == ad.spec.batch_shape + ad.spec.in_shape + (r,)
    assert ad.b.shape == ad.spec.batch_shape + (r,) + ad.spec.out_shape


def test_svd_methods_are_the_exact_dw_merge_truncated():
  trees = [_tree(2, {'dense/kernel': 2, 'stack/kernel': 1}),
           _tree(3, {'dense/kernel': 3, 'stack/kernel': 2}, alpha=5.0)]
  w = [1.25, 0.5]
  # 'svd' at rank >= the sum of the ranks (2 + 3 and 1 + 2): exactly sum_i w_i dW_i.
  for path, ad in _flat(merging.combine(trees, w, 'svd', svd_rank=5)).items():
    want = sum(wi * _delta64(_flat(t)[path]) for wi, t in zip(w, trees))
    assert ad.spec.rank == 5 and _rel(_delta64(ad), want) < 1e-5, path
  want = sum(wi * _delta64(_flat(t)['dense/kernel']) for wi, t in zip(w, trees))
  # The SVD from the factors (rank <= sum of ranks) is the dense one of merge_deltas.
  dense = _flat(merging.factorize(merging.merge_deltas(trees, w), trees[0], 3, clamp=0.8))
  for path, ad in _flat(merging.combine(trees, w, 'svd', svd_rank=3, svd_clamp=0.8)).items():
    np.testing.assert_allclose(ad.a, dense[path].a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ad.b, dense[path].b, rtol=1e-4, atol=1e-5)
  # Below that rank: the best rank-k approximation (Eckart-Young), default k = the max rank 3.
  default = _flat(merging.combine(trees, w, 'svd'))['dense/kernel']
  assert default.spec.rank == 3
  sv = np.linalg.svd(want[0], compute_uv=False)
  err = np.linalg.norm(_delta64(default)[0] - want[0])
  np.testing.assert_allclose(err, np.sqrt(np.sum(sv[3:] ** 2)), rtol=1e-4)
  # ties_svd at full rank, min(d_in, d_out), is merge_deltas, which is ties on the dW_i
  # (float64 PEFT as the reference).
  deltas = _flat(merging.merge_deltas(trees, w, 'ties', density=0.3))
  full = _flat(merging.combine(trees, w, 'ties_svd', density=0.3, svd_rank=5))
  for path, ad in full.items():
    dws = np.stack([_delta64(_flat(t)[path]) for t in trees], 1)   # (stack, tasks, in, out)
    w64 = torch.tensor(w, dtype=torch.float64)
    want = np.stack([pmu.ties(list(torch.tensor(d)), w64, 0.3).numpy() for d in dws])
    got = _kernel_delta(deltas[path], ad)
    assert _rel(got, want) < 1e-5, path
    if path == 'dense/kernel':   # 6 x 10: rank 5 is not full
      continue
    assert _rel(_delta64(ad), want) < 1e-5
  # factorize of merge_deltas is combine's *_svd, the same masks for the same key.
  key = jax.random.key(3)
  via = merging.factorize(merging.merge_deltas(trees, w, 'dare_ties', density=0.5, key=key),
                          trees[0], 2, clamp=0.95)
  direct = merging.combine(trees, w, 'dare_ties_svd', density=0.5, key=key, svd_rank=2,
                           svd_clamp=0.95)
  # The geometry may come from a spec tree (make_spec's LeafSpecs) as well.
  specs = jax.tree.map(lambda ad: ad.spec, trees[0], is_leaf=lj.adapters.is_adapter)
  deltas = merging.merge_deltas(trees, w, 'dare_ties', density=0.5, key=key)
  from_spec = _flat(merging.factorize(deltas, specs, 2, clamp=0.95))
  for path, ad in _flat(direct).items():
    assert _rel(_delta64(ad), _delta64(_flat(via)[path])) < 1e-5
    assert _rel(_delta64(from_spec[path]), _delta64(ad)) < 1e-5


def test_factor_methods_merge_a_and_b_separately():
  trees = [_tree(4, 2, alpha=4.0), _tree(5, 2, scaling='rslora', alpha=1.0)]
  w = [0.5, -2.0]
  merged = _flat(merging.combine(trees, w, 'linear'))
  for path, ad in merged.items():
    fa = [_flat(t)[path] for t in trees]
    ws = [wi * f.spec.scale for wi, f in zip(w, fa)]
    a = sum(np.sign(x) * np.sqrt(abs(x)) * np.asarray(f.a, np.float64) for x, f in zip(ws, fa))
    b = sum(np.sqrt(abs(x)) * np.asarray(f.b, np.float64) for x, f in zip(ws, fa))
    np.testing.assert_allclose(ad.a, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ad.b, b, rtol=1e-5, atol=1e-6)
    assert ad.spec.rank == 2 and ad.spec.scale == 1.0
  # A single tree: PEFT merges it with 'linear' whatever the method, exactly w * dW.
  one = _flat(merging.combine(trees[:1], [0.8], 'dare_ties'))
  for path, ad in one.items():
    assert _rel(_delta64(ad), 0.8 * _delta64(_flat(trees[0])[path])) < 1e-6


def test_stacked_leaves_merge_per_layer():
  trees = [_tree(6, 2), _tree(7, 2)]
  w = [0.9, 0.4]
  got = _flat(merging.combine(trees, w, 'ties', density=0.5))['stack/kernel']
  for layer in range(3):
    def layer_of(t):
      ad = _flat(t)['stack/kernel']
      return ad.a[layer], ad.b[layer]
    pieces = [layer_of(t) for t in trees]
    ws = [wi * _flat(t)['stack/kernel'].spec.scale for wi, t in zip(w, trees)]
    wa = torch.tensor([np.sqrt(x) for x in ws])
    want_a = pmu.ties([_t(p[0]) for p in pieces], wa, 0.5).numpy()
    want_b = pmu.ties([_t(p[1]) for p in pieces], wa, 0.5).numpy()
    np.testing.assert_allclose(got.a[layer], want_a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.b[layer], want_b, rtol=1e-6, atol=1e-6)


def test_combine_jits_and_runs_factored():
  trees = [_tree(8, {'dense/kernel': 2, 'stack/kernel': 3}),
           _tree(9, {'dense/kernel': 4, 'stack/kernel': 1})]
  w = jnp.array([0.6, -0.3])
  key = jax.random.key(4)
  fn = functools.partial(merging.combine, method='dare_linear_svd', density=0.5, svd_rank=2,
                         svd_clamp=0.9)
  jitted = _flat(jax.jit(fn)(trees, w, key=key))
  for path, ad in _flat(fn(trees, w, key=key)).items():
    np.testing.assert_allclose(jitted[path].a, ad.a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jitted[path].b, ad.b, rtol=1e-4, atol=1e-5)
  # The merged tree joins, runs factored (strict) and merges like any adapter tree.
  rng = np.random.default_rng(0)
  params = {'dense': {'kernel': jnp.asarray(_rand(rng, 6, 10))},
            'stack': {'kernel': jnp.asarray(_rand(rng, 3, 5, 2, 4))}}
  x, h = jnp.asarray(_rand(rng, 7, 6)), jnp.asarray(_rand(rng, 3, 7, 5))

  def apply(p, x, h):
    y = x @ p['dense']['kernel']
    z = jnp.einsum('lti,lijk->ltjk', h, p['stack']['kernel'])   # a scanned DenseGeneral
    return y.sum() + z.sum(), y, z

  merged = merging.combine(trees, w, 'cat')
  got = lj.lora(apply, strict=True)(lj.join(params, merged), x, h)
  want = apply(lj.merge(params, merged), x, h)
  for g, m in zip(got[1:], want[1:]):
    np.testing.assert_allclose(g, m, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# LoRAHub.


def _hub_problem():
  rng = np.random.default_rng(11)
  geometry = {'dense/kernel': ((8, 6), (), (0,), (1,))}
  trees = [_tree(20 + i, 2, alpha=2.0, geometry=geometry) for i in range(3)]
  params = {'dense': {'kernel': jnp.asarray(_rand(rng, 8, 6))}}
  x = jnp.asarray(_rand(rng, 32, 8))
  target = merging.lorahub_combine(trees, jnp.array([0.8, -0.5, 0.3]))
  f = lambda p, x: jnp.tanh(x @ p['dense']['kernel'])
  y = f(lj.merge(params, target), x)
  model = lj.lora(f, strict=True)

  def loss_fn(adapters):
    return jnp.mean((model(lj.join(params, adapters), x) - y) ** 2)

  return trees, loss_fn


def test_lorahub_improves_on_the_initial_weights_deterministically():
  trees, loss_fn = _hub_problem()
  res = merging.lorahub(trees, loss_fn, key=jax.random.key(0))
  assert res.evaluations <= 40 and res.weights.shape == (3,)
  hist = np.asarray(res.history)
  assert np.all(np.diff(hist) <= 0)
  # At w = 0 the composed adapter is zero: the base's loss. The search cuts it by half at least.
  np.testing.assert_allclose(hist[0], float(loss_fn(merging.lorahub_combine(trees, jnp.zeros(3)))),
                             rtol=1e-5)
  assert hist[-1] < 0.5 * hist[0]
  objective = float(loss_fn(res.adapters)) + 0.05 * float(jnp.mean(jnp.abs(res.weights)))
  np.testing.assert_allclose(objective, hist[-1], rtol=1e-4)
  assert np.all(np.abs(np.asarray(res.weights)) <= 1.5)
  again = merging.lorahub(trees, loss_fn, key=jax.random.key(0))
  np.testing.assert_allclose(again.weights, res.weights, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(again.history, res.history, rtol=1e-6)
  seq = merging.lorahub(trees, loss_fn, key=jax.random.key(1), batched=False, budget=10,
                        popsize=4)
  assert seq.evaluations == 9 and seq.history.shape == (3,)
  assert seq.history[-1] <= seq.history[0]


# ------------------------------------------------------------------------------------------
# Bad input.

@pytest.fixture(scope='module')
def bad():
  """Trees for the error cases."""
  t1 = _tree(30, 2)
  t2 = _tree(31, 2)
  t3 = _tree(32, {'dense/kernel': 3, 'stack/kernel': 2})
  other_paths = {'dense': t1['dense']}
  other_shape = _tree(33, 2, geometry={'dense/kernel': ((7, 10), (), (0,), (1,)),
                                       'stack/kernel': GEOMETRY['stack/kernel']})
  big = _tree(34, {'dense/kernel': 8, 'stack/kernel': 2})
  full = dict(t2, dense={'kernel': lj.FullParams(
      jnp.zeros((6, 10)), LeafSpec('full', shape=(6, 10), in_axes=(0,), out_axes=(1,)))})
  pissa = jax.tree.map(lambda x: x, t2, is_leaf=lj.adapters.is_adapter)
  ad = pissa['dense']['kernel']
  pissa['dense']['kernel'] = lj.LoraParams(ad.a, ad.b, dataclasses.replace(ad.spec, init='pissa'))
  return dict(t1=t1, t2=t2, t3=t3, other_paths=other_paths, other_shape=other_shape, big=big,
              full=full, pissa=pissa)


_C = merging.combine
_KEY = jax.random.key(0)
_NONE = lambda ad: 0.0
BAD_INPUT = [   # (id, call on the trees of `bad`, the message it must match)
    ('empty', lambda t: _C([], [], 'cat'), 'empty list'),
    ('one tree', lambda t: _C(t['t1'], [1.0], 'cat'), 'list of adapter trees; got a dict'),
    ('paths', lambda t: _C([t['t1'], t['other_paths']], [1, 1], 'cat'),
     r"trees\[1\] does not have the paths .* missing \['stack/kernel'\]"),
    ('shapes', lambda t: _C([t['t1'], t['other_shape']], [1, 1], 'svd'),
     r"'dense/kernel': trees\[1\] adapts a base of shape \(7, 10\)"),
    ('weights short', lambda t: _C([t['t1'], t['t2']], [1.0], 'cat'),
     r'weights \[1.0\] has 1 entries for 2 trees'),
    ('weights long', lambda t: _C([t['t1'], t['t2']], [1.0, 2.0, 3.0], 'svd'),
     'has 3 entries for 2 trees'),
    ('density 0', lambda t: _C([t['t1'], t['t2']], [1, 1], 'ties', density=0.0),
     r'density=0.0 must be .* \(0, 1\]'),
    ('density 1.5', lambda t: _C([t['t1'], t['t2']], [1, 1], 'ties', density=1.5),
     r'density=1.5 must be .* \(0, 1\]'),
    ('density missing', lambda t: _C([t['t1'], t['t2']], [1, 1], 'magnitude_prune_svd'),
     "'magnitude_prune_svd' needs density="),
    ('svd_rank high', lambda t: _C([t['t1'], t['t3']], [1, 1], 'svd', svd_rank=6),
     r"svd_rank=6 is above min\(d_in, d_out\) = 5 of 'stack/kernel'.*1 <= svd_rank <= 5"),
    ('svd_rank default high', lambda t: _C([t['t1'], t['big']], [1, 1], 'svd'),
     r"svd_rank=8 \(the default: the largest adapter rank\) is above .* = 6 of 'dense/kernel'"),
    ('svd_rank 0', lambda t: _C([t['t1'], t['t2']], [1, 1], 'svd', svd_rank=0),
     'svd_rank=0 must be an int from 1 to 5'),
    ('method', lambda t: _C([t['t1'], t['t2']], [1, 1], 'mean'),
     r"Unknown method 'mean'; allowed: \('linear'"),
    ('not lora', lambda t: _C([t['t1'], t['full']], [1, 1], 'cat'),
     r"trees\[1\] at 'dense/kernel' is a 'full' adapter \(FullParams\)"),
    ('residual init', lambda t: _C([t['t1'], t['pissa']], [1, 1], 'cat'),
     "initialized by 'pissa'.*to_lora"),
    ('linear ranks', lambda t: _C([t['t1'], t['t3']], [1, 1], 'linear'),
     r"'linear' merges the A and B .* 'dense/kernel' has ranks \[2, 3\]"),
    ('ties ranks', lambda t: _C([t['t1'], t['t3']], [1, 1], 'ties', density=0.5),
     r"'dense/kernel' has ranks \[2, 3\]"),
    ('dare key', lambda t: _C([t['t1'], t['t2']], [1, 1], 'dare_linear', density=0.5),
     r"'dare_linear' draws random \(DARE\) masks: pass key="),
    ('sign method', lambda t: _C([t['t1'], t['t2']], [1, 1], 'ties', density=0.5,
                                 majority_sign_method='mean'),
     "Unknown majority_sign_method 'mean'"),
    ('svd_clamp', lambda t: _C([t['t1'], t['t2']], [1, 1], 'svd', svd_clamp=1.5),
     'svd_clamp=1.5 must be'),
    ('merge_deltas method', lambda t: merging.merge_deltas([t['t1'], t['t2']], [1, 1], 'cat'),
     "Unknown method 'cat' for merge_deltas"),
    ('factorize rank', lambda t: merging.factorize(
        merging.merge_deltas([t['t1'], t['t2']], [1, 1]), t['t1'], 7),
     r"rank=7 is above min\(d_in, d_out\) = 6 of 'dense/kernel'"),
    ('lorahub ranks', lambda t: merging.lorahub_combine([t['t1'], t['t3']], [1, 1]),
     r"'dense/kernel' has ranks \[2, 3\]"),
    ('lorahub budget', lambda t: merging.lorahub([t['t1'], t['t2']], _NONE, key=_KEY, budget=4),
     r'budget=4 evaluations .* at least 1 \+ popsize = 9'),
    ('lorahub key', lambda t: merging.lorahub([t['t1'], t['t2']], _NONE, key=None),
     'lorahub samples candidates: pass key='),
    ('lorahub bounds', lambda t: merging.lorahub([t['t1'], t['t2']], _NONE, key=_KEY,
                                                 bounds=(1, -1)),
     r'bounds=\(1, -1\) must be'),
    ('lorahub popsize', lambda t: merging.lorahub([t['t1'], t['t2']], _NONE, key=_KEY,
                                                  popsize=5),
     'popsize=5 must be an even int'),
    ('prune method', lambda t: merging.prune(jnp.ones(3), 0.5, 'smallest'),
     "Unknown pruning method 'smallest'"),
    ('prune density', lambda t: merging.prune(jnp.ones(3), -0.1, 'magnitude'),
     r'density=-0.1 must be .* \[0, 1\]'),
    ('tensor dare key', lambda t: merging.dare_linear([jnp.ones(3)], jnp.ones(1), 0.5),
     'dare_linear draws random masks: pass key='),
    ('tensor weights', lambda t: merging.task_arithmetic([jnp.ones(3)] * 2, jnp.ones(3)),
     r'weights has shape \(3,\) for 2 task tensors'),
    ('tensor sign method', lambda t: merging.calculate_majority_sign_mask(jnp.ones((2, 3)), 'max'),
     "Unknown majority_sign_method 'max'"),
]


@pytest.mark.parametrize('call,match', [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_a_value_error_naming_the_value(bad, call, match):
  with pytest.raises(ValueError, match=match):
    call(bad)


# ------------------------------------------------------------------------------------------
# combine against PEFT's add_weighted_adapter on the real MiniLM.

SENTENCES = ['LoRA adapts a frozen model with low-rank updates.',
             'Merging adapters adds their task vectors.']
# Two of the six layers: every kernel geometry (q/k/v, attention out, MLP in and out), a third of
# the SVDs that PEFT and lorax_jax compute for the *_svd methods.
ATTENTION_MLP = r'layer[05]/(query|key|value|out|intermediate|output)/kernel$'


def _random_lora(spec, seed):
  """Non-zero random factors, s*A@B entries about 0.005 (a tenth of a weight)."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, s in lj.spec.spec_leaves(spec).items():
    d_in = int(np.prod(s.in_shape))
    a = rng.standard_normal(s.batch_shape + s.in_shape + (s.rank,)) / np.sqrt(d_in)
    b = rng.standard_normal(s.batch_shape + (s.rank,) + s.out_shape) * (
        0.005 * np.sqrt(d_in / s.rank) / s.scale)
    out[tuple(path.split('/'))] = lj.LoraParams(jnp.asarray(a, jnp.float32),
                                                jnp.asarray(b, jnp.float32), s)
  return lj.paths.nest(out)


def _canonical_torch_svd(monkeypatch):
  """torch's SVD with lorax_jax's sign convention (the largest entry of each left singular
  vector positive). Only `svd_clamp` sees signs: PEFT's clamp quantile is taken over the signed
  factor entries, so its result depends on the SVD routine's sign choice (MKL, LAPACK and
  cuSOLVER differ); unclamped results do not."""
  svd = torch.linalg.svd

  def canonical(a, full_matrices=True, driver=None):
    u, s, vh = svd(a, full_matrices=full_matrices, driver=driver)
    k = s.shape[-1]
    top = u[..., :k].abs().argmax(-2, keepdim=True)
    sign = torch.sign(torch.gather(u[..., :k], -2, top))
    sign[sign == 0] = 1
    u, vh = u.clone(), vh.clone()
    u[..., :k] *= sign
    vh[..., :k, :] *= sign.transpose(-1, -2)
    return u, s, vh

  monkeypatch.setattr(torch.linalg, 'svd', canonical)


PEFT_CASES = [   # (method, adapters, weights, options)
    ('linear', 'xz', [0.8, -0.5], {}),
    ('ties', 'xz', [0.8, 0.6], {'density': 0.5}),
    ('dare_linear', 'xz', [0.7, 0.9], {'density': 0.6}),
    ('dare_ties', 'xz', [1.1, -0.4], {'density': 0.6, 'majority_sign_method': 'frequency'}),
    ('magnitude_prune', 'xz', [0.9, 0.7], {'density': 0.4}),
    ('cat', 'xy', [0.8, -0.6], {}),
    ('svd', 'xy', [0.7, 0.9], {}),
    ('svd', 'xy', [0.7, -0.9], {'svd_rank': 6, 'svd_clamp': 0.9}),
    ('ties_svd', 'xy', [1.0, 0.8], {'density': 0.5}),
    ('dare_linear_svd', 'xy', [0.6, 0.8], {'density': 0.5}),
    ('dare_ties_svd', 'xy', [0.9, 0.5], {'density': 0.7, 'majority_sign_method': 'total'}),
    ('magnitude_prune_svd', 'xy', [0.8, -0.7], {'density': 0.3, 'svd_rank': 10}),
]


@pytest.mark.slow   # the real MiniLM in JAX and in PyTorch, every method of add_weighted_adapter
def test_combine_equals_peft_add_weighted_adapter_on_minilm(tmp_path, monkeypatch):
  transformers = pytest.importorskip('transformers')
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from lorax_jax.models import bert, hf_mapping  # pylint: disable=g-import-not-at-top
  start = time.time()
  directory = bert.minilm_directory()
  model, variables = bert.load_hf_bert(directory)
  params = variables['params']
  tok = Tokenizer.from_file(os.path.join(directory, 'tokenizer.json'))
  tok.enable_padding(pad_id=0, pad_token='[PAD]')
  enc = tok.encode_batch(SENTENCES)
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], np.int32)
  names = hf_mapping('bert', directory)
  use = dict(fn=lambda p, i, m: model.apply({'params': p}, i, m), args=(ids, mask))
  spec4 = lj.make_spec(params, [(ATTENTION_MLP, {'rank': 4, 'alpha': 8.0})], **use)
  spec8 = lj.make_spec(params, [(ATTENTION_MLP, {'rank': 8, 'alpha': 4.0})], **use)
  trees = {'x': _random_lora(spec4, 1), 'y': _random_lora(spec8, 2), 'z': _random_lora(spec4, 3)}
  hf = transformers.AutoModel.from_pretrained(directory).eval()
  for name, tree in trees.items():
    lj.save_peft(str(tmp_path / name), tree, spec4, names)
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / 'x'), adapter_name='x').eval()
  pm.load_adapter(str(tmp_path / 'y'), adapter_name='y')
  pm.load_adapter(str(tmp_path / 'z'), adapter_name='z')

  def torch_embed():
    with torch.no_grad():
      h = pm(input_ids=torch.tensor(ids, dtype=torch.long),
             attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()

  embed = jax.jit(lambda p: model.apply({'params': p}, ids, mask, method=model.embed))
  base = np.asarray(embed(params))
  shared = SharedMasks()
  shared.install(monkeypatch)
  _canonical_torch_svd(monkeypatch)
  errors, results = {}, {}
  for i, (method, pair, weights, options) in enumerate(PEFT_CASES):
    label = f'{method}{"+clamp" if "svd_clamp" in options else ""}'
    merged = merging.combine([trees[k] for k in pair], weights, method,
                             key=jax.random.key(i), **options)
    ours = np.asarray(embed(lj.merge(params, merged)))
    pm.add_weighted_adapter(list(pair), weights, f'm{i}', combination_type=method, **options)
    pm.set_adapter(f'm{i}')
    theirs = torch_embed()
    assert _rel(ours, base) > 1e-3, label    # the merge changes the model
    ranks = {ad.spec.rank for ad in _flat(merged).values()}
    assert ranks == {pm.peft_config[f'm{i}'].r}, (label, ranks)
    errors[label], results[label] = _rel(ours, theirs), merged
  assert shared.lorax_calls and shared.peft_calls
  print('max relative error vs PEFT:', {k: f'{v:.1e}' for k, v in errors.items()},
        f'({time.time() - start:.0f} s)')
  assert max(errors.values()) <= 1e-4, errors
  # The merged tree runs factored, and save_peft writes it for PEFT.
  cat = results['cat']
  fn = lambda p, i, m: model.apply({'params': p}, i, m, method=model.embed)
  factored = np.asarray(lj.lora(fn, strict=True)(lj.join(params, cat), ids, mask))
  assert _rel(factored, np.asarray(embed(lj.merge(params, cat)))) < 1e-5
  lj.save_peft(str(tmp_path / 'cat'), cat, spec4, names)
  pm.load_adapter(str(tmp_path / 'cat'), adapter_name='cat_file')
  pm.set_adapter('cat_file')
  assert _rel(torch_embed(), factored) < 1e-4
