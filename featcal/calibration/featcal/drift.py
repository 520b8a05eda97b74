"""Feature drift: how far the student's block outputs are from the expert's."""
from __future__ import annotations

from featcal.backbone.base import BlockState


def token_drift(student: list[BlockState], expert: list[BlockState]) -> float:
    """Mean over real tokens of ‖student − expert‖ / ‖expert‖."""
    num = 0.0
    den = 0.0
    for s, e in zip(student, expert):
        a, b = s.hidden.float(), e.hidden.float()
        rel = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)
        mask = e.token_mask.float().reshape(rel.shape)
        num += float((rel * mask).sum())
        den += float(mask.sum())
    return num / max(den, 1e-12)
