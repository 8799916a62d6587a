"""Prepare tfds builds offline or with a bounded network check.

Command line::

  python -m lt_jax.data.prepare fashion_mnist [--data_dir DIR]
  python -m lt_jax.data.prepare cifar10 [--data_dir DIR] [--manual_dir DIR]
  python -m lt_jax.data.prepare cifar100 [--data_dir DIR] [--manual_dir DIR]
  python -m lt_jax.data.prepare imagenet_lt --manual_dir DIR [--data_dir DIR]

Fashion-MNIST offline
  Debian's ``dataset-fashion-mnist`` package ships the four original IDX files. Their
  deflate payload equals upstream's, but the gzip *header* differs (the FNAME flag and
  the file name were dropped, the mtime changed), so tfds's registered sha256
  checksums do not match them as shipped. :func:`upstream_gzip_bytes` rewrites the
  10-byte header into the upstream one (``1f 8b 08 08``, upstream mtime, ``00 03``,
  original file name, NUL) and keeps the payload byte for byte; the four restored
  files then match tfds's checksums exactly, and tfds's own ``fashion_mnist``
  builder builds from them (``DownloadConfig(manual_dir=..., try_download_gcs=False)``)
  with its checksum verification switched on. Nothing is downloaded.

Atomic builds
  Every build happens in a private temporary folder inside ``data_dir`` and the
  finished ``<name>/<version>`` folder is moved into place with one ``os.rename``.
  An interrupted build therefore leaves only a ``.lt_jax_tmp_*`` folder (removed
  by the next run), never a half-written dataset folder that tfds would accept.

Network
  With no network and no local files a tfds build retries DNS failures for
  minutes. Before any download, :func:`network_reachable` opens a TCP connection
  to the download hosts in a background thread bounded by ``timeout`` seconds
  (DNS included); if none answers, :class:`DataUnavailableError` says how to
  provide the data instead.

Data lives under ``data_dir`` (default: ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``, as tfds), e.g. ``~/tensorflow_datasets/fashion_mnist/3.0.1``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.parse

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
APT_INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"

# Upstream gzip mtimes of the Fashion-MNIST files (restoring them, with the FNAME
# field, makes the files byte-identical to the ones tfds registered).
FASHION_MNIST_MTIMES = {
    "train-images-idx3-ubyte.gz": 0x59A7E9DE,
    "train-labels-idx1-ubyte.gz": 0x59A7E9DE,
    "t10k-images-idx3-ubyte.gz": 0x59A7E9F3,
    "t10k-labels-idx1-ubyte.gz": 0x59A7E9F3,
}

PREPARABLE = ("fashion_mnist", "cifar10", "cifar100", "imagenet_lt")

_TMP_PREFIX = ".lt_jax_tmp_"

# gzip header flags (RFC 1952, section 2.3.1).
_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16


class DataUnavailableError(RuntimeError):
  """The requested data is neither prepared nor obtainable here (no hang, no retry)."""


class DatasetFormatError(ValueError):
  """User-supplied data is malformed: a split list, a CSV, an image or an array file (file and line named)."""


def default_data_dir() -> str:
  """tfds's default data folder: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  """Absolute data folder, ``data_dir`` or :func:`default_data_dir`."""
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir))) if data_dir else default_data_dir()


def prepare_command(name: str, data_dir: str | os.PathLike | None = None) -> str:
  """The shell command that prepares ``name`` (used in error messages)."""
  cmd = f"python -m lt_jax.data.prepare {name}"
  if data_dir:
    cmd += f" --data_dir {os.fspath(data_dir)}"
  return cmd


# --------------------------------------------------------------------------------------
# gzip header restoration
# --------------------------------------------------------------------------------------


def gzip_payload_offset(data: bytes) -> int:
  """Offset of the deflate payload in a gzip member: the header length (RFC 1952).

  Skips the optional FEXTRA, FNAME, FCOMMENT and FHCRC fields after the fixed
  10-byte header. Raises ``ValueError`` if ``data`` is not a deflate gzip stream.
  """
  if len(data) < 10 or data[:3] != b"\x1f\x8b\x08":
    raise ValueError("not a gzip (deflate) stream: expected magic bytes 1f 8b 08, "
                     f"got {data[:3].hex(' ') or 'nothing'}")
  flags = data[3]
  pos = 10
  if flags & _FEXTRA:
    (xlen,) = struct.unpack("<H", data[pos:pos + 2])
    pos += 2 + xlen
  for flag in (_FNAME, _FCOMMENT):
    if flags & flag:
      end = data.index(b"\x00", pos)
      pos = end + 1
  if flags & _FHCRC:
    pos += 2
  if pos > len(data):
    raise ValueError("truncated gzip header")
  return pos


def upstream_gzip_bytes(data: bytes, name: str, mtime: int) -> bytes:
  """Rewrite a gzip member's header to ``1f 8b 08 08 <mtime LE32> 00 03 <name> 00``.

  The deflate payload, CRC32 and ISIZE trailer (everything after the original
  header) are kept byte for byte, so the decompressed content is unchanged. This is
  the header Fashion-MNIST's upstream files have (FNAME set, XFL 0, OS 3 = Unix);
  ``name`` is the file name without ``.gz``.
  """
  if not 0 <= mtime < 2 ** 32:
    raise ValueError(f"mtime must fit in 32 bits, got {mtime}")
  raw_name = name.encode("latin-1")
  if b"\x00" in raw_name:
    raise ValueError("gzip file name must not contain NUL")
  header = b"\x1f\x8b\x08" + bytes([_FNAME]) + struct.pack("<I", mtime) + b"\x00\x03" + raw_name + b"\x00"
  return header + data[gzip_payload_offset(data):]


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def registered_checksums(tfds_name: str) -> dict[str, tuple[int, str]]:
  """``{file name: (size, sha256)}`` registered in tfds for builder ``tfds_name``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  infos = tfds.builder_cls(tfds_name).url_infos or {}
  return {info.filename or os.path.basename(urllib.parse.urlparse(url).path): (int(info.size), info.checksum)
          for url, info in infos.items()}


def debian_fashion_mnist_available(src_dir: str = DEBIAN_FASHION_MNIST_DIR) -> bool:
  """Whether the four Debian ``dataset-fashion-mnist`` files are present."""
  return all(os.path.isfile(os.path.join(src_dir, f)) for f in FASHION_MNIST_MTIMES)


def restore_fashion_mnist_files(dst_dir: str, src_dir: str = DEBIAN_FASHION_MNIST_DIR,
                                verify: bool = True) -> list[str]:
  """Write the four Fashion-MNIST files with the upstream gzip header into ``dst_dir``.

  With ``verify``, each restored file's size and sha256 are compared with tfds's
  registered checksums (a mismatch raises ``DataUnavailableError`` naming the file).
  Returns the written paths.
  """
  if not debian_fashion_mnist_available(src_dir):
    missing = [f for f in FASHION_MNIST_MTIMES if not os.path.isfile(os.path.join(src_dir, f))]
    raise DataUnavailableError(
        f"Fashion-MNIST source files not found in {src_dir} (missing: {', '.join(missing)}). "
        f"Install them with: {APT_INSTALL_HINT}")
  expected = registered_checksums("fashion_mnist") if verify else {}
  os.makedirs(dst_dir, exist_ok=True)
  written = []
  for fname, mtime in FASHION_MNIST_MTIMES.items():
    with open(os.path.join(src_dir, fname), "rb") as f:
      data = upstream_gzip_bytes(f.read(), fname[:-len(".gz")], mtime)
    out = os.path.join(dst_dir, fname)
    tmp = out + ".partial"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, out)
    if verify:
      size, sha = expected[fname]
      got = _sha256(out)
      if len(data) != size or got != sha:
        raise DataUnavailableError(
            f"{fname}: restored file does not match tfds's registered checksum "
            f"(size {len(data)} vs {size}, sha256 {got} vs {sha}). The files in {src_dir} "
            "are not the expected Debian dataset-fashion-mnist files.")
    written.append(out)
  return written


# --------------------------------------------------------------------------------------
# network check
# --------------------------------------------------------------------------------------


def network_reachable(urls, timeout: float = 3.0) -> bool:
  """Whether a TCP connection to any host of ``urls`` opens within ``timeout`` seconds.

  Name resolution can block far longer than a socket timeout, so the probe runs in a
  daemon thread and the caller waits at most ``timeout`` seconds in total.
  """
  targets = []
  for url in urls:
    parts = urllib.parse.urlparse(url)
    if parts.hostname:
      port = parts.port or (443 if parts.scheme == "https" else 80)
      if (parts.hostname, port) not in targets:
        targets.append((parts.hostname, port))
  if not targets:
    return False
  ok = threading.Event()

  def probe(host, port):
    try:
      with socket.create_connection((host, port), timeout=timeout):
        ok.set()
    except Exception:  # pylint: disable=broad-except  (any failure means unreachable)
      pass

  for host, port in targets:
    threading.Thread(target=probe, args=(host, port), daemon=True).start()
  ok.wait(timeout)
  return ok.is_set()


def _download_urls(tfds_name: str) -> list[str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  urls = list((tfds.builder_cls(tfds_name).url_infos or {}).keys())
  return urls or ["https://storage.googleapis.com/"]


# --------------------------------------------------------------------------------------
# atomic builds
# --------------------------------------------------------------------------------------


def is_prepared(tfds_name: str, data_dir: str | os.PathLike | None = None) -> bool:
  """Whether ``data_dir`` holds a complete tfds build of ``tfds_name``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(tfds_name, data_dir=resolve_data_dir(data_dir)).is_prepared()


def _tmp_prefix(tfds_name: str) -> str:
  return f"{_TMP_PREFIX}{tfds_name}_"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True  # exists, owned by someone else
  return True


def _clean_stale_tmp(data_dir: str, tfds_name: str, max_age_s: float = 6 * 3600) -> None:
  """Remove temp folders of interrupted builds.

  A temp folder is named ``.lt_jax_tmp_<name>_<host>_<pid>_<random>``; it is stale when
  its process (on this host) is gone, or when it is older than ``max_age_s``.
  """
  if not os.path.isdir(data_dir):
    return
  host = socket.gethostname().replace("_", "-")
  now = time.time()
  for entry in os.listdir(data_dir):
    if not entry.startswith(_tmp_prefix(tfds_name)):
      continue
    path = os.path.join(data_dir, entry)
    fields = entry[len(_tmp_prefix(tfds_name)):].split("_", 2)  # host, pid, random
    try:
      dead = len(fields) == 3 and fields[0] == host and not _pid_alive(int(fields[1]))
      if dead or now - os.path.getmtime(path) > max_age_s:
        shutil.rmtree(path, ignore_errors=True)
    except (OSError, ValueError):
      pass


def _atomic_build(tfds_name: str, data_dir: str, download_config, *, download_dir: str | None = None,
                  stage=None) -> str:
  """Build ``tfds_name`` in a temp folder inside ``data_dir``, then rename it into place.

  ``stage(tmp_dir)`` may fill the temp folder first (e.g. a manual dir) and return a
  replacement ``download_config``. Returns the final dataset version folder.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  os.makedirs(data_dir, exist_ok=True)
  _clean_stale_tmp(data_dir, tfds_name)
  final = tfds.builder(tfds_name, data_dir=data_dir)
  if final.is_prepared():
    return os.fspath(final.data_path)
  host = socket.gethostname().replace("_", "-")
  tmp_root = tempfile.mkdtemp(prefix=f"{_tmp_prefix(tfds_name)}{host}_{os.getpid()}_", dir=data_dir)
  try:
    if stage is not None:
      download_config = stage(tmp_root) or download_config
    builder = tfds.builder(tfds_name, data_dir=tmp_root)
    builder.download_and_prepare(download_dir=download_dir or os.path.join(tmp_root, "downloads"),
                                 download_config=download_config)
    src = os.fspath(builder.data_path)   # tmp_root/<name>/[<config>/]<version>
    dst = os.fspath(final.data_path)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.isdir(dst) and not final.is_prepared():
      # A folder tfds does not accept (e.g. copied in part): move it aside, do not delete it.
      aside = os.path.join(data_dir, f".lt_jax_invalid_{tfds_name}_{time.strftime('%Y%m%d-%H%M%S')}")
      os.rename(dst, aside)
      print(f"lt_jax: moved an incomplete {tfds_name} folder aside to {aside}", file=sys.stderr)
    try:
      os.rename(src, dst)
    except OSError:
      if not tfds.builder(tfds_name, data_dir=data_dir).is_prepared():
        raise
      # Another process finished the same build first; keep theirs.
    # Builders with configs also keep metadata beside the config folders
    # (`<name>/.config/`): carry over whatever the final tree does not have yet.
    level = os.path.dirname(src)
    while os.path.abspath(level) != os.path.abspath(tmp_root):
      for entry in os.listdir(level):
        p = os.path.join(level, entry)
        q = os.path.join(data_dir, os.path.relpath(p, tmp_root))
        if not os.path.exists(q):
          (shutil.copytree if os.path.isdir(p) else shutil.copy2)(p, q)
      level = os.path.dirname(level)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return os.fspath(final.data_path)


# --------------------------------------------------------------------------------------
# dataset-specific entry points
# --------------------------------------------------------------------------------------


def prepare_fashion_mnist(data_dir: str | os.PathLike | None = None,
                          src_dir: str = DEBIAN_FASHION_MNIST_DIR, verbose: bool = True) -> str:
  """Build tfds ``fashion_mnist`` offline from the Debian IDX files (idempotent).

  Restores the upstream gzip headers into a manual dir inside the temp build folder
  (see module docstring), checks them against tfds's registered checksums, builds with
  ``DownloadConfig(manual_dir=..., try_download_gcs=False)`` (tfds verifies the
  checksums again) and renames the result into ``data_dir``. Returns the version folder.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = resolve_data_dir(data_dir)
  if is_prepared("fashion_mnist", data_dir):
    if verbose:
      print(f"fashion_mnist already prepared in {data_dir}")
    return os.fspath(tfds.builder("fashion_mnist", data_dir=data_dir).data_path)
  if not debian_fashion_mnist_available(src_dir):
    raise DataUnavailableError(
        f"fashion_mnist is not prepared in {data_dir} and the Debian source files are missing "
        f"from {src_dir}. Install them with: {APT_INSTALL_HINT}  (then run "
        f"`{prepare_command('fashion_mnist', data_dir)}`), or copy a prepared tfds data_dir.")

  def stage(tmp_root):
    manual = os.path.join(tmp_root, "manual")
    restore_fashion_mnist_files(manual, src_dir)
    return tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)

  t0 = time.time()
  path = _atomic_build("fashion_mnist", data_dir, None, stage=stage)
  if verbose:
    print(f"fashion_mnist prepared in {path} ({time.time() - t0:.1f} s)")
  return path


def _unavailable_message(name: str, data_dir: str, manual_hint: str) -> str:
  return (
      f"{name} is not prepared in {data_dir} and its download hosts are unreachable "
      "(no network). Provide the data in one of these ways:\n"
      f"  1. manual files: {manual_hint}, then\n"
      f"     python -m lt_jax.data.prepare {name} --data_dir {data_dir} --manual_dir DIR\n"
      f"  2. run `python -m lt_jax.data.prepare {name} --data_dir DIR` on a machine with network access "
      f"and copy DIR/{name}/ to {data_dir}/{name}/\n"
      "  3. copy a prepared tfds data_dir and pass --data_dir (or data_dir=...) or set TFDS_DATA_DIR.")


def prepare_cifar(name: str, data_dir: str | os.PathLike | None = None,
                  manual_dir: str | os.PathLike | None = None, timeout: float = 3.0,
                  verbose: bool = True) -> str:
  """Build tfds ``cifar10`` / ``cifar100``: from ``manual_dir`` or a bounded download.

  ``manual_dir`` must hold tfds's registered archive (``cifar-10-binary.tar.gz`` or
  ``cifar-100-binary.tar.gz``); checksums are verified by tfds. Without it, the
  download hosts are probed first (``timeout`` seconds) and
  :class:`DataUnavailableError` is raised if none answers.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if name not in ("cifar10", "cifar100"):
    raise ValueError(f"prepare_cifar: unknown dataset {name!r}; valid: cifar10, cifar100")
  data_dir = resolve_data_dir(data_dir)
  if is_prepared(name, data_dir):
    if verbose:
      print(f"{name} already prepared in {data_dir}")
    return os.fspath(tfds.builder(name, data_dir=data_dir).data_path)
  files = ", ".join(registered_checksums(name)) or "the archive tfds expects"
  if manual_dir:
    missing = [f for f in registered_checksums(name) if not os.path.isfile(os.path.join(manual_dir, f))]
    if missing:  # tfds would fall back to a download (and hang offline): refuse instead
      raise DataUnavailableError(f"{name}: {', '.join(missing)} not found in manual_dir {manual_dir}")
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), try_download_gcs=False)
  else:
    urls = _download_urls(name) + ["https://storage.googleapis.com/tfds-data/"]
    if not network_reachable(urls, timeout):
      raise DataUnavailableError(_unavailable_message(
          name, data_dir, f"put {files} (the original archive, sha256 checked by tfds) in a folder DIR"))
    config = tfds.download.DownloadConfig()
  t0 = time.time()
  path = _atomic_build(name, data_dir, config)
  if verbose:
    print(f"{name} prepared in {path} ({time.time() - t0:.1f} s)")
  return path


IMAGENET_LT_INSTRUCTIONS = """\
ImageNet-LT (tfds `imagenet_lt`, Liu et al., OLTR, CVPR 2019) needs manual files:
  manual_dir must contain ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
  (register at https://www.image-net.org/download-images to get them). tfds also
  fetches the split lists ImageNet_LT_train.txt and ImageNet_LT_val.txt from Google
  Drive; without network, put those two files (from the OLTR release) in manual_dir
  too. Then: python -m lt_jax.data.prepare imagenet_lt --manual_dir DIR [--data_dir D]
  See https://www.tensorflow.org/datasets/catalog/imagenet_lt . Splits: train 115,846,
  validation 20,000 (20/class), test 50,000 (the ILSVRC2012 validation set)."""


def prepare_imagenet_lt(data_dir: str | os.PathLike | None = None,
                        manual_dir: str | os.PathLike | None = None, timeout: float = 3.0,
                        verbose: bool = True) -> str:
  """Build tfds ``imagenet_lt`` from manual ImageNet tars (see ``IMAGENET_LT_INSTRUCTIONS``)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = resolve_data_dir(data_dir)
  if is_prepared("imagenet_lt", data_dir):
    if verbose:
      print(f"imagenet_lt already prepared in {data_dir}")
    return os.fspath(tfds.builder("imagenet_lt", data_dir=data_dir).data_path)
  needed = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
  if not manual_dir or not all(os.path.isfile(os.path.join(manual_dir, f)) for f in needed):
    raise DataUnavailableError(f"imagenet_lt is not prepared in {data_dir}.\n{IMAGENET_LT_INSTRUCTIONS}")
  lists = [f for (f, _) in registered_checksums("imagenet_lt").items()]
  if not all(os.path.isfile(os.path.join(manual_dir, f)) for f in lists):
    if not network_reachable(_download_urls("imagenet_lt"), timeout):
      raise DataUnavailableError(
          f"imagenet_lt: no network to fetch {', '.join(lists)}; put them in {manual_dir}.\n"
          f"{IMAGENET_LT_INSTRUCTIONS}")
  config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), try_download_gcs=False)
  t0 = time.time()
  path = _atomic_build("imagenet_lt", data_dir, config)
  if verbose:
    print(f"imagenet_lt prepared in {path} ({time.time() - t0:.1f} s)")
  return path


def prepare(name: str, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None, timeout: float = 3.0,
            verbose: bool = True) -> str:
  """Prepare dataset ``name`` (one of ``PREPARABLE``); idempotent. Returns its folder.

  For ``fashion_mnist``, ``manual_dir`` (optional) replaces the Debian source folder.
  """
  if name == "fashion_mnist":
    return prepare_fashion_mnist(data_dir, src_dir=os.fspath(manual_dir or DEBIAN_FASHION_MNIST_DIR),
                                 verbose=verbose)
  if name in ("cifar10", "cifar100"):
    return prepare_cifar(name, data_dir, manual_dir, timeout, verbose)
  if name == "imagenet_lt":
    return prepare_imagenet_lt(data_dir, manual_dir, timeout, verbose)
  raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(PREPARABLE)}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lt_jax.data.prepare", description=__doc__.split("\n\n")[0])
  parser.add_argument("name", choices=PREPARABLE)
  parser.add_argument("--data_dir", default=None,
                      help="tfds data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", default=None,
                      help="folder with manually obtained files (fashion_mnist: the Debian IDX .gz files)")
  parser.add_argument("--timeout", type=float, default=3.0, help="network probe timeout, seconds")
  args = parser.parse_args(argv)
  try:
    prepare(args.name, args.data_dir, args.manual_dir, args.timeout)
  except DataUnavailableError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
