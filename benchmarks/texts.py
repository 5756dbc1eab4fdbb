"""Held-out texts for the quality tables that are not in the repository, fetched from a pinned registry package.

`wiki-test.txt` (`../shared/data`) is Wikipedia, the same domain as the calibration text. The second held-out
text is of another domain, 19th-century English fiction:

- **austen-persuasion**: Jane Austen, *Persuasion* (1818; public domain), the whole novel as shipped by the Debian
  package `r-cran-janeaustenr` version `1.0.0-1` (architecture all; the CRAN package janeaustenr 1.0.0 by Julia
  Silge, MIT license, texts from Project Gutenberg), file
  `usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`, object `persuasion` (a character vector of the book's
  8,328 hard-wrapped lines). 83,283 words, 104,306 tokens with SmolLM2-135M's tokenizer.

What `fetch_text` does, deterministically: `apt-get download r-cran-janeaustenr=1.0.0-1` into a temporary folder
(`apt-get update` first where the package lists lack it), reads the `.deb` (an `ar` archive holding
`data.tar.xz`) with the standard library, reads the object from R's lazy-load database (`Rdata.rdx`: a gzip'd
serialized index of offsets; `Rdata.rdb`: per object a 4-byte big-endian length and a zlib stream of R's XDR
serialization format, version 2 or 3, as written by R's `serialize`; only the types a character vector and the
index use are read), cleans it (`clean_lines`: one paragraph per line, like `wiki-test.txt`) and checks the
sha256 of the cleaned UTF-8 text before writing it to the cache
(`$SPQR_RUN_CACHE` or `~/.cache/spqr-run`, then `texts/austen-persuasion.txt`). Nothing is committed.

    python benchmarks/texts.py austen-persuasion          # prints the cached file's path
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DebText:
    """A character vector in an R data package shipped by Debian, pinned by package version and text hash."""

    package: str
    version: str
    member: str  # the lazy-load database inside the .deb, without its .rdb/.rdx suffix
    obj: str  # the R object's name in that database
    license: str
    sha256: str  # of the cleaned UTF-8 text
    description: str


TEXTS: dict[str, DebText] = {
    "austen-persuasion": DebText(
        package="r-cran-janeaustenr",
        version="1.0.0-1",
        member="usr/lib/R/site-library/janeaustenr/data/Rdata",
        obj="persuasion",
        license="novel public domain (1818); package MIT (Julia Silge; Debian packaging Andreas Tille)",
        sha256="f38b37ad6e7e3ea633c7c624530d80afd06aa54ee74450c2bdd5fd60239e52f1",
        description="Jane Austen, Persuasion (1818), 19th-century English fiction",
    ),
}


class TextError(RuntimeError):
    """A held-out text could not be fetched, read or verified; the message is one line for the user."""


def cache_dir() -> Path:
    """The folder texts are cached in: `$SPQR_RUN_CACHE/texts`, else `~/.cache/spqr-run/texts`."""
    root = os.environ.get("SPQR_RUN_CACHE") or Path.home() / ".cache" / "spqr-run"
    return Path(root) / "texts"


def clean_lines(lines: list[str | None]) -> str:
    """Join hard-wrapped lines into paragraphs: one paragraph per output line, like `wiki-test.txt`.

    Blank lines (or R's NA, given as None) end a paragraph; inside one, the lines' whitespace runs (double spaces
    after full stops, indentation) become single spaces. The result ends with one newline. Deterministic: the same
    lines always give the same text, so its sha256 pins it.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        words = (line or "").split()
        if words:
            current.extend(words)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return "\n".join(paragraphs) + "\n"


def verify_sha256(text: str, expected: str, name: str) -> None:
    """Raise TextError (one line naming the text and both hashes) unless sha256(text as UTF-8) == expected."""
    got = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if got != expected:
        raise TextError(
            f"{name}: sha256 of the cleaned text is {got}, expected {expected} "
            "(the package's content or the cleaner changed)"
        )


class _RReader:
    """A reader of R's XDR serialization format (`serialize(x, NULL)`, versions 2 and 3), for plain data.

    Reads the types a character vector, an integer/double/logical vector, a list and their attribute pairlists
    use; anything else (environments, closures, ALTREP) raises TextError. Vectors with attributes come back as
    `(value, {name: value})`.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[object] = []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: upper and lower 32 bits
            n = (self._int() << 32) + self._int()
        return n

    def read(self) -> object:
        """The serialized object: header, then one item."""
        if self.data[:2] != b"X\n":
            raise TextError(f"not R's XDR serialization format (starts with {self.data[:2]!r})")
        self.pos = 2
        version = self._int()
        self._int(), self._int()  # writer's and minimal reader's R versions
        if version == 3:
            n = self._int()  # native encoding name
            self.pos += n
        elif version != 2:
            raise TextError(f"R serialization version {version} is not supported")
        return self._item()

    def _item(self) -> object:  # noqa: PLR0911, PLR0912 - one branch per R type
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 252, 251, 242, 241):  # NULL, global/empty/base env, unbound, missing
            return None
        if kind == 255:  # reference to an earlier symbol
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == 1:  # symbol: its name follows as a CHARSXP
            name = self._item()
            self.refs.append(name)
            return name
        if kind in (2, 6):  # pairlist (attributes) or call
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            head = {tag: self._item()}
            rest = self._item()
            return head | rest if isinstance(rest, dict) else head
        if kind == 9:  # CHARSXP: length (-1 is NA), bytes; R writes UTF-8/ASCII/latin-1 per flags
            n = self._int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if flags & (1 << 2) else "utf-8")
        if kind in (10, 13):  # logical, integer
            n = self._length()
            value: object = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            n = self._length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # character vector, list, expression vector
            value = [self._item() for _ in range(self._length())]
        else:
            raise TextError(f"R object type {kind} is not supported by this reader")
        return (value, self._item()) if has_attr else value


def read_lazyload_object(rdx: bytes, rdb: bytes, name: str) -> object:
    """One object of an R lazy-load database (`NAME.rdx` index and `NAME.rdb` data, as R's `makeLazyLoadDB`).

    The index is a gzip'd serialized list `(variables = list(name = c(offset, length)), ...)`; the object is
    `rdb[offset : offset + length]`: a 4-byte big-endian uncompressed length, then a zlib stream (or, in newer
    R, a type byte `Z`/`0` before it) of the serialized object. Raises TextError if `name` is not in the index.
    """
    index, names = _RReader(gzip.decompress(rdx)).read()
    variables = dict(zip(names["names"], index, strict=True))["variables"]
    offsets, var_names = variables
    table = dict(zip(var_names["names"], offsets, strict=True))
    if name not in table:
        raise TextError(f"object {name!r} not in the lazy-load database (it has {sorted(table)})")
    offset, length = table[name]
    blob = rdb[offset + 4 : offset + length]
    if blob[:1] == b"Z":
        blob = blob[1:]
    try:
        data = blob[1:] if blob[:1] == b"0" else zlib.decompress(blob)
    except zlib.error as e:
        raise TextError(f"object {name!r}: not zlib-compressed ({e})") from None
    return _RReader(data).read()


def _deb_member(deb: bytes, wanted: set[str]) -> dict[str, bytes]:
    """Files of a .deb's data archive (an `ar` archive with data.tar.{xz,gz,zst}), by path without `./`."""
    if deb[:8] != b"!<arch>\n":
        raise TextError("not a Debian package (no ar header)")
    pos, found = 8, {}
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        body = deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if member.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for info in tar.getmembers():
                    path = info.name.removeprefix("./")
                    if path in wanted:
                        found[path] = tar.extractfile(info).read()  # type: ignore[union-attr]
    missing = wanted - found.keys()
    if missing:
        raise TextError(f"files missing from the package: {sorted(missing)}")
    return found


def _apt_download(package: str, version: str, dest: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise TextError(f"apt-get not found: fetch {package}={version} on a Debian/Ubuntu machine")
    cmd = ["apt-get", "download", f"{package}={version}"]
    for attempt in range(2):
        out = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if out.returncode == 0 and debs:
            return debs[0]
        if attempt == 0:  # the package lists may be missing or stale
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
    raise TextError(f"`{' '.join(cmd)}` failed: {last}")


def deb_text(name: str, deb: bytes) -> str:
    """The cleaned text `name` (a key of TEXTS) read from the bytes of its .deb, sha256-verified."""
    spec = TEXTS[name]
    files = _deb_member(deb, {spec.member + ".rdx", spec.member + ".rdb"})
    lines = read_lazyload_object(files[spec.member + ".rdx"], files[spec.member + ".rdb"], spec.obj)
    if not isinstance(lines, list) or not all(x is None or isinstance(x, str) for x in lines):
        raise TextError(f"{spec.package} {spec.obj}: not a character vector")
    text = clean_lines(lines)
    verify_sha256(text, spec.sha256, name)
    return text


def fetch_text(name: str, cache: Path | None = None) -> Path:
    """The path of the cleaned held-out text `name`, fetching and caching it on first use.

    A cached copy is re-verified against the pinned sha256. Raises TextError (one line) for an unknown name,
    a failed download, an unreadable package or a hash mismatch.
    """
    if name not in TEXTS:
        raise TextError(f"unknown text {name!r}; known: {', '.join(TEXTS)}")
    spec = TEXTS[name]
    path = (cache or cache_dir()) / f"{name}.txt"
    if path.exists():
        verify_sha256(path.read_text(encoding="utf-8"), spec.sha256, f"{name} (cached at {path})")
        return path
    with tempfile.TemporaryDirectory() as tmp:
        deb = _apt_download(spec.package, spec.version, Path(tmp)).read_bytes()
    text = deb_text(name, deb)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: fetch (or find in the cache) each named text and print its path."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "names", nargs="*", default=list(TEXTS), help=f"texts to fetch (default: all: {', '.join(TEXTS)})"
    )
    p.add_argument("--cache-dir", type=Path, default=None, help=f"cache folder (default: {cache_dir()})")
    args = p.parse_args(argv)
    try:
        for name in args.names:
            print(fetch_text(name, args.cache_dir))
    except TextError as e:
        print(f"texts.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
