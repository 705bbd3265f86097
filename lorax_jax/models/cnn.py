"""A small convolutional classifier (conv LoRA gets exercised in real training)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class SmallCNN(nn.Module):
  """Conv(3x3) blocks with ReLU, global flatten, a hidden Dense layer and a `head`.

  Attributes:
    num_classes: output classes.
    features: channels of each conv block.
    hidden: width of the hidden Dense layer.
  """
  num_classes: int = 10
  features: Sequence[int] = (16, 32)
  hidden: int = 128

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i, f in enumerate(self.features):
      x = nn.relu(nn.Conv(f, (3, 3), name=f'conv{i}')(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name='dense')(x))
    return nn.Dense(self.num_classes, name='head')(x)
