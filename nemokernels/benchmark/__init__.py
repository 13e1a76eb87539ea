"""Benchmark harness and cases. A new op family adds a `cases_<family>.py` module with a
`cases(quick, device) -> list[Case]` function and registers it in ALL_CASE_MODULES."""
from . import cases_rmsnorm, cases_spec, cases_ssd, cases_ssd_scan, cases_state_update
from . import cases_grouped_gemm, cases_models, cases_moe, cases_nvfp4, cases_nvfp4_gemm
from .harness import Case, measure_peaks, run_cases, time_fn, write_results, format_table

ALL_CASE_MODULES = {"ssd": cases_ssd, "ssd_scan": cases_ssd_scan, "ssd_state_update": cases_state_update,
                    "ssd_rmsnorm": cases_rmsnorm, "spec": cases_spec,
                    "moe_grouped_gemm": cases_grouped_gemm, "moe": cases_moe, "nvfp4": cases_nvfp4,
                    "nvfp4_gemm": cases_nvfp4_gemm, "models": cases_models}


def all_cases(quick: bool, device, ops=None) -> list:
    """Every registered case; with `ops`, only those whose op name contains one of them."""
    cases = [c for mod in ALL_CASE_MODULES.values() for c in mod.cases(quick, device)]
    return [c for c in cases if not ops or any(o in c.op for o in ops)]


__all__ = ["ALL_CASE_MODULES", "Case", "all_cases", "format_table", "measure_peaks", "run_cases",
           "time_fn", "write_results"]
