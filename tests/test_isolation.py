"""The `isolated` marker (tests/conftest.py) really runs a test in a child process."""
import os

import pytest


@pytest.mark.isolated
def test_isolated_test_runs_in_a_child_process():
  assert os.environ.get("GVAE_TESTS_ISOLATED_CHILD") == "1"


def test_other_tests_run_in_the_main_process():
  assert "GVAE_TESTS_ISOLATED_CHILD" not in os.environ
