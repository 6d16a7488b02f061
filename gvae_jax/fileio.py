"""Safe file input and output, shared by the codec (.gvae bitstreams), image
output, reports and models.

Outputs (`atomic_write_bytes`):
- The bytes go to a temporary file in the target's directory, are fsynced,
  and only then get the final name (os.replace / os.link, both atomic within
  a directory): an error, a full disk or a crash never leaves a partial file
  under the target's name, and an overwritten file stays intact until the
  new one is complete.
- Temporary files are named `.<name>.<pid>.<random>.gvae-partial`. They are
  removed on any error (and on SIGTERM / Ctrl-C, which the CLI turns into
  exceptions); after a SIGKILL or a power cut one may be left behind, and the
  next write to the same target removes such leftovers of processes that no
  longer exist (`remove_stale_partials`).
- Only regular files are ever replaced, even with overwrite=True: an existing
  device node, FIFO, socket, directory or symbolic link (e.g. /dev/null or a
  link to /proc/self/fd/1) is refused with an UnsafePathError, so `--force`
  can never turn a special file into a regular one. A missing, non-directory
  or unwritable output directory is refused before anything is written
  (`check_output_path`; the CLI calls it before the slow coding starts).

Directories (`write_directory_atomically`, for exported models): filled in a
temporary sibling, fsynced, then renamed into place; a replaced directory is
moved aside first and dropped only once the new one has its name.

Inputs (`open_regular_file`): only regular files are read. FIFOs are opened
non-blocking (so opening one never hangs) and refused, like devices such as
/dev/zero, whose "size" is unbounded.

Imports nothing but gvae_jax.errors: no JAX, no TensorFlow.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

try:
  import fcntl
except ImportError:  # Windows: no FIFOs to guard against
  fcntl = None

from gvae_jax.errors import UserError

_TEMP_NAME_STEM_MAX = 100  # keeps the temporary name under the usual 255-byte limit
PARTIAL_SUFFIX = ".gvae-partial"


class UnsafePathError(UserError):
  """A path that must not be read or replaced: a special file, a symlink, a bad directory."""


def _kind(mode: int) -> str:
  for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                     (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                     (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
    if test(mode):
      return name
  return "not a regular file"


def check_output_path(path: str | os.PathLike, overwrite: bool) -> None:
  """Raises unless `path` can be written by atomic_write_bytes right now.

  FileExistsError if it exists and overwrite is False; IsADirectoryError for
  a directory; UnsafePathError for any other existing non-regular file
  (symlinks included) and for a missing, non-directory or unwritable parent.
  Every message names `path` as the user gave it.
  """
  path = os.fspath(path)
  try:
    info = os.lstat(path)
  except FileNotFoundError:
    info = None
  except NotADirectoryError:
    raise UnsafePathError(f"cannot write {path}: a component of its directory is not a "
                          "directory") from None
  if info is not None:
    if not overwrite:
      raise _exists_error(path)
    if stat.S_ISDIR(info.st_mode):
      raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    if not stat.S_ISREG(info.st_mode):
      target = ""
      if stat.S_ISLNK(info.st_mode):
        try:
          target = f" to {os.readlink(path)}"
        except OSError:
          pass
      raise UnsafePathError(f"{path} is {_kind(info.st_mode)}{target}; refusing to replace it, "
                            "even with --force (give a regular file's path)")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.exists(directory):
    raise UnsafePathError(f"cannot write {path}: directory {os.path.dirname(path) or '.'} "
                          "does not exist")
  if not os.path.isdir(directory):
    raise UnsafePathError(f"cannot write {path}: {os.path.dirname(path)} is not a directory")
  if not os.access(directory, os.W_OK | os.X_OK):
    raise UnsafePathError(f"cannot write {path}: no permission to create files in "
                          f"{os.path.dirname(path) or '.'}")


def _partial_prefix(name: str) -> str:
  return f".{name[:_TEMP_NAME_STEM_MAX]}."


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: it exists, owned by someone else
    return True
  return True


def remove_stale_partials(directory: str, name: str) -> list[str]:
  """Removes temporary files for target `name` left by processes that no longer exist.

  Only regular files named exactly `.<name>.<pid>.<12 hex digits>.gvae-partial`
  whose pid is not a running process (on this machine) are removed. Returns
  the removed paths.
  """
  pattern = re.compile(re.escape(_partial_prefix(name)) + r"(\d+)\.[0-9a-f]{12}"
                       + re.escape(PARTIAL_SUFFIX) + r"\Z")
  removed = []
  try:
    entries = os.listdir(directory)
  except OSError:
    return removed
  for entry in entries:
    match = pattern.match(entry)
    if not match or _process_exists(int(match.group(1))):
      continue
    full = os.path.join(directory, entry)
    try:
      if stat.S_ISREG(os.lstat(full).st_mode):
        os.unlink(full)
        removed.append(full)
    except OSError:
      pass
  return removed


def _create_temp_file(directory: str, name: str, user_path: str) -> tuple[int, str]:
  """Opens a new hidden file next to the target; returns (fd, path)."""
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
  flags |= getattr(os, "O_NOFOLLOW", 0)
  for _ in range(100):
    temp_path = os.path.join(directory, f"{_partial_prefix(name)}{os.getpid()}."
                             f"{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
    try:
      # Mode 0o666 lets the OS apply the umask, so the result gets the same
      # permissions as a file written with open() (tempfile would give 0o600).
      return os.open(temp_path, flags, 0o666), temp_path
    except FileExistsError:
      continue
    except OSError as error:  # name the user's path, not our hidden one
      raise OSError(error.errno, error.strerror, user_path) from None
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

  See the module doc. Without overwrite an existing `path` raises
  FileExistsError before anything is written; an existing non-regular file
  raises IsADirectoryError (directories) or UnsafePathError, also with
  overwrite. Other failures raise the underlying OSError, naming `path`;
  the temporary file is removed either way.
  """
  path = os.fspath(path)
  check_output_path(path, overwrite)
  directory = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  remove_stale_partials(directory, name)
  fd, temp_path = _create_temp_file(directory, name, path)
  try:
    with os.fdopen(fd, "wb") as temp_file:
      temp_file.write(data)
      temp_file.flush()
      os.fsync(temp_file.fileno())
    if overwrite:
      check_output_path(path, overwrite=True)  # it may have changed while we wrote
      os.replace(temp_path, path)
    else:
      _publish_without_clobbering(temp_path, path)
  except OSError as error:
    if error.filename == temp_path:
      raise OSError(error.errno, error.strerror, path) from None
    raise
  finally:
    # After os.replace the temporary name is gone; after os.link or a failure it is not.
    try:
      os.unlink(temp_path)
    except OSError:  # already renamed, or cleanup impossible: never mask the real error
      pass
  _fsync_directory(directory)


def open_regular_file(path: str | os.PathLike, what: str = "file"):
  """Opens `path` for binary reading; UnsafePathError unless it is a regular file.

  Symbolic links to regular files are followed (reading through one is
  harmless). FIFOs are opened with O_NONBLOCK so the open never waits for a
  writer. FileNotFoundError / IsADirectoryError / PermissionError propagate
  for the caller's own messages.
  """
  path = os.fspath(path)
  flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
  flags |= getattr(os, "O_BINARY", 0)
  fd = os.open(path, flags)
  try:
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
      raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    if not stat.S_ISREG(info.st_mode):
      raise UnsafePathError(f"{path} is {_kind(info.st_mode)}, not a regular {what}; "
                            "refusing to read it")
    if fcntl is not None and hasattr(os, "O_NONBLOCK"):
      fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def write_directory_atomically(out_dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
  """Runs fill(temp) on a new sibling directory of out_dir and renames it into
  place, replacing out_dir if it exists (the caller decides whether it may).
  Any failure leaves out_dir as it was and no temporary directory behind."""
  out_dir = Path(out_dir)
  parent = out_dir.absolute().parent
  temp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
  try:
    fill(temp)
    for path in sorted(temp.rglob("*")):
      if path.is_file():
        with open(path, "rb") as f:
          os.fsync(f.fileno())
    os.chmod(temp, 0o755)  # mkdtemp makes it private
    if out_dir.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
      os.rename(out_dir, old / "previous")
      os.rename(temp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(temp, out_dir)
    _fsync_directory(str(parent))
  except BaseException:
    shutil.rmtree(temp, ignore_errors=True)
    raise
  return out_dir
