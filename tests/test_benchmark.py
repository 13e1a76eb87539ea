"""The benchmark harness (nemokernels.benchmark): timing results, the JSON written as cases
finish, progress lines, the table's ratio columns, the CLI's baseline filter, where results go
by default, and the size of a quick CPU run's points. Speed itself is measured in bench/, never
here."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import nemokernels
from nemokernels.benchmark import Case, all_cases, run_cases
from nemokernels.benchmark.harness import default_results_path, format_table, table_rows, time_fn
from nemokernels.benchmark.runner import add_arguments, cpu_threads, select_cases

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


def test_time_fn_makes_only_the_input_sets_it_uses():
    made, used = [], set()

    def make():
        made.append(torch.randn(4))
        return (made[-1],)

    t = time_fn(lambda x: used.add(id(x)), make, device="cpu", warmup=3, reps=7, rotate=1000)
    assert len(made) == len(used) == max(3, t["reps"])  # each set used, every timed call on a fresh one


def test_run_cases_writes_json_after_every_case(tmp_path):
    path = tmp_path / "r.json"
    seen = []

    def log(msg, flush=False):
        assert flush  # progress must show while the run goes on
        seen.append(msg)
        if msg.startswith("[2/2] double b ..."):  # second case starting: the first is on disk
            assert [c["shape"] for c in json.loads(path.read_text())["cases"]] == ["a"]

    res = run_cases([_case("a"), _case("b", fail=True)], "cpu", PEAKS, quick=True, log=log, path=path)
    on_disk = json.loads(path.read_text())
    assert [c["shape"] for c in on_disk["cases"]] == ["a", "b"] == [c["shape"] for c in res["cases"]]
    a, b = on_disk["cases"]
    assert a["time_us"] > 0 and a["baselines"]["eager_mul"]["ratio"] > 0
    assert "gpu_us" not in a  # GPU and wall time only on CUDA
    assert b["error"].startswith("ValueError: broken kernel")
    assert any("error: ValueError" in m for m in seen)
    # A start line with i/n per case, then its summary with its seconds and the elapsed seconds.
    assert [m for m in seen if m.startswith("[")] == ["[1/2] double a ...", "[2/2] double b ..."]
    ends = [m for m in seen if not m.startswith("[")]
    assert len(ends) == 2 and all(re.search(r"\(\d+\.\d s, elapsed \d+ s\)$", m) for m in ends), ends


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
    # --compile-baselines keeps them in a quick run; --skip-baseline compile still drops them.
    cmd = [sys.executable, "-m", "nemokernels", "bench", "--device", "cpu", "--quick", "--op", "rmsnorm_fn",
           "--compile-baselines", "--skip-baseline", "compile", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = json.loads(out.read_text())["cases"]
    assert cases and all("torch_compile" not in c["baselines"] and "torch_eager" in c["baselines"] for c in cases)
    assert f"wrote {out}" in proc.stdout


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_quick_run_drops_compile_baselines_unless_asked():
    def names(*argv):
        return {n for c in select_cases(_args("--op", "rmsnorm_fn", *argv), torch.device("cpu")) for n in c.baselines}

    assert "torch_eager" in names("--quick") and not any("compile" in n for n in names("--quick"))
    assert "torch_compile" in names("--quick", "--compile-baselines")
    assert "torch_compile" in names()  # a full run keeps them
    assert "torch_compile" not in names("--skip-baseline", "compile")


def test_shape_filter_keeps_only_matching_cases():
    every = select_cases(_args("--op", "grouped_gemm"), torch.device("cpu"))
    some = select_cases(_args("--op", "grouped_gemm", "--shape", "T64 "), torch.device("cpu"))
    assert some and len(some) < len(every) and all("T64 " in c.name for c in some)
    assert not select_cases(_args("--op", "grouped_gemm", "--shape", "no such shape"), torch.device("cpu"))


def test_quick_cpu_run_takes_one_thread_unless_told():
    assert cpu_threads(_args("--quick"), {}) == 1
    assert cpu_threads(_args("--quick", "--threads", "4"), {}) == 4
    assert cpu_threads(_args("--quick"), {"OMP_NUM_THREADS": "8"}) is None  # torch already took it
    assert cpu_threads(_args(), {}) is None and cpu_threads(_args("--threads", "2"), {}) == 2


def test_default_results_dir_honours_env(monkeypatch, tmp_path):
    doc = {"device_slug": "cpu", "date": "2026-12-05", "quick": True}
    monkeypatch.setenv("NEMOKERNELS_BENCH_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_results_path(doc) == tmp_path / "mine" / "cpu-2026-12-05-quick.json"
    monkeypatch.delenv("NEMOKERNELS_BENCH_DIR")
    assert default_results_path({**doc, "quick": False}) == tmp_path / "xdg" / "nemokernels" / "bench" / "cpu-2026-12-05.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_results_path(doc) == tmp_path / "home" / ".cache" / "nemokernels" / "bench" / "cpu-2026-12-05-quick.json"


def test_cli_writes_to_the_env_dir_with_progress(tmp_path):
    """Without --out: the JSON goes to $NEMOKERNELS_BENCH_DIR (not the working directory nor the
    package), the run says where, and each case gets an [i/n] line."""
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    env = {**os.environ, "NEMOKERNELS_BENCH_DIR": str(results),
           "PYTHONPATH": os.pathsep.join([str(Path(nemokernels.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "nemokernels", "bench", "--device", "cpu", "--quick", "--op", "selective_state_update",
           "--no-baselines"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=work, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = list(results.iterdir())
    assert len(written) == 1 and written[0].name.startswith("cpu-") and written[0].name.endswith("-quick.json")
    assert f"wrote {written[0]}" in proc.stdout and list(work.iterdir()) == []
    assert ", 1 threads)" in proc.stdout  # a quick CPU run's default
    n = len(json.loads(written[0].read_text())["cases"])
    starts = re.findall(r"^\[(\d+)/(\d+)\] selective_state_update", proc.stdout, re.M)
    assert n >= 2 and starts == [(str(i), str(n)) for i in range(1, n + 1)], proc.stdout


def _input_bytes(obj) -> int:
    """Bytes of the tensors in a case's inputs: tensors, modules' parameters and buffers, and the
    tensor fields of containers and objects (NVFP4Tensor, permutation plans)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, torch.nn.Module):
        return sum(_input_bytes(t) for t in [*obj.parameters(), *obj.buffers()])
    if isinstance(obj, (list, tuple)):
        return sum(_input_bytes(o) for o in obj)
    if hasattr(obj, "__dict__"):
        return sum(_input_bytes(o) for o in vars(obj).values())
    return 0


def test_quick_cpu_run_is_cpu_sized():
    """A quick CPU run (the first command of the README) has few cases, each with inputs of at
    most 64 MiB and at most 4 GFLOP of declared work, so it finishes in well under a minute."""
    cases = all_cases(True, torch.device("cpu"))
    assert 10 <= len(cases) <= 32, [f"{c.op} {c.name}" for c in cases]
    assert {c.op.split(".")[0] for c in cases} >= {"model", "moe_router", "grouped_gemm", "nvfp4",
                                                   "mamba_chunk_scan_combined", "selective_state_update"}
    for c in cases:
        assert c.bytes <= 64 << 20 and c.flops <= 4e9, (c.op, c.name, c.bytes, c.flops)
        assert _input_bytes(c.make_inputs()) <= 64 << 20, (c.op, c.name)


def test_low_precision_expert_cases_run_at_a_cpu_size():
    """The CUDA-only FP8 / NVFP4 expert cases' inputs and functions, at a tiny CPU size, before a
    GPU round spends time on them: the FP8 GEMM on rows quantized beforehand equals the call that
    quantizes them itself, and the quantized layers stay near the bf16 layer (weights quantized to
    FP8 / NVFP4: errors of a few percent, far below the layer's own scale)."""
    from nemokernels.benchmark import cases_moe as cm
    from nemokernels.benchmark import cases_moe_grouped_gemm as cg
    from nemokernels.moe import LatentMoE

    # per-expert scales, then per-block (128 x 128) scales
    for make in (cg._fp8_maker([0, 5, 5, 12], 32, 48, 3, "cpu"), cg._fp8_block_maker([0, 3, 3, 9], 24, 256, 3, "cpu")):
        a, ws, offsets, offs_host = make()
        for act in ("none", "relu2"):
            pre = cg._fp8_ours(act, False)(a, ws, offsets, offs_host)
            assert torch.equal(pre, cg._fp8_ours(act, True)(a, ws, offsets, offs_host))
            bf16 = cg._fp8_on_bf16(cg._ours(act))(a, ws, offsets, offs_host)
            assert torch.linalg.norm((pre - bf16).float()) <= 0.1 * torch.linalg.norm(bf16.float())
    a, ws, offsets, offs_host, dout = cg._fp8_train_maker([0, 5, 5, 12], 32, 48, 3, "cpu")()
    fp8 = cg._fp8_train("relu2")(a, ws, offsets, offs_host, dout)
    bf16 = cg._bf16_train("relu2")(a, ws, offsets, offs_host, dout)
    for got, want in zip(fp8, bf16):  # FP8 training's gradients near the bf16 ones
        assert torch.linalg.norm((got - want).float()) <= 0.1 * torch.linalg.norm(want.float())
    torch.manual_seed(0)
    m = LatentMoE(64, 8, 2, 32, 48, 32, dtype=torch.bfloat16)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = m(x).float()
        for fmt in ("fp8", "nvfp4"):
            out = cm._quantized_layer(fmt)(m, x).float()
            assert torch.linalg.norm(out - ref) <= 0.15 * torch.linalg.norm(ref), fmt
