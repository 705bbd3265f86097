"""Reference Flax models used by the experiments, benchmarks and tests."""

from lorax_jax.models.cnn import SmallCNN
from lorax_jax.models.decoder import Decoder

__all__ = ['Decoder', 'SmallCNN']
