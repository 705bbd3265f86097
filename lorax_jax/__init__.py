"""lorax_jax: low-rank adaptation for JAX and Flax as pure functions over two pytrees.

    spec = make_spec(params, rules)                 # select
    params, adapters = init(key, params, spec)      # create
    y = lora(apply)(join(params, adapters), x)      # run, factored
    merged = merge(params, adapters)                # export
    one = combine([a1, a2], [0.7, 0.3], 'ties_svd', density=0.5)   # PEFT's add_weighted_adapter
    y = lora(apply)(join(params, stack_adapters([a1, a2])), x, adapter_ids=ids)  # mixed batch
    save_peft(dir, adapters, spec, name_map)        # Hugging Face PEFT files (and load_peft)

    qparams = quantize(params, spec)                # QLoRA: an NF4 base, dequantized on use
    step = make_train_step(loss_fn, tx)             # the one train step, over a TrainState
    state, loss = step(init_state(params, adapters, tx), batch, rng)
    dyn = dynamics.relora(period=200, total_steps=1000)   # AdaLoRA, DyLoRA, SoRA, ReLoRA,
    step = make_train_step(loss_fn, tx, dyn)        # COLA, Delta-LoRA: hooks in that step
"""

from lorax_jax import adapters, calibration, dynamics, inits, interop, merging, paths  # noqa: F401
from lorax_jax import quant  # noqa: F401
from lorax_jax import variants  # noqa: F401
from lorax_jax.adapters import (Adapted, count_params, init, join, merge, num_stacked,
                                replace_adapter, split, stack_adapters, to_lora, unmerge,
                                unstack_adapters)
from lorax_jax.interop import export_hf, load_peft, save_peft
from lorax_jax.interpreter import MaterializeError, MaterializeWarning, lora
from lorax_jax.merging import combine, factorize, lorahub, merge_deltas
from lorax_jax.quant import QuantizedArray, dequantize, quantize
from lorax_jax.spec import AxesAssumedWarning, LeafSpec, Rule, dense_kernels, make_spec, summary
from lorax_jax.training import (Dynamics, TrainState, init_state, labels, make_train_step,
                                optimizer)
from lorax_jax.usage import infer_axes
from lorax_jax.variants import (AdaloraParams, DoraParams, Factored, FullParams, LohaParams,
                                LokrParams, LoraFaParams, LoraParams, LoraXsParams, NolaParams,
                                SoraParams, TiedLoraParams, Variant, VeraParams, register)

__version__ = '0.1.0'

__all__ = [
    'AdaloraParams',
    'Adapted',
    'AxesAssumedWarning',
    'DoraParams',
    'Dynamics',
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
    'QuantizedArray',
    'Rule',
    'SoraParams',
    'TiedLoraParams',
    'TrainState',
    'Variant',
    'VeraParams',
    'combine',
    'count_params',
    'dense_kernels',
    'dequantize',
    'export_hf',
    'factorize',
    'infer_axes',
    'init',
    'init_state',
    'join',
    'labels',
    'load_peft',
    'lora',
    'lorahub',
    'make_spec',
    'make_train_step',
    'merge',
    'merge_deltas',
    'num_stacked',
    'optimizer',
    'quantize',
    'register',
    'replace_adapter',
    'save_peft',
    'split',
    'stack_adapters',
    'summary',
    'to_lora',
    'unmerge',
    'unstack_adapters',
]
