"""Contrastive losses: the textbook formula, and the simulated 2-rank gather."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlm.losses import clip_loss, lm_loss, siglip_loss


def _feats(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def textbook_clip(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    """InfoNCE written out with explicit sums, both directions averaged."""
    n = img.shape[0]
    sim = (img @ txt.T * scale).tolist()
    i2t = -sum(sim[i][i] - math.log(sum(math.exp(s) for s in sim[i])) for i in range(n)) / n
    cols = [[sim[i][j] for i in range(n)] for j in range(n)]
    t2i = -sum(cols[j][j] - math.log(sum(math.exp(s) for s in cols[j])) for j in range(n)) / n
    return (i2t + t2i) / 2


def textbook_siglip(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> float:
    n = img.shape[0]
    sim = (img @ txt.T).tolist()
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-z * (scale * sim[i][j] + bias)))
    return total / n


def test_clip_loss_matches_textbook_formula():
    img, txt = _feats(6, 8, 0)
    out = clip_loss(img.double(), txt.double(), torch.tensor(7.5, dtype=torch.float64))
    assert out["loss"].item() == pytest.approx(textbook_clip(img.double(), txt.double(), 7.5), rel=1e-9)


def test_clip_loss_is_low_for_matching_pairs():
    img, _ = _feats(8, 16, 1)
    good = clip_loss(img, img.clone(), torch.tensor(50.0))["loss"]
    _, txt = _feats(8, 16, 2)
    bad = clip_loss(img, txt, torch.tensor(50.0))["loss"]
    assert good < 0.01 < bad


def test_siglip_loss_matches_textbook_formula():
    img, txt = _feats(5, 8, 3)
    out = siglip_loss(img.double(), txt.double(), torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64))
    assert out["loss"].item() == pytest.approx(textbook_siglip(img.double(), txt.double(), 10.0, -3.0), rel=1e-9)


def _two_rank_grads(loss_name: str, *, with_grad: bool, local_loss: bool):
    """Each simulated rank holds half the batch; a gather hands it both halves."""
    img, txt = _feats(8, 16, 4)
    scale = torch.tensor(12.0)
    bias = torch.tensor(-2.0)
    # single process on the concatenated batch
    img_s, txt_s = img.clone().requires_grad_(), txt.clone().requires_grad_()
    if loss_name == "clip":
        ref = clip_loss(img_s, txt_s, scale)["loss"]
    else:
        ref = siglip_loss(img_s, txt_s, scale, bias)["loss"]
    ref.backward()
    # two ranks: leaf tensors per rank, as each rank's encoder output
    halves_i = [img[:4].clone().requires_grad_(), img[4:].clone().requires_grad_()]
    halves_t = [txt[:4].clone().requires_grad_(), txt[4:].clone().requires_grad_()]
    losses = []
    for rank in range(2):
        def gather(x: torch.Tensor, rank: int = rank) -> list[torch.Tensor]:
            src = halves_i if any(x is h for h in halves_i) else halves_t
            return [h if (with_grad or r == rank) else h.detach() for r, h in enumerate(src)]

        kw = dict(rank=rank, world_size=2, gather=gather)
        if loss_name == "clip":
            losses.append(clip_loss(halves_i[rank], halves_t[rank], scale, local_loss=local_loss, **kw)["loss"])
        else:
            losses.append(siglip_loss(halves_i[rank], halves_t[rank], scale, bias, **kw)["loss"])
    return ref, img_s.grad, txt_s.grad, losses, halves_i, halves_t


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_two_rank_local_loss_with_grad_equals_single_process(loss_name):
    ref, gi, gt, losses, hi, ht = _two_rank_grads(loss_name, with_grad=True, local_loss=True)
    mean = (losses[0] + losses[1]) / 2  # what gradient averaging across ranks computes
    assert torch.allclose(mean, ref, atol=1e-6)
    mean.backward()
    assert torch.allclose(torch.cat([h.grad for h in hi]), gi, atol=1e-6)
    assert torch.allclose(torch.cat([h.grad for h in ht]), gt, atol=1e-6)


def test_two_rank_full_loss_without_grad_gives_each_rank_its_true_gradient():
    ref, gi, gt, losses, hi, ht = _two_rank_grads("clip", with_grad=False, local_loss=False)
    for rank in range(2):
        assert torch.allclose(losses[rank], ref, atol=1e-6)  # every rank computes the full loss
        losses[rank].backward()
    # rank r's local slice gets exactly the single-process gradient of that slice
    assert torch.allclose(hi[0].grad, gi[:4], atol=1e-6) and torch.allclose(hi[1].grad, gi[4:], atol=1e-6)
    assert torch.allclose(ht[0].grad, gt[:4], atol=1e-6) and torch.allclose(ht[1].grad, gt[4:], atol=1e-6)


def test_local_loss_without_grad_gather_misses_cross_rank_gradient():
    """Guards the test itself: without a gradient-carrying gather the local loss is not exact."""
    ref, gi, _, losses, hi, _ = _two_rank_grads("clip", with_grad=False, local_loss=True)
    ((losses[0] + losses[1]) / 2).backward()
    assert not torch.allclose(torch.cat([h.grad for h in hi]), gi, atol=1e-6)


def test_gather_with_wrong_world_size_is_an_error():
    img, txt = _feats(4, 8, 5)
    with pytest.raises(ValueError, match="world_size=3"):
        clip_loss(img, txt, torch.tensor(1.0), rank=0, world_size=3, gather=lambda x: [x, x])


def test_lm_loss_token_average_is_the_causal_lm_loss_and_turn_average_weighs_turns_equally():
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 40, (2, 12), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 3:4] = ids[0, 3:4]  # a one-token answer
    labels[0, 6:11] = ids[0, 6:11]  # a five-token answer
    labels[1, 8:10] = ids[1, 8:10]  # a two-token answer
    out = lm(input_ids=ids, labels=labels)
    assert torch.allclose(lm_loss(out.logits, labels, average="token"), out.loss, atol=1e-6)
    # by hand: the per-token losses, each turn's mean, then the mean over the three turns
    logp = out.logits.detach().log_softmax(-1)
    tok = lambda b, t: -float(logp[b, t - 1, ids[b, t]])  # noqa: E731
    turns = [[tok(0, 3)], [tok(0, t) for t in range(6, 11)], [tok(1, 8), tok(1, 9)]]
    expected = sum(sum(t) / len(t) for t in turns) / 3
    assert math.isclose(float(lm_loss(out.logits, labels, average="turn")), expected, rel_tol=1e-5)
    with pytest.raises(ValueError, match="average"):
        lm_loss(out.logits, labels, average="sample")
    with pytest.raises(ValueError, match="supervised"):
        lm_loss(out.logits, torch.full_like(labels, -100))


def textbook_clip_with_negatives(img: torch.Tensor, txt: torch.Tensor, neg: torch.Tensor, scale: float) -> float:
    """NegCLIP: image i is scored against every text and every hard negative; texts against images only."""
    n = img.shape[0]
    sim = (img @ txt.T * scale).tolist()
    nsim = (img @ neg.T * scale).tolist()
    i2t = -sum(sim[i][i] - math.log(sum(math.exp(s) for s in sim[i] + nsim[i])) for i in range(n)) / n
    cols = [[sim[i][j] for i in range(n)] for j in range(n)]
    t2i = -sum(cols[j][j] - math.log(sum(math.exp(s) for s in cols[j])) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_clip_loss_with_hard_negatives_matches_textbook_formula_and_only_raises_image_to_text():
    img, txt = _feats(6, 8, 6)
    _, neg = _feats(12, 8, 7)  # two negatives per image
    scale = torch.tensor(7.5, dtype=torch.float64)
    plain = clip_loss(img.double(), txt.double(), scale)
    out = clip_loss(img.double(), txt.double(), scale, negative_text_features=neg.double())
    assert out["loss"].item() == pytest.approx(textbook_clip_with_negatives(img.double(), txt.double(), neg.double(), 7.5), rel=1e-9)
    assert out["loss_t2i"].item() == pytest.approx(plain["loss_t2i"].item(), rel=1e-12)
    assert out["loss_i2t"].item() > plain["loss_i2t"].item()
    with pytest.raises(ValueError, match="width 8"):
        clip_loss(img, txt, torch.tensor(1.0), negative_text_features=torch.zeros(6, 4))


def test_two_rank_loss_with_hard_negatives_equals_single_process():
    img, txt = _feats(8, 16, 8)
    _, neg = _feats(8, 16, 9)  # one negative per image
    scale = torch.tensor(12.0)
    leaves = [x.clone().requires_grad_() for x in (img, txt, neg)]
    ref = clip_loss(leaves[0], leaves[1], scale, negative_text_features=leaves[2])["loss"]
    ref.backward()
    halves = [[x[:4].clone().requires_grad_(), x[4:].clone().requires_grad_()] for x in (img, txt, neg)]
    losses = []
    for rank in range(2):
        def gather(x: torch.Tensor) -> list[torch.Tensor]:
            return next(h for h in halves if any(x is p for p in h))

        hi, ht, hn = (h[rank] for h in halves)
        losses.append(clip_loss(hi, ht, scale, rank=rank, world_size=2, gather=gather, negative_text_features=hn)["loss"])
    mean = (losses[0] + losses[1]) / 2
    assert torch.allclose(mean, ref, atol=1e-6)
    mean.backward()
    for h, leaf in zip(halves, leaves):
        assert torch.allclose(torch.cat([p.grad for p in h]), leaf.grad, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_linear_cross_entropy_equals_projecting_then_cross_entropy_in_loss_and_gradients(chunk_rows):
    from vlm.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(40, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (10,), generator=g)
    rw = torch.rand(10, generator=g)
    ref = (F.cross_entropy(h @ w.T, t, reduction="none") * rw).sum()
    gh_ref, gw_ref = torch.autograd.grad(2.5 * ref, (h, w))
    got = linear_cross_entropy(h, w, t, rw, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad(2.5 * got, (h, w))  # an upstream factor reaches both gradients
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(gh, gh_ref, atol=1e-5) and torch.allclose(gw, gw_ref, atol=1e-5)
    # only the weight needs a gradient (a frozen input): still right, no h gradient made
    got_w = linear_cross_entropy(h.detach(), w, t, rw, chunk_rows=chunk_rows)
    assert torch.allclose(torch.autograd.grad(2.5 * got_w, w)[0], gw_ref, atol=1e-5)


def test_linear_cross_entropy_under_autocast_runs_its_products_in_bf16():
    from vlm.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(1)
    h = torch.randn(16, 32, generator=g, requires_grad=True)
    w = torch.randn(64, 32, generator=g, requires_grad=True)
    t = torch.randint(0, 64, (16,), generator=g)
    rw = torch.full((16,), 1 / 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = (F.cross_entropy((h @ w.T).float(), t, reduction="none") * rw).sum()
        got = linear_cross_entropy(h, w, t, rw, chunk_rows=5)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    gh, gw = torch.autograd.grad(got, (h, w))
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32  # back to the leaves' dtype
    assert torch.allclose(got, ref, rtol=1e-2)
    assert torch.allclose(gh, gh_ref, atol=2e-2) and torch.allclose(gw, gw_ref, atol=2e-2)
    # and bf16 matters: the exact fp32 loss differs from both by bf16 rounding, not more
    exact = (F.cross_entropy(h @ w.T, t, reduction="none") * rw).sum()
    assert abs(float(got) - float(exact)) < 0.05 * float(exact)


@pytest.mark.parametrize("average", ["token", "turn"])
@pytest.mark.parametrize("chunked", [False, True])
def test_ranks_losses_with_the_mean_count_as_normaliser_average_to_the_whole_batchs_loss(average, chunked):
    """A data-parallel step: each rank's loss is normalised by the mean over ranks of its
    supervised count (tokens or turns); the mean of the ranks' losses, and of their gradients,
    is then the single-process loss of the whole batch, for either average."""
    from vlm.losses import supervised_count, supervised_loss, supervised_turns

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 12, 8, generator=g, requires_grad=True)  # (B, L, D)
    head = torch.nn.Linear(8, 20, bias=False)
    labels = torch.full((4, 12), -100)
    labels[0, 2:3] = 1  # rank 0: one one-token turn and one five-token turn, then a three-token turn
    labels[0, 5:10] = 2
    labels[1, 4:7] = 3
    labels[2, 9:11] = 4  # rank 1: a two-token turn and an eight-token turn
    labels[3, 1:9] = 5
    assert supervised_turns(labels) == 5 and supervised_turns(labels[:2]) == 3
    loss_fn = lambda h, lab, **kw: supervised_loss(h, lab, head, average=average, chunked=chunked, **kw)  # noqa: E731
    whole = loss_fn(hidden, labels)
    (grad_whole,) = torch.autograd.grad(whole, hidden)
    ranks = [slice(0, 2), slice(2, 4)]  # rank 0 has 3 turns / 9 tokens, rank 1 2 turns / 10 tokens
    mean = sum(supervised_count(labels[r], average=average) for r in ranks) / len(ranks)
    per_rank = [loss_fn(hidden[r], labels[r], normaliser=mean) for r in ranks]
    assert torch.allclose(sum(per_rank) / len(ranks), whole, atol=1e-6)
    (grad_ranks,) = torch.autograd.grad(sum(per_rank) / len(ranks), hidden)
    assert torch.allclose(grad_ranks, grad_whole, atol=1e-7)
    # no supervised token on a rank: zero, with a graph
    empty = loss_fn(hidden[:1], torch.full((1, 12), -100), normaliser=mean)
    assert float(empty) == 0.0 and empty.requires_grad


def test_a_compiled_rows_loss_scores_any_number_of_rows_as_the_head_does():
    """``compile_rows_loss`` (what ``job.compile`` gives the stage-2 model) against the eager
    path through the head: the same loss and gradients (hidden states and the head's weight),
    in fp32 and under bf16 autocast, for batches with different counts of supervised rows
    (dynamic shapes: no error, no stale graph). AOT autograd's capture runs the compiled
    forward and backward graphs on the CPU without inductor's code generation."""
    from vlm.losses import compile_rows_loss, supervised_loss

    rows_loss = compile_rows_loss(backend="aot_eager")
    calls = []

    def counted(h, w, t, rw):
        calls.append(h.shape[0])
        return rows_loss(h, w, t, rw)

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    for bf16 in (False, True):
        for n_sup in (3, 11, 7):
            hidden = torch.randn(2, 12, 16, generator=g, requires_grad=True)
            labels = torch.full((2, 12), -100)
            scored = torch.arange(24).view(2, 12)[:, 1:].reshape(-1)  # a row's first label is never a target
            labels.view(-1)[scored[torch.randperm(22, generator=g)[:n_sup]]] = torch.randint(0, 50, (n_sup,), generator=g)
            got, want = [], []
            for fn, out in ((counted, got), (None, want)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = supervised_loss(hidden, labels, head, average="token", rows_loss=fn)
                out += [loss.detach(), *torch.autograd.grad(loss, [hidden, head.weight])]
            tol = dict(atol=1e-2, rtol=1e-2) if bf16 else dict(atol=1e-6, rtol=1e-5)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **tol)
    assert calls == [3, 11, 7] * 2
    # a caller's own compile options win (a static compile, say)
    static = compile_rows_loss(backend="aot_eager", dynamic=False)
    torch.testing.assert_close(static(torch.ones(2, 16), head.weight, torch.tensor([1, 2]), torch.ones(2)),
                               rows_loss(torch.ones(2, 16), head.weight, torch.tensor([1, 2]), torch.ones(2)))
    # a head it cannot take (a bias) goes through the head's own forward
    biased = torch.nn.Linear(16, 50)
    calls.clear()
    supervised_loss(hidden, labels, biased, average="token", rows_loss=counted)
    assert calls == []
