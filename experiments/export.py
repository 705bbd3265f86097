"""Export a finished (or interrupted) run's adapters as Hugging Face PEFT files.

    python -m experiments.export --config configs/vit_digits.py:quick --workdir /tmp/run \
        --out /tmp/run/export [--merged]

`--config` and `--workdir` are those of `experiments.train`, with the same defaults: with no
flags it exports the README's main job. Orbax checkpoints stay the native format; this reads the
run's latest checkpoint, which describes itself (spec, initial adapters, shapes: nothing of the
setup is replayed but obtaining the frozen base; the config must be the run's: the checkpoint's
digest is checked) and writes under `--out` (default WORKDIR/export):

  peft/     adapter_config.json + adapter_model.safetensors, for
            `peft.PeftModel.from_pretrained(hf_model, out/peft)` (and `lorax_jax.load_peft`)
  base/     the base model as a Hugging Face checkpoint, when it is not a published one (the
            digits ViT and the LM decoder are pretrained here; MiniLM is all-MiniLM-L6-v2)
  merged/   with --merged: the adapted model merged (W + dW) as a Hugging Face checkpoint

Model naming: ViT -> `ViTForImageClassification`, the decoder -> `LlamaForCausalLM`, MiniLM ->
`BertModel` (its mean-pooling head has no Hugging Face module and stays out of the PEFT file).
Adapters trained from a residual init (PiSSA, OLoRA, ...) are written as their rank-2r LoRA of
the original base (`lorax_jax.to_lora`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from absl import flags
import jax

import lorax_jax as lj
from lorax_jax import checkpoints as ckpt_lib
from lorax_jax.models import bert, decoder, hf, vit

from experiments import cli
from experiments import tasks
from experiments import train

MINILM_ID = 'sentence-transformers/all-MiniLM-L6-v2'


def name_map(config, task: tasks.Task) -> tuple[list[hf.Entry], dict[str, Any]]:
  """The run's Hugging Face name map and how to export it: `(entries, info)` with `info` keys
  `config` (a config.json for the base, or None), `source` (a published checkpoint directory,
  or None), `exclude` (adapter paths with no HF module) and `base_id`.

  Raises:
    ValueError: for a model with no Hugging Face counterpart.
  """
  model = task.model
  if config.task == 'digits' and config.model.name == 'vit':
    image = task.example[0]
    hf_config = vit.hf_config(model, image_size=image.shape[1], channels=image.shape[-1])
    return (hf.prefixed(vit.hf_mapping(hf_config), path='params/'),
            dict(config=hf_config, source=None, exclude=(), base_id=None))
  if config.task == 'lm':
    hf_config = decoder.hf_config(model)
    return (hf.prefixed(decoder.hf_mapping(hf_config, scan_layers=model.scan_layers),
                        path='params/'),
            dict(config=hf_config, source=None, exclude=(), base_id=None))
  if config.task == 'docstrings':
    return (hf.prefixed(bert.hf_mapping(bert.minilm_directory()), path='params/bert/'),
            dict(config=None, source=bert.minilm_directory(), exclude=(r'^params/head/',),
                 base_id=MINILM_ID))
  raise ValueError(f'Model {config.model.name!r} of task {config.task!r} has no Hugging Face '
                   "counterpart to export to; supported: 'vit' (digits), 'minilm' (docstrings), "
                   "'decoder' (lm).")


def restore(config, workdir: str):
  """The run's base, spec and latest adapters:
  `(task, base, params, spec, adapters, step)`, with `base` the original base (the
  trained one for dynamics that change it: ReLoRA, COLA, Delta-LoRA) and `params` the one the
  returned adapters apply to (the original base for adapters converted from a residual init,
  else the trained-on base, e.g. an NF4-quantized one).

  Everything but the frozen base comes from the checkpoint itself (`lorax_jax.checkpoints`):
  the spec, the initial adapters, the base changes of the init and the adapters' shapes;
  selection, inits and calibration are not re-run.

  Raises:
    ValueError: if `workdir` has no checkpoint, or one of another config or base.
  """
  task = tasks.make_task(config)
  base, base_path, _ = train.obtain_base(config, task)
  dyn = train.make_dynamics(config)
  changes_base = dyn is not None and dyn.changes_base
  with ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints')) as ckpts:
    meta = ckpts.latest_metadata()
    if meta is None:
      raise ValueError(f'No checkpoint in {ckpts.directory}: train first '
                       '(python -m experiments.train --config ... --workdir ...).')
    train.check_metadata(meta, train.checkpoint_metadata(config, base_path), ckpts.directory,
                         "Pass the run's --config.")
    spec, params, initial, _ = train.restore_setup(config, base, ckpts)
    # Adapters a dynamics resized (SoRA) restore into their stored shapes; a base it changed
    # (ReLoRA, COLA, Delta-LoRA) is part of the checkpoint.
    step, run, _ = ckpts.restore_run(
        lambda adapters, meta: {'params': ckpt_lib.abstract(params)},
        items=('adapters', 'params') if changes_base else ('adapters',))
  if changes_base:
    base = params = run.params
  residual = any(lj.inits.get(s.init).residual for s in lj.spec.spec_leaves(spec).values())
  adapters = lj.to_lora(run.adapters, initial)
  spec = jax.tree_util.tree_map(lambda a: a.spec, adapters, is_leaf=lj.adapters.is_adapter)
  # Converted adapters belong to the original base; the others to the trained-on (e.g. NF4) one.
  return task, base, base if residual else params, spec, adapters, step


def export(config, workdir: str, out: str, *, merged: bool = False) -> dict[str, Any]:
  """Writes the run's PEFT adapter (and the base, and the merged model) under `out`."""
  if config.method != 'lora':
    raise ValueError(f"method={config.method!r}: only 'lora' runs have adapters to export.")
  task, base, params, spec, adapters, step = restore(config, workdir)
  dyn = train.make_dynamics(config)
  base_changed = dyn is not None and dyn.changes_base
  names, info = name_map(config, task)
  peft_config = lj.save_peft(os.path.join(out, 'peft'), adapters, spec, names, params=base,
                             exclude=info['exclude'], base_model_name_or_path=info['base_id'])
  written = dict(step=step, peft=os.path.join(out, 'peft'),
                 target_modules=len(peft_config['target_modules']),
                 modules_to_save=peft_config['modules_to_save'],
                 left_out=sorted(p for p in lj.spec.spec_leaves(spec)
                                 if any(re.search(rx, p)
                                        for rx in info['exclude'])))
  if info['source'] is None or base_changed:   # a base trained here (or changed by training)
    lj.export_hf(os.path.join(out, 'base'), base, names, config=info['config'],
                 source=info['source'])
    written['base'] = os.path.join(out, 'base')
  if merged:
    lj.export_hf(os.path.join(out, 'merged'), lj.merge(params, adapters), names,
                 config=info['config'], source=info['source'])
    written['merged'] = os.path.join(out, 'merged')
  with open(os.path.join(out, 'export.json'), 'w') as f:
    json.dump(written, f, indent=2)
  return written


def main(argv):
  del argv
  f = flags.FLAGS
  out = f.out or os.path.join(f.workdir, 'export')
  written = export(f.config, f.workdir, out, merged=f.merged)
  print(json.dumps(written, indent=2))


if __name__ == '__main__':
  # --config and --workdir are experiments.train's flags (same defaults: the README's main job).
  flags.DEFINE_string('out', None, 'Output directory (default: WORKDIR/export).')
  flags.DEFINE_bool('merged', False, 'Also write the merged model.')
  cli.run(main, config_flags=('config',))
