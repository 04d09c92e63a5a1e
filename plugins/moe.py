"""A mixture of experts in place of the feed-forward network (Shazeer et al. 2017; Switch,
Fedus et al. 2021; GShard): a router sends each token to its ``top_k`` experts, whose outputs are
mixed by the routing weights, with the Switch load-balancing loss reported as an auxiliary loss.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

import gptx
from gptx.components import Aux, FeedForward, FeedForwardOutput
from gptx.options import option

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
}


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    n_experts: int = 8
    top_k: int = 2  # experts per token
    hidden: Optional[int] = None  # each expert's hidden width; None: 4 * n_embd / top_k (the dense MLP's active width)
    activation: Literal["gelu", "relu", "relu2", "silu"] = "gelu"
    aux_loss_weight: float = option(0.01, low=0, high=100)  # the Switch load-balancing loss's weight in the objective
    z_loss_weight: float = option(0.0, low=0, high=100)  # ST-MoE's router z-loss (logsumexp of the router logits, squared); 0: off

    def __post_init__(self):
        if not 1 <= self.n_experts <= 1024:
            raise ValueError(("n_experts", f"must be between 1 and 1024, got {self.n_experts}"))
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(("top_k", f"must be between 1 and n_experts = {self.n_experts}, got {self.top_k}"))
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(("hidden", f"must be at least 1, got {self.hidden}"))


class Expert(nn.Module):
    def __init__(self, n_embd: int, hidden: int, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)  # c_proj: GPT-2's scaled residual init


class MoE(FeedForward):
    """Token-choice top-k routing: softmax over the router's logits, the k largest kept and
    renormalised (Mixtral). Training dispatches each token to its experts only; the ONNX export
    evaluates every expert and mixes them by the same routing weights (zero for unchosen
    experts: the same output, without data-dependent shapes a static graph cannot hold)."""

    Options = MoEOptions

    def __init__(self, config, options: MoEOptions):
        super().__init__(config, options)
        hidden = options.hidden or max(1, 4 * config.n_embd // options.top_k)
        self.router = nn.Linear(config.n_embd, options.n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config.n_embd, hidden, config.bias) for _ in range(options.n_experts))
        self.act = ACTIVATIONS[options.activation]
        self.dropout = nn.Dropout(config.dropout)

    def inactive_params(self) -> int:
        """Parameters a token does not pass through: the experts it is not routed to."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (self.options.n_experts - self.options.top_k) * per_expert

    def route(self, x: torch.Tensor):  # x [N, C]
        logits = self.router(x).float()  # [N, E]
        probs = logits.softmax(dim=-1)  # [N, E]
        weights, chosen = probs.topk(self.options.top_k, dim=-1)  # [N, k] x2
        weights = weights / weights.sum(dim=-1, keepdim=True)  # [N, k]
        return logits, probs, weights, chosen

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # [N, C]
        logits, probs, weights, chosen = self.route(flat)
        if torch.onnx.is_in_onnx_export():
            y = self.dense(flat, weights, chosen)  # [N, C]
        else:
            y = self.dispatch(flat, weights, chosen)  # [N, C]
        y = self.dropout(y.reshape(B, T, C))  # [B, T, C]
        return FeedForwardOutput(y, self.aux(logits, probs, chosen) if self.training else None)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:  # [n, C] -> [n, C]
        return self.experts[e].c_proj(self.act(self.experts[e].c_fc(x)))

    def dispatch(self, x, weights, chosen):
        """Each expert runs on the tokens routed to it: x [N, C], weights/chosen [N, k] -> [N, C]."""
        out = torch.zeros_like(x)  # [N, C]
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.options.top_k)  # [N*k]
        expert, weight = chosen.reshape(-1), weights.reshape(-1)  # [N*k] x2
        order = expert.argsort(stable=True)  # [N*k]: the assignments grouped by expert
        counts = torch.bincount(expert, minlength=self.options.n_experts).tolist()  # tokens per expert
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = order[start:start + n]  # [n]
                y = self.expert(e, x[token[idx]])  # [n, C]
                out.index_add_(0, token[idx], (y * weight[idx, None]).to(out.dtype))
            start += n
        return out

    def dense(self, x, weights, chosen):
        """Every expert on every token, mixed by the routing weights: x [N, C] -> [N, C]."""
        gate = torch.zeros(x.shape[0], self.options.n_experts, device=x.device, dtype=weights.dtype)  # [N, E]
        gate = gate.scatter(1, chosen, weights)  # [N, E], zero for unchosen experts
        ys = torch.stack([self.expert(e, x) for e in range(self.options.n_experts)], dim=1)  # [N, E, C]
        return (ys * gate[..., None].to(ys.dtype)).sum(dim=1)  # [N, C]

    def aux(self, logits, probs, chosen) -> Aux:
        """Switch's load-balancing loss, E * sum_i f_i * P_i (1 when balanced): f_i the fraction of
        routed assignments that go to expert i, P_i its mean router probability."""
        E = self.options.n_experts
        load = torch.bincount(chosen.reshape(-1), minlength=E).float() / chosen.numel()  # [E]
        importance = probs.mean(dim=0)  # [E]
        losses = {"load_balance": (E * (load * importance).sum(), self.options.aux_loss_weight)}
        if self.options.z_loss_weight:
            losses["router_z"] = (torch.logsumexp(logits, dim=-1).square().mean(), self.options.z_loss_weight)
        return Aux(losses=losses, metrics={f"expert_load.{e}": load[e] for e in range(E)})


@gptx.hookimpl(trylast=True)
def register_ffn(register):
    register("moe", MoE)
