"""The plan and finding tools, the JSON schemas tools hand the model, prompts,
and where the agent looks for its model."""

from __future__ import annotations

import json

import pytest

from magnetar.agent.models import KNOWN, ModelNotFound, missing_model_help, resolve_model
from magnetar.prompts import load
from magnetar.tools.base import ToolContext
from magnetar.tools.plan import UpdatePlan
from magnetar.tools.review import ReportFinding


def test_plan_is_replaced_whole_and_checked(tmp_path):
    ctx = ToolContext(root=tmp_path)
    steps = [{"step": "read", "status": "done"}, {"step": "edit", "status": "in_progress"},
             {"step": "test", "status": "pending"}]
    result = UpdatePlan().call({"steps": steps}, ctx)
    assert result.ok and result.text.splitlines()[1:] == ["[x] read", "[>] edit", "[ ] test"]
    assert ctx.plan == steps
    two = [{"step": "a", "status": "in_progress"}, {"step": "b", "status": "in_progress"}]
    assert "only one step" in UpdatePlan().call({"steps": two}, ctx).text
    bad = UpdatePlan().call({"steps": [{"step": "a", "status": "later"}]}, ctx)
    assert not bad.ok and "invalid arguments for update_plan: steps.0.status" in bad.text
    assert ctx.plan == steps  # refused calls change nothing


def test_findings_point_at_real_lines_inside_the_project(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\ny = 2\n")
    ctx = ToolContext(root=tmp_path)
    finding = {"file": "a.py", "start_line": 2, "end_line": 2, "severity": "high", "title": "y is wrong",
               "explanation": "y should be 3 because of the spec", "suggested_fix": "y = 3"}
    assert ReportFinding().call(finding, ctx).ok
    assert ctx.findings[0]["file"] == "a.py"
    assert "already reported" in ReportFinding().call(finding, ctx).text
    assert "has 2 lines" in ReportFinding().call({**finding, "end_line": 9, "title": "other"}, ctx).text
    assert "outside the project" in ReportFinding().call({**finding, "file": "../x.py"}, ctx).text
    assert "not a file" in ReportFinding().call({**finding, "file": "missing.py"}, ctx).text
    assert "end_line must be >= start_line" in ReportFinding().call({**finding, "start_line": 2, "end_line": 1},
                                                                    ctx).text
    assert len(ctx.findings) == 1


def test_schemas_are_self_contained_with_descriptions():
    for tool in (UpdatePlan, ReportFinding):
        spec = tool.spec()
        text = json.dumps(spec)
        assert "$ref" not in text and "$defs" not in text
        props = spec["parameters"]["properties"]
        assert props and all(p.get("description") for p in props.values())
    assert "title" in ReportFinding.spec()["parameters"]["properties"]  # a field called title survives


def test_prompts_load_and_the_system_prompt_is_stable_text():
    system = load("system")
    assert "update_plan" in system and "{" not in system  # no per-turn placeholders
    assert "report_finding" in load("review") and "summary" in load("compaction")
    with pytest.raises(ValueError, match="unknown prompt"):
        load("nope")


def test_model_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGNETAR_HOME", str(tmp_path))
    monkeypatch.delenv("MAGNETAR_MODEL", raising=False)
    with pytest.raises(ModelNotFound, match="nothing in .*models"):
        resolve_model()
    (tmp_path / "models").mkdir()
    q4 = tmp_path / "models" / KNOWN["q4"][0]
    q4.write_bytes(b"x")
    assert resolve_model() == q4
    q2 = tmp_path / "models" / KNOWN["q2-imatrix"][0]
    q2.write_bytes(b"x")
    assert resolve_model() == q2  # the preferred one wins
    env = tmp_path / "env.gguf"
    env.write_bytes(b"x")
    monkeypatch.setenv("MAGNETAR_MODEL", str(env))
    assert resolve_model() == env
    assert resolve_model(str(q4)) == q4  # --model beats everything
    with pytest.raises(ModelNotFound, match="--model names .* not a file"):
        resolve_model(str(tmp_path / "nope.gguf"))
    assert "magnetar download q2-imatrix" in missing_model_help()
