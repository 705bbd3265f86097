"""conv_general_dilated: A as a conv with the kernel's window, then B as a 1x1 conv.

A kernel of a grouped convolution (`feature_group_count=G`, depthwise when G is the number of
input features) stores each output feature's weights over its group's I = in / G inputs, and its
adapter factors the stored kernel as it is (A over the window and the I inputs, B over the
outputs), so `merge` is W + s A @ B in the kernel's own layout. The factored form is the same
product group by group: A (shared by the groups) as a grouped conv whose kernel is A tiled G
times (G * r features), then B as a 1x1 grouped conv, group g's outputs reading group g's r
features; dW restricted to group g's outputs is A @ B_g. A batch-grouped convolution
(`batch_group_count > 1`, the kernel gradient of a grouped conv) materializes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorax_jax.interpreter import axes
from lorax_jax.interpreter import base
from lorax_jax.interpreter.quantw import bind_quant
from lorax_jax.interpreter.values import LowRank, add_side, dropout, scale_at, scaled


def factored(eqn, invals, ctx):
  x, v = invals
  if isinstance(x, LowRank):
    return base.decline('the adapted kernel is the input (lhs) of the convolution')
  if not isinstance(v, LowRank) or v.capture:
    return None
  if v.n_adapters:
    return base.decline('a convolution has no mixed-adapter rule yet')
  p = eqn.params
  if p['batch_group_count'] != 1:
    return base.decline(f"batch_group_count={p['batch_group_count']} has no factored rule")
  groups = p['feature_group_count']
  dn = p['dimension_numbers']
  o, i = dn.rhs_spec[0], dn.rhs_spec[1]
  kinds = v.kinds
  if kinds[o] != 'o' or any(k != 'i' for d, k in enumerate(kinds) if d != o):
    return base.decline(f'the kernel axes are {kinds} (i: in, o: out, b: batch); the factored '
                        f'rule needs the output-feature axis {o} as the only out-axis')
  y = bind_quant(eqn, [x, v.w])
  dtype = v.w.dtype
  a_k = jnp.swapaxes(v.a, o, -1)[..., 0].astype(dtype)   # out-feature position holds r
  b_k = jnp.swapaxes(v.b, i, -1)[..., 0].astype(dtype)   # in-feature position holds r; 1x1
  if groups != 1:
    a_k = jnp.concatenate([a_k] * groups, axis=o)        # group g's features g*r .. g*r + r-1
  nsp = len(dn.rhs_spec) - 2
  x = dropout(x, v.dropout, ctx)
  common = dict(dimension_numbers=dn, feature_group_count=groups, precision=p.get('precision'),
                preferred_element_type=p.get('preferred_element_type'))
  t = jax.lax.conv_general_dilated(x, a_k, p['window_strides'], p['padding'], p['lhs_dilation'],
                                   p['rhs_dilation'], **common).astype(dtype)
  d = jax.lax.conv_general_dilated(scaled(t, v.scale), b_k, (1,) * nsp, [(0, 0)] * nsp,
                                   (1,) * nsp, (1,) * nsp, **common)
  return [scale_at(add_side(y, d), v, [dn.out_spec[1]])]


def infer(eqn, ins, usage):
  """The kernel's output-feature axis is the out-axis, the others (window, input) in-axes."""
  if ins[1] is not None:
    path, ax = ins[1]
    o = eqn.params['dimension_numbers'].rhs_spec[0]
    usage.record(path, set(), axes.origins(ax, [d for d in range(len(ax)) if d != o]),
                 axes.origins(ax, [o]))
  return None


base.register(base.PrimitiveRule('conv_general_dilated', factored=factored, infer=infer))
