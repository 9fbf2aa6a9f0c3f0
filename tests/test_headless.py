"""``magnetar run`` through the real command line: with a scripted engine (the
loop calls real tools on a temp repository and answers), and with a real tiny
model (random weights, so only the wiring is proven: JSON events parse, the
exit code follows the turn's end, the prompt prefix lands in the disk cache)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from magnetar.agent import headless
from magnetar.cli import main
from magnetar.runtime import Engine
from scripted_engine import NoPrefixCache, ScriptedEngine
from test_agent_loop import block, call


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    (root / "app.py").write_text("def add(a, b):\n    return a + b\n")
    (root / "AGENTS.md").write_text("Use tabs. Never touch vendor/.\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


@pytest.fixture
def scripted(v4_tokenizer, tmp_path, monkeypatch):
    """Make ``magnetar run`` load a scripted engine with the given replies; returns the engines made."""
    made = []
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    monkeypatch.setenv("MAGNETAR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(headless, "PrefixCache", NoPrefixCache)

    def use(replies):
        def load(path, ctx, **options):  # options: the streaming flags (unset here)
            made.append(ScriptedEngine(v4_tokenizer, list(replies), ctx=ctx))
            return made[-1]
        monkeypatch.setattr(Engine, "load", load)  # what load_engine calls without --ranks
        return str(model), made
    return use


def test_json_events_and_a_real_tool_call(scripted, repo, capsys, v4_tokenizer):
    model, made = scripted(["look first</think>" + block(call("read_file", path="app.py")),
                            "read it</think>It adds two numbers."])
    code = main(["run", "-m", model, "--cwd", str(repo), "--json", "-p", "What does app.py do?"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "TurnEnd" and events[-1]["reason"] == "answered"
    assert events[-1]["answer"] == "It adds two numbers."
    finished = next(e for e in events if e["type"] == "ToolFinished")
    assert finished["name"] == "read_file" and "     2\t    return a + b" in finished["result"]["text"]
    prompt = v4_tokenizer.decode(made[0].prefills[0])
    assert "Project instructions (AGENTS.md)" in prompt and "Use tabs." in prompt  # in the user turn


def test_plain_output_and_exit_codes(scripted, repo, capsys):
    model, _ = scripted(["</think>Done."])
    assert main(["run", "-m", model, "--cwd", str(repo), "-p", "hi"]) == 0
    assert capsys.readouterr().out == "Done.\n"
    looping = ["</think>" + block(call("read_file", path="app.py"))] * 6
    model, _ = scripted(looping)
    assert main(["run", "-m", model, "--cwd", str(repo), "-p", "hi", "--max-steps", "3"]) == 1
    assert "ended without an answer (step-cap)" in capsys.readouterr().err


def test_read_only_mode_refuses_writes_headless(scripted, repo, capsys):
    model, _ = scripted(["</think>" + block(call("write_file", path="new.txt", content="x")), "</think>ok"])
    assert main(["run", "-m", model, "--cwd", str(repo), "--json", "-p", "write"]) == 0
    finished = next(json.loads(line) for line in capsys.readouterr().out.splitlines()
                    if '"ToolFinished"' in line)
    assert not finished["result"]["ok"] and "read-only" in finished["result"]["text"]
    assert not (repo / "new.txt").exists()


def test_a_missing_model_is_one_clear_line(repo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAGNETAR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAGNETAR_MODEL", raising=False)
    assert main(["run", "--cwd", str(repo), "-p", "hi"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("magnetar: error: no model") and "Traceback" not in err


def test_the_layer_split_flags_go_to_the_engine_loader(scripted, repo, capsys):
    """run takes --ranks/--distributed/--layers like generate and serve (tests/test_distributed.py
    runs it on 2 ranks); a split without ranks is one line."""
    model, made = scripted(["</think>Done."])
    assert main(["run", "-m", model, "--cwd", str(repo), "-p", "hi", "--layers", "0:2,2:5"]) == 2
    assert capsys.readouterr().err.startswith("magnetar: error: --layers needs --ranks N or --distributed HOSTFILE")
    assert made == []


def test_the_real_engine_on_a_tiny_model(tiny_models, repo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAGNETAR_HOME", str(tmp_path / "home"))
    code = main(["run", "-m", str(tiny_models("q8")), "--cwd", str(repo), "--json", "--ctx", "4096",
                 "--max-tokens", "24", "--seed", "3", "-p", "List the files."])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    end = events[-1]
    assert end["type"] == "TurnEnd" and code == (0 if end["reason"] == "answered" else 1)
    assert any(e["type"] == "Prefill" for e in events)
    # the system prompt and tool schemas were saved for the next session to reuse
    assert list(Path(tmp_path / "home" / "data" / "kvcache").rglob("*.ckpt"))


def test_the_plan_is_a_json_event(scripted, repo, capsys):
    steps = json.dumps([{"step": "read app.py", "status": "in_progress"}, {"step": "answer", "status": "pending"}])
    plan = (f'\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="update_plan">\n<｜DSML｜parameter name="steps" '
            f'string="false">{steps}</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    model, _ = scripted(["plan</think>" + plan, "</think>done"])
    assert main(["run", "-m", model, "--cwd", str(repo), "--json", "-p", "go"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"type": "PlanUpdated", "steps": json.loads(steps)} in events
