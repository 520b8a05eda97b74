"""Block capture: run one block and record the input of each calibratable module."""
from __future__ import annotations

import torch
from torch import nn

from featcal.backbone.base import Backbone, BlockState


class _StopForward(Exception):
    """Raised by a capture hook once every needed input is captured."""


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError("could not find the input tensor of a calibratable module")


def capture_inputs(
    backbone: Backbone,
    block: nn.Module,
    modules: dict[str, nn.Module],
    state: BlockState,
    stop_after: str | None = None,
) -> tuple[dict[str, torch.Tensor], list[str], BlockState | None]:
    """Run ``block`` on ``state`` and capture the input of every module in ``modules``.

    Returns (inputs by name, call order, output state). With ``stop_after`` the forward
    is cut short right after that module's input is captured (output state is None).
    """
    store: dict[str, torch.Tensor] = {}
    order: list[str] = []
    handles = []

    def make_hook(name):
        def hook(mod, args, kwargs):
            if name in store:
                raise RuntimeError(
                    f"FeatCal: module '{name}' is called more than once per block forward; "
                    "such weight sharing is not supported"
                )
            store[name] = _first_tensor(args, kwargs)
            order.append(name)
            if name == stop_after:
                raise _StopForward

        return hook

    for name, mod in modules.items():
        handles.append(mod.register_forward_pre_hook(make_hook(name), with_kwargs=True))
    out = None
    try:
        out = backbone.run_block(block, state)
    except _StopForward:
        out = None
    finally:
        for h in handles:
            h.remove()
    return store, order, out
