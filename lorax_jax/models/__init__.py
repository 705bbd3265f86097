"""Reference Flax models used by the experiments, benchmarks and tests."""

from lorax_jax.models.bert import Bert, BertConfig, load_hf_bert, minilm_directory
from lorax_jax.models.cnn import ResNet, SmallCNN
from lorax_jax.models.decoder import Decoder, generate
from lorax_jax.models.vit import VIT_SIZES, NnxViT, ViT, vit_size

__all__ = ['Bert', 'BertConfig', 'Decoder', 'load_hf_bert', 'minilm_directory', 'NnxViT', 'ResNet', 'SmallCNN', 'VIT_SIZES', 'ViT', 'generate', 'vit_size']
