"""Hostile inputs and safe I/O (issue 14): each case reproduces a reported failure
and checks the documented behaviour now.

Fast cases call the library; the CLI cases run `python -m gvae_jax` as a user
would (with the tiny golden model, so they need no shared data).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from codec_helpers import GOLDEN_MODEL, make_image
from gvae_jax import fileio, image_io
from gvae_jax.coding import container, defaults, export, memory
from gvae_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = str(GOLDEN_MODEL)


def _with_memory_limit(command: list[str], limit: int | None) -> list[str]:
  """`command` run under RLIMIT_AS = limit bytes (set by a tiny exec wrapper, not by a
  preexec_fn: forking this multithreaded JAX process with a callback can deadlock)."""
  if limit is None:
    return command
  wrapper = ("import os, resource, sys; "
             f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
             "os.execv(sys.argv[1], sys.argv[1:])")
  return [sys.executable, "-c", wrapper, *command]


def gvae(*args, cwd, env=None, memory_limit=None, timeout=300):
  """The CLI as a user runs it: no TF_CPP_MIN_LOG_LEVEL from us (the CLI sets its own)."""
  environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  environment.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **(env or {})})
  command = _with_memory_limit([sys.executable, "-m", "gvae_jax", *map(str, args)],
                               memory_limit)
  return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True,
                        timeout=timeout)


def assert_fails(result, message):
  assert result.returncode != 0, result.stdout
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("gvae: error:"), result.stderr
  assert message in result.stderr, result.stderr


def _fingerprint() -> bytes:
  return bytes.fromhex(json.loads((GOLDEN_MODEL / "manifest.json").read_text())["fingerprint"])


def crafted(height: int, width: int, mode=container.Mode.LOSSY, tau=0, seed=0,
            section_bytes=64) -> bytes:
  """A .gvae file with a valid header and CRC claiming height x width; garbage streams."""
  rng = np.random.default_rng(seed)
  count = 2 if mode in container.LOSSY_MODES else 5
  sections = [rng.integers(0, 256, section_bytes, dtype=np.uint8).tobytes()
              for _ in range(count)]
  if mode == container.Mode.RESIDUAL:
    sections[-1] = sections[-1][:4]
  from gvae_jax.coding.coder import default_coder_id

  header = container.Header(fingerprint=_fingerprint(), mode=mode, rate=0.0, tau=tau,
                            height=height, width=width, channels=3,
                            coder_id=default_coder_id())
  return container.pack(header, sections)


@pytest.fixture()
def rgb_png(tmp_path):
  path = tmp_path / "rgb.png"
  Image.fromarray(make_image(40, 50, 3)).save(path)
  return path


# --- outputs: special files are never replaced, even with --force -----------------------------

def _special_outputs(tmp_path):
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  link = tmp_path / "stdout_link"
  os.symlink("/proc/self/fd/1", link)
  null_link = tmp_path / "null_link"
  os.symlink("/dev/null", null_link)
  paths = [fifo, link, null_link]
  try:  # a real device node (needs root; /dev/null's numbers, so harmless)
    device = tmp_path / "null_device"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    paths.append(device)
  except (PermissionError, OSError):
    pass
  return paths


def test_atomic_write_never_replaces_special_files(tmp_path):
  for path in _special_outputs(tmp_path):
    before = os.lstat(path)
    with pytest.raises(fileio.UnsafePathError, match="refusing to replace it"):
      fileio.atomic_write_bytes(path, b"data", overwrite=True)
    after = os.lstat(path)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode), path
    assert after.st_ino == before.st_ino
  assert not [n for n in os.listdir(tmp_path) if n.endswith(fileio.PARTIAL_SUFFIX)]


def test_cli_force_refuses_special_outputs(tmp_path, rgb_png):
  for path in _special_outputs(tmp_path):
    result = gvae("compress", rgb_png, path, "--model", MODEL, "--rate", 1, "--force",
                  cwd=tmp_path, timeout=60)
    assert_fails(result, "refusing to replace it")
    assert not stat.S_ISREG(os.lstat(path).st_mode)


def test_missing_or_bad_output_directory_fails_before_compressing(tmp_path, rgb_png):
  start = time.perf_counter()
  result = gvae("compress", rgb_png, "no_such_dir/out.gvae", "--model", MODEL, "--rate", 1,
                cwd=tmp_path, timeout=60)
  assert_fails(result, "cannot write no_such_dir/out.gvae: directory no_such_dir does not exist")
  assert fileio.PARTIAL_SUFFIX not in result.stderr and ".tmp" not in result.stderr
  (tmp_path / "afile").write_bytes(b"x")
  assert_fails(gvae("decompress", "x.gvae", "afile/out.png", "--model", MODEL, cwd=tmp_path,
                    timeout=60), "afile/out.png")
  # Both refusals come before JAX is imported (it takes seconds): well under a coding run.
  assert time.perf_counter() - start < 30


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_unwritable_output_directory_fails_before_compressing(tmp_path, rgb_png):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    assert_fails(gvae("compress", rgb_png, locked / "o.gvae", "--model", MODEL, "--rate", 1,
                      cwd=tmp_path, timeout=60), "no permission to create files in")
  finally:
    locked.chmod(0o700)


def test_temporary_files_are_recognisable_and_leftovers_are_removed(tmp_path):
  target = tmp_path / "out.gvae"
  dead = tmp_path / f".out.gvae.{2**22 + 12345}.0123456789ab{fileio.PARTIAL_SUFFIX}"
  dead.write_bytes(b"left by a killed process")
  alive = tmp_path / f".out.gvae.{os.getpid()}.ba9876543210{fileio.PARTIAL_SUFFIX}"
  alive.write_bytes(b"being written right now")
  unrelated = tmp_path / ".out.gvae.notours.tmp"
  unrelated.write_bytes(b"someone else's")
  fileio.atomic_write_bytes(target, b"new")
  assert target.read_bytes() == b"new"
  assert not dead.exists() and alive.exists() and unrelated.exists()


def test_sigkill_during_write_leaves_a_recognisable_file_that_the_next_write_removes(tmp_path):
  target = tmp_path / "big.gvae"
  script = textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {REPO!r})
      from gvae_jax import fileio
      fileio.os.fsync = lambda fd: (print("writing", flush=True), time.sleep(60))
      fileio.atomic_write_bytes({str(target)!r}, b"x" * 1000)
      """)
  child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
  assert child.stdout.readline().strip() == "writing"
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=30)
  leftovers = [n for n in os.listdir(tmp_path) if n.endswith(fileio.PARTIAL_SUFFIX)]
  assert len(leftovers) == 1 and leftovers[0].startswith(".big.gvae.")
  assert not target.exists()
  fileio.atomic_write_bytes(target, b"done")
  assert sorted(os.listdir(tmp_path)) == ["big.gvae"]


def test_sigterm_during_write_removes_the_temporary_file(tmp_path, rgb_png):
  # The CLI turns SIGTERM into an exception, so `finally` cleans up.
  script = textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {REPO!r})
      from gvae_jax import cli, fileio
      def slow(fd):
        print("writing", flush=True)
        time.sleep(60)
      fileio.os.fsync = slow
      cli._estimate = lambda args, overrides: fileio.atomic_write_bytes(args.out, b"x")
      sys.exit(cli.main(["estimate", "--workdir", "w", "--images", "i", "--out",
                         {str(tmp_path / 'r.json')!r}]))
      """)
  child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  assert child.stdout.readline().strip() == "writing"
  child.send_signal(signal.SIGTERM)
  assert child.wait(timeout=30) == 143
  assert os.listdir(tmp_path) == ["rgb.png"]


# --- estimate --out ----------------------------------------------------------------------------

def test_estimate_out_refuses_to_overwrite_without_force(tmp_path):
  out = tmp_path / "report.json"
  out.write_text("precious")
  result = gvae("estimate", "--workdir", "no_workdir", "--images", "x", "--out", out,
                cwd=tmp_path, timeout=60)
  assert_fails(result, "already exists; pass --force")
  assert out.read_text() == "precious"
  # With --force the (missing) image folder is the next problem: the output check came first.
  assert_fails(gvae("estimate", "--workdir", "no_workdir", "--images", "x", "--out", out,
                    "--force", cwd=tmp_path, timeout=60), "image folder not found: x")


def test_estimate_out_is_written_atomically(tmp_path, monkeypatch):
  from gvae_jax import cli

  written = []
  monkeypatch.setattr(fileio, "atomic_write_bytes",
                      lambda path, data, overwrite: written.append((path, overwrite)))
  cli._write_output(str(tmp_path / "r.json"), b"{}", False)
  assert written == [(str(tmp_path / "r.json"), False)]


# --- inputs: streaming header reads, regular files only ---------------------------------------

def test_info_on_dev_zero_fails_fast_in_bounded_memory(tmp_path):
  start = time.perf_counter()  # 1 GiB of address space; the old reader grew to 4 GB
  result = gvae("info", "/dev/zero", cwd=tmp_path, memory_limit=1 << 30, timeout=60)
  assert_fails(result, "/dev/zero is a character device, not a regular .gvae file")
  assert time.perf_counter() - start < 20


def test_fifo_inputs_are_refused_without_blocking(tmp_path):
  fifo = tmp_path / "in.fifo"
  os.mkfifo(fifo)
  with pytest.raises(UserError, match="FIFO"):
    container.read_file(fifo)
  with pytest.raises(image_io.ImageError, match="FIFO"):
    image_io.read_image(fifo)


class _CountingFile(io.BytesIO):
  def __init__(self, data):
    super().__init__(data)
    self.bytes_read = 0

  def read(self, n=-1):
    chunk = super().read(n)
    self.bytes_read += len(chunk)
    return chunk


def test_header_is_checked_before_the_body_is_read(tmp_path):
  data = crafted(64, 64, section_bytes=10_000)
  # Claims more bytes than there are: refused after reading the header only.
  truncated = _CountingFile(data[:-5000])
  with pytest.raises(container.FormatError, match="truncated"):
    container.read_header_from_file(truncated, len(data) - 5000)
  assert truncated.bytes_read <= container.MAX_HEADER_BYTES
  padded = tmp_path / "padded.gvae"
  padded.write_bytes(data + b"\0" * 100)
  with pytest.raises(container.FormatError, match="trailing data"):
    container.read_file(padded)
  bad_magic = _CountingFile(b"JUNK" + data[4:])
  with pytest.raises(container.FormatError, match="bad magic"):
    container.read_header_from_file(bad_magic, len(data))
  assert bad_magic.bytes_read <= 43
  good = tmp_path / "good.gvae"
  good.write_bytes(data)
  assert container.read_file(good) == data


# --- model files ------------------------------------------------------------------------------

@pytest.fixture()
def model_copy(tmp_path):
  target = tmp_path / "model"
  shutil.copytree(GOLDEN_MODEL, target)
  return target


def test_unknown_tables_member_is_refused_not_loaded(model_copy):
  with zipfile.ZipFile(model_copy / export.TABLES_FILE, "a") as archive:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(10, np.int32))
    archive.writestr("extra.npy", buffer.getvalue())
  with pytest.raises(export.ExportError, match="members this version does not know"):
    export.load_model(model_copy)


def test_tables_member_declaring_a_huge_size_is_refused(model_copy, monkeypatch):
  monkeypatch.setattr(export, "MAX_TABLE_MEMBER_BYTES", 100)
  with pytest.raises(export.ExportError, match="declares"):
    export.load_model(model_copy)


def test_oversized_model_file_is_refused_before_reading(model_copy):
  with open(model_copy / export.PARAMS_FILE, "r+b") as f:  # sparse: costs no disk
    f.truncate(export.MAX_FILE_BYTES[export.PARAMS_FILE] + 1)
  with pytest.raises(export.ExportError, match="refusing to load it"):
    export.load_model(model_copy)


def test_model_file_that_is_a_fifo_is_refused(model_copy):
  (model_copy / export.CONFIG_FILE).unlink()
  os.mkfifo(model_copy / export.CONFIG_FILE)
  with pytest.raises(export.ExportError, match="not a regular file"):
    export.load_model(model_copy)


def test_fingerprint_covers_every_loaded_table_member():
  # Every member load_model accepts is one that compute_fingerprint hashes.
  model = export.load_model(GOLDEN_MODEL)
  arrays = export._table_arrays(model.z_table, model.y_table, model.y_scales,
                                model.y_index_bounds)
  assert set(arrays) == export.TABLE_MEMBERS


# --- images -----------------------------------------------------------------------------------

def _bmp32(pixels_bgra: np.ndarray) -> bytes:
  """A BI_RGB 32-bit BMP (what Pillow writes for RGBA): the 4th byte is alpha or padding."""
  height, width = pixels_bgra.shape[:2]
  data = np.ascontiguousarray(pixels_bgra[::-1]).tobytes()
  return (b"BM" + struct.pack("<IHHI", 54 + len(data), 0, 0, 54)
          + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 32, 0, len(data), 2835, 2835, 0, 0)
          + data)


def test_32bit_bmp_with_alpha_is_refused(tmp_path):
  rgba = np.zeros((4, 5, 4), np.uint8)
  rgba[..., 3] = np.arange(5) * 50
  pillow_bmp = tmp_path / "pillow.bmp"
  Image.fromarray(rgba, "RGBA").save(pillow_bmp)
  with pytest.raises(image_io.ImageError, match="32-bit BMP with alpha"):
    image_io.read_image(pillow_bmp)
  bgra = np.full((4, 5, 4), 255, np.uint8)  # opaque alpha: still an alpha channel
  (tmp_path / "opaque.bmp").write_bytes(_bmp32(bgra))
  with pytest.raises(image_io.ImageError, match="32-bit BMP with alpha"):
    image_io.read_image(tmp_path / "opaque.bmp")
  bgrx = np.zeros((4, 5, 4), np.uint8)
  bgrx[..., 2] = 200  # red, fourth byte zero: padding, read as RGB
  (tmp_path / "padding.bmp").write_bytes(_bmp32(bgrx))
  pixels, _ = image_io.read_image(tmp_path / "padding.bmp")
  assert pixels.shape == (4, 5, 3) and (pixels[..., 0] == 200).all()


def test_icc_profile_is_reported_as_dropped(tmp_path, rgb_png):
  from PIL import ImageCms

  profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
  path = tmp_path / "icc.png"
  Image.fromarray(make_image(8, 8)).save(path, icc_profile=profile)
  _, info = image_io.read_image(path)
  assert info.icc_profile and "ICC colour profile was dropped" in info.warnings()[0]
  _, plain = image_io.read_image(rgb_png)
  assert not plain.icc_profile and plain.warnings() == []


def test_exif_orientation_is_reported_by_the_cli(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 8
  Image.fromarray(make_image(20, 30)).save(tmp_path / "o.png", exif=exif)
  result = gvae("compress", "o.png", "o.gvae", "--model", MODEL, "--rate", 1, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "gvae: warning:" in result.stderr and "counter-clockwise" in result.stderr
  assert "30x20" not in result.stdout and "20x30" in result.stdout  # width x height, upright


def test_size_limit_is_checked_from_the_header_before_decoding(tmp_path):
  # A PNG header claiming 100000 x 100000 pixels and no pixel data at all.
  ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
  import zlib
  chunk = b"IHDR" + ihdr
  png = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
         + struct.pack(">I", zlib.crc32(chunk)))
  (tmp_path / "huge.png").write_bytes(png)
  with pytest.raises(image_io.ImageError, match="refused before decoding"):
    image_io.read_image(tmp_path / "huge.png", max_pixels=memory.MAX_CODEC_PIXELS)
  # A real 3000 x 3000 (flat, small) PNG against a memory cap it exceeds: refused from
  # the header by the CLI, before JAX loads or the pixels are decoded.
  Image.new("RGB", (3000, 3000), (90, 120, 200)).save(tmp_path / "flat.png")
  result = gvae("compress", "flat.png", "f.gvae", "--model", MODEL, "--rate", 1,
                "--max-memory", "1.5G", cwd=tmp_path, timeout=60)
  assert_fails(result, "exceeds what the memory cap of 1.5 GiB (--max-memory) allows")


# --- memory ---------------------------------------------------------------------------------

def test_memory_limits_match_the_codec():
  from gvae_jax.coding import codec
  assert memory.MAX_CODEC_PIXELS == codec.MAX_CODEC_PIXELS
  assert memory.parse_size("1.5G") == int(1.5 * 2**30)
  assert memory.parse_size("800M") == 800 << 20 and memory.parse_size("off") is None
  with pytest.raises(UserError):
    memory.parse_size("lots")


def test_crafted_8192_file_is_refused_before_allocating(tmp_path):
  # Lossy files of this size run tiled (their bound is ~11 GiB at 16384x16384); residual
  # ones whole (~40 GiB at 8192x8192).
  (tmp_path / "big.gvae").write_bytes(crafted(16384, 16384, container.Mode.LOSSY_TILED))
  (tmp_path / "big_lossless.gvae").write_bytes(crafted(8192, 8192, container.Mode.RESIDUAL))

  for name, side in (("big.gvae", 16384), ("big_lossless.gvae", 8192)):
    # 6 GiB of address space, far below what decoding takes: only a refusal survives it.
    result = gvae("decompress", name, "out.png", "--model", MODEL, "--max-memory", "8G",
                  cwd=tmp_path, memory_limit=6 << 30, timeout=120)
    assert_fails(result, f"of {side}x{side} pixels needs about")
    assert "more than the cap of 8.0 GiB (--max-memory)" in result.stderr
  # The info command needs no model and no memory: it still reads the header.
  result = gvae("info", "big.gvae", cwd=tmp_path, timeout=60)
  assert result.returncode == 0 and "16384x16384" in result.stdout


def test_out_of_memory_in_cxx_is_one_error_line(tmp_path):
  """Out of memory under an address-space limit (in XLA's C++, which aborts on
  std::bad_alloc, or in NumPy): the CLI still prints one line. 16384x16384 is tiled,
  but its whole-image arrays alone exceed 3 GiB (an 8192x8192 image now fits)."""
  Image.new("RGB", (16384, 16384), (90, 120, 200)).save(tmp_path / "a.png")  # flat

  # The cap is switched off, so the coder really runs out of its 3 GiB of address space.
  result = gvae("compress", "a.png", "a.gvae", "--model", MODEL, "--rate", 1,
                "--max-memory", "off", cwd=tmp_path, memory_limit=3 << 30, timeout=300)
  assert_fails(result, "out of memory")
  assert result.returncode == 3


def test_python_out_of_memory_is_one_error_line(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {REPO!r})
      from gvae_jax import cli
      def greedy(args, overrides):
        import numpy as np
        return np.ones(1 << 40, np.uint8)  # 1 TiB
      cli._info = greedy
      sys.exit(cli.main(["info", "x.gvae"]))
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
  assert result.returncode == 3
  assert result.stderr.strip().startswith("gvae: error: out of memory"), result.stderr


def test_fuzzed_headers_never_exceed_the_documented_peak(tmp_path):
  """Crafted headers of many sizes, each decoded in its own process under an
  address-space limit (the documented peak is per process, one image): each case
  is refused with one message (documented peak above the cap) or decoded /
  rejected as corrupt, none dies, and none uses more than its documented peak."""
  rng = np.random.default_rng(14)
  cap = 3 << 30
  cases = []
  for i in range(10):
    height, width = (int(v) for v in rng.choice([1, 7, 64, 300, 1000, 2000, 30000, 65535], 2))
    mode = container.Mode(int(rng.integers(0, 2)))
    need = memory.estimate_peak_bytes(height, width, mode.name.lower(), "decompress")
    cases.append((f"c{i}.gvae", height, width, int(mode), need))
  # Lossy cases get valid all-zero streams (so the decoder really runs its networks at
  # that size); residual ones garbage streams (rejected as corrupt by the range decoder).
  writer = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {REPO!r})
      sys.path.insert(0, {os.path.join(REPO, "tests")!r})
      import numpy as np
      import jax.numpy as jnp
      from gvae_jax.coding import codec, container, export
      from gvae_jax.coding.coder import default_coder_id, get_coder
      from test_hostile_inputs import crafted
      model = export.load_model({MODEL!r})
      coder = get_coder(default_coder_id())

      def valid_lossy(height, width):
        z_shape, y_shape = codec._latent_shapes(model.lossy_model, height, width)
        z = coder.encode(np.zeros(z_shape, np.int32), codec.z_indexes(z_shape), model.z_table)
        _, rows = codec.hyper(model.lossy_model, model.lossy_params,
                               jnp.zeros(z_shape, jnp.int32), jnp.zeros((1,), jnp.float32),
                               model.y_index_bounds)
        y = coder.encode(np.zeros(y_shape, np.int32), np.asarray(rows), model.y_table)
        header = container.Header(fingerprint=model.fingerprint, mode=container.Mode.LOSSY,
                                  rate=0.0, tau=0, height=height, width=width, channels=3,
                                  coder_id=coder.coder_id)
        return container.pack(header, [z, y])

      for seed, (name, height, width, mode, need) in enumerate({cases!r}):
        data = (valid_lossy(height, width) if mode == 0 and need <= {cap}
                else crafted(height, width, container.Mode(mode), mode, seed))
        open(name, "wb").write(data)
      """)
  written = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True,
                           timeout=600, cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert written.returncode == 0, written.stderr[-3000:]

  codes = []
  for name, height, width, mode, need in cases:
    decoder = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {REPO!r})
        resource.setrlimit(resource.RLIMIT_AS, ({cap * 4}, {cap * 4}))
        from gvae_jax import cli
        code = cli.main(["decompress", {name!r}, {name + ".png"!r}, "--force",
                         "--model", {MODEL!r}, "--max-memory", "{cap}"])
        # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak RSS into ru_maxrss
        # across fork+exec; VmHWM belongs to this process's own address space.
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(json.dumps([code, int(hwm.split()[1]) * 1024]))
        """)
    result = subprocess.run([sys.executable, "-c", decoder], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    case = (name, height, width, container.Mode(mode).name, result.stderr[-2000:])
    assert result.returncode == 0 and "Traceback" not in result.stderr, case
    code, peak = json.loads(result.stdout.strip().splitlines()[-1])
    if need > cap:
      assert code == 2 and "needs about" in result.stderr, case
    elif mode == 0:
      assert code == 0, case
    else:
      assert code == 2 and "gvae: error:" in result.stderr, case
    assert peak <= max(need, memory.BASE_BYTES), (case, peak, need)
    codes.append(code)
  assert any(need > cap for *_, need in cases) and codes.count(0) >= 1


# --- degenerate sizes, resume messages, stderr, first run -----------------------------------

def test_one_pixel_high_image_costs_no_more_than_raw(tmp_path):
  pixels = make_image(1, 300, 4)
  Image.fromarray(pixels).save(tmp_path / "strip.png")
  Image.fromarray(pixels[:, :, 0].T.copy()).save(tmp_path / "column.png")  # 300 x 1 gray
  for name, channels in (("strip", 3), ("column", 1)):
    result = gvae("compress", f"{name}.png", f"{name}.gvae", "--model", MODEL, "--rate", 1,
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = (tmp_path / f"{name}.gvae").read_bytes()
    header = container.unpack(data)[0]
    assert header.mode == container.Mode.STORED and "lossless" in result.stdout
    assert len(data) <= 300 * channels + 64  # raw samples plus the container header
    assert gvae("decompress", f"{name}.gvae", f"{name}_out.png", "--model", MODEL,
                cwd=tmp_path).returncode == 0
    decoded = np.asarray(Image.open(tmp_path / f"{name}_out.png"))
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(tmp_path / f"{name}.png")))


def test_stored_file_inflates_at_most_the_header_size():
  import zlib

  from gvae_jax.coding import codec

  model = export.load_model(GOLDEN_MODEL)

  def stored(height, width, payload):
    header = container.Header(fingerprint=model.fingerprint, mode=container.Mode.STORED,
                              rate=0.0, tau=0, height=height, width=width, channels=3,
                              coder_id=1)
    return container.pack(header, [zlib.compress(payload, 9)])

  bomb = stored(2, 2, b"\0" * (64 << 20))  # 64 MiB of zeros in 64 KB, claiming 12 bytes
  with pytest.raises(container.FormatError, match="does not match the header"):
    codec.decompress(model, bomb)
  with pytest.raises(container.FormatError, match="does not match the header"):
    codec.decompress(model, stored(2, 2, b"\1" * 11))
  pixels = codec.decompress(model, stored(2, 2, bytes(range(12))))
  assert pixels.shape == (2, 2, 3) and pixels.ravel().tolist() == list(range(12))


def test_compress_stderr_is_clean(tmp_path, rgb_png):
  result = gvae("compress", rgb_png, "a.gvae", "--model", MODEL, "--rate", 1, cwd=tmp_path)
  assert result.returncode == 0 and result.stderr == "", result.stderr
  result = gvae("decompress", "a.gvae", "a.png", "--model", MODEL, cwd=tmp_path)
  assert result.returncode == 0 and result.stderr == "", result.stderr


def test_shipped_default_models_exist_and_match_their_fingerprints():
  for directory in (defaults.LOSSY_MODEL, defaults.SCALABLE_MODEL):
    manifest = json.loads((directory / "manifest.json").read_text())
    assert defaults.model_for_fingerprint(bytes.fromhex(manifest["fingerprint"])) == directory
  assert defaults.default_model(False) == defaults.LOSSY_MODEL
  assert defaults.default_model(True) == defaults.SCALABLE_MODEL
  assert defaults.model_for_fingerprint(b"\0" * 16) is None
  # Retired shipped models: their files still decode without --model.
  retired = sorted(defaults.RETIRED_MODELS_DIR.iterdir())
  assert retired
  for directory in retired:
    manifest = json.loads((directory / "manifest.json").read_text())
    for key in ("fingerprint", "fingerprint_exact"):
      assert defaults.model_for_fingerprint(bytes.fromhex(manifest[key])) == directory
    for entry in manifest.get("previous_exact", []):
      assert defaults.model_for_fingerprint(bytes.fromhex(entry["fingerprint"])) == directory


def test_a_retired_shipped_models_file_decodes_without_model(tmp_path, rgb_png):
  retired = sorted(defaults.RETIRED_MODELS_DIR.iterdir())[0]
  result = gvae("compress", rgb_png, "old.gvae", "--model", retired, "--rate", 1, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  result = gvae("decompress", "old.gvae", "old.png", cwd=tmp_path)
  assert result.returncode == 0 and result.stderr == "", result.stderr


def test_decompress_without_model_needs_a_shipped_model(tmp_path):
  (tmp_path / "t.gvae").write_bytes(crafted(16, 16))
  assert_fails(gvae("decompress", "t.gvae", "t.png", cwd=tmp_path, timeout=60),
               "was not made by a shipped model")


def test_train_says_where_it_resumes_and_when_it_is_complete(tmp_path, capsys):
  """Trains on the shipped quickstart images (no shared data), stopped early, then resumed."""
  from gvae_jax.config import load_config
  from gvae_jax.samples import QUICKSTART_IMAGES
  from gvae_jax.train import train

  config = load_config(os.path.join(REPO, "experiments", "configs", "tiny.py"))
  config.data.folder = str(QUICKSTART_IMAGES)
  config.eval.folder = ""
  config.train.num_steps = 4
  config.train.checkpoint_every = 2
  train.train_and_evaluate(config, tmp_path, stop_after_steps=2, progress=False)
  assert "resuming" not in capsys.readouterr().out  # a fresh run says nothing of the kind
  train.train_and_evaluate(config, tmp_path, progress=False)
  assert f"{tmp_path}: resuming from the checkpoint at step 2 of 4" in capsys.readouterr().out
  train.train_and_evaluate(config, tmp_path, progress=False)
  assert f"{tmp_path}: already complete at step 4 of 4" in capsys.readouterr().out


def test_shipped_samples_are_what_the_generator_makes():
  from gvae_jax import samples

  shipped = np.asarray(Image.open(samples.SAMPLE_PHOTO)).astype(np.int16)
  regenerated = samples.synthetic_photo(256, 384, seed=2026).astype(np.int16)
  # Equal on the stack that made it; other Pillow/NumPy versions may round a resize apart.
  assert shipped.shape == regenerated.shape == (256, 384, 3)
  assert np.abs(shipped - regenerated).mean() < 1.0
  assert len(list(samples.QUICKSTART_IMAGES.glob("*.png"))) == 16


def test_first_run_compresses_the_shipped_sample_with_the_shipped_model(tmp_path):
  """The README's first commands, with no --model, on the sample the package ships."""
  from gvae_jax.samples import SAMPLE_PHOTO

  result = gvae("compress", SAMPLE_PHOTO, "photo.gvae", "--rate", 1.5, cwd=tmp_path)
  assert result.returncode == 0 and result.stderr == "", result.stderr
  header = container.read_file(tmp_path / "photo.gvae")
  manifest = json.loads((defaults.LOSSY_MODEL / "manifest.json").read_text())
  lossy = manifest.get("fingerprint_exact", manifest["fingerprint"])  # a converted model
  assert container.unpack(header)[0].fingerprint.hex() == lossy
  result = gvae("decompress", "photo.gvae", "photo.png", cwd=tmp_path)
  assert result.returncode == 0 and result.stderr == "", result.stderr
  assert np.asarray(Image.open(tmp_path / "photo.png")).shape == (256, 384, 3)


def test_every_file_mode_has_a_decoding_memory_figure():
  for mode in container.Mode:
    assert (mode.name.lower(), "decompress") in memory.PER_PIXEL, mode


def test_first_lossless_run_uses_the_shipped_exact_flat_head(tmp_path):
  """`--lossless` with no --model: the shipped scalable model's exact flat head writes
  a file that decodes bit-exactly; and a file of that model before the head was
  attached (fingerprint recorded in its manifest) still decodes with no --model."""
  from gvae_jax.coding import codec
  from gvae_jax.samples import SAMPLE_PHOTO

  crop = np.asarray(Image.open(SAMPLE_PHOTO).convert("RGB"))[:48, :72].copy()
  Image.fromarray(crop).save(tmp_path / "crop.png")
  result = gvae("compress", "crop.png", "c.gvae", "--lossless", cwd=tmp_path)
  assert result.returncode == 0 and result.stderr == "", result.stderr
  header = container.unpack(container.read_file(tmp_path / "c.gvae"))[0]
  assert header.mode == container.Mode.EXACT_FLAT_RESIDUAL
  manifest = json.loads((defaults.SCALABLE_MODEL / "manifest.json").read_text())
  assert header.fingerprint.hex() == manifest["fingerprint_with_flat_head"]
  without_head = export.detach(export.load_model(defaults.SCALABLE_MODEL))
  (tmp_path / "old.gvae").write_bytes(codec.compress(without_head, crop, tau=2, base="lossy"))
  for name in ("c", "old"):
    result = gvae("decompress", f"{name}.gvae", f"{name}.png", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    decoded = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(np.int16)
    assert np.abs(decoded - crop).max() <= (0 if name == "c" else 2)


@pytest.mark.parametrize("limited", [True, False])
def test_a_crash_under_an_address_space_limit_is_reported_as_out_of_memory(
    tmp_path, monkeypatch, capsys, limited):
  """LLVM (XLA's compiler) may segfault instead of throwing when ulimit -v is
  reached: under a limit that is out of memory (exit 3); without one, a crash."""
  from gvae_jax import cli

  crasher = tmp_path / "crash.sh"
  crasher.write_text("#!/bin/sh\nkill -SEGV $$\n")
  crasher.chmod(0o755)
  monkeypatch.setattr(sys, "executable", str(crasher))
  monkeypatch.setattr(cli, "_address_space_limited", lambda: limited)
  code = cli._run_supervised(["compress", "a.png", "a.gvae"])
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("gvae: error:")
  if limited:
    assert code == 3 and "out of memory" in err[0] and "signal 11" in err[0]
  else:
    assert code == 1 and "died with signal 11" in err[0]
