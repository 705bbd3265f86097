"""Calibrated initializations (LoRA-GA, EVA, CorDA): the public names of `lorax_jax.inits`'
calibration pass and per-leaf math, kept at their old place."""

from __future__ import annotations

from lorax_jax.inits.calibration import input_statistics, mean_gradients, run  # noqa: F401
from lorax_jax.inits.corda import corda  # noqa: F401
from lorax_jax.inits.eva import covariance, eva_ranks  # noqa: F401
from lorax_jax.inits.lora_ga import lora_ga  # noqa: F401

__all__ = ['corda', 'covariance', 'eva_ranks', 'input_statistics', 'lora_ga', 'mean_gradients',
           'run']
