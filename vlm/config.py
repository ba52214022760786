"""Typed configuration: nested dataclasses, YAML presets chosen by name, strict overrides.

A preset (``vlm/presets/<name>.yaml``) is data: the whole config tree for one model size.
Experiment files and ``key.sub=value`` overrides are parsed strictly against the dataclass
types: an unknown key or a value of the wrong type is an error that names the key, the type
that was expected and the value that arrived.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vlm.world import WorldConfig

PRESET_DIR = Path(__file__).parent / "presets"
T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the typed schema."""


# ----------------------------------------------------------------------------- model parts


@dataclass
class VisionConfig:
    """Vision tower: a transformers CLIP or SigLIP vision transformer."""

    kind: str = "clip"  # clip | siglip
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    pretrained: str | None = None  # a local directory (save_pretrained layout)

    def __post_init__(self) -> None:
        if self.kind not in ("clip", "siglip"):
            raise ConfigError(f"vision.kind: expected 'clip' or 'siglip', got {self.kind!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size ({self.image_size}) must be a multiple of "
                f"vision.patch_size ({self.patch_size})"
            )

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass
class TextConfig:
    """Stage-1 text tower: any ``AutoModel`` encoder (BERT-like), mean-pooled."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 64
    pooling: str = "mean"  # mean | cls
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"text.pooling: expected 'mean' or 'cls', got {self.pooling!r}")


@dataclass
class ContrastiveConfig:
    """Stage-1 heads and loss (CLIP: Radford et al. 2021; SigLIP: Zhai et al. 2023)."""

    embed_dim: int = 128
    loss: str = "clip"  # clip | siglip
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    init_logit_bias: float = -10.0  # siglip only
    local_loss: bool = True
    gather_with_grad: bool = True
    # NegCLIP hard negatives (vlm/scene_targets.py): per image and step, this many captions of
    # an edited scene as extra image-to-text columns; needs the scenes (the generated world).
    hard_negatives: int = 0
    hard_negative_kinds: list[str] = field(default_factory=lambda: ["shape", "swap", "position"])
    # > 0: an auxiliary head classifies each 3x3-grid cell's shape kind and colour from the
    # vision tower's patch tokens at llava.vision_feature_layer; its loss is added at this weight.
    cell_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in ("clip", "siglip"):
            raise ConfigError(f"contrastive.loss: expected 'clip' or 'siglip', got {self.loss!r}")
        if self.hard_negatives < 0:
            raise ConfigError(f"contrastive.hard_negatives: expected an integer >= 0, got {self.hard_negatives}")
        if self.hard_negatives and self.loss != "clip":
            raise ConfigError(f"contrastive.hard_negatives: supported with loss 'clip', got loss {self.loss!r}")
        if self.cell_loss_weight < 0:
            raise ConfigError(f"contrastive.cell_loss_weight: expected a number >= 0, got {self.cell_loss_weight}")
        bad = [k for k in self.hard_negative_kinds if k not in ("shape", "swap", "position")]
        if bad or not self.hard_negative_kinds:
            raise ConfigError(f"contrastive.hard_negative_kinds: expected a non-empty list from ['shape', 'swap', 'position'], got {self.hard_negative_kinds!r}")
        if self.local_loss and not self.gather_with_grad:
            # each rank scores only its own rows: the gradient of its features through the other
            # ranks' rows comes back only through a gather with gradient
            raise ConfigError(
                "contrastive.gather_with_grad: expected true with contrastive.local_loss=true (without it the "
                "gradient misses every other rank's scores), got false; set local_loss=false to gather without gradient"
            )


@dataclass
class ProjectorConfig:
    """Vision-to-decoder projector: LLaVA-1.5's 2-layer GELU MLP, optional pixel shuffle."""

    hidden_size: int | None = None  # None: the decoder's hidden size
    pixel_shuffle: int = 1  # >1 merges s x s patches into one token (tokens / s^2)
    grid_position: bool = False  # learned row + column embeddings added to the projected tokens (no HF LLaVA export)

    def __post_init__(self) -> None:
        if self.pixel_shuffle < 1:
            raise ConfigError(f"projector.pixel_shuffle: expected an integer >= 1, got {self.pixel_shuffle}")


@dataclass
class DecoderConfig:
    """Decoder-only LM: any ``AutoModelForCausalLM``; built from these fields when not pretrained."""

    kind: str = "llama"  # a transformers model_type with a causal-LM class: llama | qwen2 | ...
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    max_position: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    vocab_size: int | None = None  # None: the tokenizer's length
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.pretrained is None and (self.num_heads % self.num_kv_heads or self.hidden_size % self.num_heads):
            raise ConfigError(
                f"decoder.num_kv_heads / decoder.num_heads: expected num_kv_heads to divide num_heads and num_heads "
                f"to divide hidden_size, got {self.num_kv_heads} / {self.num_heads} heads for hidden_size {self.hidden_size}"
            )


@dataclass
class LlavaConfig:
    """How stage 2 wires the towers: feature layer, selection, freezing, sequence length."""

    vision_feature_layer: int = -2  # penultimate layer, as LLaVA
    vision_feature_select: str = "patch"  # patch (drop CLS) | full
    freeze_vision: bool = True
    freeze_projector: bool = False
    freeze_decoder: bool = False
    max_length: int = 512
    system_prompt: str | None = None
    loss_average: str = "token"  # token | turn (each answer turn weighs the same)
    # Training's loss through ``vlm.losses.linear_cross_entropy``: the supervised rows scored in
    # chunks, their logits never kept for the backward pass. Saves memory (26 GB of 69 GB at 32 x
    # 1,024 tokens on the base preset) for throughput (-9% there): on when memory is what binds.
    # A compiled job (``job.compile``) saves most of that memory without the cost (its compiled
    # loss: 69 -> 44 GB there, and +16% tokens/s on an H100).
    chunked_loss: bool = False
    # Training batches whose short conversations share rows, end to end, in rows no longer than
    # the longest (``vlm.chat.collate_packed``; position ids restart per conversation and the
    # decoder attends within each), instead of one per row padded to the longest: the same loss
    # and gradients, fewer padded tokens to compute.
    pack_sequences: bool = False
    # > 0: a grounding loss on the projected image tokens (``VisionLanguageModel.ground_logits``):
    # each token, pooled onto the world's 3x3 cells, is scored against the decoder's input
    # embeddings of the shape and colour words (and a learned "empty" vector each), and the
    # per-cell cross-entropy is added at this weight. The tokens then live where the question's
    # words do, so a decoder trained from scratch can match "triangle" to the token holding one.
    # Needs per-cell labels: the generated world only (``vlm train sft`` refuses it).
    ground_loss_weight: float = 0.0
    # > 0: the decoder trains through low-rank adapters of this rank (LoRA, ``vlm.lora``), its own
    # weights frozen; ``freeze_decoder`` freezes the adapters too. ``lora_targets``: the linear
    # layers adapted, by their name's last part (e.g. [q_proj, v_proj]); empty: every linear layer
    # of the decoder but its output projection. The update is scaled by lora_alpha / lora_rank. A
    # run's final export merges the adapters into the weights: a plain checkpoint.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"llava.lora_rank: expected an integer >= 0 (0: no adapters), got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"llava.lora_alpha: expected a number > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"llava.lora_dropout: expected a number in [0, 1), got {self.lora_dropout}")
        if self.ground_loss_weight < 0:
            raise ConfigError(f"llava.ground_loss_weight: expected a number >= 0, got {self.ground_loss_weight}")
        if self.loss_average not in ("token", "turn"):
            raise ConfigError(f"llava.loss_average: expected 'token' or 'turn', got {self.loss_average!r}")
        if self.vision_feature_select not in ("patch", "full"):
            raise ConfigError(
                "llava.vision_feature_select: expected 'patch' or 'full', "
                f"got {self.vision_feature_select!r}"
            )


@dataclass
class TokenizerConfig:
    path: str | None = None  # a local HF tokenizer; None trains a byte-level BPE on the corpus
    vocab_size: int = 512


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    llava: LlavaConfig = field(default_factory=LlavaConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        # Checks across sections; a pretrained tower's own sizes are checked when it is built.
        layer, n = self.llava.vision_feature_layer, self.vision.num_layers
        if self.vision.pretrained is None and not -(n + 1) <= layer <= n:
            raise ConfigError(
                f"llava.vision_feature_layer: expected an index into the vision tower's {n + 1} hidden states "
                f"(vision.num_layers={n}), from {-(n + 1)} to {n}, got {layer}"
            )
        if self.decoder.pretrained is None and self.llava.max_length > self.decoder.max_position:
            raise ConfigError(
                f"llava.max_length: expected at most decoder.max_position ({self.decoder.max_position}), "
                f"got {self.llava.max_length}"
            )

    @property
    def image_tokens(self) -> int:
        """Decoder tokens per image after feature selection and pixel shuffle."""
        s = self.projector.pixel_shuffle
        if self.vision.grid % s:
            raise ConfigError(
                f"projector.pixel_shuffle ({s}) must divide the patch grid ({self.vision.grid})"
            )
        n = self.vision.num_patches // (s * s)
        if self.llava.vision_feature_select == "full" and self.vision.kind == "clip":
            if s != 1:
                raise ConfigError("pixel_shuffle > 1 needs vision_feature_select='patch' for CLIP")
            n += 1  # the CLS token
        return n

    @property
    def image_grid(self) -> int:
        """The side of the decoder's image-token grid (patch grid / pixel shuffle), for
        ``projector.grid_position``; an error where the tokens are not a grid (CLIP's CLS kept)."""
        n = self.image_tokens
        if self.llava.vision_feature_select == "full" and self.vision.kind == "clip":
            raise ConfigError(
                f"projector.grid_position: expected patch tokens on a grid, got {n} tokens with CLIP's CLS "
                "(llava.vision_feature_select='full'); use 'patch'"
            )
        return self.vision.grid // self.projector.pixel_shuffle


# ----------------------------------------------------------------------------- training


@dataclass
class OptimConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: only at the end
    log_every: int = 20

    def __post_init__(self) -> None:
        # one class for stage1 and stage2: the messages name the key in both sections
        for key, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("eval_every", 0), ("log_every", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"stage1/stage2.{key}: expected an integer >= {low}, got {getattr(self, key)!r}")
        for key in ("lr", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"stage1/stage2.{key}: expected a number >= 0, got {getattr(self, key)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"stage1/stage2.min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"stage1/stage2.betas: expected two numbers in [0, 1), got {list(self.betas)!r}")


@dataclass
class MixConfig:
    """The stage-2 training mixture drawn from the generated world."""

    caption_every: int = 1  # the captioning task for every k-th image (0: never)
    questions_per_conversation: int = 1  # >1: an image's questions as turns of one conversation
    # With questions_per_conversation > 1 the caption request is the last turn of an image's
    # conversation; every k-th captioned image (k > 0) is asked for its caption in a conversation
    # of its own instead, the first and only turn, as a user asks for one (0: never).
    caption_alone_every: int = 0
    group_by_length: bool = False  # batches of similar length (less padding), in random order
    # k > 1: k draws of the world's questions per training image, each distinct question once
    # (``scene_targets.drawn_questions``): more answers per image of the kinds that bind attributes
    question_draws: int = 1

    def __post_init__(self) -> None:
        if self.caption_every < 0:
            raise ConfigError(f"mix.caption_every: expected an integer >= 0, got {self.caption_every}")
        if self.questions_per_conversation < 1:
            raise ConfigError(f"mix.questions_per_conversation: expected an integer >= 1, got {self.questions_per_conversation}")
        if self.caption_alone_every < 0:
            raise ConfigError(f"mix.caption_alone_every: expected an integer >= 0, got {self.caption_alone_every}")
        if self.question_draws < 1:
            raise ConfigError(f"mix.question_draws: expected an integer >= 1, got {self.question_draws}")


@dataclass
class Config:
    """Everything one run needs. ``name`` is the preset it came from."""

    name: str = "custom"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: WorldConfig = field(default_factory=WorldConfig)  # the generated world (vlm.world)
    stage1: OptimConfig = field(default_factory=OptimConfig)
    stage2: OptimConfig = field(default_factory=OptimConfig)
    mix: MixConfig = field(default_factory=MixConfig)


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; the only widening allowed is int -> float."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}' for {cls.__name__}; expected one of {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain (YAML-safe) dict of a config dataclass."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"expected an override of the form key.sub=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"expected an override of the form key.sub=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of ``cfg`` with ``key.sub=value`` overrides applied, strictly typed."""
    data = to_dict(cfg)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        walked: list[str] = []
        for part in path[:-1]:
            walked.append(part)
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {'.'.join(walked)!r} is not a config section")
            node = node[part]
        if path[-1] not in node:
            raise ConfigError(
                f"override {text!r}: unknown key {'.'.join(path)!r}; expected one of {sorted(node)}"
            )
        node[path[-1]] = value
    return from_dict(type(cfg), data)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(
    *,
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Resolve a run's config: preset, then a YAML file on top, then ``key=value`` overrides.

    Args:
        preset: a preset name (``tiny``, ``small``, ``base``, ``llava-7b``). A config file may
            name its own with a top-level ``preset:`` key.
        path: a YAML experiment file; its keys override the preset's.
        overrides: ``a.b=value`` strings applied last.
    """
    data: dict[str, Any] = {}
    file_data: dict[str, Any] = {}
    if path is not None:
        file_data = _read_yaml(Path(path))
        preset = preset or file_data.pop("preset", None)
        file_data.pop("preset", None)
    if preset is not None:
        preset_path = PRESET_DIR / f"{preset}.yaml"
        if not preset_path.exists():
            raise ConfigError(f"unknown preset {preset!r}; expected one of {list_presets()}")
        data = _read_yaml(preset_path)
        data.setdefault("name", preset)
    data = _merge(data, file_data)
    cfg = from_dict(Config, data)
    return apply_overrides(cfg, list(overrides or []))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_config(path: str | Path, cls: type[T] = Config) -> T:  # type: ignore[assignment]
    return from_dict(cls, _read_yaml(Path(path)))
