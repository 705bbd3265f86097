"""lorax_jax: low-rank adaptation for JAX and Flax as pure functions over two pytrees.

    spec = make_spec(params, rules)                 # select
    params, adapters = init(key, params, spec)      # create
    y = lora(apply)(join(params, adapters), x)      # run, factored
    merged = merge(params, adapters)                # export
"""

from lorax_jax import adapters, paths, variants  # noqa: F401  (modules: lj.paths, ...)
from lorax_jax.adapters import Adapted, count_params, init, join, merge, split, unmerge
from lorax_jax.interpreter import MaterializeError, MaterializeWarning, lora
from lorax_jax.spec import LeafSpec, Rule, dense_kernels, make_spec, summary
from lorax_jax.training import labels, make_train_step, optimizer
from lorax_jax.usage import infer_axes
from lorax_jax.variants import (DoraParams, Factored, FullParams, LohaParams, LokrParams,
                                LoraFaParams, LoraParams, LoraXsParams, NolaParams,
                                TiedLoraParams, Variant, VeraParams, register)

__version__ = '0.1.0'

__all__ = [
    'Adapted',
    'DoraParams',
    'Factored',
    'FullParams',
    'LeafSpec',
    'LohaParams',
    'LokrParams',
    'LoraFaParams',
    'LoraParams',
    'LoraXsParams',
    'MaterializeError',
    'MaterializeWarning',
    'NolaParams',
    'Rule',
    'TiedLoraParams',
    'Variant',
    'VeraParams',
    'count_params',
    'dense_kernels',
    'infer_axes',
    'init',
    'join',
    'labels',
    'lora',
    'make_spec',
    'make_train_step',
    'merge',
    'optimizer',
    'register',
    'split',
    'summary',
    'unmerge',
]
