"""The protocol every variant implements, and the adapter state of fully trained leaves.

Adapter states are frozen dataclasses registered as pytrees, with the `LeafSpec` as a static
field. Two field markers shape how the rest of the library treats their arrays:

  `frozen_field()`   arrays the method keeps fixed (LoRA-FA's A, LoRA-XS's SVD factors): they
                     get no gradient (variants `stop_gradient` them), are not counted as
                     trainable, and `optimizer` leaves them untouched (no weight decay).
  `b_field()`        the B-side factor; LoRA+ gives it the larger learning rate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax

from lorax_jax.leafspec import LeafSpec

FROZEN = 'frozen'
LORA_A = 'lora_a'
LORA_B = 'lora_b'


def frozen_field(**kw):
  """A dataclass field holding arrays the method keeps fixed (see the module docstring)."""
  return dataclasses.field(metadata=dict(label=FROZEN), **kw)


def b_field(**kw):
  """A dataclass field holding a B-side factor (LoRA+'s faster learning rate)."""
  return dataclasses.field(metadata=dict(label=LORA_B), **kw)


def static_field(**kw):
  return dataclasses.field(metadata=dict(static=True), **kw)


class Factored(NamedTuple):
  """A low-rank update in canonical layout (see `lorax_jax.layout`).

  The adapted kernel is `(W + scale * A @ B) * out_scale`: `out_scale` (batch + out shape, or
  None) multiplies every output unit, as DoRA's `m / ||W + sAB||` does.
  """
  a: jax.Array
  b: jax.Array
  scale: float
  out_scale: Optional[jax.Array] = None


class Tie(NamedTuple):
  """How a variant shares arrays across leaves (Tied-LoRA).

  `key(spec)` names the group of a leaf; the first leaf of a group (in parameter order) owns
  the shared arrays, the others hold `strip(adapter)` and get them back with
  `fill(member, owner)` before use (`join`, `merge`). `shared_params(spec)` is the size of the
  shared arrays (counted once per group).
  """
  key: Callable[[LeafSpec], Any]
  strip: Callable[[Any], Any]
  fill: Callable[[Any, Any], Any]
  is_owner: Callable[[Any], bool]
  shared_params: Callable[[LeafSpec], int]


class Variant(NamedTuple):
  """A variant: a NamedTuple of pure functions, built by a factory (like an optax transform).

  Attributes:
    name: the registry name configs use.
    init: `(key, w, spec) -> (w, adapter)`; returns the (possibly changed) base leaf.
    delta: `(w, adapter) -> dW` in the kernel's own layout, so that the merged kernel is
      `W + dW`.
    factored: optional `(w, adapter) -> Factored | None`; `lora(fn)` uses it to run without
      forming dW. Variants without it (or returning None for a leaf) form dW, which strict mode
      allows: the docstring of such variants says so.
    num_params: `(spec) -> int` trainable parameters of one adapted leaf (shared arrays counted
      at their owner).
    check: `(path, spec) -> None`; raises ValueError for settings the variant cannot take.
    options: variant-specific setting keys and their defaults (e.g. LoKr's `factor`).
    unmerge: optional `(w_merged, adapter, cache) -> w` for variants whose merge is not
      `W + dW` with dW independent of W (DoRA); `cache` is what `merge_cache` returned.
    merge_cache: optional `(w, adapter) -> array` computed at merge time for `unmerge`.
    tie: optional `Tie` for variants that share arrays across leaves.
    layout: `(spec) -> {field: axes}`: for every array axis of each field, the kernel axis it
      spans (or None: a rank or coefficient axis). Sharding derives adapter shardings from it.
    resizable: whether its ranks are independent terms: cutting each array along its rank axis
      (the None axis of `layout`) cuts the update exactly. Rank dynamics (SoRA's pruning,
      AdaLoRA's budget) resize only such variants.
    reference: optional `(w, adapter) -> W'`: the paper's formula for the merged kernel, in
      float64 NumPy for a 2-D kernel, written independently of `delta` and `factored`; the law
      tests (tests/test_variants.py) check every variant's `merge` against it.
    bind: optional `(path, spec) -> spec`, run once at selection: per-leaf settings derived from
      the leaf's path (NOLA's basis salt), so the adapter state itself never holds the path.
    from_factors: optional `(w, a, b, spec) -> adapter`: the state for factors an init of
      `lorax_jax.inits` computed (PiSSA, OLoRA, ...), `w` the base leaf the init returned (the
      residual). Variants without it cannot take such inits (`make_spec` says so).
  """
  name: str
  init: Callable[[jax.Array, jax.Array, LeafSpec], tuple[jax.Array, Any]]
  delta: Callable[[jax.Array, Any], jax.Array]
  factored: Optional[Callable[[jax.Array, Any], Optional[Factored]]]
  num_params: Callable[[LeafSpec], int]
  check: Callable[[str, LeafSpec], None] = lambda path, spec: None
  options: Mapping[str, Any] = {}
  unmerge: Optional[Callable[[jax.Array, Any, Any], jax.Array]] = None
  merge_cache: Optional[Callable[[jax.Array, Any], jax.Array]] = None
  tie: Optional[Tie] = None
  layout: Optional[Callable[[LeafSpec], dict[str, tuple]]] = None
  bind: Optional[Callable[[str, LeafSpec], LeafSpec]] = None
  reference: Optional[Callable[[Any, Any], Any]] = None
  resizable: bool = False
  from_factors: Optional[Callable[[jax.Array, jax.Array, jax.Array, LeafSpec], Any]] = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullParams:
  """A fully trained leaf: `value` replaces the base leaf."""
  value: jax.Array
  spec: LeafSpec = static_field()


def field_labels(adapter: Any) -> dict[str, str]:
  """`{field: label}` for the array fields of an adapter state."""
  out = {}
  for f in dataclasses.fields(adapter):
    if f.metadata.get('static'):
      continue
    label = f.metadata.get('label')
    if label is None:
      label = 'full' if isinstance(adapter, FullParams) else (LORA_B if f.name == 'b' else LORA_A)
    out[f.name] = label
  return out
