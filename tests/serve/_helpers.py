"""Helpers shared by tests/serve (imported by name: conftest puts this folder on sys.path)."""

from __future__ import annotations

import base64
import io
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- media


def scene_png(seed: int, size: int = 48, fmt: str = "PNG") -> bytes:
    from vlm.world import render_scene, sample_scene

    img = render_scene(sample_scene(np.random.default_rng(seed)), width=size, height=size)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def make_mp4(n: int = 12, size: int = 32) -> bytes:
    from pipelines.world import encode_mp4
    from vlm.world import render_scene, sample_scene

    rng = np.random.default_rng(7)
    frames = [render_scene(sample_scene(rng), width=size, height=size) for _ in range(n)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.mp4"
        try:
            encode_mp4(frames, path, codec="libx264", fps=4)
        except Exception:
            encode_mp4(frames, path, codec="mpeg4", fps=4)
        return path.read_bytes()


def bomb_png() -> bytes:
    """A 1-bit 12000x12000 PNG: a few KB on the wire, 144 M pixels decoded."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class MediaServer:
    """A local HTTP server with good, bad and slow media."""

    def __init__(self) -> None:
        png = scene_png(1)
        self.files: dict[str, tuple[bytes, str]] = {
            "/a.png": (png, "image/png"),
            "/b.jpg": (scene_png(2, fmt="JPEG"), "image/jpeg"),
            "/c.png": (scene_png(3), "image/png"),
            "/video.mp4": (make_mp4(), "video/mp4"),
            "/corrupt.png": (png[: len(png) // 2], "image/png"),
            "/text.txt": (b"hello, I am not an image" * 10, "text/plain"),
            "/bomb.png": (bomb_png(), "image/png"),
            "/big.png": (scene_png(4, size=600), "image/png"),
        }
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path.startswith("/slow"):
                    time.sleep(4)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/a.png")
                    self.end_headers()
                    return
                path = "/a.png" if self.path.startswith("/slow") else self.path
                if path not in files:
                    self.send_response(404)
                    self.end_headers()
                    return
                data, ctype = files[path]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(ThreadingHTTPServer):
            # A listen backlog for bursts: at the default of 5, a burst of fetches loses SYNs and
            # a client's retry a second later outlives the tests' short fetch timeout.
            request_queue_size = 128

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()


def deploy_main(args, timeout: float = 120.0) -> None:
    """Deploy the main app from the serve config ``vlm serve --write-config`` writes, as ``serve
    deploy`` applies one (the controller's declarative apply, as Ray's own ``serve run
    config.yaml`` does): a later change to a deployment's ``user_config`` reconfigures its running
    replicas in place. Returns once the app runs the new config."""
    import time

    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    from serve.cli import serve_config

    cfg = serve_config(args, name="main", route_prefix="/")
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": cfg["applications"]}))
    # The controller applies the config on its next loop: see the update start (or 2 s pass,
    # time enough for an in-place reconfigure to have finished), then wait for RUNNING.
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:
        app = serve.status().applications.get("main")
        if app is None or app.status != ApplicationStatus.RUNNING:
            break
        time.sleep(0.05)
    deadline = time.monotonic() + timeout
    while True:
        app = serve.status().applications.get("main")
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        assert app is None or app.status != ApplicationStatus.DEPLOY_FAILED, app.message
        assert time.monotonic() < deadline, f"the app is not running after {timeout:.0f}s: {app}"
        time.sleep(0.2)


def replica_actors(deployment: str, app: str = "main") -> set[str]:
    """The names of a deployment's replica actors (a restarted replica is a new name)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")}
