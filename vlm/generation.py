"""Batched autoregressive decoding for ``VisionLanguageModel`` with a KV cache.

Three layers, so that serving can drive its own batches with the same pieces:

- ``prefill``: left-padded prompts (images scattered in by ``model.embed_inputs``) -> the
  next-token logits of every row and a ``DecodeState`` (the transformers ``DynamicCache``, the
  attention mask so far, each row's next position id).
- ``decode_step``: one new token per row -> the next logits; the cache grows by one position.
- ``vlm.sampling``: logits -> token ids (per-row penalties, temperature / top-k / top-p, and
  seeded generators); a row that asks for them gets its tokens' log probabilities.

``decode_tokens`` is the step-wise loop on top: it prefills a batch, then yields each live row's
next token per step; a row whose ``RowState`` is done (a stop token id, a stop string,
``max_new_tokens``, or cancelled by its consumer) is dropped from the batch and its cache before
the next step, and new prompts may join the running batch at a step boundary (continuous
batching: ``DecodeState.extend`` left-pads the shorter KV cache). ``generate`` and the serving
engine both consume it.

Position ids come from the attention mask (``cumsum - 1``), so a left-padded row sees exactly
the positions it would see alone, and batched greedy decoding matches unbatched decoding.

transformers' ``GenerationMixin`` is not used because our model is not a ``PreTrainedModel``
and serving needs the step function on its own (continuous batching); the loop is short.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from vlm.llava import VisionLanguageModel
from vlm.sampling import MAX_LOGPROBS, TokenLogprob, apply_penalties, sample_next, token_logprobs
from vlm.tokenizer import IM_END

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


# ----------------------------------------------------------------------------- config / result


@dataclass
class GenerationConfig:
    """How to decode one request.

    Args:
        max_new_tokens: the most tokens to generate (a stop token counts as generated).
        temperature: softmax temperature; 0 means greedy (argmax).
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
            reaches ``top_p`` (1.0 keeps all).
        top_k: keep only the ``top_k`` most likely tokens (None or 0 keeps all).
        stop_strings: stop when the generated text contains one; the text is cut before it.
        stop_token_ids: stop after generating one of these. None: the tokenizer's
            ``<|im_end|>`` and its eos token.
        seed: seeds the row's own ``torch.Generator`` (reproducible sampling). When one config
            is shared by a batch, row ``i`` uses ``seed + i``. None: the global torch RNG.
        frequency_penalty: subtracted from a token's logit once per time the row has generated
            it (OpenAI's definition; -2 to 2, 0 is off).
        presence_penalty: subtracted from the logit of every token the row has generated at
            least once (-2 to 2, 0 is off).
        repetition_penalty: CTRL's penalty (Keskar et al. 2019), as transformers and vLLM apply
            it: the logit of every token of the prompt or the answer so far is divided by it
            when positive, multiplied when negative (> 0; 1 is off). The penalties apply to the
            logits before temperature, top-k and top-p.
        logit_bias: token id -> a number from -100 to 100 added to its logit at every step
            (OpenAI's ``logit_bias``; -100 in effect bans a token, 100 forces it).
        logprobs: None: none; 0: each generated token's log probability; k > 0: also the k most
            likely tokens at that step (at most 20). Log probabilities are the model's own
            (log-softmax of its logits, before penalties and temperature), as vLLM reports them.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature: expected a number >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"top_k: expected None or an integer >= 0, got {self.top_k!r}")
        if isinstance(self.stop_strings, str):
            raise ValueError(
                f"stop_strings: expected a list of strings, got the string {self.stop_strings!r}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings: expected non-empty strings, got {self.stop_strings!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}: expected a number from -2 to 2, got {getattr(self, name)!r}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty: expected a number > 0, got {self.repetition_penalty!r}")
        for t, v in self.logit_bias.items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or not -100.0 <= v <= 100.0:
                raise ValueError(f"logit_bias: expected token ids >= 0 mapped to numbers from -100 to 100, got {t!r}: {v!r}")
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
            raise ValueError(f"logprobs: expected None or an integer from 0 to {MAX_LOGPROBS}, got {lp!r}")

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0 or self.logit_bias)


@dataclass
class GenerationResult:
    """One row's output.

    ``token_ids`` holds every generated id, the stop token included; ``text`` is their decoded
    text without special tokens, the stop token, or anything from a stop string on.
    ``stop`` is what stopped the row (a token id or a stop string), None for "length".
    ``logprobs`` (``GenerationConfig.logprobs``) covers the tokens of ``token_ids`` but a stop
    token; a stop string cuts the text, not the tokens that held it.
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    num_prompt_tokens: int
    num_generated_tokens: int
    stop: int | str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of the text (not the stop token); None unless asked


# ----------------------------------------------------------------------------- prefill / step


@dataclass
class DecodeState:
    """What a decode step needs besides the model: the KV cache and per-row bookkeeping.

    ``attention_mask`` is (B, L_seen) with 0 at left padding; ``next_positions`` is (B,), the
    position id the next token of each row gets.
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_positions: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.attention_mask.shape[0])

    def select(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), e.g. to drop finished rows from the batch."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        self.cache.batch_select_indices(idx)
        self.attention_mask = self.attention_mask[idx]
        self.next_positions = self.next_positions[idx]

    def extend(self, other: DecodeState) -> None:
        """Append ``other``'s rows after these (continuous batching: prompts prefilled while this
        batch decodes join it). The shorter of the two caches is left-padded to the longer, and
        its mask is 0 there, so every row attends to exactly what it saw before."""
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            if type(mine) is not DynamicLayer or type(theirs) is not DynamicLayer:
                raise ValueError(f"extend: expected plain DynamicLayer caches, got {type(mine).__name__} "
                                 f"and {type(theirs).__name__} (sliding windows cannot be left-padded)")
            mine.keys = torch.cat([_pad_left(mine.keys, width, dim=2), _pad_left(theirs.keys, width, dim=2)])  # (B+B', H, W, Dh)
            mine.values = torch.cat([_pad_left(mine.values, width, dim=2), _pad_left(theirs.values, width, dim=2)])
        self.attention_mask = torch.cat(
            [_pad_left(self.attention_mask, width, dim=1), _pad_left(other.attention_mask, width, dim=1)]
        )  # (B+B', W)
        self.next_positions = torch.cat([self.next_positions, other.next_positions])  # (B+B',)


def _pad_left(t: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` on the left along ``dim`` to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim) + [missing, 0]  # F.pad lists the last dimension first
    return torch.nn.functional.pad(t, pad)


def left_pad(sequences: Sequence[Sequence[int]], *, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one (B, L) tensor; returns ``(input_ids, attention_mask)``."""
    if len(sequences) == 0:
        raise ValueError("expected at least one sequence, got none")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, L)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, L) position ids counting real tokens only (0 on the padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _cache_kwarg(decoder: torch.nn.Module) -> str:
    """The decoder's name for the KV-cache argument: ``cache`` (transformers >= 5.x renamed it)
    or ``past_key_values`` (older releases, and the deprecated alias that warns on every call)."""
    return _cache_kwarg_of(type(decoder))


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def prefill(
    model: VisionLanguageModel,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DecodeState]:
    """Run the prompts through the model and start a KV cache.

    Args:
        model: the vision-language model.
        input_ids: (B, L) left-padded prompts; image positions hold ``model.image_token_id``.
        attention_mask: (B, L), 1 on real tokens, 0 on the left padding.
        pixel_values: (N, 3, S, S) every image of the batch in reading order.
        image_features: (N, T, D) precomputed ``model.image_features(...)`` instead of pixels.

    Returns:
        ``(logits, state)``: (B, V) float32 next-token logits and the state for ``decode_step``.
    """
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(
            f"expected input_ids and attention_mask of the same shape (B, L), got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("expected every prompt to have at least one token, got an empty row")
    embeds = model.embed_inputs(
        input_ids, pixel_values=pixel_values, image_features=image_features
    )  # (B, L, D)
    positions = positions_from_mask(attention_mask)  # (B, L)
    cache = DynamicCache(config=model.decoder.config)
    out = model.decoder(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions,
        **{_cache_kwarg(model.decoder): cache},
        use_cache=True,
        logits_to_keep=1,  # left padding: the last position is every row's last real token
    )
    state = DecodeState(cache=cache, attention_mask=attention_mask, next_positions=positions[:, -1] + 1)
    return out.logits[:, -1].float(), state  # (B, V)


@torch.inference_mode()
def decode_step(model: VisionLanguageModel, *, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per row; the cache and ``state`` advance by one position.

    A generated ``<image>`` id is embedded as a plain token (there are no features for it).

    Args:
        model: the model ``state`` was prefilled with.
        state: from ``prefill`` (updated in place).
        token_ids: (B,) the tokens just chosen.

    Returns:
        (B, V) float32 logits for the token after ``token_ids``.
    """
    if token_ids.shape != (state.batch_size,):
        raise ValueError(f"token_ids: expected shape ({state.batch_size},), got {tuple(token_ids.shape)}")
    embeds = model.decoder.get_input_embeddings()(token_ids.unsqueeze(-1))  # (B, 1, D)
    ones = torch.ones_like(state.attention_mask[:, :1])  # (B, 1)
    mask = torch.cat([state.attention_mask, ones], dim=-1)  # (B, L_seen + 1)
    out = model.decoder(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=state.next_positions.unsqueeze(-1),  # (B, 1)
        **{_cache_kwarg(model.decoder): state.cache},
        use_cache=True,
    )
    state.attention_mask = mask
    state.next_positions = state.next_positions + 1
    return out.logits[:, -1].float()  # (B, V)


# ----------------------------------------------------------------------------- generate


def default_stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's ``<|im_end|>`` (when it has one) and its eos token."""
    ids: list[int] = []
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if im_end is not None and tokenizer.convert_ids_to_tokens(im_end) == IM_END:
        ids.append(int(im_end))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _configs(
    config: GenerationConfig | Sequence[GenerationConfig] | None, batch: int
) -> list[GenerationConfig]:
    if config is None:
        return [GenerationConfig()] * batch
    if isinstance(config, GenerationConfig):
        return [config] * batch
    configs = list(config)
    if len(configs) != batch or not all(isinstance(c, GenerationConfig) for c in configs):
        raise ValueError(f"config: expected one GenerationConfig or a list of {batch}, got {config!r}")
    return configs


def _stack_media(
    media: Sequence[torch.Tensor | None] | None,
    *,
    input_ids: Sequence[Sequence[int]],
    image_token_id: int,
    tokens_per_image: int | None,
    name: str,
) -> torch.Tensor | None:
    """Check each row's image count against its image tokens; concatenate in reading order."""
    if media is None:
        return None
    if len(media) != len(input_ids):
        raise ValueError(
            f"{name}: expected one entry (tensor or None) per prompt ({len(input_ids)}), got {len(media)}"
        )
    parts = []
    for i, (m, ids) in enumerate(zip(media, input_ids)):
        n_slots = sum(1 for t in ids if t == image_token_id)
        n = 0 if m is None else int(m.shape[0])
        per = tokens_per_image if tokens_per_image is not None else (int(m.shape[1]) if m is not None else 0)
        if n * per != n_slots:
            raise ValueError(
                f"prompt {i}: has {n_slots} image-token positions ({per} per image) but {n} "
                f"{'images' if name == 'images' else 'feature sets'} were given in {name}[{i}]"
            )
        if m is not None and n:
            parts.append(m)
    return torch.cat(parts) if parts else None


class IncrementalText:
    """The text of a growing list of token ids, decoded a few tokens at a time.

    Decoding the whole list at every new token costs O(n) per token, O(n^2) per answer. Here
    each step decodes only the tokens since the last emitted text plus the ones before them
    (``prefix``..end against ``prefix``..``read``): both decodes start at the same token, so
    whatever a tokenizer does at the start of a decode (a SentencePiece leading space) cancels
    out, and the difference is the new text. A step whose new text ends in an incomplete
    multi-byte character (U+FFFD) emits nothing until the character completes. For byte-level
    BPE the joined text equals ``tokenizer.decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self) -> None:
        self.text = ""
        self.prefix = 0  # first token of the decode window
        self.read = 0  # tokens already turned into ``text``
        self._before: str | None = None  # the decode of ``prefix``..``read``, kept until they move

    def update(self, tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
        """``text`` after ``ids`` (the same list as before, grown at the end)."""
        if len(ids) <= self.read:
            return self.text
        if self._before is None:
            self._before = tokenizer.decode(ids[self.prefix : self.read], skip_special_tokens=True)
        before = self._before
        after = tokenizer.decode(ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and after.startswith(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read, self._before = self.read, len(ids), None
        return self.text


class RowState:
    """One row while it decodes: its sampling knobs, its tokens so far, and whether it is done.

    ``generate`` and the serving engine keep one per prompt; ``push`` applies the stopping rules
    (a stop token id, a stop string, ``max_new``), so both stop a row the same way.

    Args:
        cfg: the row's knobs (``max_new_tokens`` is capped by ``max_new``).
        stop_ids: token ids that end the row (the stop token counts as generated).
        generator: the row's own RNG for sampling; None uses the global one.
        num_prompt: the prompt's length (reported in the result).
        max_new: the most tokens this row may generate (``max_new_tokens`` or less when the
            context would overflow).
    """

    def __init__(
        self,
        *,
        cfg: GenerationConfig,
        stop_ids: set[int],
        generator: torch.Generator | None,
        num_prompt: int,
        max_new: int,
        prompt: Sequence[int] = (),
    ) -> None:
        self.cfg = cfg
        self.stop_ids = stop_ids
        self.generator = generator
        self.num_prompt = num_prompt
        self.max_new = max_new
        self.prompt = list(prompt) if cfg.repetition_penalty != 1.0 else []  # kept for the repetition penalty only
        self.ids: list[int] = []
        self.counts: dict[int, int] = {}  # generated token id -> times (frequency/presence penalties)
        self.logprobs: list[TokenLogprob] = []  # filled by decode_tokens when cfg.logprobs is set
        self._seen: torch.Tensor | None = None
        self._seen_upto = 0
        self.text = ""
        self.finish: str | None = None
        self.stop: int | str | None = None
        self.cancelled = False  # set by a consumer that went away; the row leaves the batch
        self.track_text = False  # keep ``text`` current at every token (stop strings set it too)
        self._incremental = IncrementalText()

    @classmethod
    def for_prompt(
        cls,
        model: VisionLanguageModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt: Sequence[int],
        cfg: GenerationConfig,
        *,
        seed_offset: int = 0,
        where: str = "input_ids",
    ) -> RowState:
        """The row for ``prompt``: default stop ids, its generator (seeded ``cfg.seed +
        seed_offset``), ``max_new`` capped by the decoder's context. Raises ValueError for a
        prompt that fills the context."""
        max_pos = int(getattr(model.decoder.config, "max_position_embeddings", 0) or 0)
        if max_pos and len(prompt) >= max_pos:
            raise ValueError(
                f"{where}: expected a prompt shorter than the decoder's {max_pos} positions, got {len(prompt)} tokens"
            )
        gen = torch.Generator().manual_seed(cfg.seed + seed_offset) if cfg.seed is not None else None
        max_new = cfg.max_new_tokens if not max_pos else min(cfg.max_new_tokens, max_pos - len(prompt))
        stops = set(cfg.stop_token_ids if cfg.stop_token_ids is not None else default_stop_token_ids(tokenizer))
        return cls(cfg=cfg, stop_ids=stops, generator=gen, num_prompt=len(prompt), max_new=max_new, prompt=prompt)

    def seen_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """(V,) True at every token id of the prompt and of the answer so far (kept up to date
        a token at a time)."""
        if self._seen is None:
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._seen[torch.tensor([t for t in self.prompt if 0 <= t < vocab], dtype=torch.long, device=device)] = True
        if self._seen_upto < len(self.ids):
            new = [t for t in self.ids[self._seen_upto :] if 0 <= t < vocab]
            self._seen[torch.tensor(new, dtype=torch.long, device=device)] = True
            self._seen_upto = len(self.ids)
        return self._seen

    @property
    def done(self) -> bool:
        return self.finish is not None or self.cancelled

    def push(self, token: int, tokenizer: PreTrainedTokenizerBase) -> None:
        """Append ``token``; set ``finish`` if the row is done."""
        self.ids.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if token in self.stop_ids:
            self.finish, self.stop = FINISH_STOP, token
            self.text = tokenizer.decode(self.ids[:-1], skip_special_tokens=True)
            return
        before = len(self.text)
        if self.cfg.stop_strings or self.track_text:
            # The text grows a few characters a token (IncrementalText: multi-byte characters
            # that span tokens wait until complete); only the tail that can hold a new match is
            # searched: the new characters and the `longest - 1` before them.
            self.text = self._incremental.update(tokenizer, self.ids)
        if self.cfg.stop_strings and len(self.text) > before:
            longest = max(len(s) for s in self.cfg.stop_strings)
            start = max(0, before - longest + 1)
            hits = [(self.text.find(s, start), s) for s in self.cfg.stop_strings]
            hits = [(at, s) for at, s in hits if at >= 0]
            if hits:
                at, s = min(hits)
                self.text = self.text[:at]
                self.finish, self.stop = FINISH_STOP, s
                return
        if len(self.ids) >= self.max_new:
            self.finish = FINISH_LENGTH

    def result(self, tokenizer: PreTrainedTokenizerBase) -> GenerationResult:
        if self.finish != FINISH_STOP:  # stopped rows already hold their final text
            self.text = tokenizer.decode(self.ids, skip_special_tokens=True)
        return GenerationResult(
            text=self.text,
            token_ids=list(self.ids),
            finish_reason=self.finish or FINISH_LENGTH,
            num_prompt_tokens=self.num_prompt,
            num_generated_tokens=len(self.ids),
            stop=self.stop,
            logprobs=self.content_logprobs() if self.cfg.logprobs is not None else None,
        )

    def content_logprobs(self) -> list[TokenLogprob]:
        """The log probabilities of the answer's tokens: all but a stop token."""
        return self.logprobs[: len(self.ids) - 1] if isinstance(self.stop, int) else list(self.logprobs)


@dataclass
class Prompts:
    """Prompts to start decoding: one ``RowState`` per prompt, the unpadded token ids (image
    token ids where images go), and every image of the group in reading order as pixels
    (N, 3, S, S) or precomputed ``model.image_features`` (N, T, D)."""

    rows: list[RowState]
    input_ids: list[list[int]]
    pixel_values: torch.Tensor | None = None
    image_features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.input_ids):
            raise ValueError(f"rows: expected one per prompt ({len(self.input_ids)}), got {len(self.rows)}")


def _start(model: VisionLanguageModel, batch: Prompts) -> tuple[torch.Tensor, DecodeState]:
    p = next(model.parameters())
    ids, mask = left_pad(batch.input_ids, pad_token_id=model.pad_token_id)  # (B, L)
    px, ft = batch.pixel_values, batch.image_features
    return prefill(
        model,
        input_ids=ids.to(p.device),
        attention_mask=mask.to(p.device),
        pixel_values=None if px is None else px.to(p.device, p.dtype),
        image_features=None if ft is None else ft.to(p.device, p.dtype),
    )  # (B, V) logits


def decode_tokens(
    model: VisionLanguageModel,
    batch: Prompts,
    *,
    join: Callable[[int], Prompts | None] | None = None,
) -> Iterator[list[tuple[RowState, int]]]:
    """Prefill a group of prompts, then decode step by step.

    Each step yields ``[(row, token), ...]`` for every live row; the consumer pushes the tokens
    into its rows. Before the next step, every row whose ``done`` is true (finished, or
    cancelled by another thread) leaves the batch and its KV cache. Then ``join`` (if given) is
    called with the number of live rows and may return more prompts: they are prefilled and
    join the running batch (continuous batching). The generator ends when no row is live and
    nothing joins. Closing it early stops the decoding.

    No inference_mode block spans the yields (it would leak into the consumer's code): prefill
    and decode_step carry their own.
    """
    live: list[RowState] = []
    state: DecodeState | None = None
    logits = torch.empty(0)
    pending: Prompts | None = batch
    while True:
        if pending is not None and pending.rows:
            new_logits, new_state = _start(model, pending)  # (B_new, V)
            if live:
                state.extend(new_state)
                logits = torch.cat([logits, new_logits])  # (B_live + B_new, V)
            else:
                state, logits = new_state, new_logits
            live = live + pending.rows
            keep = [j for j, r in enumerate(live) if not r.done]  # cancelled while waiting
            if len(keep) < len(live):
                logits, live = logits[keep], [live[j] for j in keep]
                if keep:
                    state.select(keep)
        if not live:
            return
        with torch.inference_mode():
            next_ids = sample_next(
                apply_penalties(logits, live),
                temperature=torch.tensor([r.cfg.temperature for r in live]),
                top_p=torch.tensor([r.cfg.top_p for r in live]),
                top_k=torch.tensor([r.cfg.top_k or 0 for r in live]),
                generators=[r.generator for r in live],
            )  # (B_live,)
            asked = [j for j, r in enumerate(live) if r.cfg.logprobs is not None]
            if asked:
                k = max(live[j].cfg.logprobs or 0 for j in asked)
                for j, lp in zip(asked, token_logprobs(logits[asked], next_ids[asked], k)):
                    lp.top = lp.top[: live[j].cfg.logprobs]
                    live[j].logprobs.append(lp)
        yield list(zip(live, next_ids.tolist()))
        keep = [j for j, r in enumerate(live) if not r.done]
        if len(keep) < len(live):
            live = [live[j] for j in keep]
            if keep:
                state.select(keep)
                next_ids = next_ids[keep]
        if live:
            logits = decode_step(model, state=state, token_ids=next_ids)  # (B_live, V)
        pending = join(len(live)) if join is not None else None


def generate(
    model: VisionLanguageModel,
    *,
    input_ids: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerBase,
    config: GenerationConfig | Sequence[GenerationConfig] | None = None,
    images: Sequence[torch.Tensor | None] | None = None,
    image_features: Sequence[torch.Tensor | None] | None = None,
) -> list[GenerationResult]:
    """Generate a continuation for each prompt, batched, with a KV cache.

    Args:
        model: the vision-language model (put it in ``eval()`` mode first).
        input_ids: one token list per prompt (e.g. ``vlm.chat.encode_chat(...).input_ids``),
            with ``model.tokens_per_image`` image ids per image.
        tokenizer: decodes the answers; gives the default stop token ids.
        config: one ``GenerationConfig`` for every row, or one per row.
        images: per prompt, its images as an (N_i, 3, S, S) pixel tensor, or None when it has
            none. Rows with no images may also be left out entirely by passing None.
        image_features: per prompt, precomputed (N_i, T, D) ``model.image_features`` (a cache
            of encoder outputs) or None; give either ``images`` or ``image_features``.

    Returns:
        One ``GenerationResult`` per prompt, in order.
    """
    if images is not None and image_features is not None:
        raise ValueError("expected either images or image_features, got both")
    prompts = [list(map(int, p)) for p in input_ids]
    if not prompts:
        return []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"input_ids[{i}]: expected a non-empty prompt, got []")
    configs = _configs(config, len(prompts))
    image_id = model.image_token_id
    pixels = _stack_media(
        images, input_ids=prompts, image_token_id=image_id, tokens_per_image=model.tokens_per_image, name="images"
    )
    feats = _stack_media(
        image_features, input_ids=prompts, image_token_id=image_id, tokens_per_image=None, name="image_features"
    )
    if pixels is None and feats is None and any(image_id in p for p in prompts):
        raise ValueError("the prompts hold image tokens but neither images nor image_features were given")

    shared = isinstance(config, GenerationConfig)
    rows = [
        RowState.for_prompt(model, tokenizer, p, cfg, seed_offset=i if shared else 0, where=f"input_ids[{i}]")
        for i, (p, cfg) in enumerate(zip(prompts, configs))
    ]
    for step in decode_tokens(model, Prompts(rows, prompts, pixel_values=pixels, image_features=feats)):
        for row, token in step:
            row.push(token, tokenizer)
    return [r.result(tokenizer) for r in rows]
