"""PEFT files in and out, checked against the real `peft` and `transformers` (torch, CPU) on the
real all-MiniLM-L6-v2, the tiny GPT-2 / Llama / ViT fixtures, and merged Hugging Face exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zlib

import jax
import numpy as np
import pytest

import lorax_jax as lj
from lorax_jax import interop
from lorax_jax.models import bert, hf, hf_mapping, load_hf_gpt2, load_hf_llama, load_hf_vit
from tests import helpers

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')
torch.set_num_threads(1)
os.environ.setdefault('HF_HUB_OFFLINE', '1')

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
SENTENCES = ['LoRA adapts a frozen model with low-rank updates.',
             'The quick brown fox jumps over the lazy dog.',
             'Adapters move between JAX and PyTorch as PEFT files.']
ATTENTION_MLP = r'layer\d/(query|key|value|out|intermediate|output)/kernel$'


@pytest.fixture(scope='module')
def minilm():
  model, variables = bert.load_hf_bert(bert.minilm_directory())
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.from_file(os.path.join(bert.minilm_directory(), 'tokenizer.json'))
  tok.enable_padding(pad_id=0, pad_token='[PAD]')
  enc = tok.encode_batch(SENTENCES)
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], np.int32)
  return model, variables['params'], ids, mask, hf_mapping('bert', bert.minilm_directory())


def _torch_embed(model, ids, mask):
  with torch.no_grad():
    h = model(input_ids=torch.tensor(ids, dtype=torch.long),
              attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
  m = torch.tensor(mask, dtype=torch.float32)[..., None]
  pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
  return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def _jax_embed(model, params, adapters, ids, mask):
  fn = lambda p, i, m: model.apply({'params': p}, i, m, method=model.embed)
  return np.asarray(lj.lora(fn, strict=True)(lj.join(params, adapters), ids, mask))


def _apply(model):
  return lambda p, i, m: model.apply({'params': p}, i, m)


def _hf_bert():
  return transformers.AutoModel.from_pretrained(bert.minilm_directory()).eval()


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _random_adapters(adapters, key):
  """Non-zero random A and B (and a perturbed magnitude for DoRA)."""
  def one(kp, ad):
    if isinstance(ad, lj.FullParams):
      return lj.FullParams(ad.value * 1.5 + 0.1, ad.spec)
    path = lj.paths.path_str(kp)
    ka, kb, km = jax.random.split(jax.random.fold_in(key, zlib.crc32(path.encode())), 3)
    # Entries of s*A@B about 0.005, a tenth of a typical weight: a clear change that keeps
    # attention out of saturation, where float32 rounding would be amplified.
    d_in = np.prod(ad.spec.in_shape)
    a = jax.random.normal(ka, ad.a.shape, ad.a.dtype) / np.sqrt(d_in)
    b = jax.random.normal(kb, ad.b.shape, ad.b.dtype) * (
        0.005 * np.sqrt(d_in / ad.spec.rank) / ad.spec.scale)
    if isinstance(ad, lj.DoraParams):
      m = ad.magnitude * (1 + 0.2 * jax.random.normal(km, ad.magnitude.shape))
      return lj.DoraParams(a, b, m, ad.spec)
    return type(ad)(a, b, ad.spec)
  return jax.tree_util.tree_map_with_path(one, adapters, is_leaf=lj.adapters.is_adapter)


@pytest.mark.slow   # the real MiniLM against PEFT per variant; the quick tier keeps the format tests
@pytest.mark.parametrize('variant,scaling', [('lora', 'alpha/r'), ('lora', 'rslora'),
                                             ('dora', 'alpha/r')])
def test_lorax_to_peft_minilm_embeddings(minilm, tmp_path, variant, scaling):
  model, params, ids, mask, names = minilm
  mlp = {'variant': variant, 'rank': 2, 'alpha': 3.0, 'scaling': scaling}
  rules = [(r'layer\d/(intermediate|output)/kernel$', mlp),
           (ATTENTION_MLP, {'variant': variant, 'rank': 4, 'alpha': 8.0, 'scaling': scaling}),
           (r'layer5/output_norm/scale$', 'full')]
  if variant == 'lora':
    rules.append((r'word_embeddings/embedding$', {'rank': 3, 'alpha': 6.0, 'scaling': scaling}))
  spec = lj.make_spec(params, rules, fn=_apply(model), args=(ids, mask))
  params, adapters = lj.init(jax.random.key(0), params, spec)
  adapters = _random_adapters(adapters, jax.random.key(1))
  ours = _jax_embed(model, params, adapters, ids, mask)
  config = lj.save_peft(str(tmp_path), adapters, spec, names, params=params)
  assert set(config) == set(peft.LoraConfig(r=1).to_dict())   # every field PEFT writes
  assert config['use_rslora'] == (scaling == 'rslora') and config['use_dora'] == (variant == 'dora')
  assert config['rank_pattern']
  assert config['modules_to_save'] == ['encoder.layer.5.output.LayerNorm']
  loaded = peft.PeftModel.from_pretrained(_hf_bert(), str(tmp_path)).eval()
  theirs = _torch_embed(loaded, ids, mask)
  base = _torch_embed(_hf_bert(), ids, mask)
  assert _rel(ours, base) > 1e-2          # the adapter changes the model...
  assert _rel(ours, theirs) < 1e-4        # ...and PEFT sees the same change
  # And back: the file read by load_peft gives the same adapters.
  spec2, adapters2 = lj.load_peft(str(tmp_path), params, names)
  np.testing.assert_allclose(_jax_embed(model, params, adapters2, ids, mask), ours, rtol=0,
                             atol=1e-5)
  got = lj.spec.spec_leaves(spec2)
  # modules_to_save holds whole modules: the LayerNorm's bias comes back as a full leaf too.
  assert set(got) == set(lj.spec.spec_leaves(spec)) | {'layer5/output_norm/bias'}
  assert {s.variant for s in got.values()} == {variant, 'full'}


@pytest.mark.slow   # the real MiniLM against PEFT per variant; the quick tier keeps the format tests
@pytest.mark.parametrize('kind', ['lora', 'rslora', 'dora'])
def test_peft_to_lorax_minilm_embeddings(minilm, tmp_path, kind):
  model, params, ids, mask, names = minilm
  torch.manual_seed(0)
  config = peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=['query', 'value', 'attention.output.dense',
                                         'intermediate.dense', 'output.dense'],
      rank_pattern={'intermediate.dense': 2}, alpha_pattern={'value': 5},
      use_rslora=kind == 'rslora', use_dora=kind == 'dora', init_lora_weights=False,
      modules_to_save=['encoder.layer.2.output.LayerNorm'])
  pm = peft.get_peft_model(_hf_bert(), config).eval()
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if 'lora_magnitude_vector' in name or 'modules_to_save' in name:
        p.mul_(1 + 0.2 * torch.randn_like(p))
  pm.save_pretrained(str(tmp_path))
  theirs = _torch_embed(pm, ids, mask)
  spec, adapters = lj.load_peft(str(tmp_path), params, names)
  specs = lj.spec.spec_leaves(spec)
  assert specs['layer0/intermediate/kernel'].rank == 2 and specs['layer0/query/kernel'].rank == 4
  assert specs['layer0/value/kernel'].alpha == 5
  assert specs['layer2/output_norm/scale'].variant == 'full'
  assert specs['layer0/query/kernel'].scaling == ('rslora' if kind == 'rslora' else 'alpha/r')
  ours = _jax_embed(model, params, adapters, ids, mask)
  assert _rel(theirs, _torch_embed(_hf_bert(), ids, mask)) > 1e-2
  assert _rel(ours, theirs) < 1e-4


@pytest.mark.slow   # a real model against transformers / PEFT
def test_merged_export_loads_in_transformers_and_here(minilm, tmp_path):
  model, params, ids, mask, names = minilm
  spec = lj.make_spec(params, [(ATTENTION_MLP, {'variant': 'dora', 'rank': 4})],
                      fn=_apply(model), args=(ids, mask))
  params, adapters = lj.init(jax.random.key(0), params, spec)
  adapters = _random_adapters(adapters, jax.random.key(2))
  merged = lj.merge(params, adapters)
  want = _jax_embed(model, merged, {}, ids, mask)
  written = lj.export_hf(str(tmp_path), merged, names, source=bert.minilm_directory())
  assert 'pooler.dense.weight' in written
  assert 'encoder.layer.0.attention.self.query.weight' in written
  assert os.path.exists(tmp_path / 'tokenizer.json')
  hf_model = transformers.AutoModel.from_pretrained(str(tmp_path)).eval()
  assert _rel(_torch_embed(hf_model, ids, mask), want) < 1e-4
  _, reloaded = bert.load_hf_bert(str(tmp_path))
  for (p, _, a), (_, _, b) in zip(lj.paths.leaves_with_paths(reloaded['params']),
                                  lj.paths.leaves_with_paths(merged)):
    np.testing.assert_array_equal(a, b, err_msg=p)


@pytest.mark.slow   # a real model against transformers / PEFT
def test_gpt2_fused_attention_both_ways(tmp_path):
  """GPT-2's fused c_attn (Conv1D): q/k/v adapters saved as one LoRA of rank r_q + r_k + r_v,
  and a PEFT c_attn adapter loaded as three adapters sharing A; `GPT2LMHeadModel` names its
  modules under `transformer.` (module_prefix)."""
  directory = os.path.join(FIXTURES, 'tiny_gpt2')
  model, variables = load_hf_gpt2(directory)
  params = variables['params']
  names = hf_mapping('gpt2', directory)
  tokens = np.load(os.path.join(directory, 'reference.npz'))['tokens']
  lm = lambda: transformers.GPT2LMHeadModel.from_pretrained(directory).eval()

  def torch_logits(m):
    with torch.no_grad():
      return m(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()

  def jax_logits(adapters):
    fn = lambda p, t: model.apply({'params': p}, t)
    return np.asarray(lj.lora(fn, strict=True)(lj.join(params, adapters), tokens))

  rules = [(r'h0/(query|value)/kernel$', {'rank': 2, 'alpha': 4.0}),
           (r'h1/(query|key|value)/kernel$', {'rank': 3, 'alpha': 3.0}),
           (r'h\d/(out|fc|proj)/kernel$', {'rank': 2, 'alpha': 2.0})]
  spec = lj.make_spec(params, rules, fn=lambda p, t: model.apply({'params': p}, t), args=(tokens,))
  params, adapters = lj.init(jax.random.key(0), params, spec)
  adapters = _random_adapters(adapters, jax.random.key(3))
  config = lj.save_peft(str(tmp_path / 'out'), adapters, spec, names, module_prefix='transformer.')
  assert config['fan_in_fan_out'] and config['rank_pattern']['transformer.h.1.attn.c_attn'] == 9
  loaded = peft.PeftModel.from_pretrained(lm(), str(tmp_path / 'out')).eval()
  ours = jax_logits(adapters)
  assert _rel(ours, torch_logits(lm())) > 1e-2
  assert _rel(ours, torch_logits(loaded)) < 1e-4
  # PEFT -> lorax: one A for query, key and value.
  torch.manual_seed(1)
  pm = peft.get_peft_model(lm(), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=['c_attn', 'c_fc'], init_lora_weights=False,
      fan_in_fan_out=True)).eval()
  pm.save_pretrained(str(tmp_path / 'in'))
  spec2, adapters2 = lj.load_peft(str(tmp_path / 'in'), params, names, module_prefix='transformer.')
  np.testing.assert_array_equal(adapters2['h0']['query']['kernel'].a,
                                adapters2['h0']['key']['kernel'].a)
  assert _rel(jax_logits(adapters2), torch_logits(pm)) < 1e-4
  assert lj.spec.spec_leaves(spec2)['h0/fc/kernel'].rank == 2


@pytest.mark.slow   # a whole Llama both ways, twice
@pytest.mark.parametrize('scan_layers', [False, True])
def test_llama_both_ways(tmp_path, scan_layers):
  """Llama (grouped-query k/v, SwiGLU): per-layer PEFT modules <-> stacked (scanned) adapters;
  PEFT's layers_to_transform leaves layers out, which the stacked leaf fills with no-op adapters."""
  directory = os.path.join(FIXTURES, 'tiny_llama')
  model, variables = load_hf_llama(directory, scan_layers=scan_layers)
  params = variables['params']
  names = hf_mapping('llama', directory, scan_layers=scan_layers)
  tokens = np.load(os.path.join(directory, 'reference.npz'))['tokens']
  causal = lambda: transformers.LlamaForCausalLM.from_pretrained(directory).eval()
  fn = lambda p, t: model.apply({'params': p}, t)

  def torch_logits(m):
    with torch.no_grad():
      return m(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()

  jax_logits = lambda a: np.asarray(lj.lora(fn, strict=True)(lj.join(params, a), tokens))
  for use_dora in (False, True):
    torch.manual_seed(2)
    pm = peft.get_peft_model(causal(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=['q_proj', 'k_proj', 'o_proj', 'down_proj'],
        rank_pattern={'down_proj': 2}, layers_to_transform=[1], use_dora=use_dora,
        init_lora_weights=False)).eval()
    out = tmp_path / f'in{use_dora}'
    pm.save_pretrained(str(out))
    spec, adapters = lj.load_peft(str(out), params, names)
    assert _rel(jax_logits(adapters), torch_logits(pm)) < 1e-4
    if scan_layers:
      a = adapters['layers']['query']['kernel'].a
      assert a.shape == (2, 32, 4) and not np.any(a[0]) and np.any(a[1])
  spec = lj.make_spec(params, [(r'(query|value|gate|up)/kernel$', {'variant': 'dora', 'rank': 3})],
                      fn=fn, args=(tokens,))
  params2, adapters = lj.init(jax.random.key(0), params, spec)
  adapters = _random_adapters(adapters, jax.random.key(4))
  lj.save_peft(str(tmp_path / 'out'), adapters, spec, names)
  loaded = peft.PeftModel.from_pretrained(causal(), str(tmp_path / 'out')).eval()
  assert _rel(jax_logits(adapters), torch_logits(loaded)) < 1e-4


@pytest.mark.slow   # a real model against transformers / PEFT
def test_vit_conv_patch_embedding_and_classifier_head(tmp_path):
  """A LoRA on the patch-embedding conv (PEFT's Conv2d: A a conv with the kernel's window, B a
  1x1 conv) and the classifier head trained fully (modules_to_save), on ViTForImageClassification;
  then the merged model exported with its config and loaded by transformers and by load_hf_vit."""
  directory = os.path.join(FIXTURES, 'tiny_vit')
  model, variables = load_hf_vit(directory)
  params = variables['params']
  names = hf_mapping('vit', directory)
  images = np.load(os.path.join(directory, 'reference.npz'))['images']
  fn = lambda p, x: model.apply({'params': p}, x)
  rules = [(r'patch_embed/kernel$', {'rank': 2, 'alpha': 2.0}), (r'^head/', 'full'),
           (r'block\d/(query|mlp1)/kernel$', {'rank': 4, 'alpha': 4.0})]
  spec = lj.make_spec(params, rules, fn=fn, args=(images,))
  params, adapters = lj.init(jax.random.key(0), params, spec)
  adapters = _random_adapters(adapters, jax.random.key(5))
  config = lj.save_peft(str(tmp_path / 'adapter'), adapters, spec, names)
  assert config['modules_to_save'] == ['classifier']
  classify = lambda: transformers.ViTForImageClassification.from_pretrained(directory).eval()
  loaded = peft.PeftModel.from_pretrained(classify(), str(tmp_path / 'adapter')).eval()
  pixels = torch.tensor(np.transpose(images, (0, 3, 1, 2)))
  with torch.no_grad():
    theirs = loaded(pixel_values=pixels).logits.numpy()
  ours = np.asarray(lj.lora(fn, strict=True)(lj.join(params, adapters), images))
  assert _rel(ours, theirs) < 1e-4
  merged = lj.merge(params, adapters)
  lj.export_hf(str(tmp_path / 'merged'), merged, names, source=directory)
  with torch.no_grad():
    exported = transformers.ViTForImageClassification.from_pretrained(
        str(tmp_path / 'merged')).eval()(pixel_values=pixels).logits.numpy()
  assert _rel(exported, np.asarray(fn(merged, images))) < 1e-4
  model2, reloaded = load_hf_vit(str(tmp_path / 'merged'))
  np.testing.assert_allclose(model2.apply(reloaded, images), fn(merged, images), atol=1e-5)


def _saved_lora(tmp_path, minilm, **rule):
  model, params, ids, mask, names = minilm
  spec = lj.make_spec(params, [(r'layer0/(query|intermediate)/kernel$', {'rank': 2, **rule})],
                      fn=_apply(model), args=(ids, mask))
  params, adapters = lj.init(jax.random.key(0), params, spec)
  lj.save_peft(str(tmp_path), adapters, spec, names)
  return params, names


def _edit_config(tmp_path, **fields):
  path = tmp_path / interop.CONFIG_NAME
  config = json.loads(path.read_text())
  config.update(fields)
  path.write_text(json.dumps(config))


def test_load_peft_refuses_bad_files(minilm, tmp_path):
  params, names = _saved_lora(tmp_path / 'ok', minilm)
  def fresh(name):
    dst = tmp_path / name
    shutil.copytree(tmp_path / 'ok', dst)
    return dst
  cases = []
  d = fresh('type')
  _edit_config(d, peft_type='LOHA')
  cases.append((d, "peft_type='LOHA' is not supported"))
  d = fresh('math')
  _edit_config(d, use_qalora=True, lora_bias=True)
  cases.append((d, 'change the math and are not supported: '
                   "{'lora_bias': True, 'use_qalora': True}"))
  d = fresh('unknown')
  _edit_config(d, shiny_new_field={'k': 1})
  cases.append((d, "unknown config fields ['shiny_new_field']"))
  d = fresh('pissa')
  _edit_config(d, init_lora_weights='pissa_niter_4')
  cases.append((d, "init_lora_weights='pissa_niter_4'"))
  d = fresh('alpha')
  _edit_config(d, lora_alpha=0)
  cases.append((d, 'adapter_config.json: lora_alpha=0 must be a finite number > 0'))
  d = fresh('rank')
  _edit_config(d, r=3)
  cases.append((d, 'tensors have rank 2, the config says 3'))
  weights = lambda d: str(d / interop.WEIGHTS_NAME)
  d = fresh('missing')
  t = hf.load_safetensors(weights(d))
  del t['base_model.model.encoder.layer.0.intermediate.dense.lora_B.weight']
  hf.save_safetensors(t, weights(d))
  cases.append((d, "encoder.layer.0.intermediate.dense: missing ['lora_B']"))
  d = fresh('shape')
  t = hf.load_safetensors(weights(d))
  t['base_model.model.encoder.layer.0.attention.self.query.lora_A.weight'] = np.ones((2, 100),
                                                                                     np.float32)
  hf.save_safetensors(t, weights(d))
  cases.append((d, 'lora_A (2, 100) / lora_B (384, 2), expected (2, 384) / (384, 2)'))
  d = fresh('notpeft')
  t = hf.load_safetensors(weights(d))
  t['decoder.layers.0.fc.lora_A.weight'] = np.ones((2, 4), np.float32)
  hf.save_safetensors(t, weights(d))
  cases.append((d, "tensors the name map does not know: ['decoder.layers.0.fc.lora_A.weight']"))
  d = fresh('misfit')   # a module the map knows, with a tensor it does not have
  t = hf.load_safetensors(weights(d))
  t['base_model.model.encoder.layer.0.output.LayerNorm.gamma'] = np.ones((384,), np.float32)
  hf.save_safetensors(t, weights(d))
  cases.append((d, "['base_model.model.encoder.layer.0.output.LayerNorm.gamma (the name map "
                   "knows other tensors of this module)']"))
  for name, bad in (('nan', np.nan), ('inf', -np.inf)):
    d = fresh(name)
    t = hf.load_safetensors(weights(d))
    key = 'base_model.model.encoder.layer.0.intermediate.dense.lora_A.weight'
    t[key] = t[key].copy()
    t[key][1, 5:8] = bad
    hf.save_safetensors(t, weights(d))
    cases.append((d, f"tensors holding NaN or inf: ['{key} (3 of {t[key].size} entries)']"))
  d = fresh('corrupt')
  raw = bytearray(open(weights(d), 'rb').read())
  raw[8:20] = b'{"broken": !'
  open(weights(d), 'wb').write(bytes(raw))
  cases.append((d, 'is not a valid safetensors file'))
  d = fresh('nofile')
  os.remove(weights(d))
  cases.append((d, 'No safetensors file at'))
  d = fresh('noconfig')
  os.remove(d / interop.CONFIG_NAME)
  cases.append((d, 'No PEFT adapter config at'))
  for directory, message in cases:
    with pytest.raises(ValueError, match=re.escape(message)):
      lj.load_peft(str(directory), params, names)
  # Bad arguments: exclude= as one string, a bad regex, a name map that is not one.
  for kwargs, message in [
      (dict(exclude='pooler'), "exclude='pooler' must be a list of regexes, not one string"),
      (dict(exclude=['pooler[']), "exclude= pattern 'pooler[' is not a valid regex"),
      (dict(name_map=3), 'A name map is a list of lorax_jax.models.hf.Entry or a {path: '
                         'module} dict; got a int: 3.')]:
    with pytest.raises(ValueError, match=re.escape(message)):
      lj.load_peft(str(tmp_path / 'ok'), params, **{'name_map': names, **kwargs})
  # A wrong module_prefix: the file has no module the map knows.
  with pytest.raises(ValueError, match=re.escape(
      "no tensor of the file belongs to a module the name map knows: ['base_model.model.encoder."
      "layer.0.attention.self.query.lora_A.weight'")):
    lj.load_peft(str(tmp_path / 'ok'), params, names, module_prefix='bert.')
  lj.load_peft(str(tmp_path / 'ok'), params, names)


def test_save_peft_refuses_what_peft_cannot_hold(minilm, tmp_path):
  model, params, ids, mask, names = minilm
  def spec_of(*rules):
    spec = lj.make_spec(params, list(rules), fn=_apply(model), args=(ids, mask))
    return (spec,) + lj.init(jax.random.key(0), params, spec)
  for variant in ('vera', 'loha', 'lokr', 'nola'):
    spec, _, adapters = spec_of((r'layer0/intermediate/kernel$', {'variant': variant, 'rank': 2}))
    with pytest.raises(ValueError, match=f"variant '{variant}', which has no PEFT LoRA format"):
      lj.save_peft(str(tmp_path), adapters, spec, names)
  spec, _, adapters = spec_of((r'layer0/intermediate/kernel$', {'rank': 2, 'init': 'pissa'}))
  with pytest.raises(ValueError, match=re.escape("initialized with 'pissa'")):
    lj.save_peft(str(tmp_path), adapters, spec, names)
  spec, _, adapters = spec_of((r'layer0/query/kernel$', {'variant': 'dora', 'rank': 2}),
                              (r'layer0/value/kernel$', {'rank': 2}))
  with pytest.raises(ValueError, match="use_dora applies to every adapted module"):
    lj.save_peft(str(tmp_path), adapters, spec, names)
  spec, _, adapters = spec_of((r'layer0/query/kernel$', {'rank': 2}))
  with pytest.raises(ValueError, match=re.escape("no Hugging Face name in the name map: "
                                                 "['layer0/query/kernel']")):
    lj.save_peft(str(tmp_path), adapters, spec, names[:3])
  with pytest.raises(ValueError, match='needs at least one LoRA or DoRA leaf'):
    lj.save_peft(str(tmp_path), adapters, spec, names, exclude=[r'layer0/query'])
  assert not os.path.exists(tmp_path / interop.WEIGHTS_NAME)
  spec, _, adapters = spec_of((r'layer0/(query|value)/kernel$', {'rank': 2}))
  for kwargs, message in [
      (dict(exclude=r'layer0/query'), "exclude='layer0/query' must be a list of regexes"),
      (dict(exclude=['layer0/(query']), "exclude= pattern 'layer0/(query' is not a valid regex"),
      (dict(directory=__file__), f'{__file__} is a file; allowed: a directory')]:
    with pytest.raises(ValueError, match=re.escape(message)):
      lj.save_peft(**{'directory': str(tmp_path), 'adapters': adapters, 'spec': spec,
                      'name_map': names, **kwargs})
  with pytest.raises(ValueError, match=re.escape(f'{__file__} is a file; allowed: a directory')):
    lj.export_hf(__file__, params, names)
  config = lj.save_peft(str(tmp_path), adapters, spec, names, exclude=[r'layer0/query'])
  assert config['target_modules'] == ['encoder.layer.0.attention.self.value']


def test_pissa_saved_through_to_lora(minilm, tmp_path):
  """A residual init (PiSSA) is saved as its rank-2r LoRA of the ORIGINAL base."""
  model, params, ids, mask, names = minilm
  spec = lj.make_spec(params, [(r'layer\d/(query|output)/kernel$', {'rank': 2, 'init': 'pissa'})],
                      fn=_apply(model), args=(ids, mask))
  residual, initial = lj.init(jax.random.key(0), params, spec)
  trained = _random_adapters(initial, jax.random.key(6))
  want = _jax_embed(model, residual, trained, ids, mask)
  converted = lj.to_lora(trained, initial)
  spec2 = jax.tree_util.tree_map(lambda a: a.spec, converted, is_leaf=lj.adapters.is_adapter)
  lj.save_peft(str(tmp_path), converted, spec2, names)
  loaded = peft.PeftModel.from_pretrained(_hf_bert(), str(tmp_path)).eval()
  assert _rel(_torch_embed(loaded, ids, mask), want) < 1e-4


@pytest.mark.slow
def test_export_of_a_training_run(tmp_path, arg='quick,init=pissa'):
  """experiments.export: a finished vit_digits run (PiSSA: converted by to_lora) -> PEFT files
  that PEFT loads onto the exported base, giving the trained model's logits; the merged export
  loads in transformers."""
  from configs import vit_digits  # pylint: disable=g-import-not-at-top
  from experiments import export, train  # pylint: disable=g-import-not-at-top
  c = vit_digits.get_config(arg)
  c.base.steps, c.base.dir = 3, str(tmp_path / 'bases')
  c.train.steps, c.train.warmup_steps, c.train.checkpoint_every = 3, 1, 3
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  written = export.export(c, str(tmp_path / 'run'), str(tmp_path / 'out'), merged=True)
  assert written['step'] == 3 and written['modules_to_save'] == ['classifier']
  task, _, params, _, adapters, _ = export.restore(c, str(tmp_path / 'run'))
  images = np.asarray(task.eval_sets['accuracy'][0][0][:4])
  want = np.asarray(lj.lora(task.model.apply)(lj.join(params, adapters), images))
  pixels = torch.tensor(np.transpose(images, (0, 3, 1, 2)))
  base = transformers.ViTForImageClassification.from_pretrained(written['base'])
  with torch.no_grad():
    got = peft.PeftModel.from_pretrained(base, written['peft']).eval()(pixel_values=pixels).logits
    merged = transformers.ViTForImageClassification.from_pretrained(written['merged']).eval()(
        pixel_values=pixels).logits
  assert _rel(got.numpy(), want) < 1e-4 and _rel(merged.numpy(), want) < 1e-4
  with pytest.raises(ValueError, match='another config or base'):
    export.restore(vit_digits.get_config('quick,rank=2'), str(tmp_path / 'run'))


def _mlp():
  """torch's `nn.Sequential(Linear(6, 7), ReLU(), Linear(7, 5))` in Flax: `(apply, params)`
  with `apply(params, x)`."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5, name='fc2')(nn.relu(nn.Dense(7, name='fc1')(x)))

  apply = lambda p, x: MLP().apply({'params': p}, x)
  return apply, MLP().init(jax.random.key(0), np.zeros((1, 6), np.float32))['params']


def test_round_trip_constant_scale_lora_fa_and_a_dict_name_map(tmp_path):
  """A `{path: module}` name map for plain Dense layers; a constant scale and LoRA-FA (saved as
  LoRA) come back with the same merged weights."""
  x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
  apply, params = _mlp()
  spec = lj.make_spec(params, [('fc1/kernel', {'rank': 3, 'alpha': 0.7, 'scaling': 'constant'}),
                               ('fc2/kernel', {'variant': 'lora_fa', 'rank': 2}),
                               ('fc2/bias', 'full')])
  params, adapters = lj.init(jax.random.key(1), params, spec)
  adapters = _random_adapters(adapters, jax.random.key(2))
  names = interop.name_map_entries({'fc1/kernel': '0', 'fc2/kernel': '2'}, params) + [
      hf.Entry('2.bias', 'fc2/bias', None, (5,))]   # torch.nn.Sequential's module names
  config = lj.save_peft(str(tmp_path), adapters, spec, names)
  alphas = {m: config['alpha_pattern'].get(m, config['lora_alpha']) for m in ('0', '2')}
  ranks = {m: config['rank_pattern'].get(m, config['r']) for m in ('0', '2')}
  assert ranks == {'0': 3, '2': 2} and alphas == {'0': pytest.approx(2.1), '2': 2}
  assert config['bias'] == 'lora_only' and not config['modules_to_save']
  spec2, adapters2 = lj.load_peft(str(tmp_path), params, names)
  for (p, _, a), (_, _, b) in zip(lj.paths.leaves_with_paths(lj.merge(params, adapters)),
                                  lj.paths.leaves_with_paths(lj.merge(params, adapters2))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=p)
  # The torch side: a Sequential with the same weights and the PEFT adapter.
  net = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5))
  with torch.no_grad():
    for i, layer in ((0, 'fc1'), (2, 'fc2')):
      net[i].weight.copy_(torch.tensor(np.asarray(params[layer]['kernel']).T))
      net[i].bias.copy_(torch.tensor(np.asarray(params[layer]['bias'])))
  loaded = peft.PeftModel.from_pretrained(net, str(tmp_path)).eval()
  with torch.no_grad():
    theirs = loaded(torch.tensor(x)).numpy()
  ours = np.asarray(lj.lora(apply)(
      lj.join(params, adapters), x))
  assert _rel(ours, theirs) < 1e-5


def test_load_peft_tree_averages_with_a_native_one(minilm, tmp_path):
  """A tree read from PEFT files and one made from (differently worded) rules have the same
  structure: `jax.tree.map` averages them, and the average runs factored (strict)."""
  model, params, ids, mask, names = minilm
  use = dict(fn=_apply(model), args=(ids, mask))
  spec = lj.make_spec(params, [(ATTENTION_MLP, {'rank': 4, 'alpha': 8.0})], **use)
  _, native = lj.init(jax.random.key(0), params, spec)
  native = _random_adapters(native, jax.random.key(1))
  lj.save_peft(str(tmp_path), _random_adapters(native, jax.random.key(2)), spec, names,
               params=params)
  _, loaded = lj.load_peft(str(tmp_path), params, names)
  setting = {'rank': 4, 'alpha': 8.0}
  spec2 = lj.make_spec(params, [(r'layer\d/(query|key|value|out)/kernel', setting),
                                (r'(intermediate|output)/kernel', setting)], **use)
  _, other = lj.init(jax.random.key(3), params, spec2)
  other = _random_adapters(other, jax.random.key(4))
  mean = jax.tree.map(lambda *xs: sum(xs) / 3, native, loaded, other)
  fn = lambda p, i, m: model.apply({'params': p}, i, m, method=model.embed)
  ours = _jax_embed(model, params, mean, ids, mask)
  ref = helpers.f64_reference(fn, params, mean, ids, mask)
  assert _rel(ours, ref) < 1e-4
  assert _rel(_jax_embed(model, params, native, ids, mask), ref) > 1e-3


def test_load_peft_skips_modules_the_name_map_does_not_know(minilm, tmp_path):
  """PEFT's `target_modules=['query', 'key', 'value', 'dense']` on BertModel also adapts
  `pooler.dense`, which the encoder's last_hidden_state does not use and the name map leaves
  out: load_peft loads the rest, with one warning naming the pooler's tensors."""
  model, params, ids, mask, names = minilm
  torch.manual_seed(3)
  pm = peft.get_peft_model(_hf_bert(), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=['query', 'key', 'value', 'dense'],
      init_lora_weights=False)).eval()
  pm.save_pretrained(str(tmp_path))
  assert 'base_model.model.pooler.dense.lora_A.weight' in hf.load_safetensors(
      str(tmp_path / interop.WEIGHTS_NAME))
  with pytest.warns(UserWarning, match=re.escape(
      "skipping 2 tensors of modules the name map does not know: "
      "['base_model.model.pooler.dense.lora_A.weight', "
      "'base_model.model.pooler.dense.lora_B.weight']")) as record:
    spec, adapters = lj.load_peft(str(tmp_path), params, names)
  assert sum('skipping' in str(w.message) for w in record) == 1
  specs = lj.spec.spec_leaves(spec)
  assert len(specs) == 6 * 6   # q, k, v, attention out, intermediate, output in 6 layers
  theirs = _torch_embed(pm, ids, mask)
  assert _rel(theirs, _torch_embed(_hf_bert(), ids, mask)) > 1e-2
  assert _rel(_jax_embed(model, params, adapters, ids, mask), theirs) < 1e-4
  # exclude= by the file's module name or by a Flax path (as save_peft's): no warning; a regex
  # that matches nothing is no error, as in save_peft.
  with warnings.catch_warnings():
    warnings.simplefilter('error', UserWarning)
    spec2, _ = lj.load_peft(str(tmp_path), params, names,
                            exclude=[r'^pooler\.dense$', r'^encoder\.layer\.1\.', r'layer0/query/',
                                     r'matches_nothing'])
  got = set(lj.spec.spec_leaves(spec2))
  assert got == {p for p in specs if not p.startswith(('layer1/', 'layer0/query/'))}
  with pytest.raises(ValueError, match='the adapter holds no tensors'):
    lj.load_peft(str(tmp_path), params, names, exclude=['.'])


def test_save_peft_with_a_dict_name_map_needs_no_params(tmp_path):
  """A `{path: module}` name map takes its shapes from the adapters: the file written without
  `params=` is the one written with it, and PEFT loads it onto the torch model."""
  x = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
  apply, params = _mlp()
  spec = lj.make_spec(params, [('fc1/kernel', {'rank': 3, 'alpha': 6.0}),
                               ('fc2/kernel', {'rank': 2, 'alpha': 2.0})])
  params, adapters = lj.init(jax.random.key(1), params, spec)
  adapters = _random_adapters(adapters, jax.random.key(2))
  names = {'fc1/kernel': '0', 'fc2/kernel': '2'}   # torch.nn.Sequential's module names
  config = lj.save_peft(str(tmp_path / 'no_params'), adapters, spec, names)
  assert config == lj.save_peft(str(tmp_path / 'params'), adapters, spec, names, params=params)
  got = hf.load_safetensors(str(tmp_path / 'no_params' / interop.WEIGHTS_NAME))
  want = hf.load_safetensors(str(tmp_path / 'params' / interop.WEIGHTS_NAME))
  assert set(got) == set(want) and got['base_model.model.0.lora_A.weight'].shape == (3, 6)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  net = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5))
  with torch.no_grad():
    for i, layer in ((0, 'fc1'), (2, 'fc2')):
      net[i].weight.copy_(torch.tensor(np.asarray(params[layer]['kernel']).T))
      net[i].bias.copy_(torch.tensor(np.asarray(params[layer]['bias'])))
  loaded = peft.PeftModel.from_pretrained(net, str(tmp_path / 'no_params')).eval()
  with torch.no_grad():
    theirs = loaded(torch.tensor(x)).numpy()
  ours = np.asarray(lj.lora(apply)(
      lj.join(params, adapters), x))
  assert _rel(ours, theirs) < 1e-5
