"""Tokenizers for the decoder: train a byte-level BPE, or load any local Hugging Face tokenizer.

Both paths end in a ``transformers.PreTrainedTokenizerFast`` that knows our six special tokens
(``SPECIAL_TOKENS``) and carries ``CHAT_TEMPLATE``, a Jinja template that renders the chat
format of ``vlm.chat`` (``render_text``) so that ``tokenizer.apply_chat_template`` works for
anyone who loads a saved checkpoint with plain ``transformers``.

The BPE is the Hugging Face ``tokenizers`` byte-level BPE (the GPT-2 scheme: Radford et al.
2019, "Language Models are Unsupervised Multitask Learners", section 2.2): every string maps to
bytes first, so there is no unknown token and ``decode(encode(x)) == x`` for any unicode text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD = "<|pad|>"
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE = "<image>"
FRAME = "<|frame|>"
# The order fixes the ids of a tokenizer trained here: PAD is 0, ..., FRAME is 5.
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END, IMAGE, FRAME]
# Tokens the chat format writes itself; a tokenizer must have all four.
FORMAT_TOKENS = [IM_START, IM_END, IMAGE, FRAME]

_NUM_BYTE_SYMBOLS = 256

# Renders exactly what ``vlm.chat.render_text`` renders (tests/vlm/test_chat.py checks it):
#   <|im_start|>{role}\n{content}<|im_end|>\n  per message,
# an image part as "<image>\n", a video part as "<|frame|><image>" per frame then "\n", and
# ``add_generation_prompt`` as "<|im_start|>assistant\n". The answer and its <|im_end|> sit in a
# {% generation %} block, so ``return_assistant_tokens_mask=True`` marks what we supervise.
# ``system_prompt`` (a keyword of apply_chat_template) is a default system turn, used only when
# the messages have none.
CHAT_TEMPLATE = (
    "{%- if system_prompt is defined and system_prompt"
    " and (not messages or messages[0]['role'] != 'system') -%}"
    "{{- '<|im_start|>system\\n' + system_prompt + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception(\"expected role 'system', 'user' or 'assistant', got '\""
    " + message['role'] + \"'\") -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- else -%}{{- raise_exception('assistant content must be text parts, got a '"
    " + part['type'] + ' part') -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'video' -%}"
    "{%- if part['num_frames'] is defined -%}{%- set n = part['num_frames'] -%}"
    "{%- else -%}{%- set n = part['frames'] | length -%}{%- endif -%}"
    "{%- for _ in range(n) -%}{{- '<|frame|><image>' -}}{%- endfor -%}{{- '\\n' -}}"
    "{%- else -%}{{- raise_exception('unknown content part type ' + part['type']) -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the chat format and the model need.

    ``pad`` and ``eos`` are the tokenizer's own pad/eos (ours for a trained BPE, e.g. ``[PAD]``
    for a BERT tokenizer); the other four are always our tokens.
    """

    pad: int
    eos: int
    im_start: int
    im_end: int
    image: int
    frame: int


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; the special tokens get ids 0..5 (``SPECIAL_TOKENS``).

    Training is deterministic: the same corpus gives the same vocabulary and merges.

    Args:
        texts: the corpus, one document per item (any iterable; consumed once).
        vocab_size: the size of the final vocabulary, special tokens and the 256 byte symbols
            included, so at least 262.
        min_frequency: a pair merges only if it occurs at least this often.
        model_max_length: the longest sequence the tokenizer reports as allowed.
    """
    smallest = _NUM_BYTE_SYMBOLS + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ValueError(
            f"expected vocab_size >= {smallest} ({_NUM_BYTE_SYMBOLS} byte symbols + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"expected min_frequency >= 1, got {min_frequency}")

    backend = Tokenizer(models.BPE())
    # No normalizer: any normalization (NFC, lowercasing) would break decode(encode(x)) == x.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..5, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        extra_special_tokens=list(FORMAT_TOKENS),
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,  # it would rewrite " ." into "." on decode
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected_id:  # an invariant of the trainer, checked because ids are baked in
            raise RuntimeError(f"expected {token!r} to have id {expected_id}, got {got}")
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a Hugging Face tokenizer from a local directory (never downloads).

    Call ``ensure_special_tokens`` next unless the tokenizer was saved by ``save_tokenizer``.

    Args:
        path: a directory with ``tokenizer.json`` (and usually ``tokenizer_config.json``).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"expected a directory holding a Hugging Face tokenizer (tokenizer.json), got {path}"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(
            f"expected a fast (tokenizers-backed) tokenizer in {path}, "
            f"got {type(tokenizer).__name__}"
        )
    return tokenizer


def ensure_special_tokens(tokenizer: PreTrainedTokenizerFast) -> int:
    """Add the special tokens our chat format needs; return how many new ids were created.

    The four format tokens (``IM_START``, ``IM_END``, ``IMAGE``, ``FRAME``) are added when
    missing. ``PAD`` is added and set as the pad token only when the tokenizer has no pad token
    (a pad distinct from eos, so masking by pad id never hides a real eos); likewise ``EOS`` only
    when there is no eos token. Existing special tokens are kept.

    Args:
        tokenizer: modified in place. Resize the decoder's embeddings to ``len(tokenizer)`` when
            the return value is not 0.
    """
    before = len(tokenizer)
    named: dict[str, str | list[str]] = {}
    if tokenizer.pad_token is None:
        named["pad_token"] = PAD
    if tokenizer.eos_token is None:
        named["eos_token"] = EOS
    missing = [t for t in FORMAT_TOKENS if _token_id(tokenizer, t) is None]
    if missing:
        named["extra_special_tokens"] = missing
    if named:
        tokenizer.add_special_tokens(named, replace_extra_special_tokens=False)
    return len(tokenizer) - before


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Save in Hugging Face format, with ``CHAT_TEMPLATE`` attached.

    Args:
        tokenizer: must have our special tokens (see ``ensure_special_tokens``); its
            ``chat_template`` is set to ``CHAT_TEMPLATE`` in place.
        path: the directory to write; created if missing.
    """
    special_token_ids(tokenizer)  # fails early, before writing, if a format token is missing
    tokenizer.chat_template = CHAT_TEMPLATE
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    return path


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialIds:
    """The ids of the special tokens, or an error naming the ones the tokenizer lacks.

    Args:
        tokenizer: a tokenizer from ``train_bpe_tokenizer`` or one passed through
            ``ensure_special_tokens``.
    """
    ids = {t: _token_id(tokenizer, t) for t in FORMAT_TOKENS}
    lacking = [t for t, i in ids.items() if i is None]
    lacking += ["a pad token"] if tokenizer.pad_token_id is None else []
    lacking += ["an eos token"] if tokenizer.eos_token_id is None else []
    if lacking:
        raise ValueError(
            f"expected a tokenizer with {FORMAT_TOKENS}, a pad and an eos token, got one "
            f"lacking {lacking}; call vlm.tokenizer.ensure_special_tokens(tokenizer) first"
        )
    return SpecialIds(
        pad=tokenizer.pad_token_id,
        eos=tokenizer.eos_token_id,
        im_start=ids[IM_START],  # type: ignore[arg-type]
        im_end=ids[IM_END],  # type: ignore[arg-type]
        image=ids[IMAGE],  # type: ignore[arg-type]
        frame=ids[FRAME],  # type: ignore[arg-type]
    )


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int | None:
    """The id of ``token`` as one whole token, or None (missing tokens map to unk or None)."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or tokenizer.convert_ids_to_tokens(i) != token:
        return None
    return i


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (every byte as one printable character), inverted."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


def token_bytes(tokenizer: PreTrainedTokenizerFast, token_id: int) -> bytes:
    """The bytes a token stands for: for a byte-level BPE (GPT-2, Qwen, ours) its raw bytes,
    which may be part of a multi-byte character; otherwise the UTF-8 of its decoded text."""
    special = token_id in set(tokenizer.all_special_ids) or token_id in tokenizer.added_tokens_decoder
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if not special and type(decoder).__name__ == "ByteLevel":
        piece = tokenizer.convert_ids_to_tokens(token_id)
        table = _byte_level_decoder()
        if piece is not None and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode("utf-8")
