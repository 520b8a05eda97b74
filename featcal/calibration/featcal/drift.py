"""Feature drift: how far the student's block outputs are from the expert's."""
from __future__ import annotations

import torch

from featcal.backbone.base import BlockState


def token_drift(student: list[BlockState], expert: list[BlockState]) -> float:
    """Mean over real tokens of ‖student − expert‖ / ‖expert‖.

    Sums stay on the states' device; one host read at the end (not one per batch).
    """
    num: torch.Tensor | float = 0.0
    den: torch.Tensor | float = 0.0
    for s, e in zip(student, expert):
        a, b = s.hidden.float(), e.hidden.float()
        rel = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)
        mask = e.token_mask.to(device=rel.device, dtype=torch.float32).reshape(rel.shape)
        num = num + (rel * mask).sum()
        den = den + mask.sum()
    if isinstance(num, float):
        return 0.0
    num_v, den_v = torch.stack([num, den]).tolist()
    return num_v / max(den_v, 1e-12)
