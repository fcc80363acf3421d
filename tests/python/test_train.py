"""Training (docs/training.md). First the PyTorch reference itself (train_ref):
autograd against finite differences, the training-mode forward against the
float64 inference reference. Then the C++ trainer against train_ref:
`monet grad` (one forward+backward), `monet train` trajectories, resume, the
saved checkpoints, and bad input."""
import csv
import json
import os
import random
import shutil
import subprocess
import time

import numpy as np
import pytest

from conftest import require
torch = require("torch", "Debian python3-torch")

from monet_ref import reference, train_ref  # noqa: E402
from monet_ref.make_checkpoint import make_checkpoint  # noqa: E402
from monet_ref.safetensors_io import read_safetensors  # noqa: E402

# name -> make_checkpoint arguments (vocab 256, d 64, E 32, H 4, m 8, k 4 unless set)
CASES = {
    "vd": dict(decompose="vertical", layers=3, groups=2),
    "hd": dict(decompose="horizontal", layers=3, groups=2),
    "vd-gqa": dict(decompose="vertical", layers=2, groups=2, heads=4, kv_heads=2),
    "hd-g3": dict(decompose="horizontal", layers=5, groups=3),  # routers at 0, 3; layers 1, 2, 4 reuse
    "vd-tied": dict(decompose="vertical", layers=2, groups=1, tie=True),
}
TOKENS = np.random.default_rng(5).integers(0, 256, size=(3, 9))  # B=3 sequences of T+1=9 ids


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / max(np.abs(ref).max(), 1e-300))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-ckpt")
    out = {}
    for i, (name, kw) in enumerate(CASES.items()):
        out[name] = str(root / name)
        make_checkpoint(out[name], seed=300 + i, **kw)
    return out


# ---- the torch reference itself ----------------------------------------------------------

def selection(routers):
    """Everything piecewise constant in the loss: kept entries, arg-maxes (L_amb), the clamp (L_unif)."""
    parts = []
    for g in (g for pair in routers for g in pair):
        parts += [(g > 0).flatten(), g.argmax(-1).flatten(), (g.flatten(0, -3).mean(0) >= 1e-6).flatten()]
    return torch.cat([p.long() for p in parts])


@pytest.mark.parametrize("name", ["vd", "hd"])
def test_autograd_matches_finite_differences(checkpoints, name):
    """Central differences (eps 1e-6) of the float64 loss, aux losses weighted 0.5 so
    that their gradient is not lost in the LM's, at 3 coordinates per tensor (two with
    large gradient, one random). A coordinate whose +-eps moves a router selection
    (the loss jumps there) is skipped; few are."""
    model = train_ref.load_trainable(checkpoints[name])
    aux, eps, rng = 0.5, 1e-6, np.random.default_rng(0)
    grads = train_ref.loss_and_grads(model, TOKENS, aux)

    @torch.no_grad()
    def loss_at():
        (loss, *_), routers = train_ref.objective(model, TOKENS, aux)
        return loss.item(), selection(routers)

    _, base_sel = loss_at()
    checked = skipped = 0
    for key, p in model.named_parameters():
        g = grads["grad." + train_ref.hf_name(key)].ravel()
        top = np.argsort(-np.abs(g))[:max(4, g.size // 10)]
        flat = p.data.view(-1)
        for i in [*rng.choice(top, 2, replace=False), rng.integers(g.size)]:
            orig = flat[i].item()
            flat[i] = orig + eps
            up, sel_up = loss_at()
            flat[i] = orig - eps
            down, sel_down = loss_at()
            flat[i] = orig
            if not (torch.equal(sel_up, base_sel) and torch.equal(sel_down, base_sel)):
                skipped += 1
                continue
            fd = (up - down) / (2 * eps)
            # f64 round-off of the loss (~1e-15) over 2 eps gives ~1e-9 of noise
            assert abs(fd - g[i]) <= 1e-9 + 1e-6 * np.abs(g).max(), (key, i, fd, g[i])
            checked += 1
    assert skipped <= checked // 10, (checked, skipped)


@pytest.mark.parametrize("name", ["vd", "hd-g3"])
def test_training_forward_is_the_reference_with_batch_statistics(checkpoints, name):
    """Training mode = inference with the running statistics replaced by the batch's;
    the running statistics are updated as torch's BatchNorm1d(H) in training mode."""
    path = checkpoints[name]
    model = train_ref.load_trainable(path)
    inputs, captured = {}, {}
    for l, layer in enumerate(model.layers):
        if hasattr(layer, "router"):
            layer.router.register_forward_hook(lambda mod, args, out, l=l: inputs.__setitem__(l, args[0]))
            captured[l] = {k: v.clone() for k, v in layer.router.named_buffers()}
    ids = torch.as_tensor(TOKENS[:, :-1])
    with torch.no_grad():
        logits, routers = train_ref.forward_train(model, ids)
    out = train_ref.loss_and_grads(path, TOKENS, aux_weight=0.0)
    assert out["loss"][0] == out["loss_lm"][0]
    ref = reference.load(path)
    for l, y in inputs.items():
        router = model.layers[l].router
        for s in ("1", "2"):
            norm = getattr(router, "norm" + s)
            mean, var = norm.batch_stats
            ref.w[f"model.layers.{l}.router.norm{s}.running_mean"] = mean.numpy()
            ref.w[f"model.layers.{l}.router.norm{s}.running_var"] = var.numpy()
            # the running statistics after one micro-batch, as torch's own BatchNorm1d would leave them
            rm, rv = captured[l][f"norm{s}.running_mean"], captured[l][f"norm{s}.running_var"]
            z = getattr(router, "w" + s)(y).unflatten(-1, (router.H, router.E)).transpose(-1, -2).reshape(-1, router.H)
            torch.nn.functional.batch_norm(z.detach(), rm, rv, training=True, momentum=0.1, eps=1e-5)
            assert torch.allclose(norm.running_mean, rm, rtol=1e-13, atol=1e-15)
            assert torch.allclose(norm.running_var, rv, rtol=1e-13, atol=1e-15)
    for b in range(len(TOKENS)):
        ref_logits, ref_routers = reference.forward(ref, TOKENS[b, :-1])
        assert rel_err(logits[b].numpy(), ref_logits) < 1e-12
        for (g1, g2), (r1, r2) in zip(routers, ref_routers.values()):
            assert rel_err(g1[b].numpy(), r1) < 1e-12 and rel_err(g2[b].numpy(), r2) < 1e-12


def test_schedule_and_sampler():
    lrs = [train_ref.lr_at(s, 10, 1.0, 3, 0.1) for s in range(10)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and lrs[3] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    # splitmix64 from seed 0: the reference values of Vigna's splitmix64.c
    rng = train_ref.SplitMix64(0)
    assert [rng.next() for _ in range(2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


# ---- `monet grad` against train_ref.loss_and_grads ------------------------------------------

def monet(monet_bin, *args, ok=True, timeout=300):
    proc = subprocess.run([monet_bin, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype,aux", [("f64", 0.0), ("f64", 0.3), ("f32", 0.3)])
def test_grad_matches_reference(monet_bin, checkpoints, tmp_path, name, dtype, aux):
    """f64: only summation order differs, so gradients agree to 1e-9 of each tensor's
    largest entry and the losses to 1e-10 (a router selection flip would be far off).
    f32 against the float64 reference: 1e-4 (torch f32 itself is within 2e-6)."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(" ".join(map(str, row)) + "\n" for row in TOKENS))
    out = tmp_path / "grad.safetensors"
    monet(monet_bin, "grad", "--model", checkpoints[name], "--tokens", tokens, "--out", out, "--dtype", dtype,
          "--aux-weight", aux, "--threads", 2)
    got = read_safetensors(str(out))
    ref = train_ref.loss_and_grads(checkpoints[name], TOKENS, aux)
    assert set(got) == set(ref)
    assert ("grad.lm_head.weight" in ref) == (not CASES[name].get("tie"))
    loss_tol, grad_tol, stat_tol = (1e-10, 1e-9, 1e-12) if dtype == "f64" else (1e-4, 1e-4, 1e-4)
    for key, want in ref.items():
        assert got[key].dtype == np.float64 and got[key].shape == want.shape, key
        tol = loss_tol if key.startswith("loss") else grad_tol if key.startswith("grad.") else stat_tol
        if key.startswith("loss") or key.startswith("running."):
            assert np.allclose(got[key], want, rtol=tol, atol=0), (key, got[key], want)
        else:
            assert rel_err(got[key], want) < tol, key


# ---- `monet train` against train_ref.train ----------------------------------------------------

# train_ref.train arguments, passed to `monet train` as --steps ... --seed
TRAIN = dict(steps=50, batch=2, seq=16, grad_accum=2, lr=3e-3, warmup=5, min_lr_ratio=0.1, weight_decay=0.1,
             clip=1.0, aux_weight=1e-3, seed=1234)  # clip 1.0 is active: the gradient norm is about 2-3
CLI = dict(eval_every=10, val_tokens=200, val_fraction=0.1, save_every=25, keep=5, threads=2)
WORDS = "the a of to in is that it was for on as with he they at be this from have or by one had not but what".split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A checkpoint with the tiny tokenizer (vocab 301) and a folder of three documents."""
    root = tmp_path_factory.mktemp("train-corpus")
    ckpt = str(root / "init")
    make_checkpoint(ckpt, decompose="vertical", layers=3, groups=2, vocab=301, tokenizer=True, seed=77)
    rng = np.random.default_rng(9)
    (root / "docs").mkdir()
    for i in range(3):
        (root / "docs" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, 300)) + ".\n")
    return ckpt, str(root / "docs")


def flags(**kw):
    """{"grad_accum": 2, "resume": True} -> ["--grad-accum", "2", "--resume"]"""
    return [a for k, v in kw.items() for a in (["--" + k.replace("_", "-")] + ([] if v is True else [str(v)]))]


def train_args(corpus, out, dtype, data=None, **over):
    """The arguments of `monet train --init` the corpus checkpoint with TRAIN and CLI, changed by `over`."""
    ckpt, docs = corpus
    return ["train", "--data", data or docs, "--tokenizer", ckpt, "--init", ckpt, "--out", out, "--dtype", dtype,
            *flags(**{**TRAIN, **CLI, **over})]


def run_train(monet_bin, corpus, out, dtype, ok=True, data=None, **over):
    """`monet train --init` the corpus checkpoint with TRAIN and CLI, changed by `over`."""
    return monet(monet_bin, *train_args(corpus, out, dtype, data, **over), ok=ok)


def read_csv(out):
    with open(os.path.join(out, "train.csv")) as f:
        return list(csv.DictReader(f))


def close(text: str, want: float, rel: float) -> bool:
    """A train.csv number within rel of want, give or take half a unit of its last printed
    digit (train.csv prints %.8f / %.6e: the check is as tight as the printing allows)."""
    mant, _, exp = text.lower().partition("e")
    return abs(float(text) - want) <= rel * abs(want) + 0.5 * 10.0 ** (int(exp or 0) - len(mant.partition(".")[2]))


def read_bin(out, split):
    return np.fromfile(os.path.join(out, "data", f"{split}.bin"), dtype="<u4")


@pytest.fixture(scope="session")
def trajectories(monet_bin, corpus, tmp_path_factory):
    """{"f64"/"f32": (OUT dir, train.csv rows), "ref": (train_ref's StepLogs, its model after
    training)}; train_ref runs in float64 on the f64 run's OUT/data/{train,val}.bin."""
    out = {}
    for dtype in ("f64", "f32"):
        d = str(tmp_path_factory.mktemp("train-" + dtype))
        run_train(monet_bin, corpus, d, dtype)
        out[dtype] = (d, read_csv(d))
    d = out["f64"][0]
    model = train_ref.load_trainable(corpus[0], torch.float64)
    log = train_ref.train(model, read_bin(d, "train"), **TRAIN, dtype=torch.float64, val_tokens=read_bin(d, "val"),
                          eval_every=CLI["eval_every"], val_max_tokens=CLI["val_tokens"])
    out["ref"] = (log, model)
    return out


@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_train_matches_reference(trajectories, dtype):
    """f64: both sides in float64 and only summation orders differ (~1e-16 per op); 50
    AdamW steps amplify that to ~1e-12 at most, so 1e-8 has room, while a router
    selection flip at the threshold would show as a jump of ~1e-4 or more. f32 against
    the float64 reference: torch's own f32 run stays within 4e-7 over these 50 steps;
    its validation loss (inference-mode routing, 176 tokens) once moved by 3e-4 from a
    selection flip, hence 2e-3 there."""
    tol, val_tol = (1e-8, 1e-8) if dtype == "f64" else (2e-5, 2e-3)
    (d, rows), (log, _) = trajectories[dtype], trajectories["ref"]
    train_bin, val_bin = read_bin(d, "train"), read_bin(d, "val")
    assert len(train_bin) > TRAIN["seq"] and len(val_bin) > 0
    assert train_bin.max() < 301 and train_bin[0] == 1  # the first document starts with bos
    for split in ("train", "val"):  # the reference ran on the f64 run's data
        assert np.array_equal(read_bin(d, split), read_bin(trajectories["f64"][0], split))
    assert [int(r["step"]) for r in rows] == list(range(1, TRAIN["steps"] + 1))
    per_step = TRAIN["batch"] * TRAIN["seq"] * TRAIN["grad_accum"]
    for s, (row, ref) in enumerate(zip(rows, log)):
        assert int(row["tokens"]) == (s + 1) * per_step
        assert close(row["lr"], ref.lr, 1e-12)
        for col in ("loss", "loss_lm", "loss_unif", "loss_amb", "grad_norm"):
            assert close(row[col], getattr(ref, col), tol), (s + 1, col, row[col], getattr(ref, col))
        if row["val_loss"]:
            assert ref.val_loss is not None and close(row["val_loss"], ref.val_loss, val_tol), (s + 1, row["val_loss"])
    assert sum(bool(r["val_loss"]) for r in rows) >= TRAIN["steps"] // CLI["eval_every"]
    assert np.mean([r.loss for r in log[-10:]]) < np.mean([r.loss for r in log[:10]]) - 0.1  # it learns


def test_final_checkpoint(monet_bin, trajectories, corpus, tmp_path):
    """step-000050 (f64 run) is an HF checkpoint with tokenizer and optimizer state; it loads
    in `monet forward` and in reference.py and holds train_ref's weights and running stats."""
    d, (_, model) = trajectories["f64"][0], trajectories["ref"]
    assert sorted(n for n in os.listdir(d) if n.startswith("step-")) == ["step-000025", "step-000050"]
    final = os.path.join(d, "step-000050")
    for f in ("config.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json"):
        assert os.path.exists(os.path.join(final, f)), f
    init, saved = reference.load(corpus[0]), reference.load(final)
    for k in ("hidden_size", "num_hidden_layers", "moe_experts", "moe_groups", "moe_decompose", "vocab_size"):
        assert saved.config[k] == init.config[k]
    assert set(saved.w) == set(init.w)  # num_batches_tracked too: HF loads it
    # saved weights may be float32: 1e-6 of each tensor's largest entry
    for name, want in train_ref.weights(model).items():
        assert rel_err(saved.w[name], want) < 1e-6, name
    ids = [1, 17, 42, 5, 99, 250, 3, 7]
    ref_logits, _ = reference.forward(saved, ids)
    model.eval()
    with torch.no_grad():
        torch_logits, _ = model(torch.tensor([ids]))
    assert rel_err(torch_logits[0].numpy(), ref_logits) < 1e-5
    out = tmp_path / "logits.safetensors"
    monet(monet_bin, "forward", "--model", final, "--ids", ",".join(map(str, ids)), "--out", out)
    assert rel_err(read_safetensors(str(out))["logits"], ref_logits) < 1e-4


def test_resume_gives_the_same_run(monet_bin, corpus, tmp_path):
    """20 steps straight vs 10 steps then the same command with --steps 20 --resume:
    identical rows and weights (f32, same threads). --min-lr-ratio 1 makes the schedule
    independent of --steps, so that the 10-step run's steps are those of the 20-step run."""
    over = dict(steps=20, save_every=10, eval_every=5, min_lr_ratio=1.0, warmup=3)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train(monet_bin, corpus, straight, "f32", **over)
    run_train(monet_bin, corpus, resumed, "f32", **{**over, "steps": 10})
    assert sorted(os.listdir(resumed)).count("step-000010") == 1
    run_train(monet_bin, corpus, resumed, "f32", **over, resume=True)
    cols = ["step", "tokens", "lr", "loss", "loss_lm", "loss_unif", "loss_amb", "grad_norm", "val_loss"]
    a = [[r[c] for c in cols] for r in read_csv(straight)]
    b = {r["step"]: [r[c] for c in cols] for r in read_csv(resumed)}  # the resumed run's rows win
    assert len(a) == 20 and [b.get(str(s)) for s in range(1, 21)] == a
    wa = read_safetensors(os.path.join(straight, "step-000020", "model.safetensors"))
    wb = read_safetensors(os.path.join(resumed, "step-000020", "model.safetensors"))
    assert set(wa) == set(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)


CSV_COLS = ["step", "tokens", "lr", "loss", "loss_lm", "loss_unif", "loss_amb", "grad_norm", "val_loss"]
DEAD_PID = 4194311  # above the largest possible pid_max (2^22): never a live process


def test_kill_anywhere_then_resume(monet_bin, corpus, tmp_path):
    """SIGKILL `monet train` at seeded random moments (before the first checkpoint, while a
    checkpoint is being written, between a train.csv row and the next checkpoint, at random
    delays), each time restarting the same command (with --resume once a checkpoint exists)
    until it finishes. After every kill each step-* folder is a complete checkpoint that
    loads; at the end train.csv holds exactly the uninterrupted run's rows, the weights and
    optimizer state are bit for bit the same, and no temporary file or folder is left.
    Also injected before one resume: the leftovers of a kill in mid-write (a partial CSV
    row, another process's temporary files and a half-deleted pruned checkpoint) and of a
    kill between a checkpoint's rename and the pruning (one checkpoint too many)."""
    over = dict(steps=30, save_every=3, keep=2, eval_every=5, threads=1)
    base, out = str(tmp_path / "base"), str(tmp_path / "killed")
    run_train(monet_bin, corpus, base, "f32", **over)
    cmd = [monet_bin, *train_args(corpus, out, "f32", **over)]

    def ls(d=out):
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def checkpoints():
        return [n for n in ls() if n.startswith("step-")]

    def rows():
        try:
            with open(os.path.join(out, "train.csv")) as f:
                return f.read().count("\n") - 1
        except FileNotFoundError:
            return -1

    def run_until(ready, resume, limit=60.0):
        """Starts the command, SIGKILLs it once ready() (None: lets it finish); returns (rc, stderr)."""
        proc = subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while ready is not None and proc.poll() is None and time.monotonic() - t0 < limit:
            if ready(t0, proc.pid):
                proc.kill()
                break
            time.sleep(0.0002)
        return proc.wait(timeout=limit), proc.communicate()[1]

    def check_checkpoints():
        for name in checkpoints():
            d = os.path.join(out, name)
            assert {"config.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json"} <= set(ls(d)), d
            monet(monet_bin, "info", "--model", d)

    # 1. Killed before the first checkpoint (after a train.csv row): --resume has nothing to
    # resume and says so; the same command without --resume then starts afresh.
    for _ in range(5):
        shutil.rmtree(out, ignore_errors=True)
        rc, _ = run_until(lambda t0, pid: rows() >= 1, resume=False)
        assert rc == -9
        if not checkpoints():
            break
    else:
        pytest.fail("could not kill the run before its first checkpoint")
    assert rows() >= 1 and "train_options.json" in ls()
    proc = monet(monet_bin, *cmd[1:], "--resume", ok=False)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and err.startswith("monet: error: "), proc.stderr
    assert "no complete checkpoint" in err and "without --resume" in err, err

    # 2. Kills at seeded moments until the run completes; the first start is without --resume
    # and must not mind the killed run's train.csv and train_options.json.
    rng = random.Random(2024)
    modes = ["tmp", "row", "delay", "tmp", "inject", "row", "tmp", "delay", "tmp", "row", "delay", "tmp"]
    hits = dict(tmp=0, row=0, extra=0)
    archive = str(tmp_path / "archive")
    for i in range(60):
        mode = modes[i] if i < len(modes) else None
        resume = bool(checkpoints())
        pruned = [n for n in ls(archive) if resume and n < checkpoints()[0]]
        if i >= 4 and pruned and not hits["extra"]:
            # killed between a checkpoint's rename and the pruning: one older checkpoint too many
            shutil.copytree(os.path.join(archive, pruned[-1]), os.path.join(out, pruned[-1]))
            hits["extra"] += 1
        if mode == "inject":
            with open(os.path.join(out, "train.csv"), "a") as f:  # a row cut short, no newline
                f.write(f"{rows() + 1},4242,3.0e-03,5.12")
            for junk in (f".step-000099.tmp-{DEAD_PID}", f".step-000001.old-{DEAD_PID}"):
                os.makedirs(os.path.join(out, junk))
                with open(os.path.join(out, junk, "optimizer.safetensors"), "w") as f:
                    f.write("cut short")
            for junk in (f"train.csv.tmp.{DEAD_PID}", f"data/train.bin.tmp.{DEAD_PID}"):
                with open(os.path.join(out, junk), "w") as f:
                    f.write("cut short")
            mode = "delay"
        # A whole run may take less than the longest delay: while a kill the checks below
        # count has not happened yet (in a checkpoint's write; a row ahead; one older
        # checkpoint archived before a resume pruned it, for the injection above), a run
        # that may finish is killed that way instead.
        pending = [m for m in ("tmp", "row") if not hits[m]] + (["ckpt"] if not hits["extra"] else [])
        if mode in ("delay", None) and pending:
            mode = pending[i % len(pending)]
        if mode == "tmp":  # while a checkpoint is being written
            ready = lambda t0, pid: any(n.endswith(f".tmp-{pid}") for n in ls())  # noqa: E731
        elif mode == "row":  # a train.csv row ahead of the newest checkpoint
            target = max(rows(), 0) + rng.randint(1, 2)
            ready = lambda t0, pid: rows() >= target and rows() % over["save_every"] != 0  # noqa: E731
        elif mode == "ckpt":  # once a newer checkpoint is complete (step-* folders appear by rename)
            newest = checkpoints()[-1] if checkpoints() else ""
            ready = lambda t0, pid, n=newest: bool(checkpoints()) and checkpoints()[-1] > n  # noqa: E731
        elif mode == "delay":
            delay = rng.uniform(0.02, 0.4)
            ready = lambda t0, pid, d=delay: time.monotonic() - t0 >= d  # noqa: E731
        else:
            ready = None
        rc, err = run_until(ready, resume)
        if rc == 0:
            break
        assert rc == -9, err
        if mode == "tmp" and any(n.startswith(".step-") and ".tmp-" in n for n in ls()):
            hits["tmp"] += 1  # killed with a half-written checkpoint folder (older ones went at the start)
        if mode == "row" and checkpoints() and rows() > int(checkpoints()[-1][5:]):
            hits["row"] += 1
        check_checkpoints()
        for name in checkpoints():
            if not os.path.exists(os.path.join(archive, name)):
                shutil.copytree(os.path.join(out, name), os.path.join(archive, name))
    assert rc == 0, err
    assert hits["tmp"] >= 1 and hits["row"] >= 1 and hits["extra"] == 1, hits

    # 3. The same run as the uninterrupted one, and nothing left behind.
    assert [[r[c] for c in CSV_COLS] for r in read_csv(out)] == [[r[c] for c in CSV_COLS] for r in read_csv(base)]
    assert ls() == ls(base) and ls(os.path.join(out, "data")) == ls(os.path.join(base, "data"))
    assert checkpoints() == ["step-000027", "step-000030"]
    check_checkpoints()
    for name in checkpoints():
        for f in ("model.safetensors", "optimizer.safetensors"):
            want, got = (read_safetensors(os.path.join(d, name, f)) for d in (base, out))
            assert set(got) == set(want), (name, f)
            for k in want:
                assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), (name, f, k)
        logits = [tmp_path / f"{name}-{d}.safetensors" for d in ("base", "out")]
        for d, path in zip((base, out), logits):
            monet(monet_bin, "forward", "--model", os.path.join(d, name), "--ids", "1,17,42,5", "--out", path,
                  "--threads", 1)
        assert np.array_equal(*(read_safetensors(str(p))["logits"] for p in logits))


@pytest.mark.parametrize("case", ["missing", "empty-dir", "empty-file", "seq-too-long"])
def test_bad_training_input(monet_bin, corpus, tmp_path, case):
    data, over = tmp_path / "no-such-corpus", {}
    if case == "empty-dir":
        data = tmp_path / "empty-corpus"
        data.mkdir()
    elif case == "empty-file":
        data = tmp_path / "empty.txt"
        data.write_text("")
    elif case == "seq-too-long":
        data = tmp_path / "short.txt"
        data.write_text("the cat sat on the mat.\n")
        over = dict(seq=256)
    out = tmp_path / "out"
    proc = run_train(monet_bin, corpus, str(out), "f32", ok=False, data=str(data), steps=3, **over)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]  # after any progress lines
    assert err.startswith("monet: error: "), proc.stderr
    if case == "missing":
        assert "no-such-corpus" in err, err
    elif case == "seq-too-long":
        assert "seq" in err, err
    else:
        assert os.path.basename(str(data)) in err or "empty" in err.lower(), err
    assert not (out.exists() and any(n.startswith("step-") for n in os.listdir(out))), "no checkpoint on failure"


def test_unreadable_token_cache_meta_is_rebuilt(monet_bin, corpus, tmp_path):
    # A meta.json cut short (or not JSON at all) means "rebuild the cache", never a crash.
    first = tmp_path / "first"
    run_train(monet_bin, corpus, str(first), "f32", steps=2)
    want = read_bin(str(first), "train")
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "meta.json").write_text("not json")
    run_train(monet_bin, corpus, str(out), "f32", steps=2)
    assert np.array_equal(read_bin(str(out), "train"), want)
    assert json.loads((out / "data" / "meta.json").read_text())["counts"]["train"] == len(want)
