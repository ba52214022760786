"""``deepspeed.zero.Init`` builds (jobs/zero_init.py) on 2 real gloo ranks, without Ray.

Every way a model gets its weights is built twice, plainly and partitioned: from the config
(both stages), a pretrained tower directory (transformers' ZeRO-3 loading), a stage-1 checkpoint
into stage 2 and a stage-2 checkpoint (``load_partitioned``). Right after the partitioned build
each rank holds half of each parameter and sees none of it; gathered, the weights equal the
plain build's bit for bit. (The Ray Train runs with ``zero_init`` are in test_train_zero.py and
test_train_resume.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from .conftest import TINY, free_port, init_gloo_rank

CASES = {
    "stage1-config": ("contrastive", []),
    "stage2-config": ("sft", []),
    "stage1-pretrained-vision": ("contrastive", ["model.vision.pretrained={d}/vision"]),
    "stage2-from-stage1": ("sft", ["job.init_from={d}/s1"]),
    "stage2-from-stage2": ("sft", ["job.init_from={d}/s2"]),
}



def _worker(rank: int, world: int, port: int, d: str) -> None:
    import torch.distributed as dist

    init_gloo_rank(rank, world, port)
    import deepspeed

    from jobs.job_config import load_job
    from jobs.loop import build_model
    from vlm.tokenizer import load_tokenizer

    from deepspeed import comm

    # DeepSpeed's communicator is up on the gloo group without its shared-memory inference op
    # (jobs.loop.skip_inference_comm_op: no C++ build on a fresh machine), and its collectives work
    t = torch.ones(3) * (rank + 1)
    comm.all_reduce(t)
    comm_report = {"shm_op_built": comm.comm.cdb.shm_comm_op is not None, "all_reduce": t.tolist()}
    tok = load_tokenizer(Path(d) / "tokenizer")
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    report = {}
    for name, (stage, overrides) in CASES.items():
        cfg, job = load_job(overrides=TINY + [o.format(d=d) for o in overrides])
        plain = build_model(stage, cfg, job, tok).state_dict()
        model = build_model(stage, cfg, job, tok, partition=ds, rank=rank)
        params = list(model.parameters())
        seen = {
            "visible": sum(p.numel() for p in params),
            "shard": sum(p.ds_tensor.numel() for p in params),
            "full": sum(p.ds_numel for p in params),
            "count": len(params),
        }
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            got = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["differ"] = sorted(k for k in plain if not torch.equal(plain[k], got[k]))
        seen["keys_equal"] = sorted(plain) == sorted(got)
        report[name] = seen
    (Path(d) / f"rank{rank}.json").write_text(json.dumps({**report, "_comm": comm_report}))
    dist.barrier()
    os._exit(0)  # no interpreter teardown after the check (see test_master_weights.py)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tokenizer, stage-1 and stage-2 checkpoints and a pretrained vision tower, all from seed 7
    (the builds under test use seed 0, so a load that silently did nothing would show)."""
    from jobs.job_config import load_job
    from jobs.loop import build_model
    from vlm import world
    from vlm.checkpoint import save_checkpoint
    from vlm.tokenizer import save_tokenizer, train_bpe_tokenizer

    d = tmp_path_factory.mktemp("zero_init")
    tok = train_bpe_tokenizer([world.CAPTION_PROMPT, "a red circle on a blue ground", "two green squares"] * 4, vocab_size=320)
    save_tokenizer(tok, d / "tokenizer")
    cfg, job = load_job(overrides=TINY + ["seed=7"])
    s1 = build_model("contrastive", cfg, job, tok)
    save_checkpoint(s1, d / "s1", config=cfg, tokenizer=tok)
    save_checkpoint(build_model("sft", cfg, job, tok), d / "s2", config=cfg, tokenizer=tok)
    s1.vision.save_pretrained(d / "vision")
    return d


def test_partitioned_builds_hold_the_plain_weights(sources):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(sources)), nprocs=2, join=True)
    reports = [json.loads((sources / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["_comm"] for r in reports] == [{"shm_op_built": False, "all_reduce": [3.0, 3.0, 3.0]}] * 2
    for name in CASES:
        for rank, rep in enumerate(reports):
            seen = rep[name]
            assert seen["visible"] == 0, f"{name}: rank {rank} sees unpartitioned parameters"
            assert seen["full"] / 2 <= seen["shard"] <= seen["full"] / 2 + seen["count"], (name, rank, seen)
            assert seen["keys_equal"] and not seen["differ"], f"{name}: rank {rank}: weights differ from the plain build: {seen['differ'][:5]}"
