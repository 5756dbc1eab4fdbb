"""One decode row (batch 1) through single LLaMA-7B-shape linears on the native CPU kernels: SpQR 3-bit at
several outlier rates against the fp16 dense kernel, alternated round by round, medians; what a whole-model
`spqr-bench` ratio is made of.

    python -m benchmarks.cpu_linears --threads 1 --rounds 7            # from the repo root

Each configuration holds `--copies` weights (3: 130-540 MB, far beyond the 32 MiB L3), run one after the
other so no call finds its weight in cache. Reported per configuration: median wall ms per matmul, the process
CPU ms over the same calls (CPU ms / wall ms / threads under 1 means other processes took the cores), the
bytes one matmul reads (`NativeWeight.nbytes`) and GB/s = bytes / wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SHAPES = {"gate_up (fused)": (22016, 4096), "down": (4096, 11008), "qkv (fused)": (12288, 4096)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--copies", type=int, default=3)
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.002, 0.008, 0.01])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["gate_up (fused)", "down"])
    args = p.parse_args(argv)

    from spqr_run.cpu import configure_threads, lib
    from spqr_run.cpu.weights import NativeWeight, dense_weight, spqr_weight
    from spqr_run.engine.synthetic import random_spqr_linear, spqr_meta

    threads = configure_threads(args.threads)
    print(f"native CPU ({lib.isa_name()}, {threads} threads), load average {os.getloadavg()}")
    print("| linear | weights | ms (median) | CPU share | MB read | GB/s | vs fp16 |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        out, inp = SHAPES[shape]
        configs: dict[str, list[NativeWeight]] = {}
        for rate in args.rates:
            q = random_spqr_linear(
                spqr_meta(out, inp, 3), outlier_rate=rate, gen=gen, device=torch.device("cpu")
            )
            configs[f"SpQR 3-bit, {rate:.1%} outliers"] = [spqr_weight(q) for _ in range(args.copies)]
        w16 = torch.empty(out, inp, dtype=torch.float16).uniform_(-0.02, 0.02, generator=gen)  # (out, in)
        configs["fp16"] = [dense_weight(w16.clone()) for _ in range(args.copies)]
        del w16
        x = torch.randn(1, inp, generator=gen)  # (1, in) one decode row
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, weights in configs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for w in weights:
                    w.matmul(x)
                samples[name].append(
                    ((time.perf_counter() - t0) / len(weights), (time.process_time() - c0) / len(weights))
                )
        wall = {k: statistics.median(s for s, _ in v[1:]) for k, v in samples.items()}
        cpu = {k: statistics.median(c for _, c in v[1:]) for k, v in samples.items()}
        for name, weights in configs.items():
            nbytes = weights[0].nbytes
            print(
                f"| {shape} {out}x{inp} | {name} | {wall[name] * 1e3:.2f} | {cpu[name] / wall[name] / threads:.2f} "
                f"| {nbytes / 1e6:.1f} | {nbytes / wall[name] / 1e9:.1f} | {wall['fp16'] / wall[name]:.2f}x |",
                flush=True,
            )
        del configs
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
