"""Feature drift: how far the student's block outputs are from the expert's."""
from __future__ import annotations

import torch

from featcal.backbone.base import BlockState


def block_output(state: BlockState):
    """(output, token mask) of the block that produced ``state``: its hidden states, unless
    the block ended a stage and its output is not the next block's input (a T5 encoder's
    last block: the next state holds decoder inputs); such a backbone puts the block's own
    output in ``extras["block_output"]`` (mask: ``extras["block_output_mask"]``)."""
    out = state.extras.get("block_output")
    if out is None:
        return state.hidden, state.token_mask
    return out, state.extras["block_output_mask"]


def token_drift(student: list[BlockState], expert: list[BlockState]) -> float:
    """Mean over real tokens of ‖student − expert‖ / ‖expert‖ (block outputs).

    Sums stay on the states' device; one host read at the end (not one per batch).
    """
    num: torch.Tensor | float = 0.0
    den: torch.Tensor | float = 0.0
    for s, e in zip(student, expert):
        (a, _), (b, e_mask) = block_output(s), block_output(e)
        a, b = a.float(), b.float()
        rel = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)
        mask = e_mask.to(device=rel.device, dtype=torch.float32).reshape(rel.shape)
        num = num + (rel * mask).sum()
        den = den + mask.sum()
    if isinstance(num, float):
        return 0.0
    num_v, den_v = torch.stack([num, den]).tolist()
    return num_v / max(den_v, 1e-12)
