"""The package's import graph (every import statement, function-level ones included) is acyclic."""

import ast
import pathlib

import lorax_jax

ROOT = pathlib.Path(lorax_jax.__file__).parent
PKG = 'lorax_jax'


def _modules():
  out = {}
  for path in sorted(ROOT.rglob('*.py')):
    rel = path.relative_to(ROOT.parent).with_suffix('')
    parts = rel.parts[:-1] if rel.name == '__init__' else rel.parts
    out['.'.join(parts)] = path
  return out


def _resolve(name, modules):
  """The module an imported name refers to: itself if a module, else its package."""
  while name and name not in modules:
    name = name.rpartition('.')[0]
  return name or None


def import_graph():
  """`{module: {imported module}}` over lorax_jax, for imports at any depth.

  `from pkg import name` points at `pkg.name` when that is a module, else at `pkg` (its
  `__init__`). The parent packages Python initializes on the way are not edges: a package's
  `__init__` is its facade, above what it re-exports.
  """
  modules = _modules()
  graph = {}
  for mod, path in modules.items():
    is_pkg = path.name == '__init__.py'
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = mod.split('.') if is_pkg else mod.split('.')[:-1]
          base = base[:len(base) - node.level + 1]
          prefix = '.'.join(base + ([node.module] if node.module else []))
        else:
          prefix = node.module or ''
        names = [f'{prefix}.{a.name}' if f'{prefix}.{a.name}' in modules else prefix
                 for a in node.names]
      else:
        continue
      for name in names:
        if name == PKG or name.startswith(PKG + '.'):
          target = _resolve(name, modules)
          if target and target != mod:
            edges.add(target)
    graph[mod] = edges
  return graph


def find_cycle(graph):
  """One import cycle as a list of modules (first == last), or None."""
  state = {}
  stack = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_graph_sees_function_level_imports():
  graph = import_graph()
  assert len(graph) > 20
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


# DESIGN.md section 7: each module's layer; imports go only to the same layer or below. The
# reference models, datasets and metrics sit beside the library, between the families (which
# they may use: a loader quantizes) and the user API.
LAYERS = {
    0: ('paths', 'select', 'leafspec', 'joined', 'layout', 'spec_json'),
    1: ('variants', 'inits', 'quant', 'interpreter', 'dynamics', 'usage', 'calibration'),
    1.5: ('models', 'data', 'metrics'),
    2: ('spec', 'adapters', 'training', 'sharding', 'mesh', 'checkpoints', 'merging'),
    3: ('interop',),
}


def _layer(module):
  if module == PKG:
    return 4   # the flat public facade, above everything
  top = module.split('.')[1]
  for layer, names in LAYERS.items():
    if top in names:
      return layer
  raise AssertionError(f'{module} has no layer: add it to LAYERS (and to DESIGN.md section 7)')


def test_imports_only_go_down_the_layers():
  upward = [f'{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})'
            for m, targets in sorted(import_graph().items()) for t in sorted(targets)
            if _layer(t) > _layer(m)]
  assert not upward, '\n'.join(upward)
