"""The package's import graph (DESIGN.md): no cycles, and the pure core imports no shell module.

The graph is read from the source with `ast`, imports inside functions included,
so a lazy import cannot hide a cycle.
"""

import ast
import os

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'jaxddpm')
# The pure core: math, networks and solvers. Everything else is the shell (I/O, configs, CLIs).
CORE = ('jaxddpm.schedules', 'jaxddpm.diffusion', 'jaxddpm.objectives',
        'jaxddpm.timesteps', 'jaxddpm.solvers', 'jaxddpm.models')


def _modules() -> dict[str, str]:
  """{dotted module name: file path} of every module of the package."""
  out = {}
  for root, _, names in os.walk(PACKAGE_DIR):
    for name in names:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(root, name), os.path.dirname(PACKAGE_DIR))
        dotted = rel[:-3].replace(os.sep, '.')
        out[dotted.removesuffix('.__init__')] = os.path.join(root, name)
  return out


def _resolve(name: str, modules) -> str | None:
  """The package module that `import name` loads, or None outside the package."""
  while name and name not in modules:
    name = name.rpartition('.')[0]
  return name or None


def _imports(path: str, modules) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from a import b` loads a.b when it is a module, else a.
      names = [f'{node.module}.{alias.name}' for alias in node.names]
    else:
      continue
    found |= {m for m in (_resolve(n, modules) for n in names) if m}
  return found


@pytest.fixture(scope='module')
def graph():
  modules = _modules()
  return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _is_core(module: str) -> bool:
  return any(module == c or module.startswith(c + '.') for c in CORE)


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_graph_is_read(graph):
  # The reader must see real edges, or the checks below could not fail.
  assert 'jaxddpm.diffusion' in graph['jaxddpm.solvers.base']
  assert 'jaxddpm.solvers.driver' in graph['jaxddpm.solvers.repaint']
  assert 'jaxddpm.models.layers' in graph['jaxddpm.models.unet']
  assert 'jaxddpm.checkpoint' in graph['jaxddpm.train']


def test_no_import_cycles(graph):
  assert _cycles(graph) == []


def test_core_imports_no_shell_module(graph):
  bad = {m: sorted(d for d in deps if not _is_core(d))
         for m, deps in graph.items() if _is_core(m)}
  assert {m: d for m, d in bad.items() if d} == {}


def test_cycle_finder_finds_a_lazy_cycle():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_evaluators_reach_neither_the_training_loop_nor_the_sampling_loop(graph):
  # DESIGN.md: evaluators take a sample_fn; training calls them through hooks.
  evaluators = [m for m in graph if m.startswith('jaxddpm.evaluation')]
  assert 'jaxddpm.evaluation.run' in evaluators
  reached, todo = set(), list(evaluators)
  while todo:
    for dep in graph.get(todo.pop(), ()):
      if dep not in reached:
        reached.add(dep)
        todo.append(dep)
  assert reached & {'jaxddpm.train', 'jaxddpm.sample', 'jaxddpm.train_step'} == set()
