"""What LoRA saves in stage 2: trained and frozen parameters, and the optimizer states they need,
for full training (the baseline) and for adapters of each rank, counted on the meta device (no
weights are made, so a 7B preset counts in seconds on any machine).

    python benchmarks/lora_states.py --preset base --preset llava-7b --ranks 64
    python benchmarks/lora_states.py --preset llava-7b --ranks 8,64,128 --targets q_proj,v_proj

States by the ZeRO formula at one rank (mixed-precision Adam, 16 bytes per trained parameter;
a frozen one 4 bytes with fp32 weights under autocast, the default ``job.bf16_mode``, or 2 in the
bf16 weights mode); activations are left out (LoRA keeps them: the gradient flows through every
frozen layer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def count(preset: str, rank: int, alpha: float, targets: list[str]) -> dict:
    import torch

    from vlm.config import load_config
    from vlm.llava import VisionLanguageModel

    overrides = [f"model.llava.lora_rank={rank}", f"model.llava.lora_alpha={alpha}", f"model.llava.lora_targets=[{','.join(targets)}]"]
    cfg = load_config(preset=preset, overrides=overrides)
    vocab = cfg.model.decoder.vocab_size or cfg.model.tokenizer.vocab_size + 8
    with torch.device("meta"):
        model = VisionLanguageModel(cfg.model, vocab_size=vocab, pad_token_id=0, eos_token_id=1, image_token_id=vocab - 1)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    decoder = sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    gib = 2**30
    return {"preset": preset, "lora_rank": rank, "trained": trained, "trained_decoder": decoder, "frozen": frozen,
            "states_autocast_gib": (16 * trained + 4 * frozen) / gib, "states_bf16_weights_gib": (16 * trained + 2 * frozen) / gib}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="a model preset (repeat for several; default base)")
    p.add_argument("--ranks", default="64", help="adapter ranks, comma-separated (default 64); full training is the baseline")
    p.add_argument("--alpha", type=float, default=16.0, help="lora_alpha (does not change the counts)")
    p.add_argument("--targets", default="", help="lora_targets, comma-separated (default: every linear layer but the head)")
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    targets = [t for t in a.targets.split(",") if t]
    rows = []
    print("| preset | lora_rank | trained (decoder) | frozen | states, autocast | states, bf16 weights | vs full |")
    for preset in a.preset or ["base"]:
        full = None
        for rank in [0, *(int(r) for r in a.ranks.split(","))]:
            r = count(preset, rank, a.alpha, targets)
            full = full or r
            rows.append(r)
            print(f"| {preset} | {rank or '0 (full)'} | {r['trained'] / 1e6:,.1f}M ({r['trained_decoder'] / 1e6:,.1f}M) | "
                  f"{r['frozen'] / 1e6:,.1f}M | {r['states_autocast_gib']:.1f} GiB | {r['states_bf16_weights_gib']:.1f} GiB | "
                  f"{r['states_autocast_gib'] / full['states_autocast_gib']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
