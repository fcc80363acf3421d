"""Tokenizer parity: `monet tokenize` against Hugging Face (`transformers`
AutoTokenizer, `tokenizers`) and `sentencepiece` on real LLaMA-family
tokenizers.

The tokenizers are the two SentencePiece BPE models in tests/data/tokenizers
(from the `mistral-common` 1.13.1 wheel, Apache-2.0; see the README there):
mistral-v1 (32000 pieces, the Mistral-7B-v0.1 / LLaMA layout) and mistral-v3
(32768 pieces, 750 control and 20 user-defined pieces). Each is checked as a
checkpoint would ship it:

- sp-*: tokenizer.model only (HF converts it: LlamaTokenizerFast), legacy and
  non-legacy (tokenizer_config.json "legacy": false);
- json-*: tokenizer.json as transformers saves it (classic LLaMA layout:
  Prepend/Replace normalizer; non-legacy: Metaspace "first"), and a Metaspace
  "always"/split layout as older Mistral tokenizer.json files have.

Encoding must give identical ids (with and without BOS) on a varied corpus,
a ~100 KB text and seeded random strings; decoding must give HF's text (for
tokenizer.model: sentencepiece's), also on random id sequences.
"""
import copy
import json
import os
import random
import shutil
import subprocess
import warnings

import pytest
from conftest import require

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "tests", "data", "tokenizers")
MODELS = {"v1": "mistral-v1.model", "v3": "mistral-v3.model"}

sentencepiece = require("sentencepiece", "python/requirements.txt")
tokenizers = require("tokenizers", "python/requirements.txt")
require("google.protobuf", "python/requirements.txt; needed to convert tokenizer.model")
transformers = require("transformers", "python/requirements.txt")

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m., isn't it?",
    "",
    " ",
    "  ",
    "\n",
    "   leading and trailing spaces   ",
    "multiple     internal   spaces\tand\ttabs\n\nand newlines\r\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e-9 0x1F 1,000,000",
    "emoji 🙂🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "日本語のテキストと中文文本，한국어 텍스트 𠀀𪚥",
    "accented: café naïve résumé Ångström Zürich São Paulo İstanbul e\u0301",
    "control \x00\x01\x02\x07 chars \x1b[31m red \x7f end",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
    "odd spaces:\u00a0nbsp\u3000ideographic\u2009thin\u200bzero-width\ufeffbom",
    "mixed<s>special</s> tokens [INST] inside [/INST] text <unk> too",
    "<s>", "</s>", " <s> ", "<s><s>", "a<s>b", "[INST]", "[INST]hi[/INST]", "[REFERENCE_DOC_1]x [REFERENCE_DOC_12] y",
    "a" * 300 + " " + "ab" * 200,
    "▁ already has the marker ▁▁ and <0x0A> byte-looking text",
]


def long_text() -> str:
    base = " ".join(CORPUS[1:17])
    return (base + "\n") * (100_000 // len(base) + 1)


def random_texts(n=300, seed=7):
    atoms = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|") + [
        " ", " ", "  ", "\t", "\n", "\r\n", "▁", "▁▁", "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[TOOL_CALLS]",
        "[REFERENCE_DOC_3]", "<0x0A>", "é", "ñ", "ü", "中", "文", "日本", "한", "🙂", "🚀", "👩‍👧", "𠀀", "\u00a0", "\u200b",
        "\u3000", "\x00", "\x01", "\x7f", "\u0301", "ﬁ", "Ω", "\U0010ffff", "\ufeff", "the", " the", "ing", "tion"]
    rnd = random.Random(seed)
    return ["".join(rnd.choice(atoms) for _ in range(rnd.choice([1, 2, 3, 5, 10, 30, 100]))) for _ in range(n)]


TEXTS = CORPUS + [long_text()] + random_texts()
HAS_SPECIAL_TEXT = ("<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[REFERENCE_DOC")


def auto_tokenizer(d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """name -> (directory, HF tokenizer (AutoTokenizer), low-level reference or None)."""
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for model, fname in MODELS.items():
        sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(DATA, fname))
        for legacy in (True, False):
            tag = "" if legacy else "-nonlegacy"
            d = root / f"sp-{model}{tag}"
            d.mkdir()
            shutil.copy(os.path.join(DATA, fname), d / "tokenizer.model")
            (d / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "bos_token": "<s>", "eos_token": "</s>",
                 "unk_token": "<unk>"}))
            hf = auto_tokenizer(d)
            assert type(hf).__name__ == "LlamaTokenizerFast"  # converted from tokenizer.model
            out[d.name] = (str(d), hf, sp)
            # the checkpoint layout transformers saves: tokenizer.json (+ .model, configs)
            jd = root / f"json-{model}-{'classic' if legacy else 'metaspace'}"
            hf.save_pretrained(str(jd))
            out[jd.name] = (str(jd), auto_tokenizer(jd), tokenizers.Tokenizer.from_file(str(jd / "tokenizer.json")))
        # older Mistral tokenizer.json: Metaspace pre-tokenizer "always", splitting words
        src = root / f"json-{model}-metaspace"
        jd = root / f"json-{model}-metaspace-split"
        shutil.copytree(src, jd)
        j = json.loads((jd / "tokenizer.json").read_text())
        j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        j["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
            {"type": "ByteFallback"}, {"type": "Fuse"}]}
        (jd / "tokenizer.json").write_text(json.dumps(j))
        out[jd.name] = (str(jd), auto_tokenizer(jd), tokenizers.Tokenizer.from_file(str(jd / "tokenizer.json")))
    return out


NAMES = [f"{kind}-{m}{tag}" for m in MODELS for kind, tag in
         (("sp", ""), ("sp", "-nonlegacy"), ("json", "-classic"), ("json", "-metaspace"), ("json", "-metaspace-split"))]


def run_monet(monet_bin, *args) -> str:
    proc = subprocess.run([monet_bin, "tokenize", *args], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode("utf-8")


def ours_encode_many(monet_bin, d, texts, tmp_path, special):
    f = tmp_path / "texts.jsonl"
    f.write_text("".join(json.dumps(t) + "\n" for t in texts))
    args = ["--model", d, "--file", str(f), "--jsonl"] + ([] if special else ["--no-special"])
    lines = run_monet(monet_bin, *args).split("\n")[:-1]
    assert len(lines) == len(texts)
    return [[int(x) for x in line.split(",")] if line else [] for line in lines]


def ours_decode_many(monet_bin, d, id_lists, tmp_path, skip_special=True):
    f = tmp_path / "ids.txt"
    f.write_text("".join(",".join(map(str, ids)) + "\n" for ids in id_lists))
    args = ["--model", d, "--decode", f"@{f}", "--jsonl"] + ([] if skip_special else ["--no-special"])
    lines = run_monet(monet_bin, *args).split("\n")[:-1]
    assert len(lines) == len(id_lists)
    return [json.loads(line) for line in lines]


def first_difference(name, texts, got, want):
    for text, g, w in zip(texts, got, want):
        if g != w:
            return f"{name}: {text[:80]!r}\n  ours {g[:40]}\n  want {w[:40]}"
    return None


@pytest.mark.parametrize("name", NAMES)
def test_encode_parity(monet_bin, tok_dirs, tmp_path, name):
    """Same ids as transformers' tokenizer(text).input_ids, with and without BOS."""
    d, hf, ref = tok_dirs[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_plain = [hf(t, add_special_tokens=False).input_ids for t in TEXTS]
        want_bos = [hf(t).input_ids for t in TEXTS]
    got_plain = ours_encode_many(monet_bin, d, TEXTS, tmp_path, special=False)
    assert got_plain == want_plain, first_difference(name, TEXTS, got_plain, want_plain)
    got_bos = ours_encode_many(monet_bin, d, TEXTS, tmp_path, special=True)
    assert got_bos == want_bos, first_difference(name, TEXTS, got_bos, want_bos)
    assert all(ids[:1] == [1] for ids in got_bos)
    # and the same as the underlying library itself
    if name.startswith("json"):
        lib = [ref.encode(t, add_special_tokens=False).ids for t in TEXTS]
        assert got_plain == lib, first_difference(name, TEXTS, got_plain, lib)
    else:  # sentencepiece knows no special tokens in text; elsewhere it is the reference
        plain = [t for t in TEXTS if not any(s in t for s in HAS_SPECIAL_TEXT)]
        if name.endswith("nonlegacy"):  # HF's Metaspace "first" adds no "▁" before a leading space or "▁"
            plain = [t for t in plain if not t.startswith((" ", "▁"))]
        ours = ours_encode_many(monet_bin, d, plain, tmp_path, special=False)
        assert len(plain) > 150
        lib = [ref.encode(t) for t in plain]
        assert ours == lib, first_difference(name, plain, ours, lib)


@pytest.mark.parametrize("name", NAMES)
def test_decode_parity(monet_bin, tok_dirs, tmp_path, name):
    """Decoding HF's ids gives HF's text (round trip); random id sequences
    decode as the library does (tokenizer.json: `tokenizers`; tokenizer.model:
    `sentencepiece`), with and without special tokens."""
    d, hf, ref = tok_dirs[name]
    ids = [hf(t, add_special_tokens=False).input_ids for t in TEXTS]
    got = ours_decode_many(monet_bin, d, ids, tmp_path)
    want = [hf.decode(i, skip_special_tokens=True) for i in ids]
    assert got == want, first_difference(name, TEXTS, got, want)

    rnd = random.Random(11)
    vocab = len(hf)
    lists = [[rnd.randrange(vocab) if rnd.random() < 0.5 else rnd.randrange(300) for _ in range(rnd.choice([1, 2, 3, 8, 20]))]
             for _ in range(300)]
    for skip in (True, False):
        got = ours_decode_many(monet_bin, d, lists, tmp_path, skip_special=skip)
        if name.startswith("json"):
            want = [ref.decode(i, skip_special_tokens=skip) for i in lists]
        else:  # sentencepiece keeps unk (" ⁇ "); we skip it as a special token, as HF does
            want = [ref.decode([x for x in i if x != ref.unk_id()] if skip else i) for i in lists]
        assert got == want, first_difference(name, [str(i) for i in lists], got, want)


def test_pieces_match_hf_tokens(monet_bin, tok_dirs):
    d, hf, _ = tok_dirs["json-v3-classic"]
    text = "Héllo\twörld [INST] 🙂"
    lines = run_monet(monet_bin, "--model", d, "--text", text, "--pieces").split("\n")
    ids = [int(x) for x in lines[0].split(",")]
    assert ids == hf(text).input_ids
    assert lines[1:-1] == [f"{i}\t{p}" for i, p in zip(ids, hf.convert_ids_to_tokens(ids))]


@pytest.mark.parametrize("kind", ["json", "sp"])
def test_bos_eos_flags_match_transformers(monet_bin, tok_dirs, tmp_path, kind):
    """add_bos_token / add_eos_token in tokenizer_config.json, as transformers applies them."""
    src = tok_dirs[f"{kind}-v1" + ("-classic" if kind == "json" else "")][0]
    texts = CORPUS[:10]
    for flags in ({}, {"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True},
                  {"add_bos_token": False, "add_eos_token": True}):
        d = tmp_path / ("cfg" + "".join(f"-{k}{v}" for k, v in flags.items()))
        shutil.copytree(src, d)
        cfg = {"tokenizer_class": "LlamaTokenizerFast" if kind == "json" else "LlamaTokenizer",
               "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True, **flags}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        hf = auto_tokenizer(d)
        assert ours_encode_many(monet_bin, str(d), texts, tmp_path, special=True) == [hf(t).input_ids for t in texts], flags


def test_prefers_tokenizer_json(monet_bin, tok_dirs, tmp_path):
    d = tmp_path / "both"
    shutil.copytree(tok_dirs["json-v3-metaspace-split"][0], d)
    shutil.copy(os.path.join(DATA, MODELS["v1"]), d / "tokenizer.model")  # a different model: must be ignored
    hf = tok_dirs["json-v3-metaspace-split"][1]
    texts = ["[INST] hi [/INST]", "Hello  world"]
    assert ours_encode_many(monet_bin, str(d), texts, tmp_path, special=True) == [hf(t).input_ids for t in texts]


def test_errors(monet_bin, tmp_path):
    def fails(*args):
        proc = subprocess.run([monet_bin, "tokenize", "--model", str(tmp_path), *args], capture_output=True, text=True)
        assert proc.returncode != 0
        return proc.stderr

    assert "no tokenizer.json or tokenizer.model" in fails("--text", "x")
    (tmp_path / "tokenizer.json").write_text("{broken")
    err = fails("--text", "x")
    assert "tokenizer.json" in err and "not valid JSON" in err
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    assert "WordPiece" in fails("--text", "x")
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x08\x01garbage")
    assert "tokenizer.model" in fails("--text", "x")
