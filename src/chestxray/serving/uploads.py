"""Uploads: parsed in memory with hard size caps (checked and decoded by chestxray.data.acceptance).

Werkzeug's default spools any upload over 500 kB to a temporary file on disk; X-rays must never
touch the disk, so file parts go to memory, each capped at CHESTXRAY_MAX_UPLOAD_MB while it is
parsed. The whole request is capped per endpoint (one file, or a full batch) and refused from its
Content-Length before a byte of the body is read.
"""
from __future__ import annotations

import io
from typing import IO

from flask import Request, current_app, g, request
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge

from chestxray.serving.errors import ApiError

FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and small text fields


def per_file_limit() -> int:
    """CHESTXRAY_MAX_UPLOAD_MB in bytes."""
    return int(current_app.config["CHESTXRAY_MAX_UPLOAD_MB"] * 1024 * 1024)


class FileTooLarge(RequestEntityTooLarge):
    """One file part grew past CHESTXRAY_MAX_UPLOAD_MB while it was parsed."""


class _CappedBuffer(io.BytesIO):
    """An in-memory file part that refuses to grow past `limit` bytes (413 while parsing)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def write(self, data) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self.limit:
            raise FileTooLarge()
        return super().write(data)


class InMemoryRequest(Request):
    """Flask's request with file parts kept in memory, each capped at CHESTXRAY_MAX_UPLOAD_MB.

    Text fields keep Werkzeug's own cap (MAX_FORM_MEMORY_SIZE, 500 kB), which also bounds the
    multipart parser's buffer.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None) -> IO[bytes]:
        return _CappedBuffer(per_file_limit())


def limit_request(files: int) -> None:
    """Cap this request at `files` uploads: body size from Content-Length (checked before reading) and parts."""
    request.max_content_length = per_file_limit() * files + FORM_OVERHEAD
    request.max_form_parts = files + 10  # a few text fields besides the files
    g.max_files = files


def too_large_message() -> str:
    """The 413 message in words: the per-file and per-request limits."""
    files = g.get("max_files", current_app.config["CHESTXRAY_MAX_BATCH"])
    return (f"the upload is too large: at most {current_app.config['CHESTXRAY_MAX_UPLOAD_MB']:g} MB per file "
            f"and {files} file{'s' if files != 1 else ''} per request")


def read_upload(upload: FileStorage) -> bytes:
    """One uploaded file's bytes (already size-capped while parsed); the predictor checks and decodes them."""
    return upload.stream.read()


def one_file(field: str = "file") -> FileStorage:
    """The single upload in `field` (the request capped to one file), or a 400 saying how to send it."""
    limit_request(files=1)
    uploads = request.files.getlist(field)
    if not uploads:
        raise ApiError(400, "missing_file", f"send the image as multipart/form-data in the field '{field}'")
    if len(uploads) > 1:
        raise ApiError(400, "too_many_files", f"{len(uploads)} files sent; this endpoint takes one "
                                              "(use /predict/batch for several)")
    return uploads[0]


def many_files(field: str = "files") -> list[FileStorage]:
    """Up to CHESTXRAY_MAX_BATCH uploads in `field`, or a 400 saying what is wrong."""
    max_batch = current_app.config["CHESTXRAY_MAX_BATCH"]
    limit_request(files=max_batch)
    uploads = request.files.getlist(field)
    if not uploads:
        raise ApiError(400, "missing_file", f"send the images as multipart/form-data in the field '{field}'")
    if len(uploads) > max_batch:
        raise ApiError(400, "too_many_files", f"{len(uploads)} files sent; at most {max_batch} per request")
    return uploads
