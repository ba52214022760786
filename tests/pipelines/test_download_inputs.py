"""Download (real HTTP from a server the test starts on 127.0.0.1), URL-list and img2dataset inputs, resume
state and the report's errors by host: called directly, no Ray."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import download
from pipelines.config import DownloadConfig, InputConfig, load_curate_config
from pipelines.download import Downloader, fetch_all, fetch_many, retry_after_seconds, robots_opt_out
from pipelines.inputs import RESERVED, prepare_shards, read_shard_rows, read_url_list, split_member_name
from pipelines.report import summarize
from pipelines.shard import PIPELINE_SCHEMA, process_shard
from _curation_helpers import _jpeg


# ------------------------------------------------------------------ download (real HTTP, no Ray)


def test_downloader_hostile_endpoints(server):
    names = ["stall", "404", "500", "flaky500/x", "429/x", "redirect", "noai", "otherbot-noai", "oversized"]
    batch = {"url": np.array([f"{server.url}/hostile/{n}" for n in names] + ["ftp://nope/x.jpg"])}
    cfg = DownloadConfig(timeout=1.0, retries=1, backoff=0.05, max_body_bytes=1_000_000)
    start = time.perf_counter()
    out = Downloader(config=cfg)(batch)
    elapsed = time.perf_counter() - start
    got = dict(zip(names + ["ftp"], out["error_message"]))
    assert got == {
        "stall": "timeout", "404": "http_404", "500": "http_500", "flaky500/x": None, "429/x": None,
        "redirect": None, "noai": "x_robots_tag_noai", "otherbot-noai": None, "oversized": "body_too_large",
        "ftp": "invalid_url: expected an http or https URL, got scheme 'ftp'",
    }  # fmt: skip
    assert server.hits["/hostile/500"] >= 2 and server.hits["/hostile/404"] == 1  # 5xx retried, 4xx not
    assert server.hits["/hostile/429/x"] == 2
    assert 1.0 <= elapsed < 7.5  # waited Retry-After (1 s); the stalled body (8 s) was cut at the 1 s deadline twice
    for i, n in enumerate(names):
        if got[n] is None:
            Image.open(io.BytesIO(out["bytes"][i])).verify()
    assert any("vlmforge" in ua for ua in server.user_agents)


def test_retry_after_too_long_fails_fast(server):
    cfg = DownloadConfig(timeout=1.0, retries=2, backoff=0.01, max_retry_after=0.5)
    out = Downloader(config=cfg)({"url": np.array([f"{server.url}/hostile/429/long"])})
    assert out["error_message"][0] == "retry_after_too_long" and server.hits["/hostile/429/long"] == 1  # no wait, no retry


def test_robots_and_retry_after_parsing():
    dis = ["noai", "noimageai", "noindex", "noimageindex"]
    assert robots_opt_out(["noindex, nofollow"], disallowed=dis, token="vlmforge") == "noindex"
    assert robots_opt_out(["otherbot: noai"], disallowed=dis, token="vlmforge") is None
    assert robots_opt_out(["VLMForge: noimageai"], disallowed=dis, token="vlmforge") == "noimageai"
    assert robots_opt_out(["noai"], disallowed=[], token="vlmforge") is None
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds("soon") is None
    assert 50 < retry_after_seconds(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))) <= 61


def test_robots_directives_that_take_a_value_are_not_user_agents():
    dis = ["noai", "noimageai", "noindex", "noimageindex"]
    assert robots_opt_out(["max-image-preview:large, noai"], disallowed=dis, token="vlmforge") == "noai"
    assert robots_opt_out(["unavailable_after: 25 Jun 2010 15:00:00 PST, noimageai"], disallowed=dis, token="vlmforge") == "noimageai"
    # an RFC 850 date holds a comma: its second half ("25-Jun-10 15:00:00 PST") is no agent either
    assert robots_opt_out(["unavailable_after: Friday, 25-Jun-10 15:00:00 PST, noai"], disallowed=dis, token="vlmforge") == "noai"
    assert robots_opt_out(["max-snippet: 20, max-video-preview: -1, noindex"], disallowed=dis, token="vlmforge") == "noindex"
    assert robots_opt_out(["vlmforge: max-image-preview: none, noai"], disallowed=dis, token="vlmforge") == "noai"
    # the agent's scope runs on past a directive with a value
    assert robots_opt_out(["otherbot: max-snippet: 10, noai"], disallowed=dis, token="vlmforge") is None
    assert robots_opt_out(["otherbot: noindex", "noai"], disallowed=dis, token="vlmforge") == "noai"  # a new header value


def _serve(handler) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _bytes_handler(body: bytes, *, delay: float = 0.0, hits: list | None = None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if hits is not None:
                hits.append(self.path)
            time.sleep(delay)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def test_malformed_hosts_fail_their_url_only():
    srv = _serve(_bytes_handler(_jpeg(8, 8)))
    try:
        good = f"http://127.0.0.1:{srv.server_address[1]}/a.jpg"
        urls = ["http://a..b/x.jpg", "http://" + "a" * 64 + ".com/x.jpg", "http://exa mple.com/x.jpg", good,
                "http://example.com:99999/x.jpg", "http:///x.jpg"]
        got = [r.error for r in fetch_all(urls, config=DownloadConfig(timeout=2.0, retries=1, backoff=0.01))]
    finally:
        srv.shutdown()
    assert got == [
        "invalid_url: expected host labels of 1 to 63 characters, got an empty label",
        "invalid_url: expected host labels of 1 to 63 characters, got one of 64",
        "invalid_url: expected a host name of letters, digits, '-' and '_', got ' '",
        None,
        "invalid_url: expected a URL that parses, got Port out of range 0-65535",
        "invalid_url: expected a host name, got none",
    ]


def test_valid_url_forms_pass_the_url_check():
    from pipelines.download import url_problem

    ok = ["http://m\u00fcnchen.de/a.jpg", "http://" + "a" * 40 + "\u3002" + "b" * 40 + ".com/a.jpg",  # IDNA's 。 is a dot
          "http://" + "a" * 63 + ".com./a.jpg", "HTTPS://user:p%40ss@example.com:8443/a.jpg", "http://[::1]:8080/a.jpg",
          "http://127.0.0.1:80/a.jpg", "http://a_b.example.com/a.jpg"]
    assert [url_problem(u) for u in ok] == [None] * len(ok)
    assert url_problem("http://" + "a" * 40 + "\u3002" + "b" * 64 + ".com/") == "expected host labels of 1 to 63 characters, got one of 64"


def test_a_host_the_resolver_cannot_encode_is_an_invalid_url(monkeypatch):
    monkeypatch.setattr(download, "url_problem", lambda url: None)  # let it reach the resolver's IDNA encoding
    r = fetch_all(["http://a..b/x.jpg"], config=DownloadConfig(timeout=2.0, retries=2, backoff=0.01))[0]
    assert r.error.startswith("invalid_url: expected a host name the resolver can encode, got ") and r.attempts == 1


def test_an_unexpected_exception_fails_its_url_only(monkeypatch):
    real = download._attempt

    async def attempt(session, url, cfg):
        if "boom" in url:
            raise KeyError("boom")
        return await real(session, url, cfg)

    monkeypatch.setattr(download, "_attempt", attempt)
    srv = _serve(_bytes_handler(b"fine"))
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        got = fetch_all([f"{base}/boom.jpg", f"{base}/ok.jpg"], config=DownloadConfig(timeout=2.0, retries=0))
    finally:
        srv.shutdown()
    assert got[0].error == "unexpected_error: KeyError: 'boom'" and got[0].data is None
    assert got[1].error is None and got[1].data == b"fine"


def test_a_bad_host_is_one_failed_row_not_a_failed_shard(tmp_path):
    srv = _serve(_bytes_handler(_jpeg(64, 48)))
    try:
        good = f"http://127.0.0.1:{srv.server_address[1]}/a.jpg"
        pq.write_table(pa.table({"url": [good, "http://a..b/x.jpg"], "caption": ["a red square", "a bad host"]}), tmp_path / "in.parquet")
        cfg = load_curate_config(overrides=["download.retries=0", "filter.min_image_size=8"])
        spec = prepare_shards(str(tmp_path / "in.parquet"), tmp_path / "out", config=cfg.input, shard_size=10)[0]
        stats = process_shard(spec, config=cfg, output_dir=str(tmp_path / "out"))
    finally:
        srv.shutdown()
    assert stats["count"] == 2 and stats["successes"] == 1
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert (rows[1]["status"], rows[1]["error_message"]) == (
        "failed_to_download", "invalid_url: expected host labels of 1 to 63 characters, got an empty label")


def test_a_slow_host_does_not_hold_the_other_hosts_slots():
    slow, fast = _serve(_bytes_handler(b"slow", delay=0.6)), _serve(_bytes_handler(b"fast"))
    try:
        urls = [f"http://127.0.0.1:{slow.server_address[1]}/{i}" for i in range(4)] + [f"http://127.0.0.1:{fast.server_address[1]}/x"]
        order: list[int] = []
        fetch_many(urls, config=DownloadConfig(concurrency=2, per_host=1, timeout=5.0), on_result=lambda i, r: order.append(i))
    finally:
        slow.shutdown()
        fast.shutdown()
    # the slow host's queue waits for its own slot without a global one, so the other host goes first
    assert order[0] == 4 and sorted(order) == [0, 1, 2, 3, 4]


def test_a_name_that_does_not_resolve_is_not_retried(monkeypatch):
    real, calls = socket.getaddrinfo, []

    def getaddrinfo(host, *args, **kwargs):
        if host.endswith(".invalid"):
            calls.append(host)
            code = socket.EAI_NONAME if host.startswith("nx") else socket.EAI_AGAIN
            raise socket.gaierror(code, "no such name" if code == socket.EAI_NONAME else "try again")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    cfg = DownloadConfig(timeout=2.0, retries=2, backoff=0.01)
    nx, again = fetch_all(["http://nx.invalid/a.jpg", "http://busy.invalid/a.jpg"], config=cfg)
    assert (nx.error, nx.attempts, calls.count("nx.invalid")) == ("dns_name_not_found", 1, 1)
    assert (again.error, again.attempts, calls.count("busy.invalid")) == ("dns_error", 3, 3)  # a resolver hiccup is retried


def test_a_certificate_that_does_not_verify_is_not_retried(tmp_path):
    import ssl

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    accepted: list[int] = []

    class Server(ThreadingHTTPServer):
        def get_request(self):
            accepted.append(1)
            return super().get_request()

    srv = Server(("127.0.0.1", 0), _bytes_handler(b"x"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = fetch_all([f"https://127.0.0.1:{srv.server_address[1]}/a.jpg"], config=DownloadConfig(timeout=3.0, retries=2, backoff=0.2))[0]
    finally:
        srv.shutdown()
    assert r.error.startswith("tls_certificate_error: self") and "signed certificate" in r.error  # OpenSSL's verify message
    assert r.attempts == 1
    assert len(accepted) == 1


# ------------------------------------------------------------------ inputs, resume, report


def test_input_columns_the_pipeline_writes_are_kept_under_input_names(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": ["ftp://x/a.jpg"], "caption": ["a cat"], "duplicate_of": ["source-123"],
                             "key": ["k0"], "input_key": ["ik0"], "status": ["draft"]}), src)
    cfg = load_curate_config()
    assert read_url_list(str(src), config=cfg.input).column_names == [
        "url", "caption", "input_duplicate_of", "input_input_key", "input_key", "input_status"]
    spec = prepare_shards(str(src), tmp_path / "out", config=cfg.input, shard_size=10)[0]
    process_shard(spec, config=cfg, output_dir=str(tmp_path / "out"))
    row = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()[0]
    assert (row["input_duplicate_of"], row["input_input_key"], row["input_key"], row["input_status"]) == ("source-123", "k0", "ik0", "draft")
    assert row["duplicate_of"] is None and row["status"] == "failed_to_download"
    written = set(row) - set(read_url_list(str(src), config=cfg.input).column_names)
    assert written <= set(RESERVED), f"columns the pipeline writes but RESERVED lacks: {written - set(RESERVED)}"
    assert set(RESERVED) == set(PIPELINE_SCHEMA.names)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _image(fmt: str, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format=fmt)
    return buf.getvalue()


def test_tar_member_names_split_as_webdataset_splits_them():
    from webdataset.tariterators import base_plus_ext

    for name in ["000000000.jpg", "./000000000.jpg", "a/b.seg.png", "dir.v2/000.JPG", "x.", ".hidden", "noext", "./._0.jpg"]:
        key, ext = base_plus_ext(name)
        want = (key, ext.lower()) if key is not None and ext else None  # no extension: nothing to group
        assert split_member_name(name) == want, name
    # a hidden file (a macOS "._" copy) in a directory is skipped; webdataset would make "a/" its key
    assert split_member_name("a/._000.jpg") is None and base_plus_ext("a/._000.jpg") == ("a/", "_000.jpg")


def test_img2dataset_input_reads_dot_slash_members_and_every_pillow_format(tmp_path):
    colors = {"jpg": (200, 0, 0), "gif": (0, 200, 0), "bmp": (0, 0, 200), "tiff": (200, 200, 0), "png": (0, 200, 200)}
    pil = {"jpg": "JPEG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF", "png": "PNG"}
    members = []
    for i, ext in enumerate(colors):
        members += [(f"./{i:09d}.{ext}", _image(pil[ext], colors[ext])), (f"./{i:09d}.txt", f"a {ext} image".encode())]
    members.append(("./000000000.json", json.dumps({"key": "000000000", "url": "http://x/0.jpg", "input_key": "old",
                                                   "duplicate_of": "y", "license": "cc-by"}).encode()))
    (tmp_path / "in").mkdir()
    _tar(tmp_path / "in" / "00000.tar", members)
    cfg = load_curate_config(overrides=["filter.min_image_size=8", "dedup.near=false"])
    spec = prepare_shards(str(tmp_path / "in"), tmp_path / "out", config=cfg.input, shard_size=1000)[0]
    rows, images = read_shard_rows(spec, config=cfg.input)
    assert [r["input_key"] for r in rows] == [f"./{i:09d}" for i in range(5)]
    assert all(img is not None for img in images)
    assert rows[0]["input_input_key"] == "old" and rows[0]["input_duplicate_of"] == "y" and rows[0]["license"] == "cc-by"
    assert set(rows[0]) == set(rows[1]) and rows[1]["license"] is None  # every row has every column
    stats = process_shard(spec, config=cfg, output_dir=str(tmp_path / "out"))
    assert stats["successes"] == 5, stats["reason_dict"]


def test_url_list_formats(tmp_path):
    urls = ["http://x/a.jpg", "http://x/b.jpg"]
    (tmp_path / "urls.txt").write_text("\ufeffhttp://x/a.jpg\r\n\n  http://x/b.jpg  \n")
    with gzip.open(tmp_path / "urls.txt.gz", "wt") as f:
        f.write("\n".join(urls) + "\n")
    for name, sep in (("urls.csv.gz", ","), ("urls.tsv.gz", "\t")):
        with gzip.open(tmp_path / name, "wt") as f:
            f.write(f"url{sep}caption\n" + "".join(f"{u}{sep}cap {i}\n" for i, u in enumerate(urls)))
    with gzip.open(tmp_path / "urls.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"url": u, "caption": f"cap {i}"}) + "\n" for i, u in enumerate(urls)))
    (tmp_path / "urls.json").write_text(json.dumps([{"url": urls[0], "caption": "cap 0"}, {"url": urls[1], "caption": "cap 1", "extra": 7}]))
    cfg = InputConfig()
    for name in ("urls.txt", "urls.txt.gz"):
        assert read_url_list(str(tmp_path / name), config=cfg).to_pylist() == [{"url": u} for u in urls], name
    for name in ("urls.csv.gz", "urls.tsv.gz", "urls.jsonl.gz", "urls.json"):
        table = read_url_list(str(tmp_path / name), config=cfg)
        assert table.column("url").to_pylist() == urls and table.column("caption").to_pylist() == ["cap 0", "cap 1"], name
    assert read_url_list(str(tmp_path / "urls.json"), config=cfg).column("extra").to_pylist() == [None, 7]  # every object's keys
    assert read_url_list(str(tmp_path / "urls.csv.gz"), config=InputConfig(format="csv")).num_rows == 2  # compression by name, any format
    txt = InputConfig(caption_col=None)
    txt.format = "txt"  # the format named explicitly, on a file whose name does not say it
    shutil.copy(tmp_path / "urls.txt", tmp_path / "list")
    assert read_url_list(str(tmp_path / "list"), config=txt).column("url").to_pylist() == urls

    (tmp_path / "dir").mkdir()  # a directory of URL lists: read in name order, as one list
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "caption": ["one"]}), tmp_path / "dir" / "a.parquet")
    (tmp_path / "dir" / "b.csv").write_text("url,caption\nhttp://x/2.jpg,two\n")
    (tmp_path / "dir" / "c.txt").write_text("http://x/3.jpg\n")
    (tmp_path / "dir" / "_SUCCESS").write_text("")
    table = read_url_list(str(tmp_path / "dir"), config=cfg)
    assert table.to_pylist() == [{"url": "http://x/1.jpg", "caption": "one"}, {"url": "http://x/2.jpg", "caption": "two"},
                                 {"url": "http://x/3.jpg", "caption": None}]
    assert read_url_list(str(tmp_path / "dir"), config=InputConfig(format="csv")).num_rows == 1  # only that format's files
    specs = prepare_shards(str(tmp_path / "dir"), tmp_path / "out", config=cfg, shard_size=2)
    assert [(s["kind"], s["rows"]) for s in specs] == [("urls", 2), ("urls", 1)]

    (tmp_path / "urls.xml").write_text("<urls/>")
    with pytest.raises(ValueError, match=r"expected a URL list ending in \.parquet, .*\.txt.*got '.*urls\.xml'"):
        read_url_list(str(tmp_path / "urls.xml"), config=cfg)
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="expected .*bad.csv.gz to be gzip-compressed"):
        read_url_list(str(tmp_path / "bad.csv.gz"), config=cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected URL-list files or NNNNN.tar files .* in the directory"):
        read_url_list(str(tmp_path / "empty"), config=cfg)


def test_resume_with_another_input_is_refused(tmp_path, capsys, monkeypatch):
    from pipelines.cli import main

    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text(f"url,caption\nhttp://x/{name}.jpg,a caption\n")
    cfg = InputConfig()
    out = tmp_path / "out"
    prepare_shards(str(tmp_path / "a.csv"), out, config=cfg, shard_size=10)
    monkeypatch.chdir(tmp_path)
    assert len(prepare_shards("a.csv", out, config=cfg, shard_size=10)) == 1  # the same file, named another way
    with pytest.raises(ValueError, match=r"expected --input .*a\.csv to resume .*, got .*b\.csv: run with --input"):
        prepare_shards(str(tmp_path / "b.csv"), out, config=cfg, shard_size=10)
    with pytest.raises(ValueError, match="expected input.url_col=url to resume"):
        prepare_shards(str(tmp_path / "a.csv"), out, config=InputConfig(url_col="image_url"), shard_size=10)
    assert main(["--input", str(tmp_path / "b.csv"), "--output", str(out)]) == 2  # refused before Ray starts
    assert "a new --output" in capsys.readouterr().err

    # an output cut before the input was recorded absolute (the path as typed): resumes from anywhere
    import json as _json

    state = out / "_inputs" / "_SUCCESS"
    state.write_text(_json.dumps({**_json.loads(state.read_text()), "input": "a.csv"}))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert len(prepare_shards("../a.csv", out, config=cfg, shard_size=10)) == 1
    monkeypatch.chdir(tmp_path)

    (tmp_path / "i2d").mkdir()
    _tar(tmp_path / "i2d" / "00000.tar", [("000000000.jpg", _jpeg(8, 8))])
    prepare_shards(str(tmp_path / "i2d"), tmp_path / "out2", config=cfg, shard_size=10)
    with pytest.raises(ValueError, match="expected --input .*i2d to resume"):
        prepare_shards(str(tmp_path / "a.csv"), tmp_path / "out2", config=cfg, shard_size=10)


def test_report_counts_errors_by_host_from_the_runs_url_column(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"image_url": ["http://127.0.0.1:1/a.jpg", "http://a..b/x.jpg"], "caption": ["a", "b"]}), src)
    cfg = load_curate_config(overrides=["input.url_col=image_url", "download.retries=0"])
    spec = prepare_shards(str(src), tmp_path / "out", config=cfg.input, shard_size=10)[0]
    process_shard(spec, config=cfg, output_dir=str(tmp_path / "out"))
    by_host = summarize(tmp_path / "out")["errors_by_host"]
    assert set(by_host) == {"127.0.0.1:1", "a..b"}
    assert by_host["127.0.0.1:1"] == {"connection_error": 1}


def test_local_files_are_read_only_when_asked(tmp_path):
    """download.local_files: file:// URLs and absolute paths are read from disk (a folder of
    images and a caption list, no web server); off by default, with a message saying how."""
    img = tmp_path / "a b.jpg"
    img.write_bytes(b"\xff\xd8 some jpeg bytes")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 2000)
    urls = [str(img), "file://" + str(img).replace(" ", "%20"), str(tmp_path / "missing.jpg"), str(tmp_path), str(big),
            "file://otherhost/x.jpg"]
    got = fetch_all(urls, config=DownloadConfig(local_files=True, max_body_bytes=1000))
    assert got[0].data == got[1].data == img.read_bytes() and got[0].error is None
    assert got[2].error == "file_not_found" and got[3].error.startswith("file_not_found")
    assert got[4].error.startswith("file_too_large: 2000 bytes")
    assert got[5].error.startswith("invalid_url")  # a file URL on another host is not this machine's
    off = fetch_all(urls[:2], config=DownloadConfig())
    assert all(r.data is None and "set download.local_files=true" in r.error for r in off), [r.error for r in off]
