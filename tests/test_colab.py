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
