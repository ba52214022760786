"""Checkpoints: one directory per model, readable without our training code.

```
DIR/
  config.yaml        the resolved run config (presets and overrides applied)
  checkpoint.json    format version, stage, each tower's transformers config, token ids, the
                     weights' dtype, meta
  model.safetensors  every weight (shared tensors such as tied embeddings handled)
  tokenizer/         the tokenizer in Hugging Face format (stage 2: with our chat template)
```
Towers are rebuilt from their saved transformers configs (never from ``pretrained`` paths,
which may not exist where the checkpoint is loaded), then the weights are loaded strictly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from vlm.config import Config, read_config, save_config
from vlm.contrastive import ContrastiveModel
from vlm.llava import VisionLanguageModel
from vlm.tokenizer import save_tokenizer
from vlm.towers import hf_config_from_dict, model_from_hf_config

FORMAT = "vlmforge"
VERSION = 1
STAGES = ("contrastive", "vlm")


@dataclass
class Loaded:
    """What ``load_checkpoint`` returns."""

    model: nn.Module
    config: Config
    tokenizer: Any
    stage: str
    meta: dict[str, Any] = field(default_factory=dict)


def _towers(model: nn.Module) -> dict[str, dict]:
    if isinstance(model, ContrastiveModel):
        return {"vision": model.vision.config.to_dict(), "text": model.text.config.to_dict()}
    if isinstance(model, VisionLanguageModel):
        return {"vision": model.vision.config.to_dict(), "decoder": model.decoder.config.to_dict()}
    raise TypeError(f"expected a ContrastiveModel or VisionLanguageModel, got {type(model).__name__}")


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of most of ``model``'s floating-point parameter elements (fp32 if it has none)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _dtype(value: torch.dtype | str) -> torch.dtype:
    """A torch floating dtype from itself or its name (``"bfloat16"``, ``"torch.bfloat16"``)."""
    if isinstance(value, torch.dtype):
        return value
    got = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(got, torch.dtype) or not got.is_floating_point:
        raise ValueError(f"expected a floating-point torch dtype (e.g. 'float32', 'bfloat16'), got {value!r}")
    return got


def stage_of(model: nn.Module) -> str:
    return "contrastive" if isinstance(model, ContrastiveModel) else "vlm"


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    config: Config,
    tokenizer: Any,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` with its config and tokenizer to ``path`` (created; files overwritten).

    Args:
        model: a ``ContrastiveModel`` (stage 1) or ``VisionLanguageModel`` (stage 2).
        path: the checkpoint directory.
        config: the resolved run config.
        tokenizer: the model's tokenizer (stage 1: the text tower's; stage 2: the decoder's,
            whose ``chat_template`` is set to ``vlm.tokenizer.CHAT_TEMPLATE`` in place).
        meta: free-form JSON-able facts (step, metrics, data) kept in ``checkpoint.json``.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    info: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "stage": stage_of(model),
        "towers": _towers(model),
        "dtype": str(weights_dtype(model)).removeprefix("torch."),
        "meta": meta or {},
    }
    if isinstance(model, VisionLanguageModel):
        info["ids"] = {
            "pad": model.pad_token_id,
            "eos": model.eos_token_id,
            "image": model.image_token_id,
        }
    else:
        info["ids"] = {"pad": int(model.text.config.pad_token_id or 0)}
    info["vocab_size"] = len(tokenizer)
    (out / "checkpoint.json").write_text(json.dumps(info, indent=2, default=str))
    save_model(model, str(out / "model.safetensors"))
    if isinstance(model, VisionLanguageModel):
        save_tokenizer(tokenizer, out / "tokenizer")  # sets our chat template: the format the model was trained on
    else:
        tokenizer.save_pretrained(out / "tokenizer")  # a text encoder's tokenizer: no chat format
    return out


def read_info(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "checkpoint.json"
    if not p.is_file():
        raise FileNotFoundError(f"expected a vlmforge checkpoint directory with checkpoint.json, got {str(path)!r}")
    info = json.loads(p.read_text())
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ValueError(
            f"{p}: expected format {FORMAT!r} version {VERSION}, got {info.get('format')!r} version {info.get('version')!r}"
        )
    return info


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_from_info(info: dict[str, Any], config: Config) -> nn.Module:
    """Random-init the checkpoint's model from its saved tower configs (no weights)."""
    towers = {role: model_from_hf_config(hf_config_from_dict(d), role) for role, d in info["towers"].items()}
    ids = info["ids"]
    if info["stage"] == "contrastive":
        return ContrastiveModel(
            config.model, vocab_size=info["vocab_size"], pad_token_id=ids["pad"], vision=towers["vision"], text=towers["text"]
        )
    return VisionLanguageModel(
        config.model,
        vocab_size=info["vocab_size"],
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        image_token_id=ids["image"],
        vision=towers["vision"],
        decoder=towers["decoder"],
    )


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> Loaded:
    """Load a checkpoint written by ``save_checkpoint`` (strict: every weight must match).

    Args:
        path: the checkpoint directory.
        map_location: the device the weights load onto.
        dtype: the weights' dtype (a torch dtype or its name); None: the dtype they were saved
            in (fp32 for checkpoints that do not record one).
    """
    p = Path(path)
    info = read_info(p)
    config = read_config(p / "config.yaml")
    model = build_from_info(info, config)
    model.to(_dtype(dtype if dtype is not None else info.get("dtype", "float32")))
    missing, unexpected = load_model(model, str(p / "model.safetensors"), strict=False, device=str(map_location))
    if missing or unexpected:
        raise ValueError(f"{p}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return Loaded(model=model, config=config, tokenizer=_load_tokenizer(p / "tokenizer"), stage=info["stage"], meta=info.get("meta", {}))


def load_vision_from_stage1(path: str | Path) -> nn.Module:
    """The vision tower of a stage-1 checkpoint, to start stage 2 from (LLaVA's recipe)."""
    loaded = load_checkpoint(path)
    if loaded.stage != "contrastive":
        raise ValueError(f"{path}: expected a stage-1 (contrastive) checkpoint, got stage {loaded.stage!r}")
    assert isinstance(loaded.model, ContrastiveModel)
    return loaded.model.vision
