"""Cost of the `.spqr` per-tensor checksums: CRC-32 of every tensor of a file, and the whole load (`load_runtime`
on the CPU) with and without the check, alternated so a loaded machine affects both alike.

    python -m benchmarks.checksums [MODEL.spqr] [--repeats N]   # default: models/SmolLM2-135M-Instruct.spqr

Times are wall (`time.perf_counter`) and process-CPU (`time.process_time`) seconds; on a shared machine trust
the CPU column and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from safetensors import safe_open

from spqr_run.loading.spqr_file import tensor_checksum
from spqr_run.runtime import load_runtime

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.spqr"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(DEFAULT))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    path = Path(args.model)
    with safe_open(path, framework="pt") as f:
        tensors = [f.get_tensor(n) for n in f.keys()]
    size = sum(t.numel() * t.element_size() for t in tensors)
    w0, c0 = time.perf_counter(), time.process_time()
    for t in tensors:
        tensor_checksum(t)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(
        f"{path.name}: {len(tensors)} tensors, {size / 2**20:.1f} MiB; CRC-32 of all of them: "
        f"{wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms CPU ({size / cpu / 2**30:.2f} GiB/s)"
    )
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for verify in (True, False):
            w0, c0 = time.perf_counter(), time.process_time()
            load_runtime(path, device="cpu", ctx=512, verify_checksums=verify)
            runs[verify].append((time.perf_counter() - w0, time.process_time() - c0))
    for verify, times in runs.items():
        walls, cpus = [w for w, _ in times], [c for _, c in times]
        print(
            f"load_runtime, checksums {'checked' if verify else 'skipped'}: median {statistics.median(walls):.2f} s "
            f"wall, {statistics.median(cpus):.2f} s CPU (runs: {', '.join(f'{w:.2f}' for w in walls)})"
        )


if __name__ == "__main__":
    main()
