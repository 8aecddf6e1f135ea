"""Policies for the approval end-to-end test, logged with `code_paths` so that the evaluate
subprocess can unpickle them (the scripted expert behind the model contract)."""

from __future__ import annotations

import torch
from torch import nn

from arf_trainer.sim.reach import expert_action


class ExpertPolicy(nn.Module):
    """float32 obs [B, 10] -> the scripted expert's actions [B, 2]."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(expert_action(obs.detach().numpy()))
