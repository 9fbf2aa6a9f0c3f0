"""One greedy continuation of a prompt, as the model-level tests compare them."""

from __future__ import annotations

import numpy as np

from magnetar.runtime.engine import Engine


def greedy_run(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Prefill ``prompt``, then decode ``n`` greedy tokens -> (tokens, logits): the next-token
    logits after the prompt, then after each decoded token (n + 1 arrays)."""
    engine.prefill(prompt)
    logits, tokens = [engine.next_logits()], []
    for ev in engine.generate(max_tokens=n, temperature=0, ignore_eos=True):
        tokens.append(ev.token)
        logits.append(engine.next_logits())
    return tokens, logits
