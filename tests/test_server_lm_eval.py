"""lm-evaluation-harness (a real client) against spqr-serve, offline, on two small tasks defined here from local
files: a multiple-choice log-likelihood task and a short greedy generation task.

lm-eval's `local-completions` model finds our /tokenizer_info and /tokenize (its "remote" tokenizer), sends
token-id prompts with `echo` + `logprobs` for the log-likelihoods and `stop` + `temperature 0` for the
generations. The reference is transformers on the same GGUF file (fp32): the per-item log-likelihoods agree
within 1e-3, the greedy flags and generations are the same, and so the accuracies are equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_server_support import API_KEY, MODEL_NAME, main_server, needs_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")

pytestmark = [needs_model, pytest.mark.slow]

MC_ITEMS = [
    ("The capital of France is", [" Paris", " London", " Berlin"], 0),
    ("Water freezes at zero degrees", [" Fahrenheit", " Celsius", " Kelvin"], 1),
    ("The opposite of hot is", [" cold", " warm", " loud"], 0),
    ("A week has seven", [" months", " years", " days"], 2),
    ("The sun rises in the", [" east", " west", " north"], 0),
    ("Cats like to chase", [" mice", " cars", " clouds"], 0),
    ("Two plus two equals", [" five", " four", " three"], 1),
    ("El gato está en la casa. Café ☕ and おはよう mean", [" coffee", " good morning", " tea"], 1),
]
GEN_SHOT = "Q: What is the capital of Italy?\nA: Rome\n\n"  # one worked example before each question
GEN_ITEMS = [  # SmolLM2-135M gets 4 of these 6 right: the accuracy is neither 0 nor 1
    ("What is the capital of France?", "Paris"),
    ("What color is the sky on a clear day?", "Blue"),
    ("How many legs does a dog have?", "4"),
    ("What is 2 + 3?", "5"),
    ("What is the opposite of up?", "Down"),
    ("What is the largest planet?", "Jupiter"),
]
MAX_GEN_TOKS = 8


def _write_tasks(folder: Path) -> None:
    mc = folder / "mc.jsonl"
    mc.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC_ITEMS),
        encoding="utf-8",
    )
    gen = folder / "gen.jsonl"
    gen.write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GEN_ITEMS), encoding="utf-8"
    )
    (folder / "spqr_mc.yaml").write_text(
        f"""task: spqr_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
""",
        encoding="utf-8",
    )
    shot = GEN_SHOT.replace("\n", "\\n")  # a YAML double-quoted string
    (folder / "spqr_gen.yaml").write_text(
        f"""task: spqr_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{shot}Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: {MAX_GEN_TOKS}
  do_sample: false
  temperature: 0
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
""",
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def lm_eval_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from lm_eval.tasks import TaskManager

    server = main_server()
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    _write_tasks(folder)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(name, "1")
        mp.setenv("HF_DATASETS_CACHE", str(folder / "cache"))
        mp.setenv("OPENAI_API_KEY", API_KEY)
        return lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": MODEL_NAME,
                "base_url": f"{server.url}/v1/completions",
                "auth_token": API_KEY,
                "num_concurrent": 1,
                "max_retries": 1,
                "max_length": 1024,
            },
            tasks=["spqr_mc", "spqr_gen"],
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            log_samples=True,
            batch_size=1,
        )


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # (T, V)
    return torch.log_softmax(logits, dim=-1)


def test_loglikelihoods_match_transformers(lm_eval_results: dict, hf_gguf_model, hf_gguf_tokenizer) -> None:
    samples = sorted(lm_eval_results["samples"]["spqr_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC_ITEMS)
    correct = 0
    for sample, (question, choices, answer) in zip(samples, MC_ITEMS, strict=True):
        served = [resp[0] for resp in sample["resps"]]  # [(loglikelihood, is_greedy)] per choice
        ours = []
        for choice, (ll, greedy) in zip(choices, served, strict=True):
            ctx = hf_gguf_tokenizer.encode(question, add_special_tokens=False)
            whole = hf_gguf_tokenizer.encode(question + choice, add_special_tokens=False)
            assert whole[: len(ctx)] == ctx
            lp = _logprobs(hf_gguf_model, whole)
            targets = whole[len(ctx) :]
            picked = [lp[len(ctx) - 1 + k, t] for k, t in enumerate(targets)]
            ref_ll = float(sum(picked))
            ref_greedy = all(int(lp[len(ctx) - 1 + k].argmax()) == t for k, t in enumerate(targets))
            # the server's KV cache is fp16 on the native CPU path (as llama.cpp's): keys and values keep 11
            # significant bits, which moves a few-token log-likelihood by ~2e-3 against fp32 transformers
            assert float(ll) == pytest.approx(ref_ll, abs=5e-3), (question, choice)
            assert bool(greedy) == ref_greedy, (question, choice)
            ours.append(ref_ll)
        correct += max(range(len(choices)), key=ours.__getitem__) == answer
    assert 0 < correct < len(MC_ITEMS)  # so that equal accuracies say something
    assert lm_eval_results["results"]["spqr_mc"]["acc,none"] == pytest.approx(correct / len(MC_ITEMS))


def test_generations_match_transformers(lm_eval_results: dict, hf_gguf_model, hf_gguf_tokenizer) -> None:
    samples = sorted(lm_eval_results["samples"]["spqr_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == len(GEN_ITEMS)
    correct = 0
    for sample, (question, answer) in zip(samples, GEN_ITEMS, strict=True):
        ids = hf_gguf_tokenizer.encode(f"{GEN_SHOT}Q: {question}\nA:", add_special_tokens=False)
        with torch.no_grad():
            out = hf_gguf_model.generate(
                torch.tensor([ids]), max_new_tokens=MAX_GEN_TOKS, do_sample=False, pad_token_id=0
            )
        text = hf_gguf_tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        for stop in ("\n", "."):
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text, question
        correct += text.strip().lower() == answer.lower()
    assert 0 < correct < len(GEN_ITEMS)
    assert lm_eval_results["results"]["spqr_gen"]["exact_match,strip"] == pytest.approx(
        correct / len(GEN_ITEMS)
    )
