"""Download stage: concurrent HTTP with connection reuse, a total deadline per attempt that
covers the body, a body-size cap, retries with exponential backoff on connection errors,
timeouts, 5xx and 429 (honouring ``Retry-After``), a per-host concurrency cap, a User-Agent
token and the ``X-Robots-Tag`` opt-out. What a retry cannot change fails at once: a malformed
URL (checked before any request), a 4xx, a name that does not resolve, a TLS certificate that
does not verify. Every URL gets a result: nothing one URL raises reaches the caller.

aiohttp does the HTTP; the retry/deadline/opt-out policy around it is ours (no library here
gives a per-sample status with a reason). ``fetch_many`` streams results to a callback as they
finish, so a caller can overlap decoding with downloading; ``Downloader`` is the batch form
(``dict`` of numpy arrays in, the same dict plus columns out) that a test calls without Ray.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import re
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from pipelines.config import DownloadConfig

USER_AGENT = "Mozilla/5.0 (compatible; vlmforge-curate/0.1; +https://github.com/vlmforge)"
# X-Robots-Tag directives written "name: value" (Google's and Bing's); any other "name:" prefix
# names the user agent the directives after it apply to ("googlebot: noindex, nofollow").
VALUE_DIRECTIVES = frozenset({
    "max-snippet", "max-image-preview", "max-video-preview", "unavailable_after", "unavailable-after",
})  # fmt: skip
_AGENT = re.compile(r"[a-z][a-z0-9_.\-]*")  # a user-agent product token: no spaces, starts with a letter
# getaddrinfo's answers that a retry will not change: no such name, or a name with no address.
_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_DNS_NOT_FOUND = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


@dataclass
class FetchResult:
    """One URL's outcome: ``data`` when ``error`` is None, else a short reason."""

    data: bytes | None
    error: str | None
    http_status: int | None = None
    attempts: int = 0
    elapsed: float = 0.0


class _Retryable(Exception):
    def __init__(self, reason: str, *, http_status: int | None = None, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.http_status, self.wait = reason, http_status, wait


class _Fatal(Exception):
    def __init__(self, reason: str, *, http_status: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.http_status = reason, http_status


def user_agent(token: str | None) -> str:
    """The User-Agent header: a browser-like prefix plus our token (site owners can match it)."""
    return USER_AGENT if not token else f"{USER_AGENT} ({token})"


def robots_opt_out(header_values: Sequence[str], *, disallowed: Sequence[str], token: str | None) -> str | None:
    """The first disallowed ``X-Robots-Tag`` directive that applies to us, else None.

    A directive applies when it has no user-agent prefix (``noai``) or its prefix is our token
    (``vlmforge: noai``); ``otherbot: noai`` does not, nor do the directives after it in the same
    header value, up to the next agent. A ``name:`` prefix is a user agent only when ``name`` is
    not a directive that takes a value (``max-image-preview: large``, ``unavailable_after: DATE``,
    ``VALUE_DIRECTIVES``) and looks like a product token (a date's ``15:00`` is not an agent).

    Args:
        header_values: every ``X-Robots-Tag`` header value of the response.
        disallowed: directives that opt out (e.g. noai, noimageai, noindex, noimageindex).
        token: our user-agent token.
    """
    if not disallowed:
        return None
    wanted = {d.lower() for d in disallowed}
    for value in header_values:
        agent = None
        for part in value.split(","):
            name, colon, rest = (s.strip() for s in part.strip().lower().partition(":"))
            if colon and name not in VALUE_DIRECTIVES and _AGENT.fullmatch(name):  # "agent: directive" starts a scope
                agent = name
                name = rest.partition(":")[0].strip()  # the directive, without a value it may take
            if name in wanted and (agent is None or (token is not None and agent == token.lower())):
                return name
    return None


def retry_after_seconds(value: str | None) -> float | None:
    """Parse ``Retry-After`` (delta seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def _attempt(session, url: str, cfg: DownloadConfig) -> tuple[bytes, int]:
    import aiohttp

    try:
        async with asyncio.timeout(cfg.timeout):  # the whole attempt: connect, headers, body
            async with session.get(url, allow_redirects=True, max_redirects=5) as resp:
                status = resp.status
                if status == 429 or status >= 500:
                    wait = retry_after_seconds(resp.headers.get("Retry-After"))
                    raise _Retryable(f"http_{status}", http_status=status, wait=wait)
                if status >= 400:
                    raise _Fatal(f"http_{status}", http_status=status)
                directive = robots_opt_out(
                    resp.headers.getall("X-Robots-Tag", []),
                    disallowed=cfg.disallowed_header_directives,
                    token=cfg.user_agent_token,
                )
                if directive is not None:
                    raise _Fatal(f"x_robots_tag_{directive}", http_status=status)
                if resp.content_length is not None and resp.content_length > cfg.max_body_bytes:
                    raise _Fatal("body_too_large", http_status=status)
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > cfg.max_body_bytes:
                        raise _Fatal("body_too_large", http_status=status)
                    chunks.append(chunk)
                return b"".join(chunks), status
    except TimeoutError as e:
        raise _Retryable("timeout") from e
    except aiohttp.TooManyRedirects as e:
        raise _Fatal("too_many_redirects") from e
    except aiohttp.InvalidURL as e:  # also a redirect to an invalid URL
        detail = getattr(e, "description", None)
        raise _Fatal("invalid_url: the HTTP client rejected it" + (f" ({detail})" if detail else "")) from e
    except UnicodeError as e:  # the resolver's IDNA encoding of a host name url_problem let through
        raise _Fatal(f"invalid_url: expected a host name the resolver can encode, got {e}") from e
    except aiohttp.ClientConnectorCertificateError as e:  # the same certificate on every retry
        cert = e.certificate_error
        raise _Fatal(f"tls_certificate_error: {getattr(cert, 'verify_message', None) or cert}") from e
    except aiohttp.ClientConnectorError as e:
        if isinstance(e.os_error, socket.gaierror):
            if e.os_error.errno in _DNS_NOT_FOUND:  # NXDOMAIN or no address: not transient
                raise _Fatal("dns_name_not_found") from e
            raise _Retryable("dns_error") from e  # e.g. EAI_AGAIN, a resolver that did not answer
        raise _Retryable("connection_error") from e
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
        raise _Retryable("connection_closed") from e
    except aiohttp.ClientConnectionError as e:
        raise _Retryable("connection_error") from e
    except aiohttp.ClientError as e:
        raise _Retryable(f"client_error_{type(e).__name__}") from e


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be fetched, as ``expected ..., got ...``; None when it can be tried.

    Checked before any request, so a malformed URL costs no connection, no DNS lookup and no
    retry: the scheme, the port, and the host name's labels (1 to 63 characters of letters,
    digits, ``-`` or ``_`` each, at most 253 in all; a non-ASCII label counts in its punycode form).
    """
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname
        _ = parts.port  # raises ValueError for a port that is not a number in 0-65535
    except ValueError as e:
        return f"expected a URL that parses, got {e}"
    if scheme not in ("http", "https"):
        local = " (a local file: set download.local_files=true to read file:// URLs and absolute paths)" \
            if scheme == "file" or (not scheme and url.startswith("/")) else ""
        return (f"expected an http or https URL, got scheme {scheme!r}" if scheme else "expected an http or https URL, got no scheme") + local
    if not host:
        return "expected a host name, got none"
    if ":" in host:  # an IPv6 literal ("[::1]"): the HTTP client checks it
        return None
    # IDNA reads the ideographic and full-width full stops as dots too (UTS #46)
    name = host.translate(_IDNA_DOTS)
    name = name[:-1] if name.endswith(".") else name  # a trailing dot (a rooted name) is allowed
    if len(name) > 253:
        return f"expected a host name of at most 253 characters, got {len(name)}"
    for label in name.split("."):
        if not label:
            return "expected host labels of 1 to 63 characters, got an empty label"
        if label.isascii():
            bad = next((c for c in label if not (c.isalnum() or c in "-_")), None)
            if bad is not None:
                return f"expected a host name of letters, digits, '-' and '_', got {bad!r}"
            size = len(label)
        else:
            try:
                size = 4 + len(label.encode("punycode"))  # "xn--" + the punycode form
            except UnicodeError as e:
                return f"expected a host name that IDNA can encode, got {e}"
        if size > 63:
            return f"expected host labels of 1 to 63 characters, got one of {size}"
    return None


def local_path(url: str) -> str | None:
    """The path a ``file://`` URL or an absolute path names; None for anything else."""
    if url.startswith("file://"):
        from urllib.parse import unquote

        parts = urlsplit(url)
        return unquote(parts.path) if parts.netloc in ("", "localhost") else None
    return url if url.startswith("/") else None


def _read_local(path: str, cfg: DownloadConfig) -> FetchResult:
    """A local file as a download: its bytes, or ``file_not_found`` / ``file_too_large`` /
    ``file_error`` (never retried: a retry cannot change them)."""
    start = time.monotonic()
    try:
        st = os.stat(path)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):
            return FetchResult(None, "file_not_found: not a regular file", attempts=1)
        if size > cfg.max_body_bytes:
            return FetchResult(None, f"file_too_large: {size} bytes, over download.max_body_bytes={cfg.max_body_bytes}", attempts=1)
        with open(path, "rb") as f:
            data = f.read(cfg.max_body_bytes + 1)
    except FileNotFoundError:
        return FetchResult(None, "file_not_found", attempts=1)
    except OSError as e:
        return FetchResult(None, f"file_error: {type(e).__name__}: {e.strerror or e}"[:300], attempts=1)
    return FetchResult(data, None, None, 1, time.monotonic() - start)


async def _fetch_one(session, url: str, cfg: DownloadConfig, limit: asyncio.Semaphore, hosts: dict) -> FetchResult:
    start = time.monotonic()
    path = local_path(url) if cfg.local_files else None
    if path is not None:
        async with limit:
            return await asyncio.to_thread(_read_local, path, cfg)
    problem = url_problem(url)
    if problem is not None:
        return FetchResult(None, f"invalid_url: {problem}")
    host_limit = hosts.setdefault(urlsplit(url).netloc.lower(), asyncio.Semaphore(cfg.per_host))
    attempts, last = 0, None
    for attempt in range(cfg.retries + 1):
        attempts += 1
        try:
            # The host's slot first, then a global one: a URL waiting for its (slow) host holds
            # no global slot, so the other hosts' URLs go on.
            async with host_limit, limit:
                data, status = await _attempt(session, url, cfg)
            return FetchResult(data, None, status, attempts, time.monotonic() - start)
        except _Fatal as e:
            return FetchResult(None, e.reason, e.http_status, attempts, time.monotonic() - start)
        except _Retryable as e:
            last = e
            if attempt == cfg.retries:
                break
            wait = cfg.backoff * 2**attempt * (1 + 0.1 * random.random())
            if e.wait is not None:
                if e.wait > cfg.max_retry_after:
                    return FetchResult(None, "retry_after_too_long", e.http_status, attempts, time.monotonic() - start)
                wait = max(wait, e.wait)
            await asyncio.sleep(wait)
    return FetchResult(None, last.reason, last.http_status, attempts, time.monotonic() - start)


async def _fetch_all(urls: Sequence[str], cfg: DownloadConfig, on_result: Callable[[int, FetchResult], None]) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=cfg.concurrency, limit_per_host=cfg.per_host, ttl_dns_cache=300)
    headers = {"User-Agent": user_agent(cfg.user_agent_token)}
    limit = asyncio.Semaphore(cfg.concurrency)
    hosts: dict[str, asyncio.Semaphore] = {}
    async with aiohttp.ClientSession(connector=connector, headers=headers, auto_decompress=True) as session:

        async def run(i: int, url: str) -> None:
            start = time.monotonic()
            try:
                result = await _fetch_one(session, url, cfg, limit, hosts)
            except Exception as e:  # a last resort: no single URL may take down the shard
                result = FetchResult(None, f"unexpected_error: {type(e).__name__}: {e}"[:500], elapsed=time.monotonic() - start)
            on_result(i, result)

        await asyncio.gather(*(run(i, u) for i, u in enumerate(urls)))


def fetch_many(urls: Sequence[str], *, config: DownloadConfig, on_result: Callable[[int, FetchResult], None]) -> None:
    """Fetch every URL; call ``on_result(index, result)`` (in this thread) as each finishes.

    Args:
        urls: the URLs, in input order.
        config: the download policy.
        on_result: called once per URL, in completion order; must be quick (hand work off).
    """
    asyncio.run(_fetch_all(list(urls), config, on_result))


def fetch_all(urls: Sequence[str], *, config: DownloadConfig) -> list[FetchResult]:
    """Fetch every URL and return the results in input order.

    Args:
        urls: the URLs.
        config: the download policy.
    """
    out: list[FetchResult | None] = [None] * len(urls)

    def keep(i: int, r: FetchResult) -> None:
        out[i] = r

    fetch_many(urls, config=config, on_result=keep)
    return out  # type: ignore[return-value]


class Downloader:
    """Batch stage: ``{"url": array}`` -> adds ``bytes``, ``error_message``, ``http_status``.

    Args:
        config: the download policy.
        url_col: the column holding URLs.
    """

    def __init__(self, *, config: DownloadConfig, url_col: str = "url") -> None:
        self.config, self.url_col = config, url_col

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.url_col not in batch:
            raise KeyError(f"expected a {self.url_col!r} column in the batch, got columns {sorted(batch)}")
        results = fetch_all([str(u) for u in batch[self.url_col]], config=self.config)
        out = dict(batch)
        out["bytes"] = np.array([r.data for r in results], dtype=object)
        out["error_message"] = np.array([r.error for r in results], dtype=object)
        out["http_status"] = np.array([r.http_status if r.http_status is not None else -1 for r in results])
        return out
