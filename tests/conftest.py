import os

# Tests run on the CPU with two fake devices, so pmap code paths are exercised.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

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
