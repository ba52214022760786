"""`vlm export` refuses what it cannot export in one line (exit 2): not a run directory, a run
that kept no checkpoint, a step it did not keep, another run's or a broken checkpoint, a
checkpoint whose DeepSpeed files are missing, an output that would replace anything but an
earlier export. (Exports of real checkpoints: test_train_resume.py, ZeRO-3 on 2 ranks;
test_train_zero.py, ZeRO-0 and ZeRO-1; test_lora_zero.py, the files read offline at ZeRO 0-3.)"""

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
    # --checkpoint: one of this run's, whole
    (tmp_path / "other").mkdir()
    other = _checkpoint(_run(tmp_path / "other"), "checkpoint_x", 2)  # another run's
    assert f"not a checkpoint of {run}" in _err(capsys, [str(run), "--checkpoint", str(other)])
    broken = _checkpoint(run, "checkpoint_c", 12)
    (broken / "state.json").write_text("{")
    assert "expected a whole run checkpoint" in _err(capsys, [str(run), "--checkpoint", str(broken)])
    with pytest.raises(SystemExit) as exit_:  # argparse: one or the other
        main([str(run), "--step", "4", "--checkpoint", str(broken)])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_an_output_that_is_not_an_export_is_never_replaced(tmp_path, capsys):
    """The run, a folder holding it, its checkpoints or final export, and any existing folder or
    file that is not an earlier export are refused before anything is read or written."""
    run = _run(tmp_path)
    ckpt = _checkpoint(run, "checkpoint_a", 4)
    (run / "final").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "clip-hf").mkdir()  # someone's folder beside the output: its -hf sibling
    for output, said in ((run, "is the run directory or holds it"), (tmp_path, "is the run directory or holds it"),
                         (run / "ray_train", "inside the run's ray_train/"), (ckpt, "inside the run's ray_train/"),
                         (run / "final", "inside the run's final/"), (tmp_path / "notes", "exists and is not an export"),
                         (tmp_path / "afile", "exists and is not an export"), (tmp_path / "clip", "exists and is not an export")):
        assert said in _err(capsys, [str(run), "--output", str(output)]), output
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and (tmp_path / "afile").read_text() == "mine"
    assert (tmp_path / "clip-hf").is_dir() and (ckpt / "state.json").is_file()


def test_a_run_yaml_that_does_not_parse_is_one_line(tmp_path, capsys):
    run = _run(tmp_path)
    (run / "job.yaml").write_text("stage: sft\njob: [unclosed\n")
    assert "expected the run's YAML" in _err(capsys, [str(run)])


@pytest.mark.parametrize("zero, expected", [(0, "no mp_rank_*_model_states.pt"), (2, "cannot read the checkpoint")])
def test_a_checkpoint_missing_its_files_is_named(tmp_path, capsys, zero, expected):
    run = _run(tmp_path, zero)
    _checkpoint(run, "checkpoint_a", 4)
    err = _err(capsys, [str(run)])
    assert expected in err and "checkpoint_a" in err, err
    assert not (run / "export-step4").exists()
