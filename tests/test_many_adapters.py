"""Many adapters on one base: stacks, mixed-adapter batches (`adapter_ids`), hot-swap."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
from lorax_jax.models import decoder, hf_mapping, load_hf_llama
from tests import helpers

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
KERNELS = r'(query|key|value|out|gate|up|down)/kernel$'
IDS = np.array([2, -1, 0, 1, 2, 0], np.int32)     # row -> adapter (-1: the base alone)


def _model(**kw):
  return decoder.Decoder(**{**dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, mlp_dim=48), **kw})


def _setup(rules, n=3, ranks=None, **model_kw):
  model = _model(**model_kw)
  tokens = jax.random.randint(jax.random.key(1), (len(IDS), 7), 0, 64)
  params = model.init(jax.random.key(0), tokens)['params']
  fn = lambda p, t: model.apply({'params': p}, t)
  trees = []
  for i in range(n):
    rank_rules = [(p, {**s, 'rank': ranks[i]} if ranks and 'variant' not in s else s)
                  for p, s in rules]   # (LoRA leaves stack at different ranks)
    spec = lj.make_spec(params, rank_rules, fn=fn, args=(tokens,))
    _, ad = lj.init(jax.random.key(10 + i), params, spec)
    trees.append(helpers.randomize(ad, jax.random.key(20 + i)))
  return fn, params, tokens, trees


def _assert_rows_match(fn, base, tokens, trees, ids, tol=1e-5):
  """Each row of the mixed batch equals the whole batch run with that row's adapter alone."""
  mixed = jax.jit(lambda j, t, i: lj.lora(fn)(j, t, adapter_ids=i))
  y = np.asarray(mixed(lj.join(base, lj.stack_adapters(trees)), tokens, jnp.asarray(ids)))
  single = jax.jit(lambda j, t: lj.lora(fn)(j, t))
  refs = [np.asarray(single(lj.join(base, t), tokens)) for t in trees]
  refs.append(np.asarray(single(base, tokens)))      # index -1: the base alone
  for row, k in enumerate(ids):
    ref = refs[k]
    err = helpers.rel_err(y[row], ref[row].astype(np.float64))
    assert err <= tol, (row, k, err)


# One model for every kind of leaf a mixed batch meets: LoRA, DoRA and VeRA kernels (per layer
# kind), an adapted embedding and head, an NF4 base, and ranks 2, 4 and 3 (scales alpha/r apart).
MIXED_RULES = [(r'(query|key)/kernel$', {'rank': 4, 'alpha': 8.0}),
               (r'(value|out)/kernel$', {'variant': 'dora', 'rank': 4, 'alpha': 8.0}),
               (r'(gate|up|down)/kernel$', {'variant': 'vera', 'rank': 4}),
               (r'embed/embedding$', {'rank': 2}), (r'head/kernel$', {'rank': 3})]


def test_each_row_runs_with_its_own_adapter():
  fn, params, tokens, trees = _setup(MIXED_RULES, ranks=[2, 4, 3], num_layers=1)
  stacked = lj.stack_adapters(trees)
  leaf = stacked['layer0']['query']['kernel']
  assert leaf.a.shape[0] == 3 and leaf.spec.rank == 4 and lj.num_stacked(stacked) == 3
  base = lj.quantize(params, [(r'kernel$', 'nf4')])
  _assert_rows_match(fn, base, tokens, trees, IDS)
  _assert_rows_match(fn, base, tokens[:, :1], trees, IDS)   # one token per row (decode's path)


def test_mixed_batch_inside_scan_and_remat_and_its_gradients():
  rules = [(r'(query|value|down)/kernel$', {'rank': 4}),
           (r'(key|gate)/kernel$', {'variant': 'dora', 'rank': 2})]
  fn, params, tokens, trees = _setup(rules, scan_layers=True, remat=True)
  _assert_rows_match(fn, params, tokens, trees, IDS)
  # Differentiated through: each adapter gets the gradient of its own rows only.
  stacked = lj.stack_adapters(trees)
  loss = lambda ad, ids: jnp.mean(lj.lora(fn)(lj.join(params, ad), tokens, adapter_ids=ids) ** 2)
  grads = jax.jit(jax.grad(loss))(stacked, jnp.asarray(np.where(IDS == 1, -1, IDS)))
  for leaf in (grads['layers']['query']['kernel'].b, grads['layers']['key']['kernel'].magnitude):
    assert np.all(np.isfinite(leaf)) and np.any(leaf[0]) and np.any(leaf[2])
    assert not np.any(leaf[1])      # no row uses adapter 1


def test_stacks_of_different_ranks_unstack_exactly():
  model = _model(num_layers=1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))['params']
  rules = lambda r: [(r'(query|key|value)/kernel$', {'rank': r, 'alpha': 8.0,
                                                     'in_axes': (0,), 'out_axes': (1, 2)})]
  trees = [helpers.randomize(lj.init(jax.random.key(i), params, lj.make_spec(params, rules(r)))[1],
                             jax.random.key(5 + i)) for i, r in enumerate([2, 4, 3])]
  stacked = lj.stack_adapters(trees)
  back = lj.unstack_adapters(stacked, like=trees)
  for got, want in zip(back, trees):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7),
                           got, want)
  # Without `like`, every slot keeps the stack's rank and has the same update.
  for got, want in zip(lj.unstack_adapters(stacked), trees):
    assert got['layer0']['key']['kernel'].spec.rank == 4
    helpers.assert_close_compiled(lj.merge(params, got)['layer0']['key']['kernel'],
                                  lj.merge(params, want)['layer0']['key']['kernel'])
  # Equal ranks and scales: the exact inverse.
  helpers.assert_trees_equal(lj.unstack_adapters(lj.stack_adapters(trees[1:2] * 2))[1], trees[1])


@pytest.mark.slow   # generation compiles a loop over the whole model twice
def test_generate_decodes_each_sequence_with_its_own_adapter():
  fn, params, tokens, trees = _setup([(KERNELS, {'rank': 4})])
  joined = lj.join(params, lj.stack_adapters(trees))
  prompt = tokens[:, :3]
  ids = jnp.asarray(IDS)
  out = jax.jit(lambda j, p, i: decoder.generate(
      lambda q, t: lj.lora(fn)(q, t, adapter_ids=i), j, p, 4))(joined, prompt, ids)
  out = np.asarray(out)
  np.testing.assert_array_equal(out[:, :3], prompt)      # the prompt is copied, not computed
  # Each generated token is the greedy choice of the row's own adapter on that sequence (logits
  # of another compiled program: a token whose top two logits tie to rounding may go either way).
  single = jax.jit(lambda j, t: lj.lora(fn)(j, t))
  for k in sorted(set(IDS.tolist())):
    rows = np.flatnonzero(IDS == k)
    logits = np.asarray(single(params if k < 0 else lj.join(params, trees[k]), out[rows]),
                        np.float64)[:, 2:-1]               # the positions that chose tokens 3..6
    chosen = np.take_along_axis(logits, out[rows, 3:, None], axis=-1)[..., 0]
    tol = 1e-5 * np.abs(logits).max()
    assert np.all(chosen >= logits.max(-1) - tol), (k, out[rows])


def test_hot_swap_does_not_recompile_and_takes_a_peft_file(tmp_path):
  directory = os.path.join(FIXTURES, 'tiny_llama')
  model, variables = load_hf_llama(directory)
  params = variables['params']
  names = hf_mapping('llama', directory)
  tokens = np.load(os.path.join(directory, 'reference.npz'))['tokens']
  fn = lambda p, t: model.apply({'params': p}, t)
  spec = lj.make_spec(params, [(r'(query|value|down)/kernel$', {'rank': 4, 'alpha': 8.0})],
                      fn=fn, args=(tokens,))
  trees = [helpers.randomize(lj.init(jax.random.key(i), params, spec)[1], jax.random.key(9 + i))
           for i in range(3)]
  traces = []

  @jax.jit
  def serve(joined, t, ids):
    traces.append(1)      # runs once per trace, i.e. once per compilation of `serve`
    return lj.lora(fn)(joined, t, adapter_ids=ids)

  compiles = []      # XLA compilations while `serve` runs (the eager ops around it compile too)
  counting = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: compiles.append(event) if counting and event.endswith(
          'backend_compile_duration') else None)

  def call(joined, ids):
    counting.append(1)
    try:
      return jax.block_until_ready(serve(joined, tokens, ids))
    finally:
      counting.clear()

  stacked = lj.stack_adapters(trees)
  ids = np.arange(len(tokens), dtype=np.int32) % 3
  call(lj.join(params, stacked), ids)
  before = (len(traces), len(compiles))
  # A new adapter written as PEFT files, loaded into slot 1 of the compiled stack.
  new = helpers.randomize(trees[0], jax.random.key(99))
  lj.save_peft(str(tmp_path), new, spec, names)
  _, loaded = lj.load_peft(str(tmp_path), params, names)
  stacked = lj.replace_adapter(stacked, 1, loaded)
  y = call(lj.join(params, stacked), ids[::-1].copy())
  stacked = lj.replace_adapter(stacked, 0, trees[2])
  call(lj.join(params, stacked), ids)
  assert before[0] == 1 and before[1] <= 1    # 0 on a persistent-cache hit
  assert (len(traces), len(compiles)) == before
  ref = lj.lora(fn)(lj.join(params, loaded), tokens)
  rows = np.flatnonzero(ids[::-1] == 1)
  assert helpers.rel_err(np.asarray(y)[rows], np.asarray(ref, np.float64)[rows]) <= 1e-5


def test_bad_input_is_refused_with_the_value():
  fn, params, tokens, trees = _setup([(KERNELS, {'rank': 4})], n=2)
  stacked = lj.stack_adapters(trees)
  joined = lj.join(params, stacked)
  run = lambda ids, t=tokens: lj.lora(fn)(joined, t, adapter_ids=ids)
  with pytest.raises(ValueError, match='id 2 is out of range .* -1 .* to 1'):
    run(np.array([0, 1, 2, 0, 1, 0]))
  with pytest.raises(ValueError, match='must be >= -1'):
    run(np.array([0, 1, -3, 0, 1, 0]))
  with pytest.raises(ValueError, match=r'integer vector .* shape \(2, 3\)'):
    run(np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match='integer vector .* float32'):
    run(np.zeros(6, np.float32))
  with pytest.raises(ValueError, match=r'shape \(6, 7, 32\).* 4 rows'):
    run(np.array([0, 1, 0, 1]))
  with pytest.raises(ValueError, match='leading adapter axis .* adapter_ids'):
    lj.lora(fn)(joined, tokens)
  with pytest.raises(ValueError, match='not a stack'):
    lj.lora(fn)(lj.join(params, trees[0]), tokens, adapter_ids=np.zeros(6, np.int32))
  # Stacks of trees that do not fit together.
  with pytest.raises(ValueError, match='non-empty list'):
    lj.stack_adapters([])
  other = {'layer0': trees[1]['layer0']}
  with pytest.raises(ValueError, match='tree 1 adapts other leaves .*layer1/'):
    lj.stack_adapters([trees[0], other])
  spec_dora = lj.make_spec(params, [(KERNELS, {'rank': 4, 'variant': 'dora'})], fn=fn,
                           args=(tokens,))
  dora = lj.init(jax.random.key(0), params, spec_dora)[1]
  with pytest.raises(ValueError, match="differs from tree 0 in .*'variant': \\('lora', 'dora'\\)"):
    lj.stack_adapters([trees[0], dora])
  with pytest.raises(ValueError, match=r'index=5 must be an int in \[-2, 2\)'):
    lj.replace_adapter(stacked, 5, trees[0])
  big = lj.init(jax.random.key(0), params, lj.make_spec(params, [(KERNELS, {'rank': 8})], fn=fn,
                                                        args=(tokens,)))[1]
  with pytest.raises(ValueError, match='rank 8, above the stack'):
    lj.replace_adapter(stacked, 0, big)
