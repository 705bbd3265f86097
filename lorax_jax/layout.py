"""Adapter factor layouts and the low-rank product.

Canonical layout (what adapter trees store), for a kernel W whose axes are split into batch
(stacked), in and out axes:
  A: batch_shape + in_shape + (r,)       e.g. (d_in, r) for a 2-D kernel
  B: batch_shape + (r,) + out_shape      e.g. (r, d_out)

Broadcast layout (what the interpreter carries while it follows W through transposes and
reshapes): both factors have W's rank plus a trailing r axis, in W's axis order, with size 1 on
the axes they do not span (A on out axes, B on in axes), so that
  dW[idx] = sum_r A[idx, r] * B[idx, r]     (with broadcasting).
Every op that only permutes, regroups or slices W's axes acts on A and B the same way.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def to_broadcast(a, b, kinds: Sequence[str]):
  """Canonical (A, B) -> broadcast layout, for a kernel whose axes have `kinds` ('b','i','o')."""
  n = len(kinds)
  batch = [d for d in range(n) if kinds[d] == 'b']
  ins = [d for d in range(n) if kinds[d] == 'i']
  outs = [d for d in range(n) if kinds[d] == 'o']
  # A's canonical axes are W axes batch + ins, then r; sort them into W order.
  a_pos = batch + ins
  a = jnp.transpose(a, list(np.argsort(a_pos)) + [len(a_pos)])
  a = jnp.expand_dims(a, outs) if outs else a
  nb = len(batch)
  b = jnp.moveaxis(b, nb, -1)  # batch + out + (r,)
  b_pos = batch + outs
  b = jnp.transpose(b, list(np.argsort(b_pos)) + [len(b_pos)])
  b = jnp.expand_dims(b, ins) if ins else b
  return a, b


def scale_to_broadcast(g, kinds: Sequence[str]):
  """A per-output-unit scale (batch + out shape, canonical) -> B-like broadcast layout (r = 1)."""
  nb = sum(k == 'b' for k in kinds)
  g = jnp.expand_dims(g, nb)
  dummy = jnp.zeros((1,) * (sum(k == 'i' for k in kinds) + nb) + (1,), g.dtype)
  return to_broadcast(dummy, g, kinds)[1]


def squeeze_in(g, kinds: Sequence[str]):
  """A broadcast-layout scale (W rank + trailing 1) -> its non-in axes in W order."""
  ins = tuple(d for d, k in enumerate(kinds) if k == 'i')
  return jnp.squeeze(g, ins + (len(kinds),))


def product(a, b, kinds: Sequence[str], dtype=None):
  """sum_r A * B in W's layout from broadcast-layout factors, as one batched matmul."""
  n = len(kinds)
  dtype = dtype or jnp.result_type(a, b)
  a = a.astype(dtype)
  b = b.astype(dtype)
  outs = tuple(d for d in range(n) if kinds[d] == 'o')
  ins = tuple(d for d in range(n) if kinds[d] == 'i')
  a_sq = jnp.squeeze(a, outs) if outs else a   # non-out axes in W order, r
  b_sq = jnp.squeeze(b, ins) if ins else b     # non-in axes in W order, r
  a_axes = [d for d in range(n) if d not in outs]
  b_axes = [d for d in range(n) if d not in ins]
  batch = [d for d in range(n) if kinds[d] == 'b']
  dims = (([a_sq.ndim - 1], [b_sq.ndim - 1]),
          ([a_axes.index(d) for d in batch], [b_axes.index(d) for d in batch]))
  out = jax.lax.dot_general(a_sq, b_sq, dims)
  # out axes: batch, A's free (ins, W order), B's free (outs, W order)
  order = batch + [d for d in a_axes if d not in batch] + [d for d in b_axes if d not in batch]
  return jnp.transpose(out, np.argsort(order))


def delta_canonical(a, b, kinds: Sequence[str], dtype=None):
  """A @ B (canonical layout) in W's layout."""
  return product(*to_broadcast(a, b, kinds), kinds, dtype)


def to_matrix(w, batch_axes, in_axes, out_axes):
  """W -> batch_shape + (d_in, d_out): the kernel as a (stack of) matrices."""
  w = jnp.transpose(w, tuple(batch_axes) + tuple(in_axes) + tuple(out_axes))
  nb, ni = len(batch_axes), len(in_axes)
  return w.reshape(w.shape[:nb] + (int(np.prod(w.shape[nb:nb + ni])), -1))


def from_matrix(m, shape, batch_axes, in_axes, out_axes):
  """The inverse of `to_matrix` for a kernel of `shape`."""
  order = tuple(batch_axes) + tuple(in_axes) + tuple(out_axes)
  m = m.reshape(tuple(shape[d] for d in order))
  return jnp.transpose(m, np.argsort(order))


def reshape_groups(old: Sequence[int], new: Sequence[int]):
  """Groups of consecutive axes (old_axes, new_axes) with equal size products, or None."""
  groups, i, j = [], 0, 0
  while i < len(old) and j < len(new):
    gi, gj, po, pn = [i], [j], old[i], new[j]
    i, j = i + 1, j + 1
    while po != pn:
      if po < pn and i < len(old):
        gi.append(i); po *= old[i]; i += 1
      elif pn < po and j < len(new):
        gj.append(j); pn *= new[j]; j += 1
      else:
        return None
    groups.append((gi, gj))
  if not groups:
    return None
  groups[-1][0].extend(range(i, len(old)))
  groups[-1][1].extend(range(j, len(new)))
  if any(old[q] != 1 for q in range(i, len(old))) or any(new[q] != 1 for q in range(j, len(new))):
    return None
  return groups
