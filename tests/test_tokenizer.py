"""Tokenizer checks against peers no one here wrote: transformers (GGUF and saved HF folders) and
sentencepiece itself (a tiny model trained in the test)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spqr_run.errors import ModelFormatError
from spqr_run.tokenizer import IncrementalDetokenizer, Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GGUF = DATA / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = DATA / "wiki-test.txt"
needs_data = pytest.mark.skipif(not GGUF.is_file(), reason=f"real model data not found in {DATA}")

ODD = [
    "héllo wörld, naïve café",
    "日本語のテキスト、中文字符 and 한국어",
    "emoji 🎉👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "1234567890 3.14159 1,000,000 2024-01-31",
    "tabs\t\tand\n\n\nnewlines   spaces    ",
    "  leading and trailing  ",
    "don't I'll we've THEY'RE",
    "Ω≈ç√∫ ﬁ ǅ \u00a0nbsp\u200bzwsp",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "",
]
# Fallback corpus when wiki-test.txt is absent (the SentencePiece tests do not need the real model): the
# project's own prose (~150 KB, enough distinct words for a 1000-piece BPE; one repeated sentence is not),
# without the special-token strings it quotes (text here is compared with SentencePiece's, which never
# matches them), and a line of non-ASCII text.
_REPO = Path(__file__).resolve().parents[1]
FALLBACK_TEXT = re.sub(
    r"<\|[a-z_]+\|>|</?s>",
    "",
    "\n".join(
        (_REPO / n).read_text(encoding="utf-8") for n in ("README.md", "BENCHMARKS.md", "docs/FORMAT.md")
    ),
) + ("The quick brown fox jumps over the lazy dog. 1234 5678 café naïve 世界 🎉\n" * 40)


@pytest.fixture(scope="module")
def wiki() -> str:
    return WIKI.read_text(encoding="utf-8") if WIKI.is_file() else FALLBACK_TEXT


@pytest.fixture(scope="module")
def gguf_tok() -> Tokenizer:
    if not GGUF.is_file():
        pytest.skip(f"real model data not found in {DATA}")
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(GGUF)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return Tokenizer.from_gguf_metadata(meta, source=str(GGUF))


@pytest.fixture(scope="module")
def hf_tok():
    if not GGUF.is_file():
        pytest.skip(f"real model data not found in {DATA}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(DATA), gguf_file=GGUF.name)


# ---- GGUF byte-level BPE (SmolLM2) vs transformers --------------------------------------------------------
@needs_data
def test_gguf_ids_match_transformers(gguf_tok: Tokenizer, hf_tok, wiki: str) -> None:
    texts = [wiki[:20000], *wiki[20000:40000].split("\n"), *ODD]
    for text in texts:
        ours = gguf_tok.encode(text, add_bos=False)
        assert ours == hf_tok(text, add_special_tokens=False).input_ids, text[:80]
        assert gguf_tok.decode(ours) == text


@needs_data
def test_gguf_special_tokens(gguf_tok: Tokenizer, hf_tok) -> None:
    text = "<|im_start|>user\nhi<|im_end|>"
    assert gguf_tok.encode(text)[0] == 1 and 2 in gguf_tok.encode(text)
    plain = gguf_tok.encode(text, special=False)
    assert 1 not in plain and 2 not in plain
    assert plain == hf_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert gguf_tok.decode(plain) == text
    assert gguf_tok.decode(gguf_tok.encode(text), skip_special=True) == "user\nhi"
    assert (gguf_tok.bos_token, gguf_tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert gguf_tok.eos_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert gguf_tok.is_special(1) and not gguf_tok.is_special(19556)
    assert gguf_tok.encode("Hello") == [19556]  # tokenizer.ggml.add_bos_token is false
    assert gguf_tok.encode("Hello", add_bos=True) == [1, 19556]
    assert gguf_tok.token_text(gguf_tok.encode(" world")[0]) == " world"
    assert gguf_tok.chat_template and "<|im_start|>" in gguf_tok.chat_template


@needs_data
def test_hf_folder_tokenizers_backend(hf_tok, gguf_tok: Tokenizer, wiki: str, tmp_path: Path) -> None:
    hf_tok.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_folder(tmp_path)
    for text in [wiki[:20000], *ODD]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, gguf_tok.eos_ids)
    assert tok.chat_template == gguf_tok.chat_template


@needs_data
def test_json_round_trip_tokenizers(gguf_tok: Tokenizer, wiki: str) -> None:
    d = json.loads(json.dumps(gguf_tok.to_json_dict()))
    again = Tokenizer.from_json_dict(d, source="x.spqr")
    text = wiki[:5000] + ODD[2] + ODD[8]
    assert again.encode(text) == gguf_tok.encode(text)
    assert (again.eos_ids, again.bos_id, again.chat_template) == (gguf_tok.eos_ids, 1, gguf_tok.chat_template)


def test_gguf_unsupported_fields() -> None:
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata(meta)
    meta = {
        **meta,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen9",
        "tokenizer.ggml.merges": [],
    }
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.pre"):
        Tokenizer.from_gguf_metadata(meta)
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ModelFormatError, match="no tokenizer.json"):
        Tokenizer.from_hf_folder(Path("/nonexistent-folder"))


# ---- SentencePiece: a tiny real model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory: pytest.TempPathFactory, wiki: str) -> Path:
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sp")
    (folder / "corpus.txt").write_text(wiki[:300000], encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.999,  # rare characters (CJK, emoji) go to <0x..> byte pieces
        normalization_rule_name="identity",  # LLaMA's settings
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        control_symbols=["<|im_start|>", "<|im_end|>"],
        minloglevel=2,
    )
    return folder


@pytest.fixture(scope="module")
def sp(sp_folder: Path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def sp_tok(sp_folder: Path) -> Tokenizer:
    return Tokenizer.from_hf_folder(sp_folder)


def llama_gguf_meta(sp) -> dict:
    """What a LLaMA-2 GGUF file stores for this model (llama.cpp `convert_hf_to_gguf.py` layout)."""
    n = sp.get_piece_size()

    def token_type(i: int) -> int:
        return 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1

    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }


def sp_texts(wiki: str) -> list[str]:
    return [wiki[:20000], *wiki[20000:60000].split("\n"), *[t for t in ODD if "<|" not in t], " x", "  x"]


@pytest.mark.parametrize("source", ["hf_folder", "gguf_llama"])
def test_sentencepiece_ids_match(source: str, sp_folder: Path, sp, wiki: str) -> None:
    if source == "hf_folder":
        tok = Tokenizer.from_hf_folder(sp_folder)
    else:
        tok = Tokenizer.from_gguf_metadata(llama_gguf_meta(sp))
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_ids == {2, sp.piece_to_id("<|im_end|>")}
    for text in sp_texts(wiki):
        ids = sp.encode(text)
        assert tok.encode(text, add_bos=False) == ids, text[:80]
        assert tok.decode(ids) == sp.decode(ids)
    assert tok.encode("hi")[0] == 1 and tok.encode("<s>hi").count(1) == 1  # no double BOS


def test_sentencepiece_backends_agree_on_specials(sp_folder: Path, sp) -> None:
    """After a special token no dummy-prefix space is added, the same on both backends."""
    folder_tok = Tokenizer.from_hf_folder(sp_folder)
    gguf_tok = Tokenizer.from_gguf_metadata(llama_gguf_meta(sp))
    im_start, im_end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    for text in [
        "<|im_start|>user\nhello there<|im_end|>\n",
        "<s>[INST] hi [/INST]",
        "x<|im_end|> y",
        " <s>x",
    ]:
        ids = folder_tok.encode(text, add_bos=False)
        assert ids == gguf_tok.encode(text, add_bos=False), text
        assert folder_tok.decode(ids) == gguf_tok.decode(ids) == text
    ids = folder_tok.encode("<|im_start|>user", add_bos=False)
    assert ids[0] == im_start and not sp.id_to_piece(ids[1]).startswith("\u2581")
    assert im_end not in folder_tok.encode("<|im_end|>", special=False)


@pytest.mark.parametrize("source", ["hf_folder", "gguf_llama"])
def test_sentencepiece_json_round_trip(source: str, sp_folder: Path, sp, wiki: str) -> None:
    if source == "hf_folder":
        tok = Tokenizer.from_hf_folder(sp_folder)
    else:
        tok = Tokenizer.from_gguf_metadata(llama_gguf_meta(sp))
    again = Tokenizer.from_json_dict(json.loads(json.dumps(tok.to_json_dict())), source="m.spqr")
    for text in [wiki[:5000], *ODD]:
        assert again.encode(text) == tok.encode(text)


def test_corrupt_json_dict(sp_folder: Path) -> None:
    good = Tokenizer.from_hf_folder(sp_folder).to_json_dict()
    bad_dicts = [
        [],
        {**good, "format": "other/9"},
        {**good, "backend": "bpe-magic"},
        {**good, "sentencepiece_model": "!!not base64!!"},
        {**good, "sentencepiece_model": "AAAA" * 10},
        {**good, "bos_id": 10**9},
        {**good, "bos_id": "1"},
        {**good, "add_bos": None},
        {**good, "extra_eos_ids": ["x"]},
        {
            **good,
            "backend": "tokenizers",
            "tokenizer_json": {"model": {"type": "Nope"}},
            "dummy_prefix": False,
        },
    ]
    for d in bad_dicts:
        with pytest.raises(ModelFormatError, match="m.spqr"):
            Tokenizer.from_json_dict(copy.deepcopy(d), source="m.spqr")


# ---- incremental detokenization ---------------------------------------------------------------------------
def stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kw)
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_incremental_sentencepiece_spaces_and_bytes(sp_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(sp_folder)
    text = "Hello world, 世界 🎉 naïve  two spaces"
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special=True) == text
    assert any(p.startswith(" ") for p in pieces)  # SentencePiece leading spaces kept mid-text
    assert any("🎉" in p for p in pieces) and all("\ufffd" not in p for p in pieces)  # 4 byte tokens
    # after a prompt, the first generated word keeps its space
    prompt = tok.encode("Hello")
    gen = tok.encode("Hello world", add_bos=False)[len(tok.encode("Hello", add_bos=False)) :]
    assert "".join(stream(tok, gen, prompt_ids=prompt)) == " world"


def test_incremental_special_tokens(sp_folder: Path) -> None:
    tok = Tokenizer.from_hf_folder(sp_folder)
    ids = tok.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert "".join(stream(tok, ids)) == tok.decode(ids, skip_special=True) == "assistant\nHi there"
    full = "<s><|im_start|>assistant\nHi there<|im_end|>"
    assert "".join(stream(tok, ids, skip_special=False)) == tok.decode(ids) == full


def test_incremental_window_is_bounded(sp_folder: Path, wiki: str) -> None:
    """O(1) per token: every decode call sees a short window, never the whole sequence."""
    tok = Tokenizer.from_hf_folder(sp_folder)
    ids = tok.encode(wiki[:20000])
    sizes: list[int] = []
    decode = tok.decode
    tok.decode = lambda ids, **kw: (sizes.append(len(ids)), decode(ids, **kw))[1]  # type: ignore[method-assign]
    assert "".join(stream(tok, ids)) == decode(ids, skip_special=True)
    assert len(ids) > 1000 and max(sizes) <= 16


TEXTS = st.lists(
    st.one_of(
        st.text(max_size=6),
        st.sampled_from(["🎉", "👨\u200d👩\u200d👧", "世界", "é", " ", "  ", "\n", "日本語", "𝔘𝔫𝔦"]),
    ),
    max_size=12,
).map("".join)


@given(text=TEXTS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_incremental_property_sentencepiece(sp_tok: Tokenizer, text: str) -> None:
    tok = sp_tok
    ids = tok.encode(text, special=False)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special=True) == text.replace("\u2581", " ")
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)


@needs_data
@given(text=TEXTS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_incremental_property_byte_level(gguf_tok: Tokenizer, text: str) -> None:
    ids = gguf_tok.encode(text, special=False)
    pieces = stream(gguf_tok, ids)
    full = gguf_tok.decode(ids, skip_special=True)
    assert "".join(pieces) == full  # not always == text: bytes missing from the vocab are dropped
    if "\ufffd" not in full:
        assert all("\ufffd" not in p for p in pieces)


# ---- incremental detokenization of byte tokens in any order (invalid UTF-8 included) ----------------------
def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's `bytes_to_unicode`: the vocabulary symbol of each byte in a byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


class ByteTok(NamedTuple):
    tok: Tokenizer
    byte_ids: dict[int, int]  # byte -> id of its single-byte token (bytes missing from the vocab left out)
    partial_ids: list[int]  # ordinary tokens that alone are not valid UTF-8 (parts of a character)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece", "sentencepiece_gguf"])
def byte_tok(request: pytest.FixtureRequest) -> ByteTok:
    if request.param == "byte_level":
        tok = request.getfixturevalue("gguf_tok")
        ids = {b: tok._backend.piece_to_id(c) for b, c in gpt2_byte_chars().items()}
    else:
        sp = request.getfixturevalue("sp")
        tok = request.getfixturevalue("sp_tok")
        if request.param == "sentencepiece_gguf":  # tokenizers' ByteFallback decoder, not sentencepiece's
            tok = Tokenizer.from_gguf_metadata(llama_gguf_meta(sp))
        ids = {b: sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    byte_ids = {b: i for b, i in ids.items() if i is not None}
    singles = set(byte_ids.values())
    partial = [
        i
        for i in range(tok.vocab_size)
        if i not in singles and not tok.is_special(i) and "\ufffd" in tok.decode([i])
    ]
    return ByteTok(tok, byte_ids, partial)


WORDS = ["hello", " world", " the", "世界", "é", "🎉", " ", "\n", "x", ",", "日本"]
# ("byte", b): a single-byte token; ("partial", k): a token holding part of a character; ("any", k): any
# ordinary token; ("text", s): the tokens of s
BYTE_ITEM = st.one_of(
    st.tuples(st.just("byte"), st.integers(0x80, 0xFF)),  # continuation and lead bytes
    st.tuples(st.just("byte"), st.integers(0, 0xFF)),
    st.tuples(st.just("partial"), st.integers(0, 10**6)),
    st.tuples(st.just("partial"), st.integers(0, 10**6)),
    st.tuples(st.just("any"), st.integers(0, 10**6)),
    st.tuples(st.just("text"), st.sampled_from(WORDS)),
)
BYTE_MIX = st.integers(0, 40).flatmap(lambda n: st.lists(BYTE_ITEM, min_size=n, max_size=n))  # long ones too


def byte_mix_ids(bt: ByteTok, items: list[tuple[str, int | str]]) -> list[int]:
    ids: list[int] = []
    for kind, value in items:
        if kind == "text":
            ids += bt.tok.encode(str(value), add_bos=False, special=False)
        elif kind == "byte" and value in bt.byte_ids:
            ids.append(bt.byte_ids[int(value)])
        elif kind == "partial" and bt.partial_ids:
            ids.append(bt.partial_ids[int(value) % len(bt.partial_ids)])
        elif kind == "any" and not bt.tok.is_special(int(value) % bt.tok.vocab_size):
            ids.append(int(value) % bt.tok.vocab_size)
    return ids


def assert_streams_like_decode(tok: Tokenizer, ids: list[int], prompt: list[int]) -> None:
    pieces = stream(tok, ids, prompt_ids=prompt)
    before = tok.decode(prompt, skip_special=True)
    full = tok.decode(prompt + ids, skip_special=True)
    assert full.startswith(before)
    assert "".join(pieces) == full[len(before) :], (ids, pieces)
    so_far = before
    for piece in pieces:  # every piece is final: never a U+FFFD that a later token turns into a character
        so_far += piece
        assert full.startswith(so_far), (ids, pieces)


@given(items=BYTE_MIX, with_prompt=st.booleans())
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_incremental_property_invalid_utf8(
    byte_tok: ByteTok, items: list[tuple[str, int | str]], with_prompt: bool
) -> None:
    """Any mix of byte tokens and ordinary tokens streams to exactly the one-shot decode (U+FFFD included)."""
    prompt = byte_tok.tok.encode("Hello") if with_prompt else []
    assert_streams_like_decode(byte_tok.tok, byte_mix_ids(byte_tok, items), prompt)


@pytest.mark.parametrize(
    "items",
    [
        [0xE4, 0xB8, 0xAD, 0x80],  # a character, then a stray continuation byte
        [0x80] * 9 + [0xE4, 0xB8, 0xAD],  # a long invalid run, then a character
        [0xE4, 0xB8] * 5 + [0xAD],  # truncated characters, the last one completed
        [0xF0, 0x9F, 0x8E, " world", 0xF0, 0x9F, 0x8E, 0x89],
        ["hello", 0xC3, " the", 0xA9, 0xC3, 0xA9],
    ],
)
def test_incremental_invalid_utf8_examples(byte_tok: ByteTok, items: list[int | str]) -> None:
    mix = [("text", i) if isinstance(i, str) else ("byte", i) for i in items]
    ids = byte_mix_ids(byte_tok, mix)
    assert len(ids) >= len(items)
    assert_streams_like_decode(byte_tok.tok, ids, [])
    assert_streams_like_decode(byte_tok.tok, ids, byte_tok.tok.encode("Hello"))


@needs_data
def test_incremental_invalid_utf8_byte_level_pieces(gguf_tok: Tokenizer) -> None:
    """Tokens that hold parts of characters (and a space), never forming one: once sent a space twice."""
    pieces = ["Ġyr", "ä»", "à´", "å¤", "ĠðŁ", "Â", "Ñ", "æ"]
    ids = [gguf_tok._backend.piece_to_id(p) for p in pieces]
    assert None not in ids
    assert_streams_like_decode(gguf_tok, ids, [])  # type: ignore[arg-type]
    assert gguf_tok.decode(ids) == " yr\ufffd\ufffd\ufffd \ufffd\ufffd\ufffd\ufffd"
