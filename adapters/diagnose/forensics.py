"""Weight forensics on one tensor pair: what the candidate tensor is, given its reference.

Pure (tensors in, a `TensorResult` out) and streaming-friendly: every statistic is
accumulated over row chunks in fp64 (adapters/diagnose/chunked.py), so a pair costs the two
tensors (memory-mapped by the readers) plus one chunk; only the low-rank test materialises
the difference.

The ladder, first match wins:
  identical        bitwise equal
  rounding         equal after rounding both to the coarser dtype (the cast a conversion
                   does once); fp32 pairs may differ by a few ulp of summation order
  zeroed           C is all zeros where R is not (a bias the conversion dropped, materialised
                   as zeros by a load and save)
  scaled           C = c·R within rounding (c reported, and the head-dim ratio it matches)
  offset           C = R + c within rounding (c reported; for a norm weight, c = −1 is the
                   RMSNorm (1 + w) convention: Gemma's stored weight in a Llama model)
  swapped          C equals a different reference tensor of the same layer and shape
  other_layer      C equals the reference's tensor of the same role in another layer (a layer
                   renumbered in a merge); found by norm lookup, confirmed by comparison
  rotary           C is R in the other rotary layout (the Meta→HF q/k row permutation)
  rows_moved       C is R with some rows exchanged (embedding / output head: which token ids)
  permuted         C is R with its rows or columns in equal blocks, re-ordered
  low_rank         C − R is low-rank (an adapter's update: its multiple when known)
  cast_twice       not the coarser dtype's single rounding, but (on all but 0.1% of
                   elements) its rounding of the reference's rounding to the other
                   half-precision dtype: fp32 → fp16 → bf16 (or → bf16 → fp16), a cast
                   through an intermediate dtype; no arithmetic
  rounding_beyond  within a few ulp of the coarser dtype, but not its own single rounding
                   (nor a cast through the other half-precision dtype)
  differing        none of the above (relative error reported)
(and before all of them: shape, and non_finite — inf/nan where the reference is finite,
e.g. an fp16 cast of values beyond 65504)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from adapters.diagnose.chunked import (
    MANTISSA,
    Sums,
    as_rows,
    coarser,
    difference,
    dot,
    noise,
    pair_sums,
    row_chunks,
    scaled_residual,
    tolerance,
)

ROUNDING_OFF_FRACTION = 1e-3  # a single cast may disagree with ours on near-ties this often, no more
MAX_BLOCKS = 64
HEAD_DIMS = (32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MAX_MOVES = 64  # rows_moved: rows listed (all are counted)


class TensorResult(BaseModel):
    """One reference tensor and what its candidate counterpart turned out to be."""

    name: str
    kind: str
    detail: str = ""
    shape: list[int] = []
    rel_error: float = 0.0
    scale: float | None = None
    other: str | None = None  # swapped: the reference tensor the candidate equals
    blocks: list[int] | None = None  # permuted: candidate block i holds reference block blocks[i]
    offset: float | None = None  # offset: C − R
    moves: list[list[int]] | None = None  # rows_moved: [candidate row, the reference row it holds], first MAX_MOVES
    moved: int | None = None  # rows_moved: how many rows moved in all
    block_dim: int | None = None
    rank: int | None = None
    adapter_multiple: float | None = None  # low_rank: C − R = multiple × the adapter's update
    compared_in: str | None = None  # the coarser of the two dtypes
    max_ulp: float | None = None
    off_fraction: float | None = None
    through: str | None = None  # cast_twice: the intermediate dtype (float16 for fp32 → fp16 → bf16)
    flushed: int | None = None  # cast_twice: elements the intermediate dtype flushed to 0


CLEAN = ("identical", "rounding")


@dataclass
class Pair:
    """What the ladder needs beyond the two tensors; every field is optional."""

    rotary_heads: int | None = None  # q/k projections: heads in the rows
    siblings: dict[str, Callable[[], torch.Tensor]] | None = None  # same layer, same shape
    adapter_delta: Callable[[], torch.Tensor] | None = None  # this module's adapter update (fp32)
    adapter_rank: int | None = None
    other_layers: dict[str, Callable[[], torch.Tensor]] | None = None  # same role and shape, other layers
    norm_of: Callable[[str], float] | None = None  # ‖reference tensor‖ by name (cached by the caller)
    norm_weight: bool = False  # an RMSNorm weight: an offset of −1 is the (1 + w) convention
    vocab_rows: bool = False  # rows are token ids (embedding, output head)
    device: str = "cpu"


def head_dim_ratio(c: float) -> tuple[int, int] | None:
    """(a, b) when c ≈ √a/√b for head dims a ≠ b (relative 1e-3), the largest such pair:
    16/14.96 ≈ √256/√224 (= √128/√112)."""
    best = None
    for a in HEAD_DIMS:
        for b in HEAD_DIMS:
            err = round(abs(c / math.sqrt(a / b) - 1), 9)
            if a != b and err < 1e-3 and (best is None or (err, -a) < best[:2]):
                best = (err, -a, a, b)
    return None if best is None else best[2:]


def rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """Row index of transformers' Meta→HF q/k permutation: within each head, the interleaved
    pairs (x0, x1), (x2, x3), … become halves [x0, x2, …, x1, x3, …]."""
    d = rows // heads
    return torch.arange(rows).view(heads, d // 2, 2).transpose(1, 2).reshape(-1)


def _block_index(size: int, order: list[int]) -> torch.Tensor:
    width = size // len(order)
    return torch.cat([torch.arange(j * width, (j + 1) * width) for j in order])


def _fingerprints(t: torch.Tensor, dim: int, device: str) -> torch.Tensor:
    """Per index along `dim`: (sum, sum of squares) in fp64."""
    t2 = as_rows(t)
    out = torch.zeros(t2.shape[dim], 2, dtype=torch.float64)
    for part in row_chunks(t2.shape[0], t2.shape[1]):
        x = t2[part].to(device, torch.float64)
        if dim == 0:
            out[part, 0] = x.sum(1).cpu()
            out[part, 1] = x.square().sum(1).cpu()
        else:
            out[:, 0] += x.sum(0).cpu()
            out[:, 1] += x.square().sum(0).cpu()
    return out


def _block_order(fc: torch.Tensor, fr: torch.Tensor, blocks: int) -> list[int] | None:
    """The non-identity assignment of candidate blocks to reference blocks by fingerprint, if
    it is a permutation."""
    bc = fc.view(blocks, -1, 2).sum(1)
    br = fr.view(blocks, -1, 2).sum(1)
    scale = br.abs().amax(0).clamp_min(1e-30)
    distance = ((bc[:, None, :] - br[None, :, :]) / scale).abs().sum(-1)
    order = distance.argmin(1).tolist()
    if sorted(order) != list(range(blocks)) or order == list(range(blocks)):
        return None
    return order


def _permutation(c, r, device, tol) -> tuple[int, list[int]] | None:
    if r.dim() != 2:  # norms and biases are replicated across ranks, never split
        return None
    for dim in (0, 1):
        size = r.shape[dim]
        fc, fr = _fingerprints(c, dim, device), _fingerprints(r, dim, device)
        for blocks in range(2, min(MAX_BLOCKS, size) + 1):
            if size % blocks:
                continue
            order = _block_order(fc, fr, blocks)
            if order is None:
                continue
            index = _block_index(size, sorted(range(blocks), key=order.__getitem__))  # C'[block j] = C[block i], order[i] = j
            s = pair_sums(c, r, None, device, rows=index if dim == 0 else None, cols=index if dim == 1 else None)
            if s.rel <= tol:
                return dim, order
    return None


def _low_rank_floor(s: Sums, dtype: torch.dtype) -> float:
    """What an update must stand clear of (twice) to be told from rounding."""
    return 2 * noise(s) + 2.0 ** -min(MANTISSA[dtype] + 4, 23)


def _low_rank(c, r, pair: Pair, s: Sums, dtype: torch.dtype) -> tuple[int | None, float | None] | None:
    """(rank, multiple of the adapter's update or None) when C − R is low-rank up to rounding
    and clearly above it."""
    tol = _low_rank_floor(s, dtype)
    if r.dim() != 2 or s.rel <= 2 * tol:
        return None
    norm_r = math.sqrt(s.rr)
    d = difference(c, r, pair.device)
    total = dot(d, d)  # of the fp32 difference itself, so that what is left after a fit is consistent
    if pair.adapter_delta is not None:
        delta = pair.adapter_delta().to(pair.device, torch.float32)
        dd = dot(delta, delta)
        if dd > 0:
            along = dot(d, delta)
            k = along / dd
            left = max(total - 2 * k * along + k * k * dd, 0.0)
            del delta
            if math.sqrt(left) / norm_r <= tol and abs(k) * math.sqrt(dd) / norm_r > 2 * tol:
                return pair.adapter_rank, k
    m, n = d.shape
    q = min(32, m, n)
    u, sv, _ = torch.svd_lowrank(d, q=q, niter=4)
    energy = torch.cumsum(sv.double().square(), 0)
    # fp32 singular values locate the rank only to ~1e-7 of the energy; the explicit residual decides
    slack = max(tol, 1e-3 * math.sqrt(total) / norm_r)
    rank = next((k for k in range(1, q + 1) if math.sqrt(max(total - float(energy[k - 1]), 0.0)) / norm_r <= slack), None)
    if rank is None or rank > min(m, n) // 4 or _residual(d, u[:, :rank]) / norm_r > tol:
        return None
    return rank, None


def _residual(d: torch.Tensor, u: torch.Tensor) -> float:
    """‖d − u·uᵀ·d‖ in fp64, a block of rows at a time (u: orthonormal columns)."""
    u = u.double()
    p = sum(u[part].T @ d[part].double() for part in row_chunks(d.shape[0], d.shape[1]))
    return math.sqrt(sum(float((d[part].double() - u[part] @ p).square().sum()) for part in row_chunks(d.shape[0], d.shape[1])))


def classify(name: str, c: torch.Tensor, r: torch.Tensor, pair: Pair | None = None) -> TensorResult:
    pair = pair or Pair()
    shape = list(r.shape)
    if tuple(c.shape) != tuple(r.shape):
        note = " (transposed)" if tuple(c.shape) == tuple(reversed(r.shape)) else ""
        return TensorResult(name=name, kind="shape", shape=shape, rel_error=math.inf,
                            detail=f"candidate {list(c.shape)} vs reference {shape}{note}")
    if not (c.is_floating_point() and r.is_floating_point()):
        same = torch.equal(c, r.to(c.dtype))
        return TensorResult(name=name, kind="identical" if same else "differing", shape=shape,
                            rel_error=0.0 if same else 1.0, detail="" if same else "integer values differ")
    dtype = coarser(c.dtype, r.dtype)
    s = pair_sums(c, r, dtype, pair.device)
    result: dict[str, Any] = dict(name=name, shape=shape, rel_error=s.rel, compared_in=_dtype(dtype), max_ulp=s.max_ulp,
                  off_fraction=s.off / max(s.n, 1))
    if s.non_finite:
        narrow = c.dtype in (torch.float16, torch.bfloat16)
        limit = f" (|x| > {torch.finfo(c.dtype).max:g} overflows {_dtype(c.dtype)})" if narrow else ""
        if c.dtype == torch.bfloat16 and _fp16_overflows(c, r, pair.device) == s.non_finite:
            limit = (f" (|x| > {torch.finfo(torch.float16).max:g}, within bfloat16's range, overflows float16: "
                     "cast through float16, then bfloat16)")
        return TensorResult(kind="non_finite", detail=f"{s.non_finite} element(s) inf or nan in the candidate where the "
                            f"reference is finite{limit}", **{**result, "rel_error": math.inf})
    if s.dd == 0 and c.dtype == r.dtype:
        return TensorResult(kind="identical", **result)
    tol = tolerance(s, dtype)
    # Rounding and arithmetic move an element by about an ulp at its own value (near ties; fp32
    # arithmetic before the cast, which near zero is many tiny ulps but little in absolute terms);
    # a few elements far off (two rows exchanged, one row zeroed) are damage however small their
    # share of the total: each element may exceed its own ulp by at most 2^-p of the tensor's RMS.
    local = s.max_excess <= 2.0 ** -MANTISSA[dtype] * s.rms
    concentrated = not local and s.off <= 0.01 * s.n  # few elements off, some far: damage (see _beyond)
    single_cast = s.off <= ROUNDING_OFF_FRACTION * s.n and local
    if s.rel <= tol and (single_cast or MANTISSA[dtype] >= 23):
        return TensorResult(kind="rounding", detail=f"equal up to {_dtype(dtype)} rounding", **result)
    if s.cc == 0 and s.rr > 0:
        return TensorResult(kind="zeroed", detail="all zeros where the reference is not (a tensor the conversion "
                            "dropped, then initialised to zeros and saved?)", **result)

    if s.rr > 0 and s.cc > 0 and 1 - s.cr**2 / (s.cc * s.rr) < 1e-4:
        k = s.cr / s.rr
        residual = scaled_residual(c, r, k, pair.device)
        if residual <= tol and abs(k - 1) > tol:
            ratio = head_dim_ratio(k)
            note = f" (≈ √{ratio[0]}/√{ratio[1]})" if ratio else ""
            return TensorResult(kind="scaled", scale=k, detail=f"{k:.4f} × reference{note}", **result)

    offset = _offset(s, dtype, tol)
    if offset is not None:
        return TensorResult(kind="offset", offset=offset, detail=offset_detail(offset, pair.norm_weight), **result)

    # Rounding beyond one cast, too small for an update to be seen: no other tensor, layout or
    # order can be this close, so the lookups below are skipped (a candidate cast twice costs
    # two passes per tensor, the statistics and the cast-through check, not the ladder).
    if _beyond(s, dtype, concentrated) and s.rel <= 2 * _low_rank_floor(s, dtype):
        return _precision(c, r, s, dtype, pair.device, result)

    for other, load in (pair.siblings or {}).items():
        if pair_sums(c, load(), None, pair.device).rel <= tol:
            return TensorResult(kind="swapped", other=other, detail=f"equals reference {other}", **result)

    layer = _other_layer(c, s, dtype, tol, pair)
    if layer is not None:
        return TensorResult(kind="other_layer", other=layer, detail=f"equals reference {layer}", **result)

    if pair.rotary_heads and c.dim() == 2 and c.shape[0] % (2 * pair.rotary_heads) == 0:
        index = rotary_rows(c.shape[0], pair.rotary_heads)
        if pair_sums(c, r, None, pair.device, rows=index).rel <= tol:
            return TensorResult(kind="rotary", detail="rows in the interleaved (Meta) rotary layout: the Meta→HF "
                                "q/k permutation was not applied", **result)
        if pair_sums(c, r, None, pair.device, rows=torch.argsort(index)).rel <= tol:
            return TensorResult(kind="rotary", detail="rows permuted twice: the Meta→HF q/k permutation was applied "
                                "to weights already in the HF layout", **result)

    if pair.vocab_rows and c.dim() == 2:
        moves = _rows_moved(c, r, dtype, pair.device)
        if moves is not None:
            return TensorResult(kind="rows_moved", moves=[list(m) for m in moves[:MAX_MOVES]], moved=len(moves),
                                detail=describe_moves(moves), **result)

    found = _permutation(c, r, pair.device, tol)
    if found is not None:
        dim, order = found
        what = "rows" if dim == 0 else "columns"
        return TensorResult(kind="permuted", blocks=order, block_dim=dim,
                            detail=f"{what} in {len(order)} equal blocks in the order {order}", **result)

    low = _low_rank(c, r, pair, s, dtype)
    if low is not None:
        rank, multiple = low
        what = f" = {multiple:+.3f} × the adapter's update" if multiple is not None else ""
        return TensorResult(kind="low_rank", rank=rank, adapter_multiple=multiple,
                            detail=f"difference of rank {rank}{what}", **result)

    if _beyond(s, dtype, concentrated):
        return _precision(c, r, s, dtype, pair.device, result)
    hint = next((f": the size of {name} rounding (arithmetic done in {name}?)" for name, p in (("float16", 10), ("bfloat16", 7))
                 if 2.0 ** -(p + 3) <= s.rel <= 2.0 ** -p and MANTISSA[dtype] > p), "")
    if not hint and concentrated:
        hint = (f"; {s.off} element(s) off the reference's rounding, {s.far} of them by more than 2 ulps, the rest "
                "equal: local damage (rows or elements overwritten?)")
    return TensorResult(kind="differing", detail=f"relative error {s.rel:.3g}{hint}", **result)


def _near(s: Sums, dtype: torch.dtype) -> bool:
    """Within a few units of the coarser dtype's precision of the reference."""
    return s.rel <= 4 * 2.0 ** -MANTISSA[dtype]


def _beyond(s: Sums, dtype: torch.dtype, concentrated: bool) -> bool:
    """Beyond one rounding but small: arithmetic in low precision moves many elements by an
    ulp or a few; damage moves few (at most 1% off at all), some far beyond the per-element
    bound (`concentrated`): that is `differing`, not rounding, however small the total."""
    return _near(s, dtype) and not concentrated


HALF = (torch.float16, torch.bfloat16)


def _precision(c, r, s: Sums, dtype: torch.dtype, device: str, result: dict) -> TensorResult:
    """Beyond one rounding, by precision alone: a cast through the other half-precision
    dtype when that explains (nearly) every element, else rounding beyond (arithmetic)."""
    through = _cast_through(c, r, dtype, device)
    if through is None:
        return TensorResult(kind="rounding_beyond", detail=_beyond_detail(s, dtype), **result)
    via, flushed = through
    return TensorResult(kind="cast_twice", through=_dtype(via), flushed=flushed,
                        detail=_twice_detail(s, via, dtype, flushed), **result)


def _cast_through(c, r, dtype: torch.dtype, device: str) -> tuple[torch.dtype, int] | None:
    """(via, elements flushed to 0 by via) when the candidate, stored in `dtype`, equals
    dtype(via(R)) on all but ROUNDING_OFF_FRACTION of its elements, for via the other
    half-precision dtype and a reference finer than via. A direct cast and a cast through
    via differ only where via's rounding lands on a tie of dtype's grid (fp16 → bf16: ~6% of
    elements, by one ulp) or leaves via's range (fp16: |x| under 2^-25 flushes to 0, under
    2^-14 keeps fewer bits; above 65504, inf: `non_finite`)."""
    if c.dtype != dtype or dtype not in HALF or MANTISSA.get(r.dtype, 0) <= MANTISSA[dtype]:
        return None
    c2, r2 = as_rows(c), as_rows(r)
    for via in HALF:
        if via == dtype or MANTISSA[r.dtype] <= MANTISSA[via]:
            continue
        off = flushed = 0
        for part in row_chunks(r2.shape[0], r2.shape[1]):
            rc = r2[part].to(device, torch.float32)
            step = rc.to(via)
            off += int((c2[part].to(device, torch.float32) != step.to(dtype).float()).sum())
            flushed += int(((step == 0) & (rc != 0)).sum())
        if off <= ROUNDING_OFF_FRACTION * r2.numel():
            return via, flushed
    return None


def _fp16_overflows(c, r, device: str) -> int:
    """Elements inf or nan in the candidate whose reference is finite, beyond float16's range
    and within bfloat16's: what a cast through float16 leaves in a bfloat16 tensor."""
    c2, r2 = as_rows(c), as_rows(r)
    count = 0
    for part in row_chunks(r2.shape[0], r2.shape[1]):
        size = r2[part].to(device, torch.float32).abs()
        bad = ~torch.isfinite(c2[part].to(device, torch.float32)) & torch.isfinite(size)
        count += int((bad & (size > torch.finfo(torch.float16).max) & (size <= torch.finfo(torch.bfloat16).max)).sum())
    return count


def _twice_detail(s: Sums, via: torch.dtype, dtype: torch.dtype, flushed: int) -> str:
    text = (f"cast through {_dtype(via)}, then {_dtype(dtype)}: each element is the {_dtype(dtype)} rounding of its "
            f"{_dtype(via)} rounding ({s.off / s.n:.1%} of elements off the single {_dtype(dtype)} rounding, at most "
            f"{s.max_ulp:.0f} ulp")
    if flushed:
        text += f"; {flushed} element(s) under {_dtype(via)}'s range flushed to 0"
    return text + ")"


def _beyond_detail(s: Sums, dtype: torch.dtype) -> str:
    return (f"{s.off / s.n:.1%} of elements off the single {_dtype(dtype)} rounding of the reference "
            f"({s.near / max(s.off, 1):.1%} of them by 1 ulp, at most {s.max_ulp:.0f}); a single cast leaves 0")


def _offset(s: Sums, dtype: torch.dtype, tol: float) -> float | None:
    """c when C = R + c within rounding (the candidate's own rounding is of C's values, which
    an offset can make larger than R's) and clearly beyond it."""
    if s.rr == 0 or s.n < 2:
        return None
    c = s.d / s.n
    left = math.sqrt(max(s.dd - s.n * c * c, 0.0) / s.rr)
    slack = tol + 2.0 ** -MANTISSA[dtype] * math.sqrt(s.cc / s.rr)
    return c if left <= slack and abs(c) * math.sqrt(s.n / s.rr) > 2 * slack else None


def offset_detail(c: float, norm_weight: bool) -> str:
    text = f"reference {'+' if c >= 0 else '−'} {abs(c):.3g}"
    if norm_weight and abs(c + 1) < 1e-3:
        return (text + ": an RMSNorm weight in the (1 + w) convention (Gemma's stored w − 1): a Llama forward "
                "multiplies by w − 1 instead of w")
    if norm_weight and abs(c - 1) < 1e-3:
        return (text + ": an RMSNorm weight with the (1 + w) convention's 1 added: right only where the "
                "forward multiplies by w (Gemma's weight converted to Llama's); else the norm scales by w + 1")
    return text


def _other_layer(c, s: Sums, dtype: torch.dtype, tol: float, pair: Pair) -> str | None:
    """The reference tensor of the same role in another layer that C equals. A cheap filter
    first: ‖C‖ within tol of ‖R_other‖ (necessary: |‖C‖ − ‖R‖| ≤ ‖C − R‖), then the full
    comparison for the few left."""
    if not pair.other_layers or pair.norm_of is None or _near(s, dtype):
        return None  # close to its own reference: another layer's cannot be the better explanation
    norm = math.sqrt(s.cc)
    for name, load in pair.other_layers.items():
        size = pair.norm_of(name)
        if size == 0 or abs(norm - size) > 2 * tol * size:
            continue
        other = pair_sums(c, load(), dtype, pair.device)
        if other.rel <= tolerance(other, dtype) and other.rel < s.rel / 4:
            return name
    return None


MAX_ROWS_SEARCHED = 4096  # rows_moved: more changed rows than this are not matched (quadratic)


def _rows_moved(c: torch.Tensor, r: torch.Tensor, dtype: torch.dtype, device: str) -> list[tuple[int, int]] | None:
    """[(candidate row, the reference row it holds)] for the rows that moved, when every row
    that differs beyond one rounding equals another row of the reference. Candidate rows are
    matched by a fixed random projection (nearest), each match then checked in full."""
    bound = 2.0 ** -MANTISSA[dtype] * 2  # one rounding moves a row by under 2^-p of its norm
    changed = []
    for part in row_chunks(r.shape[0], r.shape[1]):
        rc, cc = r[part].to(device, torch.float64), c[part].to(device, torch.float64)
        off = (cc - rc).square().sum(1) > bound**2 * rc.square().sum(1)
        changed.append(torch.nonzero(off).view(-1).cpu() + part.start)
    rows = torch.cat(changed)
    if not 1 <= rows.numel() <= MAX_ROWS_SEARCHED:
        return None
    project = torch.randn(r.shape[1], 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    keys = torch.cat([r[part].to(device, torch.float64) @ project for part in row_chunks(r.shape[0], r.shape[1])])
    cand = c[rows].to(device, torch.float64)
    nearest = torch.cat([torch.cdist(cand[i:i + 128] @ project, keys).argmin(1)  # any reference row:
                         for i in range(0, rows.numel(), 128)]).cpu()  # a row copied from an unmoved one too
    held = r[nearest].to(device, torch.float64)
    if bool(((cand - held).square().sum(1) > bound**2 * held.square().sum(1)).any()):
        return None
    return [(int(i), int(j)) for i, j in zip(rows, nearest)]


def describe_moves(moves: list[tuple[int, int]]) -> str:
    """'2 rows moved: 17 ↔ 42' (exchanges), '5 ← 9' (row 5 holds reference row 9)."""
    held = dict(moves)
    parts = []
    for row, source in moves:
        if held.get(source) == row:
            if row < source:
                parts.append(f"{row} ↔ {source}")
        else:
            parts.append(f"{row} ← {source}")
    shown = ", ".join(parts[:8]) + (f", … ({len(parts) - 8} more)" if len(parts) > 8 else "")
    return f"{len(moves)} row{'s' if len(moves) != 1 else ''} moved: {shown}"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
