"""Benchmark harness and cases. A family's cases live in `cases_<family>[_<op>].py`, each with a
`cases(quick, device) -> list[Case]` function; every such module in this package is found by
name (no list to keep)."""
import importlib
import pkgutil

from .harness import Case, measure_peaks, run_cases, time_fn, write_results, format_table

ALL_CASE_MODULES = {m.name[len("cases_"):]: importlib.import_module(f"{__name__}.{m.name}")
                    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
                    if m.name.startswith("cases_")}


def all_cases(quick: bool, device, ops=None) -> list:
    """Every registered case; with `ops`, only those whose op name contains one of them."""
    cases = [c for mod in ALL_CASE_MODULES.values() for c in mod.cases(quick, device)]
    return [c for c in cases if not ops or any(o in c.op for o in ops)]


__all__ = ["ALL_CASE_MODULES", "Case", "all_cases", "format_table", "measure_peaks", "run_cases",
           "time_fn", "write_results"]
