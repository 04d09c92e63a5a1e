"""Optimizers: AdamW (nanoGPT's, the default) and Muon (the optimizer behind the modded-nanogpt
speedrun records), each building torch's own implementation."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch

import gptx
from gptx.components import Optimizer
from gptx.optim import Chain
from gptx.options import option


def _is_sharded(params) -> bool:
    """Whether FSDP has sharded the parameters (DTensors): only in an initialised process group,
    so a single process never pays for importing torch.distributed.tensor (about a second)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


@dataclasses.dataclass(frozen=True)
class AdamWOptions:
    beta1: float = option(0.9, low=0, high=1, high_open=True)
    beta2: float = option(0.95, low=0, high=1, high_open=True)
    weight_decay: float = option(0.1, low=0, high=10)  # on 2-D weights only (matmuls, embeddings); never biases or norm gains
    eps: float = option(1e-8, low=0, high=1, low_open=True)
    fused: Optional[bool] = None  # None: torch's fused kernel on CPU and CUDA (not on FSDP-sharded parameters)


class AdamW(Optimizer):
    """AdamW (Loshchilov & Hutter 2019) with nanoGPT's two groups: decay on 2-D weights only."""

    Options = AdamWOptions

    def build(self, named_parameters, device):
        o = self.options
        decay = [p for _, p in named_parameters if p.dim() >= 2]  # matmuls and embeddings
        no_decay = [p for _, p in named_parameters if p.dim() < 2]  # biases and norm gains
        fused = o.fused if o.fused is not None else device.type in ("cuda", "cpu") and not _is_sharded(decay)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.training.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps,
                                 **({"fused": True} if fused else {}))


@dataclasses.dataclass(frozen=True)
class MuonOptions:
    lr: float = option(0.02, low=0, high=10, low_open=True)  # Muon's learning rate for the hidden 2-D matrices (attention and FFN weights)
    momentum: float = option(0.95, low=0, high=1, high_open=True)
    nesterov: bool = True
    ns_steps: int = option(5, low=1, high=99)  # Newton-Schulz iterations per update (torch.optim.Muon refuses 100 and more)
    weight_decay: float = option(0.0, low=0, high=10)  # decoupled, on the Muon matrices
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = "original"  # Keller's sqrt(max(1, A/B)) or Moonshot's 0.2 sqrt(max(A, B))
    # AdamW on everything else, each group with its own peak learning rate (None: training.learning_rate)
    embedding_lr: Optional[float] = option(None, low=0, high=10, low_open=True)  # token (and learned position) embeddings; the tied LM head with them
    head_lr: Optional[float] = option(None, low=0, high=10, low_open=True)  # an untied LM head
    scalar_lr: Optional[float] = option(None, low=0, high=10, low_open=True)  # norm gains, biases, and any parameter that is not a 2-D matrix
    embedding_weight_decay: float = option(0.0, low=0, high=10)  # decoupled, on the embeddings (and the LM head tied to them)
    beta1: float = option(0.9, low=0, high=1, high_open=True)
    beta2: float = option(0.95, low=0, high=1, high_open=True)
    eps: float = option(1e-8, low=0, high=1, low_open=True)


class Muon(Optimizer):
    """Muon (Jordan et al. 2024; ``torch.optim.Muon``): momentum orthogonalised by Newton-Schulz
    iterations, for the 2-D weight matrices inside the blocks; AdamW for the embeddings, the LM
    head, and every gain, bias or other tensor (Muon is defined for matrices only)."""

    Options = MuonOptions
    sharded_ok = False  # Newton-Schulz needs whole matrices, not FSDP shards
    states_per_param = 1  # the momentum of the matrices (AdamW's two moments cover only the rest)

    def groups(self, named_parameters) -> dict[str, list]:
        """Parameters by role: matrices (Muon), embeddings, head, scalars (AdamW)."""
        roles: dict[str, list] = {"matrices": [], "embeddings": [], "head": [], "scalars": []}
        for name, p in named_parameters:
            if name.startswith("lm_head."):
                roles["head"].append(p)
            elif name.startswith(("wte.", "positional.")) and p.dim() == 2:
                roles["embeddings"].append(p)
            elif name.startswith("blocks.") and p.dim() == 2:
                roles["matrices"].append(p)
            else:
                roles["scalars"].append(p)
        return roles

    def build(self, named_parameters, device):
        o, base = self.options, self.training.learning_rate
        roles = self.groups(named_parameters)
        muon = torch.optim.Muon(roles["matrices"], lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                nesterov=o.nesterov, ns_steps=o.ns_steps, adjust_lr_fn=o.adjust_lr_fn)
        adam_groups = [{"params": roles[role], "lr": lr or base, "weight_decay": wd}
                       for role, lr, wd in (("embeddings", o.embedding_lr, o.embedding_weight_decay),
                                            ("head", o.head_lr, 0.0), ("scalars", o.scalar_lr, 0.0))
                       if roles[role]]
        adamw = torch.optim.AdamW(adam_groups, lr=base, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0,
                                  **({"fused": True} if device.type in ("cuda", "cpu") else {}))
        return Chain(muon, adamw)


@gptx.hookimpl(trylast=True)
def register_optimizer(register):
    register("adamw", AdamW)
    register("muon", Muon)
