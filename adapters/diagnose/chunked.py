"""Chunked fp64 statistics of a tensor pair, and the dtype arithmetic they need (mantissas,
ulps, one dtype's own rounding). Pure; a pair costs the two tensors (memory-mapped by the
readers) plus one working chunk, never an fp64 copy of a whole tensor."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

MANTISSA = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
CHUNK_ELEMENTS = 2**20  # 4 MiB of fp32 (8 MiB of fp64) per working chunk


def coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if MANTISSA.get(a, 99) <= MANTISSA.get(b, 99) else b


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at each value of fp32 tensor x (already representable in dtype)."""
    p = MANTISSA[dtype]
    _, exponent = torch.frexp(x)
    spacing = torch.ldexp(torch.ones_like(x), exponent - 1 - p)
    smallest = torch.finfo(dtype).smallest_normal * 2.0**-p
    return torch.where(x == 0, torch.full_like(x, smallest), spacing.clamp_min(smallest))


def row_chunks(rows: int, width: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


@dataclass
class Sums:
    cr: float = 0.0
    rr: float = 0.0
    cc: float = 0.0
    dd: float = 0.0
    d: float = 0.0  # Σ(C − R): a constant offset's sum
    noise: float = 0.0  # ‖round(R) − R‖²: the coarser dtype's own rounding of the reference
    off: int = 0
    near: int = 0  # of those off, by exactly one ulp
    non_finite: int = 0  # inf or nan in the candidate where the reference is finite
    max_ulp: float = 0.0
    max_excess: float = 0.0  # the largest |round(C) − round(R)| beyond one ulp at that element
    far: int = 0  # elements off by more than two ulps at their value
    n: int = 0

    @property
    def rms(self) -> float:
        """‖R‖ / √n: the reference's typical magnitude."""
        return math.sqrt(self.rr / self.n) if self.n else 0.0

    @property
    def rel(self) -> float:
        return math.sqrt(self.dd / self.rr) if self.rr > 0 else (0.0 if self.dd == 0 else math.inf)


def pair_sums(c: torch.Tensor, r: torch.Tensor, dtype: torch.dtype | None, device: str,
          rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> Sums:
    """Accumulate over row chunks; C is read through the index maps (C'[i, j] = C[rows[i], cols[j]]),
    and with `dtype`, rounding statistics in that dtype."""
    c2, r2 = as_rows(c), as_rows(r)
    s = Sums(n=r2.numel())
    for part in row_chunks(r2.shape[0], r2.shape[1]):
        rc = r2[part].to(device, torch.float32)
        cc = (c2[rows[part]] if rows is not None else c2[part]).to(device, torch.float32)
        if cols is not None:
            cc = cc.index_select(1, cols.to(device))
        s.non_finite += int((~torch.isfinite(cc) & torch.isfinite(rc)).sum())
        r64, c64 = rc.double(), cc.double()
        s.cr += float(torch.dot(c64.view(-1), r64.view(-1)))
        s.rr += float(torch.dot(r64.view(-1), r64.view(-1)))
        s.cc += float(torch.dot(c64.view(-1), c64.view(-1)))
        diff = (c64 - r64).view(-1)
        s.dd += float(torch.dot(diff, diff))
        s.d += float(diff.sum())
        if dtype is not None:
            rd = rc.to(dtype).float()
            cd = cc.to(dtype).float()
            s.noise += float((rd.double() - r64).square().sum())
            gap = (cd - rd).abs()
            off = int((gap > 0).sum())
            s.off += off
            if off:
                spacing = ulp(rd, dtype)
                units = gap / spacing
                s.max_excess = max(s.max_excess, float((gap - spacing).max()))
                s.far += int((units > 2).sum())
                s.max_ulp = max(s.max_ulp, float(units.max()))
                s.near += int((units == 1).sum())
    return s


def tolerance(s: Sums, dtype: torch.dtype) -> float:
    """Relative error a pair may have and still 'equal' each other: twice the coarser dtype's
    own rounding noise on this tensor, plus one unit of its precision for arithmetic."""
    return 2 * noise(s) + 2.0 ** -MANTISSA.get(dtype, 23)


def noise(s: Sums) -> float:
    return math.sqrt(s.noise / s.rr) if s.rr > 0 else 0.0


def difference(c: torch.Tensor, r: torch.Tensor, device: str) -> torch.Tensor:
    c2, r2 = as_rows(c), as_rows(r)
    d = torch.empty(r2.shape, dtype=torch.float32, device=device)
    for part in row_chunks(r2.shape[0], r2.shape[1]):
        d[part] = c2[part].to(device, torch.float32) - r2[part].to(device, torch.float32)
    return d


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> in fp64, a chunk at a time."""
    a2, b2 = as_rows(a), as_rows(b)
    return sum(float(torch.dot(a2[p].double().reshape(-1), b2[p].double().reshape(-1)))
               for p in row_chunks(a2.shape[0], a2.shape[1]))


def scaled_residual(c, r, k: float, device: str) -> float:
    c2, r2 = as_rows(c), as_rows(r)
    left = rr = 0.0
    for part in row_chunks(r2.shape[0], r2.shape[1]):
        rc = r2[part].to(device, torch.float64)
        left += float((c2[part].to(device, torch.float64) - k * rc).square().sum())
        rr += float(rc.square().sum())
    return math.sqrt(left / rr) if rr > 0 else math.inf


def norm(t: torch.Tensor, device: str = "cpu") -> float:
    """‖t‖ in fp64, a chunk at a time."""
    flat = t.reshape(-1)
    return math.sqrt(sum(float(flat[i:i + CHUNK_ELEMENTS].to(device, torch.float64).square().sum())
                         for i in range(0, flat.numel(), CHUNK_ELEMENTS)))
