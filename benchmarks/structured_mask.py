"""Cost of structured outputs on the CPU: building the grammar engine for a vocabulary, compiling a schema, and
computing + applying the token mask per generated token, for llguidance (what `spqr_run.structured` uses) and,
when installed, xgrammar (the alternative it was measured against). Also the CPU time of the decode step it
is added to.

    python -m benchmarks.structured_mask [MODEL.gguf]      # default: ../shared/data/SmolLM2-135M-Instruct.Q4_1.gguf

Times are wall and process-CPU milliseconds (`time.perf_counter`, `time.process_time`); on a loaded machine
trust the CPU column. The token walk is the tokenization of a valid document, so every step is a real state.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from spqr_run.structured import GrammarEngine, apply_mask, token_bytes

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
DOC = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "tags": ["math", "engines", "poetry"],
    "address": {"city": "London", "zip": "12345"},
}


class Clock:
    def __enter__(self) -> Clock:
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_ms = (time.perf_counter() - self.w) * 1e3
        self.cpu_ms = (time.process_time() - self.c) * 1e3


def llguidance_costs(tokenizer, ids: list[int]) -> dict[str, float]:
    with Clock() as build:
        engine = GrammarEngine(tokenizer)
    with Clock() as compile_:
        c = engine.compile_json_schema(SCHEMA)
    logits = torch.randn(tokenizer.vocab_size)
    fill = unpack = apply = 0.0
    for i in ids:
        with Clock() as f:
            c.fill()  # the bitmask and its (V,) bool form: what the server overlaps with the model step
        with Clock() as u:
            allowed = c.compute_mask()  # hands the mask over (~0 once filled)
        with Clock() as a:
            apply_mask(logits, allowed)
        fill, unpack, apply = fill + f.cpu_ms, unpack + u.cpu_ms, apply + a.cpu_ms
        c.accept(i)
    return {
        "engine_build_ms": build.cpu_ms,
        "compile_ms": compile_.cpu_ms,
        "mask_ms_per_token": fill / len(ids),
        "unpack_ms_per_token": unpack / len(ids),
        "apply_ms_per_token": apply / len(ids),
    }


def xgrammar_costs(tokenizer, ids: list[int]) -> dict[str, float] | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    table, _ = token_bytes(tokenizer)
    with Clock() as build:
        info = xgr.TokenizerInfo(
            table,
            vocab_type=xgr.VocabType.RAW,
            vocab_size=len(table),
            stop_token_ids=sorted(tokenizer.eos_ids),
        )
        compiler = xgr.GrammarCompiler(info, max_threads=1)
    with Clock() as compile_:
        matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    bitmask = xgr.allocate_token_bitmask(1, len(table))
    fill = 0.0
    for i in ids:
        with Clock() as f:
            matcher.fill_next_token_bitmask(bitmask)
        fill += f.cpu_ms
        assert matcher.accept_token(i)
    return {
        "engine_build_ms": build.cpu_ms,
        "compile_ms": compile_.cpu_ms,
        "mask_ms_per_token": fill / len(ids),
    }


def decode_step_ms(path: Path) -> float:
    from spqr_run.runtime import load_runtime
    from spqr_run.sampling import SamplingParams

    rt = load_runtime(str(path), ctx=256)
    gen = rt.generator()
    ids = rt.tokenizer.encode("The capital of France is")
    cpu = []
    for n in (1, 33):  # the difference is 32 decode steps
        gen.reset()
        t = time.process_time()
        gen.generate(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        cpu.append(time.process_time() - t)
    return (cpu[1] - cpu[0]) / 32 * 1e3


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    from spqr_run.loading.gguf import open_gguf, read_metadata
    from spqr_run.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(read_metadata(open_gguf(path), path), source=str(path))
    ids = tokenizer.encode(json.dumps(DOC), add_bos=False, special=False)
    report = {
        "vocab": tokenizer.vocab_size,
        "tokens_walked": len(ids),
        "torch_threads": torch.get_num_threads(),
        "llguidance": llguidance_costs(tokenizer, ids),
        "xgrammar": xgrammar_costs(tokenizer, ids),
        "decode_step_cpu_ms": decode_step_ms(path),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
