"""`nemokernels bench`: measure the device's peaks, time every case, print a table, write JSON."""
import argparse
import datetime
from pathlib import Path

import torch

from . import all_cases
from .harness import (default_results_path, device_name, device_slug, format_peaks, format_table, measure_peaks,
                      run_cases, write_results)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", action="append", metavar="NAME",
                        help="only ops whose name contains NAME (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a few small shapes, fewer repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="results JSON (default: bench/results/<device>-<date>.json)")
    parser.add_argument("--no-baselines", action="store_true", help="time only nemokernels' ops")
    parser.add_argument("--fast-timing", action="store_true",
                        help="every shape (as without --quick), timed with --quick's fewer repetitions")
    parser.add_argument("--skip-baseline", action="append", default=[], metavar="NAME",
                        help="skip baselines whose name contains NAME (repeatable; e.g. compile: "
                             "torch.compile baselines cost minutes of compiling)")


def run(args) -> int:
    """0 when every case ran; 1 when one of ours failed (the JSON is written either way)."""
    device = torch.device(args.device)
    cases = all_cases(args.quick, device, args.op)
    for case in cases:
        case.baselines = {n: f for n, f in case.baselines.items() if not any(s in n for s in args.skip_baseline)}
    if not cases:
        print(f"no case matches --op {args.op}")
        return 2
    peaks = measure_peaks(device, quick=args.quick or args.fast_timing)
    print(f"device: {device_name(device)}\n{format_peaks(peaks)}\n{len(cases)} cases:")
    path = Path(args.out) if args.out else default_results_path(
        {"device_slug": device_slug(device), "date": datetime.date.today().isoformat()})
    results = run_cases(cases, device, peaks, quick=args.quick or args.fast_timing, baselines=not args.no_baselines,
                        path=path)
    print("\n" + format_table(results))
    write_results(results, path)
    print(f"\nwrote {path}")
    return 1 if any("error" in c for c in results["cases"]) else 0
