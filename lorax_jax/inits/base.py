"""The init protocol: one `Init` record per initialization, and the registry.

A record declares everything the rest of the library would otherwise hard-code in name lists:
its options (with defaults), what it needs (the weight, gradients of a loss, layer input
activations), whether it changes the base leaf (and whether the new base is the exact residual
W - s*A@B), the variants it serves, and its math. `make_spec` validates a leaf's init against its
record, `adapters.init` dispatches on it, calibration computes what the selected records need in
one pass over the batches, and `to_lora` and the PEFT codecs ask it whether the base changed.

A new init is one module defining a record, and one `register(...)` line in `inits/__init__.py`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax

from lorax_jax.leafspec import LeafSpec

WEIGHT = 'weight'
GRADIENTS = 'gradients'
ACTIVATIONS = 'activations'
NEEDS = (WEIGHT, GRADIENTS, ACTIVATIONS)


class Init(NamedTuple):
  """An initialization of adapter factors.

  Attributes:
    name: the registry name rules use (`{'init': name}`).
    options: the init's own settings (`init_options`) and their defaults.
    needs: what it reads besides the leaf's geometry: a subset of `NEEDS`. Inits that need
      `'gradients'` or `'activations'` are calibrated: `adapters.init` needs `fn=`, `batches=`.
    changes_base: whether it replaces the base leaf (a residual, or LoftQ's quantized W).
    residual: whether the new base is exactly W - s*A0@B0 computed from the stored factors, so
      that `to_lora` can rewrite trained adapters against the original W.
    variants: the variant names it serves; None: every variant that can take it (for inits with
      `factors` or `calibrate`: every variant with a `Variant.from_factors`; for the others: all).
    check: `(path, spec) -> None`; raises ValueError for option values the init cannot take.
    factors: for weight-only inits, `(key, w, spec) -> (base, a, b)` with A batch + in + (r,)
      and B batch + (r,) + out in the adapter dtype; `base` may be a `QuantizedArray`.
    calibrate: for calibrated inits, `(key, ws, specs, data) -> {path: (base, a, b, spec) or
      None}` over all the leaves that use it: `ws` and `specs` are `{path: w}` and
      `{path: LeafSpec}`, `data[path]` is `{need: value}` with the mean gradient of the loss
      w.r.t. W (`'gradients'`) and the input statistics `(sum X^T X, sum X, count)`
      (`'activations'`). The returned spec may differ (EVA's ranks); None: no adapter.
    stop: optional `(specs) -> ((stats) -> bool)`: a fresh convergence test for one run; after
      each batch it sees the summed input statistics of the init's leaves, and True ends their
      accumulation (EVA).
    parse: optional `(name) -> options | None`: other spellings of this init (PEFT's
      `'pissa_niter_K'`), giving the options they imply.
  """
  name: str
  options: Mapping[str, Any] = {}
  needs: frozenset = frozenset()
  changes_base: bool = False
  residual: bool = False
  variants: Optional[tuple[str, ...]] = None
  check: Callable[[str, LeafSpec], None] = lambda path, spec: None
  factors: Optional[Callable[[jax.Array, Any, LeafSpec], tuple]] = None
  calibrate: Optional[Callable[..., dict]] = None
  stop: Optional[Callable[[dict], Callable[[dict], bool]]] = None
  parse: Optional[Callable[[str], Optional[dict]]] = None

  @property
  def sets_factors(self) -> bool:
    """Whether it sets both factors (the variant builds its state with `from_factors`)."""
    return self.factors is not None or self.calibrate is not None

  @property
  def calibrated(self) -> bool:
    return bool(self.needs & {GRADIENTS, ACTIVATIONS})


_REGISTRY: dict[str, Init] = {}


def register(init: Init) -> Init:
  """Registers an `Init` record under its name (a plugin hook for research code).

  Raises:
    ValueError: for a taken name, or `needs` outside `NEEDS`.
  """
  if not isinstance(init, Init):
    raise ValueError(f'register takes an Init record; got {init!r}.')
  if init.name in _REGISTRY:
    raise ValueError(f'Init {init.name!r} is already registered.')
  bad = sorted(set(init.needs) - set(NEEDS))
  if bad:
    raise ValueError(f'Init {init.name!r} needs {bad}; allowed: {list(NEEDS)}.')
  _REGISTRY[init.name] = init
  return init


def names() -> tuple[str, ...]:
  """The registered init names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> Init:
  """The record registered as `name`; ValueError naming the allowed ones otherwise."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown init {name!r}; allowed: {list(_REGISTRY)}.')
  return _REGISTRY[name]


def resolve(name: Any) -> tuple[str, dict] | None:
  """`(registered name, implied options)` for a name or one of its other spellings, or None."""
  if not isinstance(name, str):
    return None
  if name in _REGISTRY:
    return name, {}
  for init in _REGISTRY.values():
    if init.parse is not None:
      options = init.parse(name)
      if options is not None:
        return init.name, dict(options)
  return None


def changes_base(name: Any) -> bool:
  """Whether the init called `name` (any spelling, e.g. PEFT's `init_lora_weights` value
  `'pissa_niter_4'`) replaces the base leaf; False for a name that is not a registered init."""
  got = resolve(name)
  return got is not None and _REGISTRY[got[0]].changes_base


def is_int(v: Any, lo: int) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def bad_option(path: str, spec: LeafSpec, key: str, allowed: str) -> ValueError:
  """The ValueError for an init option value outside what the init takes."""
  return ValueError(f'init_options {key}={spec.init_opt(key)!r} for {path!r} ({spec.init}) must '
                    f'be {allowed}.')
