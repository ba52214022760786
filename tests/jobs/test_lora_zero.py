"""Stage 2 with LoRA adapters under ZeRO-2 and ZeRO-3 on 2 real gloo ranks, without Ray, started
(``job.init_from``) from a plain stage-2 checkpoint: its weights load into the model (under ZeRO-3
into the partitioned build) and the adapters start fresh; the steps train the adapters and the
projector and leave the decoder's weights as loaded; the ranks' fp32 copy (``plain_copy``,
collective) and the run's export (``_export``) merge the adapters into a plain checkpoint, ours
and Hugging Face's, with the adapted model's outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import TINY, free_port, init_gloo_rank

LORA = ["model.llava.lora_rank=4", "model.llava.lora_alpha=8", "model.llava.lora_targets=[q_proj,v_proj,down_proj]"]
# ZeRO 1-3, and ZeRO-0 with bf16 weights (the fp32 masters beside them in the optimizer)
VARIANTS = [(1, []), (2, []), (3, []), (0, ["job.precision=bf16", "job.bf16_mode=weights"])]


def _worker(rank: int, world: int, port: int, out: str, start: str) -> None:
    init_gloo_rank(rank, world, port)
    torch.set_num_threads(1)
    import deepspeed
    import tinymodels

    from jobs.export_run import checkpoint_state
    from jobs.job_config import deepspeed_config, load_job
    from jobs.loop import _export, build_model, plain_copy
    from vlm.optim import param_groups
    from vlm.checkpoint import load_checkpoint
    from vlm.data import SFTExample, collate_sft
    from vlm.optim import build_optimizer, build_scheduler

    tok = tinymodels.tokenizer()
    report = {}
    for zero, extra in VARIANTS:
        cfg, job = load_job(overrides=[*TINY, *LORA, f"job.zero_stage={zero}", "job.num_workers=2", "stage2.batch_size=2",
                                       "stage2.lr=0.01", "model.tokenizer.vocab_size=300", f"job.init_from={start}", *extra])
        initial = load_checkpoint(start).model.state_dict()
        ds_config = deepspeed_config(cfg.stage2, job)
        model = build_model("sft", cfg, job, tok, partition=ds_config if zero == 3 else None, rank=rank)
        optimizer = build_optimizer(model, cfg.stage2)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg.stage2),
                                               config=ds_config, dist_init_required=False)
        size = cfg.model.vision.image_size
        colour = ["red", "blue"][rank]
        ex = SFTExample("image", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]},
                                  {"role": "assistant", "content": f"a {colour} square"}], [np.full((size, size, 3), 60 + 120 * rank, np.uint8)])
        batch, _ = collate_sft([ex], tok, num_image_tokens=cfg.model.image_tokens, max_length=160, vision_kind=cfg.model.vision.kind,
                               image_size=size)
        labels = batch.pop("labels")
        low = "job.bf16_mode=weights" in extra  # the engine's weights are bf16: so are its inputs, as the loop casts them
        if low:
            batch["pixel_values"] = batch["pixel_values"].bfloat16()
        for _ in range(3):
            engine.backward(engine(**batch, labels=labels, return_logits=False)["loss"])
            engine.step()
        plain = plain_copy(engine, "sft", cfg, job, tok, rank)  # collective
        saved = Path(out) / f"saved{zero}"
        engine.save_checkpoint(str(saved), tag="ds")  # collective: the files `vlm export` reads
        if rank == 0:
            state = plain.state_dict()
            # `vlm export`'s reading of those files, offline: the run's weights, frozen ones and
            # fp32 masters (bf16 weights at ZeRO-0) included
            names = {id(p): n for n, p in plain.named_parameters()}
            masters = [[names[id(p)] for p in g["params"]] for g in param_groups(plain, weight_decay=0.0) if g["params"]]
            read = checkpoint_state(saved, zero, masters)
            report[f"{zero}_read_equal"] = sorted(read) == sorted(state) and all(torch.equal(read[k], state[k]) for k in state)
            frozen = [k for k in state if k.startswith("decoder.") and ".lora." not in k]
            as_kept = (lambda t: t.bfloat16().float()) if low else (lambda t: t)  # a frozen weight is held in bf16 there
            report[f"{zero}_decoder_kept"] = sorted(frozen) == sorted(k for k in initial if k.startswith("decoder.")) and all(
                torch.equal(state[k], as_kept(initial[k])) for k in frozen)
            report[f"{zero}_adapters_moved"] = sorted({k.rsplit(".", 3)[-3] for k in state if k.endswith(".lora.B") and state[k].abs().sum() > 0})
            report[f"{zero}_projector_moved"] = not all(torch.equal(state[k], initial[k]) for k in state if k.startswith("projector."))
            fp32_batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
            with torch.no_grad():
                adapted = plain(**fp32_batch).logits
            run = Path(out) / f"zero{zero}"
            _export(plain, "sft", cfg, tok, run, step=3, metrics={}, log=lambda *_: None)
            exported = load_checkpoint(run / "model")
            report[f"{zero}_exported_rank"] = exported.config.model.llava.lora_rank
            report[f"{zero}_exported_keys"] = [k for k in exported.model.state_dict() if ".lora." in k]
            with torch.no_grad():
                report[f"{zero}_logits_diff"] = float((exported.model(**fp32_batch).logits - adapted).abs().max())
            report[f"{zero}_hf"] = (run / "hf" / "config.json").is_file()
    if rank == 0:
        (Path(out) / "report.json").write_text(json.dumps(report))
    os._exit(0)  # no interpreter teardown after the check (see test_master_weights.py)


def test_lora_trains_under_zero_2_and_3_and_the_export_merges_it(tmp_path):
    import torch.multiprocessing as mp

    import tinymodels

    from jobs.job_config import load_job
    from jobs.loop import build_model
    from vlm.checkpoint import save_checkpoint

    # a plain stage-2 checkpoint of the same shapes, built from another seed than the runs' own
    cfg, job = load_job(overrides=[*TINY, "model.tokenizer.vocab_size=300", "seed=123"])
    tok = tinymodels.tokenizer()
    save_checkpoint(build_model("sft", cfg, job, tok), tmp_path / "start", config=cfg, tokenizer=tok)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), str(tmp_path / "start")), nprocs=2, join=True)
    report = json.loads((tmp_path / "report.json").read_text())
    for zero, _ in VARIANTS:
        assert report[f"{zero}_read_equal"], f"ZeRO-{zero}: the saved checkpoint read offline is not the run's model"
        assert report[f"{zero}_decoder_kept"], f"ZeRO-{zero}: the decoder's own weights changed"
        assert report[f"{zero}_adapters_moved"] == ["down_proj", "q_proj", "v_proj"], report
        assert report[f"{zero}_projector_moved"]
        assert report[f"{zero}_exported_rank"] == 0 and report[f"{zero}_exported_keys"] == []
        assert report[f"{zero}_logits_diff"] < 1e-4, report
        assert report[f"{zero}_hf"]


def test_a_partitioned_load_takes_a_plain_file_into_adapters_and_refuses_extra_weights(tmp_path):
    """``load_partitioned`` (the ZeRO-3 build's loader; here on unpartitioned parameters, one
    process): a LoRA model takes a plain checkpoint's weights with its adapters as built; a plain
    model refuses a file that still holds adapters (it would drop them silently), as the
    unpartitioned load does."""
    import tinymodels
    from safetensors.torch import save_file

    from jobs.zero_init import load_partitioned
    from vlm.lora import is_lora_key

    tok = tinymodels.tokenizer()
    plain = tinymodels.vlm_model(tok, seed=3)
    lora = tinymodels.vlm_model(tok, *LORA)
    adapters = {k: v.clone() for k, v in lora.state_dict().items() if is_lora_key(k)}

    def save(model, name):
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        seen, unique = set(), {}
        for k, v in state.items():  # one name per shared tensor (tied embeddings), as save_checkpoint writes
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v
        save_file(unique, str(tmp_path / name))
        return tmp_path / name

    load_partitioned(lora, save(plain, "plain.safetensors"), rank=0, optional=is_lora_key)
    got = lora.state_dict()
    assert all(torch.equal(got[k], v) for k, v in plain.state_dict().items())
    assert all(torch.equal(got[k], v) for k, v in adapters.items())
    with pytest.raises(ValueError, match=r"holds weights the model does not have: unexpected \['decoder\..*\.lora\.A'"):
        load_partitioned(plain, save(lora, "lora.safetensors"), rank=0)
