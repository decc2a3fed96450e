"""A real HTTP server that cuts its downloads off, for the download-fault tests and bench/download_faults.py."""
from __future__ import annotations

import http.server
import re
import threading


class FaultyServer:
    """A real HTTP server on 127.0.0.1 serving one file at any path.

    The first `cut` responses announce the whole file but stop half-way and drop the connection;
    with `stall` set, a cut response instead waits for the event before dropping. Range requests
    are honoured (gdown resumes with them). `requests` counts the GET requests.
    """

    def __init__(self, body: bytes, cut: int = 0, stall: threading.Event | None = None):
        self.body, self.cut, self.stall, self.requests = body, cut, stall, 0
        self.half_sent = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                start = int(re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-"))[1])
                part = server.body[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.body) - 1}/{len(server.body)}")
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if server.requests <= server.cut:
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    server.half_sent.set()
                    if server.stall is not None:
                        server.stall.wait(30)
                else:
                    self.wfile.write(part)
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/chest_xray.zip"

    def __enter__(self) -> "FaultyServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.stall is not None:
            self.stall.set()
        self.httpd.shutdown()
        self.httpd.server_close()
