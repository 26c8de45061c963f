"""The LoRA math, as one pure function of (W0, adapters, strengths).

W = round_to_dtype( W0 + Σ ηᵢ · deltaᵢ ), summed in float32 from the untouched W0 and rounded once.
The sum order is the order of `contributions`; callers pass a canonical order so that any history
reaching the same patch set produces bitwise the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .adapters import WeightAdapter

Contribution = tuple[WeightAdapter, float]


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Disable TF32 for the delta products (hosts such as ComfyUI often enable it globally)."""
    cuda_matmul = torch.backends.cuda.matmul
    saved = cuda_matmul.allow_tf32
    cuda_matmul.allow_tf32 = False
    try:
        yield
    finally:
        cuda_matmul.allow_tf32 = saved


def _split(contributions: Sequence[Contribution], shape: torch.Size, device: torch.device):
    """Concatenated low-rank factors (ηᵢ·upᵢ | downᵢ) and the sum of any full-rank deltas."""
    ups, downs, full = [], [], None
    for adapter, strength in contributions:
        factors = adapter.low_rank_factors(device)
        if factors is not None:
            ups.append(factors[0] * strength)
            downs.append(factors[1])
        else:
            term = adapter.delta(shape, device) * strength
            full = term if full is None else full + term
    if not ups:
        return None, None, full
    # Σ (ηᵢ·upᵢ) @ downᵢ == [η₁up₁ | η₂up₂] @ [down₁; down₂]: one product for any stack.
    up = ups[0] if len(ups) == 1 else torch.cat(ups, dim=1)
    down = downs[0] if len(downs) == 1 else torch.cat(downs, dim=0)
    return up, down, full


# float16's largest finite value is 65504; anything from 65520 up rounds to infinity.
_FLOAT16_OVERFLOW = 65520.0


def _fits_float16(values: torch.Tensor) -> bool:
    low, high = torch.aminmax(values)  # no full-size temporary; NaN fails both comparisons
    return bool(-_FLOAT16_OVERFLOW < low) and bool(high < _FLOAT16_OVERFLOW)


def write_patched(out: torch.Tensor, w0: torch.Tensor, contributions: Sequence[Contribution]) -> None:
    """out ← round_to(out.dtype, W0 + Σ ηᵢ·deltaᵢ), summed in float32. `out` may be `w0` itself.

    Always the same kernels in the same order (an in-place float32 addmm on a buffer holding W0),
    whichever buffer W0 arrives in, so the result depends on (W0, contributions) alone.
    Raises OverflowError, before touching `out`, if the result does not fit float16.
    """
    with torch.no_grad(), full_fp32_matmul():
        up, down, full = _split(contributions, w0.shape, w0.device)
        if out.dtype == torch.float32:
            accumulator = out
            if out.data_ptr() != w0.data_ptr():
                out.copy_(w0)
        else:
            accumulator = w0.to(torch.float32, copy=True)
        rows = accumulator.view(accumulator.shape[0], -1)
        if up is not None:
            rows.addmm_(up, down)
        if full is not None:
            rows.add_(full.view_as(rows))
        if out.dtype == torch.float16 and not _fits_float16(accumulator):
            raise OverflowError("the patched weight does not fit float16 (strength too high?)")
        if accumulator is not out:
            out.copy_(accumulator)


def patched_weight(w0: torch.Tensor, contributions: Sequence[Contribution]) -> torch.Tensor:
    """W0 + Σ ηᵢ·deltaᵢ computed in float32, returned in W0's dtype (always a new tensor)."""
    out = torch.empty_like(w0)
    write_patched(out, w0, contributions)
    return out
