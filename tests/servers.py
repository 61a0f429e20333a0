"""Real servers for the remote-cache tests, on 127.0.0.1 only, started and stopped by the tests.

- ``S3Server``: moto's standalone S3 server (``moto.server.ThreadedMotoServer``, the server
  s3fs's own test suite uses) in a thread, with a request log (method, path, bytes sent) so
  tests can count what a reader downloads.
- ``HttpServer``: ``http.server`` serving a local folder read-only (GET/HEAD with ranges), in a
  thread, with the same kind of request log.

How kvkd finds the S3 endpoint: through the environment variables botocore (under s3fs) reads
itself (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``), so neither kvkd nor its options know about endpoints: ``s3_env`` returns
them, for ``os.environ`` and for child processes.
"""

from __future__ import annotations

import http.server
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RequestLog:
    """Requests a server answered: ``(method, path, status, bytes sent, Range header or "")``
    each, thread-safe."""

    entries: list[tuple[str, str, int, int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str, status: int, nbytes: int, byte_range: str = "") -> None:
        with self.lock:
            self.entries.append((method, path, status, nbytes, byte_range))

    def mark(self) -> int:
        """Position to count from (``since``)."""
        with self.lock:
            return len(self.entries)

    def since(self, mark: int = 0, method: str | None = None, path_re: str | None = None) -> list[tuple[str, str, int, int, str]]:
        """Requests after ``mark``, optionally of one method and with a path matching ``path_re``."""
        with self.lock:
            out = self.entries[mark:]
        return [e for e in out if (method is None or e[0] == method) and (path_re is None or re.search(path_re, e[1]))]


class _CountingApp:
    """WSGI middleware: logs every request with the bytes of its response body."""

    def __init__(self, app, log: RequestLog):
        self.app, self.log = app, log

    def __call__(self, environ, start_response):
        status = [0]

        def sr(s, headers, exc_info=None):
            status[0] = int(s.split()[0])
            return start_response(s, headers, exc_info)

        body = self.app(environ, sr)
        chunks = list(body)
        if hasattr(body, "close"):
            body.close()
        self.log.add(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), status[0], sum(len(c) for c in chunks),
                     environ.get("HTTP_RANGE", ""))
        return chunks


class S3Server:
    """moto's S3 server on 127.0.0.1 with a request log (``log``).

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``.
        log: every request answered.
    """

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.log = RequestLog()
        port = free_port()
        log = self.log

        class _Quiet(MotoRequestHandler):
            def log_request(self, *args, **kwargs) -> None:  # no stderr line per request
                pass

        class _Server(ThreadedMotoServer):
            def _server_entry(self) -> None:  # ThreadedMotoServer's own, with the app wrapped in the log
                app = _CountingApp(DomainDispatcherApplication(create_backend_app), log)
                self._server = make_server(self._ip_address, self._port, app, True, request_handler=_Quiet)
                self._server_ready_event.set()
                self._server.serve_forever()

        self._server = _Server(ip_address="127.0.0.1", port=port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point s3fs (botocore) at this server, dummy credentials."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "kvkd-test",
            "AWS_SECRET_ACCESS_KEY": "kvkd-test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> S3Server:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="kvkd-test", aws_secret_access_key="kvkd-test",
                     region_name="us-east-1").create_bucket(Bucket=name)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    log_ref: RequestLog

    def log_message(self, *args) -> None:  # no stderr noise
        pass

    def send_head(self):
        # Range requests (zarr reads a shard's index from its end): http.server has none, so
        # answer bytes=a-b / bytes=-n here and let the base class do the rest.
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if rng and os.path.isfile(path):
            data = Path(path).read_bytes()
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m:
                a, b = m.groups()
                if a == "":
                    start, stop = max(len(data) - int(b), 0), len(data)
                else:
                    start, stop = int(a), min(int(b) + 1 if b else len(data), len(data))
                body = data[start:stop]
                self.send_response(206)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self._body = body
                return None
        self._body = None
        return super().send_head()

    def do_GET(self):
        f = self.send_head()
        if self._body is not None:
            data = self._body
        elif f is not None:
            with f:
                data = f.read()
        else:
            data = b""
        self.log_ref.add("GET", self.path, 0, len(data), self.headers.get("Range", ""))  # before the client can see the answer
        self.wfile.write(data)

    def do_HEAD(self):
        f = self.send_head()
        self.log_ref.add("HEAD", self.path, 0, 0)
        if f is not None:
            f.close()


class HttpServer:
    """A read-only HTTP server over ``root`` on 127.0.0.1 (``url`` is its base, ``log`` its requests)."""

    def __init__(self, root: Path) -> None:
        self.log = RequestLog()
        handler = type("Handler", (_QuietHandler,), {"log_ref": self.log})
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
