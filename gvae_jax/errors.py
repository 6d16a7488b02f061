"""The base of every error the command line reports as a message, not a traceback."""


class UserError(Exception):
  """Bad input from the user: a clear message and a non-zero exit code."""

  exit_code = 2
