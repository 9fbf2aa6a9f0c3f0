"""The native q2 kernels' many-token path (register tiles of rows x tokens) against
one token at a time: every (row, token) pair must get the bits decode gives it,
whatever tile or remainder tile it falls in."""

from __future__ import annotations

import numpy as np
import pytest

from magnetar.kernels import GGMLType, native
from kernel_data import random_routing, random_weight

pytestmark = pytest.mark.skipif(not native.available(), reason=f"no native kernels: {native.unavailable_reason()}")

Q2 = [GGMLType.IQ2_XXS, GGMLType.Q2_K]
TOKENS = (1, 2, 3, 5, 8, 13, 70)  # odd, even, past a tile, past mg_matmul's 64-token pass


def one_at_a_time(x, raw, qtype):
    return np.concatenate([native.matmul(x[t:t + 1], raw, qtype) for t in range(x.shape[0])])


@pytest.mark.parametrize("qtype", Q2, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [1, 2, 3, 4, 5, 6, 7, 9])
@pytest.mark.parametrize("cols", [256, 768, 2304])  # one block; several; chunks of 4 + 4 + 1 carried in memory
def test_matmul_tiles_give_each_pair_its_decode_bits(qtype, n_rows, cols):
    rng = np.random.default_rng([int(qtype), n_rows, cols])
    raw = random_weight(rng, qtype, (n_rows, cols))
    x = rng.standard_normal((max(TOKENS), cols)).astype(np.float32)
    alone = one_at_a_time(x, raw, qtype)
    for n in TOKENS:
        batch = native.matmul(x[:n], raw, qtype)
        assert np.array_equal(batch.view(np.uint32), alone[:n].view(np.uint32)), f"{n} tokens"


@pytest.mark.parametrize("qtype", Q2, ids=lambda t: t.name)
def test_moe_groups_of_every_size_give_decode_bits(qtype):
    """Experts receive 1..many tokens (repeats included), over multi-block rows both ways
    (gate and up rows in two chunks of blocks)."""
    rng = np.random.default_rng([int(qtype), 3])
    n_tok, d_model, ffn = 23, 1280, 768
    stacks = [(random_weight(rng, qtype, (6, ffn, d_model)), qtype), (random_weight(rng, qtype, (6, ffn, d_model)), qtype),
              (random_weight(rng, qtype, (6, d_model, ffn)), qtype)]
    x = rng.standard_normal((n_tok, d_model)).astype(np.float32)
    ids, w = random_routing(rng, n_tok, 6, 4, repeats=True)
    ids[:7, 0] = 5  # one expert gets a long group; the rest vary by chance
    batch = native.moe(x, ids, w, *stacks, 7.0)
    alone = np.concatenate([native.moe(x[t:t + 1], ids[t:t + 1], w[t:t + 1], *stacks, 7.0) for t in range(n_tok)])
    assert np.array_equal(batch.view(np.uint32), alone.view(np.uint32))
