"""FeatCal's statistics: w-weighted token moments (float32 or wider whatever the model
dtype), symmetric Gram products on the upper block triangle, normalised norm inputs."""
from __future__ import annotations

import math

import torch
from torch import nn

from featcal.calibration.feature_calibration.solver import stat_dtype




#: panel height of the symmetric Gram products: for inputs wider than two panels only the
#: upper block triangle is multiplied (≈ half the multiply-adds for wide inputs such as a
#: ViT MLP's 3072-wide fc2 input); 256-row panels keep the GEMMs near full speed on CPUs.
GRAM_CHUNK = 256


def _chunk(chunk: int | None) -> int:
    return int(chunk) if chunk else GRAM_CHUNK


def _upper_mode(dim: int, chunk: int) -> bool:
    return dim > 2 * chunk


def _gram_upper_(acc: torch.Tensor, xw: torch.Tensor, x: torch.Tensor, chunk: int | None = None, beta: float = 1.0) -> None:
    """acc[i, j] = beta·acc[i, j] + (xwᵀ x)[i, j] on the upper block triangle only
    (symmetric products; ``finish_gram`` mirrors it). Blocks below the diagonal are not
    touched. beta = 0 ignores acc's previous content (may be uninitialised)."""
    d, chunk = x.shape[1], _chunk(chunk)
    if not _upper_mode(d, chunk):
        acc.addmm_(xw.T, x, beta=beta)
        return
    for i in range(0, d, chunk):
        acc[i : i + chunk, i:].addmm_(xw[:, i : i + chunk].T, x[:, i:], beta=beta)


def finish_gram(acc: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mirror the upper block triangle filled by ``_gram_upper_`` into a full symmetric
    matrix (in place: diagonal blocks are already full, only the blocks below are copied)."""
    d, chunk = acc.shape[0], _chunk(chunk)
    if not _upper_mode(d, chunk):
        return acc
    for i in range(0, d, chunk):
        if i + chunk < d:
            acc[i + chunk :, i : i + chunk] = acc[i : i + chunk, i + chunk :].T
    return acc


def gram_norm(acc: torch.Tensor, chunk: int | None = None, zero_below: bool = False) -> float:
    """Frobenius norm of the symmetric matrix whose upper block triangle ``acc`` holds
    (whatever lies below the diagonal blocks is ignored).

    ``zero_below``: the caller guarantees that the blocks below the diagonal blocks are
    exactly zero; then ‖S‖² = 2‖acc‖² − Σ‖diagonal block‖², one contiguous norm over the
    whole buffer plus the small diagonal blocks (faster than the strided panels)."""
    d, chunk = acc.shape[0], _chunk(chunk)
    if not _upper_mode(d, chunk):
        return float(torch.linalg.vector_norm(acc))
    if zero_below and acc.is_contiguous():
        sq = 2.0 * float(torch.linalg.vector_norm(acc)) ** 2
        for i in range(0, d, chunk):
            sq -= float(torch.linalg.vector_norm(acc[i : i + chunk, i : i + chunk])) ** 2
        return math.sqrt(max(sq, 0.0))
    sq = 0.0
    for i in range(0, d, chunk):
        sq += float(torch.linalg.vector_norm(acc[i : i + chunk, i : i + chunk])) ** 2
        if i + chunk < d:
            sq += 2.0 * float(torch.linalg.vector_norm(acc[i : i + chunk, i + chunk :])) ** 2
    return math.sqrt(sq)


def add_upper_(dst: torch.Tensor, src: torch.Tensor, alpha: float, chunk: int | None = None) -> torch.Tensor:
    """dst += alpha·src on the upper block triangle only (the layout of ``_gram_upper_``;
    the blocks below the diagonal blocks of ``dst`` are not touched): half the memory
    traffic of a full ``add_`` for wide inputs."""
    d, chunk = dst.shape[0], _chunk(chunk)
    if not _upper_mode(d, chunk):
        return dst.add_(src, alpha=alpha)
    for i in range(0, d, chunk):
        dst[i : i + chunk, i:].add_(src[i : i + chunk, i:], alpha=alpha)
    return dst


class MomentAccumulator:
    """w-weighted token moments of one capture point, accumulated in float32 or wider.

    ``add(x, w)`` with x [..., D] in any dtype (bf16/fp16 models included) and w the
    token weights ([...] or None for all ones). ``mean()`` = E[x], ``second()`` = E[x xᵀ].
    The raw second moment Σ w x xᵀ is kept on its upper block triangle (``raw_upper``,
    zero below), ``raw_norm()`` is its Frobenius norm; ``reset()`` starts over in the
    same buffers (the driver reuses one accumulator for every task of a block).
    """

    def __init__(
        self,
        dim: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        second: bool = True,
        chunk: int | None = None,
    ):
        self.dtype = stat_dtype(dtype)
        self.chunk = _chunk(chunk)
        self.weight_sum = 0.0
        self.first = torch.zeros(dim, dtype=self.dtype, device=device)
        # zeros, not empty: the blocks below the diagonal are never written and must read 0
        self.raw_second = torch.zeros(dim, dim, dtype=self.dtype, device=device) if second else None
        self._empty = True

    def reset(self) -> None:
        self.weight_sum = 0.0
        self.first.zero_()
        self._empty = True  # the next add overwrites the upper block triangle (beta = 0)

    def add(self, x: torch.Tensor, w: torch.Tensor | None = None, xw: torch.Tensor | None = None) -> None:
        """``xw``: x·w[:, None] if the caller already has it (saves one product)."""
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if w is None:
            xw = x
            self.weight_sum += x.shape[0]
        else:
            w = w.reshape(-1).to(self.dtype)
            xw = x * w[:, None] if xw is None else xw.reshape(-1, x.shape[-1]).to(self.dtype)
            self.weight_sum += float(w.sum())
        self.first += xw.sum(0)
        if self.raw_second is not None:
            _gram_upper_(self.raw_second, xw, x, chunk=self.chunk, beta=0.0 if self._empty else 1.0)
            self._empty = False

    def mean(self) -> torch.Tensor:
        return self.first / max(self.weight_sum, 1e-30)

    def raw_upper(self) -> torch.Tensor:
        """Σ w x xᵀ on the upper block triangle (the buffer itself; zero below)."""
        if self._empty:
            self.raw_second.zero_()
            self._empty = False
        return self.raw_second

    def raw_norm(self) -> float:
        """‖Σ w x xᵀ‖_F (so ‖E[x xᵀ]‖_F = raw_norm / weight_sum)."""
        # the buffer is zeros below the diagonal blocks (allocated so, never written there)
        return gram_norm(self.raw_upper(), self.chunk, zero_below=True)

    def raw_full(self) -> torch.Tensor:
        """Σ w x xᵀ as a full symmetric matrix (a new tensor when only the upper block
        triangle is stored, else the buffer itself)."""
        raw = self.raw_upper()
        return finish_gram(raw.clone(), self.chunk) if _upper_mode(raw.shape[0], self.chunk) else raw

    def second(self) -> torch.Tensor:
        """E[x xᵀ], full and symmetric (a new tensor)."""
        return self.raw_full() / max(self.weight_sum, 1e-30)


def normalise_without_affine(module: nn.Module, x: torch.Tensor, dtype: torch.dtype, offset: float = 0.0) -> torch.Tensor:
    """The norm module's output with unit scale and zero shift: z = norm(x) without affine.

    ``offset``: the norm scales by (weight + offset) (Gemma's RMSNorm: 1 + weight), so the
    unit effective scale is weight = 1 − offset."""
    from torch.func import functional_call

    params = {"weight": torch.full_like(module.weight, 1.0 - offset, dtype=dtype)}
    if getattr(module, "bias", None) is not None:
        params["bias"] = torch.zeros_like(module.bias, dtype=dtype)
    return functional_call(module, params, (x.to(dtype),)).to(dtype)
