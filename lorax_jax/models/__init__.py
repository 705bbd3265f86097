"""Reference Flax models used by the experiments, benchmarks and tests, and their loaders for
Hugging Face safetensors checkpoints."""

from lorax_jax.models.bert import Bert, BertClassifier, BertConfig, load_hf_bert, minilm_directory
from lorax_jax.models.cnn import ResNet, SmallCNN
from lorax_jax.models.decoder import Decoder, generate, load_hf_llama
from lorax_jax.models.gpt2 import GPT2, load_hf_gpt2
from lorax_jax.models.vit import VIT_SIZES, NnxViT, ViT, ViTSize, load_hf_vit, vit_size

__all__ = [
    'Bert', 'BertClassifier', 'BertConfig', 'Decoder', 'GPT2', 'NnxViT', 'ResNet', 'SmallCNN',
    'VIT_SIZES', 'ViT', 'ViTSize', 'generate', 'load_hf_bert', 'load_hf_gpt2', 'load_hf_llama',
    'load_hf_vit', 'minilm_directory', 'vit_size',
]
