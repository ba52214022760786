"""Low-rank adapters for the stage-2 decoder (LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models").

A chosen ``nn.Linear`` of the decoder gains a child ``lora`` and adds its output to its own:
``W x + b + (alpha / r) * B A dropout(x)``, with ``A`` (r x in) random and ``B`` (out x r) zero,
so training starts from the decoder as it is. The layer's class becomes ``LoRALinear`` in place
(an ``nn.Linear`` still): its parameters keep their names, so a checkpoint of the plain decoder
loads into it with only the adapters' keys (``*.lora.A``, ``*.lora.B``) missing, and ZeRO-3
gathers the adapters' parameters like any child module's. ``merge_lora`` folds the adapters
into the weights (``W += (alpha / r) B A``) and turns the layers back into plain ``nn.Linear``:
what a run's final export does, so the checkpoint it writes, its Hugging Face export and the
server know nothing of adapters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlm.towers import output_head


class LoRA(nn.Module):
    """The update ``(alpha / rank) * B A dropout(x)`` of one linear layer."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scale

    def delta(self) -> torch.Tensor:
        """The (out, in) update of the layer's weight, in fp32."""
        return (self.B.detach().float() @ self.A.detach().float()) * self.scale


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` whose output gains its ``lora`` child's (``add_lora`` swaps the class in
    place; never built directly)."""

    lora: LoRA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora(x)


def add_lora(decoder: nn.Module, *, rank: int, alpha: float, dropout: float, targets: Sequence[str] = ()) -> list[str]:
    """Give ``decoder``'s linear layers adapters of ``rank``; returns the adapted layers' names.

    ``targets``: the layers whose name's last part is one of these (``q_proj``, ``v_proj``, ...);
    empty: every linear layer but the output projection (which, tied to the input embeddings in
    many decoders, stays as it is). A name that matches no layer is an error naming those there.
    """
    head = output_head(decoder)
    linear = [(n, m) for n, m in decoder.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if targets:
        present = sorted({n.rsplit(".", 1)[-1] for n, _ in linear})
        unknown = [t for t in targets if t not in present]
        if unknown:
            raise ValueError(f"llava.lora_targets: no linear layer of the decoder is named {unknown}; its layers are named {present}")
        linear = [(n, m) for n, m in linear if n.rsplit(".", 1)[-1] in targets]
    names = []
    for name, m in linear:
        if isinstance(m, LoRALinear):
            continue
        m.add_module("lora", LoRA(m.in_features, m.out_features, rank=rank, alpha=alpha, dropout=dropout))
        m.__class__ = LoRALinear
        names.append(name)
    return names


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def is_lora_key(key: str) -> bool:
    """A state-dict key of an adapter's parameter."""
    return key.endswith((".lora.A", ".lora.B"))


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer's weight and make the layer a plain ``nn.Linear`` again,
    in place; a model with a ``cfg`` (``VisionLanguageModel``) then says it has no adapters (the
    ``lora_*`` keys at their defaults). Returns how many layers were merged (0: nothing to do)."""
    layers = lora_layers(model)
    with torch.no_grad():
        for m in layers:
            m.weight.add_(m.lora.delta().to(device=m.weight.device, dtype=m.weight.dtype))
            del m.lora
            m.__class__ = nn.Linear
    cfg = getattr(model, "cfg", None)
    if layers and cfg is not None and hasattr(cfg, "llava"):
        defaults = type(cfg.llava)()
        plain = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults) if f.name.startswith("lora_")}
        model.cfg = dataclasses.replace(cfg, llava=dataclasses.replace(cfg.llava, **plain))
    return len(layers)
