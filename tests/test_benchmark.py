"""The benchmark harness (nemokernels.benchmark): timing results, the JSON written as cases
finish, the table's ratio columns, and the CLI's baseline filter. Speed itself is measured in
bench/, never here."""
import json
import subprocess
import sys

import torch

from nemokernels.benchmark import Case, run_cases
from nemokernels.benchmark.harness import format_table, table_rows, time_fn

PEAKS = {"copy_GBps": 10.0, "matmul_TFLOPs": 1.0, "copy": "test", "matmul": "test", "cpu_figures": True}


def _case(name, fail=False):
    def fn(x):
        if fail:
            raise ValueError("broken kernel")
        return x * 2

    return Case(op="double", name=name, make_inputs=lambda: (torch.randn(64),), fn=fn, bytes=512, flops=64,
                baselines={"eager_mul": lambda x: x + x})


def test_time_fn_reports_ordered_percentiles():
    calls = []
    t = time_fn(lambda x: calls.append(x.sum()), lambda: (torch.randn(8),), device="cpu", warmup=2, reps=7)
    assert t["p10"] <= t["median"] <= t["p90"] and t["min"] <= t["median"] and t["reps"] >= 5
    assert len(calls) >= 2 + t["reps"]


def test_run_cases_writes_json_after_every_case(tmp_path):
    path = tmp_path / "r.json"
    seen = []

    def log(msg, flush=False):
        seen.append(msg)
        if msg.strip().startswith("double b"):  # second case starting: the first is on disk
            assert [c["shape"] for c in json.loads(path.read_text())["cases"]] == ["a"]

    res = run_cases([_case("a"), _case("b", fail=True)], "cpu", PEAKS, quick=True, log=log, path=path)
    on_disk = json.loads(path.read_text())
    assert [c["shape"] for c in on_disk["cases"]] == ["a", "b"] == [c["shape"] for c in res["cases"]]
    a, b = on_disk["cases"]
    assert a["time_us"] > 0 and a["baselines"]["eager_mul"]["ratio"] > 0
    assert "gpu_us" not in a  # GPU and wall time only on CUDA
    assert b["error"].startswith("ValueError: broken kernel")
    assert any("error: ValueError" in m for m in seen)


def test_table_shows_event_gpu_wall_ratios():
    res = {"cases": [{"op": "o", "shape": "s", "time_us": 100.0, "gpu_us": 90.0, "wall_us": 150.0, "GBps": 1.0,
                      "TFLOPs": 0.1, "roofline_fraction": 0.5, "bound": "memory",
                      "baselines": {"peer": {"time_us": 200.0, "ratio": 2.0, "gpu_us": 45.0, "ratio_gpu": 0.5,
                                             "wall_us": 300.0, "ratio_wall": 2.0}}}]}
    header, rows = table_rows(res)
    assert header[3:5] == ["gpu us", "wall us"] and header[-1] == "vs peer"
    assert rows[0][3:5] == ["90.00", "150.0"] and rows[0][-1] == "2.00/0.50/2.00x"
    assert "2.00/0.50/2.00x" in format_table(res)


def test_cli_skip_baseline_and_results_file(tmp_path):
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "nemokernels", "bench", "--device", "cpu", "--quick", "--op", "rmsnorm_fn",
           "--skip-baseline", "compile", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = json.loads(out.read_text())["cases"]
    assert cases and all("torch_compile" not in c["baselines"] and "torch_eager" in c["baselines"] for c in cases)
