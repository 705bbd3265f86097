"""conv_general_dilated: A as a conv with the kernel's window, then B as a 1x1 conv (ungrouped
convolutions; a grouped one materializes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax_jax.interpreter import axes
from lorax_jax.interpreter import base
from lorax_jax.interpreter.quantw import bind_quant
from lorax_jax.interpreter.values import LowRank, add_scaled, dropout, scale_at


def factored(eqn, invals, ctx):
  x, v = invals
  if isinstance(x, LowRank) or not isinstance(v, LowRank) or v.capture:
    return None
  p = eqn.params
  if p['feature_group_count'] != 1 or p['batch_group_count'] != 1:
    return None
  dn = p['dimension_numbers']
  o, i = dn.rhs_spec[0], dn.rhs_spec[1]
  kinds = v.kinds
  if kinds[o] != 'o' or any(k != 'i' for d, k in enumerate(kinds) if d != o):
    return None
  y = bind_quant(eqn, [x, v.w])
  dtype = v.w.dtype
  a_k = jnp.swapaxes(v.a, o, -1)[..., 0].astype(dtype)   # out-feature position holds r
  b_k = jnp.swapaxes(v.b, i, -1)[..., 0].astype(dtype)   # in-feature position holds r; 1x1
  nsp = len(dn.rhs_spec) - 2
  x = dropout(x, v.dropout, ctx)
  common = dict(dimension_numbers=dn, precision=p.get('precision'),
                preferred_element_type=p.get('preferred_element_type'))
  t = jax.lax.conv_general_dilated(x, a_k, p['window_strides'], p['padding'], p['lhs_dilation'],
                                   p['rhs_dilation'], **common).astype(dtype)
  d = jax.lax.conv_general_dilated(t, b_k, (1,) * nsp, [(0, 0)] * nsp, (1,) * nsp, (1,) * nsp,
                                   **common)
  return [scale_at(add_scaled(y, d, v.scale), v, [dn.out_spec[1]])]


def infer(eqn, ins, usage):
  """The kernel's output-feature axis is the out-axis, the others (window, input) in-axes."""
  if ins[1] is not None:
    path, ax = ins[1]
    o = eqn.params['dimension_numbers'].rhs_spec[0]
    usage.record(path, set(), axes.origins(ax, [d for d in range(len(ax)) if d != o]),
                 axes.origins(ax, [o]))
  return None


base.register(base.PrimitiveRule('conv_general_dilated', factored=factored, infer=infer))
