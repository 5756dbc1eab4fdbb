"""SpQR kernels vs cuBLAS fp16 on LLaMA / Falcon linear shapes, side by side in one run.

    python benchmarks/kernel_bench.py            # all models, batch 1, 4, 16, 512
    python benchmarks/kernel_bench.py --quick    # LLaMA-7B shapes, fewer repetitions
    python benchmarks/kernel_bench.py --graph    # time CUDA-graph replays: the kernels, not Python's launch cost
    python benchmarks/kernel_bench.py --dry-run  # no GPU needed: tiny shapes on the CPU reference, checks the script

Method: random packed 3-bit SpQR layers in the v2 `tiles` layout (3.625 bits + 1% outliers, permuted) and fp16
weights of each shape; the SpQR call is `spqr_matmul_stored` on x already in stored order (the gather is done once
per input for several linears, so it is not charged to each);
several weight sets of each are rotated so the ones in use always total more than 2x the L2 cache (50 MB on
an H100), so no timing is flattered by a warm cache. Each measurement times a run of calls with CUDA events
after a warm-up, repeated, and reports the median per call. GB/s counts the bytes the layer stores (packed
tensors for SpQR, 2 bytes a weight for fp16); "% copy" compares with a measured device-to-device copy.
With --graph, `calls` back-to-back calls (cycling through the weight sets) are captured in one CUDA graph and
each replay is timed with CUDA events: one Python `spqr_matmul` call costs about 40 us of host time, more than a
4096x4096 3-bit matvec takes on the GPU, so without a graph a batch-1 number measures the host.
Prints a markdown table headed with the GPU name and the date.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spqr_run.ops import spqr_matmul_stored
from spqr_run.ops.spqr_matmul import reference_weight
from spqr_run.quant import LinearMeta
from spqr_run.quant import tile_layout as tl

L2_BYTES = 50 * 2**20  # H100; more than any consumer card's
ROTATE_BYTES = 2.5 * L2_BYTES  # weight sets rotated per measurement total at least this

# model -> (name, out_features, in_features) of its distinct linear shapes
MODELS: dict[str, list[tuple[str, int, int]]] = {
    "LLaMA-7B": [("qkvo", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "LLaMA-13B": [("qkvo", 5120, 5120), ("gate/up", 13824, 5120), ("down", 5120, 13824)],
    "LLaMA-30B": [("qkvo", 6656, 6656), ("gate/up", 17920, 6656), ("down", 6656, 17920)],
    "LLaMA-65B": [("qkvo", 8192, 8192), ("gate/up", 22016, 8192), ("down", 8192, 22016)],
    "Falcon-7B": [("qkv", 4672, 4544), ("dense", 4544, 4544), ("up", 18176, 4544), ("down", 4544, 18176)],
    "Falcon-40B": [("qkv", 9216, 8192), ("dense", 8192, 8192), ("up", 32768, 8192), ("down", 8192, 32768)],
}
BATCHES = (1, 4, 16, 512)


@dataclass
class PackedSpqr:
    """A v2 SpQR linear as the kernels read it (the `QuantizedLinear` attributes of method spqr)."""

    meta: LinearMeta
    tiles: torch.Tensor
    outliers: torch.Tensor
    outlier_row_ptr: torch.Tensor
    perm: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Stored bytes (tiles, outliers, row pointers; the 2-byte perm is shared by linears of one input)."""
        return sum(t.numel() * t.element_size() for t in (self.tiles, self.outliers, self.outlier_row_ptr))

    @property
    def avg_bits(self) -> float:
        return self.nbytes * 8 / (self.meta.out_features * self.meta.in_features)

    def perm_indices(self) -> None:
        return None

    def dequantize(self, rows: slice | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference rows (stored order): only the CPU dry run uses it."""
        m = self.meta
        w = reference_weight(self.tiles, self.outliers, self.outlier_row_ptr, m.wbits, m.stat_bits,
                             m.out_features, m.in_features)  # fmt: skip
        return w[rows or slice(None)].to(dtype)


def random_spqr(
    out_features: int, in_features: int, *, outlier_fraction: float, seed: int, device: str = "cuda"
) -> PackedSpqr:
    """A packed 3-bit SpQR layer (3-bit stats, 16x16 groups, v2 records) with random contents."""
    g = torch.Generator(device=device).manual_seed(seed)
    meta = LinearMeta(method="spqr", wbits=3, groupsize=16, stat_bits=3, stat_groupsize=16,
                      out_features=out_features, in_features=in_features)  # fmt: skip
    groups, row_tiles = math.ceil(in_features / 16), math.ceil(out_features / 16)
    nnz = int(outlier_fraction * out_features * in_features)
    flat = torch.randint(0, out_features * in_features, (nnz,), generator=g, device=device).unique()  # sorted
    rows, cols = flat // in_features, flat % in_features
    row_ptr = torch.zeros(out_features + 1, dtype=torch.int64, device=device)
    row_ptr[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    values = (0.01 * torch.randn(flat.numel(), generator=g, device=device)).half()
    outliers, outlier_row_ptr = tl.pack_outliers(row_ptr, cols, values, out_features)

    def codes(*shape: int) -> torch.Tensor:
        return torch.randint(0, 8, shape, generator=g, device=device, dtype=torch.uint8)

    second = (torch.rand(row_tiles, groups, 4, generator=g, device=device) * 0.01).half()
    tiles = tl.pack(codes(out_features, in_features), codes(out_features, groups), codes(out_features, groups),
                    second, 3, 3)  # fmt: skip
    return PackedSpqr(meta=meta, tiles=tiles, outliers=outliers, outlier_row_ptr=outlier_row_ptr)


def time_calls(fns: list[Callable[[], object]], *, calls: int, repeats: int) -> float:
    """Median seconds per call, cycling through `fns` (one per weight set), timed with CUDA events."""
    for i in range(max(len(fns), 10)):  # warm-up: every set once, the extension built, clocks up
        fns[i % len(fns)]()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fns[i % len(fns)]()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / calls)
    return statistics.median(times)


def time_graph(fns: list[Callable[[], object]], *, calls: int, repeats: int) -> float:
    """Median seconds per call of a CUDA graph holding `calls` back-to-back calls cycling through `fns`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of a 1 GiB buffer."""
    src = torch.empty(2**29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_calls([lambda: dst.copy_(src)], calls=10, repeats=5)
    return 2 * src.numel() * src.element_size() / seconds


def path_name(rows: int) -> str:
    return "small (mma)" if rows <= 16 else "dequant+cuBLAS"


def time_cpu(fns: list[Callable[[], object]], *, calls: int, repeats: int) -> float:
    """Median seconds per call on the CPU (the dry run)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def bench_shape(
    out_features: int,
    in_features: int,
    rows: int,
    *,
    calls: int,
    repeats: int,
    graph: bool = False,
    device: str = "cuda",
) -> dict[str, float]:
    timer = time_cpu if device == "cpu" else time_graph if graph else time_calls
    rotate = 1 if device == "cpu" else ROTATE_BYTES
    fp16_bytes = out_features * in_features * 2
    n_fp16 = max(2, math.ceil(rotate / fp16_bytes))
    dtype = torch.float32 if device == "cpu" else torch.float16  # CPU fp16 matmul is an emulation
    weights = [torch.randn(out_features, in_features, device=device).to(dtype) for _ in range(n_fp16)]
    x = torch.randn(rows, in_features, device=device).to(dtype)
    t_fp16 = timer([lambda w=w: F.linear(x, w) for w in weights], calls=calls, repeats=repeats)
    del weights

    first = random_spqr(out_features, in_features, outlier_fraction=0.01, seed=0, device=device)
    n_spqr = max(2, math.ceil(rotate / first.nbytes))
    layers = [first] + [
        random_spqr(out_features, in_features, outlier_fraction=0.01, seed=s, device=device)
        for s in range(1, n_spqr)
    ]
    xh = x.half()
    t_spqr = timer([lambda q=q: spqr_matmul_stored(xh, q) for q in layers], calls=calls, repeats=repeats)
    return {
        "fp16_s": t_fp16,
        "fp16_gbs": fp16_bytes / t_fp16 / 1e9,
        "spqr_s": t_spqr,
        "spqr_gbs": first.nbytes / t_spqr / 1e9,
        "bits": first.avg_bits,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="LLaMA-7B shapes only, fewer repetitions")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), help="models to run (default: all)")
    parser.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    parser.add_argument("--graph", action="store_true", help="time CUDA-graph replays of back-to-back calls")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: tiny shapes (one per model) on the CPU reference, to check the script")  # fmt: skip
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print(
            "benchmarks/kernel_bench.py: no CUDA GPU available (this torch build or machine has none); nothing to "
            "measure (--dry-run runs the script on tiny CPU shapes)"
        )
        return 0
    models = args.models or (["LLaMA-7B"] if args.quick else list(MODELS))
    calls, repeats = (1, 1) if dry else (20, 5) if args.quick else (50, 11)
    device = "cpu" if dry else "cuda"

    copy_bw = 1e9 if dry else copy_bandwidth()
    gpu = "the CPU (dry run: reference path, tiny shapes)" if dry else torch.cuda.get_device_name()
    print(f"## SpQR kernels vs cuBLAS fp16 on {gpu} ({datetime.date.today().isoformat()})")
    print()
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}; device-to-device copy {copy_bw / 1e9:.0f} GB/s; "
    )
    timing = "CUDA-graph replays of" if args.graph else "Python loops of"
    print(f"3-bit SpQR, 3-bit stats, v2 records, 1% outliers, x in stored order; medians of CUDA-event timings of {timing} "
          f"{calls} back-to-back calls.")  # fmt: skip
    print()
    print("| model | linear | out x in | batch | fp16 us | fp16 GB/s | SpQR path | bits | SpQR us | SpQR GB/s "
          "| % copy | speedup |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for model in models:
        shapes = MODELS[model][:1] if dry else MODELS[model]
        for name, out_features, in_features in shapes:
            if dry:  # same aspect, 1/64 of each dimension
                out_features, in_features = max(16, out_features // 64), max(16, in_features // 64)
            for rows in args.batches:
                r = bench_shape(
                    out_features,
                    in_features,
                    rows,
                    calls=calls,
                    repeats=repeats,
                    graph=args.graph,
                    device=device,
                )
                print(
                    f"| {model} | {name} | {out_features}x{in_features} | {rows} | {r['fp16_s'] * 1e6:.1f} "
                    f"| {r['fp16_gbs']:.0f} | {path_name(rows)} | {r['bits']:.3f} | {r['spqr_s'] * 1e6:.1f} "
                    f"| {r['spqr_gbs']:.0f} | {100 * r['spqr_gbs'] * 1e9 / copy_bw:.0f}% "
                    f"| {r['fp16_s'] / r['spqr_s']:.2f}x |",
                    flush=True,
                )
                if not dry:
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
