"""BERT: the real all-MiniLM-L6-v2 reproduces the reference embeddings; loader errors; LoRA."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer

import lorax_jax as lj
from lorax_jax.models import bert as bert_lib
from lorax_jax.models import hf
from tests import helpers

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'minilm_reference.npz')


@pytest.fixture(scope='module')
def minilm():
  return bert_lib.load_hf_bert(bert_lib.minilm_directory())


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(FIXTURE))


def test_minilm_reproduces_reference_embeddings(minilm, reference):
  model, variables = minilm
  emb = jax.jit(lambda v, *a: model.apply(v, *a, method=model.embed))(
      variables, reference['input_ids'], reference['attention_mask'],
      reference['token_type_ids'])
  cos = np.sum(np.asarray(emb) * reference['embeddings'], axis=-1) / (
      np.linalg.norm(emb, axis=-1) * np.linalg.norm(reference['embeddings'], axis=-1))
  assert cos.min() >= 0.9999, cos
  np.testing.assert_allclose(emb, reference['embeddings'], atol=2e-4)


def test_tokenizer_matches_the_reference_tokenization(reference):
  tok = Tokenizer.from_file(os.path.join(bert_lib.minilm_directory(), 'tokenizer.json'))
  tok.enable_padding(pad_id=0, pad_token='[PAD]')
  tok.enable_truncation(128)
  enc = tok.encode_batch(json.loads(str(reference['sentences'])))
  np.testing.assert_array_equal(np.array([e.ids for e in enc]), reference['input_ids'])
  np.testing.assert_array_equal(np.array([e.attention_mask for e in enc]),
                                reference['attention_mask'])


@pytest.mark.slow   # LoRA on the real model against float64 (its loading and forward stay quick)
def test_lora_on_the_real_model(minilm, reference):
  model, variables = minilm
  fn = lambda v, ids, mask: model.apply(v, ids, mask, method=model.embed)
  args = (reference['input_ids'][:3], reference['attention_mask'][:3])
  spec = lj.make_spec(variables, lj.dense_kernels(rank=4), fn=fn, args=args)
  assert lj.spec.spec_leaves(spec)['params/layer0/query/kernel'].out_axes == (1, 2)
  params, adapters = lj.init(jax.random.key(0), variables, spec)
  helpers.assert_identity_at_init(fn, params, adapters, *args)
  apply = jax.jit(lj.lora(fn, strict=True))
  adapters = helpers.randomize(adapters, jax.random.key(1), scale=0.02)
  out = apply(lj.join(params, adapters), *args)
  ref = helpers.f64_reference(fn, params, adapters, *args)
  assert helpers.rel_err(out, ref) < 1e-4


def _tiny_checkpoint(tmp_path, mutate):
  config = dict(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=16, max_position_embeddings=16, type_vocab_size=2,
                hidden_act='gelu', layer_norm_eps=1e-12)
  c = bert_lib.BertConfig(**{k: v for k, v in config.items() if k != 'hidden_act'})
  rng = np.random.default_rng(0)
  tensors = {}
  for entry in bert_lib.hf_mapping(c):
    tensors['bert.' + entry.hf_key] = None
  shapes = {
      'embeddings.word_embeddings.weight': (50, 8), 'embeddings.position_embeddings.weight':
      (16, 8), 'embeddings.token_type_embeddings.weight': (2, 8)}
  for key in list(tensors):
    k = key[len('bert.'):]
    if k in shapes:
      shape = shapes[k]
    elif k.endswith('intermediate.dense.weight'):
      shape = (16, 8)
    elif k.endswith('output.dense.weight') and 'attention' not in k:
      shape = (8, 16)
    elif k.endswith('intermediate.dense.bias'):
      shape = (16,)
    elif k.endswith('.weight') and 'LayerNorm' not in k:
      shape = (8, 8)
    else:
      shape = (8,)
    tensors[key] = rng.standard_normal(shape).astype(np.float32)
  tensors['bert.pooler.dense.weight'] = rng.standard_normal((8, 8)).astype(np.float32)
  mutate(tensors)
  os.makedirs(tmp_path, exist_ok=True)
  save_file(tensors, str(tmp_path / 'model.safetensors'))
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config, f)
  return tensors


def test_loader_on_a_checkpoint_written_in_hf_naming(tmp_path):
  tensors = _tiny_checkpoint(tmp_path, lambda t: None)
  model, variables = bert_lib.load_hf_bert(str(tmp_path))
  q = variables['params']['layer0']['query']['kernel']
  np.testing.assert_array_equal(
      q, tensors['bert.encoder.layer.0.attention.self.query.weight'].T.reshape(8, 2, 4))
  out = model.apply(variables, jnp.array([[1, 2, 3]]), jnp.array([[1, 1, 1]]))
  assert out.shape == (1, 3, 8) and np.isfinite(out).all()


def test_loader_lists_missing_unexpected_and_misshaped_keys(tmp_path):
  def mutate(t):
    del t['bert.encoder.layer.0.attention.self.key.bias']
    t['bert.encoder.layer.0.extra.weight'] = np.zeros(3, np.float32)
    t['bert.encoder.layer.0.output.dense.weight'] = np.zeros((8, 15), np.float32)

  _tiny_checkpoint(tmp_path, mutate)
  with pytest.raises(ValueError) as e:
    bert_lib.load_hf_bert(str(tmp_path))
  msg = str(e.value)
  assert "missing keys (1): ['encoder.layer.0.attention.self.key.bias']" in msg
  assert "unexpected keys (1): ['encoder.layer.0.extra.weight']" in msg
  assert re.search(r'mis-shaped keys \(1\): \[.encoder.layer.0.output.dense.weight: \(8, 15\)',
                   msg)


def test_corrupted_safetensors_header(tmp_path):
  path = tmp_path / 'model.safetensors'
  path.write_bytes(b'\xff' * 8 + b'{not json')
  with pytest.raises(ValueError, match='is not a valid safetensors file'):
    hf.load_safetensors(str(path))
  with pytest.raises(ValueError, match='No safetensors file at'):
    hf.load_safetensors(str(tmp_path / 'nothing.safetensors'))
