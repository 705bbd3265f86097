"""Hugging Face PEFT adapters in and out, and merged Hugging Face exports.

    save_peft(directory, adapters, spec, name_map)          # adapter_config.json + safetensors
    spec, adapters = load_peft(directory, params, name_map)
    export_hf(directory, merge(params, adapters), name_map)  # model.safetensors, HF names

A name map is the model's list of `hf.Entry` (`lorax_jax.models.hf_mapping('bert', config)`, or a
model module's `hf_mapping`), the same one its Hugging Face loader uses; a plain
`{path: hf_module}` dict also works for 2-D `(in, out)` kernels of `nn.Linear` layers. Each
entry's transform says which axis of the Hugging Face weight every kernel axis comes from, so
the layouts follow: PEFT's `lora_A.weight` is `(r, in)` and `lora_B.weight` `(out, r)` (for
GPT-2's `Conv1D` too), embeddings have `lora_embedding_A` `(r, num)` and `lora_embedding_B`
`(dim, r)`, multi-axis attention kernels flatten their in- and out-axes in the order of the HF
weight, stacked (scanned) leaves hold one HF module per layer, and fused modules (GPT-2's
`c_attn`, one Conv1D for query/key/value) hold their members' adapters side by side: a rank
`r_q + r_k + r_v` LoRA with block-diagonal B on save, and one A shared by the members on load.

What maps to what:
  variant `lora` (and `lora_fa`, whose A is frozen)  PEFT LoRA; `scaling='rslora'` ->
                                                  `use_rslora`, other scales by `alpha_pattern`
  variant `dora`                                  `use_dora` + `lora_magnitude_vector`
  `full` leaves                                   `modules_to_save` (whole modules)
  ranks / alphas that differ per module           `rank_pattern` / `alpha_pattern`
Everything else (VeRA, LoHa, LoKr, ... and adapters against a residual base: PiSSA, OLoRA,
LoRA-GA, CorDA, LoftQ, unless converted with `to_lora`) is refused with a `ValueError`.

On load, modules of the file that the name map does not know (BertModel's `pooler.dense`, which
PEFT adapts for `target_modules=['dense', ...]`) are skipped with one warning naming their
tensors; modules it knows must fit. `exclude=` (regexes over module names or paths, as
`save_peft`'s) leaves modules out silently; NaN or inf tensors are refused by name.

Layout of the package:
  schema     file and tensor names, the PEFT config fields and defaults, what `load_peft`
             refuses (`read_peft_config`), rank/alpha patterns, the config `save_peft` writes
  hf_layout  the name map and the permutations between kernels and Hugging Face weights
  codecs     per variant: LoRA (`lora`, `lora_fa`) and DoRA tensors in and out
  full       `full` leaves as `modules_to_save` and `bias='lora_only'`
  save, load, export   `save_peft`, `load_peft`, `export_hf`
"""

from lorax_jax.interop import codecs, export, full, hf_layout, load, save, schema  # noqa: F401
from lorax_jax.interop.export import export_hf
from lorax_jax.interop.hf_layout import layout, name_map_entries
from lorax_jax.interop.load import load_peft
from lorax_jax.interop.save import LORA_VARIANTS, save_peft
from lorax_jax.interop.schema import (CONFIG_NAME, LORA_DEFAULTS, PEFT_FORMAT_VERSION,
                                      PREFIX, UNSUPPORTED, WEIGHTS_NAME,
                                      read_peft_config)

__all__ = ['CONFIG_NAME', 'LORA_DEFAULTS', 'LORA_VARIANTS', 'PEFT_FORMAT_VERSION',
           'PREFIX', 'UNSUPPORTED', 'WEIGHTS_NAME', 'export_hf', 'layout',
           'load_peft', 'name_map_entries', 'read_peft_config', 'save_peft']
