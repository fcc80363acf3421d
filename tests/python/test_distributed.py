"""Data-parallel training and distributed indexing over MPI (docs/distributed.md):
`mpirun -np 2 monet train` against the same run on one process (per-step losses,
gradient norms and final weights), resume with another process count, a killed
rank and a failing rank, and `mpirun -np 2 monet index` against the one-process
index, row for row. Needs OpenMPI (Debian openmpi-bin) and a monet built with
MPI: missing either fails under CI=true (skips elsewhere)."""
import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import numpy as np
import pytest

from monet_ref.make_checkpoint import make_checkpoint
from monet_ref.safetensors_io import read_safetensors

WORDS = "the a of to in is that it was for on as with he they at be this from have or by one had not but what".split()


def mpirun(n: int) -> list:
    """mpirun -np n for the tests: oversubscribed (2 cores here), no core binding, as root where CI runs as root."""
    exe = shutil.which("mpirun")
    if exe is None:
        message = "mpirun not found (Debian openmpi-bin; scripts/deps.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    args = [exe, "-np", str(n), "--oversubscribe", "--bind-to", "none"]
    if os.getuid() == 0:
        args.append("--allow-run-as-root")
    return args


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               # containers often forbid the cross-memory-attach syscalls of the shared-memory transport
               OMPI_MCA_btl_vader_single_copy_mechanism="none", OMPI_MCA_btl="self,vader,tcp",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    return env


def run(monet_bin, *args, ranks=None, ok=True, timeout=600):
    """`monet ARGS`, alone (ranks None) or under mpirun -np ranks."""
    cmd = (mpirun(ranks) if ranks else []) + [monet_bin, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env())
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def mpi_monet(monet_bin):
    """The binary, checked to run two ranks (a monet built without MPI refuses them)."""
    proc = run(monet_bin, "train", "--help", ranks=2, ok=False, timeout=120)
    if proc.returncode != 0:
        message = f"`mpirun -np 2 monet` does not run (monet built without MPI?): {proc.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return monet_bin


# ---- training ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{"vd"/"hd": checkpoint with the tiny tokenizer}, a folder of three documents."""
    root = tmp_path_factory.mktemp("dist-corpus")
    ckpts = {}
    for i, decompose in enumerate(("vertical", "horizontal")):
        ckpts[decompose[0] + "d"] = str(root / decompose)
        make_checkpoint(ckpts[decompose[0] + "d"], decompose=decompose, layers=3, groups=2, vocab=301, tokenizer=True,
                        seed=90 + i)
    rng = np.random.default_rng(11)
    (root / "docs").mkdir()
    for i in range(3):
        (root / "docs" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, 300)) + ".\n")
    return ckpts, str(root / "docs")


# aux losses weighted 0.3 so that their gradients matter; batch 4 (2 rows per rank), 2 micro-batches
TRAIN = dict(steps=20, batch=4, seq=16, grad_accum=2, lr=3e-3, warmup=5, aux_weight=0.3, eval_every=10,
             val_tokens=200, val_fraction=0.1, save_every=10, keep=5, threads=1, seed=4321)


def train(monet_bin, corpus, name, out, dtype, ranks=None, ok=True, **over):
    ckpts, docs = corpus
    args = ["train", "--data", docs, "--tokenizer", ckpts[name], "--init", ckpts[name], "--out", out, "--dtype", dtype]
    for k, v in {**TRAIN, **over}.items():
        args += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
    return run(monet_bin, *args, ranks=ranks, ok=ok)


def read_csv(out):
    with open(os.path.join(out, "train.csv")) as f:
        return list(csv.DictReader(f))


COLS = ("loss", "loss_lm", "loss_unif", "loss_amb", "grad_norm")


# f32 runs: once a summed gradient's last bits differ between process counts, a top-k choice on a
# near tie can flip on some later step (HD flips at step 6 on an Intel AMX machine, never on an AMD
# one), after which the two runs agree only as close runs do. f64 runs meet no such tie here and are
# held to rounding on every step; f32 runs are held to it up to the first flip and to FLIP_TOL after.
FLIP_TOL = 2e-2


def assert_same_curve(rows_a, rows_b, tol, steps, flip_tol=None) -> float:
    """Per-step losses, gradient norms and validation losses within tol (relative); with flip_tol,
    within flip_tol from the first step (after the first) that exceeds tol. Returns the tolerance
    the final weights meet: tol, or flip_tol once a flip was seen."""
    assert [int(r["step"]) for r in rows_a] == [int(r["step"]) for r in rows_b] == steps
    now = tol
    for a, b in zip(rows_a, rows_b):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        pairs = [(col, float(a[col]), float(b[col])) for col in COLS]
        assert bool(a["val_loss"]) == bool(b["val_loss"])
        if a["val_loss"]:
            pairs.append(("val_loss", float(a["val_loss"]), float(b["val_loss"])))
        if (flip_tol is not None and now == tol and int(a["step"]) > steps[0]
                and any(abs(x - y) > tol * max(abs(y), 1e-3) for _, x, y in pairs)):
            now = flip_tol
        for col, x, y in pairs:
            assert abs(x - y) <= now * max(abs(y), 1e-3), (a["step"], col, x, y, now)
    return now


def final_weights(out, step, dtype):
    """The trained weights: f64 runs keep them exactly as master.* in optimizer.safetensors."""
    d = os.path.join(out, f"step-{step:06d}")
    if dtype == "f64":
        opt = read_safetensors(os.path.join(d, "optimizer.safetensors"))
        return {k[len("master."):]: v for k, v in opt.items() if k.startswith("master.")}
    return read_safetensors(os.path.join(d, "model.safetensors"))


@pytest.mark.parametrize("name", ["vd", "hd"])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_two_ranks_train_as_one(mpi_monet, corpus, tmp_path, name, dtype):
    """20 steps on 2 ranks (each half of every global batch of 4, synchronised BatchNorm
    statistics, aux losses over the global batch, summed gradients) give the 1-process
    run's per-step losses, gradient norms, validation losses and final weights: only
    summation orders differ (f32: 1e-5 up to a top-k flip, FLIP_TOL after; f64: 1e-12, relative)."""
    tol, flip_tol = (1e-5, FLIP_TOL) if dtype == "f32" else (1e-12, None)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(mpi_monet, corpus, name, one, dtype)
    out = train(mpi_monet, corpus, name, two, dtype, ranks=2)
    assert "2 processes (mpi)" in out.stderr
    rows_one, rows_two = read_csv(one), read_csv(two)
    tol = assert_same_curve(rows_two, rows_one, tol, list(range(1, 21)), flip_tol)
    assert {r["ranks"] for r in rows_one} == {"1"} and {r["ranks"] for r in rows_two} == {"2"}
    assert all(int(r["comm_bytes"]) > 0 for r in rows_two)  # the gradient all-reduce at least
    assert sorted(n for n in os.listdir(two) if n.startswith("step-")) == ["step-000010", "step-000020"]
    wa, wb = final_weights(one, 20, dtype), final_weights(two, 20, dtype)
    assert wa and set(wa) == set(wb)
    for k in wa:
        if k.endswith("num_batches_tracked"):
            assert np.array_equal(wa[k], wb[k]), k
            continue
        scale = max(float(np.abs(wa[k]).max()), 1e-30)
        assert float(np.abs(wa[k].astype(np.float64) - wb[k]).max()) <= tol * scale, k


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_zero1_trains_as_one(mpi_monet, corpus, tmp_path, dtype):
    """--zero1 on 2 ranks (AdamW moments sharded, gradients reduce-scattered, weights
    all-gathered): the 1-process run's curve, final weights and AdamW moments."""
    tol, flip_tol = (1e-5, FLIP_TOL) if dtype == "f32" else (1e-12, None)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(mpi_monet, corpus, "vd", one, dtype)
    out = train(mpi_monet, corpus, "vd", two, dtype, ranks=2, zero1=True)
    assert "ZeRO-1: each rank keeps the AdamW moments of" in out.stderr
    tol = assert_same_curve(read_csv(two), read_csv(one), tol, list(range(1, 21)), flip_tol)
    wa, wb = final_weights(one, 20, dtype), final_weights(two, 20, dtype)
    oa = read_safetensors(os.path.join(one, "step-000020", "optimizer.safetensors"))
    ob = read_safetensors(os.path.join(two, "step-000020", "optimizer.safetensors"))
    assert set(oa) == set(ob)
    for tensors_a, tensors_b in ((wa, wb), ({k: v for k, v in oa.items() if k.startswith("exp_avg.")},
                                            {k: v for k, v in ob.items() if k.startswith("exp_avg.")})):
        for k in tensors_a:
            scale = max(float(np.abs(tensors_a[k]).max()), 1e-30)
            assert float(np.abs(tensors_a[k].astype(np.float64) - tensors_b[k]).max()) <= tol * scale, k


def test_resume_with_another_rank_count(mpi_monet, corpus, tmp_path):
    """10 steps on 2 ranks, then --resume on 1 rank to 20, then on 3 ranks with --zero1 to
    30 (--batch 4 split 1+1+2, uneven parameter shards): the curve of 30 steps on one
    process."""
    over = dict(steps=30, min_lr_ratio=1.0)  # a schedule independent of --steps
    straight, mixed = str(tmp_path / "straight"), str(tmp_path / "mixed")
    train(mpi_monet, corpus, "vd", straight, "f32", **over)
    train(mpi_monet, corpus, "vd", mixed, "f32", ranks=2, **{**over, "steps": 10})
    train(mpi_monet, corpus, "vd", mixed, "f32", **{**over, "steps": 20}, resume=True)
    train(mpi_monet, corpus, "vd", mixed, "f32", ranks=3, **over, resume=True, zero1=True)
    rows = read_csv(mixed)
    assert [r["ranks"] for r in rows] == ["2"] * 10 + ["1"] * 10 + ["3"] * 10
    assert_same_curve(rows, read_csv(straight), 1e-5, list(range(1, 31)), FLIP_TOL)


def rank_pid(mpirun_pid: int, rank: int):
    """The pid of `rank` among mpirun's children (OpenMPI sets OMPI_COMM_WORLD_RANK), or None."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != mpirun_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(entry)
    return None


def test_killed_rank_stops_the_job(mpi_monet, corpus, tmp_path):
    """SIGKILL rank 1 of a 2-rank run after its first checkpoint: mpirun ends every rank
    (none waits forever in an all-reduce) and says which rank died; the last checkpoint
    loads and --resume on one process continues from it."""
    out = str(tmp_path / "killed")
    ckpts, docs = corpus
    args = ["train", "--data", docs, "--tokenizer", ckpts["vd"], "--init", ckpts["vd"], "--out", out, "--dtype", "f32"]
    for k, v in {**TRAIN, "steps": 100000, "save_every": 3, "eval_every": 0}.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    proc = subprocess.Popen(mpirun(2) + [mpi_monet, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=mpi_env())
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "step-000003")) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        victim = rank_pid(proc.pid, 1)
        assert victim is not None, "rank 1 not found among mpirun's children"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)  # the job must end, not hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    text = stdout + stderr
    assert "rank 1" in text and ("signal 9" in text or "Killed" in text), text[-3000:]
    steps = sorted(int(n[5:]) for n in os.listdir(out) if n.startswith("step-"))
    assert steps and steps[-1] >= 3 and steps[-1] % 3 == 0
    last = os.path.join(out, f"step-{steps[-1]:06d}")
    run(mpi_monet, "info", "--model", last)
    train(mpi_monet, corpus, "vd", out, "f32", resume=True, steps=steps[-1] + 2, eval_every=0, save_every=3)
    assert int(read_csv(out)[-1]["step"]) == steps[-1] + 2


def test_error_on_one_rank_stops_every_rank(mpi_monet, corpus, tmp_path):
    """--out is a file: rank 0 fails to create the output folder while rank 1 waits for the
    data it broadcasts; rank 0 prints the error with its rank and MPI_Abort ends both."""
    bad = tmp_path / "a-file"
    bad.write_text("not a folder")
    start = time.time()
    proc = train(mpi_monet, corpus, "vd", str(bad), "f32", ranks=2, ok=False)
    assert proc.returncode != 0 and time.time() - start < 300
    assert "monet: error: rank 0 of 2: " in proc.stderr and str(bad) in proc.stderr, proc.stderr[-3000:]


def test_other_commands_refuse_several_processes(mpi_monet, corpus):
    proc = run(mpi_monet, "info", "--model", corpus[0]["vd"], ranks=2, ok=False)
    assert proc.returncode != 0 and "only `monet train` and `monet index` run on several processes" in proc.stderr


def test_batch_smaller_than_ranks_is_refused(mpi_monet, corpus, tmp_path):
    proc = train(mpi_monet, corpus, "vd", str(tmp_path / "o"), "f32", ranks=2, ok=False, batch=1)
    assert proc.returncode != 0 and "--batch 1 is smaller than the number of processes (2)" in proc.stderr


# ---- indexing ---------------------------------------------------------------------------------

CORPUS_A = "the heat at the east seat is the other one. "
CORPUS_B = "to the north: 42 + 17 = 59; the rate is set. "


@pytest.fixture(scope="module")
def index_setup(tmp_path_factory):
    """A checkpoint and three documents: a long one (many windows), a short one, a middle one."""
    root = tmp_path_factory.mktemp("dist-index")
    model = str(root / "vd")
    make_checkpoint(model, vocab=301, layers=2, groups=1, seed=41, tokenizer=True, max_pos=256)
    docs = [root / "long.txt", root / "short.txt", root / "mid.txt"]
    docs[0].write_text(CORPUS_A * 40)
    docs[1].write_text(CORPUS_B)
    docs[2].write_text((CORPUS_B + CORPUS_A) * 5)
    return model, [str(d) for d in docs], root


def index_rows(db):
    con = sqlite3.connect(db)
    try:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        return (q("SELECT grp, expert, count, max_prob FROM experts ORDER BY 1, 2"),
                q("SELECT grp, expert, prob, doc, pos, token, context, focus FROM activations ORDER BY 1, 2, 3, 4, 5"),
                q("SELECT doc, path, tokens FROM documents ORDER BY doc"),
                q("SELECT key, value FROM meta ORDER BY key"))
    finally:
        con.close()


def index(monet_bin, setup, out, *extra, ranks=None, ok=True):
    model, docs, _ = setup
    return run(monet_bin, "index", "--model", model, "--corpus", *docs, "--out", out, "--context", "16",
               "--top-k", "3", "--threads", "1", *extra, ranks=ranks, ok=ok)


def test_two_ranks_index_as_one(mpi_monet, index_setup):
    """Windows shared by 2 (and 3) ranks, partial top-k merged on rank 0 at every commit
    (also inside the long document): the same index, row for row, as one process."""
    root = index_setup[2]
    one = str(root / "one.db")
    index(mpi_monet, index_setup, one)
    rows = index_rows(one)
    assert len(rows[1]) > 100 and len(rows[2]) == 3
    for ranks, commit_every in ((2, "1000000"), (2, "37"), (3, "50")):
        db = str(root / f"r{ranks}-{commit_every}.db")
        out = index(mpi_monet, index_setup, db, "--commit-every", commit_every, ranks=ranks)
        assert out.stdout.count("indexed ") == 1  # rank 0 reports
        assert index_rows(db) == rows, (ranks, commit_every)


def test_index_resume_with_other_rank_counts(mpi_monet, index_setup):
    """Stopped inside the long document on 2 ranks, continued on 1 rank into the middle one,
    finished on 2 ranks: the one-process index."""
    root = index_setup[2]
    one = str(root / "resume-one.db")
    index(mpi_monet, index_setup, one)
    db = str(root / "resume.db")
    index(mpi_monet, index_setup, db, "--max-tokens", "100", "--commit-every", "30", ranks=2)
    con = sqlite3.connect(db)
    partial = json.loads(con.execute("SELECT value FROM meta WHERE key = 'partial'").fetchone()[0])
    con.close()
    assert partial["doc"] == 0 and partial["next"] == 105  # 7 windows of 15 tokens
    long_tokens = index_rows(one)[2][0][2]
    index(mpi_monet, index_setup, db, "--resume", "--max-tokens", str(long_tokens), "--commit-every", "40")
    index(mpi_monet, index_setup, db, "--resume", "--commit-every", "25", ranks=2)
    assert index_rows(db) == index_rows(one)
