"""One tokenizer wrapper over two backends: Hugging Face `tokenizers` and `sentencepiece`.

Sources:
- an HF folder: `tokenizer.json` (-> `tokenizers`) or `tokenizer.model` (-> `sentencepiece`), plus
  `tokenizer_config.json` / `special_tokens_map.json` / `chat_template.jinja` when present;
- GGUF metadata: `tokenizer.ggml.model` "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte
  fallback), both rebuilt in memory as a `tokenizers.Tokenizer`;
- the JSON dict stored in a `.spqr` header (`to_json_dict` / `from_json_dict`).

Conventions shared by both backends: BOS is added by `Tokenizer.encode`, never by a post-processor; with
`special=True` special-token strings (`<|im_start|>`, `<s>`) become their ids; a SentencePiece dummy-prefix
space is added only at the start of the text, not after a special token (transformers' `legacy=False`).
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from spqr_run.errors import ConfigError, ModelFormatError
from spqr_run.text import valid_text

FORMAT = "spqr-tokenizer/1"
# Tokens that end a chat turn; they join `eos_ids` when present in the vocab and flagged special.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>")
# GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPIECE_SPACE = "\u2581"  # "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece


def _gpt2_byte_of() -> dict[str, int]:
    """The inverse of GPT-2's `bytes_to_unicode` (Radford et al. 2019, `encoder.py`): byte-level BPE vocabularies
    spell byte b as itself when it is printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ'), else as chr(256 + n)
    for the n-th remaining byte in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


_GPT2_BYTE_OF = _gpt2_byte_of()
_GPT2_LATIN1 = {
    ord(ch): b for ch, b in _GPT2_BYTE_OF.items()
}  # str.translate: symbol -> the byte's code point

# Pre-tokenizer split regexes (llama.cpp `llama-vocab.cpp`, by `tokenizer.ggml.pre`).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_KINDS = {
    "default": "gpt2",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
    "falcon3": "llama3",
    "falcon": "falcon",
}


def _byte_level_pre_tokenizer(kind: str) -> pre_tokenizers.PreTokenizer:
    """The split that matches how a byte-level vocabulary's merges were learned."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 regex inside
    if kind == "gpt2":
        return gpt2
    if kind == "digits":  # every digit on its own, then GPT-2
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if kind == "llama3":
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    # falcon: punctuation runs, GPT-2, digit runs cut into threes
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Punctuation(behavior="contiguous"),
            gpt2,
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated"),
        ]
    )


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a normal piece into two known pieces,
    best-scored result first (SentencePiece merges the pair whose concatenation scores highest)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, piece in enumerate(tokens):
        if types[i] != _NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _set_proto_no_dummy_prefix(proto: bytes) -> bytes:
    """A copy of a SentencePiece ModelProto with `normalizer_spec.add_dummy_prefix = false`.

    Protobuf wire format: ModelProto field 3 is NormalizerSpec (length-delimited); inside it field 3 is
    `add_dummy_prefix` (varint). A scalar's last occurrence wins, so appending `0x18 0x00` overrides it.
    """

    def varint(buf: bytes, pos: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = buf[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    def put_varint(value: int) -> bytes:
        out = bytearray()
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
        return bytes(out)

    out, pos, patched = bytearray(), 0, False
    while pos < len(proto):
        start = pos
        tag, pos = varint(proto, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = varint(proto, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, body = varint(proto, pos)
            pos = body + size
            if tag >> 3 == 3:
                payload = proto[body:pos] + b"\x18\x00"
                out += put_varint(tag) + put_varint(len(payload)) + payload
                patched = True
                continue
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out += proto[start:pos]
    if not patched:
        out += b"\x1a\x02\x18\x00"
    return bytes(out)


class _HFBackend:
    """A `tokenizers.Tokenizer`; special tokens are its added tokens flagged `special`.

    `dummy_prefix` (GGUF "llama" vocabularies): a space is put before text that does not start with an added
    token, as SentencePiece does; done here because tokenizers' `Metaspace` skips it before a leading space.
    """

    name = "tokenizers"

    def __init__(self, tok: tokenizers.Tokenizer, *, dummy_prefix: bool = False) -> None:
        self.tok = tok
        self.dummy_prefix = dummy_prefix
        self._plain: tokenizers.Tokenizer | None = None  # copy that leaves special strings as text
        added = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._added_ids = frozenset(added)
        self.special_texts = {t.content: i for i, t in added.items() if t.special}
        self._starts = {
            True: tuple(t.content for t in added.values()),  # every added token is cut out
            False: tuple(t.content for t in added.values() if not t.special),
        }
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool, at_start: bool = True) -> list[int]:
        if self.dummy_prefix and at_start and text and not text.startswith(self._starts[special]):
            text = " " + text
        if special:
            return self.tok.encode(text, add_special_tokens=False).ids
        if self._plain is None:
            self._plain = tokenizers.Tokenizer.from_str(self.tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def piece(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    @functools.cached_property
    def _piece_kind(self) -> str:
        """How pieces spell bytes, from the decoder: "byte_level" (GPT-2 symbols), "sentencepiece" ("▁" for
        a space, `<0xNN>` byte pieces) or "other" (a token's bytes are then those of its decoded text)."""
        decoder = json.loads(self.tok.to_str()).get("decoder") or {}
        steps = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else [decoder]
        types = {step.get("type") for step in steps if isinstance(step, dict)}
        if "ByteLevel" in types:
            return "byte_level"
        if types & {"ByteFallback", "Metaspace"} or any(
            step.get("type") == "Replace" and step.get("pattern", {}).get("String") == _SPIECE_SPACE
            for step in steps
        ):
            return "sentencepiece"
        return "other"

    def is_byte_piece(self, token_id: int) -> bool:
        piece = self.tok.id_to_token(token_id)
        return (
            self._piece_kind == "sentencepiece" and piece is not None and bool(_BYTE_PIECE.fullmatch(piece))
        )

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode()
        if self._piece_kind == "byte_level":
            try:
                return piece.translate(_GPT2_LATIN1).encode("latin-1")
            except UnicodeEncodeError:  # not spelled in the byte alphabet
                return piece.encode()
        if self._piece_kind == "sentencepiece":
            byte = _BYTE_PIECE.fullmatch(piece)
            return bytes([int(byte.group(1), 16)]) if byte else piece.replace(_SPIECE_SPACE, " ").encode()
        return self.tok.decode([token_id], skip_special_tokens=False).encode()

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def to_json(self) -> dict[str, Any]:
        return {"tokenizer_json": json.loads(self.tok.to_str()), "dummy_prefix": self.dummy_prefix}


class _SPBackend:
    """A SentencePiece model plus optional added tokens beyond its vocabulary (HF `added_tokens_decoder`)."""

    name = "sentencepiece"

    def __init__(self, proto: bytes, added: dict[int, str]) -> None:
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        n = self.sp.get_piece_size()
        self.pieces = [self.sp.id_to_piece(i) for i in range(n)]
        self.added = {i: t for i, t in added.items() if i >= n}
        specials = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special_ids = frozenset(specials | set(self.added))
        self.vocab_size = max([n - 1, *self.added]) + 1
        self._by_text = {self.pieces[i]: i for i in specials} | {t: i for i, t in self.added.items()}
        alternatives = sorted(self._by_text, key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        first = self.sp.encode("x", out_type=str)
        self.dummy_prefix = bool(first) and first[0].startswith(_SPIECE_SPACE)
        self._mid: spm.SentencePieceProcessor | None = None  # the same model without the dummy prefix

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        if at_start or not self.dummy_prefix:
            return self.sp.encode(text)
        if self._mid is None:
            self._mid = spm.SentencePieceProcessor(model_proto=_set_proto_no_dummy_prefix(self.proto))
        return self._mid.encode(text)

    def encode(self, text: str, special: bool, at_start: bool = True) -> list[int]:
        if not special or self._split is None:
            return self._encode_text(text, at_start)
        ids: list[int] = []
        pos = 0
        for m in self._split.finditer(text):
            if m.start() > pos:
                ids += self._encode_text(text[pos : m.start()], at_start and pos == 0)
            ids.append(self._by_text[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._encode_text(text[pos:], at_start and pos == 0)
        return ids

    @property
    def special_texts(self) -> dict[str, int]:
        return self._by_text

    def is_byte_piece(self, token_id: int) -> bool:
        return token_id < len(self.pieces) and self.sp.is_byte(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_ids:
            return (self.added.get(token_id) or self.pieces[token_id]).encode()
        if token_id >= len(self.pieces):
            return b""
        if self.sp.is_byte(token_id):
            return bytes([int(self.pieces[token_id][3:5], 16)])  # "<0xNN>"
        return self.pieces[token_id].replace(_SPIECE_SPACE, " ").encode()

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        out = bytearray()
        for i in ids:
            if i in self.special_ids:
                if not skip_special:
                    out += (self.added.get(i) or self.pieces[i]).encode()
            elif self.sp.is_byte(i):
                out.append(int(self.pieces[i][3:5], 16))  # "<0xNN>"
            else:
                out += self.pieces[i].replace(_SPIECE_SPACE, " ").encode()
        if self.dummy_prefix and out[:1] == b" ":
            del out[:1]
        return out.decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> str | None:
        return self.added.get(token_id) or (self.pieces[token_id] if token_id < len(self.pieces) else None)

    def piece_to_id(self, piece: str) -> int | None:
        if piece in self._by_text:
            return self._by_text[piece]
        i = self.sp.piece_to_id(piece)
        return None if self.sp.is_unknown(i) and piece != self.pieces[i] else i

    def to_json(self) -> dict[str, Any]:
        added = {str(i): t for i, t in self.added.items()}
        return {"sentencepiece_model": base64.b64encode(self.proto).decode("ascii"), "added_tokens": added}


_Backend = _HFBackend | _SPBackend


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens, BOS policy and chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        add_bos: bool = False,
        extra_eos_ids: Sequence[int] = (),
        chat_template: str | None = None,
        source: str = "tokenizer",
    ) -> None:
        self._backend = backend
        self.source = source
        self.vocab_size: int = backend.vocab_size
        for name, value in (
            ("bos", bos_id),
            ("eos", eos_id),
            ("pad", pad_id),
            *(("eos", e) for e in extra_eos_ids),
        ):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ModelFormatError(f"{source}: {name} token id {value} is outside the vocabulary")
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = bool(add_bos and bos_id is not None)
        self.chat_template = chat_template
        eos = {eos_id, *extra_eos_ids} - {None}
        for name in END_OF_TURN:
            i = backend.piece_to_id(name)
            if i is not None and i in backend.special_ids:
                eos.add(i)
        self.eos_ids: frozenset[int] = frozenset(eos)  # type: ignore[arg-type]
        self._extra_eos = tuple(extra_eos_ids)

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_hf_folder(cls, folder: Path) -> Tokenizer:
        """Load `tokenizer.json` (preferred) or `tokenizer.model` plus the config files beside it."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        if (folder / "tokenizer.json").is_file():
            try:
                backend: _Backend = _HFBackend(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
            except Exception as e:
                raise ModelFormatError(f"{folder / 'tokenizer.json'}: not a valid tokenizer ({e})") from None
        elif (folder / "tokenizer.model").is_file():
            added = config.get("added_tokens_decoder") or {}
            extra = {int(k): v["content"] for k, v in added.items() if isinstance(v, dict) and "content" in v}
            try:
                backend = _SPBackend((folder / "tokenizer.model").read_bytes(), extra)
            except (RuntimeError, OSError, ValueError) as e:
                raise ModelFormatError(
                    f"{folder / 'tokenizer.model'}: not a SentencePiece model ({e})"
                ) from None
        else:
            raise ModelFormatError(f"{folder}: no tokenizer.json or tokenizer.model")

        def token_id(field: str) -> int | None:
            value = config.get(field, special_map.get(field))
            if value is None and isinstance(backend, _SPBackend):  # the model's own ids (-1: none)
                own = {"bos_token": backend.sp.bos_id(), "eos_token": backend.sp.eos_id(), "pad_token": -1}
                return own[field] if own[field] >= 0 else None
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            i = backend.piece_to_id(value) if isinstance(value, str) else None
            if i is None:
                raise ModelFormatError(
                    f"{folder / 'tokenizer_config.json'}: {field} {value!r} is not in the vocab"
                )
            return i

        bos_id = token_id("bos_token")
        if isinstance(config.get("add_bos_token"), bool):
            add_bos = config["add_bos_token"]
        elif isinstance(backend, _HFBackend):  # does the post-processor add it?
            add_bos = bos_id is not None and backend.tok.encode("", add_special_tokens=True).ids[:1] == [
                bos_id
            ]
        else:
            add_bos = True  # LLaMA's SentencePiece convention
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=token_id("eos_token"),
            pad_id=token_id("pad_token"),
            add_bos=add_bos,
            chat_template=_folder_chat_template(folder, config),
            source=str(folder),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], *, source: str = "gguf") -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes from its `tokenizer.*` metadata."""

        def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
            value = meta.get(key, default)
            if value is not default and not isinstance(value, kind):
                raise ModelFormatError(f"{source}: {key} has type {type(value).__name__}")
            return value

        kind = get("tokenizer.ggml.model", str)
        tokens = list(get("tokenizer.ggml.tokens", (list, tuple), ()))
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise ModelFormatError(f"{source}: tokenizer.ggml.tokens is missing or not a list of strings")
        types = list(get("tokenizer.ggml.token_type", (list, tuple), [_NORMAL] * len(tokens)))
        if len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
            raise ModelFormatError(
                f"{source}: tokenizer.ggml.token_type has {len(types)} entries, not {len(tokens)}"
            )
        vocab = {t: i for i, t in enumerate(tokens)}
        try:
            if kind == "gpt2":
                tok = _gguf_byte_level(meta, tokens, vocab, source)
                add_bos_default = False
            elif kind == "llama":
                tok = _gguf_sentencepiece(meta, tokens, types, vocab, source)
                add_bos_default = True  # llama.cpp and transformers, for files without the flag
            else:
                raise ModelFormatError(
                    f"{source}: unsupported tokenizer.ggml.model {kind!r} (supported: gpt2, llama)"
                )
        except ModelFormatError:
            raise
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ModelFormatError(
                f"{source}: cannot build the tokenizer from tokenizer.ggml.* ({e})"
            ) from None
        control = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t == _CONTROL
        ]
        user = [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == _USER_DEFINED
        ]
        tok.add_special_tokens(control)
        tok.add_tokens(user)

        def opt_id(key: str) -> int | None:
            value = get(key, int)
            return (
                value if value is None or 0 <= value < len(tokens) else None
            )  # out of range: llama.cpp ignores

        extra_eos = [
            i for i in (opt_id("tokenizer.ggml.eot_token_id"), opt_id("tokenizer.ggml.eom_token_id")) if i
        ]
        return cls(
            _HFBackend(tok, dummy_prefix=kind == "llama" and _dummy_prefix(meta)),
            bos_id=opt_id("tokenizer.ggml.bos_token_id"),
            eos_id=opt_id("tokenizer.ggml.eos_token_id"),
            pad_id=opt_id("tokenizer.ggml.padding_token_id"),
            add_bos=get("tokenizer.ggml.add_bos_token", bool, add_bos_default),
            extra_eos_ids=extra_eos,
            chat_template=get("tokenizer.chat_template", str),
            source=source,
        )

    def to_json_dict(self) -> dict[str, Any]:
        """A self-contained, JSON-serializable description (stored in the `.spqr` header)."""
        return {
            "format": FORMAT,
            "backend": self._backend.name,
            **self._backend.to_json(),
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "extra_eos_ids": list(self._extra_eos),
            "pad_id": self.pad_id,
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], *, source: str) -> Tokenizer:
        """Inverse of `to_json_dict`; validates every field (the dict comes from an untrusted file)."""
        where = f"{source}: tokenizer"
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ModelFormatError(f"{where}: not a {FORMAT} dict")

        def field(key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
            value = d.get(key)
            if (value is None and not optional) or (value is not None and not isinstance(value, kind)):
                raise ModelFormatError(f"{where}.{key}: missing or of type {type(value).__name__}")
            if isinstance(value, bool) and kind is int:
                raise ModelFormatError(f"{where}.{key}: expected an integer")
            return value

        backend_name = field("backend", str)
        try:
            if backend_name == "tokenizers":
                blob = json.dumps(field("tokenizer_json", dict))
                prefix = field("dummy_prefix", bool)
                backend: _Backend = _HFBackend(tokenizers.Tokenizer.from_str(blob), dummy_prefix=prefix)
            elif backend_name == "sentencepiece":
                proto = base64.b64decode(field("sentencepiece_model", str), validate=True)
                added = field("added_tokens", dict)
                backend = _SPBackend(proto, {int(k): str(v) for k, v in added.items()})
            else:
                raise ModelFormatError(f"{where}.backend: unknown backend {backend_name!r}")
        except ModelFormatError:
            raise
        except Exception as e:  # binascii.Error, RuntimeError from sentencepiece, Exception from tokenizers
            raise ModelFormatError(f"{where}: corrupt {backend_name} data ({e})") from None
        extra = field("extra_eos_ids", list)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in extra):
            raise ModelFormatError(f"{where}.extra_eos_ids: expected a list of integers")
        return cls(
            backend,
            bos_id=field("bos_id", int, optional=True),
            eos_id=field("eos_id", int, optional=True),
            pad_id=field("pad_id", int, optional=True),
            add_bos=field("add_bos", bool),
            extra_eos_ids=extra,
            chat_template=field("chat_template", str, optional=True),
            source=source,
        )

    # ---- use ----------------------------------------------------------------------------------------------
    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self._backend.piece(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self._backend.piece(self.eos_id)

    def encode(
        self,
        text: str,
        *,
        add_bos: bool | None = None,
        special: bool = True,
        literal: Sequence[tuple[int, int]] = (),
    ) -> list[int]:
        """Token ids of `text`.

        `add_bos=None` follows the tokenizer's default (never doubling a BOS already in the text);
        `special=True` turns special-token strings into their ids, `False` keeps them as plain text;
        `literal`: character ranges [start, end) of `text` where special-token strings stay plain text even
        with `special=True` (chat message content inside a rendered template: see `chat_template.encode_chat`).
        """
        if not isinstance(text, str):
            raise ConfigError(f"tokenizer: text to encode must be a string, not {type(text).__name__}")
        text = valid_text(text)[0]  # lone surrogates -> U+FFFD, 1:1 (`spqr_run.text`); entries warn first
        ids = (
            self._encode_markup(text, literal) if special and literal else self._backend.encode(text, special)
        )
        use_bos = self.add_bos if add_bos is None else add_bos
        if use_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; `skip_special` drops special tokens (BOS, <|im_end|>, ...)."""
        ids = list(ids)
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
        if bad:
            raise ConfigError(
                f"tokenizer: token id {bad[0]!r} is outside the vocabulary (size {self.vocab_size})"
            )
        return self._backend.decode(ids, skip_special)

    def _encode_markup(self, text: str, literal: Sequence[tuple[int, int]]) -> list[int]:
        """`text` with special-token strings as their ids, except those overlapping a `literal` range: the
        text between the kept ones is encoded as plain text, as the backend does between special tokens."""
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text) if self._special_re else ():
            if any(start < m.end() and m.start() < end for start, end in literal):
                continue
            if m.start() > pos:
                ids += self._backend.encode(text[pos : m.start()], False, at_start=pos == 0)
            ids.append(self._backend.special_texts[m.group()])
            pos = m.end()
        if pos < len(text) or not text:
            ids += self._backend.encode(text[pos:], False, at_start=pos == 0)
        return ids

    @functools.cached_property
    def _special_re(self) -> re.Pattern[str] | None:
        """Every special-token string, longest first (so the leftmost-longest one matches, as tokenizers' and
        our SentencePiece splitting do)."""
        texts = sorted(self._backend.special_texts, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts))) if texts else None

    @property
    def special_texts(self) -> frozenset[str]:
        """The strings that `encode(special=True)` turns into special tokens (`<|im_start|>`, `<s>`, ...)."""
        return frozenset(self._backend.special_texts)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._backend.special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for in UTF-8 text: for a token holding part of a character, that
        part (joining the bytes of a sequence's tokens rebuilds its text); a SentencePiece "▁" is a space
        (kept at the start too); a special token gives its own string. b"" for an id without a piece."""
        return self._backend.token_bytes(token_id)

    def token_string(self, token_id: int) -> str:
        """A display string of one token, distinct for distinct tokens (logprobs keys and `token` fields):
        its text when its bytes are valid UTF-8 (and no other token has it); else `bytes:` and each byte as
        `\\xNN` (OpenAI's form for parts of characters, e.g. "bytes:\\xf0\\x9f"; a byte piece `<0x41>` beside the
        piece "A" is "bytes:\\x41"); else `token_id:N`. Ordinary and special tokens take their text first."""
        return self._token_strings[token_id]

    @functools.cached_property
    def _token_strings(self) -> list[str]:
        strings = [""] * self.vocab_size
        taken: set[str] = set()
        # ordinary and special tokens choose first, so "A" is the piece "A", not the byte piece <0x41>
        order = sorted(range(self.vocab_size), key=self._backend.is_byte_piece)
        for i in order:
            raw = self.token_bytes(i)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = ""
            if not text and raw or text.startswith(("bytes:", "token_id:")) or text in taken:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
                if text in taken:
                    text = f"token_id:{i}"
            strings[i] = text
            taken.add(strings[i])
        return strings

    def token_text(self, token_id: int) -> str:
        """One token as display text, keeping a SentencePiece leading space (for logprobs)."""
        text = self.decode([token_id])
        piece = self._backend.piece(token_id) or ""
        if piece.startswith(_SPIECE_SPACE) and not text.startswith(" "):
            text = " " + text
        return text

    @functools.cached_property
    def byte_run_ids(self) -> frozenset[int]:
        """The byte-fallback tokens `<0xNN>` whose runs decode as one: tokenizers' ByteFallback decoder turns a
        whole run into one U+FFFD per byte when any byte of it is invalid ("é" then a stray continuation byte
        gives three U+FFFD, not "é\ufffd"). Empty when there are none or they decode like UTF-8 bytes."""
        found = (self._backend.piece_to_id(f"<0x{b:02X}>") for b in range(256))
        ids = [i for i in found if i is not None]
        if len(ids) < 256:  # none (byte-level BPE) or a partial set that cannot be checked: assume runs
            return frozenset(ids)
        probe = [ids[0xC3], ids[0xA9], ids[0x80]]  # all 256 present, so `ids` is indexed by byte
        if self.decode(probe) == self.decode(probe[:2]) + self.decode(probe[2:]):
            return frozenset()
        return frozenset(ids)

    def vocab_strings(self) -> frozenset[str]:
        """Every token string (pieces as stored, added tokens as written); for chat-template fallbacks."""
        pieces = (self._backend.piece(i) for i in range(self.vocab_size))
        return frozenset(p for p in pieces if p is not None)


# ---- GGUF builders (in-memory `tokenizers.Tokenizer`) -----------------------------------------------------
def _gguf_byte_level(
    meta: dict[str, Any], tokens: list[str], vocab: dict[str, int], source: str
) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE: tokens are already spelled in the byte alphabet; merges are "a b"."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    kind = _PRE_KINDS.get(pre) if isinstance(pre, str) else None
    if kind is None:
        raise ModelFormatError(
            f"{source}: unsupported tokenizer.ggml.pre {pre!r} (supported: {sorted(_PRE_KINDS)})"
        )
    raw = meta.get("tokenizer.ggml.merges")
    if not isinstance(raw, (list, tuple)):
        raise ModelFormatError(
            f"{source}: tokenizer.ggml.merges is missing (needed for tokenizer.ggml.model gpt2)"
        )
    merges = [tuple(m.split(" ")) if isinstance(m, str) else () for m in raw]
    if any(len(m) != 2 for m in merges):
        raise ModelFormatError(f"{source}: tokenizer.ggml.merges has an entry that is not 'left right'")
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=kind == "llama3")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = _byte_level_pre_tokenizer(kind)
    tok.decoder = decoders.ByteLevel()
    return tok


def _dummy_prefix(meta: dict[str, Any]) -> bool:
    return meta.get("tokenizer.ggml.add_space_prefix", True) is not False


def _gguf_sentencepiece(
    meta: dict[str, Any], tokens: list[str], types: list[int], vocab: dict[str, int], source: str
) -> tokenizers.Tokenizer:
    """LLaMA SentencePiece BPE: merges recovered from scores, byte fallback, "▁" for spaces."""
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, (list, tuple)) or len(scores) != len(tokens):
        raise ModelFormatError(f"{source}: tokenizer.ggml.scores is missing or not one score per token")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    merges = _merges_from_scores(tokens, [float(s) for s in scores], types)
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", _SPIECE_SPACE)  # the dummy prefix is added by _HFBackend
    prefix = _dummy_prefix(meta)
    steps = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


# ---- HF folder helpers ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return value


def _folder_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """`chat_template.jinja`, else `chat_template.json`, else `tokenizer_config.json`'s `chat_template`
    (a string, or a list of {"name", "template"} of which "default" is taken)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ModelFormatError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string")
    return template


class IncrementalDetokenizer:
    """Streaming text from token ids: `push(id)` -> new text (possibly ""), `flush()` -> the rest.

    Every piece is final: for ordinary tokens the pieces joined are exactly `tokenizer.decode(ids)`, the
    U+FFFD of invalid UTF-8 included, and no piece ends in a character that a later token could complete.

    A short window `ids[start:]` is decoded; `emitted` characters of its text are already sent, and what
    follows them is sent except what a later token could still change:
    - a trailing U+FFFD: the bytes of a character may still be arriving (UTF-8 decoding replaces each
      maximal invalid subpart, so only the last replacement can change);
    - the text of a trailing run of byte-fallback tokens `<0xNN>`: tokenizers' ByteFallback decoder turns
      a whole run into one U+FFFD per byte when any byte of it is invalid, so a run is only final once a
      token ends it.
    The window then moves up to a cut where the decode splits for good: after its last token when nothing
    is held back, else before its last token when decoding the two halves gives the same text (for UTF-8
    that means the bytes before the cut do not continue into the last token). The token before the cut
    stays in the window as context, so the two decodes start at the same token and a SentencePiece
    leading-space strip cancels out. A window only grows while a character or a byte-fallback run spans
    its tokens. A special token flushes pending text, emits its own text unless `skip_special`, and starts
    the next window.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, prompt_ids: Sequence[int] = (), skip_special: bool = True
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._seen_text = not skip_special or any(not tokenizer.is_special(i) for i in prompt_ids)
        # at the very start (nothing but skipped specials) the first real token is decoded as a start
        self._ids: list[int] = list(prompt_ids)[-4:] if self._seen_text else []
        self._start = 0  # window start in `_ids`
        self._emitted = len(self._decode(0, len(self._ids)))  # characters of the window's text already sent
        self._runs = tokenizer.byte_run_ids

    def _decode(self, lo: int, hi: int) -> str:
        return self._tok.decode(self._ids[lo:hi], skip_special=False)

    def _final_length(self, text: str) -> int:
        """How many characters of the window's `text` no later token can change."""
        run = len(self._ids)
        while run > self._start and self._ids[run - 1] in self._runs:
            run -= 1
        if run < len(self._ids):
            return len(self._decode(self._start, run))
        return len(text) - 1 if text.endswith("\ufffd") else len(text)

    def _move_window(self, text: str, final: int) -> None:
        ids, n = self._ids, len(self._ids)
        if final == len(text) == self._emitted and n and ids[-1] not in self._runs:
            self._start = n - 1  # nothing held back: cut after the last token
            self._emitted = len(self._decode(n - 1, n))
        elif n - 2 > self._start and not (ids[-2] in self._runs and ids[-1] in self._runs):
            head = self._decode(self._start, n - 1)
            context, pair = self._decode(n - 2, n - 1), self._decode(n - 2, n)
            if (
                len(head) > self._emitted
                or not pair.startswith(context)
                or text != head + pair[len(context) :]
            ):
                return  # the bytes before the last token continue into it
            self._start = n - 2
            self._emitted = len(context) + self._emitted - len(head)
        if self._start > 64:  # keep the list short
            del self._ids[: self._start]
            self._start = 0

    def _advance(self, force: bool) -> str:
        text = self._decode(self._start, len(self._ids))
        final = len(text) if force else self._final_length(text)
        out = text[self._emitted : final]
        self._emitted = max(self._emitted, final)
        self._move_window(text, final)
        return out

    def push(self, token_id: int) -> str:
        """Add one token; return the text it makes final ("" while a character is incomplete)."""
        if not self._tok.is_special(token_id):
            self._ids.append(token_id)
            self._seen_text = True
            return self._advance(force=False)
        text = self._advance(force=True)
        if self._skip and not self._seen_text:
            return text  # nothing before it: the next token still starts the text
        self._ids.append(token_id)
        self._start = len(self._ids) - 1
        special_text = self._decode(self._start, len(self._ids))
        self._emitted = len(special_text)
        return text if self._skip else text + special_text

    def flush(self) -> str:
        """Everything not yet emitted (an incomplete character becomes U+FFFD)."""
        return self._advance(force=True)
