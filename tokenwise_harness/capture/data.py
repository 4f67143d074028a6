"""Representative input data: the embedded multilingual corpus and `get_veri_data`.

`get_veri_data(tokenizer, seed, cn, cn_len, eu, eu_len, device)` keeps the seed's
signature and returns `cn` Chinese samples of exactly `cn_len` tokens followed by `eu`
non-Chinese samples of exactly `eu_len` tokens, with an all-ones attention mask (no padding).

How a sample is built (the same rule for both groups):
  * Every sample starts from its own sentence: the starting sentences are the first `cn`
    (or `eu`) entries of a seeded permutation, so no two samples begin alike and `cn`
    can be at most the number of Chinese sentences (likewise `eu`).
  * After the start come the other sentences of the group in a seeded random order that
    is different for every sample; they are joined (Chinese with no separator, other
    languages with a space), tokenized without special tokens, and cut to the length.
  * Non-Chinese samples cycle over the languages in sorted order (de, en, es, fr, ...), one
    sample per language in turn, so each language gets a fair share. A sample reads its own
    language first and spills into the other languages only if its language has too few
    tokens for the length.
  * Randomness comes from `random.Random` objects seeded with strings derived from `seed`,
    never from global RNG state. Each sample has its own stream, so the first k samples do
    not change when `cn` or `eu` grows: `cn=10` gives a prefix of `cn=50`.

Counts: `cn=0` or `eu=0` is allowed when the other is positive (a Chinese-only or a
non-Chinese-only set); both zero is an error. Lengths must be positive for every group
that has samples.

Shape: when both groups have samples of one length (always the case from the CLI, which
passes `--length` as both), `input_ids` and `attention_mask` are LongTensors
`[cn + eu, length]`. When `cn_len != eu_len` they cannot share one tensor, and each is a
list of two tensors, `[cn, cn_len]` then `[eu, eu_len]`. `batches()` slices either form
into model-ready batches, and `data_fingerprint()` hashes either form.

User corpora (`load_corpus(paths)`):
  * `.txt`: one sentence or paragraph per line, blank lines ignored. The language is the
    last dotted part of the file name when it looks like a language tag: `zh.txt` and
    `news.zh.txt` are Chinese, `talk.fr.txt` is French. Otherwise (`notes.txt`) the lines
    count as non-Chinese, language `und`.
  * `.jsonl`: one JSON object per line with a string `text` and a `lang` or `language`
    field; a line without one takes the language from the file name as for `.txt`.
  * A directory stands for every `.txt` and `.jsonl` file directly inside it.
  Chinese is any language tag `zh`, `zh-*`/`zh_*`, `zho`, `chi`, `cn` or `chinese`.
  Duplicate sentences within a language are dropped, so samples stay distinct.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tokenwise_harness.errors import HarnessError

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

_CHINESE_TAGS = {"zh", "zho", "chi", "cn", "chinese"}
_LANG_TAG = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*")
UNKNOWN_LANG = "und"

# Separator placed between sentences of one sample. Chinese prose runs sentences together
# (each already ends in 。！？), European prose separates them with a space.
_SEP_ZH = ""
_SEP_OTHER = " "


# --------------------------------------------------------------------------- corpus


def is_chinese(lang: str) -> bool:
    lang = lang.lower()
    return lang in _CHINESE_TAGS or lang.startswith(("zh-", "zh_"))


def lang_from_filename(path: Path) -> str:
    """`zh.txt` -> zh, `news.fr.jsonl` -> fr, `notes.txt` -> und."""
    candidate = Path(path).name.split(".")[-2] if "." in Path(path).name else ""
    return candidate.lower() if _LANG_TAG.fullmatch(candidate) else UNKNOWN_LANG


def load_corpus(paths: Sequence[str | Path] | None = None) -> dict[str, list[str]]:
    """Sentences by language: the embedded corpus (None) or the user's files/directories."""
    if paths is None:
        files = sorted(CORPUS_DIR.glob("*.jsonl"))
    else:
        files = [f for p in paths for f in _expand(Path(p))]
    corpus: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for path in files:
        for lang, text in _read_corpus_file(path):
            if text not in seen.setdefault(lang, set()):
                seen[lang].add(text)
                corpus.setdefault(lang, []).append(text)
    if not corpus:
        where = ", ".join(str(p) for p in paths) if paths else str(CORPUS_DIR)
        raise HarnessError(f"corpus {where}: no sentences found (need .txt or .jsonl files with text)")
    return corpus


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise HarnessError(f"corpus directory {path}: holds no .txt or .jsonl files")
        return files
    if not path.exists():
        raise HarnessError(f"corpus file {path}: does not exist")
    if path.suffix not in (".txt", ".jsonl"):
        raise HarnessError(f"corpus file {path}: unsupported type {path.suffix or '(none)'}; use .txt or .jsonl")
    return [path]


def _read_corpus_file(path: Path) -> Iterator[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise HarnessError(f"corpus file {path}: is not UTF-8 text") from None
    except OSError as exc:
        raise HarnessError(f"corpus file {path}: cannot be read ({exc.strerror})") from None
    default_lang = lang_from_filename(path)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            yield default_lang, line.strip()
        else:
            yield _parse_jsonl_line(path, lineno, line, default_lang)


def _parse_jsonl_line(path: Path, lineno: int, line: str, default_lang: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HarnessError(f"corpus file {path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise HarnessError(f'corpus file {path}:{lineno}: expected an object with a string "text" field')
    lang = record.get("lang", record.get("language", default_lang))
    if not isinstance(lang, str) or not lang.strip():
        raise HarnessError(f'corpus file {path}:{lineno}: "lang" must be a non-empty string')
    text = record["text"].strip()
    if not text:
        raise HarnessError(f'corpus file {path}:{lineno}: "text" is empty')
    return lang.strip().lower(), text


# --------------------------------------------------------------------------- sampling


def get_veri_data(
    tokenizer,
    seed: int = 0,
    cn: int = 50,
    cn_len: int = 128,
    eu: int = 80,
    eu_len: int = 128,
    device=None,
    *,
    corpus: Mapping[str, Sequence[str]] | Sequence[str | Path] | None = None,
) -> dict:
    """Representative inputs: cn Chinese samples, then eu non-Chinese ones (see module doc)."""
    _check_counts(cn, eu)
    if cn:
        _check_length(cn_len)
    if eu:
        _check_length(eu_len)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise HarnessError(f"--seed: must be an integer, got {seed!r}")
    if isinstance(corpus, (str, Path)):
        corpus = [corpus]
    if not isinstance(corpus, Mapping):
        corpus = load_corpus(corpus)

    zh = [s for lang in sorted(corpus) if is_chinese(lang) for s in corpus[lang]]
    others = {lang: list(corpus[lang]) for lang in sorted(corpus) if not is_chinese(lang) and corpus[lang]}
    groups = []
    if cn:
        groups.append(_chinese_rows(tokenizer, zh, cn, cn_len, seed))
    if eu:
        groups.append(_other_rows(tokenizer, others, eu, eu_len, seed))
    return _to_batch(groups, device)


def _check_counts(cn, eu) -> None:
    for flag, value in (("--cn", cn), ("--eu", eu)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise HarnessError(f"{flag}: must be a whole number >= 0, got {value!r}")
    if cn == 0 and eu == 0:
        raise HarnessError("--cn/--eu: both are 0; ask for at least one sample")


def _check_length(length) -> None:
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        raise HarnessError(f"--length: must be a positive number of tokens, got {length!r}")


def _chinese_rows(tokenizer, sentences: list[str], n: int, length: int, seed: int) -> list[list[int]]:
    if n > len(sentences):
        raise HarnessError(
            f"--cn: {n} Chinese samples need {n} distinct starting sentences, but the corpus has "
            f"{len(sentences)} Chinese sentences; lower --cn or add Chinese text"
        )
    counts = _token_counts(tokenizer, sentences)
    _check_group_tokens(counts, length, "Chinese")
    starts = random.Random(f"tokenwise:{seed}:zh:starts").sample(range(len(sentences)), n)
    rows = []
    for i, start in enumerate(starts):
        rng = random.Random(f"tokenwise:{seed}:zh:{i}")
        rest = [j for j in range(len(sentences)) if j != start]
        order = [start] + rng.sample(rest, len(rest))
        rows.append(_fill(tokenizer, sentences, counts, order, length, _SEP_ZH))
    return rows


def _other_rows(tokenizer, by_lang: dict[str, list[str]], n: int, length: int, seed: int) -> list[list[int]]:
    # One flat list of every non-Chinese sentence; each language owns a slice of it.
    sentences = [s for lang in by_lang for s in by_lang[lang]]
    if n > len(sentences):
        raise HarnessError(
            f"--eu: {n} non-Chinese samples need {n} distinct starting sentences, but the corpus "
            f"has {len(sentences)} non-Chinese sentences; lower --eu or add text"
        )
    spans, offset = {}, 0
    for lang, sents in by_lang.items():
        spans[lang] = range(offset, offset + len(sents))
        offset += len(sents)
    counts = _token_counts(tokenizer, sentences)
    _check_group_tokens(counts, length, "non-Chinese")
    rows = []
    for i, (lang, start) in enumerate(_round_robin_starts(spans, n, seed)):
        rng = random.Random(f"tokenwise:{seed}:eu:{i}")
        own = [j for j in spans[lang] if j != start]
        foreign = [j for other, span in spans.items() if other != lang for j in span]
        order = [start] + rng.sample(own, len(own)) + rng.sample(foreign, len(foreign))
        rows.append(_fill(tokenizer, sentences, counts, order, length, _SEP_OTHER))
    return rows


def _round_robin_starts(spans: dict[str, range], n: int, seed: int) -> list[tuple[str, int]]:
    """(language, start sentence) for each sample: languages in turn, skipping used-up ones."""
    perms = {lang: random.Random(f"tokenwise:{seed}:{lang}:starts").sample(list(span), len(span))
             for lang, span in spans.items()}
    starts: list[tuple[str, int]] = []
    while len(starts) < n:  # terminates: n <= total sentences was checked by the caller
        for lang, perm in perms.items():
            if perm and len(starts) < n:
                starts.append((lang, perm.pop(0)))
    return starts


def _token_counts(tokenizer, sentences: list[str]) -> list[int]:
    return [len(ids) for ids in _encode(tokenizer, sentences)]


def _check_group_tokens(counts: list[int], length: int, group: str) -> None:
    # A sample can use every sentence of its group, so the group's total is the ceiling.
    if length > sum(counts):
        raise HarnessError(
            f"--length: {length} tokens per sample, but all {group} text together is only "
            f"{sum(counts)} tokens with this tokenizer; lower --length or add text"
        )


def _fill(tokenizer, sentences, counts, order, length, sep) -> list[int]:
    """Join sentences in `order` until the text tokenizes to >= length tokens; cut to length.

    Per-sentence counts give a first guess of how many sentences are needed; tokens can
    merge across the joins, so add sentences until the joined text is long enough.
    """
    k, total = 0, 0
    while k < len(order) and total < length:
        total += counts[order[k]]
        k += 1
    while True:
        ids = _encode(tokenizer, [sep.join(sentences[j] for j in order[:k])])[0]
        if len(ids) >= length:
            return ids[:length]
        if k == len(order):
            raise HarnessError(
                f"--length: {length} tokens per sample, but the joined text of the whole group is only "
                f"{len(ids)} tokens; lower --length or add text"
            )
        k += 1


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _to_batch(groups: list[list[list[int]]], device) -> dict:
    import torch

    tensors = [torch.tensor(rows, dtype=torch.long) for rows in groups]
    if len({t.shape[1] for t in tensors}) == 1:
        ids = torch.cat(tensors).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ids = [t.to(device) for t in tensors]
    return {"input_ids": ids, "attention_mask": [torch.ones_like(t) for t in ids]}


# --------------------------------------------------------------------------- consumers


def batches(data: Mapping, batch_size: int) -> Iterator[dict]:
    """Model-ready slices of `get_veri_data`'s result, either shape, at most batch_size rows."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise HarnessError(f"batch size: must be a positive integer, got {batch_size!r}")
    ids, mask = data["input_ids"], data["attention_mask"]
    parts = list(zip(ids, mask)) if isinstance(ids, (list, tuple)) else [(ids, mask)]
    for part_ids, part_mask in parts:
        for lo in range(0, part_ids.shape[0], batch_size):
            yield {"input_ids": part_ids[lo:lo + batch_size], "attention_mask": part_mask[lo:lo + batch_size]}


def data_fingerprint(batch: Mapping) -> str:
    """sha256 hex of the token ids and attention mask, shapes included, either shape."""
    import torch

    h = hashlib.sha256()
    for key in ("input_ids", "attention_mask"):
        if key not in batch:
            continue
        value = batch[key]
        parts = value if isinstance(value, (list, tuple)) else [value]
        for i, t in enumerate(parts):
            t = torch.as_tensor(t).detach().to("cpu", torch.int64).contiguous()
            h.update(f"{key}[{i}]:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()
