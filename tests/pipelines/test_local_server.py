"""The benchmark's in-memory server: keep-alive, Connection: close, HEAD and 404, over real HTTP."""

from __future__ import annotations

import http.client
import threading
import urllib.request

import pytest

from pipelines.local_server import PreloadedServer


@pytest.fixture()
def served(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"\xff\xd8" + b"a" * 5000)
    (tmp_path / "images" / "b.jpg").write_bytes(b"\xff\xd8" + b"b" * 70_000)
    (tmp_path / "other.txt").write_bytes(b"not served")
    server = PreloadedServer(tmp_path, pattern="images/*")
    ready = threading.Event()
    urls: list[str] = []
    thread = threading.Thread(target=server.run, kwargs={"on_ready": lambda u: (urls.append(u), ready.set())}, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield server, urls[0]
    server.stop()
    thread.join(10)
    assert not thread.is_alive()


def test_serves_preloaded_files_over_one_keep_alive_connection(served):
    server, url = served
    assert server.bytes == 5002 + 70_002
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/images/a.jpg")
    first = conn.getresponse()
    assert (first.status, first.read()) == (200, b"\xff\xd8" + b"a" * 5000)
    sock = conn.sock
    conn.request("GET", "/images/b.jpg?x=1")  # the same socket: the server kept it open
    second = conn.getresponse()
    assert second.status == 200 and len(second.read()) == 70_002 and conn.sock is sock
    conn.request("HEAD", "/images/a.jpg")
    head = conn.getresponse()
    assert head.status == 200 and head.getheader("Content-Length") == "5002" and head.read() == b""
    conn.request("GET", "/other.txt")  # outside the pattern: not loaded
    missing = conn.getresponse()
    assert (missing.status, missing.read()) == (404, b"not found")
    conn.close()


def test_honours_connection_close_as_urllib_sends_it(served):
    _, url = served
    with urllib.request.urlopen(f"{url}/images/a.jpg", timeout=5) as r:  # urllib asks for Connection: close
        assert r.status == 200 and r.headers["Connection"] == "close" and len(r.read()) == 5002


def test_answers_a_malformed_request_with_400_and_closes(served):
    import socket

    server, _ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /images/a.jpg HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):  # the server closes after answering
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 Bad Request") and b"Connection: close" in reply
