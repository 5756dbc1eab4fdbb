"""What only a GPU can show about how the kernels reach it (issue 22): module load time, first-use NVRTC, the
launcher's real per-launch cost, and that the NVRTC build computes what the prebuilt one does.

    python benchmarks/gpu_delivery.py             # on a CUDA GPU (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_delivery.py --dry-run   # the same steps on the CPU execution shim, nothing timed

Steps, each printed as one line:
1. path: which GPU path this machine takes and why (spqr_run.ops.kernel_path); --expect-prebuilt fails otherwise;
2. prebuilt: loading the shipped cubin of one (wbits, stat_bits) into a fresh launcher state (cuModuleLoadData,
   three cuModuleGetFunction, the occupancy queries), milliseconds;
3. NVRTC first use: compiling that pair for this GPU's arch into an empty cache, then loading it; and a second
   load from the cache (what every later process pays), seconds / milliseconds;
4. launches: host time per spqr::matmul_small call from Python (eager: plan lookup, argument block,
   cuLaunchKernel) on a 4096 x 4096 3-bit layer, one row, against torch's fp16 matmul call in the same run;
   and the per-launch time of the same kernel inside a CUDA graph (device events over 200 launches);
5. agreement: the NVRTC cubins' outputs equal the prebuilt ones' bit for bit (1, 9 and 17 rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(
    str(ROOT)
)  # the checkout's package unless one is installed (gpu_check.sh runs an installed wheel)

from spqr_run.gpu import modules  # noqa: E402
from spqr_run.gpu import spqr_matmul as launcher  # noqa: E402

BITS = (3, 3)


def layer_tensors(out_features: int, in_features: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A random packed 3-bit layer (tiles, outliers, row pointers) for timing: the layout, not the values, matters."""
    sys.path.append(str(ROOT / "tests"))
    from test_kernels import random_layer

    q = random_layer(out_features, in_features, wbits=BITS[0], stat_bits=BITS[1], outlier_fraction=0.01)
    return tuple(t.to(device) for t in (q.tiles, q.outliers, q.outlier_row_ptr))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dry-run", action="store_true", help="run the steps on the CPU shim (no GPU, no timings)"
    )
    ap.add_argument("--expect-prebuilt", action="store_true", help="fail unless the prebuilt path is taken")
    args = ap.parse_args(argv)
    failed = False
    if args.dry_run:
        sys.path.append(str(ROOT / "kernels" / "testing"))
        import shim

        s = shim.load("plain")

        def new_device(images=None):
            return s.device(arch="sm_86", images=images)

        device, out_f, in_f = torch.device("cpu"), 64, 256
        print("1. path: (dry run) the CPU execution shim")
    else:
        from spqr_run.gpu.driver import cuda_driver
        from spqr_run.ops import kernel_path
        from spqr_run.ops.spqr_matmul import _nvrtc_loader

        device, out_f, in_f = torch.device("cuda", 0), 4096, 4096
        path = kernel_path(device, BITS)
        print(f"1. path: {path}")
        if args.expect_prebuilt and path.name != modules.PREBUILT:
            print("   FAILED: the prebuilt path was expected")
            failed = True

        def new_device(images=None):
            dev = launcher.CudaGpu(device, cuda_driver(), _nvrtc_loader)
            if images is not None:
                dev.images = lambda bits, reasons: images(bits, reasons)
            return dev

    def only(source: str):
        def images(bits, reasons):
            if args.dry_run:
                return [s.image(bits, "sm_86")]
            loader = new_device().nvrtc_loader
            os.environ[modules.SOURCE_ENV] = source
            try:
                return list(modules.candidates(new_device().arch, bits, nvrtc_loader=loader, reasons=reasons))
            finally:
                os.environ.pop(modules.SOURCE_ENV, None)

        return images

    # 2. prebuilt module load
    dev_pre = new_device(only("prebuilt"))
    t0 = time.perf_counter()
    try:
        dev_pre.prepare(BITS)
        print(f"2. prebuilt: loaded and resolved in {1000 * (time.perf_counter() - t0):.1f} ms "
              f"({dev_pre.loaded()[0].image.origin})")  # fmt: skip
    except modules.KernelsUnavailable as e:
        print(f"2. prebuilt: unavailable ({e})")
        dev_pre = None
    # 3. NVRTC first use, then from the cache
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SPQR_RUN_KERNEL_CACHE"] = cache
        try:
            dev_nv = new_device(only("nvrtc"))
            t0 = time.perf_counter()
            dev_nv.prepare(BITS)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            new_device(only("nvrtc")).prepare(BITS)
            again = time.perf_counter() - t0
            print(f"3. NVRTC: first use {first:.2f} s (compile + cache write + load), from the cache "
                  f"{1000 * again:.1f} ms ({dev_nv.loaded()[0].image.origin})")  # fmt: skip
        except modules.KernelsUnavailable as e:
            print(f"3. NVRTC: unavailable ({e})")
            dev_nv = None
        finally:
            os.environ.pop("SPQR_RUN_KERNEL_CACHE", None)
    dev = dev_pre or dev_nv
    if dev is None:
        print("no kernels: nothing to launch")
        return 1
    tensors = layer_tensors(out_f, in_f, device)
    numbers = (*BITS, out_f, in_f)
    x = torch.randn(1, in_f, device=device).half()
    if args.dry_run:
        with dev:
            packed = [dev.input(t, n) for t, n in zip(tensors, ("tiles", "outliers", "row_ptr"), strict=True)]
            launcher.matmul_small(dev, dev.input(x, "x"), *packed, None, *numbers)
        print("4. launches: (dry run) one launch through the argument block")
        print("5. agreement: (dry run) see tests/test_gpu_launch.py")
        return 1 if failed else 0
    # 4. launch cost
    calls = 2000
    launcher.matmul_small(dev, x, *tensors, None, *numbers)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        launcher.matmul_small(dev, x, *tensors, None, *numbers)
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    w = torch.randn(out_f, in_f, device=device).half()
    t0 = time.perf_counter()
    for _ in range(calls):
        torch.matmul(x, w.T)
    torch_host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    graph, n = torch.cuda.CUDAGraph(), 200
    with torch.cuda.graph(graph):
        for _ in range(n):
            launcher.matmul_small(dev, x, *tensors, None, *numbers)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    per_launch = start.elapsed_time(end) / (5 * n) * 1000
    print(f"4. launches: {1e6 * host:.1f} us of host time per eager call (torch fp16 matmul call: "
          f"{1e6 * torch_host:.1f} us); {per_launch:.2f} us per launch in a CUDA graph (kernel included)")  # fmt: skip
    # 5. agreement
    if dev_pre is not None and dev_nv is not None:
        same = True
        for rows in (1, 9, 17):
            xr = torch.randn(rows, in_f, device=device).half()
            if rows <= 16:
                a = launcher.matmul_small(dev_pre, xr, *tensors, None, *numbers)
                b = launcher.matmul_small(dev_nv, xr, *tensors, None, *numbers)
            else:
                a, b = (
                    launcher.dequantize(dev_pre, *tensors, *numbers),
                    launcher.dequantize(dev_nv, *tensors, *numbers),
                )
            same &= bool(torch.equal(a, b))
        print(
            f"5. agreement: NVRTC and prebuilt outputs {'equal' if same else 'DIFFER'} (1, 9 rows; dequantize)"
        )
        failed |= not same
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
