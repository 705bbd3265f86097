"""Quantized frozen bases: formats, round trips, QLoRA through `lora(fn)`, merging, sharding."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
from lorax_jax import quant
from lorax_jax import sharding as sh
from lorax_jax.models import decoder
from tests import helpers

# bitsandbytes' NF4 table (`get_4bit_type('nf4')`), as published with QLoRA.
NF4_PUBLISHED = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def np_blockwise(w, levels, block):
  """float64 NumPy reference: absmax blocks over the flattened array, nearest level."""
  x = np.asarray(w, np.float64).reshape(-1, block)
  amax = np.abs(x).max(-1, keepdims=True)
  idx = np.abs((x / amax)[..., None] - levels).argmin(-1)
  return (levels[idx] * amax).reshape(np.shape(w))


def test_nf4_code_book_is_the_published_one():
  np.testing.assert_allclose(quant.nf4_code_book(), NF4_PUBLISHED, atol=2e-7)


@pytest.mark.parametrize('qtype,levels', [
    ('nf4', NF4_PUBLISHED), ('int4', np.arange(-7, 8) / 7.0)])
def test_blockwise_round_trip_matches_float64_reference(qtype, levels):
  w = jax.random.normal(jax.random.key(0), (96, 128))
  q = quant.quantize_array(w, {'type': qtype, 'double_quant': False})
  ref = np_blockwise(w, levels, 64)
  np.testing.assert_allclose(np.asarray(quant.dequantize_array(q)), ref, atol=1e-6)


def test_int8_per_channel_matches_float64_reference():
  w = np.asarray(jax.random.normal(jax.random.key(1), (48, 40)), np.float64)
  q = quant.quantize_array(jnp.asarray(w, jnp.float32), 'int8')
  step = np.abs(w).max(0, keepdims=True) / 127
  ref = np.clip(np.round(w / step), -127, 127) * step
  np.testing.assert_allclose(np.asarray(quant.dequantize_array(q)), ref, atol=1e-6)
  assert q.scales.shape == (1, 40) and q.codes.dtype == jnp.int8


def test_double_quantization_error_is_small_next_to_nf4s():
  w = jax.random.normal(jax.random.key(2), (256, 512))
  plain = quant.quantize_array(w, {'type': 'nf4', 'double_quant': False})
  dq = quant.quantize_array(w, 'nf4')
  e_plain = float(jnp.linalg.norm(quant.dequantize_array(plain) - w))
  e_dq = float(jnp.linalg.norm(quant.dequantize_array(dq) - w))
  assert e_plain <= e_dq < 1.02 * e_plain
  # The constants themselves: 8-bit, relative error well under 1%.
  s_ref = plain.scales
  s_dq = quant.blockwise.block_scales(dq)
  assert float(jnp.max(jnp.abs(s_dq - s_ref) / s_ref)) < 0.01


@pytest.mark.parametrize('setting,bits', [
    ('nf4', 4 + 8 / 64 + 32 / (64 * 256)), ({'type': 'nf4', 'double_quant': False}, 4.5),
    ('int4', 4.5), ('int8', 8 + 32 / 1024)])
def test_bits_per_parameter(setting, bits):
  q = quant.quantize_array(jax.random.normal(jax.random.key(3), (1024, 2048)), setting)
  assert q.bits_per_param == pytest.approx(bits, abs=2e-3)
  assert q.shape == (1024, 2048) and q.dtype == jnp.float32


def test_dtype_and_stacked_layout():
  w = jax.random.normal(jax.random.key(4), (3, 32, 4, 16), jnp.bfloat16)
  q = quant.quantize_array(w, {'type': 'nf4', 'stack_axes': 1})
  assert q.codes.shape == (3, 32, 4, 8) and q.scales.shape == (3, 32)
  assert q.dq_scales.shape == (3, 1) and q.dq_offset.shape == (3,)
  d = quant.dequantize_array(q)
  assert d.dtype == jnp.bfloat16
  # Each layer is quantized on its own: equal to quantizing the slices. The NF4 codes and block
  # maxima come from exact operations (max, division, nearest level): bitwise. Double
  # quantization subtracts a mean, a reduction whose order the compiler picks per shape: the
  # offsets agree to float32 rounding, and a scale code may round the other way at a tie, which
  # moves a block's scale by one double-quantization step (its values, NF4 levels in [-1, 1]
  # times the scale, by at most that step), plus one bfloat16 ulp of rounding.
  for i in range(3):
    qi = quant.quantize_array(w[i], 'nf4')
    np.testing.assert_array_equal(qi.codes, q.codes[i])
    np.testing.assert_allclose(qi.dq_offset, q.dq_offset[i], rtol=1e-6)
    assert np.max(np.abs(np.asarray(qi.scales, np.int32) - np.asarray(q.scales[i], np.int32))) <= 1
    step = float(np.max(np.asarray(q.dq_scales[i])))
    di = np.asarray(quant.dequantize_array(qi), np.float32)
    assert np.max(np.abs(di - np.asarray(d[i], np.float32))) <= (
        1.01 * step + 2.0 ** -7 * float(np.max(np.abs(di))))


@pytest.mark.parametrize('setting,shape,match', [
    ({'type': 'nf4', 'block_size': 48}, (16, 64), 'block_size=48'),
    ({'type': 'nf4', 'block_size': 64}, (16, 3), 'block_size=64'),
    ({'type': 'fp3'}, (16, 64), "Unknown quantization type 'fp3'"),
    ({'type': 'nf4', 'blocks': 4}, (16, 64), r"Unknown quantization keys \['blocks'\]"),
    ({'type': 'int8', 'double_quant': True}, (16, 64), 'double_quant'),
    ({'type': 'nf4', 'block_size': 16}, (16, 63), 'odd last dimension'),
    ({'type': 'nf4', 'stack_axes': 2}, (16, 64), 'stack_axes=2'),
])
def test_bad_settings(setting, shape, match):
  with pytest.raises(ValueError, match=match):
    quant.quantize_array(jnp.ones(shape), setting)


def test_quantize_tree_rules_and_errors():
  params = {'a': {'kernel': jnp.ones((8, 64)), 'bias': jnp.ones((64,))},
            'b': {'kernel': jnp.ones((8, 64))}, 'step': jnp.int32(0)}
  q = lj.quantize(params, [(r'^a/kernel$', 'int8'), (r'kernel$', {'type': 'nf4'})])
  assert isinstance(q['a']['kernel'], lj.QuantizedArray) and q['a']['kernel'].qtype == 'int8'
  assert q['b']['kernel'].qtype == 'nf4' and q['a']['bias'] is params['a']['bias']
  with pytest.raises(ValueError, match="'nothing' matches no parameter path"):
    lj.quantize(params, [('nothing', 'nf4')])
  with pytest.raises(ValueError, match='not a float dtype'):
    lj.quantize(params, [('step', 'nf4')])
  back = lj.dequantize(q)
  assert back['b']['kernel'].shape == (8, 64)


class _PerTensorInt8(quant.int8.Int8):
  """A format defined outside the package: int8 with one scale for the whole tensor."""
  name = 'int8_tensor'

  def resolve(self, s, path, shape):
    return super().resolve({**s, 'axes': tuple(range(len(shape)))}, path, shape)

  def settings(self, q):
    return dict(type=self.name)


def test_a_registered_format_works_through_the_tree_api():
  fmt = quant.register(_PerTensorInt8())
  try:
    assert 'int8_tensor' in quant.names() and quant.get('int8_tensor') is fmt
    with pytest.raises(ValueError, match="'int8_tensor' is already registered"):
      quant.register(_PerTensorInt8())
    w = jax.random.normal(jax.random.key(11), (3, 16, 32))
    params = {'k': w, 'b': jax.random.normal(jax.random.key(12), (32,))}
    q = lj.quantize(params, [(r'^k$', 'int8_tensor')])
    k = q['k']
    assert k.qtype == 'int8_tensor' and k.scales.shape == (1, 1, 1) and q['b'] is params['b']
    x = np.asarray(w, np.float64)
    step = np.abs(x).max() / 127.0
    ref = np.clip(np.round(x / step), -127, 127) * step
    np.testing.assert_allclose(np.asarray(lj.dequantize(q)['k']), ref, rtol=1e-6, atol=1e-6)
    again = quant.requantize_like(lj.dequantize(q)['k'], k)
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(k.codes))
    assert not quant.scannable(k) and quant.layout(k)['scales'] == ((), (), ())
  finally:
    quant.base._REGISTRY.pop('int8_tensor')  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="Unknown quantization type 'int8_tensor'"):
    quant.quantize_array(w, 'int8_tensor')


def test_no_format_branches_outside_the_format_modules():
  root = pathlib.Path(lj.__file__).parent
  own = {root / 'quant' / f'{name}.py' for name in ('nf4', 'int4', 'int8', 'blockwise')}
  for path in root.rglob('*.py'):
    if path not in own:
      assert not re.search(r"qtype\s*[!=]=|== *'(nf4|int4|int8)'", path.read_text()), path


class Mlp(nn.Module):
  scan: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(64, name='up')(x)
    x = nn.DenseGeneral((4, 16), name='heads')(jax.nn.gelu(x))
    return nn.DenseGeneral(32, axis=(-2, -1), name='down')(x)


def _models():
  mlp = Mlp()
  x = jax.random.normal(jax.random.key(5), (3, 32))
  dec = decoder.Decoder(vocab_size=64, d_model=64, num_layers=2, num_heads=4, mlp_dim=128,
                        scan_layers=True, remat=True)
  tok = jax.random.randint(jax.random.key(6), (2, 8), 0, 64)
  return {
      'mlp': (lambda p, x: mlp.apply({'params': p}, x), mlp.init(jax.random.key(0), x)['params'],
              x),
      'scanned_decoder': (lambda p, t: dec.apply({'params': p}, t),
                          dec.init(jax.random.key(0), tok)['params'], tok),
  }


@pytest.mark.parametrize('model', ['mlp', 'scanned_decoder'])
@pytest.mark.parametrize('qtype', ['nf4', 'int8', 'int4'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_qlora_factored_equals_float64_on_dequantized_base(model, qtype, dtype):
  fn, params, x = _models()[model]
  params = helpers.cast_tree(params, dtype)
  spec = lj.make_spec(params, [(r'kernel$', {'rank': 4})], fn=fn, args=(x,))
  qparams = lj.quantize(params, spec, type=qtype, block_size=16)
  qparams, adapters = lj.init(jax.random.key(1), qparams, spec)
  adapters = helpers.randomize(adapters, jax.random.key(2))
  deq = lj.dequantize(qparams)
  out = jax.jit(lj.lora(fn, strict=True))(lj.join(qparams, adapters), x)
  assert out.dtype == fn(deq, x).dtype
  ref = helpers.f64_reference(fn, deq, adapters, x)
  assert helpers.rel_err(out, ref) < helpers.TOL[dtype]
  # No adapters: the quantized base alone runs as its dequantized float base.
  base = jax.jit(lj.lora(fn, strict=True))(qparams, x)
  assert helpers.rel_err(base, helpers.f64_reference(fn, deq, {}, x)) < helpers.TOL[dtype]


@pytest.mark.parametrize('variant', ['dora', 'vera', 'loha', 'lokr', 'lora_fa'])
def test_every_kind_of_variant_runs_on_a_quantized_base(variant):
  """DoRA reads W (dequantized for its norm), LoHa/LoKr form dW on the dequantized base."""
  fn, params, x = _models()['mlp']
  spec = lj.make_spec(params, [(r'kernel$', {'rank': 4, 'variant': variant})], fn=fn, args=(x,))
  qparams, adapters = lj.init(jax.random.key(1), lj.quantize(params, spec, block_size=16), spec)
  adapters = helpers.randomize(adapters, jax.random.key(2))
  out = jax.jit(lj.lora(fn, strict=True))(lj.join(qparams, adapters), x)
  ref = helpers.f64_reference(fn, lj.dequantize(qparams), adapters, x)
  assert helpers.rel_err(out, ref) < 1e-5


def test_qlora_gradients_equal_those_on_the_dequantized_base():
  fn, params, x = _models()['scanned_decoder']
  spec = lj.make_spec(params, [(r'kernel$', {'rank': 4})], fn=fn, args=(x,))
  qparams = lj.quantize(params, spec)
  qparams, adapters = lj.init(jax.random.key(1), qparams, spec)
  adapters = helpers.randomize(adapters, jax.random.key(2))
  deq = lj.dequantize(qparams)
  loss = lambda base: lambda a: jnp.mean(lj.lora(fn, strict=True)(lj.join(base, a), x) ** 2)
  g_q = jax.jit(jax.grad(loss(qparams)))(adapters)
  g_f = jax.jit(jax.grad(loss(deq)))(adapters)
  for a, b in zip(jax.tree_util.tree_leaves(g_q), jax.tree_util.tree_leaves(g_f)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The quantized base is an integer-coded constant: no float gradient reaches its arrays.
  g_base = jax.grad(lambda q: jnp.sum(lj.lora(fn)(q, x)), allow_int=True)(qparams)
  quantized = [l for _, _, l in lj.paths.leaves_with_paths(g_base) if lj.quant.is_quantized(l)]
  floats = [l for q in quantized for l in jax.tree_util.tree_leaves(q)
            if jnp.issubdtype(l.dtype, jnp.floating)]
  assert len(quantized) == 8 and floats   # 7 stacked kernels and the head
  assert all(float(jnp.max(jnp.abs(l))) == 0 for l in floats)


def test_stacked_base_is_dequantized_one_layer_at_a_time():
  """No float value of a stacked kernel's full shape exists outside the scanned layer body."""
  fn, params, x = _models()['scanned_decoder']
  spec = lj.make_spec(params, [(r'kernel$', {'rank': 4})], fn=fn, args=(x,))
  qparams, adapters = lj.init(jax.random.key(1), lj.quantize(params, spec), spec)
  stacked = {tuple(s.shape) for s in lj.spec.spec_leaves(spec).values() if s.batch_axes}
  jaxpr = jax.make_jaxpr(lj.lora(fn, strict=True))(lj.join(qparams, adapters), x)
  outer = [v.aval for e in jaxpr.jaxpr.eqns for v in e.outvars]
  assert not [a for a in outer if tuple(a.shape) in stacked and
              jnp.issubdtype(a.dtype, jnp.floating)]
  assert any(e.primitive.name == 'scan' for e in jaxpr.jaxpr.eqns)


def test_init_keeps_the_quantized_leaf_and_make_spec_reads_its_shape():
  fn, params, x = _models()['mlp']
  qparams = lj.quantize(params, [(r'kernel$', 'nf4')], block_size=16)
  spec = lj.make_spec(qparams, [(r'kernel$', {'rank': 2})], fn=fn, args=(x,))
  q2, adapters = lj.init(jax.random.key(0), qparams, spec)
  assert q2['up']['kernel'] is qparams['up']['kernel']
  text = lj.summary(qparams, spec, print_fn=None)
  assert 'heads/kernel' in text and '64x4x16' in text


def test_merge_into_quantized_base():
  fn, params, x = _models()['mlp']
  spec = lj.make_spec(params, [(r'kernel$', {'rank': 4})], fn=fn, args=(x,))
  qparams = lj.quantize(params, spec, block_size=16)
  qparams, adapters = lj.init(jax.random.key(1), qparams, spec)
  adapters = helpers.randomize(adapters, jax.random.key(2), scale=0.1)
  exact = lj.merge(lj.dequantize(qparams), adapters)
  merged = lj.merge(qparams, adapters)          # dequantize + dW, a float base
  for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(exact)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  requant = lj.merge(qparams, adapters, requantize=True)
  k = requant['up']['kernel']
  assert isinstance(k, lj.QuantizedArray) and k.qtype == 'nf4' and k.block_size == 16
  # Requantizing adds one rounding of the merged kernel: NF4's own error size, no more.
  err = float(jnp.linalg.norm(lj.dequantize(k) - exact['up']['kernel']) /
              jnp.linalg.norm(exact['up']['kernel']))
  assert err <= 1.05 * float(lj.inits.quantization_error(exact['up']['kernel'],
                                                           {'type': 'nf4', 'block_size': 16}))
  back = lj.unmerge(requant, adapters)
  assert isinstance(back['up']['kernel'], lj.QuantizedArray)


@helpers.needs_8_devices
def test_quantized_base_shardings():
  fn, params, x = _models()['scanned_decoder']
  spec = lj.make_spec(params, [(r'kernel$', {'rank': 4})], fn=fn, args=(x,))
  qparams, adapters = lj.init(jax.random.key(1), lj.quantize(params, spec, block_size=16), spec)
  adapters = helpers.randomize(adapters, jax.random.key(2))
  mesh = sh.make_mesh({'fsdp': 8})
  base_sh = sh.param_shardings(qparams, mesh, sh.preset('fsdp'))
  k = base_sh['layers']['up']['kernel']
  assert isinstance(k, lj.QuantizedArray) and 'fsdp' in str(k.codes.spec)
  # Adapters derive from the logical (float) layout exactly as for the float base.
  float_sh = sh.adapter_shardings(adapters, sh.param_shardings(params, mesh, sh.preset('fsdp')))
  ad_sh = sh.adapter_shardings(adapters, base_sh)
  for a, b in zip(jax.tree_util.tree_leaves(ad_sh), jax.tree_util.tree_leaves(float_sh)):
    assert a.spec == b.spec
  rep = jax.tree_util.tree_map(lambda s: sh.replicated(mesh), base_sh,
                               is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))
  sharded = sh.per_device_bytes(qparams['layers'], base_sh['layers'])
  assert sharded < 0.2 * sh.per_device_bytes(qparams['layers'], rep['layers'])
  out = jax.jit(lj.lora(fn, strict=True))(
      lj.join(sh.place(qparams, base_sh), sh.place(adapters, ad_sh)), x)
  ref = jax.jit(lj.lora(fn, strict=True))(lj.join(qparams, adapters), x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_quantization_rule_shadowed_raises():
  params = {'a': {'kernel': jax.random.normal(jax.random.key(0), (8, 64))}}
  with pytest.raises(ValueError, match=re.escape("Quantization rule 'a/kernel' has no effect")):
    lj.quantize(params, [(r'kernel$', 'nf4'), (r'a/kernel', 'int8')])
  with pytest.raises(ValueError, match=re.escape("Quantization rule 'nothing' matches no")):
    lj.quantize(params, [(r'kernel$', 'nf4'), ('nothing', 'int8')])
