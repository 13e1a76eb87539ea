"""Per-kernel GPU time of benchmark cases (ours and each baseline), from torch.profiler.

    python bench/profile_kernels.py --case "mamba_chunk_scan_combined.fwd_bwd:nano b1 L8192" \
        --case "selective_state_update:nano b64" [--calls 3] [--baseline mamba_ssm_triton]

A case is `OP:SHAPE-PREFIX` against the registered cases (nemokernels.benchmark, every shape).
For each: 2 warm-up calls, then `--calls` profiled calls; prints the kernels sorted by total
GPU time with the time per call, and the summed kernel time per call. `--plain` only runs the
calls (no torch.profiler), for running under Nsight Compute (ncu), which owns the counters.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from nemokernels.benchmark import all_cases


def _device_us(e) -> float:
    return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)


def profile_fn(label, fn, make_inputs, calls, rows):
    inputs = [make_inputs() for _ in range(calls)]
    for i in range(2):
        fn(*inputs[i % calls])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(*inputs[i])
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=_device_us, reverse=True)
    total = sum(_device_us(e) for e in events) / calls
    print(f"### {label}: {total:.1f} us of kernels per call ({calls} calls profiled)")
    print(f"{'us/call':>10} {'count/call':>10}  kernel")
    for e in events[:rows]:
        if _device_us(e) <= 0:
            continue
        print(f"{_device_us(e) / calls:10.1f} {e.count / calls:10.1f}  {e.key[:150]}")
    print()
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", required=True, metavar="OP:SHAPE-PREFIX")
    ap.add_argument("--baseline", action="append", default=[], help="also profile these baselines (default: none)")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--plain", action="store_true", help="run the calls without the profiler (for ncu)")
    args = ap.parse_args()
    device = torch.device("cuda")
    ops = sorted({c.split(":", 1)[0] for c in args.case})
    cases = all_cases(False, device, ops)
    for spec in args.case:
        op, shape = spec.split(":", 1)
        match = [c for c in cases if c.op == op and c.name.startswith(shape)]
        if not match:
            print(f"### {spec}: no such case\n")
            continue
        case = match[0]
        print(f"## {case.op} {case.name}")
        if args.plain:
            inputs = case.make_inputs()
            for _ in range(args.calls):
                case.fn(*inputs)
            torch.cuda.synchronize()
            continue
        ours = profile_fn("nemokernels", case.fn, case.make_inputs, args.calls, args.rows)
        for name in args.baseline:
            if name in case.baselines:
                peer = profile_fn(name, case.baselines[name], case.make_inputs, args.calls, args.rows)
                print(f"summed kernel time: ours {ours:.1f} us, {name} {peer:.1f} us, "
                      f"{name} / ours = {peer / ours:.2f}x\n")


if __name__ == "__main__":
    main()
