"""The Colab notebooks run top to bottom against the committed models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))


def notebook_source(path: Path) -> str:
  cells = json.loads(path.read_text())["cells"]
  return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
  source = notebook_source(path)
  assert "!" not in [line.strip()[:1] for line in source.splitlines()], "no shell magics"
  script = tmp_path / "notebook.py"
  script.write_text(source)
  # A generated image keeps the test quick and independent of ../shared.
  env = dict(os.environ, MPLBACKEND="Agg", GVAE_EXAMPLE_IMAGE=str(tmp_path / "none.png"))
  result = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "bpp" in result.stdout


def notebook_install_command(path: Path) -> list[str]:
  """The pip arguments of the notebook's install cell."""
  import ast
  for node in ast.walk(ast.parse(notebook_source(path))):
    if isinstance(node, ast.List) and any(
        isinstance(e, ast.Constant) and e.value == "install" for e in node.elts):
      args = [e.value for e in node.elts if isinstance(e, ast.Constant)]
      return args[args.index("install"):]
  raise AssertionError("no pip install in the notebook")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_install_keeps_the_runtime_jax_and_numpy(path):
  """Colab comes with current jax and numpy: the install cell must not change them.

  Resolved here against this environment (a dry run): nothing but gvae-jax
  itself would be installed, so in particular nothing is downgraded."""
  args = notebook_install_command(path)
  assert "-c" not in args and "--constraint" not in args
  result = subprocess.run([sys.executable, "-m", "pip", *args, "--dry-run",
                           "--report", "-", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  if result.returncode != 0 and "NewConnectionError" in result.stderr:
    pytest.skip("no package index reachable")
  assert result.returncode == 0, result.stderr[-2000:]
  installs = [item["metadata"]["name"] for item in json.loads(result.stdout)["install"]]
  assert installs == ["gvae-jax"], installs
