"""Media for chat requests: fetch (with an SSRF guard), decode images (Pillow) and videos (PyAV).

Every failure the client can cause is an ``ApiError(400)`` that says which part and why:
an unreachable or slow URL, a denied address, a corrupt or non-image payload, a decompression
bomb, too many pixels or bytes. Nothing here raises a bare exception for bad input.

The SSRF guard resolves the host once, checks every address, and then connects to the checked
address itself (Host header and TLS SNI keep the name), so a DNS answer that changes between
check and connect (rebinding) cannot reach a denied network. Redirects are followed by hand and
each hop is checked again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import math
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import numpy as np
from PIL import Image, ImageOps

from serve.config import Limits, MediaOptions
from serve.protocol import ApiError
from vlm.image import to_uint8

MAX_DECODED_FRAMES = 20_000  # a video with more frames than this is refused


@dataclass
class Fetched:
    data: bytes
    content_type: str


# ----------------------------------------------------------------------------- SSRF guard


def check_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, opts: MediaOptions) -> str | None:
    """Why ``ip`` is denied, or None when it may be fetched."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if opts.allow_loopback else "a loopback address"
    if ip.is_unspecified or ip.is_multicast:
        return None if opts.allow_private else "an unspecified or multicast address"
    if ip.is_link_local:
        return None if opts.allow_private else "a link-local address"
    if ip.is_private or not ip.is_global:
        return None if opts.allow_private else "a private or non-global address"
    return None


def _host_allowed(host: str, domains: list[str] | None) -> bool:
    if domains is None:
        return True
    host = host.lower().rstrip(".")
    return any(host == d.lower() or host.endswith("." + d.lower().lstrip(".")) for d in domains)


async def resolve_checked(url: str, opts: MediaOptions, *, where: str) -> tuple[str, str]:
    """Check ``url`` against the guard; returns ``(pinned_url, host)``, the URL with the host
    replaced by the checked address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or (parts.scheme == "http" and not opts.allow_http):
        allowed = "https" if not opts.allow_http else "http(s)"
        raise ApiError(400, f"{where}: expected an {allowed} or data: URL, got scheme {parts.scheme!r}", param=where)
    host = parts.hostname
    if not host:
        raise ApiError(400, f"{where}: the URL has no host: {url[:100]!r}", param=where)
    if not _host_allowed(host, opts.allowed_domains):
        raise ApiError(400, f"{where}: host {host!r} is not in the allowed media domains", param=where)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ApiError(400, f"{where}: bad port in URL {url[:100]!r}", param=where) from None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ApiError(400, f"{where}: cannot resolve host {host!r} ({e})", param=where) from None
    addrs = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        why = check_address(ip, opts)
        if why:
            raise ApiError(
                400, f"{where}: host {host!r} resolves to {ip}, {why}; media URLs must be public", param=where,
                code="media_url_denied",
            )
        addrs.append(ip)
    ip = addrs[0]
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = f"{literal}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host


# ----------------------------------------------------------------------------- fetching


_ASCII_WHITESPACE = str.maketrans("", "", " \t\n\r\f\v")


def is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"  # URL schemes are case-insensitive (RFC 3986)


def parse_data_url(url: str, *, kind: str, max_bytes: int, where: str) -> Fetched:
    """``data:<mime>;base64,<payload>`` -> bytes. The scheme and ``;base64`` may be in any case,
    and the payload may be wrapped in lines (MIME-style base64): ASCII whitespace is dropped."""
    head, sep, payload = url.partition(",")
    head = head.lower()
    if not sep or not is_data_url(head) or not head.endswith(";base64"):
        raise ApiError(400, f"{where}: expected a data URL like 'data:{kind}/png;base64,...', got {url[:40]!r}", param=where)
    mime = head[5:-7]
    if not (mime.startswith(kind + "/") or mime in ("application/octet-stream", "")):
        raise ApiError(400, f"{where}: expected a data:{kind}/... URL, got media type {mime!r}", param=where)
    payload = payload.translate(_ASCII_WHITESPACE)
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(413, f"{where}: the inlined {kind} is over {max_bytes} bytes", param=where, code="media_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data URL's payload is not valid base64", param=where) from None
    return Fetched(data=data, content_type=mime)


async def fetch(url: str, *, kind: str, opts: MediaOptions, limits: Limits, client, where: str) -> Fetched:
    """Fetch an image or video URL (http(s) or data:) within the kind's timeout."""
    if is_data_url(url):
        return parse_data_url(url, kind=kind, max_bytes=limits.max_media_bytes, where=where)
    timeout = opts.video_fetch_timeout_s if kind == "video" else opts.image_fetch_timeout_s
    try:
        return await asyncio.wait_for(_fetch(url, opts=opts, limits=limits, client=client, where=where), timeout)
    except asyncio.TimeoutError:
        raise ApiError(400, f"{where}: fetching {url[:100]!r} took longer than {timeout:g}s", param=where,
                       code="media_fetch_timeout") from None


async def _fetch(url: str, *, opts: MediaOptions, limits: Limits, client, where: str) -> Fetched:
    import httpx

    for _ in range(opts.max_redirects + 1):
        pinned, host = await resolve_checked(url, opts, where=where)
        parts = urlsplit(url)
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        ext = {"sni_hostname": host} if parts.scheme == "https" else {}
        try:
            req = client.build_request("GET", pinned, headers={"Host": host_header}, extensions=ext)
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            raise ApiError(400, f"{where}: cannot fetch {url[:100]!r}: {type(e).__name__} {e}".rstrip(), param=where,
                           code="media_fetch_failed") from None
        try:
            if resp.status_code in (301, 302, 303, 307, 308) and "location" in resp.headers:
                url = urljoin(url, resp.headers["location"])
                continue
            if resp.status_code != 200:
                raise ApiError(400, f"{where}: fetching {url[:100]!r} returned HTTP {resp.status_code}", param=where,
                               code="media_fetch_failed")
            size = int(resp.headers.get("content-length") or 0)
            if size > limits.max_media_bytes:
                raise ApiError(413, f"{where}: the media is {size} bytes, over the limit of {limits.max_media_bytes}",
                               param=where, code="media_too_large")
            buf = bytearray()
            try:
                async for piece in resp.aiter_bytes():
                    buf += piece
                    if len(buf) > limits.max_media_bytes:
                        raise ApiError(413, f"{where}: the media is over the limit of {limits.max_media_bytes} bytes",
                                       param=where, code="media_too_large")
            except httpx.HTTPError as e:
                raise ApiError(400, f"{where}: reading {url[:100]!r} failed: {type(e).__name__}", param=where,
                               code="media_fetch_failed") from None
            return Fetched(data=bytes(buf), content_type=resp.headers.get("content-type", ""))
        finally:
            await resp.aclose()
    raise ApiError(400, f"{where}: more than {opts.max_redirects} redirects", param=where, code="media_fetch_failed")


# ----------------------------------------------------------------------------- decoding


def _upright(img: Image.Image) -> Image.Image:
    """The image as it is displayed: rotated/flipped by its EXIF orientation tag (phone photos
    store the sensor's pixels and the tag). An EXIF block Pillow cannot read leaves the pixels
    as stored rather than refusing an image that decodes."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def decode_image(data: bytes, *, size: int, limits: Limits, where: str) -> np.ndarray:
    """Image bytes -> (S, S, 3) uint8 at the model's size, upright by its EXIF orientation; 400
    for anything not a sane image."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ApiError(400, f"{where}: the image is a decompression bomb (too many pixels)", param=where,
                       code="image_too_large") from None
    except Exception as e:  # PIL raises many types for garbage
        raise ApiError(400, f"{where}: not a decodable image ({type(e).__name__})", param=where,
                       code="invalid_image") from None
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise ApiError(400, f"{where}: the image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_image_pixels}",
                       param=where, code="image_too_large")
    try:
        img.load()
        return to_uint8([_upright(img)], size)[0]
    except Image.DecompressionBombError:
        raise ApiError(400, f"{where}: the image is a decompression bomb", param=where, code="image_too_large") from None
    except Exception as e:
        raise ApiError(400, f"{where}: the image is corrupt or truncated ({type(e).__name__}: {e})"[:300], param=where,
                       code="invalid_image") from None


def _frame_indices(n: int, times: list[float], *, num_frames: int | None, fps: float | None, limits: Limits) -> list[int]:
    if fps is not None:
        duration = (times[-1] - times[0]) if len(times) > 1 else 0.0
        want = max(1, min(limits.max_video_frames, math.floor(duration * fps) + 1, n))
        targets = [times[0] + k / fps for k in range(want)]
        return [min(range(n), key=lambda i, t=t: abs(times[i] - t)) for t in targets]
    k = min(num_frames or limits.default_video_frames, n)
    return [round(x) for x in np.linspace(0, n - 1, k)]


def decode_video(
    data: bytes, *, size: int, limits: Limits, where: str, num_frames: int | None = None, fps: float | None = None
) -> np.ndarray:
    """Video bytes -> (T, S, S, 3) uint8: ``num_frames`` spread uniformly over the video, or one
    frame every ``1/fps`` seconds, at most ``limits.max_video_frames`` (PyAV decoding)."""
    import av

    if num_frames is not None and num_frames > limits.max_video_frames:
        raise ApiError(400, f"{where}: num_frames {num_frames} is over the limit of {limits.max_video_frames}",
                       param=where, code="too_many_frames")
    frames: list[np.ndarray] = []
    times: list[float] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            fmt = container.format.name
            if not container.streams.video or fmt == "image2" or fmt.endswith("_pipe"):
                raise ApiError(400, f"{where}: not a decodable video (got {fmt!r}, a still image or no video stream)",
                               param=where, code="invalid_video")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if frame.width * frame.height > limits.max_image_pixels:
                    raise ApiError(400, f"{where}: video frames are {frame.width}x{frame.height}, over the limit of "
                                   f"{limits.max_image_pixels} pixels", param=where, code="image_too_large")
                if len(frames) >= MAX_DECODED_FRAMES:
                    raise ApiError(400, f"{where}: the video has more than {MAX_DECODED_FRAMES} frames", param=where,
                                   code="invalid_video")
                t = float(frame.time) if frame.time is not None else len(frames)
                frames.append(to_uint8([frame.to_image()], size)[0])
                times.append(t)
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(400, f"{where}: not a decodable video ({type(e).__name__})", param=where,
                       code="invalid_video") from None
    if not frames:
        raise ApiError(400, f"{where}: the video has no frames", param=where, code="invalid_video")
    idx = _frame_indices(len(frames), times, num_frames=num_frames, fps=fps, limits=limits)
    return np.stack([frames[i] for i in idx])
