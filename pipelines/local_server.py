"""A local HTTP server for tests, demos and the benchmark: serves a directory (the generated
world) with keep-alive, plus hostile endpoints under ``/hostile/``.

Hostile endpoints (what a crawl meets on the web):

    /slow/<path>            the file <path>, after ``slow_seconds``
    /hostile/stall          200, Content-Length 100000, sends 1 KB then stalls
    /hostile/404            404
    /hostile/500            500 always
    /hostile/flaky500/<id>  500 on the first request for <id>, then the image (a transient failure)
    /hostile/429/<id>       429 with Retry-After: 1 on the first request for <id>, then the image
    /hostile/redirect       302 to /<image>
    /hostile/noai           the image with ``X-Robots-Tag: noai``
    /hostile/otherbot-noai  the image with ``X-Robots-Tag: otherbot: noai`` (applies to others only)
    /hostile/html           an HTML page served as text/html
    /hostile/truncated      the first half of a JPEG
    /hostile/bomb           a small PNG whose header declares a huge image
    /hostile/oversized      a body larger than the test's max_body_bytes

Built on ``http.server.ThreadingHTTPServer`` (stdlib): it must run anywhere with no extra deps.

``PreloadedServer`` is the benchmark's server: every file of a directory held in memory and
answered from one asyncio event loop (uvloop when installed) with keep-alive, so that the
server, which shares the cores with the crawler under test, costs little and the same for any
client (``Connection: close`` and HTTP/1.0 are honoured: a client that opens a connection per
request pays for its connections, not for the server's file reads).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

OVERSIZED_BYTES = 3_000_000
_SERVES_IMAGE = ("stall", "noai", "otherbot-noai", "truncated")


def bomb_png(*, side: int = 12_000) -> bytes:
    """A tiny PNG (~20 KB) whose header declares side x side pixels (144 M: over Pillow's limit)."""
    buffer = io.BytesIO()
    Image.new("1", (side, side), 0).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes, *, ctype: str = "image/jpeg", headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        server = self.server
        with server.lock:
            server.hits[self.path] += 1
            server.user_agents[self.headers.get("User-Agent", "")] += 1
            hits = server.hits[self.path]
        if self.path.startswith("/slow/"):  # the file, after slow_seconds
            time.sleep(server.slow_seconds)
            self.path = self.path[len("/slow"):]
            return super().do_GET()
        if not self.path.startswith("/hostile/"):
            return super().do_GET()
        name = self.path[len("/hostile/"):]
        images = server.hostile_images
        if name in _SERVES_IMAGE or name.startswith(("flaky500/", "429/")):
            with server.lock:  # each endpoint that serves an image gets its own (first come, first served)
                image = images[server.assigned.setdefault(name, len(server.assigned)) % len(images)]
        if name == "stall":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(image[:1024])
            self.wfile.flush()
            time.sleep(server.stall_seconds)
            self.close_connection = True
        elif name == "404":
            self._send(404, b"not found", ctype="text/plain")
        elif name == "500":
            self._send(500, b"boom", ctype="text/plain")
        elif name.startswith("flaky500/"):
            self._send(500, b"boom", ctype="text/plain") if hits == 1 else self._send(200, image)
        elif name.startswith("429/"):
            if hits == 1:
                self._send(429, b"slow down", ctype="text/plain", headers={"Retry-After": "1"})
            else:
                self._send(200, image)
        elif name == "redirect":
            self._send(302, b"", ctype="text/plain", headers={"Location": server.redirect_to})
        elif name == "noai":
            self._send(200, image, headers={"X-Robots-Tag": "noai"})
        elif name == "otherbot-noai":
            self._send(200, image, headers={"X-Robots-Tag": "otherbot: noai"})
        elif name == "html":
            self._send(200, b"<html><body>not an image</body></html>", ctype="text/html")
        elif name == "truncated":
            self._send(200, image[: len(image) // 2])
        elif name == "bomb":
            self._send(200, server.bomb, ctype="image/png")
        elif name == "oversized":
            self._send(200, b"\xff" * OVERSIZED_BYTES)
        else:
            self._send(404, b"unknown hostile endpoint", ctype="text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # clients that hang up are expected
        pass


class LocalServer:
    """Serve ``root`` on 127.0.0.1 in a background thread; use as a context manager.

    Args:
        root: the directory to serve (e.g. a world written by ``write_world``).
        sample_image: a path under ``root`` whose bytes the hostile endpoints use (and the redirect target).
        hostile_images: paths under ``root`` the hostile endpoints pick from by name (default:
            ``sample_image``), so that their successes are not duplicates of one another.
        port: 0 picks a free port.
        stall_seconds: how long ``/hostile/stall`` holds the connection.
        slow_seconds: how long ``/slow/...`` waits before answering.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        sample_image: str,
        hostile_images: list[str] | None = None,
        port: int = 0,
        stall_seconds: float = 30.0,
        slow_seconds: float = 0.5,
    ) -> None:
        self.root = Path(root)
        handler = partial(_Handler, directory=str(self.root))
        self.httpd = _Server(("127.0.0.1", port), handler)
        self.httpd.lock = threading.Lock()
        self.httpd.hits = Counter()
        self.httpd.user_agents = Counter()
        self.httpd.slow_seconds = slow_seconds
        self.httpd.hostile_images = [(self.root / p).read_bytes() for p in (hostile_images or [sample_image])]
        self.httpd.assigned = {}
        self.httpd.redirect_to = "/" + sample_image
        self.httpd.stall_seconds = stall_seconds
        self.httpd.bomb = bomb_png()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def hits(self) -> Counter:
        return self.httpd.hits

    @property
    def user_agents(self) -> Counter:
        return self.httpd.user_agents

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _StaticProtocol(asyncio.Protocol):
    """HTTP/1.1 GET/HEAD of preloaded bodies; enough of the protocol for HTTP clients, no more."""

    def __init__(self, files: dict[bytes, bytes]) -> None:
        self.files, self.buffer, self.transport = files, b"", None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:  # no header block that long is legitimate
                    self._reply(b"431 Request Header Fields Too Large", b"", close=True, head=False)
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
                self._reply(b"400 Bad Request", b"", close=True, head=False)
                return
            method, target, version = parts
            connection = b""
            for line in lines[1:]:
                if line[:11].lower() == b"connection:":
                    connection = line[11:].strip().lower()
            close = connection == b"close" or (version == b"HTTP/1.0" and connection != b"keep-alive")
            body = self.files.get(target.split(b"?", 1)[0])
            if body is None:
                self._reply(b"404 Not Found", b"not found", close=close, head=method == b"HEAD", ctype=b"text/plain")
            else:
                self._reply(b"200 OK", body, close=close, head=method == b"HEAD")

    def _reply(self, status: bytes, body: bytes, *, close: bool, head: bool, ctype: bytes = b"image/jpeg") -> None:
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: " + str(len(body)).encode()
            + (b"\r\nConnection: close\r\n\r\n" if close else b"\r\n\r\n") + (b"" if head else body)
        )
        if close:
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc) -> None:
        self.transport = None


class PreloadedServer:
    """Serve every file under ``root`` from memory on 127.0.0.1 (``/images/x.jpg`` -> bytes).

    ``run()`` blocks in the calling thread (the benchmark runs it in a process of its own).

    Args:
        root: the directory to serve.
        port: 0 picks a free port.
        pattern: which files to load (a glob relative to ``root``).
    """

    def __init__(self, root: str | Path, *, port: int = 0, pattern: str = "**/*") -> None:
        base = Path(root)
        self.files = {("/" + p.relative_to(base).as_posix()).encode(): p.read_bytes()
                      for p in sorted(base.glob(pattern)) if p.is_file()}
        self.port = port
        self.bytes = sum(len(b) for b in self.files.values())

    def run(self, on_ready=None) -> None:
        """Serve until ``stop()`` (or the process ends); ``on_ready(url)`` is called once the
        port is bound."""
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            loop.create_server(lambda: _StaticProtocol(self.files), "127.0.0.1", self.port, backlog=1024)
        )
        self.port = server.sockets[0].getsockname()[1]
        self.loop = loop
        if on_ready is not None:
            on_ready(f"http://127.0.0.1:{self.port}")
        try:
            loop.run_forever()
        finally:
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()

    def stop(self) -> None:
        """Stop a ``run()`` going on in another thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.local_server ROOT PORT``: serve ROOT's images from memory until killed
    (the benchmark's server); prints the base URL once listening."""
    import sys

    root, port = (argv if argv is not None else sys.argv[1:])[:2]
    PreloadedServer(root, port=int(port), pattern="images/*").run(on_ready=lambda url: print(url, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
