"""Timing, peaks and reporting for `nemokernels bench` and bench/ (docs/design.md section 6).

Every op is timed on fresh random inputs, rotated across several input sets so that caches
do not flatter it, and reported against the device's peaks measured in the same run.
"""
import datetime
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch

from .._version import __version__


@dataclass
class Case:
    """One op at one shape. `fn` and every baseline take `*make_inputs()`."""

    op: str
    name: str
    make_inputs: Callable[[], tuple]
    fn: Callable
    bytes: int  # minimal traffic: each input read once, each output written once
    flops: int
    baselines: Dict[str, Callable] = field(default_factory=dict)
    backward: bool = False
    # The compute peak the case's TFLOP/s are a fraction of: "bf16" (the bf16 matmul) or "fp8" (the
    # e4m3 matmul, measured on CUDA devices that have one; the bf16 peak where they do not).
    peak: str = "bf16"


def lazy_compile(fn: Callable) -> Callable:
    """torch.compile(fn) on first call, so a compile failure surfaces inside the timed run
    (and is recorded as that baseline's error) instead of when the cases are built."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            # Dynamo caches per code object: without a reset, every case after the first few
            # would share one entry and hit the recompile limit (silently running eager).
            torch._dynamo.reset()
            compiled = torch.compile(fn)
        return compiled(*args)

    return call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, make_inputs, *, device, warmup=10, reps=100, rotate=1, max_seconds=2.0) -> dict:
    """Median and percentiles (seconds) of `fn(*inputs)`, cycling over `rotate` input sets.

    CUDA calls are timed with events recorded around each call: GPU time. A spin kernel is
    queued first so the host enqueues every call before the GPU reaches them; otherwise the
    host-side cost of a call (Python, dispatcher) would show up as GPU idle time between the
    events of small ops. (Under CUDA graphs that host cost disappears; it is not the kernel's.)
    CPU calls are timed with perf_counter. Fewer than `reps` calls are made when they would
    take longer than `max_seconds` in all.
    """
    device = torch.device(device)
    # The calls below use sets 0 .. max(warmup, reps, 5) - 1 only: more would be made for nothing
    # (on a CPU, making a set can cost more than timing the op).
    sets = [make_inputs() for _ in range(max(1, min(rotate, max(warmup, reps, 5))))]
    rotate = len(sets)
    t0 = time.perf_counter()
    fn(*sets[0])  # first call: also tells how long one call takes
    _sync(device)
    first = time.perf_counter() - t0
    # Slow calls (large shapes on a CPU) get fewer warm-up calls and at least 3 timed ones, so a
    # case costs seconds, not minutes; fast ones get the full warm-up and at least 5.
    for i in range(1, warmup if first * warmup <= max_seconds else 2):
        fn(*sets[i % rotate])
    _sync(device)
    t0 = time.perf_counter()
    fn(*sets[0])
    _sync(device)
    one = time.perf_counter() - t0
    reps = max(5 if one * 5 <= 4 * max_seconds else 3, min(reps, int(max_seconds / max(one, 1e-9))))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        torch.cuda._sleep(int(reps * 4e5))  # ~200 us of GPU spin per call to be enqueued
        for i, (start, end) in enumerate(events):
            start.record()
            fn(*sets[i % rotate])
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(*sets[i % rotate])
            times.append(time.perf_counter() - t0)
    p10, p50, p90 = np.percentile(times, [10, 50, 90])
    return {"median": float(p50), "p10": float(p10), "p90": float(p90), "min": min(times), "reps": reps}


def gpu_and_wall_time(fn, make_inputs, *, device, rotate=1, calls=10) -> dict:
    """Two more numbers per call on CUDA (seconds), beside `time_fn`'s event timing:
    - gpu: the summed duration of every kernel (and memcpy/memset) the call launches, from
      torch.profiler (CUPTI). What the call costs under CUDA-graph replay; host gaps excluded.
    - wall: host clock over `calls` back-to-back calls, synchronised once at the end, divided
      by `calls`: the rate an eager loop gets, host-side launch cost included.
    Call after `time_fn` (warm)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    sets = [make_inputs() for _ in range(rotate)]
    fn(*sets[0])
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(*sets[i % rotate])
    torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) / calls
    n_prof = max(2, min(calls, 5))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n_prof):
            fn(*sets[i % rotate])
        torch.cuda.synchronize(device)
    total_us = 0.0
    for e in prof.key_averages():
        total_us += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return {"gpu": total_us / 1e6 / n_prof, "wall": wall}


def choose_rotate(nbytes: int, device, max_rotate: int = 1024) -> int:
    """Input sets needed for one pass over them to touch > 2x the last-level cache, capped
    so that all sets fit in a quarter of the free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        cache = torch.cuda.get_device_properties(device).L2_cache_size
        free = torch.cuda.mem_get_info(device)[0]
    else:
        cache, free = 32 << 20, 4 << 30  # a typical server L3; a modest share of host memory
    want = math.ceil(2 * cache / max(nbytes, 1))
    return max(1, min(want, max_rotate, (free // 4) // max(nbytes, 1)))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_name()}, {torch.get_num_threads()} threads)"


def device_slug(device) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'; any CPU -> 'cpu'."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = re.sub(r"^nvidia\s+", "", torch.cuda.get_device_name(device).lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def measure_peaks(device, quick: bool = False) -> dict:
    """Copy bandwidth (GB/s, bytes read + written) and dense matmul TFLOP/s on `device`.

    CUDA: 1 GiB device-to-device copy and a bf16 8192^3 matmul. CPU: a 256 MiB float32 copy
    and a float32 2048^3 matmul, 64 MiB and 1024^3 when quick (labelled as CPU figures: not
    comparable to GPU peaks).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    reps = 5 if quick else 20
    copy_dtype, copy_bytes = (torch.bfloat16, 1 << 30) if cuda else (torch.float32, (64 if quick else 256) << 20)
    mm_dtype, n = (torch.bfloat16, 8192) if cuda else (torch.float32, 1024 if quick else 2048)
    numel = copy_bytes // torch.empty((), dtype=copy_dtype).element_size()

    # copy_ into a preallocated buffer: clone() would also time page faults of a fresh allocation.
    def copy_inputs():
        return torch.randn(numel, device=device, dtype=copy_dtype), torch.empty(numel, device=device, dtype=copy_dtype)

    def mm_inputs():
        return tuple(torch.randn(n, n, device=device, dtype=mm_dtype) for _ in range(2))

    t_copy = time_fn(lambda src, dst: dst.copy_(src), copy_inputs, device=device, warmup=2, reps=reps)["median"]
    t_mm = time_fn(torch.matmul, mm_inputs, device=device, warmup=2, reps=reps)["median"]
    dt = str(mm_dtype).replace("torch.", "")
    peaks = {
        "copy_GBps": 2 * copy_bytes / t_copy / 1e9,
        "matmul_TFLOPs": 2 * n**3 / t_mm / 1e12,
        "copy": f"{copy_bytes >> 20} MiB {str(copy_dtype).replace('torch.', '')} copy, read + write",
        "matmul": f"{dt} {n}x{n}x{n}",
        "cpu_figures": not cuda,
    }
    if cuda:  # the e4m3 tensor-core peak (sm_89+): torch._scaled_mm, per-tensor scales, bf16 out
        def fp8_inputs():
            a, b = (torch.randn(n, n, device=device).to(torch.float8_e4m3fn) for _ in range(2))
            one = torch.ones((), device=device)
            return a, b.t(), one, one  # b column-major, as _scaled_mm wants it

        def fp8_mm(a, b, sa, sb):
            return torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)
        try:
            t_fp8 = time_fn(fp8_mm, fp8_inputs, device=device, warmup=2, reps=reps)["median"]
            peaks.update(matmul_fp8_TFLOPs=2 * n**3 / t_fp8 / 1e12, matmul_fp8=f"float8_e4m3fn {n}x{n}x{n} _scaled_mm")
        except Exception as e:  # noqa: BLE001 (no FP8 tensor cores: the fp8 cases use the bf16 peak)
            peaks.update(matmul_fp8_TFLOPs=None, matmul_fp8=f"unavailable: {_error(e)}")
    return peaks


def _error(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _compute_peak(case: Case, peaks: dict) -> float:
    """TFLOP/s of the peak the case is measured against: its own (fp8) where measured, else bf16."""
    own = peaks.get(f"matmul_{case.peak}_TFLOPs") if case.peak != "bf16" else None
    return own or peaks["matmul_TFLOPs"]


def run_case(case: Case, device, peaks: dict, *, quick: bool = False, baselines: bool = True) -> dict:
    """Times a case and its baselines; an exception becomes an 'error' entry, never a crash."""
    device = torch.device(device)
    warmup, reps, budget = (3, 20, 0.5) if quick else (10, 100, 2.0)
    rotate = choose_rotate(case.bytes, device)
    entry = {"op": case.op, "shape": case.name, "backward": case.backward, "bytes": case.bytes,
             "flops": case.flops, "rotate": rotate, "baselines": {}}

    def timed(fn):
        return time_fn(fn, case.make_inputs, device=device, warmup=warmup, reps=reps, rotate=rotate, max_seconds=budget)

    try:
        t = timed(case.fn)
    except Exception as e:  # noqa: BLE001 (a broken kernel is reported, the run goes on)
        entry["error"] = _error(e)
        return entry
    sec = t["median"]
    bw = case.bytes / sec / 1e9
    tf = case.flops / sec / 1e12
    entry.update(
        time_us=sec * 1e6, p10_us=t["p10"] * 1e6, p90_us=t["p90"] * 1e6, reps=t["reps"],
        GBps=bw, TFLOPs=tf,
        bw_fraction=bw / peaks["copy_GBps"], compute_fraction=tf / _compute_peak(case, peaks),
    )
    if case.peak != "bf16":
        entry["compute_peak"] = case.peak if peaks.get(f"matmul_{case.peak}_TFLOPs") else "bf16"
    entry["roofline_fraction"] = max(entry["bw_fraction"], entry["compute_fraction"])
    entry["bound"] = "memory" if entry["bw_fraction"] >= entry["compute_fraction"] else "compute"
    cuda = device.type == "cuda"

    def gpu_wall(fn):
        # On CUDA, also the summed kernel time (GPU time) and the eager wall time per call.
        if not cuda:
            return {}
        try:
            gw = gpu_and_wall_time(fn, case.make_inputs, device=device, rotate=rotate, calls=5 if quick else 10)
            return {"gpu_us": gw["gpu"] * 1e6, "wall_us": gw["wall"] * 1e6}
        except Exception as e:  # noqa: BLE001 (the profiler may be unavailable; the event time stands)
            return {"gpu_wall_error": _error(e)}

    entry.update(gpu_wall(case.fn))
    for name, base in (case.baselines.items() if baselines else ()):
        try:
            bt = timed(base)["median"]
            b = {"time_us": bt * 1e6, "ratio": bt / sec, **gpu_wall(base)}
            # Peer over ours by each measure (> 1: we are faster).
            for key in ("gpu_us", "wall_us"):
                if key in b and entry.get(key):
                    b["ratio_" + key[:-3]] = b[key] / entry[key]
            entry["baselines"][name] = b
        except Exception as e:  # noqa: BLE001 (e.g. torch.compile unavailable here)
            entry["baselines"][name] = {"error": _error(e)}
    return entry


def run_cases(cases, device, peaks: dict, *, quick=False, baselines=True, log=print, path=None) -> dict:
    """All cases on `device`, as the JSON document `write_results` stores. With `path`, the
    document is rewritten after every case, so a run stopped part-way keeps what it measured.
    Progress goes to `log`, flushed: `[i/n] op shape ...` as a case starts, then its summary
    with the seconds it took and the seconds since the first case started."""
    results = {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "nemokernels": __version__,
        "peaks": peaks,
        "cpu_figures": torch.device(device).type != "cuda",
        "quick": quick,
        "cases": [],
    }
    start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.op} {case.name} ...", flush=True)
        t0 = time.perf_counter()
        entry = run_case(case, device, peaks, quick=quick, baselines=baselines)
        results["cases"].append(entry)
        now = time.perf_counter()
        log(f"    {_summary(entry)} ({now - t0:.1f} s, elapsed {now - start:.0f} s)", flush=True)
        if path is not None:
            write_results(results, path)
    return results


def _summary(entry: dict) -> str:
    """One line per finished case, so a log shows results even if the run is stopped."""
    if "error" in entry:
        return "error: " + entry["error"]
    parts = [f"{entry['time_us']:.1f} us"]
    if "gpu_us" in entry:
        parts.append(f"gpu {entry['gpu_us']:.1f} us, wall {entry['wall_us']:.1f} us")
    parts.append(f"{100 * entry['roofline_fraction']:.1f}% of peak ({entry['bound']})")
    for name, b in entry["baselines"].items():
        if "error" in b:
            parts.append(f"{name}: error")
        else:
            parts.append(f"{name} {b['time_us']:.1f} us" + (f" (gpu {b['gpu_us']:.1f})" if "gpu_us" in b else ""))
    return "; ".join(parts)


RESULTS_DIR_ENV = "NEMOKERNELS_BENCH_DIR"


def default_results_dir() -> Path:
    """Where `nemokernels bench` writes without --out: $NEMOKERNELS_BENCH_DIR, else
    $XDG_CACHE_HOME/nemokernels/bench, else ~/.cache/nemokernels/bench (never the checkout)."""
    if os.environ.get(RESULTS_DIR_ENV):
        return Path(os.environ[RESULTS_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "nemokernels" / "bench"


def default_results_path(results: dict) -> Path:
    """<default_results_dir()>/<device>-<date>[-quick].json"""
    tag = "-quick" if results.get("quick") else ""
    return default_results_dir() / f"{results['device_slug']}-{results['date']}{tag}.json"


def write_results(results: dict, path=None) -> Path:
    path = Path(path) if path else default_results_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def _num(v: float) -> str:
    """Four significant digits without exponents for the usual ranges."""
    if v == 0:
        return "0"
    digits = max(0, 3 - int(math.floor(math.log10(abs(v)))))
    return f"{v:.{min(digits, 4)}f}"


def table_rows(results: dict):
    """(header, rows) of strings shared by format_table and scripts/render_bench.py.
    '% peak' is the roofline fraction, tagged with the bound (mem / flop) that sets it;
    'vs X' is X's time over ours (> 1: we are faster); on CUDA it reads event/GPU/wall: by the
    event-timed median, by summed kernel time (GPU time), and by eager wall time per call."""
    names = sorted({n for c in results["cases"] for n in c.get("baselines", {})})
    gpu = any("gpu_us" in c for c in results["cases"])
    header = (["op", "shape", "time us"] + (["gpu us", "wall us"] if gpu else []) + ["GB/s", "TFLOP/s", "% peak"]
              + [f"vs {n}" for n in names])
    rows = []
    for c in results["cases"]:
        if "error" in c:
            rows.append([c["op"], c["shape"], "error: " + c["error"]] + [""] * (len(header) - 3))
            continue
        bound = "mem" if c["bound"] == "memory" else "flop"
        row = [c["op"], c["shape"], _num(c["time_us"])]
        if gpu:
            row += [_num(c["gpu_us"]) if "gpu_us" in c else "", _num(c["wall_us"]) if "wall_us" in c else ""]
        row += [_num(c["GBps"]), _num(c["TFLOPs"]), f"{100 * c['roofline_fraction']:.1f} {bound}"]
        for n in names:
            b = c["baselines"].get(n)
            if b is None or "error" in b:
                row.append("" if b is None else "error")
            elif "ratio_gpu" in b:  # event / GPU / wall ratios
                row.append(f"{b['ratio']:.2f}/{b['ratio_gpu']:.2f}/{b.get('ratio_wall', float('nan')):.2f}x")
            else:
                row.append(f"{b['ratio']:.2f}x")
        rows.append(row)
    return header, rows


def format_peaks(p: dict) -> str:
    tag = " (CPU figures)" if p["cpu_figures"] else ""
    fp8 = (f", fp8 matmul {p['matmul_fp8_TFLOPs']:.2f} TFLOP/s ({p['matmul_fp8']})" if p.get("matmul_fp8_TFLOPs")
           else "")
    return (f"peaks{tag}: copy {p['copy_GBps']:.1f} GB/s ({p['copy']}), "
            f"matmul {p['matmul_TFLOPs']:.2f} TFLOP/s ({p['matmul']}){fp8}")


def format_table(results: dict) -> str:
    header, rows = table_rows(results)
    # An error message spans the rest of its row; it must not widen the time column.
    widths = [max([len(header[i])] + [len(r[i]) for r in rows if not r[i].startswith("error: ")])
              for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    errors = [f"  {c['op']} {c['shape']} {n}: {b['error']}" for c in results["cases"]
              for n, b in c.get("baselines", {}).items() if "error" in b]
    return "\n".join(lines + (["baseline errors:"] + errors if errors else []))
