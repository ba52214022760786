"""Embedding a collection for `vlm search` / `vlm classify`: images/s of ours against the naive loop.

    .venv/bin/python benchmarks/embed.py                                  # CPU, the `small` preset
    .venv/bin/python benchmarks/embed.py --preset base --device cuda --bf16 --images 4096   # GPU

Both embed the same JPEG files (``--images`` of them, ``--side`` pixels square, written once
to a temporary directory) with the same random-weight stage-1 model of ``--preset``:

- ours: ``jobs.retrieve.embed_items``: decoding on a thread pool while the towers run batches of
  ``jobs.retrieve.BATCH`` images;
- naive: what a first script does: for each file, open, resize, normalise and encode it alone.

Printed: images/s of each (after one warm-up batch), ours/naive as a ratio, and whether the
embeddings agree (cosine of each image's two embeddings; batching must not change them).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--side", type=int, default=320, help="the JPEGs' side in pixels (resized to the tower's size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from PIL import Image

    from jobs.local import scoring_on
    from jobs.retrieve import embed_items, find_images, load_pixels
    from vlm.config import load_config
    from vlm.contrastive import ContrastiveModel
    from vlm.embed import encode_images

    cfg = load_config(preset=a.preset).model
    torch.manual_seed(0)
    model = ContrastiveModel(cfg, vocab_size=1000, pad_token_id=0).eval()
    dev = torch.device(a.device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, scoring_on(model, dev, bf16=a.bf16):
        for i in range(a.images):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (a.side, a.side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            (Path(tmp) / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        items, _ = find_images([tmp])
        size = cfg.vision.image_size
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        embed_items(model, items[:64], resize_mode="squash", progress=False, log=lambda *_: None)  # warm-up
        sync()
        t = time.perf_counter()
        ours = embed_items(model, items, resize_mode="squash", progress=False, log=lambda *_: None)
        sync()
        t_ours = time.perf_counter() - t

        naive = []
        for it in items[:8]:  # warm-up
            encode_images(model, load_pixels(it, size, "squash")[None])
        sync()
        t = time.perf_counter()
        for it in items:
            naive.append(encode_images(model, load_pixels(it, size, "squash")[None]))
        sync()
        t_naive = time.perf_counter() - t
    cos = (torch.from_numpy(ours.emb) * torch.cat(naive)).sum(-1)
    report = {
        "preset": a.preset, "device": str(dev), "bf16": a.bf16, "images": a.images, "side": a.side, "torch_threads": torch.get_num_threads(),
        "ours_images_per_s": round(a.images / t_ours, 1), "naive_images_per_s": round(a.images / t_naive, 1),
        "ratio": round(t_naive / t_ours, 2), "min_cosine_ours_vs_naive": round(float(cos.min()), 6),
    }
    print(f"{a.preset} on {dev}{' bf16' if a.bf16 else ''}: {a.images} JPEGs of {a.side}px -> {size}px")
    print(f"  ours   {report['ours_images_per_s']:8.1f} images/s")
    print(f"  naive  {report['naive_images_per_s']:8.1f} images/s")
    print(f"  ours/naive {report['ratio']:.2f}x; embeddings agree to cosine >= {report['min_cosine_ours_vs_naive']:.6f}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
