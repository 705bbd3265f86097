"""Quantized frozen bases: NF4 (QLoRA) with double quantization, int4 blockwise, int8 per channel.

A `QuantizedArray` stands in for a base leaf in the parameter tree. `lora(fn)` dequantizes it on
use, inside the compiled function, to the leaf's original dtype (never stored dequantized, never
differentiated); adapters on top of it work as on a float base (QLoRA):

>>> qparams = quantize(params, [(r'kernel$', 'nf4')])                # doctest: +SKIP
>>> spec = make_spec(qparams, [(r'kernel$', {'rank': 8})])          # doctest: +SKIP
>>> qparams, adapters = init(key, qparams, spec)                    # doctest: +SKIP
>>> y = lora(model.apply)(join(qparams, adapters), x)               # doctest: +SKIP

Layout of the package:
  base       `QuantizedArray`, the `Format` protocol (encode/decode, settings and their
             validation, which axes may be sliced, which leaf axes each stored array follows)
             and the registry (`register`, `get`, `names`)
  blockwise  the 4-bit blockwise storage NF4 and int4 share (packing, absmax blocks, double
             quantization of the block scales)
  nf4, int4, int8   one module per format (its storage is documented there)
  api        the tree-level functions over any registered format: `quantize`, `dequantize`,
             `quantize_array`, `dequantize_array`, `requantize_like`, `resolve_setting`,
             `quant_setting`, and `slice_leading` / `scannable` / `unstack` / `layout` for the
             interpreter and sharding

The first `stack_axes` axes of a blockwise leaf (a scanned kernel's layer axis), and every
non-reduced axis of an int8 leaf, are stored separately, so a stacked kernel is sliced per layer
inside a scan, and a sharded base shards its stored arrays on the leaf's mesh axes (`layout`).
`quantize(params, spec)` takes `stack_axes` (int8: `axes`) from the spec.

A new format is one module with a `Format` subclass and one `register` line below. For example
an fp8 (e4m3) format with a per-channel scale would be `lorax_jax/quant/fp8.py`:

    class Fp8(Format):
      name, keys, defaults = 'fp8', ('axes',), dict(block_size=0, dq_block_size=0)
      def resolve(self, s, path, shape): ...  # validate `axes`, fill in base.FIELDS
      def encode(self, x, like):              # amax / 448 per channel -> float8_e4m3fn codes
        step = ...
        return dataclasses.replace(like, codes=(x / step).astype(jnp.float8_e4m3fn), scales=step)
      def decode(self, q): return q.codes.astype(jnp.float32) * q.scales
      ...                                     # settings, for_kernel, sliceable, unstack, layout
    FORMAT = Fp8()

plus `register(fp8.FORMAT)` here; `quantize(params, rules, type='fp8')`, `lora`, sharding,
`merge(..., requantize=True)` and LoftQ then take it with no other change.
"""

from lorax_jax.quant import api, base, blockwise, int4, int8, nf4  # noqa: F401
from lorax_jax.quant.api import (DEFAULT_TYPE, dequantize, dequantize_array, layout, quant_setting,
                                 quantize, quantize_array, requantize_like, resolve_setting,
                                 scannable, slice_leading, unstack)
from lorax_jax.quant.base import (Format, QuantizedArray, get, is_quantized, names, register,
                                  setting_keys)
from lorax_jax.quant.nf4 import nf4_code_book

register(nf4.FORMAT)
register(int4.FORMAT)
register(int8.FORMAT)

__all__ = [
    'DEFAULT_TYPE', 'Format', 'QuantizedArray', 'dequantize', 'dequantize_array', 'get',
    'is_quantized', 'layout', 'names', 'nf4_code_book', 'quant_setting', 'quantize',
    'quantize_array', 'register', 'requantize_like', 'resolve_setting', 'scannable',
    'setting_keys', 'slice_leading', 'unstack',
]
