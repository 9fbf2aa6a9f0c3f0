"""``magnetar bench``: the peers' memory estimated before the run, a warning (or with
--strict-memory an error) when they exceed what is available, memory-bound results marked
in the table and the CSV, and each peer process's peak RSS reported back."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from magnetar.cli import main
from magnetar.kernels import native
from magnetar.runtime.errors import UsageError
from magnetar.runtime.expert_cache import routed_tensors
from magnetar.runtime.gguf_read import open_model
from magnetar.runtime.lab import bench, bench_memory
from magnetar.runtime.lab.peer_process import isolated_peers

MAPPED = ["magnetar", "magnetar-q8k", "llama.cpp"]  # peers that hold the file's bytes


def _routed_bytes(mf) -> int:
    return sum(i.nbytes for infos in routed_tensors(mf, range(mf.config.n_layer)).values() for i in infos)


def test_file_backed_peers_are_estimated_at_the_file_size(tiny_models):
    path = tiny_models("q2")
    plan = bench_memory.plan(MAPPED, open_model(path), available=1 << 50, backend_name="reference")
    assert [p.bytes for p in plan.peers] == [path.stat().st_size] * 3
    assert not plan.over
    assert bench_memory.check(plan, strict=True) is None


@pytest.mark.skipif(not native.available(), reason="the CPU reads experts in place with its native kernels")
def test_the_files_mapped_pages_count_once_for_every_peer_that_maps_them(tiny_models):
    """llama.cpp maps the whole file and magnetar on the CPU its routed experts: the page cache
    holds those pages once, so two magnetar peers and llama.cpp need the file once plus
    magnetar's own copies of the rest, not three files."""
    path = tiny_models("q2")
    mf = open_model(path)
    size, routed = path.stat().st_size, _routed_bytes(mf)
    plan = bench_memory.plan(MAPPED, mf, available=1 << 50, backend_name="cpu")
    assert [p.shared for p in plan.peers] == [routed, routed, size]
    assert plan.total == 2 * (size - routed) + size
    copied = bench_memory.plan(["magnetar", "magnetar"], mf, available=1 << 50, backend_name="metal")
    assert copied.total == 2 * size  # a GPU backend copies its experts: nothing shared


def test_f32_peers_count_four_bytes_per_parameter_whatever_the_file_holds(tiny_models):
    f32, q2 = open_model(tiny_models("f32")), open_model(tiny_models("q2"))
    wide = bench_memory.peer_bytes("transformers", f32).bytes
    assert bench_memory.peer_bytes("transformers", q2).bytes == wide  # built from the config, not read
    assert 0.95 * f32.size < wide <= f32.size  # an f32 file is those bytes plus its metadata
    assert wide > 2 * q2.size


def test_streamed_experts_count_only_the_cache(tiny_models):
    mf = open_model(tiny_models("q2"))
    routed = _routed_bytes(mf)
    (peer,) = bench_memory.plan(["magnetar"], mf, available=1 << 50, expert_cache=1 << 20).peers
    assert peer.bytes == mf.size - routed + (1 << 20)


def test_over_the_available_memory_warns_or_with_strict_stops(tiny_models):
    path = tiny_models("q2")
    plan = bench_memory.plan(["magnetar", "llama.cpp"], open_model(path), available=path.stat().st_size)
    assert plan.over
    line = bench_memory.check(plan)
    assert line.startswith("warning: ") and "\n" not in line
    assert "magnetar " in line and "llama.cpp " in line and "exceed" in line and "memory-bound" in line
    with pytest.raises(UsageError) as err:
        bench_memory.check(plan, strict=True)
    assert "exceed" in str(err.value) and "\n" not in str(err.value)


def test_memory_bound_samples_are_marked_in_table_and_csv(tmp_path):
    samples = [bench.Sample("a", "prefill", 0, 8, 1.0, 8.0, memory_bound=True),
               bench.Sample("b", "prefill", 0, 8, 2.0, 4.0, memory_bound=True)]
    assert "MEMORY-BOUND" in bench.render_table(bench.summarize(samples), rich=False)
    bench.write_csv(samples, tmp_path / "b.csv")
    assert [r["memory_bound"] for r in csv.DictReader((tmp_path / "b.csv").open())] == ["1", "1"]
    for s in samples:
        s.memory_bound = False
    assert "MEMORY-BOUND" not in bench.render_table(bench.summarize(samples))
    bench.write_csv(samples, tmp_path / "b.csv")
    assert [r["memory_bound"] for r in csv.DictReader((tmp_path / "b.csv").open())] == ["0", "0"]


def test_strict_memory_over_budget_is_one_line_before_anything_loads(tiny_models, capsys):
    code = main(["bench", "decode", "-m", str(tiny_models("q2")), "--peers", "magnetar-q8k",
                 "--memory-budget", "1K", "--strict-memory"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("magnetar: error: the peers' weights together") and "magnetar-q8k" in err


def test_bench_over_budget_warns_first_and_marks_its_results(tiny_models, tmp_path, capsys):
    out_csv = tmp_path / "bench.csv"
    assert main(["bench", "decode", "-m", str(tiny_models("q2")), "--tokens", "1", "--reps", "1",
                 "--prompt-tokens", "8", "--memory-budget", "1K", "--csv", str(out_csv)]) == 0
    out, err = capsys.readouterr()
    assert "magnetar: warning: the peers' weights together" in err
    assert "MEMORY-BOUND" in out and "peak RSS: magnetar " in out
    assert [r["memory_bound"] for r in csv.DictReader(out_csv.open())] == ["1"]


def test_a_peer_process_reports_its_peak_rss(tiny_models):
    path = tiny_models("q2")
    (child,) = isolated_peers("magnetar-q8k", path, ctx=256)
    built = child.peak_rss
    assert built >= path.stat().st_size  # it holds its own copy of the weights
    bench.run([child], "decode", [0, 5, 9], n_tokens=1, reps=1, warmup=0)
    assert child.peak_rss >= built
    child.close()


def test_a_child_reports_its_own_peak_not_its_parents(tmp_path):
    """A peer runs in a child that the bench (holding its own model) spawned: ru_maxrss
    carries the parent's resident set across fork and exec, so every peer reported the
    bench's 17.83 GiB on mini-flash. The child's figure must be its own."""
    held = np.ones(1 << 27)  # 1 GiB, touched: the parent's resident set
    child = subprocess.run([sys.executable, "-c", "from magnetar.runtime.lab.bench_memory import peak_rss; "
                            "print(peak_rss())"], capture_output=True, text=True, check=True)
    assert held.nbytes == 1 << 30 and int(child.stdout) < (600 << 20)
