"""The examples in public docstrings run (those marked `# doctest: +SKIP` need a model)."""

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj

MODULES = sorted(m.name for m in pkgutil.walk_packages(lj.__path__, 'lorax_jax.'))


def _examples(name):
  module = importlib.import_module(name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  return [t for t in finder.find(module, name, globs=vars(module).copy()) if t.examples]


def test_there_are_doctests_to_run():
  ran = [t for name in MODULES for t in _examples(name)
         if any(not e.options.get(doctest.SKIP) for e in t.examples)]
  assert len(ran) >= 2, [t.name for t in ran]


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in _examples(name):
    test.globs.update(jax=jax, jnp=jnp, np=np, lj=lj)
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f'{result.failed} docstring example(s) of {name} failed'
