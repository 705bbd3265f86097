"""The entry points over the rules: `lora(fn)` and `infer_axes(fn, params, ...)`."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

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


def _to_value(adapted: joined.Adapted, path: str):
  ad = adapted.adapter
  if isinstance(ad, variants.FullParams):
    return ad.value
  variant = variants.get(ad.spec.variant)
  w = adapted.w
  qw = quant.is_quantized(w)
  f = None
  if variant.factored is not None:
    w_in = w
    if qw:   # dequantized only for variants whose factored form reads W (DoRA's norm)
      w_in = jax.ShapeDtypeStruct(w.shape, w.dtype)
      if _reads_w(variant, w_in, ad):
        w_in = quant.dequantize_array(w)
    f = variant.factored(w_in, ad)
  if f is None:
    return Dense(w, ad, path)
  kinds = ad.spec.kinds
  a, b = layout.to_broadcast(f.a, f.b, kinds)
  g = None if f.out_scale is None else layout.scale_to_broadcast(f.out_scale, kinds)
  return LowRank(QuantW.of(w) if qw else w, a, b, kinds, float(f.scale), path, ad.spec.dropout, g)


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

  Each call traces `fn` (as `jax.make_jaxpr` does): call the result under `jax.jit`, or inside a
  jitted train step, so that this happens once per compilation.

  Example:
    >>> y = jax.jit(lora(model.apply))(join(params, adapters), x)     # doctest: +SKIP
  """

  @functools.wraps(fn)
  def wrapped(*args, lora_rng=None, **kwargs):
    ctx = Ctx(strict_default() if strict is None else strict, lora_rng)

    def replace(kp, leaf):
      if quant.is_quantized(leaf):
        return trace_input(leaf), QuantW.of(leaf)
      if not isinstance(leaf, joined.Adapted):
        return None
      val = _to_value(leaf, paths.path_str(kp[2:]))
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
