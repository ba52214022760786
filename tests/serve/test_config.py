"""The serve YAMLs, the RayService manifest and the CLI's config handling (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.cli import main, resolve_args, serve_config
from serve.config import AppArgs, EncoderConfig, IngressConfig, LMConfig, load_args

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
    assert not {"ingress", "encoder", "lm"} & set(app["args"]), "runtime settings in args restart replicas on a change"
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


def test_rayservice_pods_that_may_build_the_app_mount_its_checkpoints():
    """build_app reads each checkpoint directory when the app is built, on the head or a worker."""
    spec = yaml.safe_load((INFRA / "rayservice.yaml").read_text())["spec"]
    args = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
    paths = [args[k] for k in ("checkpoint", "embedding_checkpoint") if args.get(k)]
    groups = [spec["rayClusterConfig"]["headGroupSpec"], *spec["rayClusterConfig"]["workerGroupSpecs"]]
    for group in groups:
        mounts = [m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert all(any(p.startswith(m.rstrip("/") + "/") for m in mounts) for p in paths), (paths, mounts)


def test_cli_writes_a_serve_config(tmp_path, checkpoints):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "s.yaml"
    rc = main(["--checkpoint", str(checkpoints["vlm"]), "--embedding-checkpoint", str(checkpoints["clip"]),
               "--write-config", str(out), "ingress.limits.max_images=2", "lm.max_batch_size=8",
               "deployments.LanguageModel.num_replicas=2"])
    assert rc == 0
    raw = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(raw)
    app = raw["applications"][0]
    # the runtime sections are the deployments' user_config (reconfigured in place), not args
    # (a change of args is a new application version: every replica restarts)
    assert not {"ingress", "encoder", "lm", "deployments"} & set(app["args"])
    AppArgs.model_validate(app["args"])
    deps = {d.pop("name"): d for d in app["deployments"]}
    assert set(deps) == {"Ingress", "ImageEncoder", "LanguageModel", "Embedder"}
    assert deps["LanguageModel"]["num_replicas"] == 2 and deps["LanguageModel"]["user_config"]["max_batch_size"] == 8
    assert deps["Ingress"]["user_config"]["limits"]["max_images"] == 2
    assert deps["Embedder"] == {}
    for name, model in USER_CONFIGS.items():
        model.model_validate(deps[name]["user_config"])
    # --config reads that file back: args, user_configs and deployment settings
    again = resolve_args(type("NS", (), {"config": str(out), "checkpoint": None, "embedding_checkpoint": None,
                                         "model_name": None, "overrides": ["lm.batch_wait_timeout_s=0.02"]})())
    assert again.ingress.limits.max_images == 2 and again.lm.max_batch_size == 8 and again.lm.batch_wait_timeout_s == 0.02
    assert again.deployments == {"LanguageModel": {"num_replicas": 2}}
    assert serve_config(again)["applications"][0]["args"]["checkpoint"] == str(checkpoints["vlm"])
    # a deployment the app does not have is named, not silently dropped by Serve
    with pytest.raises(ValueError, match="Embeder"):
        serve_config(AppArgs.model_validate({**again.model_dump(), "deployments": {"Embeder": {"num_replicas": 2}}}))


def test_a_serve_yaml_read_by_vlm_serve_keeps_its_deployments(tmp_path):
    """`vlm serve --config base.yaml` runs what `serve deploy base.yaml` would: the
    deployments' user_config and settings, not only the application's args."""
    args = load_args(INFRA / "base.yaml")
    raw = yaml.safe_load((INFRA / "base.yaml").read_text())["applications"][0]
    deps = {d["name"]: d for d in raw["deployments"]}
    assert args.ingress.api_keys_env == deps["Ingress"]["user_config"]["api_keys_env"]
    assert args.ingress.request_timeout_s == deps["Ingress"]["user_config"]["request_timeout_s"]
    assert args.lm.max_batch_size == deps["LanguageModel"]["user_config"]["max_batch_size"]
    assert args.deployments["LanguageModel"]["autoscaling_config"] == deps["LanguageModel"]["autoscaling_config"]
    assert "user_config" not in args.deployments["Ingress"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{**raw, "deployments": [{"name": "Embedder", "user_config": {"x": 1}}]}]}))
    with pytest.raises(ValueError, match="'Embedder' takes no user_config"):
        load_args(bad)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "checkpoint.json" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "ingress.limits.max_imagez=3"]) == 2
    assert "max_imagez" in capsys.readouterr().err


def test_a_local_ray_for_vlm_serve_has_a_cpu_for_every_starting_replica(checkpoints):
    """`vlm serve` without --address starts its own Ray: with the machine's CPU count alone, a
    2-core machine could not schedule the default app (3 logical CPUs) and waited forever."""
    from serve.app import app_cpus
    from serve.cli import local_cpus

    both = AppArgs(checkpoint=str(checkpoints["vlm"]), embedding_checkpoint=str(checkpoints["clip"]))
    assert app_cpus(both) == 0.5 + 1 + 1 + 0.5  # ingress, image encoder, language model, embedder
    assert local_cpus(both) >= 4
    more = AppArgs.model_validate({**both.model_dump(), "deployments": {
        "LanguageModel": {"num_replicas": 2},
        "ImageEncoder": {"autoscaling_config": {"min_replicas": 1, "initial_replicas": 3, "max_replicas": 4}},
        "Ingress": {"ray_actor_options": {"num_cpus": 2}}}})
    assert app_cpus(more) == 2 + 3 * 1 + 2 * 1 + 0.5
    assert local_cpus(more) >= 9
    assert app_cpus(AppArgs(checkpoint=str(checkpoints["clip"]))) == 0.5 + 0.5  # embeddings only


def test_model_ids_default_to_the_run_of_a_final_export(checkpoints, tmp_path):
    """`--checkpoint runs/s2/final --embedding-checkpoint runs/s1/final` serves `s2` and `s1`,
    not two models both called `final`."""
    import shutil

    for run, ck in (("s2", "vlm"), ("s1", "clip")):
        shutil.copytree(checkpoints[ck], tmp_path / run / "final")
    args = AppArgs(checkpoint=str(tmp_path / "s2" / "final"), embedding_checkpoint=str(tmp_path / "s1" / "final"))
    assert args.names() == ("s2", "s1")
    assert AppArgs(checkpoint=str(checkpoints["vlm"]), model_name="m").names() == ("m", None)
    assert AppArgs(checkpoint=str(checkpoints["clip"])).names() == (None, "tiny-clip")
