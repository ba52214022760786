"""`vlm export` refuses what it cannot export in one line (exit 2): not a run directory, a run
that kept no checkpoint, a step it did not keep, a directory that is not a checkpoint, a
checkpoint whose DeepSpeed files are missing. (Exports of real checkpoints: test_train_resume.py,
ZeRO-3 on 2 ranks; test_train_zero.py, ZeRO-0 and ZeRO-1.)"""

from __future__ import annotations

import json

import pytest
import tinymodels

from jobs.export_run import main
from jobs.job_config import load_job, save_job
from vlm.tokenizer import save_tokenizer

from .conftest import TINY


def _run(tmp_path, zero: int = 2):
    run = tmp_path / "run"
    run.mkdir()
    cfg, job = load_job(overrides=[*TINY, f"job.zero_stage={zero}", f"job.output={run}"])
    save_job(cfg, job, "sft", run / "job.yaml")
    save_tokenizer(tinymodels.tokenizer(), run / "tokenizer")
    return run


def _checkpoint(run, name: str, step: int):
    d = run / "ray_train" / name
    (d / "ds" / "ds").mkdir(parents=True)
    (d / "ds" / "latest").write_text("ds")
    (d / "state.json").write_text(json.dumps({"step": step}))
    return d


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_not_a_run_directory(tmp_path, capsys):
    assert "job.yaml is missing" in _err(capsys, [str(tmp_path)])
    assert "job.yaml is missing" in _err(capsys, [str(tmp_path), "--list"])


def test_a_run_without_checkpoints_and_a_step_not_kept(tmp_path, capsys):
    run = _run(tmp_path)
    assert "no checkpoint with a state.json and ds/" in _err(capsys, [str(run)])
    _checkpoint(run, "checkpoint_a", 4)
    _checkpoint(run, "checkpoint_b", 8)
    assert _err(capsys, [str(run), "--step", "6"]).endswith("no checkpoint of step 6; kept: steps 4, 8")
    said: list[str] = []
    assert main([str(run), "--list"], log=said.append) == 0
    assert [line.split("\t")[0] for line in said] == ["step 4", "step 8"]
    assert "expected a run checkpoint directory" in _err(capsys, [str(run), "--checkpoint", str(tmp_path)])


@pytest.mark.parametrize("zero, expected", [(0, "no mp_rank_*_model_states.pt"), (2, "cannot read the checkpoint")])
def test_a_checkpoint_missing_its_files_is_named(tmp_path, capsys, zero, expected):
    run = _run(tmp_path, zero)
    _checkpoint(run, "checkpoint_a", 4)
    err = _err(capsys, [str(run)])
    assert expected in err and "checkpoint_a" in err, err
    assert not (run / "export-step4").exists()
