"""Getting a dataset (a location in `data.sources`, or the older single `data.source`): a local folder,
a .zip/.tar(.gz) archive (local or remote), an http(s) URL, or a Google Drive link or file id. A source
may list several locations: the first that works is used (fetch_first), and downloads can be cached.

Whatever the source, the result is a local folder: the dataset root, which holds split folders
(`train`, `test`, optionally `val`) or class folders directly. Every failure is a DataSourceError
whose message is one line saying what is wrong and what to set.
"""
from __future__ import annotations

import gzip
import hashlib
import lzma
import re
import shutil
import tarfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from chestxray.atomic import leftover_name, remove_dead_leftovers
from chestxray.hashing import file_sha256

HINT = ("set data.source in params.yaml (a location in data.sources) to a folder, archive, URL "
        "or Google Drive link")
SPLITS = ("train", "val", "test")
DOWNLOAD_TIMEOUT = (10, 60)  # seconds: to connect, and between two reads
DOWNLOAD_ATTEMPTS = 3  # a refused connection, a 5xx or a body cut short is tried this many times in all
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
    """A download attempt cut off mid-body: the next attempt resumes where it stopped."""


def _session() -> requests.Session:
    """A requests session whose adapter retries refused connections, timeouts before the headers and 429/5xx
    answers (urllib3's Retry: DOWNLOAD_ATTEMPTS in all, exponential backoff from DOWNLOAD_BACKOFF_S)."""
    retry = Retry(total=DOWNLOAD_ATTEMPTS - 1, backoff_factor=DOWNLOAD_BACKOFF_S, allowed_methods={"GET"},
                  status_forcelist=(429, 500, 502, 503, 504), raise_on_status=False)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


class _Progress:
    """Plain progress lines on stdout (one per 10%, or per 50 MB when the size is unknown): readable in logs."""

    def __init__(self, url: str, total: int | None):
        self.url, self.total, self.next = url, total, 0.1 if total else 50 << 20

    def update(self, size: int) -> None:
        if self.total and size / self.total >= self.next:
            print(f"downloading {self.url}: {size / 1e6:,.0f} of {self.total / 1e6:,.0f} MB "
                  f"({size / self.total:.0%})", flush=True)
            self.next = size / self.total + 0.1
        elif not self.total and size >= self.next:
            print(f"downloading {self.url}: {size / 1e6:,.0f} MB", flush=True)
            self.next = size + (50 << 20)


def _get_once(session: requests.Session, url: str, part: Path, timeout: tuple[float, float],
              total: int | None) -> int | None:
    """One attempt: stream `url` into `part`, resuming after the bytes already there; return the full size.

    Raise _Retryable when the body is cut off, DataSourceError on an HTTP error or a connection that
    failed after urllib3's retries.
    """
    size = part.stat().st_size if part.exists() and total else 0
    headers = {"Range": f"bytes={size}-"} if size else {}
    try:
        with session.get(url, stream=True, timeout=timeout, headers=headers) as response:
            response.raise_for_status()
            if response.status_code != 206:  # the server sends the whole file again
                size = 0
            # With a Content-Encoding, requests decodes on the fly and the header counts encoded bytes.
            length = response.headers.get("Content-Length", "")
            if not response.headers.get("Content-Encoding") and length.isdigit():
                total = size + int(length)
            progress = _Progress(url, total)
            with open(part, "ab" if size else "wb") as f:
                for chunk in response.iter_content(_CHUNK):
                    f.write(chunk)
                    size += len(chunk)
                    progress.update(size)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "error"
        raise DataSourceError(f"could not download {url}: HTTP {status}: check the URL or {HINT}") from None
    except requests.exceptions.ChunkedEncodingError:
        raise _Retryable(f"cut off after {size:,} of {total:,} bytes" if total else
                         "the connection closed before the download was complete") from None
    except requests.RequestException as exc:
        raise DataSourceError(f"could not download {url} after {DOWNLOAD_ATTEMPTS} attempts "
                              f"({_request_reason(exc)}): check the URL and the network, or {HINT}") from None
    if total is not None and size != total:  # urllib3 checks this too; never trust a short file
        raise _Retryable(f"cut off after {size:,} of {total:,} bytes")
    return total


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
    """Stream `url` into `folder` with progress lines; the file gets its final name only once it is complete
    and matches `checksum` ("sha256:<hex>", optional).

    Connection failures and 429/5xx answers are retried by urllib3 (see _session). urllib3's Retry ends
    once the headers have arrived, so a body cut off mid-stream is resumed here with a Range request
    (DOWNLOAD_ATTEMPTS in all, waiting DOWNLOAD_BACKOFF_S, then twice that, ...).
    """
    target = folder / (Path(urlparse(url).path).name or "download")
    part = target.with_name(target.name + ".part")
    total, reason = None, None
    try:
        with _session() as session:
            for number in range(1, DOWNLOAD_ATTEMPTS + 1):
                try:
                    total = _get_once(session, url, part, timeout, total)
                    reason = None
                    break
                except _Retryable as exc:
                    reason = str(exc)
                if number < DOWNLOAD_ATTEMPTS:
                    time.sleep(DOWNLOAD_BACKOFF_S * 2 ** (number - 1))
    except DataSourceError:
        part.unlink(missing_ok=True)
        raise
    if reason is not None:
        part.unlink(missing_ok=True)
        raise DataSourceError(f"could not download {url} after {DOWNLOAD_ATTEMPTS} attempts ({reason}): "
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


def _cached_download(source: str, downloads: Path, checksum: str | None, cache: Path | None,
                     download: Callable[[str, Path, str | None], Path]) -> Path:
    """Download `source` once: with a cache folder, a complete earlier download is used again."""
    if cache is None:
        return download(source, downloads, checksum)
    folder = Path(cache).expanduser() / hashlib.sha256(source.encode()).hexdigest()[:16]
    done = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")) if folder.is_dir() else []
    if done:
        try:
            if checksum:
                verify_checksum(done[0], checksum, source)
            print(f"using the download of {source} cached in {done[0]}", flush=True)
            return done[0]
        except DataSourceError:  # a different file than the checksum names: fetch it again
            done[0].unlink()
    path = download(source, downloads, checksum)
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(folder, ".download")
    temp = folder / leftover_name(".download")
    shutil.move(path, temp)  # another disk maybe: copied under a temporary name, then renamed at once
    return temp.rename(folder / path.name)


def fetch(source: str, workdir: Path, checksum: str | None = None, cache: Path | None = None) -> Path:
    """Make `source` available locally (downloading and extracting into `workdir`) and return the dataset root.

    `checksum` ("sha256:<hex>") is checked on the archive file, downloaded or local; with `cache`, a
    download is kept there and not repeated.
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
    if kind in ("url", "drive"):
        archive = _cached_download(source, downloads, checksum, cache,
                                   download_url if kind == "url" else download_drive)
    else:
        archive = Path(source).expanduser()
        if checksum:
            verify_checksum(archive, checksum, source)
    return find_dataset_root(extract(archive, workdir / "extracted", source), source)


def fetch_first(locations: list[str], workdir: Path, checksum: str | None = None, cache: Path | None = None,
                name: str = "") -> tuple[Path, str, list[dict[str, str]]]:
    """Fetch the first of `locations` that works: (dataset root, the location used, what failed before it).

    A checksum applies to the archive and URL alternatives only. With one location its own error is
    raised; with several, one error names every place tried, why each failed, and what to do.
    """
    tried = []
    for number, location in enumerate(locations):
        folder = workdir / str(number) if len(locations) > 1 else workdir
        try:
            is_folder = Path(str(location)).expanduser().is_dir()
            root = fetch(location, folder, None if is_folder else checksum, cache)
            return root, location, tried
        except DataSourceError as exc:
            if len(locations) == 1:
                raise
            tried.append({"location": location, "reason": str(exc).replace(f": {HINT}", "")})
            shutil.rmtree(folder, ignore_errors=True)
    places = "; ".join(f"{t['location']} ({t['reason']})" for t in tried)
    local = next((loc for loc in locations if "://" not in loc), None)
    todo = f"put the dataset at {local}" if local else "check the network"
    raise DataSourceError(f"source {name}: none of its {len(locations)} locations worked: {places}: {todo}, "
                          f"or connect to the internet and run again, or set its location in params.yaml "
                          f"(data.sources)")
