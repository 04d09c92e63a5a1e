"""Processes and parallelism: torchrun's environment, DDP or FSDP wrapping, and state dicts
that look the same whichever way the model was trained (full weights, optimizer state keyed by
parameter name), so a checkpoint from N sharded processes resumes or exports in one process."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from gptx.numeric import env_int


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "ddp"  # ddp | fsdp (only meaningful when world > 1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.mode == "fsdp"

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The average of ``t`` over ranks (gloo has no AVG: sum, then divide)."""
        if self.world > 1:
            t = t.clone()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            t = t / self.world
        return t

    def agree_max(self, value: int) -> int:
        """The largest ``value`` over ranks (e.g. a signal one rank received)."""
        if self.world == 1:
            return value
        on_gpu = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
        t = torch.tensor([value], dtype=torch.int64, device="cuda" if on_gpu else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup(device: torch.device, mode: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    world = env_int("WORLD_SIZE", 1, 1)
    if world == 1:
        return Dist(mode=mode)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(torch.distributed.get_rank(), world, env_int("LOCAL_RANK", 0), mode)


def wrap(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """The module the training step calls: DDP, or FSDP2 sharding each block and then the root
    (in place: ``model`` itself holds the shards afterwards)."""
    if dist.world == 1:
        return model
    if dist.sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(train_model: nn.Module, dist: Dist, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if dist.world == 1 or sync:
        return contextlib.nullcontext()
    if dist.sharded:
        train_model.set_requires_gradient_sync(False)
        return _restore_sync(train_model)
    return train_model.no_sync()


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_model_state(model: nn.Module, dist: Dist) -> dict[str, torch.Tensor]:
    """Unsharded weights on CPU (a collective under FSDP: every rank must call it)."""
    if dist.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer, dist: Dist) -> dict:
    """Optimizer state keyed by parameter name (a collective under FSDP)."""
    if dist.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {
        "state": {order[i]: s for i, s in sd["state"].items()},
        "param_groups": [g | {"params": [order[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def load_full_state(model: nn.Module, optimizer, weights: dict, optim_state: dict, dist: Dist) -> None:
    """Inverse of full_model_state/full_optimizer_state, whatever the world size of the writer."""
    if dist.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
        return
    model.load_state_dict(weights, strict=False)  # a tied lm_head is stored once
    index = {n: i for i, n in enumerate(n for g in optimizer.param_groups for n in _names(model, g["params"]))}
    optimizer.load_state_dict({
        "state": {index[n]: s for n, s in optim_state["state"].items()},
        "param_groups": [g | {"params": [index[n] for n in g["params"]]} for g in optim_state["param_groups"]],
    })


def _names(model: nn.Module, params) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in params]
