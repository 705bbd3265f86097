"""The two trees: creating adapters, joining them with the frozen base, merging.

>>> spec = make_spec(params, [(r'kernel$', {'rank': 4})])          # doctest: +SKIP
>>> params, adapters = init(jax.random.key(0), params, spec)        # doctest: +SKIP
>>> y = lora(model.apply)(join(params, adapters), x)                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import inits
from lorax_jax import paths
from lorax_jax import quant as quant_lib
from lorax_jax import spec as spec_lib
from lorax_jax import variants
from lorax_jax.inits import calibration
from lorax_jax.joined import Adapted, is_adapted, is_adapter  # noqa: F401
from lorax_jax.variants import merged_leaf  # noqa: F401


def _leaf_key(key: jax.Array, path: str) -> jax.Array:
  # Keyed by the path so a leaf's init does not depend on which other leaves are adapted.
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _check_key(key: Any) -> None:
  """Raises unless `key` is ONE PRNG key: a typed key (`jax.random.key`) of shape () or a legacy
  raw key (`jax.random.PRNGKey`, uint32[2]; uint32[4] for the 'rbg' implementations)."""
  shape, dtype = getattr(key, 'shape', None), getattr(key, 'dtype', None)
  if shape is not None and dtype is not None and not isinstance(key, (np.generic, bool)):
    shape = tuple(shape)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      if shape == ():
        return
      got = f'a batch of {math.prod(shape)} typed keys (shape {shape})'
    elif np.dtype(dtype) == np.uint32 and shape in ((2,), (4,)):
      return
    elif np.dtype(dtype) == np.uint32 and len(shape) >= 2 and shape[-1] in (2, 4):
      got = f'a batch of legacy keys (uint32 array of shape {shape})'
    else:
      got = f'an array of shape {shape} and dtype {np.dtype(dtype).name}'
  else:
    got = f'{type(key).__name__} {key!r}'
  raise ValueError(f'key must be a single PRNG key from jax.random.key(seed) (or the legacy '
                   f'jax.random.PRNGKey(seed), uint32[2]); got {got}. For several inits, call '
                   'init once per key.')


def init(key: jax.Array, params: Any, spec: dict[str, Any], *, fn: Any = None,
         batches: Any = None, num_batches: int = 8) -> tuple[Any, dict[str, Any]]:
  """Creates the adapter tree for `spec`.

  Args:
    key: one PRNG key, typed (`jax.random.key(seed)`) or legacy (`jax.random.PRNGKey(seed)`);
      each leaf's init uses `fold_in(key, crc32(path))`.
    params: the base parameters (linen dict or NNX State); leaves may be quantized
      (`lorax_jax.quant`).
    spec: from `make_spec(params, ...)`.
    fn: for the calibrated inits (those whose record needs gradients or activations:
      `'lora_ga'`, `'eva'`, `'corda'`, see `lorax_jax.inits`): the loss
      `(params, batch) -> scalar` (or `(loss, aux)`).
    batches: their calibration batches (an iterable).
    num_batches: how many batches each calibrated init uses (EVA may stop earlier).

  Returns:
    `(params, adapters)`: `params` is returned untouched unless a weight-aware init replaces a
    base leaf (the residual W - s*A@B, or LoftQ's quantized base); `adapters` is a nested dict
    holding only the adapted and fully trained leaves (EVA may give a leaf rank 0: it then has
    no adapter). For a quantized residual (QPiSSA), `quantize` the returned params.

  Raises:
    ValueError: if `key` is not a single PRNG key (an int, a float, a batch of keys), the spec
      does not fit `params`, a calibrated init lacks `fn` or `batches`, the batches run dry, or
      an init that changes the base meets an already quantized leaf.
  """
  _check_key(key)
  spec_lib.validate_against(params, spec)
  specs = spec_lib.spec_leaves(spec)
  records = {p: inits.get(s.init) for p, s in specs.items() if s.variant != spec_lib.FULL}
  adapters = {}
  changed = {}
  calibrated = {p: s for p, s in specs.items() if p in records and records[p].calibrated}
  for path, _, leaf in paths.leaves_with_paths(params):
    if quant_lib.is_quantized(leaf) and path in records and records[path].changes_base:
      raise ValueError(_on_quantized(path, records[path]))
  if calibrated:
    done = calibration.run(key, params, calibrated, fn, batches, num_batches)
  for path, keys, leaf in paths.leaves_with_paths(params):
    s = specs.get(path)
    if s is None:
      continue
    quantized = quant_lib.is_quantized(leaf)
    if path in calibrated:
      got = done[path]
      if got is None:
        continue
      w, a, b, s = got
      w_float = quant_lib.dequantize_array(w) if quant_lib.is_quantized(w) else w
      adapters[keys] = variants.get(s.variant).from_factors(w_float, a, b, s)
      if w is not leaf:
        changed[path] = w
      continue
    if s.variant == spec_lib.FULL:
      value = quant_lib.dequantize_array(leaf) if quantized else jnp.array(leaf, copy=True)
      adapters[keys] = variants.FullParams(value, s)
      continue
    w_in = quant_lib.dequantize_array(leaf) if quantized else jnp.asarray(leaf)
    if records[path].factors is not None:
      w, a, b = records[path].factors(_leaf_key(key, path), w_in, s)
      w_float = quant_lib.dequantize_array(w) if quant_lib.is_quantized(w) else w
      adapter = variants.get(s.variant).from_factors(w_float, a, b, s)
    else:
      w, adapter = variants.get(s.variant).init(_leaf_key(key, path), w_in, s)
    adapters[keys] = adapter
    if w is not w_in:
      changed[path] = w
  owners = set()
  for keys, adapter in adapters.items():  # tied variants: the first leaf of a group owns it
    tie = variants.tie_of(adapter)
    if tie is not None:
      group = variants.tie_group(adapter)
      if group in owners:
        adapters[keys] = tie.strip(adapter)
      else:
        owners.add(group)
  if changed:
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: changed.get(paths.path_str(kp), x), params, is_leaf=quant_lib.is_quantized)
  return params, paths.nest(adapters)


def _on_quantized(path: str, record: inits.Init) -> str:
  """The error for an init that changes the base of an already quantized leaf."""
  if record.residual:
    return (f'init {record.name!r} for {path!r} replaces the base by a residual, but the leaf is '
            'already quantized: its rounding would be compounded. Initialize on the float base, '
            'then quantize the residual (QPiSSA: quantize(params, spec) after init).')
  return (f'init {record.name!r} for {path!r} needs the float base, but the leaf is already '
          'quantized: initialize before quantizing (the init sets the base itself, LoftQ '
          'quantizes it).')


def _check_tree(adapters: Any) -> None:
  if not isinstance(adapters, dict):
    raise ValueError(f'adapters must be the adapter tree from lorax_jax.init (a dict of adapter '
                     f'states); got a {type(adapters).__name__}.')


def _flat_adapters(adapters: Any) -> dict[str, Any]:
  _check_tree(adapters)
  if not adapters:
    return {}
  return variants.resolve_ties(paths.flat(adapters, is_leaf=is_adapter))


def _map_adapted(fn, params, adapters):
  """Applies `fn(path, w, adapter)` to every adapted leaf of `params`."""
  flat = _flat_adapters(adapters)
  used = set()

  def visit(kp, w):
    path = paths.path_str(kp)
    if path not in flat:
      return w
    adapter = flat[path]
    if not is_adapter(adapter):
      raise ValueError(f'Adapter at {path!r} is {type(adapter).__name__}, not an adapter state.')
    if tuple(np.shape(w)) != adapter.spec.shape:
      raise ValueError(f'Adapter for {path!r} was made for shape {adapter.spec.shape}, but the '
                       f'parameter has shape {tuple(np.shape(w))}.')
    used.add(path)
    return fn(path, w, adapter)

  out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=quant_lib.is_quantized)
  missing = sorted(set(flat) - used)
  if missing:
    raise ValueError(f'Adapters for paths that are not in params: {missing[:10]}.')
  return out


def join(params: Any, adapters: dict[str, Any]) -> Any:
  """Returns `params` with every adapted leaf replaced by `Adapted(w, adapter)`.

  Pass the result to a function transformed by `lora(fn)`. Differentiate with respect to
  `adapters` (join inside the loss) so the base never gets a gradient.
  """
  return _map_adapted(lambda path, w, a: Adapted(w, a), params, adapters)


def split(joined: Any) -> tuple[Any, dict[str, Any]]:
  """The inverse of `join`: `(params, adapters)` (tied members give back their shared arrays)."""
  adapters = {}

  def visit(kp, x):
    if isinstance(x, Adapted):
      tie = variants.tie_of(x.adapter)
      strip = tie is not None and not tie.is_owner(x.adapter)
      adapters[paths.path_keys(kp)] = tie.strip(x.adapter) if strip else x.adapter
      return x.w
    return x

  params = jax.tree_util.tree_map_with_path(visit, joined, is_leaf=is_adapted)
  return params, paths.nest(adapters)


def labels(adapters: Any) -> Any:
  """A tree like `adapters` naming each array's role: `'lora_a'`, `'lora_b'` (B-side factors,
  LoRA+'s faster group), `'full'` (fully trained leaves) or `'frozen'` (arrays the method keeps
  fixed, which get no update and no weight decay)."""

  def visit(x):
    if not is_adapter(x):
      return jax.tree_util.tree_map(lambda _: variants.base.LORA_A, x)
    new = {name: jax.tree_util.tree_map(lambda _, l=label: l, getattr(x, name))
           for name, label in variants.base.field_labels(x).items()}
    return dataclasses.replace(x, **new)

  return jax.tree_util.tree_map(visit, adapters, is_leaf=is_adapter)


def count_params(adapters: Any) -> int:
  """Number of trainable scalars in an adapter tree (frozen arrays are not counted)."""
  _check_tree(adapters)
  sizes = jax.tree_util.tree_map(lambda x: int(np.prod(np.shape(x))), adapters)
  return int(sum(n for n, l in zip(jax.tree_util.tree_leaves(sizes),
                                   jax.tree_util.tree_leaves(labels(adapters)))
                 if l != variants.base.FROZEN))


def _merge(params, adapters, return_cache=False, requantize=False):
  cache = {}

  def leaf(path, w, adapter):
    variant = None if isinstance(adapter, variants.FullParams) else variants.get(
        adapter.spec.variant)
    if return_cache and variant is not None and variant.merge_cache is not None:
      cache[path] = variant.merge_cache(quant_lib.dequantize(w), adapter)
    return merged_leaf(w, adapter, requantize=requantize)

  merged = _map_adapted(leaf, params, adapters)
  return (merged, cache) if return_cache else merged


def _unmerge(merged, adapters, cache=None):
  def leaf(path, w, adapter):
    variant = None if isinstance(adapter, variants.FullParams) else variants.get(
        adapter.spec.variant)
    if variant is not None and variant.unmerge is not None:
      out = variant.unmerge(quant_lib.dequantize(w), adapter, (cache or {}).get(path))
      return quant_lib.requantize_like(out, w) if quant_lib.is_quantized(w) else out
    return merged_leaf(w, adapter, -1, requantize=True)

  return _map_adapted(leaf, merged, adapters)


_STATIC = ('return_cache', 'requantize')
_merge_jit = jax.jit(_merge, static_argnames=_STATIC)
_merge_jit_donate = jax.jit(_merge, static_argnames=_STATIC, donate_argnums=0)
_unmerge_jit = jax.jit(_unmerge)
_unmerge_jit_donate = jax.jit(_unmerge, donate_argnums=0)


def merge(params: Any, adapters: dict[str, Any], *, donate: bool = False,
          return_cache: bool = False, requantize: bool = False) -> Any:
  """W + dW for every adapted leaf (fully trained leaves take their trained value). Jitted.

  Args:
    params: the base parameters.
    adapters: the adapter tree.
    donate: donate `params`' buffers to the result (the base is consumed).
    return_cache: also return `{path: array}` of what `unmerge` needs for variants whose merge
      cannot be undone from the adapters alone (DoRA's column norms of W + s*A@B).
    requantize: for a quantized base (`lorax_jax.quant`): quantize the merged leaf again in the
      base's format. Otherwise the merged leaf is a float array in the base's original dtype:
      dequant(Q) + dW exactly. Requantizing adds one more rounding, of the size of the base's own
      quantization error (NF4: about 10% relative to the weights; int8 about 0.4%), so adapter
      updates smaller than a quantization step are partly lost (PEFT warns the same for 4-bit).

  Returns:
    A parameter tree like `params` for the plain, un-transformed model; with `return_cache`,
    `(merged, cache)`.
  """
  _check_tree(adapters)
  return (_merge_jit_donate if donate else _merge_jit)(params, adapters,
                                                       return_cache=return_cache,
                                                       requantize=requantize)


def unmerge(merged: Any, adapters: dict[str, Any], *, cache: dict[str, Any] | None = None,
            donate: bool = False) -> Any:
  """Recovers the base from `merge`'s output (up to rounding in the base dtype): W' - dW.

  Args:
    merged: the output of `merge`.
    adapters: the adapter tree that was merged.
    cache: the cache from `merge(..., return_cache=True)`; needed for DoRA leaves.
    donate: donate `merged`'s buffers to the result.

  Fully trained leaves keep their merged (trained) value: the original is not recoverable.
  Quantized leaves (from `merge(..., requantize=True)`) come back quantized in their format.

  Raises:
    ValueError: for a DoRA leaf without its cache entry.
  """
  _check_tree(adapters)
  return (_unmerge_jit_donate if donate else _unmerge_jit)(merged, adapters, cache)


def to_lora(adapters: Any, initial: Any) -> Any:
  """Plain LoRA adapters against the ORIGINAL base, for adapters trained from a residual init.

  With a residual init the base is W_res = W - s*A0@B0, so the trained model is
  W + s*(A@B - A0@B0) = W + s*[A, A0] @ [B; -B0]: a rank-2r LoRA adapter with the same scale
  (PEFT's PiSSA/OLoRA conversion). Other leaves (plain inits, EVA, fully trained) are unchanged.

  Args:
    adapters: the trained adapter tree.
    initial: the adapter tree `init` returned (before training).

  Returns:
    An adapter tree for the original base: `merge(original, to_lora(adapters, initial))`
    equals `merge(residual_base, adapters)` up to rounding.

  Raises:
    ValueError: for LoftQ leaves (their quantization error is not low-rank), a residual leaf of
      another variant than LoRA (a DoRA update is not a LoRA update), or a leaf missing from
      `initial`.
  """
  flat = paths.flat(adapters, is_leaf=is_adapter)
  flat0 = paths.flat(initial, is_leaf=is_adapter)
  out = {}
  for path, ad in flat.items():
    spec = getattr(ad, 'spec', None)
    if spec is None or spec.variant == spec_lib.FULL or not inits.get(spec.init).changes_base:
      out[tuple(path.split('/'))] = ad
      continue
    if not inits.get(spec.init).residual:
      raise ValueError(f'{path!r} was initialized by {spec.init!r} (LoftQ): its base is the '
                       'quantized W, whose error is not low-rank, so it has no LoRA form against '
                       'the float base. Merge it into the quantized base instead '
                       '(merge(..., requantize=...)).')
    if not isinstance(ad, variants.LoraParams):
      raise ValueError(f'{path!r} is a {spec.variant!r} adapter on the residual base of init '
                       f'{spec.init!r}: to_lora writes plain LoRA adapters, and a '
                       f'{spec.variant!r} update is not a low-rank update of W. Merge it '
                       'instead: merge(residual_params, adapters) are the trained weights.')
    ad0 = flat0.get(path)
    if ad0 is None or ad0.spec.rank != spec.rank:
      raise ValueError(f'initial has no rank-{spec.rank} adapter at {path!r}: pass the adapter '
                       'tree that init returned.')
    nb = len(spec.batch_shape)
    a = jnp.concatenate([ad.a, ad0.a.astype(ad.a.dtype)], axis=-1)
    b = jnp.concatenate([ad.b, -ad0.b.astype(ad.b.dtype)], axis=nb)
    factor = {'alpha/r': 2.0, 'rslora': math.sqrt(2.0), 'constant': 1.0}[spec.scaling]
    new = dataclasses.replace(spec, rank=2 * spec.rank, alpha=spec.alpha * factor,
                              init='kaiming', init_options=())
    out[tuple(path.split('/'))] = variants.LoraParams(a, b, new)
  return paths.nest(out)


# Many adapters on one base: a stack with a leading adapter axis (mixed-adapter batches,
# `lora(fn)(join(params, stacked), x, adapter_ids=ids)`), and its inverse.

def _rescaled_spec(spec: spec_lib.LeafSpec, rank: int, scale: float) -> spec_lib.LeafSpec:
  """`spec` at `rank`, with the alpha that keeps the scale `scale`."""
  alpha = {'alpha/r': scale * rank, 'rslora': scale * math.sqrt(rank),
           'constant': scale}[spec.scaling]
  return dataclasses.replace(spec, rank=rank, alpha=alpha)


def _comparable(spec: spec_lib.LeafSpec) -> spec_lib.LeafSpec:
  """What must agree between adapters of one leaf for them to stack (rank and alpha may not)."""
  return dataclasses.replace(spec, rank=0, alpha=0.0, init='kaiming', init_options=(),
                             dropout=0.0)


def _resize_rank(adapter: Any, spec: spec_lib.LeafSpec) -> Any:
  """`adapter` at `spec.rank` and `spec.scale`: rank axes zero-padded (or cut back to a rank
  they were padded from), the scale ratio folded into B (the update is linear in B), so that
  its update is unchanged."""
  old = adapter.spec
  lay = variants.get(old.variant).layout(old)
  nb = len(old.batch_shape)
  new = {}
  for name in variants.base.field_labels(adapter):
    x = getattr(adapter, name)
    for d, ax in enumerate(lay[name]):
      if ax is None and d >= nb and x.shape[d] == old.rank:
        if spec.rank > old.rank:
          x = jnp.pad(x, [(0, spec.rank - old.rank) if q == d else (0, 0) for q in range(x.ndim)])
        elif spec.rank < old.rank:
          x = jax.lax.slice_in_dim(x, 0, spec.rank, axis=d)
    if name == 'b' and old.scale != spec.scale:
      x = (x * (old.scale / spec.scale)).astype(x.dtype)
    new[name] = x
  return dataclasses.replace(adapter, spec=spec, **new)


def _flat_list(trees: Any, what: str) -> list[dict[str, Any]]:
  if not isinstance(trees, (list, tuple)) or not trees:
    raise ValueError(f'{what} takes a non-empty list of adapter trees; got '
                     f'{type(trees).__name__} {trees!r:.80}.')
  flats = []
  for i, t in enumerate(trees):
    if not isinstance(t, dict):
      raise ValueError(f'{what}: tree {i} is a {type(t).__name__}, not an adapter tree (a dict '
                       'from lorax_jax.init or load_peft).')
    flats.append(paths.flat(t, is_leaf=is_adapter))
  first = set(flats[0])
  for i, f in enumerate(flats[1:], 1):
    if set(f) != first:
      only0, only_i = sorted(first - set(f)), sorted(set(f) - first)
      raise ValueError(f'{what}: tree {i} adapts other leaves than tree 0 (only in tree 0: '
                       f'{only0[:5]}; only in tree {i}: {only_i[:5]}); all trees must adapt the '
                       'same paths.')
  for i, f in enumerate(flats):
    for path, ad in f.items():
      if not is_adapter(ad):
        raise ValueError(f'{what}: tree {i} holds a {type(ad).__name__} at {path!r}, not an '
                         'adapter state.')
  return flats


def stack_adapters(trees: list[Any]) -> dict[str, Any]:
  """One adapter tree holding `trees` on a new leading adapter axis (slot i = trees[i]).

  For every leaf, the adapters must be of the same variant, base shape, axes and options; ranks
  and alphas may differ for the resizable variants (LoRA, LoRA-FA, AdaLoRA, SoRA): smaller ranks
  are zero-padded to the largest and each scale is folded into B, so that every slot's update
  is exactly its adapter's (up to one rounding of B where the scales differ). The stacked
  leaf's spec is the largest rank's, with the scale of tree 0.

  Use it for mixed-adapter batches: `lora(fn)(join(params, stacked), x, adapter_ids=ids)`, and
  `unstack_adapters` to get the trees back.

  Raises:
    ValueError: for an empty list, trees over different paths, different variants, base
      shapes or options at a leaf, different ranks of a variant that cannot be resized, or
      tied variants (whose shared arrays do not stack).
  """
  flats = _flat_list(trees, 'stack_adapters')
  out = {}
  for path in flats[0]:
    ads = [f[path] for f in flats]
    specs = [a.spec for a in ads]
    s0 = specs[0]
    if any(variants.tie_of(a) is not None for a in ads):
      raise ValueError(f'stack_adapters: {path!r} is a tied variant ({s0.variant!r}), whose '
                       'arrays are shared across leaves; stack untied adapters.')
    for i, s in enumerate(specs):
      if type(ads[i]) is not type(ads[0]) or _comparable(s) != _comparable(s0):
        diff = {k: (getattr(s0, k), getattr(s, k)) for k in
                ('variant', 'shape', 'batch_axes', 'in_axes', 'out_axes', 'options', 'dtype',
                 'scaling') if getattr(s0, k) != getattr(s, k)}
        raise ValueError(f'stack_adapters: at {path!r} tree {i} differs from tree 0 in {diff} '
                         '(tree 0, tree i); adapters of one leaf stack when they differ at most '
                         'in rank and alpha.')
    rank = max(s.rank for s in specs)
    if isinstance(ads[0], variants.FullParams):
      stacked_spec, padded = s0, ads
    else:
      if any(s.rank != rank or s.scale != s0.scale for s in specs):
        if not variants.get(s0.variant).resizable:
          raise ValueError(f'stack_adapters: at {path!r} the {s0.variant!r} adapters have ranks '
                           f'{[s.rank for s in specs]} and scales {[s.scale for s in specs]}; '
                           'only resizable variants (lora, lora_fa, adalora, sora) stack with '
                           'different ranks or scales.')
      stacked_spec = _rescaled_spec(max(specs, key=lambda s: s.rank), rank, s0.scale)
      padded = [a if a.spec == stacked_spec else _resize_rank(a, stacked_spec) for a in ads]
    out[tuple(path.split('/'))] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *padded)
  return paths.nest(out)


def num_stacked(stacked: Any) -> int:
  """The number of adapters in a stacked tree (the leading axis of its arrays)."""
  leaves = jax.tree_util.tree_leaves(stacked)
  if not leaves:
    raise ValueError('num_stacked: the adapter tree holds no arrays.')
  return int(np.shape(leaves[0])[0])


def unstack_adapters(stacked: Any, like: list[Any] | None = None) -> list[dict[str, Any]]:
  """The inverse of `stack_adapters`: the list of adapter trees of a stacked tree.

  Args:
    stacked: a tree from `stack_adapters` (or one with the same leading adapter axis).
    like: optional, the original trees (or trees with their specs): each slot is cut back to its
      tree's rank and scale. Without it every slot keeps the stacked rank (the same update).

  Raises:
    ValueError: if the leaves' leading axes differ, or `like` has another length or paths.
  """
  flat = _flat_list([stacked], 'unstack_adapters')[0]
  n = num_stacked(stacked)
  for path, ad in flat.items():
    sizes = {int(np.shape(x)[0]) for x in jax.tree_util.tree_leaves(ad)}
    if sizes != {n}:
      raise ValueError(f'unstack_adapters: the arrays at {path!r} have leading axes {sorted(sizes)}'
                       f', not the {n} adapters of the stack.')
  likes = None
  if like is not None:
    likes = _flat_list(list(like), 'unstack_adapters(like=...)')
    if len(likes) != n:
      raise ValueError(f'unstack_adapters: like has {len(likes)} trees for {n} stacked adapters.')
    if set(likes[0]) != set(flat):
      raise ValueError('unstack_adapters: like adapts other paths than the stacked tree.')
  out = []
  for i in range(n):
    tree = {}
    for path, ad in flat.items():
      one = jax.tree_util.tree_map(lambda x, i=i: x[i], ad)
      if likes is not None and not isinstance(one, variants.FullParams) and (
          likes[i][path].spec != one.spec):
        one = _resize_rank(one, likes[i][path].spec)
      tree[tuple(path.split('/'))] = one
    out.append(paths.nest(tree))
  return out


def replace_adapter(stacked: Any, index: int, tree: Any) -> dict[str, Any]:
  """`stacked` with slot `index` replaced by `tree` (hot-swap): padded to the stack's rank and
  scale as `stack_adapters` does, so the arrays keep their shapes and a compiled serving
  function runs on the result without recompiling. `tree` may come from `load_peft`.

  Raises:
    ValueError: for an index outside the stack, or a tree that does not fit the stack (other
      paths, variant, shapes, or a rank above the stack's).
  """
  flat = _flat_list([stacked], 'replace_adapter')[0]
  n = num_stacked(stacked)
  if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not -n <= index < n:
    raise ValueError(f'replace_adapter: index={index!r} must be an int in [{-n}, {n}) for a '
                     f'stack of {n} adapters.')
  new = _flat_list([stacked, tree], 'replace_adapter')[1]
  out = {}
  for path, ad in flat.items():
    one, spec = new[path], ad.spec
    if type(one) is not type(ad) or _comparable(one.spec) != _comparable(spec):
      raise ValueError(f'replace_adapter: the adapter at {path!r} ({one.spec.variant!r}, shape '
                       f'{one.spec.shape}) does not fit the stack ({spec.variant!r}, shape '
                       f'{spec.shape}).')
    if not isinstance(one, variants.FullParams) and one.spec != spec:
      if one.spec.rank > spec.rank:
        raise ValueError(f'replace_adapter: the adapter at {path!r} has rank {one.spec.rank}, '
                         f'above the stack\'s {spec.rank}; stack_adapters again to grow it.')
      if not variants.get(spec.variant).resizable and (one.spec.rank, one.spec.scale) != (
          spec.rank, spec.scale):
        raise ValueError(f'replace_adapter: the {spec.variant!r} adapter at {path!r} has rank '
                         f'{one.spec.rank} and scale {one.spec.scale}, the stack '
                         f'{spec.rank} and {spec.scale}; this variant cannot be resized.')
      one = _resize_rank(one, spec)
    out[tuple(path.split('/'))] = jax.tree_util.tree_map(
        lambda s, x: s.at[index].set(x.astype(s.dtype)), ad, one)
  return paths.nest(out)
