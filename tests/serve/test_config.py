"""The serve YAMLs, the RayService manifest and the CLI's config handling (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.cli import main, resolve_args, serve_config
from serve.config import AppArgs, EncoderConfig, IngressConfig, LMConfig

INFRA = Path(__file__).resolve().parents[2] / "infra" / "serve"
USER_CONFIGS = {"Ingress": IngressConfig, "ImageEncoder": EncoderConfig, "LanguageModel": LMConfig}


@pytest.mark.parametrize("name", ["tiny.yaml", "base.yaml"])
def test_serve_yaml_is_valid(name):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((INFRA / name).read_text())
    ServeDeploySchema.model_validate(raw)  # what `serve deploy` checks
    app = raw["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    AppArgs.model_validate(app["args"])
    names = {d["name"] for d in app["deployments"]}
    assert names == {"Ingress", "ImageEncoder", "LanguageModel", "Embedder"}
    for d in app["deployments"]:
        assert "autoscaling_config" in d and "max_queued_requests" in d and "max_ongoing_requests" in d
        if d["name"] in USER_CONFIGS and "user_config" in d:
            USER_CONFIGS[d["name"]].model_validate(d["user_config"])
        if d["name"] == "LanguageModel":
            assert d["max_ongoing_requests"] >= d["user_config"]["max_batch_size"]


def test_rayservice_embeds_the_serve_yaml_unchanged():
    manifest = yaml.safe_load((INFRA / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    assert manifest["spec"]["serveConfigV2"] == (INFRA / "base.yaml").read_text()


def test_cli_writes_a_serve_config(tmp_path, checkpoints):
    out = tmp_path / "s.yaml"
    rc = main(["--checkpoint", str(checkpoints["vlm"]), "--embedding-checkpoint", str(checkpoints["clip"]),
               "--write-config", str(out), "ingress.limits.max_images=2", "lm.max_batch_size=8",
               "deployments.LanguageModel.num_replicas=2"])
    assert rc == 0
    raw = yaml.safe_load(out.read_text())
    app = raw["applications"][0]
    args = AppArgs.model_validate(app["args"])
    assert args.ingress.limits.max_images == 2 and args.lm.max_batch_size == 8
    assert app["deployments"] == [{"name": "LanguageModel", "num_replicas": 2}]
    # --config reads that file back (the first application's args)
    again = resolve_args(type("NS", (), {"config": str(out), "checkpoint": None, "embedding_checkpoint": None,
                                         "model_name": None, "overrides": []})())
    assert again.ingress.limits.max_images == 2
    assert serve_config(again)["applications"][0]["args"]["checkpoint"] == str(checkpoints["vlm"])


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "checkpoint.json" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "ingress.limits.max_imagez=3"]) == 2
    assert "max_imagez" in capsys.readouterr().err
