"""TensorFloat-32 for FeatCal's fast paths (``block_dtype: tf32``, ``gram_tf32: true``).

On CUDA, :func:`tf32_context` switches cuBLAS/cuDNN to TF32 (float32 storage and
accumulation, inputs rounded to a 10-bit mantissa) and restores the previous flags after.
On the CPU TF32 does not exist and the context does nothing, unless the environment
variable ``FEATCAL_EMULATE_TF32=1`` is set: then the inputs of every matrix product inside
the context (linear, matmul/mm/bmm, addmm/baddbmm, conv, scaled dot-product attention)
are rounded to TF32 precision (round to nearest, ties to even) before a float32 product.
That is an emulation for measuring what TF32 does to the calibrated parameters on a
machine without a GPU (``experiments/bench_calibration.py --emulate-tf32``); it is slower
than plain float32 and is never on by default.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: environment variable that turns the CPU emulation on
EMULATE_ENV = "FEATCAL_EMULATE_TF32"

#: low mantissa bits that TF32 drops from a float32 (23 − 10)
_DROPPED_BITS = 13


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest TF32 value (10 mantissa bits, ties to even).

    Works on the bit pattern: adds half a TF32 ulp minus one (plus the kept mantissa's
    last bit, for ties to even) and clears the 13 dropped bits. Infinities and NaNs pass
    through unchanged; a carry into the exponent is the correct rounding up.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_to_tf32 takes float32 tensors, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    keep_lsb = (bits >> _DROPPED_BITS) & 1
    rounded = (bits + ((1 << (_DROPPED_BITS - 1)) - 1) + keep_lsb) & ~((1 << _DROPPED_BITS) - 1)
    out = rounded.view(torch.float32)
    return torch.where(torch.isfinite(x), out, x).view_as(x)


def _tf32(t):
    return round_to_tf32(t) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t


#: op → (positions, keyword names) of the operands that TF32 rounds; the added term of
#: addmm/baddbmm and a bias stay float32 (they enter the float32 accumulation)
_TWO = ((0, 1), ("input", "other", "mat2"))
_ROUNDED_ARGS = {
    F.linear: ((0, 1), ("input", "weight")),
    torch.matmul: _TWO,
    torch.Tensor.matmul: _TWO,
    torch.Tensor.__matmul__: _TWO,
    torch.Tensor.__rmatmul__: _TWO,
    torch.mm: _TWO,
    torch.Tensor.mm: _TWO,
    torch.bmm: _TWO,
    torch.Tensor.bmm: _TWO,
    torch.addmm: ((1, 2), ("mat1", "mat2")),
    torch.Tensor.addmm: ((1, 2), ("mat1", "mat2")),
    torch.baddbmm: ((1, 2), ("batch1", "batch2")),
    torch.Tensor.baddbmm: ((1, 2), ("batch1", "batch2")),
    F.conv1d: ((0, 1), ("input", "weight")),
    F.conv2d: ((0, 1), ("input", "weight")),
    F.scaled_dot_product_attention: ((0, 1, 2), ("query", "key", "value")),
}


class EmulatedTF32(TorchFunctionMode):
    """Rounds the float32 operands of matrix products to TF32 (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.einsum:  # einsum(equation, *operands) or einsum(equation, [operands])
            operands = args[1:]
            if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                operands = (type(operands[0])(_tf32(a) for a in operands[0]),)
            args = (args[0], *(_tf32(a) for a in operands))
        elif func in _ROUNDED_ARGS:
            positions, names = _ROUNDED_ARGS[func]
            args = tuple(_tf32(a) if i in positions else a for i, a in enumerate(args))
            kwargs = {k: _tf32(v) if k in names else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def emulation_enabled() -> bool:
    return os.environ.get(EMULATE_ENV, "0").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def _cuda_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def tf32_context(device: torch.device | str):
    """TF32 matrix products inside the context: real on CUDA, emulated on the CPU when
    ``FEATCAL_EMULATE_TF32=1``, otherwise a no-op."""
    kind = torch.device(device).type
    if kind == "cuda":
        return _cuda_tf32()
    if emulation_enabled():
        return EmulatedTF32()
    return contextlib.nullcontext()
