"""Stage 2 on imported LLaVA-format data (`vlm import-llava`), through Ray Train + DeepSpeed
ZeRO-2 on 2 workers: one-image, two-image, video and text-only conversations mixed, so some
micro-batches hold no image on one rank (the vision tower must still run on every rank), and the
held-out eval scores the answers' loss. The decoder trains through LoRA adapters, as LLaVA's
LoRA recipe does: the export merges them into its linear layers and leaves the rest as built."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from jobs.metrics import read_metrics
from jobs.train import main
from pipelines.llava_data import import_llava

from .conftest import TINY


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def test_sft_trains_on_imported_llava_data(ray_local, tmp_path):
    from pipelines.world import encode_mp4, video_codec

    folder = tmp_path / "media"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    encode_mp4([Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)], folder / "clip.mp4",
               codec=video_codec(), fps=4)
    records = []
    for i in range(6):
        records.append({"id": f"img-{i}", "image": f"{i}.png", "conversations": _turns(("human", "<image>\nwhat is it?"), ("gpt", f"thing {i}"))})
        records.append({"id": f"text-{i}", "conversations": _turns(("human", f"say {i}"), ("gpt", f"{i}"))})
    records.append({"id": "pair", "image": ["0.png", "1.png"], "conversations": _turns(("human", "<image>\n<image>\nsame?"), ("gpt", "no"))})
    records.append({"id": "video", "video": "clip.mp4", "conversations": _turns(("human", "<image>\nwhat moves?"), ("gpt", "nothing"))})
    (tmp_path / "llava.json").write_text(json.dumps(records))
    data = tmp_path / "sft"
    summary = import_llava(tmp_path / "llava.json", image_folder=folder, output=data, heldout=3, frames=2, log=lambda *_: None)
    assert summary["skipped"] == {} and summary["train"] + summary["heldout"] == len(records)

    out = tmp_path / "run"
    rc = main(["sft", "--data", str(data), "--output", str(out), "--num-workers", "2", "--zero-stage", "2", *TINY,
               "stage2.steps=4", "stage2.batch_size=4", "stage2.log_every=0", "job.checkpoint_every=0", "job.progress=false",
               "job.tensorboard=false", "job.eval_samples=3", "job.max_failures=0", "job.trace_samples=true",
               "model.llava.lora_rank=4", "model.llava.lora_alpha=8"])
    assert rc == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    traced = [json.loads(ln) for r in (0, 1) for ln in (out / "samples" / f"rank{r}.jsonl").read_text().splitlines()]
    ids = {i for t in traced for i in t["ids"]}
    assert any(i.startswith("text-") for i in ids) and any(i.startswith("img-") for i in ids)
    final = json.loads((out / "result.json").read_text())["metrics"]
    assert final["eval_answer_loss"] > 0
    # the export: a plain checkpoint whose decoder differs from the run's seeded start in its
    # linear layers (the adapters merged) and nowhere else (embeddings, norms: frozen)
    import torch

    from jobs.job_config import JobConfig
    from jobs.loop import build_model
    from vlm.checkpoint import load_checkpoint

    loaded = load_checkpoint(out / "final")
    assert loaded.config.model.llava.lora_rank == 0 and not any(".lora." in k for k in loaded.model.state_dict())
    start = build_model("sft", loaded.config, JobConfig(), loaded.tokenizer).state_dict()
    moved = {k for k, v in loaded.model.state_dict().items() if k.startswith("decoder.") and not torch.equal(v, start[k])}
    linear = {n + ".weight" for n, m in loaded.model.decoder.named_modules(prefix="decoder")
              if isinstance(m, torch.nn.Linear) and m is not loaded.model.decoder.get_output_embeddings()}
    assert moved == linear
    assert (out / "final-hf" / "config.json").is_file()
