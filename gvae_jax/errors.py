"""The base of every error the command line reports as a message, not a traceback."""
import sys
from typing import Callable


class UserError(Exception):
  """Bad input from the user: a clear message and a non-zero exit code."""

  exit_code = 2


def report_user_errors(body: Callable[[], object]) -> int:
  """Exit code of a script's main: 0 after body(), or the UserError's code
  after its one-line message (the `gvae` CLI has its own, fuller handler)."""
  try:
    body()
  except UserError as e:
    print(f"gvae: error: {e}", file=sys.stderr)
    return e.exit_code
  return 0
