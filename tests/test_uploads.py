"""Upload limits (chestxray.serving.uploads) on a bare Flask app: exact byte caps, counts and messages.

No model is loaded: the app here has only the upload plumbing the real one uses (InMemoryRequest,
one_file/many_files, too_large_message), so these run in milliseconds; test_api.py covers the same
rules through the real endpoints.
"""
from __future__ import annotations

import io

import pytest
from flask import Flask, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from chestxray.serving import uploads
from chestxray.serving.errors import ApiError
from chestxray.serving.uploads import (FORM_OVERHEAD, FileTooLarge, InMemoryRequest, many_files, one_file,
                                       per_file_limit, read_upload, too_large_message)

MB = 1024 * 1024


@pytest.fixture()
def app():
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.update(CHESTXRAY_MAX_UPLOAD_MB=0.5, CHESTXRAY_MAX_BATCH=3)

    @app.post("/one")
    def one():
        upload = one_file()
        data = read_upload(upload)
        return jsonify(size=len(data), head=data[:4].decode("latin-1"), name=upload.filename,
                       stream=type(upload.stream).__name__, max_content_length=request.max_content_length,
                       max_form_parts=request.max_form_parts, max_files=g.max_files)

    @app.post("/one-in-scan")
    def one_in_scan():
        return jsonify(size=len(read_upload(one_file("scan"))))

    @app.post("/many")
    def many():
        files = many_files()
        return jsonify(sizes=[len(read_upload(f)) for f in files], max_content_length=request.max_content_length,
                       max_form_parts=request.max_form_parts, max_files=g.max_files)

    @app.post("/many-in-scans")
    def many_in_scans():
        return jsonify(count=len(many_files("scans")))

    @app.errorhandler(ApiError)
    def api_error(exc):
        return jsonify(exc.to_dict()), exc.status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc):
        return jsonify(error=type(exc).__name__, message=too_large_message()), 413

    return app


@pytest.fixture()
def client(app):
    return app.test_client()


def files(field: str, *sizes: int) -> dict:
    return {field: [(io.BytesIO(b"\xff\xd8\xff" + b"x" * (n - 3)), f"scan{k}.jpeg") for k, n in enumerate(sizes)]}


def test_per_file_limit_is_the_setting_in_bytes(app):
    with app.app_context():
        assert per_file_limit() == 512 * 1024
        app.config["CHESTXRAY_MAX_UPLOAD_MB"] = 10.0
        assert per_file_limit() == 10 * MB
        app.config["CHESTXRAY_MAX_UPLOAD_MB"] = 0.3  # fractions of a byte are cut, never rounded up
        assert per_file_limit() == int(0.3 * MB) == 314572
    assert FORM_OVERHEAD == 64 * 1024


def test_capped_buffer_takes_exactly_its_limit():
    buffer = uploads._CappedBuffer(10)
    assert buffer.limit == 10
    assert buffer.write(b"123456") == 6
    assert buffer.write(b"7890") == 4  # exactly at the limit: accepted
    with pytest.raises(FileTooLarge):
        buffer.write(b"!")
    assert buffer.getvalue() == b"1234567890"
    assert issubclass(FileTooLarge, RequestEntityTooLarge)


def test_one_file_is_read_from_memory_with_the_request_capped_to_one(client):
    response = client.post("/one", data=files("file", 1000))
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"size": 1000, "head": "\xff\xd8\xffx", "name": "scan0.jpeg",
                                   "stream": "_CappedBuffer", "max_content_length": 512 * 1024 + 64 * 1024,
                                   "max_form_parts": 11, "max_files": 1}


def test_a_file_of_exactly_the_limit_passes_and_one_byte_more_is_refused(client):
    assert client.post("/one", data=files("file", 512 * 1024)).get_json()["size"] == 512 * 1024
    response = client.post("/one", data=files("file", 512 * 1024 + 1))
    assert response.status_code == 413
    assert response.get_json() == {"error": "FileTooLarge", "message": "the upload is too large: at most 0.5 MB "
                                                                      "per file and 1 file per request"}


def test_a_request_over_its_length_cap_is_refused_before_parsing(client):
    body = b"x" * (512 * 1024 + FORM_OVERHEAD + 1)
    response = client.post("/one", data=body, content_type="multipart/form-data; boundary=b")
    assert response.status_code == 413
    assert response.get_json()["error"] == "RequestEntityTooLarge"


def test_one_file_missing_or_several(client):
    response = client.post("/one", data={"other": (io.BytesIO(b"abc"), "a.jpeg")})
    assert response.status_code == 400
    assert response.get_json() == {"error": "missing_file",
                                   "message": "send the image as multipart/form-data in the field 'file'"}
    response = client.post("/one", data=files("file", 10, 10))
    assert response.status_code == 400
    assert response.get_json() == {"error": "too_many_files", "message": "2 files sent; this endpoint takes one "
                                                                         "(use /predict/batch for several)"}
    response = client.post("/one-in-scan", data=files("file", 10))
    assert response.get_json()["message"] == "send the image as multipart/form-data in the field 'scan'"
    assert client.post("/one-in-scan", data=files("scan", 10)).get_json() == {"size": 10}


def test_many_files_up_to_the_batch_size(client):
    response = client.post("/many", data=files("files", 10, 20, 30))
    assert response.status_code == 200
    assert response.get_json() == {"sizes": [10, 20, 30], "max_content_length": 3 * 512 * 1024 + 64 * 1024,
                                   "max_form_parts": 13, "max_files": 3}
    assert client.post("/many", data=files("files", 7)).get_json()["sizes"] == [7]


def test_many_files_missing_or_too_many(client):
    response = client.post("/many", data=files("file", 10))
    assert response.status_code == 400
    assert response.get_json() == {"error": "missing_file",
                                   "message": "send the images as multipart/form-data in the field 'files'"}
    response = client.post("/many", data=files("files", 10, 10, 10, 10))
    assert response.status_code == 400
    assert response.get_json() == {"error": "too_many_files", "message": "4 files sent; at most 3 per request"}
    assert client.post("/many-in-scans", data=files("scans", 1, 2)).get_json() == {"count": 2}
    assert client.post("/many-in-scans", data=files("files", 1)).get_json()["message"].endswith("field 'scans'")


def test_too_large_message_names_both_limits(app):
    with app.test_request_context():
        # Before any endpoint capped the request: the batch size, plural.
        assert too_large_message() == "the upload is too large: at most 0.5 MB per file and 3 files per request"
        g.max_files = 1
        assert too_large_message() == "the upload is too large: at most 0.5 MB per file and 1 file per request"
        g.max_files = 2
        app.config["CHESTXRAY_MAX_UPLOAD_MB"] = 10.0
        assert too_large_message() == "the upload is too large: at most 10 MB per file and 2 files per request"
