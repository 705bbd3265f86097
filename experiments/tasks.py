"""The experiment tasks `train_and_evaluate` runs: a model, where its base comes from, the
adaptation data, the loss and the evaluation sets.

  digits      a vision model (ViT, CNN, ResNet) pretrained on digits 0-4, adapted to 5-9
  docstrings  the real all-MiniLM-L6-v2 BERT classifying standard-library docstrings by package
  lm          a Llama-style decoder pretrained on standard-library code, adapted to its prose
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
import optax

from lorax_jax import data as data_lib
from lorax_jax.models import BertClassifier, Decoder, ResNet, SmallCNN, ViT, bert

TASKS = ('digits', 'docstrings', 'lm')
MODELS = {'digits': ('vit', 'cnn', 'resnet'), 'docstrings': ('minilm',), 'lm': ('decoder',)}


class Task(NamedTuple):
  """What the training loop needs to know about an experiment.

  Attributes:
    model: the Flax module.
    example: example model inputs (a tuple) for init and axis inference.
    pretrain_batch: `step -> (inputs, targets)` to pretrain the base, or None.
    load_base: `init_params -> params` for a base that comes from a checkpoint, or None.
    train_batch: `step -> (inputs, targets)` of the adaptation data.
    loss: `(outputs, targets) -> scalar`.
    metric: `(outputs, targets) -> scalar` reported on the evaluation sets.
    eval_sets: `{name: (inputs, targets)}`; the first is the adaptation target.
    identity: what determines the base (its cache key).
  """
  model: Any
  example: tuple
  pretrain_batch: Callable[[int], tuple] | None
  load_base: Callable[[Any], Any] | None
  train_batch: Callable[[int], tuple]
  loss: Callable
  metric: Callable
  eval_sets: dict[str, tuple]
  identity: dict[str, Any]


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def _check_model(config):
  if config.task not in TASKS:
    raise ValueError(f'Unknown task {config.task!r}; allowed: {list(TASKS)}.')
  if config.model.name not in MODELS[config.task]:
    raise ValueError(f'Unknown model {config.model.name!r} for task {config.task!r}; allowed: '
                     f'{list(MODELS[config.task])}.')


def _digits(config) -> Task:
  m, d = config.model, config.data
  for name in ('pretrain_classes', 'adapt_classes'):
    too_big = [c for c in d[name] if isinstance(c, int) and c >= m.num_classes]
    if too_big:
      raise ValueError(f'data.{name} has {too_big}, but model.num_classes={m.num_classes}; '
                       f'allowed: labels below model.num_classes.')
  model = {'vit': lambda: ViT(num_classes=m.num_classes, size=m.size),
           'cnn': lambda: SmallCNN(num_classes=m.num_classes),
           'resnet': lambda: ResNet(num_classes=m.num_classes)}[m.name]()
  split = lambda classes, part: data_lib.digits(classes, split=part, size=d.image_size,
                                               seed=config.seed)
  pre_x, pre_y = split(d.pretrain_classes, 'train')
  x, y = split(d.adapt_classes, 'train')
  pre = data_lib.Batches((pre_x, pre_y), d.batch_size, seed=config.seed)
  train = data_lib.Batches((x, y), d.batch_size, seed=config.seed + 1)
  as_io = lambda b: ((b[0],), b[1])
  test_x, test_y = split(d.adapt_classes, 'test')
  old_x, old_y = split(d.pretrain_classes, 'test')
  return Task(model, (x[:1],), lambda s: as_io(pre.batch(s)), None, lambda s: as_io(train.batch(s)),
              _xent, _accuracy,
              {'accuracy': ((test_x,), test_y), 'accuracy_pretrain_classes': ((old_x,), old_y)},
              dict(image_size=d.image_size, classes=list(d.pretrain_classes)))


@functools.lru_cache(maxsize=4)
def _tokenizer(max_len):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.from_file(os.path.join(bert.minilm_directory(), 'tokenizer.json'))
  tok.enable_truncation(max_len)
  tok.enable_padding(pad_id=0, pad_token='[PAD]', length=max_len)
  return tok


def _tokenize(texts, max_len):
  enc = _tokenizer(max_len).encode_batch(list(texts))
  return (np.array([e.ids for e in enc], np.int32),
          np.array([e.attention_mask for e in enc], np.int32))


def _docstrings(config) -> Task:
  d = config.data
  families = tuple(d.families)
  model = BertClassifier(bert.BertConfig.from_json(bert.minilm_directory() + '/config.json'),
                         num_classes=len(families))
  texts, y = data_lib.text.docstrings('train', families=families, per_class=d.per_class,
                                      seed=config.seed)
  ids, mask = _tokenize(texts, d.max_len)
  t_texts, t_y = data_lib.text.docstrings('test', families=families, per_class=d.per_class,
                                          seed=config.seed)
  t_ids, t_mask = _tokenize(t_texts, d.max_len)
  train = data_lib.Batches((ids, mask, y), d.batch_size, seed=config.seed + 1)

  def load_base(params):
    _, loaded = bert.load_hf_bert(bert.minilm_directory())
    return {'params': {**params['params'], 'bert': loaded['params']}}

  return Task(model, (ids[:1], mask[:1]), None, load_base,
              lambda s: (lambda b: ((b[0], b[1]), b[2]))(train.batch(s)), _xent, _accuracy,
              {'accuracy': ((t_ids, t_mask), t_y)},
              dict(weights='all-MiniLM-L6-v2', families=list(families)))


def _lm(config) -> Task:
  m, d = config.model, config.data
  model = Decoder(vocab_size=256, d_model=m.d_model, num_layers=m.num_layers,
                  num_heads=m.num_heads, mlp_dim=m.mlp_dim, num_kv_heads=m.num_kv_heads or None)
  text = data_lib.text
  code = text.stdlib_text('code', d.max_bytes)
  prose = text.stdlib_text('prose', d.max_bytes)
  pre = data_lib.Windows(text.split(code, 'train'), d.seq_len, d.batch_size, seed=config.seed)
  train = data_lib.Windows(text.split(prose, 'train'), d.seq_len, d.batch_size,
                           seed=config.seed + 1)
  as_io = lambda b: ((b[:, :-1],), b[:, 1:])

  def eval_set(data):
    w = data_lib.Windows(text.split(data, 'test'), d.seq_len, d.eval_windows, seed=12345)
    return as_io(w.batch(0))

  return Task(model, (np.zeros((1, d.seq_len), np.int32),), lambda s: as_io(pre.batch(s)), None,
              lambda s: as_io(train.batch(s)), _xent, _xent,
              {'loss': eval_set(prose), 'loss_pretrain_domain': eval_set(code)},
              dict(seq_len=d.seq_len, max_bytes=d.max_bytes))


def make_task(config) -> Task:
  """The task named by `config.task` (default 'digits').

  Raises:
    ValueError: for an unknown task, or a model the task does not support.
  """
  _check_model(config)
  return {'digits': _digits, 'docstrings': _docstrings, 'lm': _lm}[config.task](config)


__all__ = ['MODELS', 'TASKS', 'Task', 'make_task']
