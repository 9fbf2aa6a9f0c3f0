"""Our generated files load and run in llama.cpp's ``deepseek4`` architecture.

llama-cpp-python is a dev-only, optional peer (an sdist that builds in ~4 min,
see spec/llamacpp-peer.md); without it these tests skip.
"""

from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional peer)")


@pytest.mark.parametrize("recipe", ["f32", "q8", "q2", "q4"])
def test_llama_cpp_loads_and_runs_our_tiny_model(tiny_models, v4_tokenizer, recipe):
    llm = llama_cpp.Llama(model_path=str(tiny_models(recipe)), n_ctx=256, n_threads=2,
                          n_batch=64, verbose=False)
    assert llm.n_vocab() == 129280
    ids = [v4_tokenizer.bos_id] + v4_tokenizer.encode("def main():\n    print('hello')\n" * 3)
    assert llm.tokenize(b"def main():", add_bos=False, special=False) == v4_tokenizer.encode("def main():")
    llm.eval(ids)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(129280,))
    assert np.isfinite(logits).all() and logits.std() > 0
