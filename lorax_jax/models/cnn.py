"""Small convolutional classifiers (conv LoRA gets exercised in real training)."""

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


class _ResBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    groups = min(8, self.features)
    h = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False, name='conv1')(x)
    h = nn.relu(nn.GroupNorm(num_groups=groups, name='norm1')(h))
    h = nn.Conv(self.features, (3, 3), use_bias=False, name='conv2')(h)
    h = nn.GroupNorm(num_groups=groups, name='norm2')(h)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False,
                  name='shortcut')(x)
    return nn.relu(x + h)


class ResNet(nn.Module):
  """A small ResNet: a 3x3 stem, stages of residual blocks (GroupNorm, so no mutable batch
  statistics), global average pooling and a linear `head`.

  Attributes:
    num_classes: output classes.
    stages: channels of each stage; every stage after the first halves the resolution.
    blocks: residual blocks per stage.
  """
  num_classes: int = 10
  stages: Sequence[int] = (16, 32)
  blocks: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = nn.relu(nn.Conv(self.stages[0], (3, 3), use_bias=False, name='stem')(x))
    for s, features in enumerate(self.stages):
      for b in range(self.blocks):
        x = _ResBlock(features, strides=2 if (s > 0 and b == 0) else 1,
                      name=f'stage{s}_block{b}')(x)
    return nn.Dense(self.num_classes, name='head')(jnp.mean(x, axis=(1, 2)))
