"""Weight-aware and calibrated inits: PiSSA, MiLoRA, OLoRA, LoftQ, LoRA-GA, EVA, CorDA."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
from lorax_jax import calibration
from lorax_jax import inits
from lorax_jax import interpreter
from lorax_jax.models import decoder
from tests import helpers

RESIDUAL = ['pissa', 'pissa_niter_4', 'milora', 'olora', 'lora_ga', 'corda', 'corda_kpm']
ALL = RESIDUAL + ['eva', 'loftq']


def _setting(init, rank=4):
  if init == 'corda_kpm':
    return {'rank': rank, 'alpha': 2.0 * rank, 'init': 'corda', 'init_options': {'mode': 'kpm'}}
  return {'rank': rank, 'alpha': 2.0 * rank, 'init': init}


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jax.nn.gelu(nn.Dense(48, name='up')(x))
    h = nn.DenseGeneral((4, 12), name='heads')(h)                       # multi-axis out
    return nn.DenseGeneral(24, axis=(-2, -1), name='down')(jax.nn.gelu(h))  # multi-axis in


def _mlp():
  m = Mlp()
  x = jax.random.normal(jax.random.key(0), (16, 32))
  params = m.init(jax.random.key(1), x)['params']
  fn = lambda p, x: m.apply({'params': p}, x)
  y = jax.random.normal(jax.random.key(2), (64, 24))
  xs = jax.random.normal(jax.random.key(3), (64, 32))
  batches = [(xs[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
  loss = lambda p, b: jnp.mean((fn(p, b[0]) - b[1]) ** 2)
  return fn, params, x, loss, batches


def _decoder():
  m = decoder.Decoder(vocab_size=64, d_model=64, num_layers=2, num_heads=4, mlp_dim=128,
                      scan_layers=True, remat=True)
  tok = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  params = m.init(jax.random.key(1), tok)['params']
  fn = lambda p, t: m.apply({'params': p}, t)

  def loss(p, b):
    logits = fn(p, b[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), b[:, 1:, None], -1))

  batches = [jax.random.randint(jax.random.key(10 + i), (4, 9), 0, 64) for i in range(4)]
  return fn, params, tok, loss, batches


MODELS = {'mlp': _mlp, 'scanned_decoder': _decoder}


def _grid(inits_, slow_on_decoder):
  """(model, init) cases; those in `slow_on_decoder` run on the scanned decoder in the slow
  tier only (the MLP case of each, and the decoder case of the others, stay quick)."""
  return [pytest.param(m, i, marks=pytest.mark.slow) if m == 'scanned_decoder' and
          i in slow_on_decoder else (m, i) for i in inits_ for m in MODELS]


def _init(model, init, rank=4, rules=None, variant='lora'):
  fn, params, x, loss, batches = MODELS[model]()
  rules = rules or [(r'kernel$', {**_setting(init, rank), 'variant': variant})]
  spec = lj.make_spec(params, rules, fn=fn, args=(x,))
  new, adapters = lj.init(jax.random.key(5), params, spec, fn=loss, batches=batches,
                          num_batches=3)
  return fn, params, x, spec, new, adapters


@pytest.mark.parametrize('model,init', _grid(ALL, ('loftq',)))
def test_output_at_init_equals_the_original_model(model, init):
  fn, params, x, spec, new, adapters = _init(model, init)
  out = jax.jit(lj.lora(fn, strict=True))(lj.join(new, adapters), x)
  ref = fn(params, x)
  if init == 'loftq':   # the base is quantized: closer than quantizing alone, not exact
    q_only = lj.lora(fn)(lj.quantize(params, spec), x)
    assert helpers.rel_err(out, ref) < helpers.rel_err(q_only, ref)
    return
  assert helpers.rel_err(out, ref) < 1e-5
  if init == 'eva':
    return
  for path, s in lj.spec.spec_leaves(spec).items():
    keys = path.split('/')
    w, w_new, ad = params, new, adapters
    for k in keys:
      w, w_new, ad = w[k], w_new[k], ad[k]
    # The residual plus the scaled product reconstructs W, and the adapter is not zero.
    dw = lj.merge({'k': w_new}, {'k': ad})['k']
    assert helpers.rel_err(dw, w) < 1e-5, path
    assert float(jnp.linalg.norm(ad.b)) > 0 and float(jnp.linalg.norm(ad.a)) > 0


@pytest.mark.parametrize('model,init', _grid(['pissa', 'olora', 'milora', 'lora_ga', 'corda',
                                              'eva'], ('lora_ga', 'corda', 'eva')))
def test_dora_composes_with_the_factor_inits(model, init):
  """DoRA + PiSSA/OLoRA/MiLoRA (as PEFT composes them) and the calibrated factor inits: the
  base becomes W_res = W - s*A@B, the magnitude is the column norm of the ORIGINAL W, and the
  output at init equals the original model's."""
  fn, params, x, spec, new, adapters = _init(model, init, variant='dora')
  out = jax.jit(lj.lora(fn, strict=True))(lj.join(new, adapters), x)
  assert helpers.rel_err(out, fn(params, x)) < 1e-5
  states = lj.paths.flat(adapters, is_leaf=lj.adapters.is_adapter)
  for path, s in lj.spec.spec_leaves(spec).items():
    ad = states.get(path)
    if ad is None:    # EVA may give a leaf rank 0
      continue
    assert isinstance(ad, lj.DoraParams)
    w = np.asarray(_leaf(params, path), np.float64)
    norm = np.linalg.norm(np.asarray(lj.variants.common.matrix(w, s)), axis=-2)
    np.testing.assert_allclose(np.asarray(ad.magnitude).reshape(norm.shape), norm, rtol=1e-5)
    merged = lj.merge({'k': _leaf(new, path)}, {'k': ad})['k']
    assert helpers.rel_err(merged, _leaf(params, path)) < 1e-5, path
    if init != 'eva':
      assert float(jnp.linalg.norm(ad.b)) > 0


def test_to_lora_refuses_a_residual_dora():
  fn, params, x, spec, new, initial = _init('mlp', 'pissa', variant='dora')
  with pytest.raises(ValueError, match="'dora' adapter on the residual base of init 'pissa'"):
    lj.to_lora(initial, initial)


def _svd64(m):
  return np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)


def _align(x, ref):
  """x's columns with the signs that best match ref's (SVD vectors are defined up to sign)."""
  signs = np.sign(np.sum(x * ref, axis=0, keepdims=True))
  return x * signs


def _leaf(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


@pytest.mark.parametrize('init', ['pissa', 'milora', 'olora'])
def test_weight_inits_match_numpy_float64(init):
  with helpers.enable_x64():
    w = jax.random.normal(jax.random.key(0), (40, 24), jnp.float64)
    params = {'d': {'kernel': w}}
    spec = lj.make_spec(params, [('kernel', _setting(init, 3))])
    new, ad = lj.init(jax.random.key(0), params, spec)
    a, b = np.asarray(ad['d']['kernel'].a), np.asarray(ad['d']['kernel'].b)
    s = 2.0   # alpha / r
    wn = np.asarray(w)
    if init == 'olora':
      q, r = np.linalg.qr(wn.T)
      a_ref, b_ref = r[:3].T, q[:, :3].T
      np.testing.assert_allclose(_align(a, a_ref), a_ref, atol=1e-10)
      np.testing.assert_allclose(_align(b.T, b_ref.T).T, b_ref, atol=1e-10)
    else:
      u, sv, vh = _svd64(wn)
      sl = slice(0, 3) if init == 'pissa' else slice(-3, None)
      a_ref = u[:, sl] * np.sqrt(sv[sl] / s)
      b_ref = np.sqrt(sv[sl] / s)[:, None] * vh[sl]
      np.testing.assert_allclose(_align(a, a_ref), a_ref, atol=1e-10)
      np.testing.assert_allclose(s * a @ b, u[:, sl] * sv[sl] @ vh[sl], atol=1e-10)
    np.testing.assert_allclose(np.asarray(new['d']['kernel']), wn - s * a @ b, atol=1e-10)


def test_randomized_svd_is_close_to_the_exact_one():
  key = jax.random.key(0)
  u, _ = jnp.linalg.qr(jax.random.normal(key, (256, 256)))
  v, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (384, 256)))
  sv = 1.0 / jnp.arange(1, 257) ** 0.7
  m = (u * sv) @ v.T
  ur, sr, vhr = inits.randomized_svd(jax.random.key(2), m, 16, niter=4)
  ue, se, vhe = inits.svd(m)
  err_r = float(jnp.linalg.norm(m - (ur * sr) @ vhr))
  err_e = float(jnp.linalg.norm(m - (ue[:, :16] * se[:16]) @ vhe[:16]))
  assert err_r < 1.01 * err_e
  np.testing.assert_allclose(sr, se[:16], rtol=1e-3)


def test_lora_ga_matches_numpy_float64():
  fn, params, x, loss, batches = _mlp()
  with helpers.enable_x64():
    p64 = helpers.cast_tree(params, jnp.float64)
    b64 = helpers.cast_tree(batches, jnp.float64)
    spec = lj.make_spec(p64, [(r'^up/kernel$', _setting('lora_ga', 3))])
    new, ad = lj.init(jax.random.key(0), p64, spec, fn=loss, batches=b64, num_batches=3)
    g = np.mean([np.asarray(jax.grad(loss)(p64, b)['up']['kernel']) for b in b64[:3]], 0)
    u, _, vh = _svd64(g)
    d_out = g.shape[1]
    a_ref = u[:, :3] * d_out ** 0.25 / 4.0
    b_ref = vh[3:6] * d_out ** 0.25 / 4.0
    a, b = np.asarray(ad['up']['kernel'].a), np.asarray(ad['up']['kernel'].b)
    np.testing.assert_allclose(_align(a, a_ref), a_ref, atol=1e-9)
    np.testing.assert_allclose(_align(b.T, b_ref.T).T, b_ref, atol=1e-9)


def _mlp_inputs(params, batches, n):
  """The inputs each MLP kernel sees, computed by hand (float64)."""
  xs = np.concatenate([np.asarray(b[0], np.float64) for b in batches[:n]])
  p = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), params)
  gelu = lambda v: np.asarray(jax.nn.gelu(jnp.asarray(v)), np.float64)
  h1 = gelu(xs @ p['up']['kernel'] + p['up']['bias'])
  h2 = np.einsum('nd,dhk->nhk', h1, p['heads']['kernel']) + p['heads']['bias']
  return {'up/kernel': xs, 'heads/kernel': h1, 'down/kernel': gelu(h2).reshape(len(xs), -1)}


def test_captured_input_statistics_match_the_layer_inputs():
  fn, params, x, loss, batches = _mlp()
  spec = lj.make_spec(params, [(r'kernel$', {'rank': 2})], fn=fn, args=(x,))
  specs = lj.spec.spec_leaves(spec)
  stats, used = calibration.input_statistics(loss, params, specs, batches, 3)
  assert used == 3
  for path, xin in _mlp_inputs(params, batches, 3).items():
    gram, total, count = stats[path]
    np.testing.assert_allclose(gram, xin.T @ xin, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(total, xin.sum(0), rtol=1e-4, atol=1e-4)
    assert float(count) == len(xin)


def test_corda_matches_numpy_float64():
  fn, params, x, loss, batches = _mlp()
  with helpers.enable_x64():
    p64 = helpers.cast_tree(params, jnp.float64)
    b64 = helpers.cast_tree(batches, jnp.float64)
    for mode in ('ipm', 'kpm'):
      setting = {'rank': 3, 'alpha': 6.0, 'init': 'corda',
                 'init_options': {'mode': mode, 'damping': 0.0}}
      spec = lj.make_spec(p64, [(r'^heads/kernel$', setting)], fn=fn, args=(b64[0][0],))
      new, ad = lj.init(jax.random.key(0), p64, spec, fn=loss, batches=b64, num_batches=3)
      xin = _mlp_inputs(params, batches, 3)['heads/kernel']
      c = xin.T @ xin / len(xin)
      w = np.asarray(p64['heads']['kernel']).reshape(48, 48)
      u, sv, vh = _svd64(w.T @ c)           # torch: svd(W_t @ C)
      v_hat = np.linalg.solve(c, vh.T)
      sl = slice(0, 3) if mode == 'ipm' else slice(-3, None)
      dw_ref = v_hat[:, sl] * sv[sl] @ u[:, sl].T
      k = ad['heads']['kernel']
      dw = 2.0 * np.asarray(k.a).reshape(48, 3) @ np.asarray(k.b).reshape(3, 48)
      np.testing.assert_allclose(dw, dw_ref, rtol=1e-6, atol=1e-8)


def test_eva_components_and_rank_budget():
  fn, params, x, loss, batches = _mlp()
  setting = {'rank': 4, 'alpha': 8.0, 'init': 'eva', 'init_options': {'tau': 1.0}}
  spec = lj.make_spec(params, [(r'kernel$', setting)], fn=fn, args=(x,))
  new, ad = lj.init(jax.random.key(0), params, spec, fn=loss, batches=batches, num_batches=3)
  assert new is params or jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: a is b, new, params))
  ranks = {p: _leaf(ad, p).spec.rank for p in ('up/kernel', 'heads/kernel', 'down/kernel')
           if p.split('/')[0] in ad}
  assert sum(ranks.values()) == 12 and max(ranks.values()) <= 8
  inputs = _mlp_inputs(params, batches, 3)
  for path, r in ranks.items():
    k = _leaf(ad, path)
    assert float(jnp.max(jnp.abs(k.b))) == 0
    assert k.spec.alpha / k.spec.rank == pytest.approx(2.0)   # scale kept
    xin = inputs[path] - inputs[path].mean(0)
    _, _, vh = _svd64(xin)
    a = np.asarray(k.a).reshape(-1, r)
    np.testing.assert_allclose(np.abs(np.sum(a * vh[:r].T, 0)), 1.0, atol=1e-3)


def test_loftq_lowers_the_quantization_error_every_iteration():
  w = jax.random.normal(jax.random.key(0), (128, 256))
  spec = lj.make_spec({'k': w}, [('k', {'rank': 8, 'alpha': 8.0})])['k']
  base_err = float(inits.quantization_error(w, 'nf4'))
  errs = []
  for t in (1, 2, 3):
    q, a, b, per_iter = inits.loftq(w, spec, 'nf4', t)
    final = float(jnp.linalg.norm(w - lj.dequantize(q) - a @ b) / jnp.linalg.norm(w))
    assert final == pytest.approx(float(per_iter[-1]), rel=1e-4)
    errs.append(final)
  assert errs[0] < base_err and errs[1] < errs[0] and errs[2] < errs[1]


@pytest.mark.parametrize('init', ['pissa', 'olora', 'lora_ga', 'corda'])
def test_to_lora_reproduces_the_trained_model_on_the_original_base(init):
  fn, params, x, spec, new, initial = _init('scanned_decoder', init)
  trained = helpers.randomize(initial, jax.random.key(9), scale=0.05)
  plain = lj.to_lora(trained, initial)
  k = plain['layers']['up']['kernel']
  assert k.spec.rank == 8 and k.spec.init == 'kaiming'
  assert k.spec.scale == pytest.approx(_leaf(trained, 'layers/up/kernel').spec.scale)
  a = lj.merge(params, plain)
  b = lj.merge(new, trained)
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


def test_to_lora_refuses_loftq():
  fn, params, x, spec, new, initial = _init('mlp', 'loftq')
  with pytest.raises(ValueError, match='LoftQ'):
    lj.to_lora(initial, initial)


def test_qpissa_quantizes_the_residual():
  """QPiSSA: init on the float base, then quantize the residual. The principal part moves into
  the adapter, so the model is closer to the float one than QLoRA's quantized W."""
  fn, params, x, loss, batches = _mlp()
  spec = lj.make_spec(params, [(r'kernel$', _setting('pissa'))], fn=fn, args=(x,))
  new, ad = lj.init(jax.random.key(0), params, spec)
  qnew = lj.quantize(new, spec, block_size=16)
  ref = fn(params, x)
  qlora = lj.lora(fn)(lj.quantize(params, spec, block_size=16), x)
  assert helpers.rel_err(lj.lora(fn)(lj.join(qnew, ad), x), ref) < helpers.rel_err(qlora, ref)
  # A residual init on an already quantized leaf would compound two roundings: refused.
  with pytest.raises(ValueError, match='float base'):
    lj.init(jax.random.key(0), lj.quantize(params, spec, block_size=16), spec)


@pytest.mark.parametrize('setting,match', [
    ({'init': 'svd'}, "Unknown init 'svd'"),
    ({'init': 'pissa', 'init_options': {'niter': -1}}, 'niter=-1'),
    ({'init': 'pissa', 'init_options': {'iters': 2}}, r"Unknown init_options \['iters'\]"),
    ({'init': 'corda', 'init_options': {'mode': 'xpm'}}, "mode='xpm'"),
    ({'init': 'lora_ga', 'init_options': {'direction': 'ArB3r'}}, "direction='ArB3r'"),
    ({'init': 'loftq', 'init_options': {'quant': 'fp3'}}, "Unknown quantization type 'fp3'"),
    ({'init': 'loftq', 'init_options': {'iters': 0}}, 'iters=0'),
    ({'init': 'eva', 'init_options': {'rho': 0.5}}, 'rho=0.5'),
    ({'init': 'pissa', 'variant': 'vera'},
     r"init 'pissa' .* serves the variants \['lora', 'dora'\], not 'vera'"),
    ({'init': 'olora', 'variant': 'loha'}, r"init 'olora' .* not 'loha'"),
    ({'init': 'loftq', 'variant': 'dora'}, r"init 'loftq' .* serves the variants \['lora'\]"),
    ({'init': 'lora_ga', 'rank': 20}, "'ArBr' for rank 20"),
])
def test_bad_init_settings(setting, match):
  params = {'d': {'kernel': jnp.ones((32, 64))}}
  with pytest.raises(ValueError, match=match):
    lj.make_spec(params, [('kernel', {'rank': 4, **setting})])


def test_calibration_errors():
  fn, params, x, loss, batches = _mlp()
  spec = lj.make_spec(params, [(r'kernel$', _setting('corda'))], fn=fn, args=(x,))
  with pytest.raises(ValueError, match='needs fn='):
    lj.init(jax.random.key(0), params, spec, batches=batches)
  with pytest.raises(ValueError, match='ran dry after 4 of num_batches=6'):
    lj.init(jax.random.key(0), params, spec, fn=loss, batches=iter(batches), num_batches=6)
  with pytest.raises(ValueError, match='needs calibration batches'):
    lj.init(jax.random.key(0), params, spec, fn=loss)
  spec = lj.make_spec(params, [(r'kernel$', _setting('lora_ga'))], fn=fn, args=(x,))
  with pytest.raises(ValueError, match='scalar loss'):
    lj.init(jax.random.key(0), params, spec, fn=lambda p, b: fn(p, b[0]), batches=batches)


def test_activation_inits_refuse_embedding_tables():
  fn, params, x, loss, batches = _decoder()
  spec = lj.make_spec(params, [(r'embed/embedding$', {'rank': 2, 'init': 'eva'})],
                      fn=fn, args=(x,))
  with pytest.raises(ValueError, match="no dense .* use of \\['embed/embedding'\\]"):
    lj.init(jax.random.key(0), params, spec, fn=loss, batches=batches)


def test_inits_are_deterministic():
  _, _, _, _, n1, a1 = _init('mlp', 'pissa_niter_4')
  _, _, _, _, n2, a2 = _init('mlp', 'pissa_niter_4')
  helpers.assert_trees_equal(a1, a2)
  helpers.assert_trees_equal(n1, n2)


def test_capture_inside_while_loop_is_a_clear_error():
  def fn(p, x):
    body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ p['k']['kernel']))
    return jax.lax.while_loop(lambda c: c[0] < jnp.sum(x) ** 2, body, (0.0, x))[1]

  params = {'k': {'kernel': jax.random.normal(jax.random.key(0), (8, 8))}}
  spec = lj.spec.spec_leaves(lj.make_spec(params, [('kernel', {'rank': 2})]))
  with pytest.raises(ValueError, match='while_loop'):
    interpreter.capture_inputs(fn, spec)(params, jnp.ones((2, 8)))


def test_inits_are_jittable():
  w = jax.random.normal(jax.random.key(0), (2, 64, 96))      # a stacked kernel
  for init in ('pissa', 'pissa_niter_2', 'milora', 'olora'):
    spec = lj.make_spec({'k': w}, [('k', {'rank': 4, 'batch_axes': 0, 'init': init})])['k']
    f = {'olora': inits.olora}.get(spec.init, lambda k, w, s: inits.pissa(
        k, w, s, minor=s.init == 'milora'))
    eager = f(jax.random.key(1), w, spec)
    jitted = jax.jit(lambda w, s=spec, f=f: f(jax.random.key(1), w, s))(w)
    # Eager and jitted are different programs; an SVD amplifies their last-bit differences by
    # 1 / (the gap between the singular values kept and dropped), so the tolerance is relative
    # to each array's scale (measured: 4e-6 of it under SSE4.2 code generation).
    for a, b in zip(eager, jitted):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5 * float(np.max(np.abs(b))))
  spec = lj.make_spec({'k': w}, [('k', {'rank': 4, 'batch_axes': 0})])['k']
  q, a, b, errs = jax.jit(lambda w: inits.loftq(w, spec, 'nf4', 2))(w)
  assert isinstance(q, lj.QuantizedArray) and q.stack_axes == 1 and float(errs[1]) < float(
      errs[0])


def test_a_registered_init_is_one_record(monkeypatch):
  """A new init is one Init record: make_spec validates its options and variants, init runs it
  for LoRA and DoRA, to_lora converts it because its record says the base is the residual."""
  def factors(key, w, spec):
    del key   # the top-r SVD with all of sigma on A's side
    u, s, vh = inits.svd(lj.variants.common.matrix(w.astype(jnp.float32), spec))
    r = spec.rank
    return inits.linalg.residual(w, spec, u[..., :r] * s[..., None, :r] / spec.scale,
                                 vh[..., :r, :])

  def check(path, spec):
    if spec.init_opt('flag') not in (0, 1):
      raise ValueError(f'flag for {path!r} must be 0 or 1.')

  name = 'test_svd_left'
  monkeypatch.setattr(inits.base, '_REGISTRY', dict(inits.base._REGISTRY))  # undone after
  inits.register(inits.Init(name, options={'flag': 0}, needs=frozenset({inits.WEIGHT}),
                              changes_base=True, residual=True, check=check, factors=factors))
  with pytest.raises(ValueError, match='already registered'):
    inits.register(inits.get(name))
  assert inits.changes_base(name) and inits.changes_base('pissa_niter_3')
  assert not inits.changes_base('eva') and not inits.changes_base('nope')
  fn, params, x, loss, batches = _mlp()
  with pytest.raises(ValueError, match='flag for'):
    lj.make_spec(params, [(r'kernel$', {'init': name, 'init_options': {'flag': 2}})],
                 fn=fn, args=(x,))
  with pytest.raises(ValueError, match=f"init '{name}' .* not 'vera'"):
    lj.make_spec(params, [(r'kernel$', {'init': name, 'variant': 'vera'})], fn=fn, args=(x,))
  for variant in ('dora', 'lora'):
    spec = lj.make_spec(params, [(r'kernel$', {'rank': 4, 'init': name, 'variant': variant})],
                        fn=fn, args=(x,))
    new, ad = lj.init(jax.random.key(0), params, spec)
    assert helpers.rel_err(jax.jit(lj.lora(fn, strict=True))(lj.join(new, ad), x),
                           fn(params, x)) < 1e-5
  trained = helpers.randomize(ad, jax.random.key(1), 0.05)
  plain = lj.paths.flat(lj.to_lora(trained, ad), lj.adapters.is_adapter)
  assert plain['up/kernel'].spec.rank == 8 and plain['up/kernel'].spec.init == 'kaiming'


def test_calibration_is_one_pass_over_the_batches():
  """LoRA-GA, CorDA and EVA together draw each batch once, from a one-shot iterator, and give
  the same factors as each init run alone."""
  fn, params, x, loss, batches = _mlp()
  rules = [(r'^up/kernel$', _setting('lora_ga')), (r'^heads/kernel$', _setting('corda')),
           (r'^down/kernel$', {**_setting('eva'), 'init_options': {'tau': 1.0}})]
  spec = lj.make_spec(params, rules, fn=fn, args=(x,))
  drawn = []

  def once():
    for b in batches[:3]:
      drawn.append(1)
      yield b

  new, ad = lj.init(jax.random.key(5), params, spec, fn=loss, batches=once(), num_batches=3)
  assert len(drawn) == 3
  assert helpers.rel_err(jax.jit(lj.lora(fn, strict=True))(lj.join(new, ad), x),
                         fn(params, x)) < 1e-5
  for pattern, setting in rules:
    alone = lj.make_spec(params, [(pattern, setting)], fn=fn, args=(x,))
    _, ad1 = lj.init(jax.random.key(5), params, alone, fn=loss, batches=batches, num_batches=3)
    path = pattern.strip('^$')
    a, b = _leaf(ad, path), _leaf(ad1, path)
    assert a.spec == b.spec
    np.testing.assert_allclose(a.a, b.a, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b.a))))
