"""The chat format, its label masking, and batching.

A conversation renders as (ChatML-like; one block per message)::

    <|im_start|>system\\n{system text}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

Inside ``{content}`` the parts follow each other with nothing in between, except that every
media part is followed by one "\\n" (``MEDIA_SEPARATOR``). So OpenAI-style ``[image, "What is
this?"]`` and LLaVA's ``"<image>\\nWhat is this?"`` give the same tokens: the model sees one
layout at training and at serving time. In token ids an image part is ``num_image_tokens``
copies of the ``<image>`` id, which the model replaces with projected vision features (the
convention of transformers' ``LlavaForConditionalGeneration``: the image token repeated once per
image feature); a video part of T frames is, per frame, one ``<|frame|>`` id then
``num_image_tokens`` ``<image>`` ids. In text (``render_text`` and the tokenizer's Jinja
``CHAT_TEMPLATE``) an image is a single ``<image>`` and a frame is ``<|frame|><image>``.

Token ids are built segment by segment: each text segment is tokenized on its own, control and
media ids are written directly, and the pieces are concatenated. Labels are therefore exact by
construction (no offset mapping, no re-tokenizing the full string, which is how LLaVA issue
#1166 trained whole datasets at loss 0 when the two tokenizations disagreed), and a final check
decodes every supervised span back to its answer text. Supervised tokens are each assistant
answer and its closing ``<|im_end|>``; the "\\n" after it and everything else is -100.

A sample that must not be trained raises ``SampleError`` with a stable ``reason``;
``encode_batch`` collects those so a data pipeline reports and skips instead of crashing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerFast

from vlm.tokenizer import FRAME, IM_END, IM_START, IMAGE, SpecialIds, special_token_ids

IGNORE_INDEX = -100  # the label torch's cross_entropy skips
ROLES = ("system", "user", "assistant")
MEDIA_SEPARATOR = "\n"  # written after every image or video part
TURN_SEPARATOR = "\n"  # written after every <|im_end|>; not supervised

# Stable, machine-readable reasons of SampleError (pipelines count them by reason).
SAMPLE_ERROR_REASONS = (
    "bad_record",  # a LLaVA record without a list of conversations
    "bad_message",  # a message that is not {"role": ..., "content": str | [parts]}
    "bad_role",  # a role outside ROLES, or a system message after the first position
    "bad_part",  # an unknown or malformed content part, or media in an assistant turn
    "image_count_mismatch",  # a LLaVA record whose <image> markers do not match its images
    "special_token_in_text",  # text that tokenizes to a special token (e.g. a literal <image>)
    "no_assistant_turn",  # nothing to supervise (training only)
    "empty_answer",  # an assistant turn with no text
    "prompt_truncated",  # max_length cuts the prompt before the first answer starts
    "answer_truncated",  # max_length cuts the first assistant answer
    "image_truncated",  # max_length cuts through an image's or a video's tokens
    "label_mismatch",  # the supervised tokens do not decode back to the answer texts
)

_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class SampleError(ValueError):
    """A sample that must not be trained on; ``reason`` is one of ``SAMPLE_ERROR_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in SAMPLE_ERROR_REASONS:
            raise ValueError(f"expected a reason in {SAMPLE_ERROR_REASONS}, got {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # pickles with both fields (Ray ships errors between processes)
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True)
class EncodedChat:
    """One tokenized conversation.

    ``assistant_spans`` are half-open ``[start, end)`` ranges of ``input_ids`` holding an
    answer and its ``<|im_end|>``: exactly the positions where ``labels`` is not -100.
    ``num_images`` counts images plus video frames of the kept turns, in order of appearance;
    ``num_frames_per_media`` has one entry per image (1) or video (T) part. When truncation
    drops trailing turns (``num_dropped_turns``), their media are gone too: the sample uses the
    first ``num_images`` images/frames.
    """

    input_ids: list[int]
    labels: list[int]
    num_images: int
    num_frames_per_media: list[int] = field(default_factory=list)
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)
    num_dropped_turns: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(end - start for start, end in self.assistant_spans)


@dataclass(frozen=True)
class _Media:
    num_frames: int  # 1 for an image
    is_video: bool


@dataclass(frozen=True)
class _Turn:
    role: str
    parts: tuple[str | _Media, ...]

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


@dataclass
class _Piece:
    kind: str  # "text" (tokenized later) | "control" | "media" (ids written directly)
    text: str = ""
    ids: list[int] = field(default_factory=list)
    supervised: bool = False


# ----------------------------------------------------------------------------- parsing


def from_llava(record: Mapping[str, object]) -> list[dict]:
    """Convert a LLaVA JSON record into chat messages.

    ``{"conversations": [{"from": "human", "value": "<image>\\nWhat is ..."}, {"from": "gpt",
    "value": "..."}]}`` (``from`` may also be "system"). Each ``<image>`` marker in a human turn
    becomes an image part at its position; one "\\n" right after a marker is dropped because the
    chat format writes ``MEDIA_SEPARATOR`` after every image. When the record names its images
    (``"image"``: a path or a list of paths) the marker count must match.

    Args:
        record: one LLaVA record.
    """
    conversations = record.get("conversations") if isinstance(record, Mapping) else None
    if not isinstance(conversations, list):
        raise SampleError(
            "bad_record",
            f"expected a LLaVA record with a 'conversations' list, got {_short(record)}",
        )
    messages: list[dict] = []
    num_markers = 0
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise SampleError(
                "bad_message",
                f"expected conversations[{i}] to be {{'from': ..., 'value': str}}, "
                f"got {_short(turn)}",
            )
        role = _LLAVA_ROLES.get(str(turn.get("from")))
        if role is None:
            raise SampleError(
                "bad_role",
                f"expected conversations[{i}]['from'] in {sorted(_LLAVA_ROLES)}, "
                f"got {turn.get('from')!r}",
            )
        value: str = turn["value"]
        if role != "user" or IMAGE not in value:
            messages.append({"role": role, "content": value})
            continue
        chunks = value.split(IMAGE)
        num_markers += len(chunks) - 1
        parts: list[dict] = []
        for k, chunk in enumerate(chunks):
            if k > 0:
                parts.append({"type": "image"})
                chunk = chunk.removeprefix(MEDIA_SEPARATOR)
            if chunk:
                parts.append({"type": "text", "text": chunk})
        messages.append({"role": role, "content": parts})

    if "image" in record:
        images = record["image"]
        num_images = len(images) if isinstance(images, (list, tuple)) else 1
        if num_images != num_markers:
            raise SampleError(
                "image_count_mismatch",
                f"expected one {IMAGE} marker per image ({num_images}), got {num_markers}",
            )
    return messages


def _parse(messages: Sequence[Mapping[str, object]], *, system_prompt: str | None) -> list[_Turn]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise SampleError(
            "bad_message", f"expected a list of messages, got {type(messages).__name__}"
        )
    turns: list[_Turn] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise SampleError(
                "bad_message",
                f"expected messages[{i}] to be {{'role': ..., 'content': ...}}, "
                f"got {_short(message)}",
            )
        role = message["role"]
        if role not in ROLES:
            raise SampleError(
                "bad_role", f"expected messages[{i}]['role'] in {ROLES}, got {role!r}"
            )
        if role == "system" and i > 0:
            raise SampleError(
                "bad_role", f"expected the system message first, got one at messages[{i}]"
            )
        turns.append(_Turn(role, _parse_content(message["content"], role=role, index=i)))
    if system_prompt and (not turns or turns[0].role != "system"):
        turns.insert(0, _Turn("system", (system_prompt,)))
    return turns


def _parse_content(content: object, *, role: str, index: int) -> tuple[str | _Media, ...]:
    if isinstance(content, str):
        return (content,)
    if isinstance(content, Mapping) or not isinstance(content, Sequence):
        raise SampleError(
            "bad_message",
            f"expected messages[{index}]['content'] to be a string or a list of parts, "
            f"got {type(content).__name__}",
        )
    parts: list[str | _Media] = []
    for j, part in enumerate(content):
        where = f"messages[{index}]['content'][{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise SampleError(
                    "bad_part",
                    f"expected {where}['text'] to be a string, got {_short(part.get('text'))}",
                )
            parts.append(part["text"])
            continue
        if kind in ("image", "image_url"):
            media = _Media(1, is_video=False)
        elif kind == "video":
            media = _Media(_num_frames(part, where=where), is_video=True)
        else:
            raise SampleError(
                "bad_part",
                f"expected {where} to be a dict with 'type' in text|image|image_url|video, "
                f"got {_short(part)}",
            )
        if role == "assistant":
            raise SampleError(
                "bad_part", f"expected text-only assistant content, got a {kind} part at {where}"
            )
        parts.append(media)
    return tuple(parts)


def _num_frames(part: Mapping[str, object], *, where: str) -> int:
    if "num_frames" in part:
        n = part["num_frames"]
    elif isinstance(part.get("frames"), Sequence):
        n = len(part["frames"])  # type: ignore[arg-type]
    else:
        raise SampleError(
            "bad_part",
            f"expected {where} to have 'num_frames' or a 'frames' list, got {_short(part)}",
        )
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SampleError("bad_part", f"expected {where} to have at least one frame, got {n!r}")
    return n


# ----------------------------------------------------------------------------- text


def render_text(
    messages: Sequence[Mapping[str, object]],
    *,
    add_generation_prompt: bool = False,
    system_prompt: str | None = None,
) -> str:
    """The conversation as text, identical to the tokenizer's Jinja ``CHAT_TEMPLATE``.

    An image is one ``<image>``, a video frame ``<|frame|><image>`` (``encode_chat`` expands
    each ``<image>`` to ``num_image_tokens`` ids). For display, logs and HF interop.

    Args:
        messages: OpenAI/HF-style messages (see ``encode_chat``).
        add_generation_prompt: append ``<|im_start|>assistant\\n``.
        system_prompt: a system turn used when the messages have none.
    """
    out: list[str] = []
    for turn in _parse(messages, system_prompt=system_prompt):
        out.append(f"{IM_START}{turn.role}\n")
        for part in turn.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                frame = FRAME + IMAGE if part.is_video else IMAGE
                out.append(frame * part.num_frames + MEDIA_SEPARATOR)
        out.append(IM_END + TURN_SEPARATOR)
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


# ----------------------------------------------------------------------------- ids


def encode_chat(
    messages: Sequence[Mapping[str, object]],
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_image_tokens: int,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
    system_prompt: str | None = None,
) -> EncodedChat:
    """Tokenize a conversation and mask its labels; raise ``SampleError`` for a bad sample.

    Truncation drops whole trailing turns only: it keeps the longest prefix of turns that ends
    with an assistant turn and fits ``max_length`` up to that answer's ``<|im_end|>`` (the
    newline after it, unsupervised, is cut when it alone does not fit; turns after the last
    answer are dropped even without ``max_length``: they supervise nothing). If even the first
    answer does not fit, the sample raises ``image_truncated``, ``prompt_truncated`` (the cut
    falls before the answer text, its ``<|im_start|>assistant`` header included) or
    ``answer_truncated``. With ``add_generation_prompt`` nothing is dropped: the whole prompt
    must fit.

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str | [parts]}]`` with
            parts ``{"type": "text", "text": ...}``, ``{"type": "image"}`` (or "image_url"),
            ``{"type": "video", "num_frames": T}`` (or ``"frames": [...]``); other keys are
            ignored. Use ``from_llava`` for LLaVA records.
        tokenizer: a tokenizer with our special tokens (``vlm.tokenizer``).
        num_image_tokens: ids written per image or video frame (vision features per image).
        max_length: the longest allowed sequence; None for no limit.
        add_generation_prompt: append ``<|im_start|>assistant\\n`` for inference; no assistant
            turn is required then.
        system_prompt: a system turn used when the messages have none.
    """
    if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
        raise ValueError(
            f"expected num_image_tokens to be a positive int, got {num_image_tokens!r}"
        )
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"expected max_length to be a positive int or None, got {max_length!r}")
    sp = special_token_ids(tokenizer)
    turns = _parse(messages, system_prompt=system_prompt)
    for i, turn in enumerate(turns):
        if turn.role == "assistant" and not turn.text.strip():
            raise SampleError("empty_answer", f"the assistant turn {i} has no text")
    assistants = [i for i, t in enumerate(turns) if t.role == "assistant"]
    if not assistants and not add_generation_prompt:
        raise SampleError(
            "no_assistant_turn",
            f"expected an assistant turn to train on, got roles {[t.role for t in turns]}",
        )

    pieces = [_turn_pieces(turn, sp, num_image_tokens=num_image_tokens) for turn in turns]
    prompt = [_Piece("control", ids=[sp.im_start]), _Piece("text", text="assistant\n")]
    _tokenize_pieces(tokenizer, [p for ps in pieces + [prompt] for p in ps])
    for i, turn in enumerate(turns):
        answer_ids = [p.ids for p in pieces[i] if p.supervised and p.kind == "text"]
        if turn.role == "assistant" and not any(answer_ids):
            raise SampleError("empty_answer", f"the assistant turn {i} tokenizes to no tokens")

    if add_generation_prompt:
        keep = len(turns)
        tail = prompt
    else:
        keep = _turns_that_fit(turns, pieces, assistants, max_length=max_length)
        tail = []
    flat = [(i, p) for i in range(keep) for p in pieces[i]] + [(keep, p) for p in tail]
    if add_generation_prompt and max_length is not None and sum(len(p.ids) for _, p in flat) > max_length:
        _raise_cut(flat, max_length=max_length, answer_turn=None)

    input_ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    for i, piece in flat:
        if piece.supervised and (not spans or spans[-1][1] != len(input_ids)):
            spans.append((len(input_ids), len(input_ids)))
        input_ids += piece.ids
        labels += piece.ids if piece.supervised else [IGNORE_INDEX] * len(piece.ids)
        if piece.supervised:
            spans[-1] = (spans[-1][0], len(input_ids))
    if max_length is not None and len(input_ids) > max_length:
        # training only: the kept prefix fits up to its last <|im_end|>; what is over is the
        # newline after it, unsupervised and last, so it carries no loss (``_turns_that_fit``)
        del input_ids[max_length:], labels[max_length:]

    kept = turns[:keep]
    _check_labels(
        tokenizer,
        input_ids=input_ids,
        labels=labels,
        spans=spans,
        answers=[t.text for t in kept if t.role == "assistant"],
        im_end=sp.im_end,
    )
    frames = [p.num_frames for t in kept for p in t.parts if isinstance(p, _Media)]
    return EncodedChat(
        input_ids=input_ids,
        labels=labels,
        num_images=sum(frames),
        num_frames_per_media=frames,
        assistant_spans=spans,
        num_dropped_turns=len(turns) - keep,
    )


def encode_batch(
    samples: Iterable[Sequence[Mapping[str, object]] | Mapping[str, object]],
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_image_tokens: int,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
    system_prompt: str | None = None,
) -> tuple[list[EncodedChat], list[tuple[int, SampleError]]]:
    """Encode many samples; return the encoded ones and ``(index, error)`` for those skipped.

    Only ``SampleError`` is caught (bad data); anything else (a bad tokenizer, a bad argument)
    still raises.

    Args:
        samples: message lists, or LLaVA records (mappings with "conversations").
        tokenizer: see ``encode_chat``.
        num_image_tokens: see ``encode_chat``.
        max_length: see ``encode_chat``.
        add_generation_prompt: see ``encode_chat``.
        system_prompt: see ``encode_chat``.
    """
    encoded: list[EncodedChat] = []
    skipped: list[tuple[int, SampleError]] = []
    for index, sample in enumerate(samples):
        try:
            messages = from_llava(sample) if isinstance(sample, Mapping) else sample
            encoded.append(
                encode_chat(
                    messages,
                    tokenizer,
                    num_image_tokens=num_image_tokens,
                    max_length=max_length,
                    add_generation_prompt=add_generation_prompt,
                    system_prompt=system_prompt,
                )
            )
        except SampleError as error:
            skipped.append((index, error))
    return encoded, skipped


def collate(
    encoded: Sequence[EncodedChat],
    *,
    pad_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad encoded chats into a batch of ``input_ids``, ``attention_mask``, ``labels``.

    Each is a (B, L) int64 tensor; padding is ``pad_id`` / 0 / -100 respectively. Use
    ``padding_side="left"`` for batched generation.

    Args:
        encoded: at least one sample.
        pad_id: the tokenizer's pad id (``special_token_ids(tokenizer).pad``).
        padding_side: "right" or "left".
        pad_to_multiple_of: round L up to a multiple of this (None: the longest sample).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"expected padding_side 'right' or 'left', got {padding_side!r}")
    if not encoded:
        raise ValueError("expected at least one encoded sample, got an empty sequence")
    length = max(len(e.input_ids) for e in encoded)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)  # (B, L)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    for row, sample in enumerate(encoded):
        n = len(sample.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, cols] = torch.tensor(sample.input_ids, dtype=torch.long)
        attention_mask[row, cols] = 1
        labels[row, cols] = torch.tensor(sample.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sequences into rows of at most ``max_length`` tokens: first-fit in order of
    decreasing length (ties by index), each row's members in index order. Deterministic.

    Args:
        lengths: each sequence's token count (each <= ``max_length``).
        max_length: a row's capacity.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"expected sequences of at most max_length={max_length} tokens, got {lengths[too_long[0]]} (index {too_long[0]})")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return [sorted(r) for r in rows]


def collate_packed(encoded: Sequence[EncodedChat], *, pad_id: int, capacity: int | None = None) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Pack encoded chats end to end into rows of at most ``capacity`` tokens (``pack_rows``).

    Returns the batch and the order of the chats in it (row by row; images and any per-chat
    data must follow this order). The batch holds ``input_ids``, ``attention_mask`` (1 on every
    chat token, 0 on the padding at each row's end), ``labels`` and ``position_ids``, which
    restart at 0 with each chat: transformers' decoders then attend only within each chat
    when no attention mask is passed (``VisionLanguageModel.forward`` does so). Each chat's
    tokens, labels and positions are exactly those of an unpacked batch, so the loss (token or
    turn average) is the same.

    The default capacity is the longest chat's length: no row is longer than in the unpacked
    batch (attention, which a masked kernel computes over the whole row, costs no more) and
    short chats share rows. On the generated world's stage-2 batches (16 conversations of
    ~170 tokens) that takes the padding from 21% of the tokens to 12%, where rows of up to 384
    tokens leave 19% (fewer rows, twice as long, each padded to the fullest one).

    Args:
        encoded: at least one sample.
        pad_id: the tokenizer's pad id.
        capacity: a row's length limit (default, and at least, the longest chat's length).
    """
    if not encoded:
        raise ValueError("expected at least one encoded sample, got an empty sequence")
    lengths = [len(e.input_ids) for e in encoded]
    rows = pack_rows(lengths, max(capacity or 0, max(lengths)))
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, L)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (R, L)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
    order: list[int] = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            input_ids[r, at : at + n] = torch.tensor(encoded[i].input_ids, dtype=torch.long)
            labels[r, at : at + n] = torch.tensor(encoded[i].labels, dtype=torch.long)
            attention_mask[r, at : at + n] = 1
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
            order.append(i)
        position_ids[r, at:] = torch.arange(width - at)  # the padding: a sequence of its own, after every real token
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}, order


# ----------------------------------------------------------------------------- internals


def _turn_pieces(turn: _Turn, sp: SpecialIds, *, num_image_tokens: int) -> list[_Piece]:
    """One turn as pieces; adjacent text pieces of the same supervision are merged."""
    supervised = turn.role == "assistant"
    raw = [_Piece("control", ids=[sp.im_start]), _Piece("text", text=f"{turn.role}\n")]
    for part in turn.parts:
        if isinstance(part, str):
            raw.append(_Piece("text", text=part, supervised=supervised))
            continue
        frame = ([sp.frame] if part.is_video else []) + [sp.image] * num_image_tokens
        raw.append(_Piece("media", ids=frame * part.num_frames))
        raw.append(_Piece("text", text=MEDIA_SEPARATOR))
    raw.append(_Piece("control", ids=[sp.im_end], supervised=supervised))
    raw.append(_Piece("text", text=TURN_SEPARATOR))

    merged: list[_Piece] = []
    for piece in raw:
        if piece.kind == "text" and not piece.text:
            continue
        last = merged[-1] if merged else None
        mergeable = last is not None and last.kind == "text" and last.supervised == piece.supervised
        if piece.kind == "text" and mergeable:
            last.text += piece.text
        else:
            merged.append(piece)
    return merged


def _tokenize_texts(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Each text tokenized on its own, without BOS/EOS or other template tokens."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _tokenize_pieces(tokenizer: PreTrainedTokenizerFast, pieces: list[_Piece]) -> None:
    text_pieces = [p for p in pieces if p.kind == "text"]
    forbidden = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    for piece, ids in zip(text_pieces, _tokenize_texts(tokenizer, [p.text for p in text_pieces])):
        found = forbidden.intersection(ids)
        if found:
            raise SampleError(
                "special_token_in_text",
                f"expected plain text, got special tokens "
                f"{tokenizer.convert_ids_to_tokens(sorted(found))} in {_short(piece.text)}; "
                f"images and videos must be content parts, not markers in text",
            )
        piece.ids = list(ids)


def _turns_that_fit(
    turns: list[_Turn], pieces: list[list[_Piece]], assistants: list[int], *, max_length: int | None
) -> int:
    """How many leading turns to keep: the longest prefix that ends with an answer and fits,
    up to and including that answer's <|im_end|> (the unsupervised newline after it is the
    sequence's last token, carries no loss, and may be cut)."""
    ends = [0]
    for ps in pieces:
        ends.append(ends[-1] + sum(len(p.ids) for p in ps))
    fitting = [a for a in assistants if max_length is None or ends[a + 1] - _trailer(pieces[a]) <= max_length]
    if fitting:
        return fitting[-1] + 1
    first = assistants[0]
    flat = [(i, p) for i in range(first + 1) for p in pieces[i]]
    flat = flat[: len(flat) - _trailer_pieces(pieces[first])]  # what the answer needs: up to its <|im_end|>
    _raise_cut(flat, max_length=max_length, answer_turn=first)  # type: ignore[arg-type]
    raise AssertionError("unreachable")


def _trailer_pieces(pieces: list[_Piece]) -> int:
    """How many pieces follow an answer turn's last supervised piece (its <|im_end|>)."""
    n = 0
    while n < len(pieces) and not pieces[len(pieces) - 1 - n].supervised:
        n += 1
    return n if n < len(pieces) else 0


def _trailer(pieces: list[_Piece]) -> int:
    """How many tokens follow an answer turn's <|im_end|> (the unsupervised turn separator)."""
    k = _trailer_pieces(pieces)
    return sum(len(p.ids) for p in pieces[len(pieces) - k :]) if k else 0


def _raise_cut(flat: list[tuple[int, _Piece]], *, max_length: int, answer_turn: int | None) -> None:
    """Raise the SampleError that names what ``max_length`` would cut through."""
    total = sum(len(p.ids) for _, p in flat)
    start = 0
    for turn, piece in flat:
        if start + len(piece.ids) > max_length:
            break
        start += len(piece.ids)
    what = "the first answer" if answer_turn is not None else "the prompt"
    detail = f"{what} needs {total} tokens, max_length is {max_length}"
    if piece.kind == "media":
        raise SampleError(
            "image_truncated",
            f"{detail}; the cut falls in the media at tokens [{start}, {start + len(piece.ids)})",
        )
    if turn == answer_turn and piece.supervised:  # a cut in the answer's header is the prompt's
        raise SampleError("answer_truncated", detail)
    raise SampleError("prompt_truncated", detail)


def _check_labels(
    tokenizer: PreTrainedTokenizerFast,
    *,
    input_ids: list[int],
    labels: list[int],
    spans: list[tuple[int, int]],
    answers: list[str],
    im_end: int,
) -> None:
    """Assert the supervised tokens are exactly each answer plus its <|im_end|>."""
    inside = {k for start, end in spans for k in range(start, end)}
    supervised = {k for k, label in enumerate(labels) if label != IGNORE_INDEX}
    if len(input_ids) != len(labels) or inside != supervised or len(spans) != len(answers):
        raise SampleError(
            "label_mismatch",
            f"expected {len(answers)} supervised spans covering {len(inside)} tokens, got "
            f"{len(spans)} spans and {len(supervised)} supervised tokens",
        )
    for (start, end), answer in zip(spans, answers):
        if labels[start:end] != input_ids[start:end] or input_ids[end - 1] != im_end:
            raise SampleError(
                "label_mismatch",
                f"expected span [{start}, {end}) to copy input_ids and end with {IM_END}",
            )
    decoded = tokenizer.batch_decode(
        [input_ids[start : end - 1] for start, end in spans],
        skip_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    for got, answer in zip(decoded, answers):
        if not _same_text(tokenizer, got=got, expected=answer):
            raise SampleError(
                "label_mismatch",
                f"expected the supervised tokens to decode to {_short(answer)}, got {_short(got)}",
            )


_PROBE = "Hello, World!  naïve café\n\t 🦙 日本語 x=1.5"


def _same_text(tokenizer: PreTrainedTokenizerFast, *, got: str, expected: str) -> bool:
    """Exact equality for a lossless tokenizer (byte-level BPE).

    A normalizing tokenizer (BERT lowercases, strips accents, drops whitespace) cannot give the
    text back; for it compare with the tokenizer's normalizer applied and whitespace ignored.
    Unknown characters (decoded as ``[UNK]``) still mismatch.
    """
    if got == expected:
        return True
    probe = tokenizer.decode(
        tokenizer.encode(_PROBE, add_special_tokens=False), clean_up_tokenization_spaces=False
    )
    if probe == _PROBE:  # lossless: only exact equality counts
        return False
    normalizer = tokenizer.backend_tokenizer.normalizer
    if normalizer is not None:
        expected = normalizer.normalize_str(expected)
    return "".join(got.split()) == "".join(expected.split())


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
