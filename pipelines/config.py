"""Typed configuration of a curation run (``vlm curate``).

Nested dataclasses, filled from an optional YAML file and strict ``key.sub=value`` overrides
through ``vlm.config.from_dict`` / ``apply_overrides``: an unknown key or a wrong type is an
error naming the key, the expected type and the value that arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlm.config import ConfigError, apply_overrides, from_dict

INPUT_FORMATS = ("auto", "parquet", "csv", "tsv", "jsonl", "json", "txt", "img2dataset")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "webp", "png")
RESAMPLE_FILTERS = ("area", "bilinear", "bicubic", "lanczos", "nearest")
ROBOTS_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


@dataclass
class InputConfig:
    """Where the samples come from and which columns mean what."""

    format: str = "auto"  # auto (from the extension / a directory of img2dataset shards) | parquet | csv | tsv | jsonl | json | txt | img2dataset
    url_col: str = "url"
    caption_col: str | None = "caption"  # None: no captions
    save_additional_columns: bool = True  # extra input columns go to KEY.json and the parquet

    def __post_init__(self) -> None:
        if self.format not in INPUT_FORMATS:
            raise ConfigError(f"input.format: expected one of {INPUT_FORMATS}, got {self.format!r}")


@dataclass
class DownloadConfig:
    """HTTP fetching: one asyncio event loop per shard task, connections reused per host."""

    concurrency: int = 64  # requests in flight per shard task
    per_host: int = 16  # requests in flight per host, per shard task
    timeout: float = 10.0  # total seconds per attempt: connect, headers and the whole body
    max_body_bytes: int = 20_000_000
    retries: int = 2  # extra attempts on connection errors, timeouts, 5xx and 429
    backoff: float = 0.5  # seconds; attempt k waits backoff * 2**k (plus up to 10% jitter)
    max_retry_after: float = 30.0  # a Retry-After longer than this fails the sample instead of waiting
    user_agent_token: str | None = "vlmforge"
    disallowed_header_directives: list[str] = field(default_factory=lambda: list(ROBOTS_DIRECTIVES))
    # read file:// URLs and absolute paths from this machine's (or the cluster's shared) disk;
    # off by default, so a URL list from elsewhere cannot make a job read local files
    local_files: bool = False

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.per_host < 1:
            raise ConfigError(f"download.concurrency and download.per_host: expected >= 1, got {self.concurrency}, {self.per_host}")
        if self.timeout <= 0:
            raise ConfigError(f"download.timeout: expected seconds > 0, got {self.timeout}")
        bad = [d for d in self.disallowed_header_directives if d not in ROBOTS_DIRECTIVES]
        if bad:
            raise ConfigError(f"download.disallowed_header_directives: expected a subset of {ROBOTS_DIRECTIVES}, got {bad}")


@dataclass
class ImageConfig:
    """Decode, validate, resize and encode (img2dataset's resize modes)."""

    image_size: int = 256
    # no | keep_ratio | keep_ratio_largest | center_crop | border. YAML 1.1 reads an unquoted
    # `no` as false, so false (and "none") are taken for "no"; the field always holds a string.
    resize_mode: str | bool = "keep_ratio"
    resize_only_if_bigger: bool = False
    downscale_filter: str = "area"  # area (box average, like OpenCV's INTER_AREA) | bilinear | bicubic | lanczos | nearest
    upscale_filter: str = "lanczos"
    encode_format: str = "jpg"
    encode_quality: int = 95  # jpg/webp quality; png compression level is (100 - quality) // 10
    # The decompression-bomb guard, checked on the header before decoding, and the most pixels
    # a resized image may have; the only limit (Pillow's own is off), so it can be raised.
    max_image_pixels: int = 89_478_485
    # JPEGs decode at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled decoding) while
    # that still gives at least this multiple of the output size; None: always the full image.
    # Lower is faster and loses fine detail (text, textures): docs/curation.md, step 5.
    decode_floor: float | None = 4.0
    border_color: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.resize_mode is False or (isinstance(self.resize_mode, str) and self.resize_mode.lower() == "none"):
            self.resize_mode = "no"
        if not isinstance(self.resize_mode, str) or self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"image.resize_mode: expected one of {RESIZE_MODES} (or false for no), got {self.resize_mode!r}")
        for name in ("downscale_filter", "upscale_filter"):
            if getattr(self, name) not in RESAMPLE_FILTERS:
                raise ConfigError(f"image.{name}: expected one of {RESAMPLE_FILTERS}, got {getattr(self, name)!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ConfigError(f"image.encode_format: expected one of {ENCODE_FORMATS}, got {self.encode_format!r}")
        if not 1 <= self.encode_quality <= 100:
            raise ConfigError(f"image.encode_quality: expected 1-100, got {self.encode_quality}")
        if self.image_size < 1:
            raise ConfigError(f"image.image_size: expected >= 1, got {self.image_size}")
        if self.max_image_pixels < 1:
            raise ConfigError(f"image.max_image_pixels: expected >= 1, got {self.max_image_pixels}")
        if self.decode_floor is not None and not 0.5 <= self.decode_floor:
            raise ConfigError(f"image.decode_floor: expected a number >= 0.5 (a multiple of the output size) or null, got {self.decode_floor}")


@dataclass
class FilterConfig:
    """Per-sample filters (DataComp's basic filter: min_caption_words=3, min_caption_chars=6,
    min_image_size=200, max_aspect_ratio=3)."""

    min_image_size: int = 0  # shorter side of the original image, pixels
    max_image_area: int | None = None  # original width * height
    max_aspect_ratio: float | None = None  # max(w, h) / min(w, h) of the original image
    min_caption_chars: int = 0
    min_caption_words: int = 0
    max_caption_chars: int | None = None


@dataclass
class DedupConfig:
    """Dedup across the whole run (and across resumes): exact (sha256 of the downloaded bytes)
    and near-duplicate: 64-bit perceptual hash within ``phash_distance`` bits AND a 4x4 colour
    layout within ``colour_distance`` (the pHash alone is colour-blind)."""

    exact: bool = True
    near: bool = True
    phash_distance: int = 4  # Hamming distance, 0-7 (the banded index is exact over that range)
    colour_distance: int = 8  # largest difference of any cell's mean R, G or B, 0-255 units

    def __post_init__(self) -> None:
        if not 0 <= self.phash_distance <= 7:
            raise ConfigError(f"dedup.phash_distance: expected 0-7, got {self.phash_distance}")
        if not 0 <= self.colour_distance <= 255:
            raise ConfigError(f"dedup.colour_distance: expected 0-255, got {self.colour_distance}")


@dataclass
class ClipFilterConfig:
    """CLIP-score filter with a stage-1 checkpoint of ours, DataComp's two rules: a threshold
    (score >= t) and a top fraction (DataComp keeps the top 30%: ``top_fraction=0.3``).

    The top fraction is taken within each shard (the unit of work and of resume, so a rerun
    decides the same): with shards of ~1,000 samples drawn from the pool in no particular order,
    that is the global rule up to the sampling error of a quantile (about +-1.5 points at 30%).
    With both set, the threshold drops first and the fraction is of what remains."""

    checkpoint: str | None = None  # a stage-1 checkpoint directory; None: no CLIP score
    threshold: float | None = None  # drop samples with cosine(image, caption) below this
    top_fraction: float | None = None  # keep this fraction (0-1] of each shard's scored samples, highest first
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("threshold", "top_fraction"):
            if getattr(self, name) is not None and self.checkpoint is None:
                raise ConfigError(f"clip.{name}: expected clip.checkpoint to be set too, got None")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise ConfigError(f"clip.top_fraction: expected a fraction in (0, 1], got {self.top_fraction}")


@dataclass
class TokenizeConfig:
    """Tokenize captions (or a column of chat messages) with the model's tokenizer."""

    tokenizer: str | None = None  # a tokenizer directory; None: clip.checkpoint's, else no tokens
    messages_col: str | None = None  # a column of chat messages (list or JSON text) instead of the caption
    max_length: int | None = None  # truncate ids to this many tokens


@dataclass
class OutputConfig:
    """The img2dataset-compatible layout: NNNNN.tar, NNNNN.parquet, NNNNN_stats.json."""

    shard_size: int = 1000  # input rows per shard (the unit of work and of resume)
    report: bool = True  # write report.html (+ PNGs) and summary.json at the end

    def __post_init__(self) -> None:
        if not 1 <= self.shard_size <= 1_000_000:
            raise ConfigError(f"output.shard_size: expected 1..1000000, got {self.shard_size}")


@dataclass
class RunConfig:
    """Ray execution."""

    address: str | None = None  # None: RAY_ADDRESS or a local Ray
    num_cpus: int | None = None  # local Ray only
    threads: int = 4  # decode/resize threads per shard task (Pillow releases the GIL)
    concurrency: int | None = None  # shard tasks at once; None: the cluster's CPUs
    max_task_retries: int = 3  # a failed shard task is retried this often
    error_warn_rate: float = 0.5  # warn when the failed fraction of a finished shard passes this
    progress: bool = True


@dataclass
class CurateConfig:
    """Everything one ``vlm curate`` run needs."""

    input: InputConfig = field(default_factory=InputConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    clip: ClipFilterConfig = field(default_factory=ClipFilterConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_curate_config(*, path: str | Path | None = None, overrides: list[str] | None = None) -> CurateConfig:
    """Defaults, then a YAML file, then ``key.sub=value`` overrides, all strictly typed.

    Args:
        path: an optional YAML file with any subset of the keys.
        overrides: ``key.sub=value`` strings applied last.
    """
    cfg = CurateConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"expected --config to name a YAML file, got {str(p)!r} (no such file)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        cfg = from_dict(CurateConfig, data)
    return apply_overrides(cfg, list(overrides or []))
