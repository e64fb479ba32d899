"""Import-graph check of etalk_jax and data_pipeline: no import cycles, and the lower layers
(layers/ and the model packages) import nothing from the packages above them.

Every `import` / `from ... import` of a module is read with `ast`, at any depth (a deferred
import inside a function closes a cycle as surely as a top-level one), and becomes an edge to the
project module it names (`from pkg import name` names `pkg.name` when that is a module, else
`pkg`). Run `python tools/check_imports.py`: prints each cycle and each layering breach with its
import chain, exit status 1 if there is any. tests/test_import_graph.py runs it in the suite.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("etalk_jax", "data_pipeline")
# Layering: modules under LOWER reach nothing under UPPER, directly or through other modules.
# The evaluation networks are a lower layer; `etalk eval` (evaluation.command), which generates
# with a pipeline first, is an upper one.
LOWER = tuple(f"etalk_jax.{name}" for name in (
    "layers", "svd", "ethd", "audio", "vision", "vaid", "emotion", "diffusion", "evaluation"))
UPPER = tuple(f"etalk_jax.{name}" for name in ("parallel", "train", "pipeline", "demo", "cli",
                                               "app", "evaluation.command"))

Graph = dict[str, set[str]]


def module_name(path: Path, root: Path = ROOT) -> str:
  parts = path.relative_to(root).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool, modules: set[str]
                     ) -> set[str]:
  """The modules of `modules` that the imports in `tree` name, relative imports resolved
  against `module`. `from pkg import a, b` names `pkg.a` and `pkg.b` where those are modules
  and `pkg` where one is not (a name defined in pkg/__init__.py)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = module.split(".")[:len(module.split(".")) - node.level + is_package]
        base = ".".join(package + ([base] if base else []))
      submodules = {f"{base}.{alias.name}" for alias in node.names}
      names.update(submodules & modules)
      if not submodules <= modules:
        names.add(base)
  return names & modules


def build_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Graph:
  """`{module: project modules it imports}` of every module of `packages` under `root`."""
  files = {module_name(path, root): path
           for package in packages for path in sorted((root / package).rglob("*.py"))}
  graph: Graph = {}
  for module, path in files.items():
    graph[module] = imported_modules(ast.parse(path.read_text(), str(path)), module,
                                     path.name == "__init__.py", set(files)) - {module}
  return graph


def cycles(graph: Graph) -> list[list[str]]:
  """One cycle `[a, b, ..., a]` through each strongly connected component of more than one
  module (Tarjan's algorithm, iteratively)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components = []
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = set()
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.add(member)
          if member == node:
            break
        if len(component) > 1:
          components.append(component)
  found = []
  for component in components:
    first = min(component)
    back = min(child for child in graph[first] if child in component)
    found.append([first] + shortest_chain(graph, back, lambda name: name == first,
                                          within=component))
  return sorted(found)


def shortest_chain(graph: Graph, source: str, reached, within: set[str] | None = None
                   ) -> list[str]:
  """The shortest import chain `[source, ..., m]` (breadth first) to a module m other than
  `source` for which `reached(m)` holds, through modules of `within` only if given; [] if
  there is none."""
  parents: dict[str, str | None] = {source: None}
  queue = deque([source])
  while queue:
    node = queue.popleft()
    for child in sorted(graph[node]):
      if child in parents or (within is not None and child not in within):
        continue
      parents[child] = node
      if reached(child):
        chain = [child]
        while parents[chain[-1]] is not None:
          chain.append(parents[chain[-1]])
        return chain[::-1]
      queue.append(child)
  return []


def under(module: str, packages: tuple[str, ...]) -> bool:
  return any(module == package or module.startswith(package + ".") for package in packages)


def layering_breaches(graph: Graph) -> list[list[str]]:
  """For each lower module that reaches an upper one, the shortest such chain."""
  chains = (shortest_chain(graph, module, lambda name: under(name, UPPER))
            for module in sorted(graph) if under(module, LOWER) and not under(module, UPPER))
  return [chain for chain in chains if chain]


def problems(root: Path = ROOT) -> list[str]:
  """One line per import cycle and per layering breach; empty when the graph is clean."""
  graph = build_graph(root)
  return ([f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
          + [f"{chain[0]} (a lower layer) imports {chain[-1]}: {' -> '.join(chain)}"
             for chain in layering_breaches(graph)])


def main() -> int:
  found = problems()
  print("\n".join(found) or f"import graph of {', '.join(PACKAGES)}: no cycles, layering kept")
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main())
