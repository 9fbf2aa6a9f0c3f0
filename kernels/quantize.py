"""Importance-weighted quantizers for the weight encodings the model files use.

``quantize(values [rows, cols], type, importance [cols] | None)`` returns raw
GGUF blocks that ``reference.dequantize`` (and gguf-py) decode. Every element's
error is weighted by ``w = importance[col] * sqrt(sigma2 + x^2)``, with
``sigma2`` the block's mean square (spec/quant-kernels.md §3.1): a column that
carries large activations, and a large weight, must come out accurately.
Without an importance vector the weight is ``sqrt(sigma2 + x^2)`` alone, except
IQ2_XXS, which falls back to the column energy of the matrix itself (as ds4
does: a 2-bit grid code needs *some* notion of which columns matter).

The searches are vectorized over every block of a row chunk; Python only
loops over the few trial scales:

* Q8_0: absmax, bit-identical to gguf-py.
* Q2_K / Q4_K: per sub-block an affine code ``x ~ a*L + b`` (``b <= 0``), the
  best of ~20 trial scales, each refined by weighted least squares; then the
  sub-block scales and mins are rounded against one f16 ``d`` / ``dmin`` and
  every value is re-rounded with the stored numbers.
* IQ2_XXS: signs are kept exactly, except that a subgroup of 8 must have an even
  number of negatives (the 8th sign bit is implied), so the element that costs
  least is flipped when needed. Magnitudes then pick one of the 256 grid
  patterns per subgroup. For a given scale ``s`` the weighted error of every
  pattern is ``s^2 B - 2 s C + const`` with ``B = w . grid^2`` and
  ``C = (w |x|) . grid`` — two small matrix products per chunk, so trying many
  scales and *all* 256 patterns exactly is cheap (ds4 searches ~150 nearby
  patterns instead). The 32-value group keeps the trial with the least error,
  re-fitted by least squares; the 8 group scales are finally rounded to 4-bit
  multiples of one f16 ``d`` and the patterns re-picked for the stored scales.
"""

from __future__ import annotations

import gguf
import numpy as np

from . import BLOCK, GGMLType, row_bytes
from .reference import IQ2XXS_GRID

CHUNK_VALUES = 1 << 19  # values quantized at once (bounds the search's temporaries)


def quantize(values: np.ndarray, ggml_type: int, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows [rows, cols] -> uint8 blocks [rows, row_bytes(ggml_type, cols)]."""
    qtype = GGMLType(ggml_type)
    x = np.asarray(values, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize takes a 2-D [rows, cols] matrix, got shape {x.shape}")
    rows, cols = x.shape
    row_bytes(qtype, cols)  # ValueError unless the rows fill whole blocks
    if not np.isfinite(x).all():
        raise ValueError("cannot quantize non-finite values (NaN or inf)")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32)
        if importance.shape != (cols,):
            raise ValueError(f"importance has shape {importance.shape}, expected ({cols},)")
        if (importance < 0).any() or not np.isfinite(importance).all():
            raise ValueError("importance values must be finite and non-negative")
    if qtype == GGMLType.F32:
        return x.view(np.uint8).reshape(rows, -1).copy()
    if qtype == GGMLType.F16:
        return x.astype(np.float16).view(np.uint8).reshape(rows, -1)
    if qtype == GGMLType.Q8_0:
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    if qtype not in _QUANTIZERS:
        raise ValueError(f"no quantizer for {qtype.name}")
    if qtype == GGMLType.IQ2_XXS and importance is None:
        importance = np.sum(x.astype(np.float64) ** 2, axis=0).astype(np.float32)
    per_block, block_bytes = BLOCK[qtype]
    out = np.empty((rows, cols // per_block * block_bytes), np.uint8)
    step = max(1, CHUNK_VALUES // cols)
    imp = np.ones(cols, np.float32) if importance is None else importance
    for r0 in range(0, rows, step):
        blocks = x[r0:r0 + step].reshape(-1, per_block)
        w = _element_weights(blocks, np.broadcast_to(imp, (min(step, rows - r0), cols)).reshape(-1, per_block))
        out[r0:r0 + step] = _QUANTIZERS[qtype](blocks, w).reshape(-1, out.shape[1])
    return out


def _element_weights(blocks: np.ndarray, imp: np.ndarray) -> np.ndarray:
    sigma2 = np.mean(blocks * blocks, axis=1, keepdims=True)
    return imp * np.sqrt(sigma2 + blocks * blocks)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return _f16(v).view(np.uint8).reshape(len(v), 2)


# ---------------------------------------------------------------------------
# Q2_K and Q4_K: affine sub-blocks, two-level scales.


def _fit_affine(x: np.ndarray, w: np.ndarray, nmax: int, trials: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x`` [n, S]: the (a >= 0, b <= 0) of ``x ~ a*L + b``, L in 0..nmax, with the
    least weighted squared error over the trial inverse scales (each refined by least squares)."""
    lo = np.minimum(x.min(axis=1), 0)[:, None]
    span = np.maximum(x.max(axis=1)[:, None] - lo, 1e-30)
    best_err = np.full(len(x), np.inf)
    best_a, best_b = np.zeros(len(x)), lo[:, 0].astype(np.float64)
    sw = w.sum(axis=1)
    sx = (w * x).sum(axis=1)
    for t in trials:
        L = np.clip(np.rint((t + nmax) / span * (x - lo)), 0, nmax)
        sl, sll, slx = (w * L).sum(axis=1), (w * L * L).sum(axis=1), (w * L * x).sum(axis=1)
        det = sw * sll - sl * sl
        ok = det > 1e-30 * np.maximum(sw * sll, 1e-30)
        a = np.where(ok, (sw * slx - sl * sx) / np.where(ok, det, 1), 0)
        b = np.where(ok, (sll * sx - sl * slx) / np.where(ok, det, 1), lo[:, 0])
        pos = b > 0  # the format subtracts a non-negative min: refit through zero
        a = np.where(pos, slx / np.maximum(sll, 1e-30), a)
        b = np.where(pos, 0, b)
        a = np.maximum(a, 0)
        err = (w * (a[:, None] * L + b[:, None] - x) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_a, best_b = np.where(better, a, best_a), np.where(better, b, best_b)
    return best_a, best_b


def _two_level(x: np.ndarray, w: np.ndarray, sub: int, nmax: int, smax: int, trials: np.ndarray):
    """Shared part of Q2_K/Q4_K: codes L [n, 256], scale/min codes [n, 256/sub], d, dmin."""
    n = len(x)
    xs, ws = x.reshape(-1, sub).astype(np.float64), w.reshape(-1, sub).astype(np.float64)
    a, b = _fit_affine(xs, ws, nmax, trials)
    a, m = a.reshape(n, -1), (-b).reshape(n, -1)
    d = _f16(a.max(axis=1) / smax).astype(np.float64)
    dmin = _f16(m.max(axis=1) / smax).astype(np.float64)
    sc = np.clip(np.rint(a / np.where(d > 0, d, 1)[:, None]), 0, smax)
    mn = np.clip(np.rint(m / np.where(dmin > 0, dmin, 1)[:, None]), 0, smax)
    # Re-round every value against the numbers the block really stores.
    step = np.repeat(d[:, None] * sc, sub, axis=1)
    offset = np.repeat(dmin[:, None] * mn, sub, axis=1)
    L = np.clip(np.rint((x + offset) / np.where(step > 0, step, 1)), 0, nmax)
    L = np.where(step > 0, L, 0).astype(np.uint8)
    return L, sc.astype(np.uint8), mn.astype(np.uint8), d, dmin


def _q2_k(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    L, sc, mn, d, dmin = _two_level(x, w, 16, 3, 15, np.arange(-0.9, 0.9001, 0.05))
    n = len(x)
    out = np.empty((n, 84), np.uint8)
    out[:, :16] = sc | (mn << 4)
    # Byte l of half h holds values 128h + 32j + l at shift 2j.
    q = L.reshape(n, 2, 4, 32)
    out[:, 16:80] = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
    out[:, 80:82], out[:, 82:84] = _f16_bytes(d), _f16_bytes(dmin)
    return out


def _q4_k(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    L, sc, mn, d, dmin = _two_level(x, w, 32, 15, 63, np.arange(-1.0, 1.0001, 0.1))
    n = len(x)
    out = np.empty((n, 144), np.uint8)
    out[:, 0:2], out[:, 2:4] = _f16_bytes(d), _f16_bytes(dmin)
    # Sub-blocks 0-3 keep 6 bits in bytes 0-7; 4-7 split into a nibble (bytes 8-11)
    # and two high bits parked in the top of bytes 0-7.
    out[:, 4:8] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    q = L.reshape(n, 4, 2, 32)  # chunk c: sub-block 2c in low nibbles, 2c+1 in high
    out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return out


# ---------------------------------------------------------------------------
# IQ2_XXS: sign bits + one of 256 magnitude patterns per 8 values.

_GRID = IQ2XXS_GRID.astype(np.float32)  # [256, 8] magnitudes 8/25/43
_GRID2 = _GRID * _GRID
_LANE_BITS = (1 << np.arange(8)).astype(np.int64)
_SCALE_TRIALS = np.linspace(0.6, 1.4, 9)


def _pick(s: np.ndarray, B: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Best pattern per subgroup for scale ``s`` (per subgroup): argmin of s^2 B - 2 s C."""
    return np.argmin(s[:, None] * B - 2 * C, axis=1)  # s >= 0 factored out (s = 0: any pattern)


def _group_fit(p: np.ndarray, B: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares scale of each 4-subgroup group for the chosen patterns, and its error gain."""
    rows = np.arange(len(p))
    b = B[rows, p].reshape(-1, 4).sum(axis=1)
    c = C[rows, p].reshape(-1, 4).sum(axis=1)
    s = np.where(b > 0, c / np.where(b > 0, b, 1), 0)
    return np.maximum(s, 0), np.where(b > 0, c * c / np.where(b > 0, b, 1), 0)  # gain = error removed


def _iq2_xxs(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n = len(x)
    xs, ws = x.reshape(-1, 8), w.reshape(-1, 8)  # subgroups of 8
    negative = xs < 0
    # An odd number of negatives cannot be stored: flip the cheapest lane to positive.
    odd = (negative.sum(axis=1) & 1) == 1
    cheapest = np.argmin(ws * xs * xs, axis=1)
    flip = np.zeros_like(negative)
    flip[np.nonzero(odd)[0], cheapest[odd]] = True
    negative ^= flip
    target = np.where(flip, -np.abs(xs), np.abs(xs))  # the flipped lane's value now points the wrong way
    B = ws @ _GRID2.T  # [n_sub, 256]
    C = (ws * target) @ _GRID.T
    # Trial scales around max|x| / 43 (the largest grid magnitude); s is the value of one grid unit.
    s0 = np.repeat(np.abs(xs).reshape(-1, 32).max(axis=1) / 43, 4)
    best_gain, best_s = np.full(len(s0) // 4, -np.inf), np.zeros(len(s0) // 4)
    for f in _SCALE_TRIALS:
        s, gain = _group_fit(_pick(s0 * f, B, C), B, C)
        better = gain > best_gain
        best_gain, best_s = np.where(better, gain, best_gain), np.where(better, s, best_s)
    best_s, _ = _group_fit(_pick(np.repeat(best_s, 4), B, C), B, C)  # re-project once at the fitted scale
    # Group scale s = d * (0.5 + ls) / 4 with ls in 0..15: d from the block's largest group.
    groups = best_s.reshape(n, 8)
    d = _f16(groups.max(axis=1) * 4 / 15.5).astype(np.float32)
    ls = np.clip(np.rint(groups * 4 / np.where(d > 0, d, 1)[:, None] - 0.5), 0, 15)
    stored = (d[:, None] * (0.5 + ls) * 0.25).reshape(-1)
    p = _pick(np.repeat(stored, 4), B, C).reshape(n, 8, 4)  # patterns for the scales really stored
    signs = (negative.astype(np.int64) @ _LANE_BITS).reshape(n, 8, 4) & 127
    grid_word = (p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16) | (p[..., 3] << 24)).astype(np.uint32)
    sign_word = (signs[..., 0] | (signs[..., 1] << 7) | (signs[..., 2] << 14) | (signs[..., 3] << 21)
                 | (ls.astype(np.int64) << 28)).astype(np.uint32)
    words = np.stack([grid_word, sign_word], axis=-1).astype("<u4")  # [n, 8, 2]
    out = np.empty((n, 66), np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:] = words.view(np.uint8).reshape(n, 64)
    return out


_QUANTIZERS = {GGMLType.Q2_K: _q2_k, GGMLType.Q4_K: _q4_k, GGMLType.IQ2_XXS: _iq2_xxs}
