"""Reference Flax models used by the experiments, benchmarks and tests, their loaders for
Hugging Face safetensors checkpoints, and their Hugging Face name maps (`hf_mapping`)."""

from __future__ import annotations

from typing import Any

from lorax_jax.models import hf
from lorax_jax.models.bert import Bert, BertClassifier, BertConfig, load_hf_bert, minilm_directory
from lorax_jax.models.cnn import ResNet, SmallCNN
from lorax_jax.models.decoder import Decoder, generate, load_hf_llama
from lorax_jax.models.gpt2 import GPT2, load_hf_gpt2
from lorax_jax.models.vit import VIT_SIZES, NnxViT, ViT, ViTSize, load_hf_vit, vit_size

HF_MODELS = ('bert', 'vit', 'gpt2', 'llama')


def hf_mapping(kind: str, config: dict[str, Any] | str, **kwargs) -> list[hf.Entry]:
  """The name map between a reference model's parameters and Hugging Face names.

  Args:
    kind: `'bert'` (`BertModel`), `'vit'` (`ViTForImageClassification`), `'gpt2'` (`GPT2Model`)
      or `'llama'` (`LlamaForCausalLM`; `scan_layers=True` for the stacked decoder).
    config: the Hugging Face config.json (a dict, the file, or the checkpoint directory).

  Raises:
    ValueError: for an unknown kind.
  """
  from lorax_jax.models import bert, decoder, gpt2, vit  # pylint: disable=g-import-not-at-top
  fns = {'bert': bert.hf_mapping, 'vit': vit.hf_mapping, 'gpt2': gpt2.hf_mapping,
         'llama': decoder.hf_mapping}
  if kind not in fns:
    raise ValueError(f'Unknown model kind {kind!r}; allowed: {list(HF_MODELS)}.')
  return fns[kind](config, **kwargs)


__all__ = [
    'Bert', 'BertClassifier', 'BertConfig', 'Decoder', 'GPT2', 'HF_MODELS', 'NnxViT', 'ResNet',
    'SmallCNN', 'VIT_SIZES', 'ViT', 'ViTSize', 'generate', 'hf_mapping', 'load_hf_bert',
    'load_hf_gpt2', 'load_hf_llama', 'load_hf_vit', 'minilm_directory', 'vit_size',
]
