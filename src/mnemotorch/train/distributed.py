"""Process groups, model wrapping (DDP / FSDP2) and collective helpers.

Only PyTorch's own machinery is used: ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``,
:func:`setup_distributed` joins the process group (gloo on CPU, nccl on CUDA), and
:func:`wrap_model` applies ``DistributedDataParallel`` or FSDP2's ``fully_shard`` (per
transformer block, then the root). A single process is the degenerate case of every helper, so the
trainer has one code path.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "setup_distributed",
    "teardown_distributed",
    "wrap_model",
    "unwrap_model",
    "all_reduce_sum",
    "barrier",
    "no_sync",
    "full_model_state_dict",
    "full_optimizer_state_dict",
    "load_full_optimizer_state_dict",
]


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    mode: str  # "none" | "ddp" | "fsdp2"
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    #: True when this module created the process group (and so must destroy it).
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.mode != "none"


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` picks CUDA when available; under torchrun each process takes ``cuda:LOCAL_RANK``."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(mode: str, device: str) -> DistInfo:
    """Join the process group if launched with ``WORLD_SIZE > 1`` (torchrun) and pick the device.

    Args:
        mode: "auto" (DDP when WORLD_SIZE > 1, else none), "none", "ddp" or "fsdp2".
        device: "auto", "cpu" or "cuda".
    """
    if mode not in ("auto", "none", "ddp", "fsdp2"):
        raise ValueError(f"distributed must be 'auto', 'none', 'ddp' or 'fsdp2', got {mode!r}")
    world_size = _env_world_size()
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    if mode == "auto":
        mode = "ddp" if world_size > 1 else "none"
    if mode == "none" and world_size > 1:
        raise RuntimeError(
            f"distributed='none' but WORLD_SIZE={world_size}: every process would train the whole "
            "model alone and write the same files; use distributed='ddp' or 'fsdp2' under torchrun"
        )
    if mode == "none":
        return DistInfo("none", 0, 1, 0, resolve_device(device))

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    owns = False
    if not dist.is_initialized():
        if "RANK" not in os.environ and world_size == 1:
            # A 1-process "distributed" run outside torchrun (handy for debugging FSDP2/DDP code paths).
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistInfo(mode, dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=owns)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        info.owns_group = False


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks: the children of the largest ``nn.ModuleList`` in the model."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    return list(best) if best is not None else []


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap for data parallelism: DDP, or FSDP2 (``fully_shard`` per block, then the root).

    The model must already be on ``info.device`` with its final weights (e.g. loaded from a
    checkpoint): DDP broadcasts rank 0's weights, FSDP2 shards whatever each rank holds.
    """
    if info.mode == "none":
        return model
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if info.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in _transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown distributed mode {info.mode!r}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 modifies the module in place, nothing to unwrap)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def no_sync(model: nn.Module, info: DistInfo, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter on accumulation micro-steps (``skip=True``)."""
    if not skip or info.mode == "none":
        yield
    elif info.mode == "ddp":
        with model.no_sync():  # type: ignore[operator]
            yield
    else:  # FSDP2: defer the reduce-scatter to the last micro-step
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (gloo has no AVG, so means are sums divided by a count)."""
    if info.is_distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


def _sd_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """Unsharded CPU state dict on rank 0 for FSDP2 (a collective: call on every rank); else None.

    ``None`` means "the unwrapped module's own parameters are already full" (single process, DDP).
    """
    if info.mode != "fsdp2":
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_sd_options(full_state_dict=True, cpu_offload=True))
    # Gathering turns tied parameters (embedding == output head) into separate CPU copies; drop
    # the aliases so the file matches what save_pretrained writes for an unsharded model.
    first_name: dict[int, str] = {}
    for name, p in unwrap_model(model).named_parameters(remove_duplicate=False):
        if id(p) in first_name:
            state.pop(name, None)
        else:
            first_name[id(p)] = name
    return state


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict[str, Any]:
    """Optimizer state keyed by parameter names (not ids), full tensors on CPU.

    Keying by names makes the checkpoint independent of the wrapper: a run saved under FSDP2 can
    resume on one process and vice versa. A collective under FSDP2 (call on every rank); rank 0
    holds the result (other ranks get an empty dict).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    opts = _sd_options(full_state_dict=True, cpu_offload=info.mode == "fsdp2")
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                                   info: DistInfo) -> None:
    """Inverse of :func:`full_optimizer_state_dict` (every rank passes the full state it read)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_sd_options(full_state_dict=True))
