"""`vlm ask`: in-process answers from a tiny random stage-2 checkpoint, checked against
``vlm.generation.generate`` on prompts built here from the chat format (greedy decoding: the
same prompt and pixels must give the same answer)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tinymodels
from jobs import ask

SYSTEM = "You look at pictures and answer briefly."
SIZE = 32  # tinymodels' image size
MAX_TOKENS = 6
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A stage-2 checkpoint trained (so its config says) with ``SYSTEM``, a stage-1 one, and media."""
    from pipelines.world import encode_mp4, video_codec
    from vlm.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("ask")
    tok = tinymodels.tokenizer()
    cfg = tinymodels.config(f"model.llava.system_prompt={SYSTEM}")
    save_checkpoint(tinymodels.vlm_model(tok), root / "vlm", config=cfg, tokenizer=tok)
    save_checkpoint(tinymodels.clip_model(tok), root / "clip", config=cfg, tokenizer=tok)
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(6)]
    frames[0].save(root / "a.png")
    frames[1].save(root / "b.jpg", quality=95)
    encode_mp4(frames, root / "clip.mp4", codec=video_codec(), fps=4)
    png = (root / "a.png").read_bytes()
    (root / "corrupt.png").write_bytes(png[: len(png) // 2])
    (root / "notes.txt").write_text("not an image at all\n" * 20)
    (root / "run").mkdir()
    (root / "run" / "final").symlink_to(root / "vlm")
    return root


@pytest.fixture(scope="module")
def model(root):
    from vlm.checkpoint import load_checkpoint

    return load_checkpoint(root / "vlm")


def run(capsys, *args: object, stdin: str | None = None, interactive: bool | None = None) -> tuple[int, list[str], str]:
    """``vlm ask`` in-process: (exit code, what it printed as answers, its stderr)."""
    out: list[str] = []
    argv = ["--device", "cpu", "--max-tokens", str(MAX_TOKENS), *map(str, args)]
    rc = ask.main(argv, log=out.append, stdin=None if stdin is None else io.StringIO(stdin), interactive=interactive)
    return rc, out, capsys.readouterr().err


def pixels_of(*paths: Path) -> np.ndarray:
    """(N, S, S, 3): each file as Pillow reads it, squashed to the model's size."""
    from vlm.image import to_uint8

    return to_uint8([Image.open(p) for p in paths], SIZE)


def reference(model, messages: list[dict], pixels: np.ndarray | None, *, system: str | None = SYSTEM, **knobs):
    """The encoded prompt and ``generate``'s greedy result for it."""
    from vlm.chat import encode_chat
    from vlm.generation import GenerationConfig, generate
    from vlm.image import normalize

    enc = encode_chat(messages, model.tokenizer, num_image_tokens=model.model.tokens_per_image,
                      add_generation_prompt=True, system_prompt=system)
    images = None if pixels is None else [normalize(pixels, kind=model.config.model.vision.kind)]
    res = generate(model.model, input_ids=[enc.input_ids], tokenizer=model.tokenizer, images=images,
                   config=GenerationConfig(max_new_tokens=MAX_TOKENS, temperature=0.0, **knobs))[0]
    return enc, res


def user(*parts: dict, text: str) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


IMAGE = {"type": "image"}


def prompts(err: str) -> list[str]:
    """The prompts ``--debug`` printed (each starts with its system turn)."""
    return ["<|im_start|>system\n" + p for p in err.split("<|im_start|>system\n")[1:]]


# ----------------------------------------------------------------------------- answers


def test_each_question_answered_as_generate_answers_its_prompt(capsys, root, model):
    questions = ["how many shapes?", "what colour is the circle?"]
    rc, out, err = run(capsys, root / "vlm", "--image", root / "a.png", "--image", root / "b.jpg", *questions, "--json")
    assert rc == 0, err
    got = [json.loads(line) for line in out]
    assert [g["question"] for g in got] == questions
    for g, q in zip(got, questions):
        enc, res = reference(model, [user(IMAGE, IMAGE, text=q)], pixels_of(root / "a.png", root / "b.jpg"))
        assert g["answer"] == res.text.strip() and g["answer"]
        assert (g["prompt_tokens"], g["completion_tokens"], g["finish_reason"]) == (
            len(enc.input_ids), res.num_generated_tokens, res.finish_reason)
        assert (g["images"], g["image_tokens"]) == (2, 2 * model.model.tokens_per_image)
        assert g["seconds"] >= 0
    rc, plain, _ = run(capsys, root / "vlm", "--image", root / "a.png", "--image", root / "b.jpg", *questions)
    assert rc == 0 and plain == [g["answer"] for g in got]  # without --json: the answers alone


def test_media_follow_the_command_line_order_video_frames_included(capsys, root, model):
    from serve.config import Limits
    from serve.media import decode_video

    rc, out, err = run(capsys, root / "vlm", "--video", root / "clip.mp4", "--image", root / "a.png", "--frames", 3,
                       "--json", "--debug", "what moves?")
    assert rc == 0, err
    got = json.loads(out[0])
    per = model.model.tokens_per_image
    assert (got["images"], got["image_tokens"]) == (4, 4 * per)
    assert "<|im_start|>user\n" + "<|frame|><image>" * 3 + "\n<image>\nwhat moves?<|im_end|>" in prompts(err)[0]
    frames = decode_video((root / "clip.mp4").read_bytes(), size=SIZE, limits=Limits(), where="v", num_frames=3)
    enc, res = reference(model, [user({"type": "video", "num_frames": 3}, IMAGE, text="what moves?")],
                         np.concatenate([frames, pixels_of(root / "a.png")]))
    assert enc.input_ids.count(model.model.image_token_id) == 4 * per
    assert (got["prompt_tokens"], got["answer"]) == (len(enc.input_ids), res.text.strip())


def test_video_frames_default_to_the_servers():
    from serve.config import Limits

    assert ask.build_parser().parse_args(["ckpt"]).frames == Limits().default_video_frames


def test_the_trained_system_prompt_unless_system_overrides_it(capsys, root, model):
    def asked(*flags: str) -> tuple[dict, str]:
        rc, out, err = run(capsys, root / "vlm", "--json", "--debug", *flags, "how many shapes?")
        assert rc == 0, err
        return json.loads(out[0]), err  # stderr holds the one prompt --debug printed

    trained, shown = asked()
    assert shown.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nhow many shapes?")
    mine, shown = asked("--system", "Answer in one word.")
    assert shown.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>") and SYSTEM not in shown
    none, shown = asked("--system", "")
    assert shown.startswith("<|im_start|>user\nhow many shapes?") and "system" not in shown
    for got, system in ((trained, SYSTEM), (mine, "Answer in one word."), (none, None)):
        enc, res = reference(model, [user(text="how many shapes?")], None, system=system)
        assert (got["prompt_tokens"], got["answer"]) == (len(enc.input_ids), res.text.strip())
    assert len({trained["prompt_tokens"], mine["prompt_tokens"], none["prompt_tokens"]}) == 3


# ----------------------------------------------------------------------------- errors


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_stage1_checkpoint_is_refused_with_the_commands_that_take_it(capsys, root):
    rc, out, err = run(capsys, root / "clip", "what is it?")
    line = one_line(err)
    assert rc == 2 and not out
    assert "stage-1 (contrastive)" in line and "vlm classify" in line and "vlm search" in line


def test_a_run_directory_or_no_checkpoint_is_named(capsys, root):
    rc, _, err = run(capsys, root / "run", "hi")
    assert rc == 2 and f"its model is in {root / 'run' / 'final'}" in one_line(err)
    rc, _, err = run(capsys, root / "nowhere", "hi")
    assert rc == 2 and "checkpoint.json" in one_line(err)


@pytest.mark.parametrize("breaks,expected", [
    ("model.safetensors", "cannot load the model (SafetensorError"),
    ("tokenizer", "expected config.yaml, model.safetensors and tokenizer/ in a checkpoint, tokenizer missing"),
    ("config.yaml", "expected config.yaml, model.safetensors and tokenizer/ in a checkpoint, config.yaml missing"),
])
def test_a_damaged_checkpoint_exits_2_saying_what_is_wrong(capsys, root, tmp_path, breaks, expected):
    import shutil

    damaged = shutil.copytree(root / "vlm", tmp_path / "damaged")
    if breaks == "model.safetensors":
        data = (damaged / breaks).read_bytes()
        (damaged / breaks).write_bytes(data[: len(data) // 3])
    else:
        shutil.rmtree(damaged / breaks) if (damaged / breaks).is_dir() else (damaged / breaks).unlink()
    rc, out, err = run(capsys, damaged, "hi")
    assert rc == 2 and not out and expected in one_line(err)


@pytest.mark.parametrize("flag,name,expected", [
    ("--image", "corrupt.png", "corrupt or truncated"),
    ("--image", "notes.txt", "not a decodable image"),
    ("--image", "missing.png", "no such file"),
    ("--image", ".", "a directory, not a file"),
    ("--video", "a.png", "not a decodable video"),
])
def test_unusable_media_exit_2_naming_the_file(capsys, root, flag, name, expected):
    rc, out, err = run(capsys, root / "vlm", flag, root / name, "what is it?")
    line = one_line(err)
    assert rc == 2 and not out
    assert line.startswith(f"vlm ask: {flag} {root / name}: ") and expected in line


@pytest.mark.parametrize("flags,expected", [
    (["--top-p", "0"], "argument --top-p: expected a number in (0, 1], got '0'"),
    (["--temperature", "-1"], "argument --temperature: expected a number >= 0, got '-1'"),
    (["--temperature", "nan"], "argument --temperature: expected a number >= 0, got 'nan'"),
    (["--max-tokens", "0"], "argument --max-tokens: expected an integer >= 1, got '0'"),
    (["--frames", "many"], "argument --frames: expected an integer >= 1, got 'many'"),
    (["--seed", "-3"], "argument --seed: expected an integer >= 0, got '-3'"),
    (["--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--image", "ftp://example.com/a.png"], "expected a local file or an http(s) URL, got a ftp:// URL"),
])
def test_bad_flag_values_exit_2_with_what_was_expected(capsys, root, flags, expected):
    rc, out, err = run(capsys, root / "vlm", *flags, "hi")
    assert rc == 2 and not out and "Traceback" not in err
    assert expected in err.strip().splitlines()[-1]


def test_a_prompt_over_the_context_says_its_token_counts_and_the_others_are_answered(capsys, root, model):
    from vlm.chat import encode_chat

    long = "describe the picture. " * 300
    enc = encode_chat([user(IMAGE, text=long)], model.tokenizer, num_image_tokens=16, add_generation_prompt=True,
                      system_prompt=SYSTEM)
    context = model.model.decoder.config.max_position_embeddings
    assert len(enc.input_ids) > max(context, model.tokenizer.model_max_length)  # no tokenizer warning either
    capsys.readouterr()
    rc, out, err = run(capsys, root / "vlm", "--image", root / "a.png", "--json", long, "how many shapes?")
    line = one_line(err)
    assert rc == 2
    assert f"the prompt has {len(enc.input_ids)} tokens (1 images/frames x 16 tokens included)" in line
    assert f"context of {context} tokens" in line
    failed, answered = map(json.loads, out)
    assert failed["question"] == long and failed["error"] in line and "answer" not in failed
    assert answered["question"] == "how many shapes?" and answered["answer"]


# ----------------------------------------------------------------------------- conversations


def test_a_conversation_keeps_its_history_until_reset(capsys, root, model):
    stdin = "how many shapes?\n\nwhat colour is the circle?\n/reset\ndescribe the picture.\n"
    rc, out, err = run(capsys, root / "vlm", "--image", root / "a.png", "--debug", stdin=stdin, interactive=True)
    assert rc == 0, err
    first, second, third = out
    shown = prompts(err)
    assert len(shown) == 3
    assert shown[0].count("<image>") == shown[1].count("<image>") == shown[2].count("<image>") == 1
    assert f"<image>\nhow many shapes?<|im_end|>\n<|im_start|>assistant\n{first}<|im_end|>\n" \
           "<|im_start|>user\nwhat colour is the circle?<|im_end|>" in shown[1]
    assert "how many shapes?" not in shown[2] and first not in shown[2]  # /reset forgot it; the image is back
    history = [user(IMAGE, text="how many shapes?"), {"role": "assistant", "content": first},
               {"role": "user", "content": "what colour is the circle?"}]
    assert second == reference(model, history, pixels_of(root / "a.png"))[1].text.strip()
    assert third == reference(model, [user(IMAGE, text="describe the picture.")], pixels_of(root / "a.png"))[1].text.strip()


def test_image_commands_report_bad_paths_and_the_loop_goes_on(capsys, root, model):
    stdin = (f"/image {root / 'missing.png'}\n/image {root / 'corrupt.png'}\n/image\n/bogus\n"
             f"/image {root / 'b.jpg'}\nwhich is brighter?\n/exit\nnever asked\n")
    rc, out, err = run(capsys, root / "vlm", "--image", root / "a.png", "--json", "--debug", stdin=stdin, interactive=True)
    assert rc == 0 and "Traceback" not in err
    assert f"vlm ask: /image {root / 'missing.png'}: no such file" in err
    assert f"vlm ask: /image {root / 'corrupt.png'}: the image is corrupt or truncated" in err
    assert "vlm ask: /image: expected a path or URL after it" in err
    assert "unknown command /bogus" in err
    (got,) = map(json.loads, out)  # /exit: the line after it is never asked
    assert got["question"] == "which is brighter?" and got["images"] == 2
    assert "<|im_start|>user\n<image>\n<image>\nwhich is brighter?" in prompts(err)[0]
    _, res = reference(model, [user(IMAGE, IMAGE, text="which is brighter?")], pixels_of(root / "a.png", root / "b.jpg"))
    assert got["answer"] == res.text.strip()


def test_piped_questions_are_answered_one_per_line_each_afresh(capsys, root):
    rc, out, err = run(capsys, root / "vlm", "--image", root / "a.png", "--debug",
                       stdin="how many shapes?\n\n  what colour is the circle?  \n")
    assert rc == 0, err
    assert len(prompts(err)) == 2 and all(p.count("<|im_start|>user") == 1 for p in prompts(err))
    rc, alone, _ = run(capsys, root / "vlm", "--image", root / "a.png", "how many shapes?", "what colour is the circle?")
    assert out == alone


def test_the_command_runs_without_ray(root):
    code = ("import sys; from jobs.ask import main; rc = main(sys.argv[1:]); "
            "assert not {'ray', 'deepspeed'} & {m.split('.')[0] for m in sys.modules}, 'ray or deepspeed imported'; "
            "sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(root / "vlm"), "--image", str(root / "a.png"), "--device", "cpu",
                           "--max-tokens", "2", "how many shapes?"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) >= 1


# ----------------------------------------------------------------------------- media


def test_images_are_upright_and_rgb_as_the_server_decodes_them(tmp_path):
    from vlm.image import to_uint8

    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: displayed rotated 90 degrees clockwise
    img.save(tmp_path / "turned.png", exif=exif)
    got = ask.load_media("image", str(tmp_path / "turned.png"), size=SIZE, frames=1, where="--image").pixels
    assert got.shape == (1, SIZE, SIZE, 3)
    assert np.array_equal(got, to_uint8([img.transpose(Image.Transpose.ROTATE_270)], SIZE))
    assert not np.array_equal(got, to_uint8([img], SIZE))
    img.convert("L").save(tmp_path / "grey.png")
    img.convert("RGBA").save(tmp_path / "alpha.webp", lossless=True)
    for name in ("grey.png", "alpha.webp"):
        px = ask.load_media("image", str(tmp_path / name), size=SIZE, frames=1, where="--image").pixels
        assert px.shape == (1, SIZE, SIZE, 3) and px.dtype == np.uint8


@pytest.fixture()
def server(root, tmp_path):
    from pipelines.local_server import LocalServer

    (tmp_path / "a.png").write_bytes((root / "a.png").read_bytes())
    with LocalServer(tmp_path, sample_image="a.png", stall_seconds=3) as s:
        yield s


def test_image_urls_are_fetched_with_a_timeout_and_a_size_limit(capsys, root, server, monkeypatch):
    rc, by_url, err = run(capsys, root / "vlm", "--image", f"{server.url}/a.png", "how many shapes?")
    assert rc == 0, err
    rc, by_file, _ = run(capsys, root / "vlm", "--image", root / "a.png", "how many shapes?")
    assert by_url == by_file and server.hits["/a.png"] == 1
    rc, _, err = run(capsys, root / "vlm", "--image", f"{server.url}/hostile/redirect", "how many shapes?")
    assert rc == 0, err
    rc, _, err = run(capsys, root / "vlm", "--image", f"{server.url}/hostile/404", "hi")
    assert rc == 2 and "returned HTTP 404" in one_line(err)
    monkeypatch.setattr(ask, "URL_MAX_BYTES", 100_000)
    rc, _, err = run(capsys, root / "vlm", "--image", f"{server.url}/hostile/oversized", "hi")
    assert rc == 2 and "over the limit of 100000" in one_line(err)
    monkeypatch.setattr(ask, "URL_TIMEOUT_S", 0.5)
    rc, _, err = run(capsys, root / "vlm", "--image", f"{server.url}/hostile/stall", "hi")
    assert rc == 2 and "took longer than 0.5s" in one_line(err)


def test_repetition_penalty_is_the_libraries(capsys, root, model):
    rc, out, err = run(capsys, root / "vlm", "--image", root / "a.png", "--repetition-penalty", "2.5", "describe it.", "--json")
    assert rc == 0, err
    _, want = reference(model, [user(IMAGE, text="describe it.")], pixels_of(root / "a.png"), repetition_penalty=2.5)
    _, plain = reference(model, [user(IMAGE, text="describe it.")], pixels_of(root / "a.png"))
    assert json.loads(out[0])["answer"] == want.text != plain.text
