"""Why does a stage-2 model miss? Probe a trained checkpoint on the world's held-out split.

    python benchmarks/probe_stage2.py RUN/stage2 [--attention-questions 60]

Prints, for a stage-2 checkpoint trained with the grounding loss (``llava.ground_loss_weight``):
- how well the image tokens name each cell's shape and colour (the grounding head, held-out);
- for colour and shape questions, whether each wrong answer names an attribute that is in the
  image (the decoder read the wrong token) or one that is not (it read nothing);
- for presence questions, the "yes" rate by answer and by the image's shape count;
- at the answer position, per decoder layer and head: the attention weight on the image tokens,
  the share of it on the top token, and how often that token is the cell of the shape the
  question names (colour questions);
- the norms of the image tokens and of the word embeddings.
These are the figures behind "Where stage 2 fails" in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.local import answer_questions  # noqa: E402
from vlm import world  # noqa: E402
from vlm.chat import encode_chat  # noqa: E402
from vlm.checkpoint import load_checkpoint  # noqa: E402
from vlm.data import answer_of, prompt_of, world_pairs, world_sft  # noqa: E402
from vlm.image import normalize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a stage-2 checkpoint directory (e.g. RUN/stage2 of `vlm demo` or benchmarks/learn.py)")
    ap.add_argument("--attention-questions", type=int, default=60, help="colour questions to read attention on (default 60)")
    args = ap.parse_args()

    loaded = load_checkpoint(args.checkpoint)
    cfg, model, tok = loaded.config, loaded.model.eval(), loaded.tokenizer
    if not hasattr(model, "ground_ids"):
        raise SystemExit(f"{args.checkpoint}: expected a stage-2 model trained with llava.ground_loss_weight > 0")
    size, kind = cfg.model.vision.image_size, cfg.model.vision.kind
    held = world.generate_split(cfg.data, "heldout")
    pixels, _, _ = world_pairs(cfg.data, "heldout", size=size, items=held)
    examples = world_sft(cfg.data, "heldout", size=size, pixels=pixels, items=held)
    scenes = {s.id: s.scene for s in held.samples}

    colour_qs = [e for e in examples if e.task == "colour"]
    with torch.no_grad():
        feats = model.image_features(normalize(np.stack([e.images[0] for e in colour_qs]), kind=kind))
        kind_logits, colour_logits = model.ground_logits(feats)
        words = model.decoder.get_input_embeddings().weight
        print(f"image tokens: norm {float(feats.norm(dim=-1).mean()):.2f} (mean); word embeddings {float(words.norm(dim=-1).mean()):.2f}")
    labels = torch.as_tensor(np.stack([e.cell_labels[0] for e in colour_qs]))  # (N, 2, 9)
    for name, logits, lab in (("shape", kind_logits, labels[:, 0]), ("colour", colour_logits, labels[:, 1])):
        pred, occupied = logits.argmax(-1), lab > 0
        print(f"grounding, {len(colour_qs)} held-out images: {name} of all cells {float((pred == lab).float().mean()):.3f}, "
              f"of occupied cells {float((pred[occupied] == lab[occupied]).float().mean()):.3f}")

    for task, attr in (("colour", "colour"), ("shape", "kind"), ("presence", None)):
        sub = [e for e in examples if e.task == task]
        preds = answer_questions(model, sub, tok)
        counts: Counter = Counter()
        for ex, pred in zip(sub, preds):
            scene, ref = scenes[ex.id.split("/")[0]], answer_of(ex)
            if attr is not None:
                present = {getattr(s, attr) for s in scene.shapes}
                counts["right" if pred == ref else ("wrong, in the image" if pred in present else "wrong, not in the image")] += 1
            else:
                counts[(ref, scene.count, pred == "yes")] += 1
        if attr is not None:
            print(f"{task} questions ({len(sub)}): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        else:
            for ref in ("yes", "no"):
                cells = [f"{n} shapes {counts[(ref, n, True)]}/{counts[(ref, n, True)] + counts[(ref, n, False)]}" for n in range(1, cfg.data.max_shapes + 1)]
                print(f"presence, answer {ref}: said yes on " + ", ".join(cells))

    model.decoder.config._attn_implementation = "eager"  # attention weights
    image_id = tok.convert_tokens_to_ids("<image>")
    stats: dict = defaultdict(list)
    for ex in colour_qs[: args.attention_questions]:
        enc = encode_chat(prompt_of(ex), tok, num_image_tokens=cfg.model.image_tokens, add_generation_prompt=True, system_prompt=cfg.model.llava.system_prompt)
        ids = torch.tensor([enc.input_ids])
        shape_word = ex.messages[0]["content"][-1]["text"].rstrip("?").split()[-1]
        target = next(i for i, v in enumerate(ex.cell_labels[0][0]) if v == 1 + world.SHAPES.index(shape_word))
        with torch.no_grad():
            out = model.decoder(inputs_embeds=model.embed_inputs(ids, pixel_values=normalize(np.stack(ex.images), kind=kind)), output_attentions=True)
        slots = (ids[0] == image_id).nonzero().flatten()
        for layer, att in enumerate(out.attentions):
            for head in range(att.shape[1]):
                w = att[0, head, -1, slots]  # the answer position's weights on the 9 image tokens
                stats[(layer, head)].append((float(w.sum()), float(w.max() / w.sum()), int(w.argmax()) == target))
    print(f"attention at the answer position, {min(len(colour_qs), args.attention_questions)} colour questions:")
    for (layer, head), rows in sorted(stats.items()):
        mass, peak, hit = np.asarray(rows, dtype=float).mean(0)
        print(f"  layer {layer} head {head}: on image tokens {mass:.2f}, top token's share {peak:.2f}, top token is the named shape's cell {hit:.2f}")


if __name__ == "__main__":
    main()
