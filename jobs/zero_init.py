"""ZeRO-3 model construction: every parameter partitioned over the ranks as it is created.

``deepspeed.zero.Init`` partitions a module's parameters when its ``__init__`` returns, so a
model larger than one device (or one host) never exists whole. Anything that writes a weight
*after* the module that owns it was built then sees an empty shard: transformers' ``post_init``
(``_init_weights`` of every tower), our own head initialisations in ``vlm/``, and any weight
loading. ``partitioned_build`` makes each of those go through
``deepspeed.zero.GatheredParameters(..., modifier_rank=0)`` (gather, write, broadcast rank 0's
values, re-partition), one module at a time, so the peak is one module's full weights.

The build draws from the random stream exactly as the unpartitioned build does (every rank runs
the same initialisations in the same order on gathered tensors; a pretrained tower's load draws
nothing, as a plain load of a complete checkpoint), so with the same seed the partitioned model
holds exactly the weights ``build_model`` gives without ZeRO-3 (on CPU; a GPU build draws from
the GPU's random stream): turning ``job.zero_init`` on does not change a run.

How transformers takes part (transformers 5.x, ``transformers.integrations.deepspeed``): while a
DeepSpeed config is registered with it (``HfDeepSpeedConfig``; we register a minimal stand-in,
the real one also requires accelerate), ``is_deepspeed_zero3_enabled()`` is true and

- ``from_pretrained`` builds the tower under ``zero.Init`` and loads the checkpoint into the
  partitioned parameters (``_load_state_dict_into_zero3_model``: rank 0 reads, each module is
  gathered and written); ``resize_token_embeddings`` gathers too;
- ``from_config`` would build with the weight initialisation switched off and re-run it on rank 0
  only (``initialize_weights_zero3``), a different random stream than the plain build. We build
  from configs inside transformers' ``set_zero3_state`` instead (it marks ``zero.Init`` as already
  active, ours) so the plain construction runs, and make ``PreTrainedModel.init_weights`` gather.

Checkpoints of our own format load through ``load_partitioned`` (rank 0 reads one module's
tensors at a time from the safetensors file). DeepSpeed's own checkpoints (resume) load through
``engine.load_checkpoint``, which is partition-aware. This module imports deepspeed: it belongs
to ``jobs/``, never to ``vlm/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

# torch.nn.init functions a module may apply to a child's weight after the child was built
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_", "xavier_normal_",
    "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "orthogonal_", "sparse_",
)


class _Zero3Config:
    """What transformers asks of its ``HfDeepSpeedConfig`` (which also needs accelerate installed)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return True


def is_partitioned(t: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter whose full data is not on this rank right now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return hasattr(t, "ds_id") and getattr(t, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE


def _gathered_init_function(fn: Callable) -> Callable:
    """``torch.nn.init.X`` that gathers a partitioned tensor first (every rank calls it alike)."""
    import deepspeed

    def wrapped(tensor: torch.Tensor, *args: Any, **kwargs: Any):
        if not is_partitioned(tensor):
            return fn(tensor, *args, **kwargs)
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
            fn(tensor, *args, **kwargs)
        return tensor

    return wrapped


def _gathered_init_weights(model: nn.Module) -> None:
    """``PreTrainedModel.init_weights`` on a partitioned model: transformers' own traversal
    (``initialize_weights``: children first, each sub-model with its own ``_initialize_weights``),
    with each module's parameters and its plain children's gathered around its initialisation.
    Every rank runs it (same random stream everywhere; rank 0's values are kept)."""
    import deepspeed
    from transformers import PreTrainedModel
    from transformers.initialization import guard_torch_init_functions

    custom = model.is_remote_code() if hasattr(model, "is_remote_code") else False

    def visit(module: nn.Module, fn: Callable) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        params = list(module.parameters(recurse=False))
        for child in module.children():  # _init_weights may write a direct child's weight
            if not isinstance(child, PreTrainedModel):
                params += list(child.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            fn(module, custom)

    with torch.no_grad(), guard_torch_init_functions():
        visit(model, model._initialize_weights)
    model.tie_weights(recompute_mapping=False)


@contextlib.contextmanager
def partitioned_build(ds_config: dict[str, Any], *, remote_device: str | None = None) -> Iterator[None]:
    """Build models inside this context to get them partitioned as ZeRO-3 (``ds_config``) says.

    Collective: every rank must run the same construction code. Call it after
    ``deepspeed.init_distributed`` (it partitions over DeepSpeed's communicator).

    Args:
        ds_config: the run's DeepSpeed config (``zero_optimization.stage`` must be 3).
        remote_device: where partitions live (``"cpu"`` with parameter offload; None: the
            accelerator, or the CPU on a CPU run).
    """
    import deepspeed
    import transformers.modeling_utils as modeling_utils
    from transformers import PreTrainedModel
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    stage = ds_config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(f"partitioned_build: expected a ZeRO stage-3 DeepSpeed config, got stage {stage!r}")
    hf_config = _Zero3Config(ds_config)
    set_hf_deepspeed_config(hf_config)  # transformers keeps a weak reference: it acts while this lives
    from_config = PreTrainedModel.__dict__["_from_config"]
    from_pretrained = PreTrainedModel.__dict__["from_pretrained"]
    init_weights = PreTrainedModel.init_weights
    originals = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}

    def _from_config(cls, config, **kwargs):
        with modeling_utils.set_zero3_state():  # our zero.Init is active: construct as without ZeRO
            return from_config.__func__(cls, config, **kwargs)

    def _from_pretrained(cls, *args, **kwargs):
        # transformers' ZeRO-3 load initialises the empty tower before loading into it; a plain load
        # of a complete checkpoint draws nothing from the random stream: keep the stream as it was
        with torch.random.fork_rng(devices=[]):
            return from_pretrained.__func__(cls, *args, **kwargs)

    try:
        PreTrainedModel._from_config = classmethod(_from_config)
        PreTrainedModel.from_pretrained = classmethod(_from_pretrained)
        PreTrainedModel.init_weights = _gathered_init_weights
        for name, fn in originals.items():
            setattr(torch.nn.init, name, _gathered_init_function(fn))
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=remote_device):
            yield
    finally:
        PreTrainedModel._from_config = from_config
        PreTrainedModel.from_pretrained = from_pretrained
        PreTrainedModel.init_weights = init_weights
        for name, fn in originals.items():
            setattr(torch.nn.init, name, fn)
        unset_hf_deepspeed_config()
        del hf_config


def load_partitioned(
    model: nn.Module, path: str | Path, *, rank: int, prefix: str = "", optional: Callable[[str], bool] | None = None
) -> None:
    """Load a safetensors file into a model built by ``partitioned_build``, strictly, module by module.

    Rank 0 reads one module's tensors and writes them into its gathered parameters;
    ``GatheredParameters(modifier_rank=0)`` hands them to every rank and re-partitions them.
    Buffers are not partitioned: every rank reads its own. Every rank must call it.

    Args:
        model: the model to fill (every rank passes its own, identical in structure).
        path: a ``model.safetensors`` written by ``vlm.checkpoint.save_checkpoint``.
        rank: this rank (rank 0 reads the parameters).
        prefix: the keys of ``model`` in the file start with this (``"vision."``: a tower of a
            bigger saved model).
        optional: a weight whose key this accepts may be missing from the file (it keeps the
            value it was built with: a LoRA adapter's, ``vlm.lora.is_lora_key``).
    """
    import deepspeed
    from safetensors import safe_open

    persistent = set(model.state_dict().keys())
    # a tensor shared by several names (tied embeddings) is saved under one of them
    aliases: dict[int, list[str]] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), []).append(prefix + n)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        present = set(f.keys())

        def key_of(t: torch.Tensor) -> str | None:
            return next((k for k in aliases[id(t)] if k in present), None)

        missing = sorted(prefix + n for n, t in model.state_dict(keep_vars=True).items() if key_of(t) is None)
        missing = [k for k in missing if optional is None or not optional(k)]
        if missing:
            raise ValueError(f"{path}: expected every weight of the model, missing {missing[:5]}")
        used = {k for names in aliases.values() for k in names}
        unexpected = sorted(k for k in present if k.startswith(prefix) and k not in used)
        if unexpected and not prefix:  # a file holding more than the model (a tower of a bigger model is read with a prefix)
            raise ValueError(f"{path}: holds weights the model does not have: unexpected {unexpected[:5]}")
        for name, module in model.named_modules():
            params = list(module.parameters(recurse=False))
            if params:
                params = [p for p in params if key_of(p) is not None]  # the rest: optional, missing
                with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
                    if rank == 0:
                        for p in params:
                            p.data.copy_(f.get_tensor(key_of(p)).to(p.dtype))
            for n, b in module.named_buffers(recurse=False):
                if (f"{name}.{n}" if name else n) in persistent:
                    b.data.copy_(f.get_tensor(key_of(b)).to(b.dtype))
