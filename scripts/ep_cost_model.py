"""Cost model of expert-parallel LatentMoE communication at Nemotron 3 Super shapes.

Prints the markdown tables in docs/distributed.md. Run: python scripts/ep_cost_model.py
Model (per MoE layer, per GPU, one direction; the combine moves the same bytes back):
- each token picks k experts spread uniformly over E experts, E/W per rank;
- "per expert" sends one row per (token, expert) pair (what ExpertParallelLatentMoE does today);
  "per rank" sends one row per (token, destination rank) pair (deduplicated, as DeepEP does);
- rows that stay on the sending rank cost no link bytes (fraction 1/W);
- vector width: the latent size l when the latent projection runs before dispatch, else d.
"""
from math import comb

D, LATENT, F, E, K, SHARED_F = 4096, 1024, 2688, 512, 22, 5376   # docs/design.md section 7, Super
BYTES = 2                                                        # bf16 activations
TOKENS = 4096                                                    # tokens per GPU per step
LINKS = {"NVLink 4 (H100, 450 GB/s)": 450e9, "NVLink 5 (B200, 900 GB/s)": 900e9,
         "InfiniBand NDR (50 GB/s/GPU)": 50e9}
EFFECTIVE_TFLOPS = 700e12                                        # ~70% of H100 dense bf16


def distinct_ranks(w: int) -> float:
    """Expected number of ranks hit by k experts drawn without replacement."""
    per = E // w
    return w * (1 - comb(E - per, K) / comb(E, K))


def main():
    print("| EP degree W | rows/token per expert | rows/token per rank | "
          "KB/token latent (per expert / per rank) | KB/token no latent (per expert / per rank) |")
    print("|---|---|---|---|---|")
    for w in (8, 16, 32, 64):
        remote = 1 - 1 / w
        rows_e, rows_r = K * remote, distinct_ranks(w) * remote
        kb = lambda rows, width: rows * width * BYTES / 1024  # noqa: E731
        print(f"| {w} | {rows_e:.1f} | {rows_r:.1f} | {kb(rows_e, LATENT):.1f} / {kb(rows_r, LATENT):.1f} | "
              f"{kb(rows_e, D):.1f} / {kb(rows_r, D):.1f} |")
    expert_flops = TOKENS * K * 2 * (2 * LATENT * F)
    shared_flops = TOKENS * 2 * (2 * D * SHARED_F)
    print()
    print(f"At {TOKENS} tokens per GPU: routed-expert GEMMs {expert_flops / 1e12:.2f} TFLOP "
          f"= {expert_flops / EFFECTIVE_TFLOPS * 1e3:.2f} ms, shared expert {shared_flops / 1e12:.2f} TFLOP "
          f"= {shared_flops / EFFECTIVE_TFLOPS * 1e3:.2f} ms at {EFFECTIVE_TFLOPS / 1e12:.0f} TFLOP/s.")
    print()
    print("| link | W | dispatch+combine ms, latent per expert | latent per rank | no latent per expert |")
    print("|---|---|---|---|---|")
    for name, bw in LINKS.items():
        for w in (8, 64):
            remote = 1 - 1 / w
            ms = lambda rows, width: 2 * TOKENS * rows * width * BYTES / bw * 1e3  # noqa: E731
            print(f"| {name} | {w} | {ms(K * remote, LATENT):.2f} | {ms(distinct_ranks(w) * remote, LATENT):.2f} | "
                  f"{ms(K * remote, D):.2f} |")


if __name__ == "__main__":
    main()
