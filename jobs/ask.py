"""`vlm ask`: ask a stage-2 (VLM) checkpoint about your own images and videos, in this process
(no Ray, no server).

    vlm ask runs/sft/final --image photo.jpg "What colour is the circle?"
    vlm ask runs/sft/final --image a.png --image b.png "How many shapes in all?" "Describe it."
    vlm ask runs/sft/final --video clip.mp4 --frames 8          # on a terminal: a conversation
    cat questions.txt | vlm ask runs/sft/final --image x.png --json  # one question per line

Media go into the user turn in command-line order, before the question (LLaVA's ``<image>\\nQ``),
decoded as the server decodes them (``serve.media``: EXIF orientation, RGB, the model's size;
video frames spread uniformly by PyAV); the prompt is the checkpoint's chat format with its
trained system prompt (``llava.system_prompt``, or ``--system``), answered by
``vlm.generation.generate``: the served model's answer to the same request. QUESTION arguments
are each answered on their own, then it exits; with none, a terminal on stdin holds a
conversation (history kept; ``/image``, ``/video``, ``/reset``, ``/exit``) and a pipe gives one
question per line, each a fresh conversation. Exit status 2: a user error (one line on stderr),
or a question that could not be asked (the others are answered).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import numpy as np

DEFAULT_MAX_TOKENS = 256
URL_TIMEOUT_S = 30.0  # to fetch one image or video URL, redirects included
URL_MAX_BYTES = 64 * 2**20  # one fetched image or video
MAX_IMAGE_PIXELS = 100_000_000  # a 100 MP photo decodes; Pillow refuses 179 MP and more as a bomb anyway
COMMANDS = ("/image PATH_OR_URL and /video PATH_OR_URL attach media to your next question, "
            "/reset starts over (with the command line's media), /exit or Ctrl-D quits")


class AskError(ValueError):
    """A user's mistake (a bad file, a prompt too long): reported in one line, never a traceback."""


def _number(cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        with contextlib.suppress(ValueError):
            if ok(value := cast(text)):
                return value
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm ask",
        description="Ask a stage-2 checkpoint about images and videos, in this process (no Ray, no server): answer "
        "the QUESTIONs and exit; with none, a conversation on a terminal, or one question per line from a pipe.",
        epilog=f"conversation commands: {COMMANDS}.",
    )
    add, at_least_1 = p.add_argument, _number(int, lambda v: v >= 1, "an integer >= 1")
    add("checkpoint", help="a stage-2 checkpoint directory (model.safetensors, config.yaml, tokenizer/), e.g. runs/sft/final")
    add("questions", nargs="*", metavar="QUESTION", help="a question; quote it: each argument is one question")
    add("--image", dest="media", action="append", type=lambda s: ("image", s), metavar="PATH_OR_URL",
        help="an image (a file Pillow reads, or an http(s) URL); repeat for several, in order")
    add("--video", dest="media", action="append", type=lambda s: ("video", s), metavar="PATH_OR_URL",
        help="a video (a file PyAV reads, or an http(s) URL), shown as --frames frames")
    add("--frames", type=at_least_1, default=8, metavar="N",
        help="frames taken from each video, spread uniformly over it (default 8, as the server does)")
    add("--system", metavar="TEXT", help="the system prompt (default: the one the checkpoint was trained with; '' for none)")
    add("--max-tokens", type=at_least_1, default=DEFAULT_MAX_TOKENS, metavar="N",
        help=f"the longest answer in tokens (default {DEFAULT_MAX_TOKENS}; fewer when the context has less room)")
    add("--temperature", type=_number(float, lambda v: 0 <= v < math.inf, "a number >= 0"), default=0.0, metavar="T",
        help="sampling temperature; 0 (default) is greedy: the same answer every time")
    add("--top-p", type=_number(float, lambda v: 0 < v <= 1, "a number in (0, 1]"), default=1.0, metavar="P",
        help="nucleus sampling: keep the likeliest tokens up to this probability (default 1: all)")
    add("--repetition-penalty", type=_number(float, lambda v: 0 < v < math.inf, "a number > 0"), default=1.0, metavar="R",
        help="divide the scores of tokens already in the prompt or the answer by R (CTRL's penalty; 1.1-1.3 curbs "
             "loops; default 1: off)")
    add("--seed", type=_number(int, lambda v: v >= 0, "an integer >= 0"), metavar="S",
        help="seed the sampling (with --temperature > 0: reproducible answers)")
    add("--device", default="auto", metavar="auto|cpu|cuda|cuda:N", help="where the model runs (default auto: cuda when a GPU is there)")
    add("--bf16", action="store_true", help="on a GPU: run the model under bf16 autocast (default fp32)")
    add("--json", action="store_true", help="print one JSON object per question: question, answer, finish_reason, prompt_tokens, "
        "completion_tokens, images (images and video frames), image_tokens, seconds; or question and error")
    add("--debug", action="store_true", help="print each prompt as text to stderr (an image is one <image>)")
    return p


# ----------------------------------------------------------------------------- media


@dataclass
class Media:
    """One image or video, decoded: ``pixels`` (K, S, S, 3) uint8, K = 1 for an image."""

    kind: str  # "image" | "video"
    pixels: np.ndarray

    def part(self) -> dict[str, Any]:  # its content part in a chat message (vlm.chat)
        return {"type": "image"} if self.kind == "image" else {"type": "video", "num_frames": len(self.pixels)}


def _fetch(url: str, *, kind: str, limits: Any, where: str) -> bytes:
    """An http(s) or data: URL's bytes, by the server's fetcher (timeout, size limit, redirects).
    Loopback and private addresses are allowed: the user fetches on their own behalf."""
    import asyncio

    import httpx

    from serve.config import MediaOptions
    from serve.media import fetch

    opts = MediaOptions(allow_loopback=True, allow_private=True, image_fetch_timeout_s=URL_TIMEOUT_S,
                        video_fetch_timeout_s=URL_TIMEOUT_S)

    async def get() -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, timeout=httpx.Timeout(URL_TIMEOUT_S), trust_env=False) as client:
            return (await fetch(url, kind=kind, opts=opts, limits=limits, client=client, where=where)).data

    return asyncio.run(get())


def load_media(kind: str, source: str, *, size: int, frames: int, where: str) -> Media:
    """Read a file (or fetch a URL) and decode it as the server does; ``AskError`` starting with
    ``where`` when it cannot be read or is not an image (a video)."""
    from serve.config import Limits
    from serve.media import decode_image, decode_video, is_data_url
    from serve.protocol import ApiError

    limits = Limits(max_image_pixels=MAX_IMAGE_PIXELS, max_media_bytes=URL_MAX_BYTES, max_video_frames=frames,
                    default_video_frames=frames)
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    try:
        if scheme in ("http", "https") or is_data_url(source):
            data = _fetch(source, kind=kind, limits=limits, where=where)
        elif scheme:
            raise AskError(f"{where}: expected a local file or an http(s) URL, got a {scheme}:// URL")
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise AskError(f"{where}: {'a directory, not a file' if path.is_dir() else 'no such file'}")
            data = path.read_bytes()
        if kind == "image":
            pixels = decode_image(data, size=size, limits=limits, where=where)[None]  # (1, S, S, 3)
        else:
            pixels = decode_video(data, size=size, limits=limits, where=where, num_frames=frames)  # (K, S, S, 3)
    except ApiError as e:
        raise AskError(e.message) from None
    except OSError as e:
        raise AskError(f"{where}: cannot read it ({e.strerror or e})") from None
    return Media(kind, pixels)


# ----------------------------------------------------------------------------- the model


class Conversation:
    """The turns so far and their media; ``ask`` answers a question after them.

    Args:
        model: a ``VisionLanguageModel`` in eval mode, on the device it runs on.
        tokenizer: its tokenizer (the chat format's special tokens).
        system_prompt: the system turn (None or "": none).
        config: how to decode (a ``vlm.generation.GenerationConfig``).
    """

    def __init__(self, model: Any, tokenizer: Any, *, system_prompt: str | None, config: Any) -> None:
        self.model, self.tokenizer, self.system_prompt, self.config = model, tokenizer, system_prompt, config
        self.context = int(getattr(model.decoder.config, "max_position_embeddings", 0) or 0)
        self.messages: list[dict[str, Any]] = []
        self.media: list[Media] = []

    def reset(self) -> None:
        self.messages, self.media = [], []

    def prompt(self, question: str, media: list[Media]) -> tuple[list[dict[str, Any]], Any]:
        """The messages with ``question`` (after ``media``) as the next user turn, and their
        ``EncodedChat``; ``AskError`` when they cannot be encoded or do not fit the context."""
        from vlm.chat import SampleError, encode_chat

        turn = {"role": "user", "content": [m.part() for m in media] + [{"type": "text", "text": question}]}
        messages = self.messages + [turn]
        try:
            enc = encode_chat(messages, self.tokenizer, num_image_tokens=self.model.tokens_per_image,
                              add_generation_prompt=True, system_prompt=self.system_prompt)
        except SampleError as e:  # e.g. a literal <image> typed in the text
            raise AskError(f"{'the conversation' if self.messages else 'the question'}: {e.detail}") from None
        n, per = len(enc.input_ids), self.model.tokens_per_image
        if self.context and n >= self.context:  # at least one position must be left for the answer
            raise AskError(f"the prompt has {n} tokens ({enc.num_images} images/frames x {per} tokens included); the model's "
                           f"context of {self.context} tokens takes at most {self.context - 1} (one is left for the answer)"
                           + ("; /reset starts a new conversation" if self.messages else ""))
        return messages, enc

    def ask(self, question: str, media: list[Media], *, keep: bool = True, debug: bool = False) -> dict[str, Any]:
        """Answer ``question`` about ``media`` (and the turns so far); with ``keep`` the question
        and its answer join the conversation. Returns the answer and its counts (``--json``)."""
        from vlm.chat import render_text
        from vlm.generation import generate
        from vlm.image import normalize

        start = time.perf_counter()
        messages, enc = self.prompt(question, media)
        if debug:
            print(render_text(messages, add_generation_prompt=True, system_prompt=self.system_prompt), file=sys.stderr)
        pixels = [m.pixels for m in self.media + media]
        images = [normalize(np.concatenate(pixels), kind=self.model.cfg.vision.kind)] if pixels else None  # (N, 3, S, S)
        # generate runs under inference_mode and cuts max_new_tokens to the room the context has left
        res = generate(self.model, input_ids=[enc.input_ids], tokenizer=self.tokenizer, config=self.config, images=images)[0]
        answer = res.text.strip()
        if keep:  # an empty answer is left out: the chat format has no assistant turn without text
            self.messages = messages + ([{"role": "assistant", "content": answer}] if answer else [])
            self.media = self.media + media
        return {"question": question, "answer": answer, "finish_reason": res.finish_reason,
                "prompt_tokens": res.num_prompt_tokens, "completion_tokens": res.num_generated_tokens,
                "images": enc.num_images, "image_tokens": enc.num_images * self.model.tokens_per_image,
                "seconds": round(time.perf_counter() - start, 3)}


def open_checkpoint(path: str) -> Any:
    """The checkpoint's config, after checking it is a stage-2 one (cheap: no weights read)."""
    from vlm.checkpoint import read_info
    from vlm.config import read_config

    try:
        info = read_info(path)
    except FileNotFoundError as e:
        final = Path(path) / "final"
        raise AskError(f"{e}{f' (a run directory? its model is in {final})' if (final / 'checkpoint.json').is_file() else ''}") from None
    if info.get("stage") == "contrastive":
        raise AskError(f"{path} is a stage-1 (contrastive) checkpoint: its towers embed images and texts but do not "
                       "answer; use `vlm classify` or `vlm search` with it, or give `vlm ask` a stage-2 (sft) checkpoint")
    missing = [name for name in ("config.yaml", "model.safetensors", "tokenizer") if not (Path(path) / name).exists()]
    if missing:
        raise AskError(f"{path}: expected config.yaml, model.safetensors and tokenizer/ in a checkpoint, {', '.join(missing)} missing")
    return read_config(Path(path) / "config.yaml")


# ----------------------------------------------------------------------------- the command


def _lines(stream: TextIO, prompt: str | None) -> Iterator[str]:
    """The lines of ``stream``; on the process's own stdin with a ``prompt``, read by ``input``."""
    if prompt is None or stream is not sys.stdin:
        yield from (line.rstrip("\r\n") for line in iter(stream.readline, ""))
        return
    with contextlib.suppress(ImportError):
        importlib.import_module("readline")  # line editing and history for input()
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: goodbye
            print(file=sys.stderr)
            return


def _chat(conv: Conversation, first: list[Media], stream: TextIO, *, debug: bool, out: Callable[[dict], None],
          load: Callable[[str, str, str], Media]) -> None:
    """The conversation loop: history kept, slash commands, an error reported and the loop goes on."""
    pending = list(first)
    for line in _lines(stream, "you> "):
        text = line.strip()
        command, _, arg = text.partition(" ")
        if not text:
            continue
        try:
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                conv.reset()
                pending = list(first)
                print("[ask] the conversation starts over", file=sys.stderr)
            elif command in ("/image", "/video"):
                if not arg.strip():
                    raise AskError(f"{command}: expected a path or URL after it")
                pending.append(load(command[1:], arg.strip(), command))
                print(f"[ask] {command[1:]} {arg.strip()} goes with your next question", file=sys.stderr)
            elif command.startswith("/") and command[1:].isalpha():
                print(f"[ask] unknown command {command}; {COMMANDS}", file=sys.stderr)
            else:
                out(conv.ask(text, pending, debug=debug))
                pending = []
        except AskError as e:
            print(f"vlm ask: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C stops the answer being generated, not the conversation
            print("\n[ask] interrupted", file=sys.stderr)


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print, stdin: TextIO | None = None,
         interactive: bool | None = None) -> int:
    """Run ``vlm ask``; answers (or ``--json`` lines) go to ``log``, notes and errors to stderr.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        log: where each answer goes.
        stdin: where questions are read when none are given (default ``sys.stdin``).
        interactive: hold a conversation (default: when ``stdin`` is a terminal).
    """
    try:  # intermixed: questions may come before or after the flags
        a = build_parser().parse_intermixed_args(argv)
    except SystemExit as e:  # --help, or a bad flag argparse has reported
        return e.code if isinstance(e.code, int) else 2
    stream = sys.stdin if stdin is None else stdin
    try:
        from safetensors import SafetensorError

        from jobs.evaluate import pick_device
        from vlm.checkpoint import load_checkpoint

        device = pick_device(a.device)
        cfg = open_checkpoint(a.checkpoint)

        def load(kind: str, source: str, where: str) -> Media:
            return load_media(kind, source, size=cfg.model.vision.image_size, frames=a.frames, where=f"{where} {source}")

        media = [load(kind, source, f"--{kind}") for kind, source in a.media or []]  # before the weights: fail fast
        try:
            loaded = load_checkpoint(a.checkpoint)
        except (OSError, SafetensorError) as e:
            raise AskError(f"{a.checkpoint}: cannot load the model ({type(e).__name__}: {e})") from None
    except (ValueError, OSError) as e:  # AskError, ConfigError, pick_device's, a checkpoint without config.yaml
        print(f"vlm ask: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    from jobs.local import scoring_on
    from vlm.generation import GenerationConfig

    def shown(result: dict[str, Any]) -> str:
        return json.dumps(result) if a.json else result["answer"]

    try:
        with scoring_on(loaded.model.eval(), device, bf16=a.bf16) as model:
            gen = GenerationConfig(max_new_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                                   repetition_penalty=a.repetition_penalty)
            loaded.tokenizer.model_max_length = 10**30  # no tokenizer warning: Conversation.prompt checks the context
            conv = Conversation(model, loaded.tokenizer, config=gen,
                                system_prompt=cfg.model.llava.system_prompt if a.system is None else a.system)
            if not a.questions and (interactive if interactive is not None else stream.isatty()):
                print(f"[ask] {a.checkpoint} on {device}{' (bf16 autocast)' if a.bf16 and device.type != 'cpu' else ''}; "
                      f"your first question comes with {len(media)} image(s)/video(s). {COMMANDS}.", file=sys.stderr)
                _chat(conv, media, stream, debug=a.debug, out=lambda r: log(shown(r)), load=load)
                return 0
            failed = 0
            for question in a.questions or (q.strip() for q in _lines(stream, None) if q.strip()):
                try:  # each question a fresh conversation about the same media
                    log(shown(conv.ask(question, media, keep=False, debug=a.debug)))
                except AskError as e:
                    failed += 1
                    print(f"vlm ask: {e}", file=sys.stderr)
                    if a.json:
                        log(json.dumps({"question": question, "error": str(e)}))
            return 2 if failed else 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
