"""The entry points over the rules: `lora(fn)` and `infer_axes(fn, params, ...)`."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax import joined
from lorax_jax import layout
from lorax_jax import paths
from lorax_jax import quant
from lorax_jax import variants
from lorax_jax.interpreter import rules  # noqa: F401  (registers the built-in rules)
from lorax_jax.interpreter.axes import Usage
from lorax_jax.interpreter.engine import eval_jaxpr
from lorax_jax.interpreter.quantw import QuantW
from lorax_jax.interpreter.tracing import trace, trace_input
from lorax_jax.interpreter.values import Ctx, Dense, LowRank, is_special, materialize
from lorax_jax.interpreter.values import strict_default


def _factored(variant, w, ad):
  """`variant.factored(w, ad)`, with W dequantized only for variants whose factored form reads
  it (DoRA's norm)."""
  if quant.is_quantized(w):
    w_in = jax.ShapeDtypeStruct(w.shape, w.dtype)
    if _reads_w(variant, w_in, ad):
      w_in = quant.dequantize_array(w)
    w = w_in
  return variant.factored(w, ad)


def _to_value(adapted: joined.Adapted, path: str, ids=None):
  ad = adapted.adapter
  if ids is not None:
    return _to_mixed_value(adapted, path, *ids)
  if isinstance(ad, variants.FullParams):
    return ad.value
  variant = variants.get(ad.spec.variant)
  if variant.layout is not None:
    lay = variant.layout(ad.spec)
    if any(np.ndim(getattr(ad, k)) == len(ax) + 1 for k, ax in lay.items()):
      raise ValueError(f'The adapter at {path!r} has a leading adapter axis (a stack from '
                       'stack_adapters): pass adapter_ids= (one adapter index per row of the '
                       'batch) to run a mixed-adapter batch, or unstack_adapters it.')
  w = adapted.w
  f = None if variant.factored is None else _factored(variant, w, ad)
  if f is None:
    return Dense(w, ad, path)
  kinds = ad.spec.kinds
  a, b = layout.to_broadcast(f.a, f.b, kinds)
  g = None if f.out_scale is None else layout.scale_to_broadcast(f.out_scale, kinds)
  qw = quant.is_quantized(w)
  return LowRank(QuantW.of(w) if qw else w, a, b, kinds, float(f.scale), path, ad.spec.dropout, g)


def _to_mixed_value(adapted: joined.Adapted, path: str, ids, concrete) -> LowRank:
  """A stacked adapter (leading axis: the adapters) as one `LowRank` carrying all of them: each
  adapter's factored form (vmapped) in broadcast layout behind the adapter axis, and the stack
  as the variant gives it (`canon`) for the dense rule to gather rows from."""
  ad, w = adapted.adapter, adapted.w
  spec = ad.spec
  if isinstance(ad, variants.FullParams):
    raise ValueError(f'adapter_ids: {path!r} is a fully trained leaf; a mixed-adapter batch needs '
                     'low-rank adapters (one weight per row cannot be formed).')
  variant = variants.get(spec.variant)
  if variant.tie is not None:
    raise ValueError(f'adapter_ids: {path!r} is a tied variant ({spec.variant!r}); stack untied '
                     'adapters for mixed-adapter batches.')
  one = jax.eval_shape(lambda w: variant.init(jax.random.key(0), w, spec)[1],
                       jax.ShapeDtypeStruct(spec.shape, w.dtype))
  expect = [tuple(x.shape) for x in jax.tree_util.tree_leaves(one)]
  got = [tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(ad)]
  n = got[0][0] if got and got[0] else 0
  if len(got) != len(expect) or any(g != (n,) + e for g, e in zip(got, expect)) or n < 1:
    raise ValueError(f'adapter_ids: the adapter at {path!r} is not a stack of {spec.variant!r} '
                     f'adapters: its arrays have shapes {got}, a stack of n needs (n,) + '
                     f'{expect}. Build it with lorax_jax.stack_adapters([...]).')
  _check_ids_range(ids, concrete, n, path)
  scale = []

  def parts(one_ad):
    f = _factored(variant, w, one_ad)
    if f is None:
      return None
    scale.append(float(f.scale))
    return f.a, f.b, f.out_scale

  if variant.factored is None or jax.eval_shape(parts, jax.tree_util.tree_map(
      lambda x: x[0], ad)) is None:
    raise ValueError(f'adapter_ids: {path!r} is a {spec.variant!r} adapter, which has no factored '
                     'form; mixed-adapter batches need one (lora, dora, vera, lora_fa, ...).')
  fa, fb, g = jax.vmap(parts)(ad)
  kinds = spec.kinds
  a, b = jax.vmap(lambda a, b: layout.to_broadcast(a, b, kinds))(fa, fb)
  if g is not None:
    g = jax.vmap(lambda g: layout.scale_to_broadcast(g, kinds))(g)
  qw = quant.is_quantized(w)
  return LowRank(QuantW.of(w) if qw else w, a, b, kinds, scale[-1], path, spec.dropout, g,
                 ids=ids, n_adapters=int(n), canon=(fa, fb),
                 canon_axes=(spec.batch_axes, spec.in_axes, spec.out_axes))


def _check_ids(ids):
  """`adapter_ids` as an int32 vector (rows,); traced ids are checked by shape and dtype only."""
  shape, dtype = np.shape(ids), getattr(ids, 'dtype', None)
  if dtype is None:
    ids = np.asarray(ids)
    dtype = ids.dtype
  if len(shape) != 1 or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f'adapter_ids must be an integer vector with one adapter index per row of '
                     f'the batch (-1: the base alone); got shape {tuple(shape)} and dtype {dtype}.')
  try:
    concrete = np.asarray(ids)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    concrete = None   # traced: ids outside [0, n) are rows without an adapter
  if concrete is not None and concrete.size and concrete.min() < -1:
    raise ValueError(f'adapter_ids must be >= -1 (-1: the base alone); got {concrete.min()}.')
  return jnp.asarray(ids, jnp.int32), concrete


def _check_ids_range(ids, concrete, n: int, path: str) -> None:
  if concrete is not None and concrete.size and concrete.max() >= n:
    raise ValueError(f'adapter_ids: id {concrete.max()} is out of range for the {n} adapters '
                     f'stacked at {path!r}; allowed: -1 (the base alone) to {n - 1}.')


def _reads_w(variant, w_abstract, adapter) -> bool:
  """Whether `variant.factored` uses the values of W (traced on an abstract W to find out)."""
  jaxpr = jax.make_jaxpr(lambda w: variant.factored(w, adapter))(w_abstract).jaxpr
  v = jaxpr.invars[0]
  return any(any(x is v for x in e.invars) for e in jaxpr.eqns) or any(
      x is v for x in jaxpr.outvars)


def _is_input(x) -> bool:
  return joined.is_adapted(x) or quant.is_quantized(x)


def lora(fn: Callable, *, strict: bool | None = None) -> Callable:
  """Transforms `fn` to run on joined parameters without materializing W + dW.

  Args:
    fn: any JAX function (a linen `apply`, an NNX `merge`-and-call, plain jnp code).
    strict: raise `MaterializeError` instead of warning when an adapted kernel reaches an op
      with no factored rule. Defaults to the `LORAX_JAX_STRICT` environment variable.

  Returns:
    A function with `fn`'s signature plus an optional keyword `lora_rng`: a PRNG key that turns
    on LoRA dropout (training); without it dropout is off. Arguments may contain `Adapted`
    leaves from `join(params, adapters)` and `QuantizedArray` leaves (a quantized base, adapted
    or not); non-array leaves (flags, strings) stay static.

    A second optional keyword, `adapter_ids`, runs a mixed-adapter batch: with
    `join(params, stack_adapters([a_0, ..., a_{n-1}]))` and `adapter_ids` an int vector with one
    entry per row of the batch, row j runs with adapter `adapter_ids[j]` (-1: the base alone; a
    traced id outside [0, n) counts as -1, a concrete one is refused). Every adapted layer must
    see the rows on the leading axis of its input. Each layer gathers each row's A and B (BGMV,
    as Punica and S-LoRA serve), or with few tokens per row and few adapters (decode) runs
    every adapter's x @ A in one matmul and masks: there is no loop over the adapters, and ids
    may be traced, so one compiled function serves any mix.

  Each call traces `fn` (as `jax.make_jaxpr` does): call the result under `jax.jit`, or inside a
  jitted train step, so that this happens once per compilation.

  Example:
    >>> y = jax.jit(lora(model.apply))(join(params, adapters), x)     # doctest: +SKIP
  """

  @functools.wraps(fn)
  def wrapped(*args, lora_rng=None, adapter_ids=None, **kwargs):
    ctx = Ctx(strict_default() if strict is None else strict, lora_rng)
    ids = None if adapter_ids is None else _check_ids(adapter_ids)

    def replace(kp, leaf):
      if quant.is_quantized(leaf):
        return trace_input(leaf), QuantW.of(leaf)
      if not isinstance(leaf, joined.Adapted):
        return None
      val = _to_value(leaf, paths.path_str(kp[2:]), ids)
      return (trace_input(leaf.w) if is_special(val) else val), val

    closed, vals, _, out_tree = trace(fn, args, kwargs, is_leaf=_is_input, replace=replace)
    outs = eval_jaxpr(closed.jaxpr, closed.consts, vals, ctx)
    outs = [materialize(o, ctx, 'output of the function') for o in outs]
    return jax.tree_util.tree_unflatten(out_tree, outs)

  return wrapped


def infer_axes(fn: Callable, params: Any, *args, **kwargs
               ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
  """Infers `{path: (batch_axes, in_axes, out_axes)}` from how `fn(params, *args)` uses leaves.

  `fn(params, *args)` is traced and every parameter leaf followed, by the `infer` of the
  interpreter's rules, through axis-moving ops (transpose, reshape, casts, slices) and into
  nested jaxprs (jit, remat, scan, cond, while) up to its first consumer: the axes a
  `dot_general` contracts are in-axes and its free axes out-axes; a conv's output-feature axis
  is the out-axis; an embedding gather's indexed axis is the in-axis; an axis that `scan`
  iterates over is a batch (stacked) axis. Leaves that `fn` does not feed to a dot, conv or
  gather (biases, norms) are left out.
  """
  return infer_usage(fn, params, *args, **kwargs)[0]


def infer_usage(fn: Callable, params: Any, *args, **kwargs
                ) -> tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
                           dict[str, str]]:
  """`infer_axes`'s axes, and `{path: primitive}` for the leaves it found none for that `fn`
  consumes: the primitive where the leaf's (first) use ends, e.g. `'mul'` for a weight used
  elementwise. Leaves that `fn` does not use are in neither."""
  leaf_paths = {}
  closed, _, kps, _ = trace(fn, (params,) + tuple(args), kwargs)
  tracks = {}
  for var, kp in zip(closed.jaxpr.invars, kps):
    if len(kp) > 1 and kp[0] == jax.tree_util.SequenceKey(0) and kp[1] == (
        jax.tree_util.SequenceKey(0)):
      path = paths.path_str(kp[2:])
      leaf_paths[path] = var
      tracks[var] = (path, tuple((d,) for d in range(len(var.aval.shape))))
  usage = Usage()
  usage.walk(closed.jaxpr, tracks)
  out = {}
  for path, (batch, ins, outs) in usage.first.items():
    ndim = len(leaf_paths[path].aval.shape)
    batch = batch | usage.scanned.get(path, set())
    batch |= set(range(ndim)) - ins - outs - batch
    if ins & outs or batch & (ins | outs) or not ins or not outs:
      continue
    out[path] = (tuple(sorted(batch)), tuple(sorted(ins)), tuple(sorted(outs)))
  consumers = {p: name for p, name in usage.consumer.items() if p not in out}
  return out, consumers
