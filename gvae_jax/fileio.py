"""Crash-safe file writing, shared by the codec (.gvae bitstreams) and image output.

Nothing here imports another gvae_jax module, JAX or TensorFlow.
"""
from __future__ import annotations

import errno
import os
import secrets

_TEMP_NAME_STEM_MAX = 100  # keeps ".<stem>.<random>.tmp" under the usual 255-byte name limit


def _create_temp_file(directory: str, name: str) -> tuple[int, str]:
  """Opens a new hidden file next to the target; returns (fd, path)."""
  stem = name[:_TEMP_NAME_STEM_MAX]
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
  for _ in range(100):
    temp_path = os.path.join(directory, f".{stem}.{secrets.token_hex(6)}.tmp")
    try:
      # Mode 0o666 lets the OS apply the umask, so the result gets the same
      # permissions as a file written with open() (tempfile would give 0o600).
      return os.open(temp_path, flags, 0o666), temp_path
    except FileExistsError:
      continue
  raise FileExistsError(errno.EEXIST, "could not find a free temporary file name", directory)


def _fsync_directory(directory: str) -> None:
  # Makes the rename itself durable; not possible on every OS or file system.
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _exists_error(path: str) -> FileExistsError:
  return FileExistsError(errno.EEXIST, "file already exists; refusing to overwrite it "
                         "(pass overwrite=True to replace it)", path)


def _publish_without_clobbering(temp_path: str, path: str) -> None:
  try:
    # A hard link fails if `path` exists, atomically: no window in which a file
    # created by someone else after our check could be replaced.
    os.link(temp_path, path)
  except FileExistsError:
    raise _exists_error(path) from None
  except OSError:
    # File systems without hard links (FAT, some network mounts): check, then rename.
    if os.path.lexists(path):
      raise _exists_error(path) from None
    os.replace(temp_path, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview,
                       overwrite: bool = False) -> None:
  """Writes `data` to `path` so that it holds either nothing new or all of it.

  The bytes go to a temporary file in the same directory, are fsynced, and
  only then get the final name (os.replace / os.link, both atomic within a
  directory), so an error, a full disk or a crash never leaves a partial
  file under `path`, and with overwrite=True the old file stays intact until
  the new one is complete. Without overwrite an existing `path` raises
  FileExistsError before anything is written. Other failures raise the
  underlying OSError; the temporary file is removed either way.
  """
  path = os.fspath(path)
  if not overwrite and os.path.lexists(path):
    raise _exists_error(path)
  if os.path.isdir(path):
    raise IsADirectoryError(errno.EISDIR, "is a directory", path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, temp_path = _create_temp_file(directory, os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as temp_file:
      temp_file.write(data)
      temp_file.flush()
      os.fsync(temp_file.fileno())
    if overwrite:
      os.replace(temp_path, path)
    else:
      _publish_without_clobbering(temp_path, path)
  finally:
    # After os.replace the temporary name is gone; after os.link or a failure it is not.
    try:
      os.unlink(temp_path)
    except OSError:  # already renamed, or cleanup impossible: never mask the real error
      pass
  _fsync_directory(directory)
