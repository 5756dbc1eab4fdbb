"""Shared fixtures: the real SmolLM2 model from ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GGUF = DATA / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_TEST = DATA / "wiki-test.txt"
WIKI_CALIB = DATA / "wiki-calib.txt"


def require_data() -> None:
    if not GGUF.exists():
        pytest.skip(f"real model not found at {GGUF} (the shared data folder is absent)")


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    require_data()
    return GGUF


@pytest.fixture(scope="session")
def real_source(gguf_path):
    from spqr_run.loading import open_model

    return open_model(gguf_path)


@pytest.fixture(scope="session")
def real_model(real_source):
    from spqr_run.loading import build_decoder

    return build_decoder(real_source)


@pytest.fixture(scope="session")
def hf_gguf_model(gguf_path):
    """transformers' own GGUF loading of the same file, fp32: the peer reference."""
    transformers = pytest.importorskip("transformers")
    import torch

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def server():
    """The shared main server (`test_server_support.main_server`: 4 slots, API key) for the OpenAI API tests."""
    from test_server_support import main_server

    return main_server()


@pytest.fixture(scope="module")
def client(server):
    """An `openai.OpenAI` client of `server` (no retries, 120 s timeout)."""
    import openai
    from test_server_support import API_KEY

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny LLaMA Hugging Face folder (random weights, tokenizer trained on tests/test_quantize_model.py's
    corpus), written once per session."""
    from tests import test_quantize_model as tq
    from tests.tiny_configs import write_tiny_hf_llama

    return write_tiny_hf_llama(tmp_path_factory.mktemp("tiny-llama"), tq.CORPUS)


@pytest.fixture(scope="session")
def tiny_spqr_file(tiny_hf, tmp_path_factory):
    """`tiny_spqr_file(wbits)`: the `tiny_hf` LLaMA quantized with SpQR at `wbits` (outlier threshold 0.2) into
    a `.spqr` file, made once per session and width."""
    from spqr_run.quant import QuantConfig
    from tests import test_quantize_model as tq

    made: dict[int, Path] = {}

    def get(wbits: int) -> Path:
        if wbits not in made:
            out = tmp_path_factory.mktemp("spqr") / f"tiny-{wbits}bit.spqr"
            tq._quantize(tiny_hf, out, qcfg=QuantConfig(method="spqr", wbits=wbits, outlier_threshold=0.2))
            made[wbits] = out
        return made[wbits]

    return get


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test (tiny ops on a busy shared CPU: a second thread costs
    milliseconds an op); restored after. Modules take it with `pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
