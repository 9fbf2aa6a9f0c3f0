"""``magnetar bench server`` end to end on the tiny model: the real server, the official
client in its own process, the in-process path beside it (columns and counts, never
timings: speed belongs in the bench's output, not in asserts)."""

from __future__ import annotations

import csv

from magnetar.cli import main

HEADER = ["section", "rep", "path", "prompt_tokens", "prefilled_tokens", "ttft_ms", "to_server_ms", "wait_ms",
          "sync_ms", "first_token_ms", "delivery_ms", "decode_tok_s", "tokens"]


def test_bench_server_times_both_paths_and_the_reused_prefix(tiny_models, capsys, tmp_path):
    out = tmp_path / "server.csv"
    code = main(["bench", "server", "-m", str(tiny_models("q2")), "--reps", "1", "--max-tokens", "2",
                 "--prompt", "Say hello.", "--turns", "2", "--ctx", "2048", "--csv", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    for column in ("TTFT ms", "to server", "waiting", "sync", "1st token", "delivery", "decode tok/s",
                   "prefilled reuse", "prefilled cold", "ratio server/in-process"):
        assert column in printed
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == HEADER
    assert [r["path"] for r in rows] == (["client-floor", "in-process", "server"]
                                        + ["server-reuse"] * 2 + ["server-cold"] * 2)
    inp, srv = rows[1], rows[2]
    assert inp["prompt_tokens"] == srv["prompt_tokens"] == srv["prefilled_tokens"]  # the same prompt, cold
    assert int(inp["tokens"]) == int(srv["tokens"]) == 2
    for row in (inp, srv):  # the phases add up to the time to first token
        phases = sum(float(row[k]) for k in HEADER[6:11])
        assert abs(phases - float(row["ttft_ms"])) < 1e-6 * max(1.0, phases)
    reuse, cold = rows[3:5], rows[5:7]
    assert int(reuse[0]["prefilled_tokens"]) == int(cold[0]["prefilled_tokens"]) == int(cold[0]["prompt_tokens"])
    for r, c in zip(reuse[1:], cold[1:]):  # later turns prefill only what the last reply did not leave live
        assert 0 < int(r["prefilled_tokens"]) < int(c["prefilled_tokens"]) == int(c["prompt_tokens"])


def test_bench_server_rejects_bad_settings_in_one_line(tiny_models, capsys):
    assert main(["bench", "server", "-m", str(tiny_models("q2")), "--max-tokens", "1"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("magnetar: error:") and "--max-tokens" in err and "Traceback" not in err
    assert main(["bench", "server"]) != 0
    assert "needs a model" in capsys.readouterr().err
