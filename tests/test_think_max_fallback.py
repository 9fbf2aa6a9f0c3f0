"""``--think-max`` below the context Think-Max needs: as ds4 does, the prompt falls
back to normal thinking and says so once on stderr, instead of refusing to run."""

from __future__ import annotations

import json

from magnetar.cli import main
from magnetar.runtime import chat
from magnetar.runtime.engine import THINK_MAX_MIN_CTX, Engine

HELLO = [chat.Message(role="user", content="Hello")]


def test_render_falls_back_to_think_below_the_think_max_context(tiny_models):
    engine = Engine.load(tiny_models("q8"), ctx=512)
    assert engine.render(HELLO, mode="think-max") == engine.render(HELLO, mode="think")
    mode, notice = engine.think_mode("think-max")
    assert mode == "think" and str(THINK_MAX_MIN_CTX) in notice and "\n" not in notice
    assert engine.think_mode("nothink") == ("nothink", "") and engine.think_mode("think") == ("think", "")


def test_generate_with_think_max_runs_and_says_so_once(tiny_models, capsys, tmp_path):
    dump = tmp_path / "out.json"
    code = main(["generate", "-m", str(tiny_models("q8")), "-p", "Hello", "--think-max", "--ctx", "512",
                 "-n", "2", "--temp", "0", "--dump-logprobs", str(dump)])
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("think-max") == 1 and "thinking normally" in err
    engine = Engine.load(tiny_models("q8"), ctx=512)
    assert json.loads(dump.read_text())["prompt_tokens"] == engine.render(HELLO, mode="think")
