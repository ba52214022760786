"""Tokenize stage: captions (or chat messages) -> token ids with the model's tokenizer.

The tokenizer is loaded once per worker process (``functools.lru_cache``), from a tokenizer
directory or a checkpoint's ``tokenizer/``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np


@lru_cache(maxsize=4)
def cached_tokenizer(path: str):
    """Load a tokenizer directory (or ``CHECKPOINT/tokenizer``) once per process."""
    from vlm.tokenizer import load_tokenizer

    p = Path(path)
    if (p / "tokenizer").is_dir() and not (p / "tokenizer.json").is_file():
        p = p / "tokenizer"
    return load_tokenizer(p)


def _messages(value) -> list[dict]:
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, dict) and "messages" in value:
        value = value["messages"]
    if not isinstance(value, list):
        raise ValueError(f"expected a list of chat messages (or its JSON), got {type(value).__name__}")
    return value


class Tokenize:
    """Batch stage: adds ``input_ids`` (an object array of int32 arrays) and ``num_tokens``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text_col: the caption column (used when ``messages_col`` is None).
        messages_col: a column of chat messages, rendered with the tokenizer's chat template.
        max_length: truncate to this many ids.
    """

    def __init__(self, *, tokenizer, text_col: str = "caption", messages_col: str | None = None, max_length: int | None = None) -> None:
        self.tokenizer, self.text_col, self.messages_col, self.max_length = tokenizer, text_col, messages_col, max_length

    def ids(self, texts: list, messages: list | None = None) -> list[np.ndarray]:
        if messages is not None:
            out = []
            for m in messages:
                ids = self.tokenizer.apply_chat_template(_messages(m), tokenize=True, add_generation_prompt=False)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                out.append(np.asarray(ids, dtype=np.int32))
        else:
            enc = self.tokenizer([str(t or "") for t in texts], add_special_tokens=False)["input_ids"]
            out = [np.asarray(e, dtype=np.int32) for e in enc]
        if self.max_length is not None:
            out = [o[: self.max_length] for o in out]
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        col = self.messages_col or self.text_col
        if col not in batch:
            raise KeyError(f"expected a {col!r} column to tokenize, got columns {sorted(batch)}")
        ids = self.ids(list(batch[self.text_col]) if self.messages_col is None else [], list(batch[col]) if self.messages_col else None)
        out = dict(batch)
        out["input_ids"] = np.array(ids + [None], dtype=object)[:-1]  # keep a 1-D object array
        out["num_tokens"] = np.array([len(i) for i in ids], dtype=np.int64)
        return out
