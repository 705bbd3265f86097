"""Vision Transformer (Dosovitskiy et al., 2021) in Flax linen and NNX, with the same parameters.

Patch embedding (a strided conv), a class token, learned position embeddings, pre-norm blocks
with multi-head attention on `DenseGeneral` kernels (query/key/value: (hidden, heads, head_dim),
out: (heads, head_dim, hidden)) and a GELU MLP, a final LayerNorm and a linear `head` on the
class token. Sizes come from `VIT_SIZES` (`'tiny'` for CPU runs up to `'B/16'`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from lorax_jax.models import attention


@dataclasses.dataclass(frozen=True)
class ViTSize:
  patch: int
  hidden: int
  depth: int
  heads: int
  mlp_dim: int


VIT_SIZES = {
    'tiny': ViTSize(patch=4, hidden=64, depth=4, heads=4, mlp_dim=128),
    'S/16': ViTSize(patch=16, hidden=384, depth=12, heads=6, mlp_dim=1536),
    'B/16': ViTSize(patch=16, hidden=768, depth=12, heads=12, mlp_dim=3072),
}


def vit_size(name: 'str | ViTSize') -> ViTSize:
  """The `ViTSize` called `name` (or `name` itself); ValueError naming the allowed ones."""
  if isinstance(name, ViTSize):
    return name
  if name not in VIT_SIZES:
    raise ValueError(f'Unknown ViT size {name!r}; allowed: {sorted(VIT_SIZES)}.')
  return VIT_SIZES[name]


class _Block(nn.Module):
  hidden: int
  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  eps: float = 1e-6
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, x):
    head_dim = self.hidden // self.heads
    h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name='norm1')(x)
    qkv = [nn.DenseGeneral((self.heads, head_dim), dtype=self.dtype, name=n)(h)
           for n in ('query', 'key', 'value')]
    o = attention.attend(*qkv, dtype=self.dtype)
    x = x + nn.DenseGeneral(self.hidden, axis=(-2, -1), dtype=self.dtype, name='out')(o)
    h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name='norm2')(x)
    h = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name='mlp1')(h),
                approximate=self.approximate_gelu)
    return x + nn.Dense(self.hidden, dtype=self.dtype, name='mlp2')(h)


class ViT(nn.Module):
  """ViT classifier (linen). Input: images (batch, height, width, channels).

  Attributes:
    num_classes: classes of the `head`.
    size: a `VIT_SIZES` name or a `ViTSize`.
    dtype: compute dtype (parameters stay float32).
    layer_norm_eps: LayerNorm epsilon (Hugging Face ViT checkpoints use 1e-12).
    approximate_gelu: tanh GELU (big_vision) or exact erf GELU (Hugging Face).
  """
  num_classes: int = 10
  size: Any = 'tiny'
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, images):
    s = vit_size(self.size)
    x = nn.Conv(s.hidden, (s.patch, s.patch), strides=(s.patch, s.patch), padding='VALID',
                dtype=self.dtype, name='patch_embed')(images)
    b = x.shape[0]
    x = x.reshape(b, -1, s.hidden)
    cls = self.param('cls_token', nn.initializers.zeros, (1, 1, s.hidden))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, s.hidden)).astype(x.dtype), x], axis=1)
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, x.shape[1], s.hidden))
    x = x + pos.astype(x.dtype)
    for i in range(s.depth):
      x = _Block(s.hidden, s.heads, s.mlp_dim, self.dtype, self.layer_norm_eps,
                 self.approximate_gelu, name=f'block{i}')(x)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='norm')(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x[:, 0])


class _NnxBlock(nnx.Module):

  def __init__(self, s: ViTSize, rngs: nnx.Rngs):
    head_dim = s.hidden // s.heads
    self.norm1 = nnx.LayerNorm(s.hidden, rngs=rngs)
    self.query = nnx.LinearGeneral(s.hidden, (s.heads, head_dim), rngs=rngs)
    self.key = nnx.LinearGeneral(s.hidden, (s.heads, head_dim), rngs=rngs)
    self.value = nnx.LinearGeneral(s.hidden, (s.heads, head_dim), rngs=rngs)
    self.out = nnx.LinearGeneral((s.heads, head_dim), s.hidden, axis=(-2, -1), rngs=rngs)
    self.norm2 = nnx.LayerNorm(s.hidden, rngs=rngs)
    self.mlp1 = nnx.Linear(s.hidden, s.mlp_dim, rngs=rngs)
    self.mlp2 = nnx.Linear(s.mlp_dim, s.hidden, rngs=rngs)

  def __call__(self, x):
    h = self.norm1(x)
    x = x + self.out(attention.attend(self.query(h), self.key(h), self.value(h)))
    return x + self.mlp2(nnx.gelu(self.mlp1(self.norm2(x))))


class NnxViT(nnx.Module):
  """The same ViT in Flax NNX (same parameter names and shapes, minus linen's `params` level).

  Args:
    num_classes: classes of the `head`.
    size: a `VIT_SIZES` name.
    image_size: input height and width (for the position embeddings).
    channels: input channels.
    rngs: NNX random streams.
  """

  def __init__(self, num_classes: int = 10, size: str = 'tiny', *, image_size: int = 16,
               channels: int = 1, rngs: nnx.Rngs):
    s = vit_size(size)
    if image_size % s.patch:
      raise ValueError(f'image_size={image_size} is not a multiple of the patch size {s.patch}.')
    self.hidden = s.hidden
    self.patch_embed = nnx.Conv(channels, s.hidden, (s.patch, s.patch),
                                strides=(s.patch, s.patch), padding='VALID', rngs=rngs)
    n = (image_size // s.patch) ** 2 + 1
    self.cls_token = nnx.Param(jnp.zeros((1, 1, s.hidden)))
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n, s.hidden)))
    for i in range(s.depth):
      setattr(self, f'block{i}', _NnxBlock(s, rngs))
    self.depth = s.depth
    self.norm = nnx.LayerNorm(s.hidden, rngs=rngs)
    self.head = nnx.Linear(s.hidden, num_classes, rngs=rngs)

  def __call__(self, images):
    x = self.patch_embed(images)
    b = x.shape[0]
    x = x.reshape(b, -1, self.hidden)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.hidden)).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
    for i in range(self.depth):
      x = getattr(self, f'block{i}')(x)
    return self.head(self.norm(x)[:, 0])


def _hf_size(c: dict[str, Any]) -> ViTSize:
  return ViTSize(patch=c['patch_size'], hidden=c['hidden_size'], depth=c['num_hidden_layers'],
                 heads=c['num_attention_heads'], mlp_dim=c['intermediate_size'])


def _hf_num_classes(c: dict[str, Any]) -> int:
  return len(c.get('id2label') or {}) or c.get('num_labels', 2)


# transformers 5 renamed ViT's modules in memory (its checkpoints keep the old names), and PEFT
# names adapters after the modules in memory.
_V5_RENAMES = ((r'\.encoder\.layer\.', '.layers.'),
               (r'attention\.attention\.query', 'attention.q_proj'),
               (r'attention\.attention\.key', 'attention.k_proj'),
               (r'attention\.attention\.value', 'attention.v_proj'),
               (r'attention\.output\.dense', 'attention.o_proj'),
               (r'\.intermediate\.dense', '.mlp.fc1'), (r'\.output\.dense', '.mlp.fc2'))


def _v5_module(module: str) -> str | None:
  import re  # pylint: disable=g-import-not-at-top
  new = module
  for pattern, repl in _V5_RENAMES:
    new = re.sub(pattern, repl, new)
  return new if new != module else None


def hf_mapping(config: dict[str, Any] | str, *, module_names: str = 'v5') -> list:
  """The name map of `ViT` to Hugging Face `ViTForImageClassification` names (a config.json
  dict or a checkpoint directory).

  Args:
    config: the Hugging Face config.
    module_names: the torch module names PEFT files use: `'v5'` (transformers 5, whose ViT has
      `vit.layers.N.attention.q_proj`, `mlp.fc1`, ...) or `'v4'` (the checkpoint names,
      `vit.encoder.layer.N.attention.attention.query`, ...). Checkpoints use the v4 names in both.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from lorax_jax.models import hf  # pylint: disable=g-import-not-at-top
  if module_names not in ('v4', 'v5'):
    raise ValueError(f"module_names={module_names!r}; allowed: 'v4', 'v5'.")
  entries = _hf_vit_entries(hf.read_config(config))
  if module_names == 'v4':
    return entries
  return [dataclasses.replace(e, peft_module=_v5_module(e.module)) for e in entries]


def _hf_vit_entries(c: dict[str, Any]) -> list:
  from lorax_jax.models import hf  # pylint: disable=g-import-not-at-top
  s = _hf_size(c)
  d, heads, head_dim = s.hidden, s.heads, s.hidden // s.heads
  channels, num_classes = c.get('num_channels', 3), _hf_num_classes(c)
  tokens = (c['image_size'] // s.patch) ** 2 + 1
  qkv = lambda w: w.T.reshape(d, heads, head_dim)
  t = lambda w: w.T
  e = [hf.Entry('vit.embeddings.cls_token', 'cls_token', None, (1, 1, d)),
       hf.Entry('vit.embeddings.position_embeddings', 'pos_embed', None, (1, tokens, d)),
       hf.Entry('vit.embeddings.patch_embeddings.projection.weight', 'patch_embed/kernel',
                lambda w: w.transpose(2, 3, 1, 0), (d, channels, s.patch, s.patch)),
       hf.Entry('vit.embeddings.patch_embeddings.projection.bias', 'patch_embed/bias', None, (d,)),
       hf.Entry('vit.layernorm.weight', 'norm/scale', None, (d,)),
       hf.Entry('vit.layernorm.bias', 'norm/bias', None, (d,)),
       hf.Entry('classifier.weight', 'head/kernel', t, (num_classes, d)),
       hf.Entry('classifier.bias', 'head/bias', None, (num_classes,))]
  for i in range(s.depth):
    p, o = f'vit.encoder.layer.{i}.', f'block{i}/'
    for n in ('query', 'key', 'value'):
      e += [hf.Entry(f'{p}attention.attention.{n}.weight', f'{o}{n}/kernel', qkv, (d, d)),
            hf.Entry(f'{p}attention.attention.{n}.bias', f'{o}{n}/bias',
                     lambda b: b.reshape(heads, head_dim), (d,))]
    e += [hf.Entry(f'{p}attention.output.dense.weight', f'{o}out/kernel',
                   lambda w: w.T.reshape(heads, head_dim, d), (d, d)),
          hf.Entry(f'{p}attention.output.dense.bias', f'{o}out/bias', None, (d,)),
          hf.Entry(f'{p}layernorm_before.weight', f'{o}norm1/scale', None, (d,)),
          hf.Entry(f'{p}layernorm_before.bias', f'{o}norm1/bias', None, (d,)),
          hf.Entry(f'{p}layernorm_after.weight', f'{o}norm2/scale', None, (d,)),
          hf.Entry(f'{p}layernorm_after.bias', f'{o}norm2/bias', None, (d,)),
          hf.Entry(f'{p}intermediate.dense.weight', f'{o}mlp1/kernel', t, (s.mlp_dim, d)),
          hf.Entry(f'{p}intermediate.dense.bias', f'{o}mlp1/bias', None, (s.mlp_dim,)),
          hf.Entry(f'{p}output.dense.weight', f'{o}mlp2/kernel', t, (d, s.mlp_dim)),
          hf.Entry(f'{p}output.dense.bias', f'{o}mlp2/bias', None, (d,))]
  return e


def hf_config(model: ViT, image_size: int, channels: int = 3) -> dict[str, Any]:
  """A Hugging Face `ViTForImageClassification` config.json for `model` (for exports)."""
  s = model.size if isinstance(model.size, ViTSize) else vit_size(model.size)
  return dict(architectures=['ViTForImageClassification'], model_type='vit',
              hidden_size=s.hidden, num_hidden_layers=s.depth, num_attention_heads=s.heads,
              intermediate_size=s.mlp_dim, patch_size=s.patch, image_size=image_size,
              num_channels=channels, layer_norm_eps=model.layer_norm_eps, qkv_bias=True,
              hidden_act='gelu_pytorch_tanh' if model.approximate_gelu else 'gelu',
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              id2label={str(i): f'LABEL_{i}' for i in range(model.num_classes)},
              label2id={f'LABEL_{i}': i for i in range(model.num_classes)})


def load_hf_vit(directory: str) -> tuple[ViT, dict[str, Any]]:
  """Loads a Hugging Face `ViTForImageClassification` directory (config.json +
  model.safetensors) into `ViT`. Inputs are NHWC images.

  Raises:
    ValueError: for an unsupported config, or listing missing/unexpected/mis-shaped tensors.
  """
  import os  # pylint: disable=g-import-not-at-top
  from lorax_jax.models import hf  # pylint: disable=g-import-not-at-top
  c = hf.read_config(directory)
  if c.get('hidden_act', 'gelu') not in ('gelu', 'gelu_pytorch_tanh'):
    raise ValueError(f"hidden_act={c['hidden_act']!r}; supported: 'gelu', 'gelu_pytorch_tanh'.")
  size = _hf_size(c)
  model = ViT(num_classes=_hf_num_classes(c), size=size,
              layer_norm_eps=c.get('layer_norm_eps', 1e-12),
              approximate_gelu=c.get('hidden_act', 'gelu') == 'gelu_pytorch_tanh')
  image = jnp.zeros((1, c['image_size'], c['image_size'], c.get('num_channels', 3)))
  abstract = jax.eval_shape(model.init, jax.random.key(0), image)['params']
  tensors = hf.load_safetensors(os.path.join(directory, 'model.safetensors'))
  params = hf.convert(tensors, hf_mapping(c), abstract, ignore=(r'^vit\.pooler\.',))
  return model, {'params': params}
