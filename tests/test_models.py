"""Reference models: shapes, causal masking, GQA, sampling, linen/NNX parity, and LoRA on them."""

from __future__ import annotations

import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
from lorax_jax.models import Decoder, NnxViT, SmallCNN, ViT, generate
from tests import helpers

IMAGES = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))


def _lora_laws(fn, params, args, rules):
  spec = lj.make_spec(params, rules, fn=fn, args=args)
  params, adapters = lj.init(jax.random.key(1), params, spec)
  apply = lj.lora(fn, strict=True)
  helpers.assert_identity_at_init(fn, params, adapters, *args)
  adapters = helpers.randomize(adapters, jax.random.key(2), scale=0.05)
  out = jax.jit(apply)(lj.join(params, adapters), *args)
  ref = helpers.f64_reference(fn, params, adapters, *args)
  assert helpers.rel_err(out, ref) < 1e-4
  return spec


def test_vit_linen_with_lora():
  model = ViT(num_classes=10, size='tiny')
  params = model.init(jax.random.key(0), IMAGES)
  assert model.apply(params, IMAGES).shape == (2, 10)
  spec = _lora_laws(model.apply, params, (IMAGES,),
                    [('head', 'full')] + lj.dense_kernels(rank=4))
  s = lj.spec.spec_leaves(spec)
  assert s['params/block0/query/kernel'].out_axes == (1, 2)
  assert s['params/block0/out/kernel'].in_axes == (0, 1)
  assert 'params/patch_embed/kernel' not in s     # the preset leaves embeddings frozen


def test_vit_nnx_matches_linen_names_and_runs_with_lora():
  model = NnxViT(num_classes=10, size='tiny', image_size=16, channels=1, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  linen = ViT(num_classes=10, size='tiny').init(jax.random.key(0), IMAGES)
  shapes = lambda t: {p: np.shape(l) for p, _, l in lj.paths.leaves_with_paths(t)}
  assert {'params/' + k: v for k, v in shapes(state).items()} == shapes(linen)
  fn = lambda st, x: nnx.merge(graphdef, st)(x)
  assert fn(state, IMAGES).shape == (2, 10)
  _lora_laws(fn, state, (IMAGES,), [('head', 'full')] + lj.dense_kernels(rank=4))


def test_vit_bad_sizes():
  with pytest.raises(ValueError, match=re.escape("Unknown ViT size 'huge'; allowed:")):
    ViT(size='huge').init(jax.random.key(0), IMAGES)
  with pytest.raises(ValueError, match='image_size=18 is not a multiple of the patch size 4'):
    NnxViT(image_size=18, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('kv_heads', [None, 2, 1])
def test_decoder_gqa_is_causal_and_adapts(kv_heads):
  model = Decoder(vocab_size=40, d_model=32, num_layers=2, num_heads=4, mlp_dim=64,
                  num_kv_heads=kv_heads)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 40)
  params = model.init(jax.random.key(1), tokens)
  if kv_heads:
    assert params['params']['layer0']['key']['kernel'].shape == (32, kv_heads, 8)
  logits = model.apply(params, tokens)
  changed = model.apply(params, tokens.at[:, 5:].set(3))
  np.testing.assert_allclose(logits[:, :5], changed[:, :5], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits[:, 5:], changed[:, 5:])
  _lora_laws(model.apply, params, (tokens,), lj.dense_kernels(rank=2))


def test_decoder_rejects_bad_heads():
  with pytest.raises(ValueError, match='num_heads=4 must divide d_model=30'):
    Decoder(d_model=30, num_heads=4).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_generate_greedy_and_sampled():
  model = Decoder(vocab_size=20, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
  prompt = jnp.array([[1, 2, 3]])
  params = model.init(jax.random.key(0), prompt)
  out = generate(model.apply, params, prompt, 4)
  np.testing.assert_array_equal(out[:, :3], prompt)
  # Each new token is the argmax of the model's logits on the tokens before it, computed here op
  # by op on the growing sequence. `generate` runs a compiled loop on the padded sequence: a
  # different program, whose logits agree to a few ulps, so a token may differ from the argmax
  # only where the top two logits tie to within that.
  for i in range(3, 7):
    logits = np.asarray(model.apply(params, out[:, :i])[:, -1])
    chosen = np.take_along_axis(logits, np.asarray(out[:, i:i + 1]), -1)[:, 0]
    assert np.all(chosen >= logits.max(-1) - 1e-5 * np.abs(logits).max()), (i, out, logits)
  s1 = generate(model.apply, params, prompt, 4, temperature=1.0, key=jax.random.key(3))
  s2 = generate(model.apply, params, prompt, 4, temperature=1.0, key=jax.random.key(3))
  np.testing.assert_array_equal(s1, s2)
  with pytest.raises(ValueError, match='needs a PRNG key'):
    generate(model.apply, params, prompt, 2, temperature=0.5)


def test_small_cnn_conv_lora():
  model = SmallCNN(num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  params = model.init(jax.random.key(1), x)
  _lora_laws(model.apply, params, (x,), [('head', 'full'), ('kernel', {'rank': 4})])
