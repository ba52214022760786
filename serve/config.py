"""The serve app's typed arguments (``build_app(args)``) and the runtime knobs (``user_config``).

Everything a service team may want to change is a field here with its default; the serve YAML
(``infra/serve/*.yaml``) passes ``args`` that pydantic validates against ``AppArgs``, and each
deployment's ``user_config`` is validated against its own model in ``reconfigure()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Per-request limits; going past one is a 400 (or 413 for the body) that names the limit."""

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="request body size (413 above)")
    max_images: int = Field(8, ge=0, description="images (image_url parts) per request")
    max_videos: int = Field(1, ge=0, description="videos (video_url parts) per request")
    max_video_frames: int = Field(32, ge=1, description="frames sampled from one video, at most")
    default_video_frames: int = Field(8, ge=1, description="frames sampled uniformly when the request names neither num_frames nor fps")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height of one decoded image or frame")
    max_media_bytes: int = Field(16 * 1024 * 1024, ge=1, description="bytes of one fetched or inlined image/video")
    max_prompt_tokens: int = Field(4096, ge=1, description="prompt tokens, image tokens included")
    max_output_tokens: int = Field(512, ge=1, description="largest accepted max_tokens")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when the request gives none")
    max_embedding_inputs: int = Field(64, ge=1, description="inputs per /v1/embeddings request")
    max_choices: int = Field(8, ge=1, description="largest accepted n (answers per chat request)")


class MediaOptions(_Strict):
    """How media URLs are fetched; the SSRF guard denies private, link-local and loopback hosts."""

    image_fetch_timeout_s: float = Field(5.0, gt=0, description="total time to fetch one image URL")
    video_fetch_timeout_s: float = Field(30.0, gt=0, description="total time to fetch one video URL")
    max_redirects: int = Field(3, ge=0)
    allow_loopback: bool = Field(False, description="allow 127.0.0.0/8 and ::1 (tests, local dev)")
    allow_private: bool = Field(False, description="allow RFC 1918, link-local, CGNAT and other non-global addresses")
    allowed_domains: list[str] | None = Field(None, description="if set, only these hosts (and their subdomains)")
    allow_http: bool = Field(True, description="allow plain http:// URLs (https:// always allowed)")


class IngressConfig(_Strict):
    """The ingress deployment's ``user_config`` (changes apply without a restart)."""

    limits: Limits = Field(default_factory=Limits)
    media: MediaOptions = Field(default_factory=MediaOptions)
    api_keys: list[str] = Field(default_factory=list, description="bearer tokens; empty (and no api_keys_env) = no auth")
    api_keys_env: str | None = Field(None, description="an environment variable of the replica holding comma-separated bearer tokens (e.g. from a Kubernetes Secret)")
    request_timeout_s: float = Field(60.0, gt=0, description="a request still running after this gets 504")
    max_inflight_requests: int = Field(256, ge=1, description="per ingress replica; above it new requests get 503")
    image_cache_mb: float = Field(256, ge=0, description="image features kept in each ingress replica (LRU), keyed by a hash of the image's bytes: a repeated image skips decoding and the encoder; 0 disables")


class EncoderConfig(_Strict):
    """The image encoder's ``user_config``."""

    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    cache_size: int = Field(1024, ge=0, description="image embeddings kept (LRU), keyed by pixel hash; 0 disables")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 leaves the default")


class LMConfig(_Strict):
    """The language model's ``user_config``."""

    max_batch_size: int = Field(32, ge=1, description="rows decoded together")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="wait this long for more requests before a prefill")
    stream_interval: int = Field(8, ge=1, description="streamed answers: tokens per message after the first token (which goes at once); 1 sends every token on its own, a larger value costs less per token on each hop (language model -> ingress -> proxy -> client) and makes the text arrive in bursts")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 leaves the default")


def _default_name(checkpoint: str) -> str:
    """A model id from a checkpoint's directory: its name, or its run's for a run's ``final``
    export (``runs/s2/final`` -> ``s2``), so that two runs' exports get two ids."""
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name == "final" and path.parent.name else path.name


class AppArgs(_Strict):
    """The arguments of ``serve.app:build_app``.

    Args:
        checkpoint: a stage-2 (vlm) checkpoint directory for /v1/chat/completions; a stage-1
            (contrastive) directory here serves only /v1/embeddings.
        embedding_checkpoint: a stage-1 checkpoint for /v1/embeddings (optional).
        model_name: the id clients pass as ``model``; default: the checkpoint directory's name
            (the run directory's for a run's ``final`` export: ``runs/s2/final`` -> ``s2``).
        embedding_model_name: the id for embeddings; default: its directory's name.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (the last two on a GPU).
        device: ``cpu``, ``cuda`` or ``auto``.
    """

    checkpoint: str
    embedding_checkpoint: str | None = None
    model_name: str | None = None
    embedding_model_name: str | None = None
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    lm: LMConfig = Field(default_factory=LMConfig)
    deployments: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-deployment .options() overrides (num_replicas, autoscaling_config, ray_actor_options, ...) keyed by Ingress/ImageEncoder/LanguageModel/Embedder",
    )

    def names(self) -> tuple[str | None, str | None]:
        """(chat model id, embedding model id); None where that endpoint is not served."""
        from vlm.checkpoint import read_info

        chat, emb = None, None
        stage = read_info(self.checkpoint)["stage"]
        if stage == "vlm":
            chat = self.model_name or _default_name(self.checkpoint)
        else:
            emb = self.embedding_model_name or self.model_name or _default_name(self.checkpoint)
        if self.embedding_checkpoint:
            emb = self.embedding_model_name or _default_name(self.embedding_checkpoint)
        return chat, emb

    def embedding_path(self) -> str | None:
        from vlm.checkpoint import read_info

        if self.embedding_checkpoint:
            return self.embedding_checkpoint
        return self.checkpoint if read_info(self.checkpoint)["stage"] == "contrastive" else None


# The deployments whose ``user_config`` is an ``AppArgs`` section (changed in place by reconfigure()).
USER_CONFIG_SECTIONS = {"Ingress": "ingress", "ImageEncoder": "encoder", "LanguageModel": "lm"}


def args_from_application(app: dict[str, Any], *, where: str = "application") -> dict[str, Any]:
    """The ``AppArgs`` fields a serve config's application describes: its ``args``, each
    deployment's ``user_config`` as that deployment's section (``ingress``, ``encoder``, ``lm``)
    and the deployment's other settings as ``deployments[name]``; the ``deployments`` list wins
    over ``args``, as it does when Serve deploys the file."""
    data = dict(app.get("args") or {})
    for entry in app.get("deployments") or []:
        entry = dict(entry)
        name = entry.pop("name", None)
        if not name:
            raise ValueError(f"{where}: a deployment without a name")
        if "user_config" in entry:
            section = USER_CONFIG_SECTIONS.get(name)
            if section is None:
                raise ValueError(f"{where}: deployment {name!r} takes no user_config "
                                 f"(only {', '.join(USER_CONFIG_SECTIONS)} do)")
            data[section] = {**(data.get(section) or {}), **(entry.pop("user_config") or {})}
        if entry:
            deployments = dict(data.get("deployments") or {})
            deployments[name] = {**deployments.get(name, {}), **entry}
            data["deployments"] = deployments
    return data


def load_args(path: str | Path | None = None, **overrides: Any) -> AppArgs:
    """``AppArgs`` from a YAML file (either the bare args, or a serve config whose first
    application is read with its ``deployments``) with keyword overrides on top."""
    data: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping, got {type(raw).__name__}")
        if "applications" in raw:
            data = args_from_application(raw["applications"][0], where=str(path))
        else:
            data = raw
    data.update({k: v for k, v in overrides.items() if v is not None})
    return AppArgs.model_validate(data)
