"""`vlm eval`: score a checkpoint on held-out data, outside any training run.

A stage-1 (contrastive) checkpoint: image-text retrieval Recall@k both ways on held-out pairs (a
world directory's held-out split, or the first samples of a directory of WebDataset shards) and,
on a world directory, zero-shot classification accuracy for each label kind (shape, colour,
size, background) with the world's prompt templates. A stage-2 (VLM) checkpoint: exact match on
the held-out questions by task, single-image and overall, and the phrase recall of captions asked
alone, with a few generations printed next to their references. The same functions score the
periodic evals of `vlm train`, so the numbers compare with a run's ``metrics.csv``.

In-process (no Ray), on one device: ``--device`` auto takes a CUDA GPU when there is one (with
``--bf16``, under bf16 autocast), else the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

LABEL_KINDS = ("shape", "colour", "size", "background")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm eval",
        description="Score a checkpoint (ours: a run's final/ or any checkpoint directory) on held-out data: "
        "retrieval and zero-shot classification for stage 1, held-out questions and captions for stage 2.",
    )
    p.add_argument("checkpoint", help="checkpoint directory (model.safetensors, config.yaml, tokenizer/), e.g. runs/sft/final")
    p.add_argument("--data", required=True,
                   help="held-out data: a world directory (vlm world), or for stage 1 a directory of WebDataset shards")
    p.add_argument("--samples", type=int, default=0, help="score at most this many held-out items (default 0: all)")
    p.add_argument("--recall", default="1,5,10", help="stage 1: the k of each Recall@k, comma-separated (default 1,5,10)")
    p.add_argument("--zero-shot", default=",".join(LABEL_KINDS),
                   help=f"stage 1: label kinds to classify zero-shot, comma-separated, or 'none' (default {','.join(LABEL_KINDS)})")
    p.add_argument("--generations", type=int, default=4, help="stage 2: answers to print next to their references (default 4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: cuda when a GPU is there, else cpu)")
    p.add_argument("--bf16", action="store_true", help="on a GPU: run the model under bf16 autocast (default fp32)")
    p.add_argument("--output", help="also write the metrics as JSON to this file")
    return p


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise ValueError(f"{what}: expected positive integers separated by commas, got {text!r}")
    return ks


def _kinds(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in LABEL_KINDS + ("color",)]
    if bad:
        raise ValueError(f"--zero-shot: unknown label kind(s) {bad}; expected some of {', '.join(LABEL_KINDS)} or 'none'")
    return kinds


def pick_device(text: str) -> Any:
    """``--device``: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N."""
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {text}: no such CUDA device here ({torch.cuda.device_count()} visible); use --device cpu")
    return dev


def score_contrastive(model: Any, tokenizer: Any, data: str, *, limit: int, ks: tuple[int, ...], kinds: tuple[str, ...],
                      log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from jobs import local
    from jobs.data import read_heldout_pairs, read_zero_shot
    from vlm.evaluate import pair_ids, retrieval_metrics

    size = model.cfg.vision.image_size
    pixels, captions = read_heldout_pairs(data, size=size, limit=limit)
    if not captions:
        raise ValueError(f"--data {data}: no held-out image-text pairs there (a world directory's held-out split, or WebDataset shards)")
    out: dict[str, Any] = {"pairs": len(captions)}
    with torch.no_grad():
        img, txt = local.embed_pairs(model, pixels, captions, tokenizer)
        out.update(retrieval_metrics(img, txt, ks=ks, **pair_ids(pixels, captions)))  # a repeated image or caption: any match hits
    log(f"retrieval on {len(captions)} held-out pairs: " + ", ".join(f"{k} {out[k]:.3f}" for k in out if k != "pairs"))
    trivial = [k for k in ks if k >= len(captions)]
    if trivial:
        log(f"note: Recall@{','.join(map(str, trivial))} is 1.0 whatever the model: k is not below the pool of {len(captions)} "
            "pairs (--samples more, or a smaller --recall)")
    for kind in kinds:
        zs = read_zero_shot(data, size=size, label_kind=kind, limit=limit)
        if zs is None:
            log(f"zero-shot {kind}: no labelled single-shape held-out images in {data} (a world directory has them)")
            continue
        acc = local.zero_shot(model, zs["pixels"], zs["labels"], zs["classnames"], zs["templates"], tokenizer)
        out[f"zero_shot_{kind}_acc"] = acc
        out[f"zero_shot_{kind}_images"] = len(zs["labels"])
        out[f"zero_shot_{kind}_chance"] = 1.0 / len(zs["classnames"])
        log(f"zero-shot {kind}: accuracy {acc:.3f} on {len(zs['labels'])} images, {len(zs['classnames'])} classes "
            f"(chance {1.0 / len(zs['classnames']):.3f})")
    return out


def score_vlm(model: Any, tokenizer: Any, data: str, *, limit: int, generations: int, log: Callable[[str], None]) -> dict[str, Any]:
    from jobs import local
    from jobs.data import read_sft

    examples = read_sft(data, size=model.cfg.vision.image_size, split="heldout", limit=limit)
    if not examples:
        raise ValueError(f"--data {data}: no held-out conversations there (a world directory's sft_heldout.jsonl)")
    answered, metrics = local.evaluate_sft(model, examples, tokenizer)
    out: dict[str, Any] = {"conversations": len(examples), **metrics}
    log(f"{len(examples)} held-out conversations:")
    for k, v in metrics.items():
        log(f"  {k:<28} {v:.3f}")
    for ex, pred in answered[:generations]:
        log(f"  sample {ex.id}: {pred!r} (reference {local.answer_of(ex)!r})")
    return out


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> int:
    a = build_parser().parse_args(argv)
    try:
        ks = _ints(a.recall, "--recall")
        kinds = _kinds(a.zero_shot)
        if a.samples < 0:
            raise ValueError(f"--samples: expected 0 (all) or more, got {a.samples}")
        if not Path(a.data).is_dir():
            raise ValueError(f"--data {a.data}: not a directory")
        if a.output and Path(a.output).is_dir():
            raise ValueError(f"--output: expected a file to write the metrics to (JSON), got the directory {a.output!r}")
        if a.output and any(d.exists() and not d.is_dir() for d in Path(a.output).parents):
            raise ValueError(f"--output {a.output}: a file stands where its directory would be")
        device = pick_device(a.device)
        from vlm.checkpoint import load_checkpoint

        t = time.perf_counter()
        loaded = load_checkpoint(a.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlm eval: {e}", file=sys.stderr)
        return 2
    from jobs.local import scoring_on

    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    log(f"[eval] {loaded.stage} checkpoint {a.checkpoint} on {a.data}, on {device}{' (bf16 autocast)' if a.bf16 and device.type != 'cpu' else ''}")
    limit = a.samples or 10**9  # 0: every held-out item
    try:
        with scoring_on(model, device, bf16=a.bf16):
            if loaded.stage == "contrastive":
                metrics = score_contrastive(model, tokenizer, a.data, limit=limit, ks=ks, kinds=kinds, log=log)
            else:
                metrics = score_vlm(model, tokenizer, a.data, limit=limit, generations=a.generations, log=log)
    except ValueError as e:
        print(f"vlm eval: {e}", file=sys.stderr)
        return 2
    report = {"checkpoint": str(a.checkpoint), "stage": loaded.stage, "data": str(a.data), "step": loaded.meta.get("step"), "device": str(device),
              "seconds": round(time.perf_counter() - t, 2), "metrics": metrics}
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(report, indent=2))
        log(f"[eval] metrics in {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
