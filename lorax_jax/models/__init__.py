"""Reference Flax models used by the experiments, benchmarks and tests."""

from lorax_jax.models.bert import Bert, BertConfig, load_hf_bert, minilm_directory
from lorax_jax.models.cnn import ResNet, SmallCNN
from lorax_jax.models.gpt2 import GPT2, load_hf_gpt2
from lorax_jax.models.decoder import Decoder, generate, load_hf_llama
from lorax_jax.models.vit import VIT_SIZES, NnxViT, ViT, ViTSize, load_hf_vit, vit_size

__all__ = ['GPT2', 'load_hf_gpt2', 'Bert', 'BertConfig', 'Decoder', 'load_hf_bert', 'minilm_directory', 'load_hf_llama', 'load_hf_vit', 'ViTSize', 'NnxViT', 'ResNet', 'SmallCNN', 'VIT_SIZES', 'ViT', 'generate', 'vit_size']
