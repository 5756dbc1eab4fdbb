"""Chat templates: the real SmolLM2 template against transformers, the fallbacks against their published
formats, and the sandbox against hostile templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from spqr_run.chat_template import ChatTemplate, chat_template_for
from spqr_run.errors import ConfigError, ModelFormatError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GGUF = DATA / "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello. <b>&</b>"},
    {"role": "user", "content": [{"type": "text", "text": "What is 2+2"}, {"type": "text", "text": "?"}]},
]
NO_SYSTEM = CONVERSATION[1:]


def plain(messages: list[dict]) -> list[dict]:
    """The same messages with list-of-parts content joined (what transformers is given)."""
    return [
        {
            **m,
            "content": m["content"]
            if isinstance(m["content"], str)
            else "".join(p["text"] for p in m["content"]),
        }
        for m in messages
    ]


@pytest.fixture(scope="module")
def hf_tok():
    if not GGUF.is_file():
        pytest.skip(f"real model data not found in {DATA}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(DATA), gguf_file=GGUF.name)


@pytest.mark.parametrize("messages", [CONVERSATION, NO_SYSTEM], ids=["system", "no_system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(
    hf_tok, messages: list[dict], add_generation_prompt: bool
) -> None:
    template = chat_template_for(
        hf_tok.chat_template, arch="llama", model_name="smollm2", vocab=hf_tok.get_vocab()
    )
    expected = hf_tok.apply_chat_template(
        plain(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected
    assert template.source == hf_tok.chat_template


def test_chatml_fallback() -> None:
    t = chat_template_for(None, arch="llama", model_name="m", vocab={"<|im_start|>", "<|im_end|>"})
    assert t.render(CONVERSATION) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\nHello. <b>&</b><|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_llama2_fallback() -> None:
    t = chat_template_for(None, arch="llama", model_name="m", vocab={"<s>", "</s>", "<unk>"})
    assert t.render(CONVERSATION) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there! [/INST] Hello. <b>&</b> </s>"
        "<s>[INST] What is 2+2? [/INST]"
    )
    assert t.render(NO_SYSTEM[:1]) == "<s>[INST] Hi there! [/INST]"
    with pytest.raises(ConfigError, match="alternating"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_llama3_fallback() -> None:
    vocab = {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    t = chat_template_for(None, arch="llama", model_name="m", vocab=vocab)
    assert t.render(CONVERSATION[:2]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_falcon_fallback() -> None:
    t = chat_template_for(None, arch="falcon", model_name="m", vocab={"<|endoftext|>"})
    assert t.render(CONVERSATION) == (
        "You are terse.\nUser: Hi there!\nFalcon: Hello. <b>&</b>\nUser: What is 2+2?\nFalcon:"
    )
    with pytest.raises(ConfigError, match="mamba"):
        chat_template_for(None, arch="mamba", model_name="m", vocab=set())


def test_template_features() -> None:
    source = (
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{{ m | tojson }}\n{% endfor %}{{ strftime_now('%Y') | length }} {{ bos_token }}{{ custom }}"
    )
    t = ChatTemplate(source, bos_token="<s>")
    out = t.render([{"role": "user", "content": "<a & 'b'>"}, {"role": "skip", "content": "x"}], custom="!")
    assert out == '{"role": "user", "content": "<a & \'b\'>"}\n4 <s>!'


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{% set x = messages.append(1) %}",
        "{{ 'x' * 100000000 }}",
        "{{ 'x' | center(1000000000) }}",
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endfor %}",
        "{% set xs = range(100000) | list %}{% for a in xs %}{% for b in xs %}{% endfor %}{% endfor %}",
    ],
)
def test_sandbox_rejects_hostile_templates(source: str) -> None:
    with pytest.raises((ConfigError, ModelFormatError)) as info:
        ChatTemplate(source, name="evil").render(NO_SYSTEM)
    assert "evil" in str(info.value) and "\n" not in str(info.value)


def test_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match="no tools allowed"):
        ChatTemplate("{{ raise_exception('no tools allowed') }}").render(NO_SYSTEM)
    with pytest.raises(ModelFormatError, match="syntax error"):
        ChatTemplate("{% for x in %}")
    with pytest.raises(ConfigError, match=r"messages\[0\]"):
        ChatTemplate(CHATML_SOURCE).render([{"content": "no role"}])
    with pytest.raises(ConfigError, match="content"):
        ChatTemplate(CHATML_SOURCE).render([{"role": "user", "content": [{"type": "image"}]}])


CHATML_SOURCE = "{% for m in messages %}{{ m.role }}{% endfor %}"
