"""One row per registered interpreter rule (more, with names, for variants of its use): the rule
runs, in strict mode, and the result matches the float64 merged reference (and the dequantized
one for a quantized base where the rule says how a quantized leaf moves); plus a test that every
registered rule has a row, and that a first-order rule that declines says why."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import pytest

import lorax_jax as lj
from lorax_jax.interpreter import base, quantw
from tests import helpers

X = jax.random.normal(jax.random.key(99), (4, 6))
IMG = jax.random.normal(jax.random.key(98), (2, 5, 5, 3))
IMG6 = jax.random.normal(jax.random.key(96), (2, 5, 5, 6))
IDS = jax.random.randint(jax.random.key(97), (4, 3), 0, 6)


@dataclasses.dataclass(frozen=True)
class Row:
  rule: str                                   # the canonical primitive name
  fn: Callable[..., Any]
  shape: tuple[int, ...] = (6, 5)
  setting: dict = dataclasses.field(default_factory=dict)
  args: tuple = (X,)
  dtype: Any = jnp.float32
  quant: bool = False                         # also on a quantized base (adapted and bare)
  # Where the rule declines (returns None): `(fn, args, primitive named in the error)`; W + dW
  # is materialized (an error in strict mode, a warning and the right result otherwise).
  declines: Any = None
  # What `infer_axes` finds for W when it differs from the spec's axes (rules with `infer`).
  axes: Any = None
  # The test id, where a rule has more than one row (a variant of its use).
  name: str = ''

  @property
  def id(self) -> str:
    return self.name or self.rule


def _closed_call(w, x):
  """JAX stages the known part of a checkpointed scan's gradient as a `closed_call`."""
  def f(w, x):
    return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=2)[0].sum()
  return jax.grad(jax.checkpoint(f), argnums=1)(w, x)


def _one_device(w):
  return jax.lax.with_sharding_constraint(w, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def _while(w, x):
  return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)),
                            (0, x))[1]


def _scan(w, x):
  return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]


ROWS = [
    Row('dot_general', lambda p, x: x @ p['w'], quant=True,
        declines=(lambda p, x: x[:, :5] @ (p['w'].T @ p['w']), (X,), 'dot_general')),
    Row('conv_general_dilated', lambda p, x: jax.lax.conv_general_dilated(
        x, p['w'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')),
        shape=(3, 3, 3, 4), setting={'in_axes': (0, 1, 2)}, args=(IMG,), quant=True,
        declines=(lambda p, x: jax.lax.conv_general_dilated(     # a batch-grouped convolution
            x, p['w'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            batch_group_count=2), (IMG,), "conv_general_dilated': batch_group_count=2")),
    Row('conv_general_dilated', lambda p, x: jax.lax.conv_general_dilated(
        x, p['w'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=2), name='conv_general_dilated-grouped', shape=(3, 3, 3, 4),
        setting={'in_axes': (0, 1, 2)}, args=(IMG6,), quant=True),
    Row('gather', lambda p, ids: jnp.take(p['w'], ids, axis=0), args=(IDS,), quant=True,
        declines=(lambda p, ids: jnp.take(p['w'], ids[0, :2] % 5, axis=1), (IDS,), 'gather')),
    Row('transpose', lambda p, x: (p['w'].T @ x.T).T, quant=True),
    Row('reshape', lambda p, x: x @ p['w'].reshape(6, 6), shape=(6, 2, 3),
        setting={'in_axes': 0}, quant=True,
        declines=(lambda p, x: x[:, :2] @ p['w'].reshape(2, 18), (X,), 'reshape')),
    Row('squeeze', lambda p, x: x @ jnp.squeeze(p['w'], 1), shape=(6, 1, 5),
        setting={'in_axes': 0}, quant=True,
        axes=((1,), (0,), (2,))),       # an axis no consumer uses counts as a batch axis
    Row('broadcast_in_dim', lambda p, x: jnp.einsum('bi,iyo->bo', x, p['w'][:, None, :]),
        quant=True, declines=(lambda p, x: jnp.einsum(
            'bi,zio->bzo', x, jnp.broadcast_to(p['w'], (2, 6, 5))), (X,), 'broadcast_in_dim')),
    Row('reduce_sum', lambda p, x: x @ jnp.sum(jnp.expand_dims(p['w'], 0), axis=0),
        quant=True,
        declines=(lambda p, x: x @ p['w'].sum(1, keepdims=True), (X,), 'reduce_sum')),
    Row('slice', lambda p, x: x[:, :4] @ p['w'][:4, 1:], quant=True),
    Row('dynamic_slice', lambda p, x, i: x[:, :4] @ jax.lax.dynamic_slice(
        p['w'], (i, jnp.zeros_like(i)), (4, 5)),
        args=(X, jnp.int32(1)), quant=True),
    Row('convert_element_type', lambda p, x: x @ p['w'].astype(jnp.float32),
        setting={'dtype': jnp.float32}, dtype=jnp.bfloat16, quant=True),
    Row('copy', lambda p, x: x @ jnp.array(p['w'], copy=True), quant=True),
    Row('sharding_constraint', lambda p, x: x @ _one_device(p['w']), quant=True),
    Row('jit', lambda p, x: jax.jit(lambda w, x: x @ w)(p['w'], x), quant=True),
    Row('closed_call', lambda p, x: _closed_call(p['w'], x), shape=(6, 6), quant=True),
    Row('checkpoint', lambda p, x: jax.checkpoint(lambda w, x: x @ w)(p['w'], x), quant=True),
    Row('scan', lambda p, x: _scan(p['w'], x), shape=(3, 6, 6), setting={'batch_axes': 0},
        quant=True, declines=(lambda p, x: jax.lax.scan(    # not stacked on the scanned axis
            lambda c, wi: (c, x @ wi), 0.0, jnp.swapaxes(p['w'], 0, 2))[1], (X,), 'scan xs')),
    Row('while', lambda p, x: _while(p['w'], x), shape=(6, 6), quant=True,
        declines=(lambda p, x: jax.lax.while_loop(
            lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ c[2], 0.5 * c[2]), (0, x, p['w']))[1],
                  (X,), 'while carry')),
    Row('cond', lambda p, x, flag: jax.lax.cond(flag, lambda h: h @ p['w'],
                                                lambda h: jnp.tanh(h @ p['w']), x),
        args=(X, True), quant=True,
        declines=(lambda p, x, flag: x @ jax.lax.cond(flag, lambda: p['w'].T.T, lambda: p['w']),
                  (X, True), 'cond output')),
]


def _setup(row: Row):
  w = jax.random.normal(jax.random.key(0), row.shape).astype(row.dtype)
  params = {'w': w}
  spec = lj.make_spec(params, [('w', {'rank': 2, **row.setting})])
  return params, spec


@pytest.fixture
def calls(monkeypatch):
  """Counts, per canonical name, the calls of each registered rule that returned outputs, and
  of the deferred dequantization of a bare quantized operand."""
  counts = {'factored': {}, 'quant': {}}

  def counting(name, fn):
    def wrapped(*a):
      out = fn(*a)
      if out is not None and not isinstance(out, base.Declined):
        counts['factored'][name] = counts['factored'].get(name, 0) + 1
      return out
    return wrapped

  for name in base.names():
    rule = base.get(name)
    monkeypatch.setitem(base._RULES, name,
                        dataclasses.replace(rule, factored=counting(name, rule.factored)))
  deferred = quantw.deferred

  def deferred_counting(rule, eqn, invals):
    out = deferred(rule, eqn, invals)
    if out is not None:
      counts['quant'][rule.name] = counts['quant'].get(rule.name, 0) + 1
    return out

  monkeypatch.setattr(quantw, 'deferred', deferred_counting)
  return counts


def test_every_registered_rule_has_a_row():
  rows = {row.rule for row in ROWS}
  missing = sorted(set(base.names()) - rows)
  assert not missing, f'registered interpreter rules without a row in ROWS: {missing}'
  assert len({row.id for row in ROWS}) == len(ROWS), 'a name for each extra row of a rule'
  assert not rows - set(base.names()), f'rows of unregistered rules: {rows - set(base.names())}'


@pytest.mark.parametrize('row', ROWS, ids=lambda r: r.id)
def test_rule_factored_matches_float64(row, calls):
  params, spec = _setup(row)
  params, adapters = lj.init(jax.random.key(1), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(2))
  out = jax.jit(lj.lora(row.fn, strict=True))(lj.join(params, adapters), *row.args)
  assert calls['factored'].get(row.rule), f'the {row.rule!r} rule did not run'
  ref = helpers.f64_reference(row.fn, params, adapters, *row.args)
  base_out = helpers.f64_reference(row.fn, params, {}, *row.args)
  assert helpers.rel_err(base_out, ref) > 1e-2, 'the adapter must change the output'
  assert helpers.rel_err(out, ref) < 1e-5


@pytest.mark.parametrize('row', [r for r in ROWS if r.quant], ids=lambda r: r.id)
def test_rule_on_a_quantized_base_matches_float64(row, calls):
  params, spec = _setup(row)
  qparams = lj.quantize(params, spec, type='int8')
  deq = lj.dequantize(qparams)
  qparams, adapters = lj.init(jax.random.key(1), qparams, spec)
  adapters = helpers.randomize(adapters, jax.random.key(2))
  out = jax.jit(lj.lora(row.fn, strict=True))(lj.join(qparams, adapters), *row.args)
  assert calls['factored'].get(row.rule), f'the {row.rule!r} rule did not run'
  assert helpers.rel_err(out, helpers.f64_reference(row.fn, deq, adapters, *row.args)) < 1e-5
  # No adapter: the bare quantized leaf moves (or enters the body) as it is.
  calls['factored'].clear()
  bare = jax.jit(lj.lora(row.fn, strict=True))(qparams, *row.args)
  assert helpers.rel_err(bare, helpers.f64_reference(row.fn, deq, {}, *row.args)) < 1e-5
  rule = base.get(row.rule)
  if rule.higher_order:
    assert calls['factored'].get(row.rule), f'the {row.rule!r} body did not take the leaf'
  elif rule.moves_axes or rule.quant is not None:
    assert calls['quant'].get(row.rule), f'{row.rule!r} did not defer dequantization'


@pytest.mark.parametrize('row', [r for r in ROWS if r.declines], ids=lambda r: r.id)
def test_rule_declines_and_w_is_materialized(row):
  fn, args, where = row.declines
  params, spec = _setup(row)
  params, adapters = lj.init(jax.random.key(1), params, spec)
  adapters = helpers.randomize(adapters, jax.random.key(2))
  joined = lj.join(params, adapters)
  with pytest.raises(lj.MaterializeError, match=f"'w' at primitive '?{where}"):
    lj.lora(fn, strict=True)(joined, *args)
  with pytest.warns(lj.MaterializeWarning, match=f"'w' at primitive '?{where}") as record:
    out = lj.lora(fn, strict=False)(joined, *args)
  if not base.get(row.rule).higher_order:   # a first-order rule says why it has no factored form
    assert any(re.search(r"at primitive '\w+': \w", str(w.message)) for w in record), [
        str(w.message) for w in record]
  assert helpers.rel_err(out, helpers.f64_reference(fn, params, adapters, *args)) < 1e-5


@pytest.mark.parametrize('row', ROWS, ids=lambda r: r.id)
def test_rule_infers_the_axes(row):
  params, spec = _setup(row)
  got = lj.infer_axes(row.fn, params, *row.args).get('w')
  if base.get(row.rule).infer is None:
    assert got is None    # the walk stops at this primitive
  else:
    leaf = lj.spec.spec_leaves(spec)['w']
    assert got == (row.axes or (leaf.batch_axes, leaf.in_axes, leaf.out_axes))


def test_register_rejects_a_second_rule_for_a_primitive():
  with pytest.raises(ValueError, match="'pjit'.*already registered"):
    base.register(base.PrimitiveRule('pjit'))


def test_compat_names_resolve_to_one_rule():
  for name, aliases in lj.interpreter.compat.NAMES.items():
    assert all(base.get(a) is base.get(name) for a in aliases)
    assert base.get(name) is not None
