"""Reliability (issue 18): files, options and databases from outside are
bounded and checked; a failure is a clear error (exit 1, "monet: error: ..."
naming the file, field or option), never a hang, a crash, an internal error
or a damaged output."""
import json
import os
import subprocess

import pytest

from monet_ref.make_checkpoint import write_tiny_tokenizer


def run(monet_bin, *args, timeout=120, **kw):
    return subprocess.run([monet_bin, *args], capture_output=True, text=True, timeout=timeout, **kw)


def expect_error(proc, *phrases):
    """A clean monet::Error: exit status 1 and every phrase in the message."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "monet: error:" in proc.stderr and "internal error" not in proc.stderr, proc.stderr[-2000:]
    for p in phrases:
        assert p in proc.stderr, (p, proc.stderr[-2000:])


# ---- tokenizer files -----------------------------------------------------------------------

def test_tokenize_with_empty_metaspace_replacement_ends(monet_bin, tmp_path):
    """A Metaspace pre-tokenizer with replacement "" made `tokenize` loop forever."""
    write_tiny_tokenizer(str(tmp_path))
    path = tmp_path / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["normalizer"] = None
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "", "prepend_scheme": "always", "split": True}
    path.write_text(json.dumps(tok))
    try:
        proc = run(monet_bin, "tokenize", "--model", str(tmp_path), "--text", "hello", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("monet tokenize did not end within 30 s")
    expect_error(proc, "tokenizer.json", "pre_tokenizer Metaspace.replacement", "exactly one character")


# ---- config.json ---------------------------------------------------------------------------

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "models", "monet-vd-books")


def model_with_config(tmp_path, **fields):
    """The default model's files (linked) with config.json fields changed."""
    d = tmp_path / "model"
    d.mkdir()
    for name in os.listdir(DEFAULT_MODEL):
        if name != "config.json":
            os.symlink(os.path.join(DEFAULT_MODEL, name), d / name)
    cfg = json.loads(open(os.path.join(DEFAULT_MODEL, "config.json")).read())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("field,value", [
    ("num_hidden_layers", 2147483647), ("num_hidden_layers", 2**62), ("num_hidden_layers", 2**63 - 1),
    ("moe_experts", 2**62), ("max_position_embeddings", 2**63 - 1), ("moe_groups", 2**62)])
def test_huge_config_numbers_are_refused(monet_bin, tmp_path, field, value):
    """Model::load allocated before checking (std::bad_alloc) or overflowed H*E."""
    model = model_with_config(tmp_path, **{field: value})
    for args in (["info"], ["generate", "-p", "a", "-n", "1"]):
        expect_error(run(monet_bin, *args, "--model", model), "config.json", f'"{field}"', str(value), "too large")


# ---- monet train options ------------------------------------------------------------------

BIG = str(2**63 - 1)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-data") / "data.txt"
    path.write_text("It was a fine morning, and the whale swam towards the ship. " * 200)
    return str(path)


@pytest.mark.parametrize("option,value,phrase", [
    ("--log-every", "0", "--log-every 0 is outside [1, "),              # SIGFPE
    ("--heads", "0", "--heads must be positive, found 0"),              # SIGFPE
    ("--kv-heads", "0", "--kv-heads must be positive, found 0"),        # SIGFPE
    ("--groups", "0", "--groups must be positive, found 0"),            # SIGFPE
    ("--hidden", "0", "--hidden must be positive, found 0"),            # trained, then `info` refused it
    ("--layers", "0", "--layers must be positive, found 0"),
    ("--moe-dim", "0", "--moe-dim must be positive, found 0"),
    ("--layers", "-3", "--layers must be positive, found -3"),          # internal error (vector max_size)
    ("--moe-heads", "-2", "--moe-heads must be positive, found -2"),
    ("--batch", BIG, f"--batch {BIG} is outside [1, 1048576]"),         # signed overflow
    ("--seq", BIG, f"--seq {BIG} is outside [2, 16777216]"),
    ("--experts", BIG, f"--experts = {BIG} is too large (at most 65536)"),
    ("--moe-dim", BIG, f"--moe-dim = {BIG} is too large"),
    ("--groups", BIG, f"--groups = {BIG} is too large"),
    ("--topk", "64", "--topk 64 must be smaller than --experts 64"),
    ("--hidden", "100", "--hidden 100 is not divisible by --heads 8"),
    ("--steps", BIG, f"--steps {BIG} is outside [1, "),
    ("--lr", "nan", "--lr must be > 0"),
    ("--val-fraction", "1", "--val-fraction 1 is outside [0, 1)"),
])
def test_bad_training_options_are_refused(monet_bin, tmp_path, train_data, option, value, phrase):
    out = tmp_path / "run"
    opts = {"--steps": "2", "--seq": "16", "--batch": "2", "--eval-every": "0", option: value}
    proc = run(monet_bin, "train", "--data", train_data, "--tokenizer", DEFAULT_MODEL, "--out", str(out),
               *[x for kv in opts.items() for x in kv])
    expect_error(proc, phrase)
    assert not (out / "step-2").exists()


def test_training_too_large_for_memory_says_how_much(monet_bin, tmp_path, train_data):
    proc = run(monet_bin, "train", "--data", train_data, "--tokenizer", DEFAULT_MODEL, "--out", str(tmp_path / "run"),
               "--steps", "1", "--seq", "16", "--batch", "2", "--hidden", "8192", "--heads", "64", "--kv-heads", "64",
               "--layers", "64", "--eval-every", "0")
    expect_error(proc, "training this model with --batch 2 and --seq 16 needs at least", "GiB", "is available")
