"""Hugging Face Llama, GPT-2 and ViT checkpoints (tiny, random, written by transformers; see
fixtures/make_hf_tiny_references.py) load into the reference models and reproduce the reference
implementation's outputs."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lorax_jax as lj
from lorax_jax.models import load_hf_gpt2, load_hf_llama, load_hf_vit
from tests import helpers

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


@pytest.mark.parametrize('scan_layers', [False, True])
def test_llama_matches_reference_logits(scan_layers):
  model, variables = load_hf_llama(os.path.join(FIXTURES, 'tiny_llama'), scan_layers=scan_layers)
  ref = np.load(os.path.join(FIXTURES, 'tiny_llama', 'reference.npz'))
  out = jax.jit(model.apply)(variables, ref['tokens'])
  np.testing.assert_allclose(out, ref['logits'], atol=1e-5, rtol=1e-5)
  if scan_layers:
    assert variables['params']['layers']['query']['kernel'].shape == (2, 32, 4, 8)
    assert variables['params']['layers']['key']['kernel'].shape == (2, 32, 2, 8)


def test_vit_matches_reference_logits_and_adapts():
  model, variables = load_hf_vit(os.path.join(FIXTURES, 'tiny_vit'))
  ref = np.load(os.path.join(FIXTURES, 'tiny_vit', 'reference.npz'))
  out = jax.jit(model.apply)(variables, ref['images'])
  np.testing.assert_allclose(out, ref['logits'], atol=1e-5, rtol=1e-5)
  spec = lj.make_spec(variables, lj.dense_kernels(rank=2), fn=model.apply, args=(ref['images'],))
  params, adapters = lj.init(jax.random.key(0), variables, spec)
  helpers.assert_identity_at_init(model.apply, params, adapters, ref['images'])


def _copy(tmp_path, name, mutate_tensors=None, mutate_config=None):
  dst = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), dst)
  if mutate_tensors:
    tensors = load_file(str(dst / 'model.safetensors'))
    mutate_tensors(tensors)
    save_file(tensors, str(dst / 'model.safetensors'))
  if mutate_config:
    config = json.load(open(dst / 'config.json'))
    mutate_config(config)
    json.dump(config, open(dst / 'config.json', 'w'))
  return str(dst)


def test_llama_bad_checkpoints(tmp_path):
  def mutate(t):
    del t['model.layers.1.mlp.up_proj.weight']
    t['model.layers.0.self_attn.k_proj.weight'] = np.zeros((32, 32), np.float32)
  with pytest.raises(ValueError) as e:
    load_hf_llama(_copy(tmp_path, 'tiny_llama', mutate))
  msg = str(e.value)
  assert "missing keys (1): ['model.layers.1.mlp.up_proj.weight']" in msg
  assert 'model.layers.0.self_attn.k_proj.weight: (32, 32)' in msg
  with pytest.raises(ValueError, match=re.escape("Unsupported Llama config fields "
                                                 "{'attention_bias': True}")):
    load_hf_llama(_copy(tmp_path / 'b', 'tiny_llama',
                        mutate_config=lambda c: c.update(attention_bias=True)))


def test_tied_llama_embeddings(tmp_path):
  path = _copy(tmp_path, 'tiny_llama', lambda t: t.pop('lm_head.weight'),
               lambda c: c.update(tie_word_embeddings=True))
  _, variables = load_hf_llama(path)
  np.testing.assert_array_equal(variables['params']['head']['kernel'],
                                variables['params']['embed']['embedding'].T)


def test_gpt2_matches_reference_logits_and_adapts_the_tied_embedding():
  model, variables = load_hf_gpt2(os.path.join(FIXTURES, 'tiny_gpt2'))
  ref = np.load(os.path.join(FIXTURES, 'tiny_gpt2', 'reference.npz'))
  out = jax.jit(model.apply)(variables, ref['tokens'])
  np.testing.assert_allclose(out, ref['logits'], atol=1e-5, rtol=1e-5)
  rules = [('wte', {'rank': 2})] + lj.dense_kernels(rank=2)
  spec = lj.make_spec(variables, rules, fn=model.apply, args=(ref['tokens'],))
  params, adapters = lj.init(jax.random.key(0), variables, spec)
  apply = lj.lora(model.apply, strict=True)
  helpers.assert_identity_at_init(model.apply, params, adapters, ref['tokens'])
  adapters = helpers.randomize(adapters, jax.random.key(1), scale=0.05)
  got = jax.jit(apply)(lj.join(params, adapters), ref['tokens'])
  want = helpers.f64_reference(model.apply, params, adapters, ref['tokens'])
  assert helpers.rel_err(got, want) < 1e-5


def test_gpt2_misshaped_fused_attention(tmp_path):
  path = _copy(tmp_path, 'tiny_gpt2', lambda t: t.update({
      'transformer.h.0.attn.c_attn.weight': np.zeros((32, 90), np.float32)}))
  with pytest.raises(ValueError, match=re.escape('h.0.attn.c_attn.weight: (32, 90)')):
    load_hf_gpt2(path)
