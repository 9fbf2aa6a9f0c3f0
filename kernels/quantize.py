"""Importance-weighted quantizers (numpy) for the weight encodings the model files use.

``quantize(values [rows, cols], type, importance [cols] | None)`` returns raw GGUF
blocks that ``reference.dequantize`` and ``gguf.quants.dequantize`` decode. The
algorithms follow the prose of docs/spec/quant-kernels.md §3 (ds4/ggml's choices),
re-derived here; where this code departs from ds4 it says so, and why.

Error weights. Inside a 256-value block, element ``i`` of column ``c`` weighs
``w_i = qw[c] * sqrt(sigma2 + x_i^2)``, ``sigma2`` = the block's mean of ``x^2``
(twice that for Q4_K), ``qw`` the imatrix slice scaled to max 1: a column that
sees large activations, or a large weight, must come out accurately. Without
an imatrix (or with an all-zero slice), IQ2_XXS takes the column energy
``qw[c] = sum_r W[r, c]^2`` and Q2_K / Q4_K the spec's plain rule ``w = |x|``
(spec §3.3; for plain RMS error, ``importance=np.ones(cols)`` does ~10% better).

* F32 / F16: casts. Q8_0: absmax, ``q = round_half_away(x * (1/d))`` with the
  f32 ``d = max|x| / 127`` (only the stored ``d`` is f16): bit-identical to
  gguf-py. An absmax code has nothing to weigh, so importance is ignored.
* Q2_K (16 x 16 values, 2-bit codes, 4-bit scales) and Q4_K (8 x 32, 4-bit
  codes, 6-bit scales): per sub-block, a fan of trial inverse scales; each
  rounds the codes ``L`` and solves the weighted 2x2 least squares for
  ``x ~ a*L - m`` (``a, m >= 0``); the least error wins. Fan ``rmin / rdelta /
  steps`` = -0.9 / 0.05 / 36 and squared error with an imatrix, -0.5 / 0.1 /
  15 and absolute error without (spec §3.3). The scales and mins then become
  integers against one f16 ``d`` / ``dmin`` per block: linearly by their maxima
  without an imatrix; with one, by a few trial ``d`` scored with the error they
  add to the values (``sum w L^2`` per squared unit of scale misfit, ``sum w``
  for the mins) where ds4 fits the list of scales. *Added to ds4's recipe:*
  ``(d, dmin)`` are then re-solved by block least squares for the integer
  scales and codes, and the codes re-rounded. *Also added:* two rounds of
  coordinate descent on the block's true error -- each sub-block's scale and
  min codes move by at most one step where that lowers its error, then
  ``(d, dmin)`` are re-solved. Without an imatrix Q4_K weighs squared error by
  ``rms(sub-block) + |x|`` (fan -1 / 0.1 / 20), as ggml's reference does; the
  spec's ``|x|`` rule is Q2_K's. Against ggml's own quantizer
  (``ggml_quantize_chunk``) on the same data, our weighted RMS error is 0.93-0.99
  of ggml's for Q2_K, 0.97-0.99 for Q4_K (tests/test_quantize_vs_ggml.py).
* IQ2_XXS (per block 8 groups of 32 = 4 subgroups of 8): signs are stored as
  they are, except that a subgroup's negatives must be even (the 8th sign bit
  is implied), so the lane with the least ``w x^2`` flips, its target becoming
  ``-|x|`` (spec §3.2). *Differs from ds4:* no per-lane rounding plus
  neighbour-list search (<= 150 grid points, ``sqrt(w)`` metric, hence no
  neighbour tables at all): all 256 patterns are scored exactly. For a
  grid-unit scale ``s``, pattern ``g`` costs ``s^2 B_g - 2 s C_g + const`` with
  ``B = w . grid^2`` and ``C = (w t) . grid`` -- two small matrix products per
  subgroup -- so each trial scale is one pass over a [subgroups, 256] table,
  with the grid's true magnitudes 8/25/43 (ds4 models them as 1/3/5). Group
  trials ``s = f * max|x| / 43`` (4 of them), each re-fitted by least squares;
  the best is re-projected once. The block's f16 ``d`` is picked among 6
  trials by the exact quadratic cost of rounding the group scales to
  ``d (2 ls + 1) / 8``; the patterns are then re-picked for the scales really
  stored. ds4's uint8 wrap of a negative level is not emulated (it only adds
  error). On spec §3.4's matrix: weighted error 0.107 against ds4's 0.125;
  0.63-0.97 of ggml's weighted RMS error on the matrices of test_quantize_vs_ggml.

All of it is vectorized over the blocks of a chunk; Python loops only over the
fixed trial counts. Chunks are small so the per-trial arrays stay in cache,
which also bounds the memory to a few MB beyond the output.
"""

from __future__ import annotations

import numpy as np

from .formats import GGMLType, row_bytes
from .reference import IQ2XXS_GRID

# Blocks of 256 values handled at once (measured best on a 2-core EPYC): the IQ2
# search's [subgroups, 256] tables (2 MiB each) and the K-quant trial arrays
# (1 MiB each) stay in cache while the Python overhead per chunk stays small.
IQ2_CHUNK_BLOCKS = 64
KQ_CHUNK_BLOCKS = 1024
NUDGE_ROUNDS = 2  # K-quant refinement rounds; a third gains < 0.1% (measured)
Q8_CHUNK_BLOCKS = 1 << 14  # of 32 values


def quantize(values: np.ndarray, ggml_type: int, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows [rows, cols] -> uint8 blocks [rows, row_bytes(ggml_type, cols)].

    importance: per-column weights [cols] (an imatrix slice; >= 0), or None.
    """
    try:
        qtype = GGMLType(ggml_type)
    except ValueError:
        raise ValueError(f"unknown GGML type {ggml_type!r}") from None
    if qtype not in _QUANTIZERS:
        raise ValueError(f"no quantizer for {qtype.name}")
    x = np.asarray(values)
    if x.ndim != 2:
        raise ValueError(f"quantize takes a 2-D [rows, cols] matrix, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out_cols = row_bytes(qtype, cols)  # ValueError unless the rows fill whole blocks
    top = max(float(x.max()), -float(x.min())) if x.size else 0.0  # NaN propagates; no |x| copy
    if not np.isfinite(top):
        raise ValueError("cannot quantize non-finite values (NaN or inf)")
    if top > _LARGEST[qtype]:
        raise ValueError(f"{qtype.name} cannot hold |x| = {top:.3g}: its float16 scales limit values "
                         f"to about {_LARGEST[qtype]:.3g}")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32)
        if importance.shape != (cols,):
            raise ValueError(f"importance has shape {importance.shape}, expected ({cols},)")
        if not np.isfinite(importance).all() or (importance < 0).any():
            raise ValueError("importance values must be finite and non-negative")
    if rows == 0:
        return np.zeros((0, out_cols), np.uint8)
    return _QUANTIZERS[qtype](x, importance).reshape(rows, out_cols)


# The largest |x| each encoding takes: its top code times the largest f16 scale (65504),
# with room for the searches' trial scales (a quarter of it) where the scale is searched.
_LARGEST = {
    GGMLType.F32: float(np.finfo(np.float32).max),
    GGMLType.F16: 65504.0,
    GGMLType.Q8_0: 65000.0 * 127,
    GGMLType.Q2_K: 65504.0 * 15 * 3 / 4,
    GGMLType.Q4_K: 65504.0 * 63 * 15 / 4,
    GGMLType.IQ2_XXS: 65504.0 * 15.5 / 4 * 43 / 4,
}
# Below this a value can only decode as 0 (every format's smallest non-zero output is
# ~6e-8, the least f16 subnormal); flushing it keeps 1/span and 1/d finite.
_TINY = np.float32(1e-20)


# ---------------------------------------------------------------------------
# Shared helpers


def _f16_round(v: np.ndarray) -> np.ndarray:
    """``v`` as the f16 the block stores, back in float32 (codes must use the stored value)."""
    return v.astype(np.float16).astype(np.float32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    v = v + np.float32(0)  # -0.0 + 0.0 = +0.0: an all-zero block stores all-zero bytes
    return v.astype("<f2").view(np.uint8).reshape(len(v), 2)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where den > 0, else 0 (empty or all-zero-weight sub-blocks)."""
    ok = den > 0
    return np.where(ok, num / np.where(ok, den, 1), 0).astype(np.float32)


def _column_weights(x: np.ndarray, importance: np.ndarray | None, energy_fallback: bool) -> np.ndarray | None:
    """The per-column ``qw`` as [blocks per row, 256], or None for the no-imatrix rule."""
    if importance is None or not importance.any():  # an all-zero slice (expert never routed) says nothing
        if not energy_fallback:
            return None
        importance = np.einsum("rc,rc->c", x, x, dtype=np.float64).astype(np.float32)
        if not importance.any():
            importance = np.ones(x.shape[1], np.float32)
    # Only relative importance matters: scale to max 1 (keeps the fits' sums in range). A
    # small floor keeps zero-importance columns from dropping out of the fits entirely.
    qw = importance / importance.max()
    qw += np.float32(1e-6) * qw.mean()
    return qw.reshape(-1, 256)


def _chunks(x: np.ndarray, qw: np.ndarray | None, chunk_blocks: int):
    """Yield (slice of flattened blocks, blocks [n, 256], qw [n, 256] or None)."""
    blocks = x.reshape(-1, 256)
    per_row = x.shape[1] // 256
    for b0 in range(0, len(blocks), chunk_blocks):
        b1 = min(b0 + chunk_blocks, len(blocks))
        cw = None if qw is None else qw[np.arange(b0, b1) % per_row]
        xb = blocks[b0:b1]
        yield slice(b0, b1), np.where(np.abs(xb) < _TINY, np.float32(0), xb), cw


# ---------------------------------------------------------------------------
# F32, F16, Q8_0


def _f32(x: np.ndarray, importance) -> np.ndarray:
    return x.astype("<f4").view(np.uint8)


def _f16(x: np.ndarray, importance) -> np.ndarray:
    return x.astype("<f2").view(np.uint8)


def _q8_0(x: np.ndarray, importance) -> np.ndarray:
    blocks = x.reshape(-1, 32)
    out = np.empty((len(blocks), 34), np.uint8)
    for b0 in range(0, len(blocks), Q8_CHUNK_BLOCKS):
        xb = blocks[b0:b0 + Q8_CHUNK_BLOCKS]
        d = np.abs(xb).max(axis=1) / np.float32(127)
        # 1 / d as gguf-py computes it; a block so small that 1/d overflows (its f16 d is 0
        # anyway) gets codes 0.
        tiny = d < np.float32(1e-37)
        inv = np.float32(1) / np.where(tiny, 1, d)
        inv[tiny] = 0
        v = xb * inv[:, None]
        # Round half away from zero; a - floor(a) is exact in float32, so ties are exact.
        a = np.abs(v)
        q = np.floor(a)
        q += (a - q) >= 0.5
        out[b0:b0 + len(xb), :2] = _f16_bytes(d)
        out[b0:b0 + len(xb), 2:] = np.copysign(q, v).astype(np.int8).view(np.uint8)
    return out


# ---------------------------------------------------------------------------
# Q2_K and Q4_K: affine sub-blocks under two-level (integer x f16) scales.
#
# Sub-block data is held transposed, [S values, m sub-blocks], so the many
# per-sub-block sums are S-1 long vector adds instead of short-row reductions.


def _fit_affine(x, w, nmax, rmin, rdelta, steps, absolute):
    """Per column of ``x`` [S, m]: (a, m) >= 0 of ``x ~ a*L - m`` (L in 0..nmax) with the
    least weighted error over the trial inverse scales; each trial's (a, m) is the
    weighted least-squares fit for its rounded codes."""
    lo = np.minimum(x.min(axis=0), 0)
    span = x.max(axis=0) - lo
    xl = x - lo
    inv_span = _safe_div(np.ones_like(span), span)
    sw, sx, sxx = w.sum(axis=0), (w * x).sum(axis=0), (w * x * x).sum(axis=0)
    # Start from plain min/max coding (what a degenerate fit falls back to).
    best_a, best_m = (span / np.float32(nmax)).astype(np.float32), -lo
    best_err = np.full(len(lo), np.inf, np.float32)
    L = np.empty_like(x)
    wl = np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore"):  # singular fits are masked by `ok`
        for k in range(steps + 1):
            np.multiply(xl, np.float32(nmax + rmin + rdelta * k) * inv_span, out=L)
            np.rint(L, out=L)
            np.minimum(L, nmax, out=L)
            np.multiply(w, L, out=wl)
            sl = wl.sum(axis=0)
            slx = np.einsum("ij,ij->j", wl, x)
            sll = np.einsum("ij,ij->j", wl, L)
            det = sw * sll - sl * sl
            ok = det > 1e-12 * sw * sll  # one code for the whole sub-block leaves the 2x2 system singular
            a = (sw * slx - sl * sx) / det
            b = (sll * sx - sl * slx) / det
            pos = b > 0  # the format subtracts a non-negative min: refit through zero
            a = np.maximum(np.where(pos, slx / sll, a), 0)
            b[pos] = 0
            if absolute:
                err = (w * np.abs(a * L + b - x)).sum(axis=0)
            else:  # sum w (aL + b - x)^2, expanded into the sums already at hand
                err = a * (a * sll + 2 * b * sl - 2 * slx) + b * (b * sw - 2 * sx) + sxx
            better = ok & (err < best_err)
            np.copyto(best_err, err, where=better)
            np.copyto(best_a, a, where=better)
            np.copyto(best_m, -b, where=better)
    return best_a.astype(np.float32), best_m.astype(np.float32)


def _scale_codes(v, cost, smax, weighted):
    """Integer codes (0..smax) for per-sub-block numbers ``v`` [n, j] against one f16
    step per block. ``cost`` [n, j]: how much the block's error grows per squared
    unit of misfit in each entry (used only when ``weighted``)."""
    top = v.max(axis=1)
    trials = (1.0,) if not weighted else (0.88, 0.92, 0.96, 1.0, 1.04)
    best_d, best_err = None, None
    for f in trials:
        d = _f16_round(top / smax * np.float32(f))
        codes = np.clip(np.rint(v * _safe_div(np.ones_like(d), d)[:, None]), 0, smax)
        err = (cost * (d[:, None] * codes - v) ** 2).sum(axis=1)
        if best_d is None:
            best_d, best_err = d, err
        else:
            better = err < best_err
            best_d, best_err = np.where(better, d, best_d), np.where(better, err, best_err)
    codes = np.clip(np.rint(v * _safe_div(np.ones_like(best_d), best_d)[:, None]), 0, smax)
    return codes.astype(np.float32), best_d


def _round_codes(x, step, off, nmax):
    """Codes for values ``x`` [S, n, j] given per-sub-block step and offset [n, j]."""
    return np.where(step > 0, np.clip(np.rint((x + off) * _safe_div(np.ones_like(step), step)), 0, nmax), 0)


def _k_quant(x, importance, sub, nmax, smax, sigma_mul, plain_rms):
    """Shared search of Q2_K / Q4_K: per block codes L [n, 256], scale and min codes
    [n, 256 / sub], d and dmin [n]. ``plain_rms`` picks the no-imatrix rule (below)."""
    qw = _column_weights(x, importance, energy_fallback=False)
    n_sub = 256 // sub
    for part, xb, cw in _chunks(x, qw, KQ_CHUNK_BLOCKS):
        n = len(xb)
        # Transposed sub-blocks [sub, n * n_sub]; column index = block * n_sub + j.
        xt = np.ascontiguousarray(xb.reshape(n * n_sub, sub).T)
        if cw is None and plain_rms:  # ggml's Q4_K rule: squared error weighted by rms + |x|
            wt = np.sqrt((xt * xt).mean(axis=0)) + np.abs(xt)
            a, m = _fit_affine(xt, wt, nmax, -1.0, 0.1, 20, absolute=False)
        elif cw is None:  # Q2_K: spec §3.3's absolute error weighted by |x|
            wt = np.abs(xt)
            a, m = _fit_affine(xt, wt, nmax, -0.5, 0.1, 15, absolute=True)
        else:
            sigma2 = sigma_mul * np.mean(xb * xb, axis=1, keepdims=True)
            wt = np.ascontiguousarray((cw * np.sqrt(sigma2 + xb * xb)).reshape(n * n_sub, sub).T)
            a, m = _fit_affine(xt, wt, nmax, -0.9, 0.05, 36, absolute=False)
        a, m = a.reshape(n, n_sub), m.reshape(n, n_sub)
        x3 = xt.reshape(sub, n, n_sub)
        w3 = wt.reshape(sub, n, n_sub)
        # The error grows by sum w L^2 per squared unit of scale misfit, sum w per unit of min misfit.
        L = _round_codes(x3, a, m, nmax)
        weighted = cw is not None
        sc, d = _scale_codes(a, (w3 * L * L).sum(axis=0), smax, weighted)
        mn, dmin = _scale_codes(m, w3.sum(axis=0), smax, weighted)
        # Then coordinate descent on the block's true error: each sub-block moves its scale
        # and min codes by at most one step where that lowers its error (codes re-rounded),
        # and (d, dmin) are re-solved for the new codes. Each round lowers the error (up to
        # the f16 rounding of d and dmin).
        for _ in range(NUDGE_ROUNDS):
            sc, mn = _nudge_codes(x3, w3, sc, mn, d, dmin, nmax, smax)
            L = _round_codes(x3, d[:, None] * sc, dmin[:, None] * mn, nmax)
            d, dmin = _refit_block(x3, w3, sc * L, mn, d, dmin)
        L = _round_codes(x3, d[:, None] * sc, dmin[:, None] * mn, nmax)
        yield part, L.transpose(1, 2, 0).reshape(n, 256).astype(np.uint8), sc.astype(np.uint8), \
            mn.astype(np.uint8), d, dmin


def _nudge_codes(x3, w3, sc, mn, d, dmin, nmax, smax):
    """Per sub-block, the scale and min codes within one step of (sc, mn) whose re-rounded
    values have the least weighted error under the block's (d, dmin)."""
    best_sc, best_mn, best_err = sc, mn, np.inf
    for ds in (-1, 0, 1):
        for dm in (-1, 0, 1):
            s2, m2 = np.clip(sc + ds, 0, smax), np.clip(mn + dm, 0, smax)
            step, off = d[:, None] * s2, dmin[:, None] * m2
            err = (w3 * (step * _round_codes(x3, step, off, nmax) - off - x3) ** 2).sum(axis=0)
            better = err < best_err
            best_sc, best_mn = np.where(better, s2, best_sc), np.where(better, m2, best_mn)
            best_err = np.where(better, err, best_err)
    return best_sc, best_mn


def _refit_block(x3, w3, u, mn, d, dmin):
    """Least-squares (d, dmin) >= 0 of ``x ~ d*u - dmin*mn`` per block (u = sc * L and the
    min codes fixed), rounded to f16; a block with nothing to fit keeps its old pair."""
    def total(v):  # weighted sum over each block's values
        return (w3 * v).sum(axis=(0, 2))

    suu, sum_, smm = total(u * u), total(u * mn), total(mn * mn)
    sux, smx = total(u * x3), total(mn * x3)
    # Minimize suu d^2 - 2 sum_ d dmin + smm dmin^2 - 2 sux d + 2 smx dmin.
    det = suu * smm - sum_ * sum_
    joint = det > 1e-9 * suu * smm
    nm = np.where(joint, _safe_div(np.where(joint, sum_ * sux - suu * smx, 0), det), dmin)
    # No scale left (every sc or L is 0, e.g. d underflowed f16): the mins alone fit the block.
    nm = np.where(suu > 0, nm, _safe_div(-smx, smm))
    nm = np.maximum(nm, 0)  # a negative dmin is not storable: clamp it and fit d alone
    nd = np.where(suu > 0, _safe_div(sux + nm * sum_, suu), d)
    ok = (nd >= 0) & ((suu > 0) | (smm > 0))
    return np.where(ok, _f16_round(nd), d), np.where(ok, _f16_round(nm), dmin)


def _q2_k(x, importance):
    out = np.empty((x.size // 256, 84), np.uint8)
    for part, L, sc, mn, d, dmin in _k_quant(x, importance, 16, 3, 15, 1.0, plain_rms=False):
        n = len(L)
        o = out[part]
        o[:, :16] = sc | (mn << 4)
        # Byte l of half h holds values 128h + 32k + l at shift 2k.
        q = L.reshape(n, 2, 4, 32)
        o[:, 16:80] = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
        o[:, 80:82], o[:, 82:84] = _f16_bytes(d), _f16_bytes(dmin)
    return out


def _q4_k(x, importance):
    out = np.empty((x.size // 256, 144), np.uint8)
    for part, L, sc, mn, d, dmin in _k_quant(x, importance, 32, 15, 63, 2.0, plain_rms=True):
        n = len(L)
        o = out[part]
        o[:, 0:2], o[:, 2:4] = _f16_bytes(d), _f16_bytes(dmin)
        # Sub-blocks 0-3 keep their 6 bits in bytes 0-7; 4-7 split into a nibble
        # (bytes 8-11) and two high bits parked in the top of bytes 0-7.
        o[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
        o[:, 8:12] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
        o[:, 12:16] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
        q = L.reshape(n, 4, 2, 32)  # chunk c: sub-block 2c in low nibbles, 2c+1 in high
        o[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return out


# ---------------------------------------------------------------------------
# IQ2_XXS: per 8 values, sign bits and one of 256 magnitude patterns; per 32 a
# 4-bit scale; per 256 an f16 d. Value = d * (0.5 + ls) / 4 * grid * sign.

_GRID = IQ2XXS_GRID.astype(np.float32)  # [256, 8], magnitudes 8 / 25 / 43
_GRID_T = np.ascontiguousarray(_GRID.T)
_GRID2_T = np.ascontiguousarray((_GRID * _GRID).T)
_IQ2_TRIALS = np.array([0.75, 0.9, 1.05, 1.2], np.float32)  # x max|x| / 43 per group
_IQ2_D_TRIALS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05)  # x the d that stores the largest group scale at ls = 15
_MATMUL_ROWS = 128  # keep each BLAS call small: OpenBLAS stays single-threaded (threads stall on a busy box)


def _by_grid(v: np.ndarray, grid_t: np.ndarray) -> np.ndarray:
    """``v [m, 8] @ grid_t [8, 256]`` as a stack of small products (m % 128 == 0)."""
    return (v.reshape(-1, _MATMUL_ROWS, 8) @ grid_t).reshape(len(v), 256)


class _Patterns:
    """The exact per-subgroup pattern search: for a grid-unit scale ``s`` per
    subgroup, pattern g costs ``s^2 B_g - 2 s C_g`` (+ a constant), i.e. ``s (s B_g - 2 C_g)``."""

    def __init__(self, w: np.ndarray, target: np.ndarray):
        self.B = _by_grid(w, _GRID2_T)
        self.C2 = _by_grid(2 * w * target, _GRID_T)
        self.tmp = np.empty_like(self.B)
        self.row_start = np.arange(0, self.B.size, 256)  # flat index of each subgroup's row

    def pick(self, s: np.ndarray) -> np.ndarray:
        np.multiply(self.B, s[:, None], out=self.tmp)
        np.subtract(self.tmp, self.C2, out=self.tmp)
        return self.tmp.argmin(axis=1)

    def fit(self, p: np.ndarray):
        """Per 32-value group, for patterns ``p``: the least-squares scale (>= 0), the error
        it removes (c^2 / b, larger is better) and b = sum w g^2 (the error's curvature)."""
        at = self.row_start + p
        b = self.B.reshape(-1)[at].reshape(-1, 4).sum(axis=1)
        c = self.C2.reshape(-1)[at].reshape(-1, 4).sum(axis=1) * np.float32(0.5)
        s = np.maximum(_safe_div(c, b), 0)
        return s, s * c, b


def _iq2_xxs_chunk(xb: np.ndarray, wb: np.ndarray) -> np.ndarray:
    n = len(xb)
    xs, ws = xb.reshape(-1, 8), wb.reshape(-1, 8)
    mag = np.abs(xs)
    negative = xs < 0
    # An odd number of negatives cannot be stored: the lane that costs least flips.
    odd = np.nonzero(np.count_nonzero(negative, axis=1) & 1)[0]
    cheapest = np.argmin((ws * mag * mag)[odd], axis=1)
    negative[odd, cheapest] ^= True
    target = mag.copy()
    target[odd, cheapest] *= -1  # that lane's stored sign is wrong: it wants the smallest magnitude
    pat = _Patterns(ws, target)

    # Group scale: trials around max|x| / 43, each re-fitted; keep the one removing most error.
    s0 = mag.reshape(-1, 32).max(axis=1) / np.float32(43)
    best_gain = np.full(len(s0), -1, np.float32)
    best_s = np.zeros_like(s0)
    for f in _IQ2_TRIALS:
        s, gain, _ = pat.fit(pat.pick(np.repeat(s0 * f, 4)))
        better = gain > best_gain
        best_gain, best_s = np.where(better, gain, best_gain), np.where(better, s, best_s)
    s, _, b = pat.fit(pat.pick(np.repeat(best_s, 4)))  # re-project at the fitted scale
    groups, curv = s.reshape(n, 8), b.reshape(n, 8)

    # Block scale: stored group scales are d (0.5 + ls) / 4. With the patterns fixed a
    # group's error grows by b (s_stored - s)^2, which scores each trial d exactly.
    top = groups.max(axis=1)
    best_d, best_err = None, None
    for f in _IQ2_D_TRIALS:
        d = _f16_round(top * np.float32(4 / 15.5 * f))
        ls = np.clip(np.rint(groups * (4 * _safe_div(np.ones_like(d), d))[:, None] - 0.5), 0, 15)
        err = (curv * (d[:, None] * (0.5 + ls) * 0.25 - groups) ** 2).sum(axis=1)
        if best_d is None:
            best_d, best_err = d, err
        else:
            better = err < best_err
            best_d, best_err = np.where(better, d, best_d), np.where(better, err, best_err)
    d = best_d
    ls = np.clip(np.rint(groups * (4 * _safe_div(np.ones_like(d), d))[:, None] - 0.5), 0, 15).astype(np.uint32)
    stored = (d[:, None] * (0.5 + ls) * 0.25).astype(np.float32)
    p = pat.pick(np.repeat(stored.reshape(-1), 4)).astype(np.uint32).reshape(n, 8, 4)

    signs = (np.packbits(negative, axis=1, bitorder="little")[:, 0] & 127).astype(np.uint32).reshape(n, 8, 4)
    words = np.empty((n, 8, 2), "<u4")
    words[..., 0] = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16) | (p[..., 3] << 24)
    words[..., 1] = signs[..., 0] | (signs[..., 1] << 7) | (signs[..., 2] << 14) | (signs[..., 3] << 21) | (ls << 28)
    out = np.empty((n, 66), np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:] = words.view(np.uint8).reshape(n, 64)
    return out


def _iq2_xxs(x, importance):
    qw = _column_weights(x, importance, energy_fallback=True)
    out = np.empty((x.size // 256, 66), np.uint8)
    for part, xb, cw in _chunks(x, qw, IQ2_CHUNK_BLOCKS):
        w = cw * np.sqrt(np.mean(xb * xb, axis=1, keepdims=True) + xb * xb)
        if len(xb) % 4:  # the grid products run on 128-subgroup (4-block) slices: pad with zero blocks
            pad = 4 - len(xb) % 4
            xb, w = np.pad(xb, ((0, pad), (0, 0))), np.pad(w, ((0, pad), (0, 0)))
        out[part] = _iq2_xxs_chunk(xb, w.astype(np.float32))[:part.stop - part.start]
    return out


_QUANTIZERS = {
    GGMLType.F32: _f32,
    GGMLType.F16: _f16,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.IQ2_XXS: _iq2_xxs,
}
