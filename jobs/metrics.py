"""Training metrics: the FLOP formula behind MFU, peak memory, and the CSV/TensorBoard/PNG sinks.

FLOPs per sample (fwd + bwd), PaLM's accounting (Chowdhery et al. 2022, App. B): a matmul
parameter costs 2 FLOPs per token forward, 4 backward (activation + weight gradient), so a
trained tower costs ``6 N T``; attention scores and values add ``12 L d T^2`` per sequence
(6 of them forward + backward over ``2 L d T^2``). A frozen tower that nothing upstream
needs gradients through costs ``2 N T`` (forward only); a frozen decoder in LLaVA's
alignment phase still back-propagates into the projector: ``4 N T``. Embedding tables are
excluded from N (lookups, not matmuls); the decoder's output head is a matmul and counts, also
when it shares its weight with the input embedding table (tied, as in Qwen2-0.5B, where it is
136M of the 494M parameters). Training projects only the supervised positions onto the
vocabulary (``vlm.losses.supervised_loss``), so the head counts over those tokens alone.

    stage 1:  F = Fv(T_img = patches + 1) + Ft(T_txt = mean caption tokens)
    stage 2:  F = images * Fv(T = patches + 1) + Fproj + Fdec(T_seq = mean tokens)
                + Fhead(T_sup = mean supervised tokens)
    MFU = F * samples/s / (workers * peak FLOP/s)
"""

from __future__ import annotations

import csv
import math
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from vlm.llava import VisionLanguageModel

GPU_PEAK_TFLOPS = 790.0  # H100 bf16 dense matmul as measured here (shared/ANCHORS.md)


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, the full count under ZeRO-3 (whose local tensor is a shard)."""
    return int(getattr(p, "ds_numel", p.numel()))


def matmul_params(module: nn.Module, cache: dict[int, tuple[int, int]] | None = None) -> tuple[int, int]:
    """(all, trainable) parameters of matrix products: embedding tables excluded (a look-up is
    not a product), except one tied to an output projection (``nn.Linear``), which is a product;
    ``cache`` keeps counts per module (a training loop counts once, not every step: freeze flags
    do not change mid-run)."""
    if cache is not None and id(module) in cache:
        return cache[id(module)]
    linear = {id(p) for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    emb = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()} - linear
    total = sum(numel(p) for p in module.parameters() if id(p) not in emb)
    train = sum(numel(p) for p in module.parameters() if id(p) not in emb and p.requires_grad)
    if cache is not None:
        cache[id(module)] = (total, train)
    return total, train


def tower_flops(n_params: int, tokens: float, *, layers: int, width: int, mode: str) -> float:
    """FLOPs of one sequence through a transformer tower; ``mode`` is train | backprop | forward."""
    mult = {"train": 6, "backprop": 4, "forward": 2}[mode]
    return mult * n_params * tokens + (mult * 2) * layers * width * tokens * tokens


def _mode(module: nn.Module, *, upstream_needs_grad: bool) -> str:
    if any(p.requires_grad for p in module.parameters()):
        return "train"
    return "backprop" if upstream_needs_grad else "forward"


def _hf(module: nn.Module, *names: str) -> int:
    cfg = getattr(module, "config", None)
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return int(v)
    return 0


def contrastive_flops(model: nn.Module, *, caption_tokens: float, cache: dict | None = None) -> float:
    """FLOPs per stage-1 sample (image + caption), fwd + bwd.

    Each tower counts by its own parameters (trained: 6 N T; locked: 2 N T, the forward only);
    each projection once per sample (it maps the pooled embedding): 2 N forward, + 2 N for its
    weight gradient when trained, + 2 N for the gradient into a trained tower."""
    cfg = model.cfg
    flops = 0.0
    for tower, proj, tokens, layers, width in (
        (model.vision, model.image_proj, cfg.vision.num_patches + 1, cfg.vision.num_layers, cfg.vision.hidden_size),
        (model.text, model.text_proj, caption_tokens, _hf(model.text, "num_hidden_layers"), _hf(model.text, "hidden_size")),
    ):
        mode = _mode(tower, upstream_needs_grad=False)
        flops += tower_flops(matmul_params(tower, cache)[0], tokens, layers=layers, width=width, mode=mode)
        flops += (2 + 2 * proj.weight.requires_grad + 2 * (mode == "train")) * numel(proj.weight)
    return flops


def output_projection_params(decoder: nn.Module) -> int:
    """Parameters of a causal LM's output projection (vocabulary x width), 0 where it has none."""
    from vlm.towers import output_head  # here: this module stays light for the driver's metrics readers

    head = output_head(decoder)
    return sum(numel(p) for p in head.parameters()) if head is not None else 0


def sft_flops(
    model: VisionLanguageModel, *, seq_tokens: float, images_per_sample: float, supervised_tokens: float | None = None,
    cache: dict | None = None,
) -> float:
    """FLOPs per stage-2 sample (its images and its token sequence), fwd + bwd.

    The decoder's output projection counts over ``supervised_tokens`` (the positions with a
    label: ``VisionLanguageModel.forward`` projects only those when training, for a decoder
    that ``decoder_parts`` splits), over every token when None or when the decoder makes all
    its logits itself. A decoder trained in part (LoRA adapters on frozen weights) counts the
    forward and the gradient into its activations (4 N T) for every product and the weight
    gradient (2 N T) only for its trained parameters."""
    cfg = model.cfg
    n_vis = cfg.vision.num_patches + 1
    proj_needs = any(p.requires_grad for p in model.projector.parameters())
    dec_mode = _mode(model.decoder, upstream_needs_grad=True)
    fv = tower_flops(
        matmul_params(model.vision, cache)[0], n_vis, layers=cfg.vision.num_layers, width=cfg.vision.hidden_size,
        mode=_mode(model.vision, upstream_needs_grad=False),
    )
    fp = (6 if proj_needs else 4) * matmul_params(model.projector, cache)[0] * cfg.image_tokens
    head = output_projection_params(model.decoder)
    total, trained = matmul_params(model.decoder, cache)
    fd = tower_flops(
        total - head, seq_tokens, layers=_hf(model.decoder, "num_hidden_layers"), width=_hf(model.decoder, "hidden_size"), mode=dec_mode,
    )
    from vlm.towers import output_head

    head_mod = output_head(model.decoder)
    head_trained = head_mod is not None and any(p.requires_grad for p in head_mod.parameters())
    head_mode = "backprop" if dec_mode == "train" and not head_trained else dec_mode
    if dec_mode == "train":  # a partly trained decoder (LoRA adapters): no weight gradient (2 N T) for its frozen products
        fd -= 2 * (total - trained - (0 if head_trained else head)) * seq_tokens
    supervised_only = supervised_tokens is not None and model.decoder_parts()[1] is not None
    fh = tower_flops(head, supervised_tokens if supervised_only else seq_tokens, layers=0, width=0, mode=head_mode)
    return images_per_sample * (fv + fp) + fd + fh


def peak_flops(device: torch.device, peak_tflops: float) -> float:
    """Peak FLOP/s of one worker: the configured figure, else the H100 bf16 figure on a GPU, else nan."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    return GPU_PEAK_TFLOPS * 1e12 if device.type == "cuda" else math.nan


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory (allocated tensors) on GPU; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def zero_memory_formula(params: int, stage: int, world: int) -> float:
    """Bytes of model + optimizer state per rank, mixed-precision Adam (ZeRO paper, Sec. 3)."""
    p = float(params)
    return {0: 16 * p, 1: 4 * p + 12 * p / world, 2: 2 * p + 14 * p / world, 3: 16 * p / world}[stage]


# ----------------------------------------------------------------------------- sinks


class MetricsLog:
    """``metrics.csv`` + TensorBoard under a run directory; rows past ``resume_step`` are dropped.

    A restarted run truncates the CSV to the checkpoint it resumed from, so each step appears
    exactly once however many times the workers died.

    A row's ``time`` (the Unix time, in the CSV) goes to TensorBoard as ``elapsed_s``, the seconds
    since the run's first step: TensorBoard keeps scalars as float32, which holds a Unix time only
    to a couple of minutes, so every step would read the same value.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = read_metrics(self.path, up_to=resume_step)
        self.fields: list[str] = list(dict.fromkeys(k for r in self.rows for k in r))  # every column kept, first seen first
        self._rewrite()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is optional
                self.tb = None

    def _rewrite(self) -> None:
        with self.path.open("w", newline="") as f:
            if self.fields:
                w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(self.rows)

    def log(self, rec: dict[str, Any]) -> None:
        new = [k for k in rec if k not in self.fields]
        self.rows.append(rec)
        if new:
            self.fields += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(rec)
        if self.tb is not None:
            t0 = next((r["time"] for r in self.rows if isinstance(r.get("time"), (int, float))), None)
            for k, v in rec.items():
                if k == "time" and t0 is not None and isinstance(v, (int, float)):
                    k, v = "elapsed_s", v - t0
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, int(rec["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def step_bar(stage: str, total: int, start: int) -> Any:
    """Rank 0's step bar, drawn by the driver (Ray's distributed tqdm: the worker sends the bar's
    state at most once a second and the driver draws one bar under the log lines; a plain tqdm
    in a worker writes carriage returns into its log, which reach the driver as a new line at
    every flush).

    The state goes to the worker's stdout as one write. tqdm_ray sends it with ``print``, which
    Ray Train patches in its workers to also log the line: the driver got every state twice, and
    the second "closed" state drew the finished bar again as a new one that stayed on screen for
    the rest of the driver's life (the flow's later stages)."""
    import json
    import time

    from ray.experimental import tqdm_ray

    class _Bar(tqdm_ray.tqdm):
        def _dump_state(self, force_flush: bool = False) -> None:
            now = time.time()
            if not force_flush and now - self._last_flush_time < self._flush_interval_s:
                return
            self._last_flush_time = now
            sys.stdout.write(json.dumps(self._get_state()) + "\n")
            sys.stdout.flush()

    bar = _Bar(total=total, desc=stage, unit="step")
    bar.n = start
    return bar


def truncate_jsonl(path: str | Path, *, up_to_step: int) -> None:
    """Keep the lines of a JSON-lines file whose ``step`` is <= ``up_to_step`` (a restart's trace)."""
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= up_to_step] if p.is_file() else []
    p.write_text("".join(ln + "\n" for ln in keep))


def read_metrics(path: str | Path, *, up_to: int | None = None) -> list[dict[str, Any]]:
    """Rows of a ``metrics.csv`` as floats (``step`` as int), optionally only steps <= ``up_to``."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return []
    rows = []
    with p.open() as f:
        for r in csv.DictReader(f):
            rec: dict[str, Any] = {}
            for k, v in r.items():
                if v in ("", None):
                    continue
                try:
                    rec[k] = int(v) if k == "step" else float(v)
                except ValueError:
                    rec[k] = v
            if up_to is None or rec.get("step", 0) <= up_to:
                rows.append(rec)
    return rows


def save_curves(rows: list[dict[str, Any]], path: str | Path, *, title: str) -> Path:
    """A PNG of loss, learning rate, grad norm and throughput against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "eval_loss") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([s for s, _ in pts], [v for _, v in pts], lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
