"""Where a flow run's files live, so that no step reads another step's local disk.

`train.output_dir` is a local folder (the default: every step runs on this machine) or an fsspec URI that every
step's machine can reach: `s3://bucket/pcsd`, `gs://bucket/pcsd`, or `file:///shared/nfs/pcsd` (a mount). The
run's parquet files, checkpoints and evaluation results go there. With a URI, each step works in a local scratch
folder that is deleted when the step ends, downloads what it reads and uploads what it writes:

    with storage.scratch() as scratch:
        test_parquet = storage.local_copy(branch.test_path, scratch)      # a local path is used in place
        output_dir = storage.workspace(branch.config.train.output_dir, scratch)
        ...                                                                # write into output_dir
        storage.publish(output_dir / "eval", storage.join(branch.config.train.output_dir, "eval"))

A published folder carries `_PUBLISHED.json`, written after every other file, with each file's size: object
stores have no atomic rename, so a reader trusts a folder only once its marker is there and the sizes match
(a step killed mid-upload leaves a folder no later step picks up).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pcsd_core.errors import ConfigError, InputNotFoundError

MARKER = "_PUBLISHED.json"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_remote(location: str | Path) -> bool:
    """True for a URI (`s3://...`, `file:///...`): read and written through fsspec, never as a local path."""
    return _SCHEME.match(str(location)) is not None


def join(location: str | Path, *parts: str) -> str:
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location, *parts))


def check_location(location: str, field: str = "train.output_dir") -> None:
    """Refuse, before any work, a URI whose filesystem is not installed (e.g. s3:// without s3fs)."""
    match = _SCHEME.match(location)
    if match is None:
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(match.group(1))
    except (ImportError, ValueError) as error:
        raise ConfigError(f"{field} ({location!r}): fsspec cannot open {match.group(1)}:// URIs here ({error}). "
                         "Install its filesystem (s3fs for s3://, gcsfs for gs://, adlfs for az://) on every "
                         "machine the flow runs on, or use a local folder.") from None


def _fs(location: str):
    import fsspec

    return fsspec.core.url_to_fs(location)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A step's local working folder, deleted when the step ends (as a task on a fresh machine loses its disk)."""
    folder = Path(tempfile.mkdtemp(prefix="pcsd-scratch-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def workspace(location: str | Path, scratch_dir: Path) -> Path:
    """The local folder to write what belongs at `location`: the folder itself, or one inside `scratch_dir`."""
    if not is_remote(location):
        return Path(location)
    return Path(tempfile.mkdtemp(prefix="out-", dir=scratch_dir))


def publish(local_dir: str | Path, location: str | Path) -> None:
    """Upload the finished folder `local_dir` to `location` (nothing to do when `location` is that local folder)."""
    local_dir = Path(local_dir)
    if not is_remote(location):
        if Path(location).resolve() != local_dir.resolve():
            raise ValueError(f"publish: {local_dir} must be written in place at the local location {location}.")
        return
    fs, root = _fs(str(location))
    marker = _marker(root)
    if fs.exists(marker):  # a retried step replaces its earlier copy: unpublished until complete again
        fs.rm(marker)
    sizes = {}
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        relative = file.relative_to(local_dir).as_posix()
        target = f"{root.rstrip('/')}/{relative}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), target)
        sizes[relative] = file.stat().st_size
    fs.pipe_file(marker, json.dumps({"files": sizes}).encode())


def is_published(location: str) -> bool:
    fs, root = _fs(location)
    return fs.exists(_marker(root))


def local_copy(location: str | Path, scratch_dir: Path) -> Path:
    """A local path for the file or published folder at `location`: itself when local, else a download."""
    if not is_remote(location):
        return Path(location)
    fs, root = _fs(str(location))
    root = root.rstrip("/")
    target = Path(tempfile.mkdtemp(prefix="in-", dir=scratch_dir)) / root.rsplit("/", 1)[-1]
    if fs.isfile(root):  # one file of a published folder (a parquet file of the data folder)
        folder, name = root.rsplit("/", 1)
        _download(fs, folder, {name: _published_files(fs, folder, location)[name]}, target.parent, location)
        return target
    _download(fs, root, _published_files(fs, root, location), target, location)
    return target


def _marker(folder: str) -> str:
    return f"{folder.rstrip('/')}/{MARKER}"


def _published_files(fs, folder: str, location: str | Path) -> dict[str, int]:
    try:
        return json.loads(fs.cat_file(_marker(folder)))["files"]
    except FileNotFoundError:
        raise InputNotFoundError(f"{location} is not in a complete published folder (no {MARKER}): the step that "
                                "writes it did not finish. Run that step again.") from None


def _download(fs, folder: str, files: dict[str, int], target: Path, location: str | Path) -> None:
    for relative, size in files.items():
        file = target / relative
        file.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{folder}/{relative}", str(file))
        if file.stat().st_size != size:
            raise OSError(f"{location}: {relative} has {file.stat().st_size} bytes, {MARKER} says {size}: the "
                          "upload was damaged. Run the step that writes it again.")


def subfolders(location: str | Path) -> list[str]:
    """The names of the folders directly under `location`, a URI or a local path ([] when it does not exist)."""
    fs, root = _fs(str(location))
    if not fs.exists(root):
        return []
    return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=True)
                  if entry["type"] == "directory")


def write_text(location: str | Path, text: str) -> None:
    """Write a small file (an evaluation result) whole: no reader ever sees half of it."""
    if is_remote(location):
        fs, path = _fs(str(location))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, text.encode())
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read_text(location: str | Path) -> str:
    if is_remote(location):
        fs, path = _fs(str(location))
        return fs.cat_file(path).decode()
    return Path(location).read_text()
