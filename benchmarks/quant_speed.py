"""Quantization speed per decoder block on the CPU, and where the time goes.

Runs the pipeline of `spqr_run.quantize_model` (load block, quantize its linears group by group, run the
block for the next one's inputs) on the first BLOCKS blocks of a model, with calibration windows of a text
file, and prints CPU time (user + sys of this process) and wall time per block, split into Hessian
collection, the quantizer (`quantize_linear(s)`) and the block forward. Uses only functions that exist in
every version of the pipeline, so the same command measures an older checkout too:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/quant_speed.py MODEL.gguf --calib wiki-calib.txt
    git archive OLD_COMMIT spqr_run | tar -x -C /tmp/old
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old python benchmarks/quant_speed.py MODEL.gguf --calib wiki-calib.txt
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

import spqr_run.quantize_model as qm
from spqr_run.calibration import windows_from_text
from spqr_run.loading import open_model
from spqr_run.models.decoder import Rotary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GGUF file or Hugging Face folder")
    p.add_argument("--calib", required=True, help="calibration text file")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--blocks", type=int, default=3, help="how many blocks to quantize (from the first)")
    p.add_argument("--preset", default="near-lossless", choices=sorted(qm.PRESETS))
    args = p.parse_args()

    source = open_model(Path(args.model))
    calib = windows_from_text(Path(args.calib), source, nsamples=args.nsamples, seqlen=args.seqlen)
    device = torch.device("cpu")
    rotary = Rotary(source.config)
    inps = source.weights["embed_tokens.weight"][calib].float()  # (N, T, hidden)
    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # phase -> [cpu, wall]

    def timed(phase: str, fn):
        def wrapper(*a, **k):
            c, t = time.process_time(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[phase][0] += time.process_time() - c
                spent[phase][1] += time.perf_counter() - t

        return wrapper

    # whichever of these the checkout has (one Hessian per linear or per group; one or several linears)
    for name, phase in [
        ("collect_hessians", "hessians"),
        ("collect_hessian", "hessians"),
        ("quantize_linear", "quantizer"),
        ("quantize_linears", "quantizer"),
    ]:
        if hasattr(qm, name):
            setattr(qm, name, timed(phase, getattr(qm, name)))
    run_block = timed("forward", qm.run_block)
    qcfg = qm.PRESETS[args.preset]
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(args.blocks):
        block = qm.load_block(source, i, device)
        qm.quantize_block(block, i, source.config, qcfg, rotary, inps, device)
        inps = run_block(block, rotary, inps, device)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    n = args.blocks
    result = {
        "blocks": n,
        "calibration": f"{args.nsamples} x {args.seqlen}",
        "threads": torch.get_num_threads(),
        "cpu_per_block": round(cpu / n, 3),
        "wall_per_block": round(wall / n, 3),
        **{f"{k}_cpu_per_block": round(v[0] / n, 3) for k, v in spent.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
