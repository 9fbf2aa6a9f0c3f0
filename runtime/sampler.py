"""Pick the next token from one step's logits (a host float vector).

Semantics, in the order they apply:

* ``temperature == 0`` is greedy: the argmax, ties to the lowest id. Every
  other setting is ignored and no randomness is consumed.
* Otherwise the logits are divided by ``temperature`` and the filters run on
  that tempered distribution, in this order:
  1. top-k (``top_k > 0``): keep the ``top_k`` most probable tokens;
  2. top-p (``top_p < 1``): of what is left (renormalized), keep the smallest
     set of most probable tokens whose cumulative probability is
     ``>= top_p``; at least one token always survives;
  3. min-p (``min_p > 0``): keep tokens with ``p >= min_p * p_max``.
  The survivors are renormalized and exactly one uniform draw from the
  sampler's own ``numpy.random.Generator`` picks the token, so a seed fixes
  the whole sequence.
* Sorting is stable everywhere: equal logits rank lower id first (this
  decides which tied token top-k keeps, and the order of ``top_logprobs``).
* NaN, ``+inf`` or all-``-inf`` logits raise ``MagnetarError``; ``-inf``
  entries are fine (masked tokens).

Speed (vocab 129280): the vocabulary is never fully sorted unless top-p must
rank most of it. Each filter keeps a prefix of the ranking, so a threshold on
the raw logits (min-p's ``x >= max + T*log(min_p)``, top-k's k-th largest value
from ``np.partition``) picks a small candidate set first, and only that set is
sorted, and only when top-k or top-p needs an order. top-p needs the full
normalizer (one ``exp`` over the vocabulary); with min-p and top-k off it
sorts the best 1024, 8192, ... tokens, the first group holding ``top_p``.
Probabilities use a float32 exp with float64 sums (``log_softmax`` is float64).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MagnetarError, UsageError

_FIXES = {
    "temperature": "use a temperature >= 0; 0 means greedy",
    "top_k": "use an integer top_k >= 0; 0 turns it off",
    "top_p": "use 0 < top_p <= 1; 1 turns it off",
    "min_p": "use 0 <= min_p < 1; 0 turns it off",
    "seed": "use a non-negative integer seed, or None for fresh entropy",
}
_TOP_P_PROBE = 1024  # top-p first looks for its set among this many best tokens


class SamplerSettings(BaseModel):
    """How to pick tokens; invalid values raise ``UsageError``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.05, ge=0, lt=1)
    seed: int | None = Field(None, ge=0)

    @field_validator("top_k", "seed", mode="before")
    @classmethod
    def _no_bools(cls, v):
        if isinstance(v, bool):  # True would silently mean 1
            raise ValueError("expected an integer, got a bool")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _usage_errors(cls, data, handler):
        # Turn pydantic's multi-line report into our one-line cause + fix.
        try:
            return handler(data)
        except ValidationError as err:
            bad = err.errors()[0]
            name = ".".join(map(str, bad["loc"])) or "settings"
            if bad["type"] == "extra_forbidden":
                raise UsageError(f"unknown sampler setting {name!r}", f"known: {', '.join(_FIXES)}") from None
            msg = bad["msg"].removeprefix("Value error, ")
            raise UsageError(f"sampler setting {name}={bad.get('input')!r}: {msg}",
                             _FIXES.get(name)) from None


class Sampler:
    """Draws token ids under fixed settings with its own seeded generator."""

    def __init__(self, settings: SamplerSettings):
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def sample(self, logits: np.ndarray, greedy: bool = False) -> int:
        """One token id; ``greedy`` takes the argmax for this token whatever the settings
        (no draw, so the seeded sequence of draws stays that of the sampled tokens)."""
        x, m = _checked(logits)
        s = self.settings
        if s.temperature == 0 or greedy:
            return int(np.argmax(x))
        ids, p = _filtered(x, m, s)
        cum = _cumsum(p)
        # One uniform draw per token; zero-probability survivors get an empty interval.
        pick = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return int(ids[min(pick, len(ids) - 1)])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities along the last axis (max-shifted, so stable)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    if not np.isfinite(m).all():
        raise MagnetarError("logits contain NaN or +inf, or are all -inf", "this is a model/runtime bug; report it")
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely ``(id, logprob)`` pairs, best first, ties to lower id."""
    if k < 0:
        raise UsageError(f"top_logprobs k={k} is negative", "ask for k >= 0")
    lp = log_softmax(_checked(logits)[0])
    ids = _ranked(lp, np.flatnonzero(lp >= _kth_largest(lp, k)))[:k] if k else []
    return [(int(i), float(lp[i])) for i in ids]


def _checked(logits: np.ndarray) -> tuple[np.ndarray, float]:
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise UsageError(f"logits have shape {x.shape}; expected one non-empty vector", "pass one row per step")
    if x.dtype != np.float64:
        x = x.astype(np.float32, copy=False)
    m = float(x.max())  # NaN propagates through max, so this one pass checks it too
    if math.isnan(m):
        raise MagnetarError("logits contain NaN", "this is a model/runtime bug; report it")
    if not math.isfinite(m):
        raise MagnetarError(f"logits have maximum {m}; cannot sample", "this is a model/runtime bug; report it")
    return x, m


def _kth_largest(x: np.ndarray, k: int) -> float:
    if k <= 0 or k >= x.size:
        return -math.inf
    return float(np.partition(x, x.size - k)[x.size - k])


def _ranked(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` (ascending) ordered by descending ``x``, ties lower id first."""
    return ids[np.argsort(-x[ids], kind="stable")]


def _filtered(x: np.ndarray, m: float, s: SamplerSettings) -> tuple[np.ndarray, np.ndarray]:
    """Surviving ids and their tempered probabilities relative to the max (unnormalized).

    Ids come best first when top-k or top-p is on; otherwise in id order (no sort needed).
    """
    t, top_k, top_p = s.temperature, (s.top_k if 0 < s.top_k < x.size else 0), s.top_p
    # min-p keeps (x - m)/t >= log(min_p). This logit floor (with a hair of slack) only
    # preselects a superset; the exact test runs on the probabilities at the end.
    floor = m + t * math.log(s.min_p) - 1e-6 * (abs(m) + t) if s.min_p > 0 else -math.inf
    floor = max(floor, -3e38)  # stays a float32; every finite float32 logit is above it
    if not top_k and top_p == 1 and s.min_p == 0:  # plain temperature: every token, in id order
        return np.arange(x.size), _relative(x, slice(None), m, t)
    if top_k and top_p < 1:  # top-p renormalizes over the whole top-k set
        ids = np.flatnonzero(x >= _kth_largest(x, top_k))
    else:
        ids = np.flatnonzero(x >= floor) if s.min_p > 0 else np.arange(x.size)
        if top_k and ids.size > top_k:
            ids = ids[x[ids] >= _kth_largest(x[ids], top_k)]
    if top_p < 1 and not top_k:
        total = float(_relative(x, slice(None), m, t).sum(dtype=np.float64))
        ids = _top_p_superset(x, ids, m, t, top_p * total)
    if top_k or top_p < 1:
        ids = _ranked(x, ids)[: top_k or None]
    p = _relative(x, ids, m, t)
    if top_p < 1:
        cut = top_p * (p.sum(dtype=np.float64) if top_k else total)
        n = int(np.searchsorted(_cumsum(p), cut, side="left")) + 1
        ids, p = ids[:n], p[:n]
    keep = p >= s.min_p  # the best token has p == 1, so at least one survives
    return ids[keep], p[keep]


def _top_p_superset(x: np.ndarray, ids: np.ndarray, m: float, t: float, mass: float) -> np.ndarray:
    """The fewest best of ``ids`` (1024, 8192, ...) holding ``mass``, so only they get sorted."""
    size, vals = _TOP_P_PROBE, (x if ids.size == x.size else x[ids])  # ids are sorted, unique
    while ids.size > 2 * size:
        best = ids[vals >= _kth_largest(vals, size)]
        if _relative(x, best, m, t).sum(dtype=np.float64) >= mass:
            return best
        size *= 8
    return ids


def _cumsum(p: np.ndarray) -> np.ndarray:
    out = p.astype(np.float64)  # 4x faster than np.cumsum(p, dtype=np.float64)
    return np.cumsum(out, out=out)


def _relative(x: np.ndarray, ids, m: float, t: float) -> np.ndarray:
    """exp((x - max)/t) for ``ids``: probabilities up to one shared factor.

    Kept in float32 (the exp is 8x faster than in float64, and 1e-7 relative error
    is far below anything a draw resolves); every sum and cumsum runs in float64.
    1/t is capped so a tiny temperature cannot overflow float32 into 0 * inf = NaN.
    """
    return np.exp((x[ids] - np.float32(m)) * np.float32(min(1 / t, 1e30)))
