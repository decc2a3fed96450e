"""Getting the dataset named by `data.source`: a local folder, a .zip/.tar(.gz) archive (local or
remote), an http(s) URL, or a Google Drive link or file id.

Whatever the source, the result is a local folder: the dataset root, which holds split folders
(`train`, `test`, optionally `val`) or class folders directly. Every failure is a DataSourceError
whose message is one line saying what is wrong and what to set.
"""
from __future__ import annotations

import gzip
import lzma
import re
import tarfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import requests

from chestxray.hashing import file_sha256

HINT = "set data.source in params.yaml to a folder, archive, URL or Google Drive link"
SPLITS = ("train", "val", "test")
DOWNLOAD_TIMEOUT = (10, 60)  # seconds: to connect, and between two reads
DOWNLOAD_ATTEMPTS = 3  # a dropped connection or a short body is tried again, this many times in all
DOWNLOAD_BACKOFF_S = 1.0  # wait before the 2nd attempt; doubled before each next one (1 s, 2 s)
_DRIVE_HOSTS = {"drive.google.com", "docs.google.com", "drive.usercontent.google.com"}
_DRIVE_ID = re.compile(r"[A-Za-z0-9_-]{25,}")
_CHUNK = 1 << 20


class DataSourceError(RuntimeError):
    """The data source cannot be used; the message is one line: what is wrong and what to set."""


def _one_line(text: str) -> str:
    """The first non-empty line of a (library's) message, for embedding in ours."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def source_kind(source: str) -> str:
    """'folder', 'archive' (a local file), 'url' or 'drive'; a local path that does not exist is an error."""
    if source.startswith(("http://", "https://")):
        return "drive" if urlparse(source).hostname in _DRIVE_HOSTS else "url"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "archive"
    if _DRIVE_ID.fullmatch(source):
        return "drive"
    raise DataSourceError(f"data.source {source} not found: {HINT}")


def _request_reason(exc: requests.RequestException) -> str:
    """A few words for why a request failed (requests' own messages run to several hundred characters)."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection closed before the download was complete"
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    return errno_text.group(1).strip().lower() if errno_text else exc.__class__.__name__


class _Retryable(Exception):
    """A download attempt that failed in a way another attempt may not: a dropped connection, a short body, a 5xx."""


def _get_once(url: str, part: Path, timeout: tuple[float, float]) -> None:
    """One attempt: stream `url` into `part`; raise _Retryable or DataSourceError on failure."""
    size, expected = 0, None
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise _Retryable(f"HTTP {response.status_code}")
            response.raise_for_status()
            # With a Content-Encoding, requests decodes on the fly and the header counts encoded bytes.
            if not response.headers.get("Content-Encoding") and response.headers.get("Content-Length", "").isdigit():
                expected = int(response.headers["Content-Length"])
            with open(part, "wb") as f:
                for chunk in response.iter_content(_CHUNK):
                    f.write(chunk)
                    size += len(chunk)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "error"
        raise DataSourceError(f"could not download {url}: HTTP {status}: check the URL or {HINT}") from None
    except requests.RequestException as exc:
        cut = isinstance(exc, requests.exceptions.ChunkedEncodingError) and expected is not None
        raise _Retryable(f"cut off after {size:,} of {expected:,} bytes" if cut else _request_reason(exc)) from None
    if expected is not None and size != expected:  # urllib3 checks this too; never trust a short file
        raise _Retryable(f"cut off after {size:,} of {expected:,} bytes")


def _with_retries(attempt: Callable[[], None], attempts: int, backoff_s: float) -> str | None:
    """Call `attempt` up to `attempts` times, waiting backoff_s, 2*backoff_s, ... between; the last reason or None."""
    reason = None
    for number in range(1, attempts + 1):
        try:
            attempt()
            return None
        except _Retryable as exc:
            reason = str(exc)
        if number < attempts:
            time.sleep(backoff_s * 2 ** (number - 1))
    return reason


def _publish(part: Path, target: Path, source: str, checksum: str | None) -> Path:
    """Check a complete download against `checksum`, then give it its final name (never before)."""
    if checksum:
        try:
            verify_checksum(part, checksum, source)
        except DataSourceError:
            part.unlink(missing_ok=True)
            raise
    return part.rename(target)


def download_url(url: str, folder: Path, checksum: str | None = None,
                 timeout: tuple[float, float] = DOWNLOAD_TIMEOUT) -> Path:
    """Stream `url` into `folder`, retrying a dropped or short download (DOWNLOAD_ATTEMPTS in all, waiting
    DOWNLOAD_BACKOFF_S, then twice that, ...); the file gets its final name only once it is complete and
    matches `checksum` ("sha256:<hex>", optional)."""
    target = folder / (Path(urlparse(url).path).name or "download")
    part = target.with_name(target.name + ".part")
    attempts = DOWNLOAD_ATTEMPTS
    try:
        reason = _with_retries(lambda: _get_once(url, part, timeout), attempts, DOWNLOAD_BACKOFF_S)
    except DataSourceError:
        part.unlink(missing_ok=True)
        raise
    if reason is not None:
        part.unlink(missing_ok=True)
        raise DataSourceError(f"could not download {url} after {attempts} attempts ({reason}): "
                              f"check the URL and the network, or {HINT}")
    return _publish(part, target, url, checksum)


def download_drive(source: str, folder: Path, checksum: str | None = None,
                   timeout: tuple[float, float] = DOWNLOAD_TIMEOUT) -> Path:
    """Download a Google Drive file (share link or bare file id) into `folder` with gdown.

    gdown retries a dropped connection itself (DOWNLOAD_ATTEMPTS in all, resuming where it stopped,
    with its own random waits) and refuses a body shorter than announced; the checksum is checked here.
    """
    import gdown

    part = folder / "drive-download.part"
    advice = f"check the link and that it is shared with 'anyone with the link', or {HINT}"
    # gdown finds the file id in share links itself (/file/d/<id>/view, open?id=<id>, uc?id=<id>).
    where = {"url": source} if source.startswith(("http://", "https://")) else {"id": source}
    try:
        result = gdown.download(**where, output=str(part), quiet=True, timeout=timeout,
                               retries=DOWNLOAD_ATTEMPTS - 1)
    except Exception as exc:  # gdown raises its own errors, requests' errors and OSError
        part.unlink(missing_ok=True)
        reason = _request_reason(exc) if isinstance(exc, requests.RequestException) else _one_line(exc)
        reason = reason or exc.__class__.__name__
        raise DataSourceError(f"could not download Google Drive file {source} ({reason}): {advice}") from None
    if not result or not part.is_file():
        raise DataSourceError(f"could not download Google Drive file {source}: {advice}")
    return _publish(part, folder / "drive-download", source, checksum)


def verify_checksum(path: Path, checksum: str, source: str) -> None:
    """Check a file against `checksum` ("sha256:<hex>"); a mismatch names both digests."""
    algorithm, _, expected = str(checksum).partition(":")
    if algorithm.lower() != "sha256" or not re.fullmatch(r"[0-9a-fA-F]{64}", expected):
        raise DataSourceError(f"data.checksum {checksum!r} is not 'sha256:<64 hex digits>': "
                              "set data.checksum in params.yaml to that form or to null")
    actual = file_sha256(path)
    if actual != expected.lower():
        raise DataSourceError(
            f"checksum mismatch for {source}: expected sha256:{expected.lower()}, got sha256:{actual}: "
            "check data.source, or set data.checksum in params.yaml to the new digest"
        )


def _skipped(name: str) -> bool:
    """Archive members to leave out: macOS resource forks."""
    return "__MACOSX" in Path(name).parts


def _extract_zip(archive: Path, folder: Path, source: str) -> None:
    root = folder.resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if _skipped(info.filename):
                continue
            if not (root / info.filename).resolve().is_relative_to(root):
                raise DataSourceError(f"{source} holds an unsafe path {info.filename!r} (outside the archive): {HINT}")
            zf.extract(info, root)


def _extract_tar(archive: Path, folder: Path, source: str) -> None:
    with tarfile.open(archive) as tf:
        try:
            # The generator keeps a compressed tar to one pass; the "data" filter refuses absolute
            # paths, '..', links pointing outside, and device files.
            tf.extractall(folder, members=(m for m in tf if not _skipped(m.name)), filter="data")
        except tarfile.FilterError as exc:
            raise DataSourceError(f"{source} holds an unsafe member ({_one_line(exc)}): {HINT}") from None


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def extract(archive: Path, folder: Path, source: str) -> Path:
    """Extract a .zip or .tar(.gz/.bz2/.xz) archive (recognised by content) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, folder, source)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, folder, source)
        elif _starts_with(archive, b"PK\x03\x04"):
            raise zipfile.BadZipFile("a zip without its central directory: cut short?")
        else:
            raise DataSourceError(f"{source} is not a folder or a .zip/.tar archive: {HINT}")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as exc:
        reason = _one_line(exc) or exc.__class__.__name__
        raise DataSourceError(f"{source} is a damaged archive ({reason}): {HINT}") from None
    return folder


def _subfolders(folder: Path) -> list[Path]:
    """Visible subfolders, sorted; hidden folders and __MACOSX are not data."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX")


def _holds_files(folder: Path) -> bool:
    return any(f.is_file() and not f.name.startswith(".") for f in folder.iterdir())


def find_dataset_root(folder: Path, source: str) -> Path:
    """Descend through single-folder wrappers until a folder holds split folders or class folders."""
    current = folder
    while True:
        subfolders = _subfolders(current)
        if any(d.name.lower() in SPLITS for d in subfolders):
            return current
        if sum(_holds_files(d) for d in subfolders) >= 2:
            return current
        if len(subfolders) != 1:
            raise DataSourceError(f"no split folders (train, test) or class folders found in {source}: {HINT}")
        current = subfolders[0]


def split_folders(root: Path) -> dict[str, Path]:
    """The dataset's split folders by lower-case name; {'': root} when root holds class folders."""
    splits = {d.name.lower(): d for d in _subfolders(root) if d.name.lower() in SPLITS}
    return splits or {"": root}


def fetch(source: str, workdir: Path, checksum: str | None = None) -> Path:
    """Make `source` available locally (downloading and extracting into `workdir`) and return the dataset root.

    `checksum` ("sha256:<hex>") is checked on the archive file, downloaded or local.
    """
    source = str(source or "").strip()
    if not source:
        raise DataSourceError(f"data.source is empty: {HINT}")
    kind = source_kind(source)
    if kind == "folder":
        if checksum:
            raise DataSourceError(f"data.checksum applies to an archive but data.source {source} is a folder: "
                                  "set data.checksum in params.yaml to null")
        return find_dataset_root(Path(source).expanduser(), source)
    downloads = workdir / "download"
    downloads.mkdir(parents=True, exist_ok=True)
    if kind == "url":
        archive = download_url(source, downloads, checksum)
    elif kind == "drive":
        archive = download_drive(source, downloads, checksum)
    else:
        archive = Path(source).expanduser()
        if checksum:
            verify_checksum(archive, checksum, source)
    return find_dataset_root(extract(archive, workdir / "extracted", source), source)
