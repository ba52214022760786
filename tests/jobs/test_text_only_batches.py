"""A rank whose micro-batch has no image (text-only conversations, e.g. LLaVA's ShareGPT part)
beside one whose has: under ZeRO-2 and ZeRO-3 on 2 real gloo ranks, without Ray, the step
completes and both ranks hold the same weights. The vision tower and projector run on every
rank (a blank image weighing 0 on the text-only one), so the ranks' collectives match; before,
gloo failed the step with a collective size mismatch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .conftest import TINY, free_port, init_gloo_rank


def _worker(rank: int, world: int, port: int, out: str) -> None:
    init_gloo_rank(rank, world, port)
    torch.set_num_threads(1)
    import deepspeed
    import tinymodels

    from jobs.job_config import deepspeed_config, load_job
    from jobs.loop import _gathered, build_model
    from vlm.data import SFTExample, collate_sft
    from vlm.optim import build_optimizer, build_scheduler

    tok = tinymodels.tokenizer()
    report = {}
    for zero in (2, 3):
        cfg, job = load_job(overrides=[*TINY, f"job.zero_stage={zero}", "job.num_workers=2", "stage2.batch_size=2",
                                       "model.tokenizer.vocab_size=300"])
        model = build_model("sft", cfg, job, tok)
        optimizer = build_optimizer(model, cfg.stage2)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg.stage2),
                                               config=deepspeed_config(cfg.stage2, job), dist_init_required=False)
        size = cfg.model.vision.image_size
        answer = {"role": "assistant", "content": "a red square"}
        if rank == 0:
            ex = SFTExample("image", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}, answer],
                            [np.full((size, size, 3), 200, np.uint8)])
        else:
            ex = SFTExample("text", [{"role": "user", "content": "hello"}, answer], [])
        batch, _ = collate_sft([ex], tok, num_image_tokens=cfg.model.image_tokens, max_length=160, vision_kind=cfg.model.vision.kind,
                               image_size=size)
        labels = batch.pop("labels")
        for _ in range(2):
            engine.backward(engine(**batch, labels=labels, return_logits=False)["loss"])
            engine.step()
        params = [p for n, p in engine.module.named_parameters() if n.startswith("projector.")]
        with _gathered(params, zero):
            report[zero] = [float(p.detach().double().sum()) for p in params]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    os._exit(0)  # no interpreter teardown after the check (see test_master_weights.py)


def test_a_text_only_rank_steps_with_an_image_rank_under_zero_2_and_3(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for zero in ("2", "3"):
        assert ranks[0][zero] == ranks[1][zero], f"ZeRO-{zero}: the ranks' projector weights differ"
