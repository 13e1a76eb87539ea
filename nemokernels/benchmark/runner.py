"""`nemokernels bench`: measure the device's peaks, time every case, print a table, write JSON."""
import argparse
import datetime
import os
from pathlib import Path

import torch

from . import all_cases
from .harness import (RESULTS_DIR_ENV, default_results_path, device_name, device_slug, format_peaks, format_table,
                      measure_peaks, run_cases, write_results)

COMPILE_TAG = "compile"  # every torch.compile baseline has it in its name (torch_compile, torch_chunked_compile)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of threads (e.g. --threads 4)")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", action="append", metavar="NAME",
                        help="only ops whose name contains NAME (repeatable)")
    parser.add_argument("--shape", action="append", metavar="NAME",
                        help="only cases whose shape name contains NAME (repeatable; e.g. \"T64 \")")
    parser.add_argument("--quick", action="store_true",
                        help="a few small shapes (CPU-sized on a CPU), fewer repetitions, no torch.compile baselines")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help=f"results JSON (default: <dir>/<device>-<date>[-quick].json, <dir> being "
                             f"${RESULTS_DIR_ENV}, else $XDG_CACHE_HOME/nemokernels/bench, "
                             f"else ~/.cache/nemokernels/bench)")
    parser.add_argument("--no-baselines", action="store_true", help="time only nemokernels' ops")
    parser.add_argument("--fast-timing", action="store_true",
                        help="every shape (as without --quick), timed with --quick's fewer repetitions")
    parser.add_argument("--compile-baselines", action="store_true",
                        help="keep the torch.compile baselines in a --quick run (they cost minutes of compiling; "
                             "runs without --quick always have them unless --skip-baseline compile)")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads for the ops (default: 1 in a --quick CPU run unless OMP_NUM_THREADS is "
                             "set, since threads spin-waiting for a busy core cost more than they gain; "
                             "else torch's default)")
    parser.add_argument("--skip-baseline", action="append", default=[], metavar="NAME",
                        help="skip baselines whose name contains NAME (repeatable; e.g. compile: "
                             "torch.compile baselines cost minutes of compiling)")


def skipped_baselines(args) -> list:
    """Name fragments of the baselines this run leaves out."""
    return args.skip_baseline + ([COMPILE_TAG] if args.quick and not args.compile_baselines else [])


def cpu_threads(args, environ=os.environ):
    """The thread count a CPU run sets, or None to keep torch's (see --threads)."""
    if args.threads is not None:
        return args.threads
    return 1 if args.quick and "OMP_NUM_THREADS" not in environ else None


def select_cases(args, device) -> list:
    """The cases `args` asks for, each with only the baselines this run times."""
    cases = all_cases(args.quick, device, args.op)
    if args.shape:
        cases = [c for c in cases if any(s in c.name for s in args.shape)]
    skip = skipped_baselines(args)
    for case in cases:
        case.baselines = {n: f for n, f in case.baselines.items() if not any(s in n for s in skip)}
    return cases


def run(args) -> int:
    """0 when every case ran; 1 when one of ours failed (the JSON is written either way)."""
    device = torch.device(args.device)
    if device.type == "cpu" and cpu_threads(args) is not None:
        torch.set_num_threads(cpu_threads(args))
    cases = select_cases(args, device)
    if not cases:
        print(f"no case matches --op {args.op} --shape {args.shape}")
        return 2
    quick = args.quick or args.fast_timing
    path = Path(args.out) if args.out else default_results_path(
        {"device_slug": device_slug(device), "date": datetime.date.today().isoformat(), "quick": args.quick})
    print(f"results: {path} (rewritten after every case)", flush=True)
    peaks = measure_peaks(device, quick=quick)
    print(f"device: {device_name(device)}\n{format_peaks(peaks)}\n{len(cases)} cases:", flush=True)
    results = run_cases(cases, device, peaks, quick=quick, baselines=not args.no_baselines, path=path)
    print("\n" + format_table(results))
    write_results(results, path)
    print(f"\nwrote {path}")
    return 1 if any("error" in c for c in results["cases"]) else 0
