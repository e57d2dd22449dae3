"""The import graph of ssmax follows its layers: every import points to a lower layer or stays in
its own package, and there is no circle (lazy imports inside functions included)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ssmax"

# Lowest first; a module may import modules of its own layer's package or of lower layers.
LAYERS = [
    ["ssmax._checks"],
    ["ssmax.hippo", "ssmax.discretize", "ssmax.lti"],
    ["ssmax.sharding"],
    ["ssmax.pallas"],
    ["ssmax.scan"],
    ["ssmax.io"],
    ["ssmax.nn"],
    ["ssmax.parallel"],
    ["ssmax"],  # the package's own __init__, re-exporting
]


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every ssmax module ``path`` imports, at any depth of its code."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("ssmax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssmax"):
      for a in node.names:  # `from ssmax import lti` imports the module ssmax.lti
        sub = f"{node.module}.{a.name}"
        found.add(sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists()
                  or (ROOT.parent / sub.replace(".", "/")).is_dir() else node.module)
  return found


def _layer(module: str) -> int:
  best = None
  for i, prefixes in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
        best = (i, len(p))
  assert best is not None, f"{module} is in no layer of this test: add it to LAYERS"
  return best[0]


GRAPH = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_layers(module):
  for target in GRAPH[module]:
    if target == "ssmax" and module != "ssmax":
      pytest.fail(f"{module} imports the package root ssmax; import the module it needs")
    same_package = _layer(target) == _layer(module)
    assert _layer(target) < _layer(module) or same_package, (
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")


def test_no_import_circle():
  def normalise(m):  # an import of a package means its __init__ module
    return m if m in GRAPH else m.rsplit(".", 1)[0]

  state = {}

  def visit(m, stack):
    state[m] = "open"
    for t in sorted(GRAPH.get(m, ())):
      t = normalise(t)
      if t not in GRAPH or t == m:
        continue
      # A module importing its own package's __init__ for a sibling is the sibling import.
      if state.get(t) == "open":
        pytest.fail("import circle: " + " -> ".join(stack + [m, t]))
      if t not in state:
        visit(t, stack + [m])
    state[m] = "done"

  for m in sorted(GRAPH):
    if m not in state:
      visit(m, [])
