"""The decoder and generator on the real SmolLM2-135M GGUF model against transformers' own GGUF loading."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from spqr_run.generation import Generator
from spqr_run.sampling import SamplingParams
from tests.conftest import WIKI_TEST

pytestmark = pytest.mark.slow

PROMPT = "The history of the Roman Empire begins with"


def test_logits_match_transformers(real_model, real_source, hf_gguf_model):
    ids = real_source.tokenizer.encode(PROMPT)
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        ours = real_model(tokens, use_cache=False)
        ref = hf_gguf_model(tokens).logits
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel.item() <= 1e-3


def test_greedy_continuation_matches_transformers(real_model, real_source, hf_gguf_model):
    ids = real_source.tokenizer.encode(PROMPT)
    gen = Generator(real_model, real_source.tokenizer, max_seq_len=256)
    ours = gen.generate(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    with torch.inference_mode():
        ref = hf_gguf_model.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert ours.token_ids == ref[0, len(ids) :].tolist()
    assert ours.finish_reason == "length"


def _hf_perplexity(model, ids: list[int], seqlen: int) -> float:
    nll, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids), seqlen):
            window = torch.tensor([ids[i : i + seqlen]])
            if window.shape[1] < 2:
                continue
            logits = model(window).logits[0, :-1].float()
            nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            n += window.shape[1] - 1
    return math.exp(nll / n)


def test_spqr_eval_cli_matches_transformers_perplexity(gguf_path, hf_gguf_model, real_source):
    max_tokens, seqlen = 1024, 256
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "spqr_run.cli.eval",
            str(gguf_path),
            "--text",
            str(WIKI_TEST),
            "--max-tokens",
            str(max_tokens),
            "--seqlen",
            str(seqlen),
            "--device",
            "cpu",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ids = real_source.tokenizer.encode(WIKI_TEST.read_text(encoding="utf-8"), add_bos=False, special=False)
    ref = _hf_perplexity(hf_gguf_model, ids[:max_tokens], seqlen)
    assert result["scored_tokens"] == max_tokens - max_tokens // seqlen
    assert abs(result["ppl"] - ref) / ref <= 0.005
