"""Where data sets live: ``MMGEN_DATA_DIR``, else ``../shared/data`` beside the repository, else a user cache; and the
real downloads (URL and checksum) for machines with internet."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataFileError", "KNOWN_FILES", "KNOWN_FOLDERS", "data_dir", "folder_digest", "resolve"]

ENV_DATA_DIR = "MMGEN_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]


class DataFileError(FileNotFoundError):
    """A data file is missing, empty or unreadable."""


@dataclass(frozen=True)
class Download:
    url: str
    sha256: str


# Public data sets whose files a recipe may name by their path under the data directory.
KNOWN_FILES: dict[str, Download] = {
    "tinyshakespeare/input.txt": Download(
        "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/"
        "tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}


@dataclass(frozen=True)
class Archive:
    """A folder that comes out of a release archive: files under ``member_prefix`` are extracted, and the
    ``verify_glob`` files are checked against ``digest``: sha256 of the sorted lines ``"<name> <sha256>\n"``."""

    url: str
    member_prefix: str
    verify_glob: str
    digest: str
    count: int


# Public folders a recipe may name by their path under the data directory.
KNOWN_FOLDERS: dict[str, Archive] = {
    # Free Spoken Digit Dataset v1.0.10 (CC BY-SA 4.0): the digest covers the five speakers the benchmarks use
    # (george, jackson, lucas, nicolas, theo: 2,500 files); the archive's sixth speaker (yweweler) is extracted too.
    "fsdd/recordings": Archive(
        "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz",
        "free-spoken-digit-dataset-1.0.10/recordings/", "*_[gjlnt]*_*.wav",
        "b87f8cfe75b232c7e264f71f588ffee4e6b7b6a2c26d61236f5cd2ed6a9c048d", 2500),
}


def folder_digest(files: list[Path]) -> str:
    lines = "".join(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def data_dir() -> Path:
    """The data directory: ``$MMGEN_DATA_DIR``, else ``<repo>/../shared/data`` if it exists, else ``~/.cache/mmgen``."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    shared = REPO_ROOT.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path.home() / ".cache" / "mmgen" / "data"


def resolve(path: str | os.PathLike, root: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """An existing file or folder for ``path``: absolute, or relative to ``root`` (default :func:`data_dir`).

    A known public file that is missing is downloaded (checksum verified) when ``download``; any other failure raises
    :class:`DataFileError` saying where to put the file.
    """
    p = Path(path).expanduser()
    base = Path(root).expanduser() if root is not None else data_dir()
    full = p if p.is_absolute() else base / p
    if full.exists():
        return full
    key = Path(path).as_posix()
    archive = KNOWN_FOLDERS.get(key.rstrip("/"))
    if archive is not None:
        if not download:
            raise DataFileError(f"data not found: {full}; download {archive.url} and extract its "
                                f"{archive.member_prefix} there, or set {ENV_DATA_DIR}")
        _download_archive(archive, full)
        return full
    known = KNOWN_FILES.get(key)
    if known is None:
        raise DataFileError(f"data not found: {full} (looked for {str(path)!r} under {base}; set {ENV_DATA_DIR} or "
                            f"give an absolute path to a file or folder)")
    if not download:
        raise DataFileError(f"data not found: {full}; download {known.url} there, or set {ENV_DATA_DIR}")
    _download(known, full)
    return full


def _download(known: Download, dest: Path) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(known.url, timeout=30) as response:
            payload = response.read()
    except OSError as exc:
        raise DataFileError(f"data not found: {dest}, and downloading {known.url} failed ({exc}); put the file at "
                            f"{dest} (or point {ENV_DATA_DIR} at a folder holding it)") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != known.sha256:
        raise DataFileError(f"downloaded {known.url} but its sha256 is {digest}, expected {known.sha256}; "
                            f"put a verified copy at {dest}")
    tmp = dest.with_suffix(dest.suffix + ".part")
    tmp.write_bytes(payload)
    os.replace(tmp, dest)  # atomic: a half-written file never takes the real name


def _download_archive(archive: Archive, dest: Path) -> None:
    import io
    import shutil
    import tarfile
    import tempfile

    try:
        with urllib.request.urlopen(archive.url, timeout=60) as response:
            payload = response.read()
    except OSError as exc:
        raise DataFileError(f"data not found: {dest}, and downloading {archive.url} failed ({exc}); extract that "
                            f"archive's {archive.member_prefix} to {dest} (or point {ENV_DATA_DIR} at a folder "
                            f"holding {dest.parent.name}/{dest.name})") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        staging = Path(tmp) / dest.name
        staging.mkdir()
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if member.isfile() and name.startswith(archive.member_prefix) and "/" not in name[len(
                        archive.member_prefix):]:
                    (staging / Path(name).name).write_bytes(tar.extractfile(member).read())
        checked = list(staging.glob(archive.verify_glob))
        digest = folder_digest(checked)
        if len(checked) != archive.count or digest != archive.digest:
            raise DataFileError(f"downloaded {archive.url} but its {len(checked)} checked files have digest {digest}, "
                                f"expected {archive.count} files with {archive.digest}; put a verified copy at {dest}")
        shutil.move(str(staging), str(dest))  # the folder takes its real name only once complete and verified
