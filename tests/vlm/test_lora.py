"""LoRA adapters on the stage-2 decoder (``model.llava.lora_*``, ``vlm.lora``): a model with
adapters starts as its plain twin, trains only its adapters (and what else is not frozen), saves
and loads with them, and merges into a plain model with the same outputs; its FLOP count leaves
out the frozen weights' gradients."""

from __future__ import annotations

import pytest
import tinymodels
import torch
from torch import nn

from vlm.chat import collate, encode_chat
from vlm.config import ConfigError

LORA = ["model.llava.lora_rank=4", "model.llava.lora_alpha=8"]


@pytest.fixture(scope="module")
def tok():
    return tinymodels.tokenizer()


def _batch(tok, cfg):
    msgs = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]},
         {"role": "assistant", "content": "red"}],
        [{"role": "user", "content": "how many shapes?"}, {"role": "assistant", "content": "a red square above a blue circle."}],
    ]
    batch = collate([encode_chat(m, tok, num_image_tokens=cfg.model.image_tokens) for m in msgs], pad_id=tok.pad_token_id)
    size = cfg.model.vision.image_size
    batch["pixel_values"] = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return batch


def _train(model, batch, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, return_logits=False).loss.backward()
        opt.step()
    return model.eval()


def test_adapters_start_at_the_plain_decoder_and_alone_train_in_it(tok):
    from vlm.lora import LoRALinear

    plain = tinymodels.vlm_model(tok)
    lora = tinymodels.vlm_model(tok, *LORA)
    batch = _batch(tok, tinymodels.config())
    adapted = [n for n, m in lora.decoder.named_modules() if isinstance(m, LoRALinear)]
    linear = [n for n, m in plain.decoder.named_modules() if isinstance(m, nn.Linear) and m is not plain.decoder.get_output_embeddings()]
    assert adapted == linear and len(adapted) == 7 * 2  # q, k, v, o, gate, up, down in each of the 2 layers
    # built from the same seed, the adapters (B = 0) add nothing: the plain model's weights and logits
    missing, unexpected = lora.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.endswith((".lora.A", ".lora.B")) for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(lora(**batch).logits, plain(**batch).logits)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("decoder.")} == {n for n in missing}
    assert any(n.startswith("projector.") for n in trainable)  # the other parts follow their own flags
    assert any(n.startswith("vision.") for n in trainable) == (not lora.cfg.llava.freeze_vision)
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    _train(lora, batch)
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable and any(n.endswith(".lora.B") for n in changed) and any(n.startswith("projector.") for n in changed)
    # freeze_decoder freezes the adapters too
    frozen = tinymodels.vlm_model(tok, *LORA, "model.llava.freeze_decoder=true")
    assert not any(p.requires_grad for p in frozen.decoder.parameters())


def test_merging_gives_a_plain_model_with_the_same_outputs_that_saves_and_exports(tok, tmp_path):
    from vlm.checkpoint import load_checkpoint, save_checkpoint
    from vlm.export import export_llava_hf, to_hf_llava
    from vlm.lora import LoRALinear, merge_lora

    cfg = tinymodels.config(*LORA)
    model = _train(tinymodels.vlm_model(tok, *LORA), _batch(tok, cfg))
    batch = _batch(tok, cfg)
    with torch.no_grad():
        adapted = model(**batch).logits
    # an unmerged model saves and loads with its adapters (a run's own checkpoint)
    save_checkpoint(model, tmp_path / "unmerged", config=cfg, tokenizer=tok)
    loaded = load_checkpoint(tmp_path / "unmerged").model
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, adapted)
    # the Hugging Face export wants the adapters merged first
    with pytest.raises(ValueError, match="merge"):
        to_hf_llava(model)
    assert merge_lora(model) == 14 and merge_lora(model) == 0
    assert not any(isinstance(m, LoRALinear) or hasattr(m, "lora") for m in model.modules())
    assert model.cfg.llava.lora_rank == 0 and not any(k.endswith((".lora.A", ".lora.B")) for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, adapted, atol=1e-5, rtol=1e-4)
    merged_cfg = type(cfg)(**{**cfg.__dict__, "model": model.cfg})
    save_checkpoint(model, tmp_path / "merged", config=merged_cfg, tokenizer=tok)
    again = load_checkpoint(tmp_path / "merged")
    assert again.config.model.llava.lora_rank == 0
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, adapted, atol=1e-5, rtol=1e-4)
    export_llava_hf(model, tok, tmp_path / "hf")  # verifies the logits against ours before writing


def test_targets_choose_the_layers_and_a_wrong_name_says_which_exist(tok):
    from vlm.lora import LoRALinear

    model = tinymodels.vlm_model(tok, *LORA, "model.llava.lora_targets=[q_proj,v_proj]")
    adapted = sorted({n.rsplit(".", 1)[-1] for n, m in model.decoder.named_modules() if isinstance(m, LoRALinear)})
    assert adapted == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"named \['qkv'\]; its layers are named \[.*'q_proj'"):
        tinymodels.vlm_model(tok, *LORA, "model.llava.lora_targets=[qkv]")


@pytest.mark.parametrize("override, message", [
    ("model.llava.lora_rank=-1", "lora_rank: expected an integer >= 0"),
    ("model.llava.lora_alpha=0", "lora_alpha: expected a number > 0"),
    ("model.llava.lora_dropout=1", r"lora_dropout: expected a number in \[0, 1\)"),
])
def test_bad_lora_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        tinymodels.config(override)


def test_the_flop_count_leaves_out_the_frozen_weights_gradients(tok):
    from jobs.metrics import matmul_params, output_projection_params, sft_flops

    full = tinymodels.vlm_model(tok)
    lora = tinymodels.vlm_model(tok, *LORA)
    total, trained = matmul_params(lora.decoder)
    adapters = sum(p.numel() for n, p in lora.decoder.named_parameters() if ".lora." in n)
    assert trained == adapters and total == matmul_params(full.decoder)[0] + adapters
    head = output_projection_params(lora.decoder)
    kw = dict(seq_tokens=100, images_per_sample=1.0, supervised_tokens=10)
    # the same as the full run but: every frozen product (the head on its 10 rows too) loses its
    # weight gradient, and the adapters add theirs (6 N T)
    frozen_body = matmul_params(full.decoder)[0] - head
    expected = sft_flops(full, **kw) - 2 * frozen_body * 100 - 2 * head * 10 + 6 * adapters * 100
    assert sft_flops(lora, **kw) == pytest.approx(expected)


def test_the_states_benchmark_counts_the_adapters_against_full_training(tmp_path):
    """``benchmarks/lora_states.py``: full training is its baseline row; a rank-r row trains r x
    (in + out) parameters per adapted layer of the decoder and freezes the rest of it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from vlm.config import load_config
    from vlm.llava import VisionLanguageModel

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "lora_states.py"), "--preset", "tiny", "--ranks", "4,8",
                           "--targets", "q_proj,down_proj", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    full, r4, r8 = json.loads(out.read_text())
    cfg = load_config(preset="tiny")
    vocab = cfg.model.tokenizer.vocab_size + 8
    with torch.device("meta"):
        plain = VisionLanguageModel(cfg.model, vocab_size=vocab, pad_token_id=0, eos_token_id=1, image_token_id=vocab - 1)
    layers = [m for n, m in plain.decoder.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "down_proj")]
    assert layers and full["trained_decoder"] == sum(p.numel() for p in plain.decoder.parameters())
    for row, r in ((r4, 4), (r8, 8)):
        assert row["trained_decoder"] == r * sum(m.in_features + m.out_features for m in layers)
        assert row["trained"] - row["trained_decoder"] == full["trained"] - full["trained_decoder"]  # projector, vision: as they were
        assert row["states_autocast_gib"] < full["states_autocast_gib"]
    assert "| tiny | 0 (full) |" in done.stdout and "| tiny | 8 |" in done.stdout
