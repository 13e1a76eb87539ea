"""`nemokernels info | bench | demo` (also `python -m nemokernels ...`)."""
import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nemokernels", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="version, build, and which path each op takes here")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: current)")
    p_bench = sub.add_parser("bench", help="microbenchmarks with peaks and baselines")
    from .benchmark.runner import add_arguments

    add_arguments(p_bench)
    p_demo = sub.add_parser("demo", help="train a small byte-level NemotronH on the stdlib, then MTP speculation")
    from .models.demo import add_arguments as add_demo_arguments

    add_demo_arguments(p_demo)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        from .info import build_info, format_info

        info = build_info(args.device)
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0
    if args.cmd == "bench":
        from .benchmark.runner import run

        return run(args)
    if args.cmd == "demo":
        from .models.demo import main as demo_main

        return demo_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
