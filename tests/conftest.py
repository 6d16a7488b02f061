import os

# Tests run on the CPU with two fake devices, so the data-parallel (mesh) code paths are exercised.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import functools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def repo_root() -> Path:
  return REPO


@pytest.fixture
def kodak_dir() -> Path:
  folder = SHARED_DATA / "kodak"
  if not folder.is_dir():
    pytest.skip(f"needs the Kodak images at {folder} (../shared/data beside the checkout)")
  return folder


# Tests marked `isolated` run in a fresh interpreter. In-process training mixes
# the TF input pipeline, Orbax's threads and JAX in one process that has
# already run hundreds of tests; a full run once died there with a segfault
# that neither file reproduces alone. A fresh process keeps such a crash (and
# its state) away from the rest of the suite, and the child's report is shown
# when it fails.
_ISOLATED_CHILD = "GVAE_TESTS_ISOLATED_CHILD"


def pytest_collection_modifyitems(config, items):
  # The few long end-to-end tests first: with several workers (README, "Tests")
  # the short ones then fill in beside them instead of waiting at the end.
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
  if os.environ.get(_ISOLATED_CHILD):
    return
  for item in items:
    if item.get_closest_marker("isolated"):
      item.runtest = functools.partial(_run_in_fresh_process, item)


def _run_in_fresh_process(item):
  command = [sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider",
             item.nodeid]
  env = dict(os.environ, **{_ISOLATED_CHILD: "1"})
  for attempt in (1, 2):
    result = subprocess.run(command, cwd=item.config.rootpath, env=env, capture_output=True,
                            text=True, timeout=1200)
    # A negative code is a death by signal: retried once, and reported.
    if result.returncode >= 0 or attempt == 2:
      break
    warnings.warn(f"{item.nodeid}: the test process died with signal {-result.returncode}; "
                  "ran it again in a new process", RuntimeWarning)
  if result.returncode != 0:
    report = (result.stdout + result.stderr)[-6000:]
    pytest.fail(f"isolated run exited with {result.returncode}:\n{report}", pytrace=False)
