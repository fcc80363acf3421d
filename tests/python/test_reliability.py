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
