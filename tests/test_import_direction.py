"""Imports point one way (README, Layout): parsed from the source, lazy imports included.

A module of gvae_jax may import modules of its own unit (package or top-level
module) and of units in lower layers only, and no chain of imports may lead
back to where it started. The README's layout list names every module.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gvae_jax"

# Lowest first. A unit may import its own modules and those of lower layers.
LAYERS = (
    ("errors", "fileio"),
    ("ops", "gain", "metrics", "config", "image_io"),
    ("layers", "entropy"),
    ("models",),
    ("coding",),
    ("eval", "data"),
    ("train", "sweep"),
    ("cli",),
    ("__main__",),
)
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
  """gvae_jax modules `path` imports anywhere in its body (functions too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split(".")[0] == "gvae_jax")
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
        and node.module.split(".")[0] == "gvae_jax":
      for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        found.add(submodule if submodule in modules else node.module)
  return found


def _unit(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "gvae_jax"


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_unit_has_a_layer():
  units = {_unit(m) for m in _modules()} - {"gvae_jax"}
  assert units <= set(LAYER_OF), f"give these a layer in LAYERS: {sorted(units - set(LAYER_OF))}"


def test_no_import_points_back_against_the_layers():
  wrong = []
  for module, imported in _graph().items():
    unit = _unit(module)
    if unit == "gvae_jax":
      continue  # the package's own __init__
    for target in imported:
      other = _unit(target)
      if other == unit or other == "gvae_jax":
        continue
      if LAYER_OF[other] >= LAYER_OF[unit]:
        wrong.append(f"{module} -> {target}")
  assert not wrong, "imports against the layer order " + " < ".join(
      "/".join(units) for units in LAYERS) + ": " + ", ".join(sorted(wrong))


def test_no_import_cycles():
  graph = _graph()
  modules = set(graph)
  state: dict[str, int] = {}  # 1 on the current path, 2 finished
  cycles = []

  def visit(module, path):
    state[module] = 1
    for target in sorted(graph[module] & modules):
      if state.get(target) == 1:
        cycles.append(" -> ".join(path[path.index(target):] + [target]))
      elif target not in state:
        visit(target, path + [target])
    state[module] = 2

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_backward_and_a_lazy_import(tmp_path):
  source = "def f():\n  from gvae_jax.train import checkpoints\n  import gvae_jax.cli\n"
  path = tmp_path / "probe.py"
  path.write_text(source)
  modules = {"gvae_jax.train.checkpoints": path, "gvae_jax.cli": path}
  assert _imports(path, modules) == {"gvae_jax.train.checkpoints", "gvae_jax.cli"}
  assert LAYER_OF[_unit("gvae_jax.train.checkpoints")] > LAYER_OF["coding"]


def _readme_layout() -> set[str]:
  """Paths of the .py files listed in the README's Layout block (two spaces a level)."""
  text = (REPO / "README.md").read_text()
  section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
  block = re.search(r"```\n(.*?)```", section, re.S).group(1)
  listed, folders = set(), []
  for line in block.splitlines():
    match = re.match(r"^( *)(\S+)", line)
    if not match:
      continue
    depth, name = len(match.group(1)) // 2, match.group(2)
    if depth > len(folders) or not (name.endswith("/") or name.endswith(".py")):
      continue  # a wrapped description
    del folders[depth:]
    if name.endswith("/"):
      folders.append(name)
    elif folders and folders[0] == "gvae_jax/":
      listed.add("".join(folders) + name)
  return listed


def test_readme_layout_lists_every_module():
  actual = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
  listed = _readme_layout()
  if not listed:
    pytest.fail("README.md: no module list in the Layout section")
  assert sorted(actual - listed) == [], "modules missing from the README layout"
  assert sorted(listed - actual) == [], "README layout lists modules that do not exist"


def test_cited_documents_are_in_the_repository():
  """The code cites docs/*.md for the facts it relies on, never a file outside the repo."""
  cited, outside = set(), []
  for path in [*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"), REPO / "README.md"]:
    text = path.read_text()
    cited.update(re.findall(r"docs/[\w-]+\.md", text))
    if re.search(r"REFERENCE(\.md| section)", text) and path != Path(__file__):
      outside.append(str(path.relative_to(REPO)))
  assert not outside, f"cite docs/ instead of an outside REFERENCE: {outside}"
  assert cited and all((REPO / doc).is_file() for doc in cited), sorted(cited)
