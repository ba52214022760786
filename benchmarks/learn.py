"""Does the model learn? Train the `learn` preset in-process on CPU and report held-out figures.

    python benchmarks/learn.py [--preset learn] [--output DIR] [--stage1 DIR] [key.sub=value ...]

The `learn` preset is the `tiny` model at 96 px with a pixel-shuffle projector and a multi-turn
stage-2 mixture (see ``vlm/presets/learn.yaml``); `--preset tiny` runs the test-size setup.

Prints stage-1 text-to-image R@1 on the held-out pool (target >= 0.8 on 256 images) and stage-2
exact match on held-out single-image questions (target >= 0.8), each next to the same run's
baseline: chance retrieval (1 / pool) for stage 1, and for stage 2 a blind model that answers
each question with the answer most often seen for that exact question in training (text-only
prior: what the model could score without looking at the image).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.demo import run_demo  # noqa: E402
from vlm import world  # noqa: E402
from vlm.config import load_config  # noqa: E402
from vlm.evaluate import exact_match  # noqa: E402


def blind_baseline(cfg) -> dict[str, float]:
    """Exact match of the most frequent training answer for each question string (scenes are
    sampled, never rendered: the baseline reads only question texts)."""
    prior: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for s in world.generate(cfg.data, "train"):
        for qa in s.qas:
            prior[qa.question][qa.answer] += 1
            overall[qa.answer] += 1
    held = [qa for s in world.generate(cfg.data, "heldout") for qa in s.qas]
    preds = [(prior.get(qa.question) or overall).most_common(1)[0][0] for qa in held]
    return {"em_single_image": exact_match(preds, [qa.answer for qa in held])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="learn")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--output", default=None, help="keep checkpoints and the report here (default: a temporary directory)")
    p.add_argument("--stage1", default=None, metavar="DIR", help="stage 2 only, from this stage-1 checkpoint (an earlier --output's stage1/): "
                   "stage-2 experiments on one stage-1 model; the stage-1 figures printed are the checkpoint's")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_config(preset=a.preset, overrides=a.overrides)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.output) if a.output else Path(tmp)
        report = run_demo(cfg, output=out, write_world=False, progress=False, log=lambda s: print(s, flush=True),
                          stage1=Path(a.stage1) if a.stage1 else None)
    s1, s2 = report["stage1"], report["stage2"]
    pool = int(s1["pool"])
    blind = blind_baseline(cfg)
    print("\n== learn benchmark:", cfg.name, "==")
    print(f"stage 1  t2i R@1 {s1['t2i_r1']:.3f} on a {pool}-image pool (chance {1 / pool:.4f}, x{s1['t2i_r1'] * pool:.0f}); "
          f"i2t R@1 {s1['i2t_r1']:.3f}; t2i R@5 {s1['t2i_r5']:.3f}; zero-shot shape acc {s1.get('zero_shot_shape_acc', float('nan')):.3f} "
          f"(chance {1 / len(world.SHAPES):.2f}); {s1['train_seconds']:.0f}s training"
          + (f" (the checkpoint's figures: stage 1 reused from {a.stage1}, not trained in this run)" if a.stage1 else ""))
    print(f"stage 2  exact match, single-image questions {s2['em_single_image']:.3f} (blind text-only baseline "
          f"{blind['em_single_image']:.3f}, ratio {s2['em_single_image'] / max(blind['em_single_image'], 1e-9):.2f}); "
          f"{s2['train_seconds']:.0f}s training")
    print("         per task: " + ", ".join(f"{k[3:]} {v:.3f}" for k, v in sorted(s2.items()) if k.startswith("em_")))
    if "caption_recall" in s2:
        print(f"         held-out captions, each asked alone: exact match {s2['em_caption']:.3f}, "
              f"phrase recall {s2['caption_recall']:.3f} (the share of a caption's facts stated word for word)")
    ok1, ok2 = s1["t2i_r1"] >= 0.8, s2["em_single_image"] >= 0.8
    print(f"targets: stage 1 R@1 >= 0.8 {'met' if ok1 else 'NOT met'}; stage 2 EM >= 0.8 {'met' if ok2 else 'NOT met'}; "
          f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
