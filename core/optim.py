"""``Chain``: several torch optimizers acting as one (Muon on the matrices, AdamW on the rest),
so the trainer, the schedule and ``trainer.pt`` see one optimizer."""
from __future__ import annotations

import torch


class Chain:
    """``torch.optim.Optimizer``'s interface over several optimizers. ``param_groups`` are the
    members' own group dicts (a schedule that sets ``lr`` sets it in the member); ``state_dict``
    numbers the parameters across all members in ``param_groups`` order, as one torch optimizer
    would, so checkpoints key its state by parameter name like any other optimizer's."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [g | {"params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, offset = list(state_dict["param_groups"]), 0
        for opt in self.optimizers:
            mine = groups[:len(opt.param_groups)]
            groups = groups[len(opt.param_groups):]
            count = sum(len(g["params"]) for g in opt.param_groups)
            opt.load_state_dict({
                "state": {i - offset: s for i, s in state_dict["state"].items() if offset <= i < offset + count},
                "param_groups": [g | {"params": [i - offset for i in g["params"]]} for g in mine],
            })
            offset += count
