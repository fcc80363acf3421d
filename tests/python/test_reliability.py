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


# ---- the index database -------------------------------------------------------------------

CORPUS = "the heat at the east seat is the other one. " * 4


@pytest.fixture(scope="module")
def index_setup(tmp_path_factory):
    from monet_ref.make_checkpoint import make_checkpoint
    root = tmp_path_factory.mktemp("index")
    model = str(root / "vd")
    make_checkpoint(model, vocab=301, layers=2, groups=1, seed=41, tokenizer=True, max_pos=256)  # 2 groups, E = 32
    corpus = root / "a.txt"
    corpus.write_text(CORPUS * 6)
    return model, str(corpus), root


def sql(db, statement):
    import sqlite3
    con = sqlite3.connect(db)
    try:
        rows = con.execute(statement).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


def index_rows(db):
    return (sql(db, "SELECT grp, expert, count, max_prob FROM experts ORDER BY 1, 2"),
            sql(db, "SELECT grp, expert, prob, doc, pos, token, context, focus FROM activations ORDER BY 1, 2, 3, 4, 5"),
            sql(db, "SELECT doc, path, tokens FROM documents ORDER BY doc"),
            sql(db, "SELECT key, value FROM meta ORDER BY key"))


INDEX_OPTS = ["--context", "16", "--top-k", "3"]


@pytest.mark.parametrize("damage,phrase", [
    # out-of-range rows: heap-buffer-overflow / use-after-free in build_index, SIGSEGV in release
    ("UPDATE experts SET grp = 2 WHERE rowid = (SELECT min(rowid) FROM experts)", "experts row 0: grp 2 is outside [0, 2)"),
    ("UPDATE experts SET expert = 1024 WHERE rowid = (SELECT min(rowid) FROM experts)", "expert 1024 is outside [0, 1024)"),
    ("UPDATE experts SET grp = 'x' WHERE rowid = (SELECT min(rowid) FROM experts)", "grp x is outside"),
    ("UPDATE experts SET count = -5 WHERE rowid = (SELECT min(rowid) FROM experts)", "count -5 is not a count"),
    ("UPDATE activations SET grp = -1 WHERE rowid = (SELECT min(rowid) FROM activations)", "grp -1 is outside [0, 2)"),
    ("UPDATE activations SET expert = 99999 WHERE rowid = (SELECT min(rowid) FROM activations)", "expert 99999"),
    ("UPDATE activations SET prob = 1e300 WHERE rowid = (SELECT min(rowid) FROM activations)", "prob 1.0e+300 is not in [0, 4]"),
    ("UPDATE activations SET doc = 7 WHERE rowid = (SELECT min(rowid) FROM activations)", "doc 7 is not an indexed document"),
    ("UPDATE activations SET pos = 100000 WHERE rowid = (SELECT min(rowid) FROM activations)", "pos 100000 is outside document 0"),
    ("INSERT INTO activations SELECT * FROM activations WHERE rowid = (SELECT min(rowid) FROM activations)",
     "has more than --top-k 3 activations"),
    ("UPDATE meta SET value = 'abc' WHERE key = 'tokens'", "meta 'tokens' = 'abc' is not a token count"),  # stoll
    ("UPDATE meta SET value = '12abc' WHERE key = 'tokens'", "is not a token count"),
    ("UPDATE documents SET tokens = 'many'", "documents row 0"),
    ("UPDATE meta SET value = '{\"path\": 3}' WHERE key = 'settings'", "other settings"),
    ("UPDATE meta SET value = 'not json' WHERE key = 'settings'", "meta 'settings' is not a JSON object"),
])
def test_damaged_index_is_refused_on_resume(monet_bin, index_setup, tmp_path, damage, phrase):
    model, corpus, _ = index_setup
    db = str(tmp_path / "i.db")
    proc = run(monet_bin, "index", "--model", model, "--corpus", corpus, "--out", db, *INDEX_OPTS)
    assert proc.returncode == 0, proc.stderr
    sql(db, damage)
    before = index_rows(db)
    proc = run(monet_bin, "index", "--model", model, "--corpus", corpus, "--out", db, *INDEX_OPTS, "--resume")
    expect_error(proc, db, phrase)
    assert index_rows(db) == before  # refused, not changed


@pytest.mark.parametrize("partial", ['{"path": "x", "doc": "0", "next": 15, "fingerprint": "1"}',
                                     '{"path": "x", "doc": 0, "next": -15, "fingerprint": "1"}',
                                     '{"path": "x", "doc": 0, "next": 15, "fingerprint": 1}', '[1]'])
def test_damaged_partial_document_is_refused(monet_bin, index_setup, tmp_path, partial):
    """A wrong-typed 'partial' value was a json type_error (internal error) or silently dropped."""
    model, corpus, _ = index_setup
    db = str(tmp_path / "i.db")
    run(monet_bin, "index", "--model", model, "--corpus", corpus, "--out", db, *INDEX_OPTS, "--max-tokens", "30")
    assert sql(db, "SELECT value FROM meta WHERE key = 'partial'")
    sql(db, f"UPDATE meta SET value = '{partial}' WHERE key = 'partial'")
    proc = run(monet_bin, "index", "--model", model, "--corpus", corpus, "--out", db, *INDEX_OPTS, "--resume")
    expect_error(proc, db, "meta 'partial'", "is not {path, doc, next, fingerprint}")


def test_index_killed_before_its_first_commit_resumes(monet_bin, index_setup, tmp_path):
    """kill -9 before the first commit left a file that both a fresh run and --resume refused."""
    import signal
    import time
    model, _, root = index_setup
    big = root / "big.txt"
    big.write_text(CORPUS * 400)  # ~40k tokens, a second or more
    opts = ["--context", "64", "--top-k", "3", "--commit-every", "1000000000"]  # no commit before the end
    one = str(tmp_path / "one.db")
    assert run(monet_bin, "index", "--model", model, "--corpus", str(big), "--out", one, *opts).returncode == 0
    killed = str(tmp_path / "killed.db")
    proc = subprocess.Popen([monet_bin, "index", "--model", model, "--corpus", str(big), "--out", killed, *opts],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not os.path.exists(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)  # into the windows
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    again = run(monet_bin, "index", "--model", model, "--corpus", str(big), "--out", killed, *opts)
    expect_error(again, "exists; pass --resume")
    resumed = run(monet_bin, "index", "--model", model, "--corpus", str(big), "--out", killed, *opts, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert index_rows(killed) == index_rows(one)
    # an empty file (killed before the schema, or by an older version) resumes from the start too
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    corpus = str(root / "a.txt")
    small = str(tmp_path / "small.db")
    run(monet_bin, "index", "--model", model, "--corpus", corpus, "--out", small, *INDEX_OPTS)
    proc = run(monet_bin, "index", "--model", model, "--corpus", corpus, "--out", str(empty), *INDEX_OPTS, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert index_rows(str(empty)) == index_rows(small)


@pytest.mark.parametrize("option,value,phrase", [
    ("--window", BIG, f"--window {BIG} is outside [0, 1024]"),   # signed overflow of pos + window
    ("--top-k", BIG, f"--top-k {BIG} is outside [1, 4096]"),
    ("--context", BIG, f"--context {BIG} is outside [2, 256]"),
    ("--threshold", "nan", "--threshold nan is outside [0, 1)"),
    ("--commit-every", BIG, "--commit-every"),
])
def test_bad_index_options_are_refused(monet_bin, index_setup, tmp_path, option, value, phrase):
    model, corpus, _ = index_setup
    db = tmp_path / "i.db"
    proc = run(monet_bin, "index", "--model", model, "--corpus", corpus, "--out", str(db), option, value)
    expect_error(proc, phrase)
    assert not db.exists()


# ---- outputs that cannot be written: a file size limit, a read-only folder ------------------

def fsize_limit(nbytes):
    """preexec_fn: RLIMIT_FSIZE as a full disk would stop the writes."""
    import resource

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def snapshot(folder):
    """Every file under folder: relative path -> bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def test_forward_out_past_the_size_limit(monet_bin, tmp_path):
    out = tmp_path / "out.safetensors"
    assert run(monet_bin, "forward", "--ids", "1,5,9", "--out", str(out)).returncode == 0
    before = snapshot(tmp_path)
    # the new output (4 tokens x 8192 logits + routers) is larger than the 64 KiB allowed
    proc = run(monet_bin, "forward", "--ids", "1,5,9,7", "--out", str(out), preexec_fn=fsize_limit(64 << 10))
    expect_error(proc, str(out), "write failed (File too large)")  # was: killed by SIGXFSZ, a .tmp file left
    assert snapshot(tmp_path) == before


def test_training_checkpoint_past_the_size_limit(monet_bin, tmp_path, train_data):
    out = tmp_path / "run"
    args = ["train", "--data", train_data, "--tokenizer", DEFAULT_MODEL, "--out", str(out), "--seq", "16",
            "--batch", "2", "--eval-every", "0", "--hidden", "64", "--heads", "2", "--kv-heads", "2", "--layers", "2",
            "--experts", "16", "--moe-heads", "2", "--moe-dim", "8", "--save-every", "2"]
    proc = run(monet_bin, *args, "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    before = snapshot(out)
    size = len(before[os.path.join("step-000002", "model.safetensors")])
    proc = run(monet_bin, *args, "--steps", "4", "--resume", preexec_fn=fsize_limit(size // 2))
    expect_error(proc, "model.safetensors", "write failed (File too large)")
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "train.csv"} == {k: v for k, v in before.items() if k != "train.csv"}
    assert run(monet_bin, "info", "--model", str(out / "step-000002")).returncode == 0
    # with room again, the run resumes from its last checkpoint
    assert run(monet_bin, *args, "--steps", "4", "--resume").returncode == 0
    assert (out / "step-000004" / "model.safetensors").exists()


def test_index_commit_past_the_size_limit(monet_bin, index_setup, tmp_path):
    model, corpus, root = index_setup
    more = root / "more.txt"
    more.write_text("to the north: 42 + 17 = 59; the rate is set. " * 300)
    db = str(tmp_path / "i.db")
    assert run(monet_bin, "index", "--model", model, "--corpus", corpus, "--out", db, *INDEX_OPTS).returncode == 0
    before = index_rows(db)
    proc = run(monet_bin, "index", "--model", model, "--corpus", corpus, str(more), "--out", db, *INDEX_OPTS, "--resume",
               preexec_fn=fsize_limit(100 << 10))
    expect_error(proc, db, "cannot write the index", "it keeps its last commit")
    assert index_rows(db) == before
    assert run(monet_bin, "index", "--model", model, "--corpus", corpus, str(more), "--out", db, *INDEX_OPTS,
               "--resume").returncode == 0
    one = str(tmp_path / "one.db")
    assert run(monet_bin, "index", "--model", model, "--corpus", corpus, str(more), "--out", one, *INDEX_OPTS).returncode == 0
    assert index_rows(db)[:2] == index_rows(one)[:2]


@pytest.fixture
def readonly(monet_bin, index_setup):
    """A folder this test's monet runs cannot write: chmod 0555, or for root
    (whom permissions do not stop) monet run as nobody in a root-owned folder.
    Returns (folder, run_limited, model, corpus); files of the folder are made first."""
    import shutil
    import tempfile
    model, corpus, _ = index_setup
    base = tempfile.mkdtemp(prefix="monet-readonly-")
    os.chmod(base, 0o755)
    try:
        # everything the limited run reads, where nobody can reach it
        binary = os.path.join(base, "monet")
        shutil.copy2(monet_bin, binary)
        shutil.copytree(model, os.path.join(base, "model"))
        shutil.copy2(corpus, os.path.join(base, "a.txt"))
        folder = os.path.join(base, "out")
        os.mkdir(folder, 0o755)
        as_root = os.geteuid() == 0

        def run_limited(*args):
            def drop():
                if as_root:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
            if not as_root:
                os.chmod(folder, 0o555)
            try:
                return run(binary, *args, preexec_fn=drop)
            finally:
                os.chmod(folder, 0o755)
        yield folder, run_limited, os.path.join(base, "model"), os.path.join(base, "a.txt")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_outputs_in_a_read_only_folder(monet_bin, readonly):
    folder, run_limited, model, corpus = readonly
    out = os.path.join(folder, "out.safetensors")
    assert run(monet_bin, "forward", "--model", model, "--ids", "1,5,9", "--out", out).returncode == 0
    db = os.path.join(folder, "i.db")
    assert run(monet_bin, "index", "--model", model, "--corpus", corpus, "--out", db, *INDEX_OPTS,
               "--max-tokens", "30").returncode == 0
    before = snapshot(folder)
    expect_error(run_limited("forward", "--model", model, "--ids", "1,5,9,7", "--out", out), out, "cannot create")
    expect_error(run_limited("index", "--model", model, "--corpus", corpus, "--out", db, *INDEX_OPTS, "--resume"), db)
    expect_error(run_limited("train", "--data", corpus, "--tokenizer", model, "--out", os.path.join(folder, "run"),
                             "--steps", "1", "--seq", "8", "--batch", "1", "--eval-every", "0"), "run")
    assert snapshot(folder) == before
