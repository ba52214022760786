"""Presets load, overrides are strict and typed, saved configs round-trip."""

from __future__ import annotations

import pytest

from vlm.config import Config, ConfigError, apply_overrides, list_presets, load_config, read_config, save_config


def test_every_preset_loads_and_names_itself():
    names = list_presets()
    assert {"tiny", "small", "base", "llava-7b"} <= set(names)
    for name in names:
        cfg = load_config(preset=name)
        assert cfg.name == name
        assert cfg.model.image_tokens > 0


def test_llava_7b_preset_has_llava_1_5_shapes():
    cfg = load_config(preset="llava-7b")
    assert cfg.model.image_tokens == 576  # (336 / 14)^2, CLS dropped
    assert cfg.model.decoder.hidden_size == 4096 and cfg.model.decoder.num_layers == 32


def test_overrides_are_typed():
    cfg = load_config(preset="tiny", overrides=["model.vision.num_layers=2", "stage1.lr=3e-4", "model.llava.freeze_vision=true", "stage1.betas=[0.9, 0.95]", "model.decoder.pretrained=/models/x"])
    assert cfg.model.vision.num_layers == 2
    assert cfg.stage1.lr == pytest.approx(3e-4)
    assert cfg.model.llava.freeze_vision is True
    assert cfg.stage1.betas == (0.9, 0.95)
    assert cfg.model.decoder.pretrained == "/models/x"
    assert apply_overrides(cfg, ["model.decoder.pretrained=null"]).model.decoder.pretrained is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.vision.num_layers=two", "expected an integer, got 'two'"),
        ("model.vision.num_layer=2", "unknown key 'model.vision.num_layer'"),
        ("model.llava.freeze_vision=yes please", "expected true or false"),
        ("model.llava.freeze_vision=1", "expected true or false, got 1"),
        ("stage1.lr=fast", "expected a number"),
        ("model.vision=3", "expected a mapping"),
        ("nonsense", "key.sub=value"),
        ("model.vision.kind=vit", "expected 'clip' or 'siglip'"),
        ("model.vision.image_size=65", "multiple of"),
    ],
)
def test_bad_overrides_say_what_was_expected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset="tiny", overrides=[override])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(preset="huge")


def test_file_on_top_of_preset_and_round_trip(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("# vlm demo --config exp.yaml\npreset: tiny\nstage2: {steps: 7}\nmodel: {decoder: {num_layers: 1}}\n")
    cfg = load_config(path=f)
    assert cfg.name == "tiny" and cfg.stage2.steps == 7 and cfg.model.decoder.num_layers == 1
    assert cfg.model.vision.hidden_size == load_config(preset="tiny").model.vision.hidden_size
    save_config(cfg, tmp_path / "resolved.yaml")
    assert read_config(tmp_path / "resolved.yaml") == cfg


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("preset: tiny\nstage1: {stepz: 7}\n")
    with pytest.raises(ConfigError, match="unknown key 'stage1.stepz'"):
        load_config(path=f)


def test_derived_image_tokens_follow_overrides():
    cfg = load_config(preset="tiny", overrides=["model.projector.pixel_shuffle=2"])
    assert cfg.model.image_tokens == load_config(preset="tiny").model.image_tokens // 4
    assert Config().model.image_tokens == 64


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.contrastive.hard_negatives=-1", "hard_negatives: expected an integer >= 0"),
        ("model.contrastive.hard_negative_kinds=[colour]", "expected a non-empty list from"),
        ("model.contrastive.cell_loss_weight=-0.5", "cell_loss_weight: expected a number >= 0"),
    ],
)
def test_stage1_scene_target_options_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset="tiny", overrides=[override])
    with pytest.raises(ConfigError, match="supported with loss 'clip'"):
        load_config(preset="tiny", overrides=["model.contrastive.hard_negatives=1", "model.contrastive.loss=siglip"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.projector.pixel_shuffle=0"], "projector.pixel_shuffle: expected an integer >= 1, got 0"),
        (["model.llava.vision_feature_layer=-6"], "llava.vision_feature_layer: .* from -5 to 4, got -6"),
        (["model.llava.vision_feature_layer=5"], "llava.vision_feature_layer: .* got 5"),
        (["model.llava.max_length=4096", "model.decoder.max_position=1024"], r"llava.max_length: expected at most decoder.max_position \(1024\), got 4096"),
        (["model.contrastive.gather_with_grad=false"], "contrastive.gather_with_grad: expected true with contrastive.local_loss=true"),
        (["model.decoder.num_kv_heads=3"], "decoder.num_kv_heads / decoder.num_heads: .* got 3 / 4 heads"),
    ],
)
def test_model_sizes_that_cannot_work_are_config_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset="tiny", overrides=["model.vision.num_layers=4", *overrides])


def test_checks_that_need_a_pretrained_towers_own_sizes_wait_for_the_build():
    cfg = load_config(preset="tiny", overrides=[
        "model.vision.pretrained=/models/vit", "model.llava.vision_feature_layer=-30",
        "model.decoder.pretrained=/models/lm", "model.llava.max_length=100000",
    ])  # fmt: skip
    assert cfg.model.llava.vision_feature_layer == -30
    assert load_config(preset="tiny", overrides=["model.llava.vision_feature_layer=0", "model.llava.vision_feature_layer=-5"]).model.llava.vision_feature_layer == -5
    both = ["model.contrastive.gather_with_grad=false", "model.contrastive.local_loss=false"]
    assert load_config(preset="tiny", overrides=both).model.contrastive.gather_with_grad is False
