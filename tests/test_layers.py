"""The import rule of docs/ARCHITECTURE.md, read from the source (function-level imports included): no import circles,
no private name imported across modules, no edge from a lower layer up to a higher one, tests never import tests."""

import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = {"maxlm": "maxlm", "kernels": "maxlm.kernels", "data_pipelines": "maxlm.data_pipelines"}

# Lowest first. A module may import its own layer and those below it, never one above.
LAYERS = (
    ("maxlm", "maxlm.core"),
    ("maxlm.losses", "maxlm.data_pipelines"),
    ("maxlm.kernels",),
    ("maxlm.model", "maxlm.model_text"),
    ("maxlm.checkpoint",),
    ("maxlm.state",),
    ("maxlm.hf",),
    ("maxlm.pretrained",),
    ("maxlm.run", "maxlm.evals", "maxlm.decoding", "maxlm.analysis"),
    ("maxlm.train", "maxlm.convert", "maxlm.evaluate", "maxlm.generate", "maxlm.analyze", "maxlm.data", "maxlm.plot"),
)


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT)
  parts = list(rel.with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join([FOLDERS[parts[0]]] + parts[1:])


def modules() -> dict[str, pathlib.Path]:
  return {module_name(f): f for folder in FOLDERS for f in (ROOT / folder).rglob("*.py")}


def imports(mods: dict[str, pathlib.Path]) -> tuple[dict[str, set], list[str]]:
  """(module -> internal modules it imports anywhere in its body, private names imported across modules)."""
  edges, private = collections.defaultdict(set), []
  for name, path in mods.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom):
        base = package
        for _ in range(max(node.level - 1, 0)):
          base = base.rpartition(".")[0]
        target = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
        for alias in node.names:
          full = f"{target}.{alias.name}"
          hit = full if full in mods else target
          if hit in mods and hit != name:
            edges[name].add(hit)
            if alias.name.startswith("_") and not alias.name.startswith("__") and full not in mods:
              private.append(f"{name} imports {target}.{alias.name}")
      elif isinstance(node, ast.Import):
        edges[name].update(a.name for a in node.names if a.name in mods and a.name != name)
  return edges, private


def layer_of(module: str) -> int:
  best, found = -1, None
  for i, names in enumerate(LAYERS):
    for prefix in names:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
        best, found = len(prefix), i
  if found is None:
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)")
  return found


def circles(edges: dict[str, set]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in list(edges):
    if v not in index:
      visit(v)
  return out


@pytest.fixture(scope="module")
def graph():
  mods = modules()
  edges, private = imports(mods)
  # A package's __init__ re-exporting its children is not a dependency of the children on the package.
  for name in mods:
    edges[name] = {t for t in edges[name] if not (name.startswith(t + ".") and mods[t].name == "__init__.py")}
  return mods, edges, private


def test_no_import_circles(graph):
  _, edges, _ = graph
  assert circles(edges) == []


def test_no_private_names_across_modules(graph):
  assert graph[2] == []


def test_layers_import_downward_only(graph):
  mods, edges, _ = graph
  upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
            for a in sorted(mods) for b in sorted(edges[a]) if layer_of(b) > layer_of(a)]
  assert upward == []


def test_every_module_has_a_layer(graph):
  for name in graph[0]:
    layer_of(name)


def test_the_checker_sees_a_circle_and_an_upward_edge():
  """The rule is not vacuous: a circle and an upward import are found when present."""
  assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert layer_of("maxlm.core.config") < layer_of("maxlm.state.layout") < layer_of("maxlm.train")


def test_tests_do_not_import_tests():
  names = {p.stem for p in ROOT.joinpath("tests").rglob("test_*.py")}
  found = []
  for path in ROOT.joinpath("tests").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      targets = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
          [a.name for a in node.names] if isinstance(node, ast.Import) else [])
      found += [f"{path.name} imports {t}" for t in targets if t.rpartition(".")[2] in names]
  assert found == []
