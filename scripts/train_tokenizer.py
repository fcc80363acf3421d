#!/usr/bin/env python3
"""train_tokenizer.py [CORPUS_DIR] [OUT_DIR] — the tokenizer of monet's small default model.

Trains a SentencePiece BPE model with LLaMA's conventions on the *.txt files of
CORPUS_DIR (default data/corpus, from scripts/fetch_corpus.sh) and writes an
HF LlamaTokenizer directory to OUT_DIR (default data/tokenizer):
tokenizer.model, tokenizer_config.json, special_tokens_map.json.

Conventions: ids 0 <unk>, 1 <s>, 2 </s>, no pad; byte fallback; digits split;
dummy prefix; identity normalisation, no whitespace folding. Every paragraph
(line) of the corpus is used, in sorted file order, unshuffled: the same
corpus gives the same tokenizer.model byte for byte.

Then it checks the result: transformers' AutoTokenizer loads it and gives
SentencePiece's ids (plus BOS) and the text back, build/monet tokenize gives
the same ids where that binary exists, and it prints the corpus' token count.
Run it with the project's .venv python (sentencepiece, transformers).
"""
import argparse
import glob
import io
import json
import os
import subprocess
import sys
import time

import sentencepiece as spm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
from monet_ref import chat_templates  # noqa: E402

# HF's LLaMA-2 chat template: one of the formats `monet chat` renders.
LLAMA2_CHAT_TEMPLATE = chat_templates.LLAMA2
SPECIALS = {"unk_token": (0, "<unk>"), "bos_token": (1, "<s>"), "eos_token": (2, "</s>")}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lines(files):
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")


def train(files, out_dir, vocab_size):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(files), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.9999, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=1 << 16, num_threads=2, minloglevel=1)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())


def write_configs(out_dir, model_max_length):
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, s in SPECIALS.values()}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              **{k: s for k, (_, s) in SPECIALS.items()}, "pad_token": None, "legacy": True,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "sp_model_kwargs": {}, "added_tokens_decoder": added, "chat_template": LLAMA2_CHAT_TEMPLATE}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json",
                                                          {k: s for k, (_, s) in SPECIALS.items()})):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")


def verify(files, out_dir):
    from transformers import AutoTokenizer
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(out_dir)
    samples = ["Hello world", "  two  spaces,\ttab and\nnewline", "In 1730, £12 and 3.14159 — naïve café ☃ 日本",
               "It is a truth universally acknowledged, that a single man in possession of a good fortune"]
    samples += [next(lines([f])) for f in files]
    for text in samples:
        ids = sp.encode(text)
        assert hf(text).input_ids == [1] + ids, f"HF and SentencePiece differ on {text!r}"
        assert hf.decode(ids) == sp.decode(ids) == text, f"no round trip for {text!r}"
    chat = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat == "<s>[INST] Hi [/INST]", chat
    print(f"transformers {type(hf).__name__}: ids and round trip agree on {len(samples)} texts")
    monet = os.path.join(ROOT, "build", "monet")
    if os.access(monet, os.X_OK):
        for text in samples:
            got = subprocess.run([monet, "tokenize", "--model", out_dir, "--text", text], capture_output=True,
                                 text=True, check=True).stdout
            assert [int(x) for x in got.strip().split(",")] == hf(text).input_ids, f"monet differs on {text!r}"
        print(f"build/monet tokenize agrees on {len(samples)} texts")
    else:
        print("build/monet not built: skipped its check")
    return sp


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("corpus", nargs="?", default="data/corpus")
    ap.add_argument("out", nargs="?", default="data/tokenizer")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--model-max-length", type=int, default=1024, help="context length written to the config")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.corpus, "*.txt")))
    if not files:
        sys.exit(f"error: no *.txt files in {args.corpus} (run scripts/fetch_corpus.sh first)")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    train(files, args.out, args.vocab_size)
    write_configs(args.out, args.model_max_length)
    print(f"trained {args.vocab_size} pieces on {len(files)} files in {time.time() - t0:.1f} s -> {args.out}")
    sp = verify(files, args.out)
    tokens = sum(len(sp.encode(open(f, encoding="utf-8").read())) for f in files)
    size = sum(os.path.getsize(f) for f in files)
    print(f"corpus: {tokens} tokens, {size} bytes, {size / tokens:.2f} bytes/token (BOS/EOS not counted)")


if __name__ == "__main__":
    main()
