"""Tokenizer parity: `monet tokenize` against HF `tokenizers`, `sentencepiece`
and `transformers` on real LLaMA-family tokenizers.

The tokenizers are the SentencePiece models shipped in the `mistral-common`
wheel (Apache-2.0): tokenizer.model.v1 (32000 pieces, the Mistral-7B-v0.1 /
LLaMA layout) and the v3 instruct model (32768 pieces, 771 control tokens).
tokenizer.json files are made from them at test time in the layouts LLaMA
checkpoints ship: the classic one (Prepend + Replace normalizer, Strip
decoder) and the Metaspace pre-tokenizer one.
"""
import copy
import json
import os
import shutil
import subprocess

import pytest

sentencepiece = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")
mistral_common = pytest.importorskip("mistral_common")

DATA = os.path.join(os.path.dirname(mistral_common.__file__), "data")
SP_MODELS = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m., isn't it?",
    "",
    " ",
    "   leading and trailing spaces   ",
    "multiple     internal   spaces\tand\ttabs\n\nand newlines\r\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e-9 0x1F 1,000,000",
    "emoji 🙂🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "日本語のテキストと中文文本，한국어 텍스트",
    "accented: café naïve résumé Ångström Zürich São Paulo İstanbul",
    "control \x01\x02\x07 chars \x1b[31m red \x7f end",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
    "mixed<s>special</s> tokens [INST] inside [/INST] text",
    "a" * 300 + " " + "ab" * 200,
    "▁ already has the marker ▁▁ and <0x0A> byte-looking text",
]


def long_text() -> str:
    base = " ".join(CORPUS[1:15])
    return (base + "\n") * (100_000 // len(base) + 1)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """name -> (directory, reference encoder/decoder)."""
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for name, fname in SP_MODELS.items():
        d = root / f"sp-{name}"
        d.mkdir()
        shutil.copy(os.path.join(DATA, fname), d / "tokenizer.model")
        sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        out[f"sp-{name}"] = (str(d), "sp", sp)
        for layout in ("classic", "metaspace"):
            jd = root / f"json-{name}-{layout}"
            jd.mkdir()
            (jd / "tokenizer.json").write_text(json.dumps(make_tokenizer_json(sp, layout, name)))
            out[f"json-{name}-{layout}"] = (str(jd), "hf", tokenizers.Tokenizer.from_file(str(jd / "tokenizer.json")))
    return out


def make_tokenizer_json(sp, layout: str, name: str) -> dict:
    """A LLaMA-style tokenizer.json from a SentencePiece model, built with HF's
    own converter (transformers), then given the chosen pre-processing layout."""
    from transformers.convert_slow_tokenizer import SpmConverter  # noqa: F401
    from transformers import LlamaTokenizerFast
    fast = LlamaTokenizerFast(vocab_file=os.path.join(DATA, SP_MODELS[name]), legacy=True, from_slow=True)
    j = json.loads(fast.backend_tokenizer.to_str())
    j = copy.deepcopy(j)
    if layout == "classic":
        j["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        j["pre_tokenizer"] = None
        j["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    else:
        j["normalizer"] = None
        j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
        j["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False},
            {"type": "ByteFallback"}, {"type": "Fuse"}]}
    return j


def monet(monet_bin, *args) -> str:
    proc = subprocess.run([monet_bin, "tokenize", *args], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode("utf-8")


def ours_encode(monet_bin, d, text, tmp_path, special=False):
    f = tmp_path / "text.txt"
    f.write_bytes(text.encode("utf-8"))
    args = ["--model", d, "--file", str(f)] + ([] if special else ["--no-special"])
    line = monet(monet_bin, *args).strip()
    return [int(x) for x in line.split(",")] if line else []


def ref_encode(kind, ref, text):
    return ref.encode(text) if kind == "sp" else ref.encode(text, add_special_tokens=False).ids


def ref_decode(kind, ref, ids):
    return ref.decode(ids) if kind == "sp" else ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["sp-v1", "sp-v3", "json-v1-classic", "json-v1-metaspace",
                                  "json-v3-classic", "json-v3-metaspace"])
def test_encode_decode_parity(monet_bin, tok_dirs, tmp_path, name):
    d, kind, ref = tok_dirs[name]
    for text in CORPUS + [long_text()]:
        want = ref_encode(kind, ref, text)
        got = ours_encode(monet_bin, d, text, tmp_path)
        assert got == want, (name, text[:80])
        if want:
            ids_file = tmp_path / "ids.txt"
            ids_file.write_text(",".join(map(str, want)))
            assert monet(monet_bin, "--model", d, "--decode", f"@{ids_file}") == ref_decode(kind, ref, want), \
                (name, text[:80])


def test_bos_and_config_flags_match_transformers(monet_bin, tok_dirs, tmp_path):
    """`monet tokenize` prints what transformers' tokenizer(text).input_ids gives, BOS/EOS per tokenizer_config."""
    from transformers import AutoTokenizer, LlamaTokenizerFast
    src, _, _ = tok_dirs["json-v1-classic"]
    for flags in ({}, {"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True}):
        d = tmp_path / ("cfg" + "".join(f"{k}{v}" for k, v in flags.items()))
        shutil.copytree(src, d)
        cfg = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "legacy": True, **flags}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        hf = AutoTokenizer.from_pretrained(str(d))
        assert isinstance(hf, LlamaTokenizerFast)
        for text in CORPUS[:8]:
            assert ours_encode(monet_bin, str(d), text, tmp_path, special=True) == hf(text).input_ids, (flags, text)


def test_prefers_tokenizer_json(monet_bin, tok_dirs, tmp_path):
    d = tmp_path / "both"
    shutil.copytree(tok_dirs["json-v3-metaspace"][0], d)
    shutil.copy(os.path.join(DATA, SP_MODELS["v1"]), d / "tokenizer.model")
    text = "[INST] hi [/INST]"  # tokenizer.json matches control tokens in text; SentencePiece does not
    hf = tok_dirs["json-v3-metaspace"][2]
    assert ours_encode(monet_bin, str(d), text, tmp_path) == hf.encode(text, add_special_tokens=False).ids


def test_errors(monet_bin, tmp_path):
    proc = subprocess.run([monet_bin, "tokenize", "--model", str(tmp_path), "--text", "x"], capture_output=True, text=True)
    assert proc.returncode != 0 and "no tokenizer.json or tokenizer.model" in proc.stderr
    (tmp_path / "tokenizer.json").write_text("{broken")
    proc = subprocess.run([monet_bin, "tokenize", "--model", str(tmp_path), "--text", "x"], capture_output=True, text=True)
    assert proc.returncode != 0 and "tokenizer.json" in proc.stderr and "not valid JSON" in proc.stderr
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    proc = subprocess.run([monet_bin, "tokenize", "--model", str(tmp_path), "--text", "x"], capture_output=True, text=True)
    assert proc.returncode != 0 and "WordPiece" in proc.stderr
