"""PiSSA (Meng et al., 2024): A, B from the top-r singular triplets of W, the residual base.

sqrt(sigma / s) goes on each side, so that s*A@B is W's rank-r truncation; the base becomes
W - s*A@B. `niter` > 0 (or PEFT's `'pissa_niter_K'`) uses a randomized SVD with K subspace
iterations (and `oversample` extra sketch columns) instead of the exact one.
"""

from __future__ import annotations

import re

import jax

from lorax_jax.inits import linalg
from lorax_jax.inits.base import WEIGHT, Init, bad_option, is_int
from lorax_jax.leafspec import LeafSpec
from lorax_jax.variants import common


def pissa(key: jax.Array, w: jax.Array, spec: LeafSpec, *, minor: bool = False):
  """PiSSA (or MiLoRA with `minor=True`): the residual base and (A, B) from W's SVD.

  Returns:
    `(W - s*A@B, A, B)` in the kernel's and the canonical factor layouts.
  """
  m = common.matrix(linalg.f32(w), spec)
  r = spec.rank
  niter = spec.init_opt('niter') if spec.init == 'pissa' else None
  if niter is not None and not minor:
    u, s, vh = linalg.randomized_svd(key, m, r, niter, spec.init_opt('oversample'))
  else:
    u, s, vh = linalg.svd(m)
    sl = slice(-r, None) if minor else slice(0, r)
    u, s, vh = u[..., :, sl], s[..., sl], vh[..., sl, :]
  return linalg.residual(w, spec, *linalg.split_sqrt(u, s, vh, spec.scale))


def _check(path: str, spec: LeafSpec) -> None:
  if spec.init_opt('niter') is not None and not is_int(spec.init_opt('niter'), 0):
    raise bad_option(path, spec, 'niter', 'None (exact SVD) or an int >= 0')
  if not is_int(spec.init_opt('oversample'), 0):
    raise bad_option(path, spec, 'oversample', 'an int >= 0')


def _parse(name: str):
  m = re.fullmatch(r'pissa_niter_(\d+)', name)
  return {'niter': int(m.group(1))} if m else None


PISSA = Init('pissa', options={'niter': None, 'oversample': 10}, needs=frozenset({WEIGHT}),
             changes_base=True, residual=True, check=_check, factors=pissa, parse=_parse)
