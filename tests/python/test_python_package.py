"""The Python package (`import monet`, built by scripts/build_python.sh and
installed into the test venv): forward against the float64 reference on the
random test checkpoints, equality with the CLI (forward, experts, generate,
eval-loss, masks), errors, thread safety, Ctrl-C, and the wheel in a fresh
venv."""
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from monet_ref import reference
from monet_ref.make_checkpoint import make_checkpoint
from monet_ref.safetensors_io import read_safetensors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import monet
except ImportError as e:  # a test of the package fails without it, in CI and elsewhere
    monet = None
    IMPORT_ERROR = str(e)


@pytest.fixture(scope="session", autouse=True)
def installed_package():
    if monet is None:
        pytest.fail(f"import monet failed ({IMPORT_ERROR}): build and install it first (bash scripts/build_python.sh)")
    # the installed package, not the source tree (python/monet has no built module)
    assert not os.path.abspath(monet.__file__).startswith(os.path.join(REPO, "python")), monet.__file__


CASES = {
    "vd": dict(decompose="vertical", layers=4, groups=2),
    "hd": dict(decompose="horizontal", layers=4, groups=2),
    "vd-g1": dict(decompose="vertical", layers=3, groups=1),
    "hd-g3-odd": dict(decompose="horizontal", layers=5, groups=3),
    "vd-gqa": dict(decompose="vertical", layers=3, groups=2, heads=4, kv_heads=2),
    "vd-tied": dict(decompose="vertical", layers=2, groups=2, tie=True),
    "vd-bf16": dict(decompose="vertical", layers=3, groups=2, dtype="BF16"),
    "hd-3shards": dict(decompose="horizontal", layers=3, groups=3, shards=3),
}
IDS = [1, 17, 42, 5, 99, 250, 3, 7, 128, 64, 31, 200]


def tolerance(case):
    return 1e-5


def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def run(*cmd, ok=True, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyckpt")
    out = {}
    for i, (name, kw) in enumerate(CASES.items()):
        path = str(root / name)
        make_checkpoint(path, seed=300 + i, **kw)
        out[name] = (path, reference.forward(reference.load(path), IDS))
    return out


# Compared with the CLI bit for bit: exact float32 products on both sides. (compute "auto" takes
# bf16 products for the bf16 default model where the CPU has them natively; oneDNN compiles a
# primitive per row count on its second use, so the rounding then depends on the process's history.)
CLI_F32 = ("--compute", "f32")


@pytest.fixture(scope="session")
def default_model():
    return monet.Model(compute="f32")


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference(checkpoints, name):
    path, (ref_logits, ref_routers) = checkpoints[name]
    m = monet.Model(path, compute="f32")  # exact: compared with the float64 reference
    out = m.forward(IDS)
    tol = tolerance(CASES[name])
    assert set(out) == {"logits"} | {f"router.{l}.g{s}" for l in ref_routers for s in (1, 2)}
    assert m.router_layers == sorted(ref_routers)
    assert out["logits"].dtype == np.float32 and out["logits"].shape == ref_logits.shape
    assert rel_err(out["logits"], ref_logits) < tol
    for l, (g1, g2) in ref_routers.items():
        for s, g in ((1, g1), (2, g2)):
            got = out[f"router.{l}.g{s}"]
            assert got.dtype == np.float32 and got.shape == g.shape
            assert rel_err(got, g) < tol, f"router.{l}.g{s}"


@pytest.mark.parametrize("name", list(CASES))
def test_captures_match_reference(checkpoints, name):
    """capture=: the residual stream and block outputs of every layer are the float64
    reference's intermediates; only the names asked for come back."""
    path, _ = checkpoints[name]
    ref = reference.load(path)
    trace = {}
    reference.forward(ref, IDS, trace=trace)
    m = monet.Model(path, compute="f32")
    names = [f"{kind}.{l}" for l in range(ref.config["num_hidden_layers"])
             for kind in ("resid_pre", "attn_out", "moe_out", "resid_post")]
    out = m.forward(IDS, capture=names)
    assert set(out) == set(m.forward(IDS)) | set(names)
    for k in names:
        assert out[k].dtype == np.float32 and out[k].shape == (len(IDS), ref.config["hidden_size"]), k
        assert rel_err(out[k], trace[k]) < tolerance(CASES[name]), k
        assert not out[k].flags["OWNDATA"] and out[k].flags["C_CONTIGUOUS"]  # the library's buffer
    # a subset, with or without logits and routing: only those
    some = m.forward(IDS, logits=None, routing=False, capture=("moe_out.1", "resid_pre.0"))
    assert set(some) == {"moe_out.1", "resid_pre.0"}
    for k in some:
        np.testing.assert_array_equal(some[k], out[k], err_msg=k)
    np.testing.assert_array_equal(m.forward(IDS, capture="attn_out.0")["attn_out.0"], out["attn_out.0"])


def test_capture_errors(checkpoints):
    m = monet.Model(checkpoints["vd"][0])  # 4 layers
    for bad in ("resid_pre.4", "resid.0", "attn_out", "moe_out.-1", "resid_post.x"):
        with pytest.raises(monet.Error, match="capture"):
            m.forward(IDS, capture=[bad])
    with pytest.raises(monet.Error, match="twice"):
        m.forward(IDS, capture=["moe_out.0", "moe_out.0"])


def test_forward_equals_cli(checkpoints, monet_bin, tmp_path):
    """The same library call as `monet forward`: the same numbers, bit for bit."""
    path = checkpoints["vd"][0]
    run(monet_bin, "forward", "--model", path, "--ids", ",".join(map(str, IDS)), "--out", tmp_path / "o.safetensors")
    cli = read_safetensors(str(tmp_path / "o.safetensors"))
    out = monet.Model(path).forward(IDS)
    assert set(out) == set(cli)
    for k in cli:
        np.testing.assert_array_equal(out[k], cli[k], err_msg=k)


def test_forward_options(checkpoints):
    m = monet.Model(checkpoints["hd"][0])
    full = m.forward(IDS)
    last = m.forward(IDS, logits="last")
    np.testing.assert_allclose(last["logits"], full["logits"][-1:], rtol=1e-5, atol=1e-6)
    routing = m.forward(IDS, logits=None)  # stops after the last router
    assert set(routing) == set(full) - {"logits"}
    for k in routing:
        np.testing.assert_array_equal(routing[k], full[k])
    assert set(m.forward(IDS, routing=False)) == {"logits"}
    # handed over without a copy: the arrays own nothing, a capsule holds the library's buffer
    a = full["logits"]
    assert not a.flags["OWNDATA"] and a.base is not None and a.flags["C_CONTIGUOUS"] and a.flags["WRITEABLE"]
    # numpy ids and text
    np.testing.assert_array_equal(m.forward(np.array(IDS, dtype=np.int64))["logits"], full["logits"])


def test_long_forward_in_chunks(tmp_path, monet_bin):
    """Beyond 512 tokens the module feeds the KV cache in chunks (for Ctrl-C); the result is the
    one-call result of the CLI to float rounding."""
    path = str(tmp_path / "long")
    make_checkpoint(path, seed=5, layers=2, groups=2, max_pos=2048)
    ids = list(np.random.default_rng(1).integers(0, 256, 1300))
    run(monet_bin, "forward", "--model", path, "--ids", ",".join(map(str, ids)), "--out", tmp_path / "o.safetensors")
    cli = read_safetensors(str(tmp_path / "o.safetensors"))
    m = monet.Model(path)
    out = m.forward(ids, capture=["resid_post.1", "attn_out.0"])
    for k in cli:
        assert out[k].shape == cli[k].shape
        assert rel_err(out[k], cli[k]) < 1e-5, k
    # captures are joined across chunks: the first rows are those of the first 512 tokens alone
    head = m.forward(ids[:512], logits=None, routing=False, capture=["resid_post.1", "attn_out.0"])
    for k in head:
        assert out[k].shape == (1300, 64)
        assert rel_err(out[k][:512], head[k]) < 1e-5, k


def mask_matrices(mask, E):
    """{group: [E, E] expert weights} of a monet.Mask (the product of the scales covering each
    expert), for reference.forward's explicit sum."""
    M = {}
    for g, e, scale in mask.experts:
        M.setdefault(g, np.ones((E, E)))[e // E, e % E] *= scale
    for g, side, i, scale in mask.components:
        m = M.setdefault(g, np.ones((E, E)))
        if side == 1:
            m[i, :] *= scale
        else:
            m[:, i] *= scale
    return M


def test_mask(checkpoints, monet_bin, tmp_path):
    path, (_, ref_routers) = checkpoints["vd"]
    m = monet.Model(path)
    top = m.experts(IDS, threshold=0.0)[3]["groups"][0]["experts"][0]  # the strongest expert of token 3, group 0
    mask = monet.Mask(experts=[(0, top[0])], components=[(1, 2, 5), (0, 1, 7)])
    mask.save(tmp_path / "mask.json")
    assert monet.Mask.load(tmp_path / "mask.json") == mask
    out = m.forward(IDS, mask=mask)
    # the float64 reference, experts removed one by one
    ref_logits, ref_routers_m = reference.forward(reference.load(path), IDS, masks=mask_matrices(mask, 32))
    assert rel_err(out["logits"], ref_logits) < 1e-5
    for l, (g1, g2) in ref_routers_m.items():
        assert rel_err(out[f"router.{l}.g1"], g1) < 1e-5 and rel_err(out[f"router.{l}.g2"], g2) < 1e-5
    assert rel_err(out["logits"], m.forward(IDS)["logits"]) > 1e-4  # the mask does something
    # and the CLI with the same file
    run(monet_bin, "forward", "--model", path, "--ids", ",".join(map(str, IDS)), "--out", tmp_path / "o.safetensors",
        "--mask", tmp_path / "mask.json")
    cli = read_safetensors(str(tmp_path / "o.safetensors"))
    for k in cli:
        np.testing.assert_array_equal(out[k], cli[k], err_msg=k)
    # experts: removed ones listed apart, as `monet experts --json --mask`
    got = m.experts(IDS, threshold=0.01, mask=mask)
    want = json.loads(run(monet_bin, "experts", "--model", path, "--ids", ",".join(map(str, IDS)), "--json",
                          "--mask", tmp_path / "mask.json").stdout)
    for g_tok, w_tok in zip(got, want["tokens"]):
        for g, w in zip(g_tok["groups"], w_tok["groups"]):
            assert [e[0] for e in g["removed"]] == [e["id"] for e in w["removed"]]
            assert [e[0] for e in g["experts"]] == [e["id"] for e in w["experts"]]


@pytest.mark.parametrize("name", ["vd", "hd"])
def test_mask_scale(checkpoints, name):
    """Scale 0 is removal; scale s multiplies the expert's term (steering): the explicitly
    scaled sum of the float64 reference."""
    path, _ = checkpoints[name]
    m = monet.Model(path)
    strong = [g["experts"][0][0] for g in m.experts(IDS, threshold=0.0)[5]["groups"]]  # token 5's top expert per group
    removal = monet.Mask(experts=[(0, strong[0])])
    assert monet.Mask(experts=[(0, strong[0], 0.0)]) == removal
    np.testing.assert_array_equal(m.forward(IDS, mask=removal)["logits"],
                                  m.forward(IDS, mask=monet.Mask(experts=[(0, strong[0], 0)]))["logits"])
    steer = monet.Mask(experts=[(0, strong[0], 2.0), (1, strong[1], 3.5)], components=[(0, 2, 4, 0.5), (1, 1, 9, 0.0)])
    ref = reference.load(path)
    want, want_routers = reference.forward(ref, IDS, masks=mask_matrices(steer, 32))
    got = m.forward(IDS, mask=steer)
    assert rel_err(got["logits"], want) < 1e-5
    for l, (g1, g2) in want_routers.items():
        assert rel_err(got[f"router.{l}.g1"], g1) < 1e-5 and rel_err(got[f"router.{l}.g2"], g2) < 1e-5
    plain, _ = reference.forward(ref, IDS)
    assert rel_err(want, plain) > 1e-3  # the scales change the output
    assert monet.Mask.load(_saved(steer)) == steer


def _saved(mask):
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "mask.json")
    mask.save(path)
    return path


def test_experts_equal_cli(default_model, monet_bin):
    text = "The whale swam towards the ship"
    got = default_model.experts(text, threshold=0.02)
    want = json.loads(run(monet_bin, "experts", "-p", text, "--threshold", "0.02", "--json", *CLI_F32).stdout)["tokens"]
    assert len(got) == len(want) == len(default_model.tokenize(text))
    for g_tok, w_tok in zip(got, want):
        assert (g_tok["position"], g_tok["id"], g_tok["piece"]) == (w_tok["position"], w_tok["id"], w_tok["piece"])
        assert len(g_tok["groups"]) == len(w_tok["groups"]) == 4
        for g, w in zip(g_tok["groups"], w_tok["groups"]):
            assert g["count"] == w["count"] and "removed" not in g
            assert [(e[0], e[1], e[2]) for e in g["experts"]] == [(e["id"], e["i"], e["j"]) for e in w["experts"]]
            np.testing.assert_allclose([e[3] for e in g["experts"]], [e["p"] for e in w["experts"]], rtol=1e-6)
            assert all(e[0] == e[1] * 64 + e[2] and e[3] > 0.02 for e in g["experts"])


def cli_generate(monet_bin, *args):
    line = run(monet_bin, "generate", "--print-ids", *CLI_F32, *args).stdout.strip()
    return [int(x) for x in line.split(",")] if line else []


def test_generate_equals_cli(default_model, monet_bin):
    prompt = "It was a fine morning, and"
    g = default_model.generate(prompt, max_tokens=24, temperature=0)
    assert g.ids == cli_generate(monet_bin, "-p", prompt, "-n", "24", "--temperature", "0")
    assert g.text == default_model.detokenize(g.ids) and len(g.ids) == 24 and g.finish_reason == "length"
    assert g.prompt_tokens == len(default_model.tokenize(prompt))
    # sampled: the same seed, the same tokens as the CLI
    kw = dict(max_tokens=20, temperature=0.9, top_k=30, top_p=0.9, min_p=0.02, repeat_penalty=1.1, seed=7)
    s = default_model.generate(prompt, **kw)
    assert s.ids == cli_generate(monet_bin, "-p", prompt, "-n", "20", "--temperature", "0.9", "--top-k", "30",
                                 "--top-p", "0.9", "--min-p", "0.02", "--repeat-penalty", "1.1", "--seed", "7")
    assert default_model.generate(prompt, **kw).ids == s.ids
    # a prompt of ids, and the stream: its pieces join to generate()'s text
    ids = default_model.tokenize(prompt)
    assert default_model.generate(ids, max_tokens=24, temperature=0).ids == g.ids
    pieces = list(default_model.stream(prompt, **kw))
    assert len(pieces) > 3 and "".join(pieces) == s.text


def test_stop_strings(default_model, monet_bin):
    prompt = "It was a fine morning, and"
    full = default_model.generate(prompt, max_tokens=24, temperature=0)
    stop = full.text[10:14]  # a string the greedy continuation contains
    g = default_model.generate(prompt, max_tokens=24, temperature=0, stop=[stop, "zzz-never"])
    assert g.finish_reason == "stop" and g.text == full.text[:full.text.index(stop)]
    cli = run(monet_bin, "generate", "-p", prompt, "-n", "24", "--temperature", "0", "--stop", stop, *CLI_F32).stdout
    assert cli.rstrip("\n") == g.text
    assert "".join(default_model.stream(prompt, max_tokens=24, temperature=0, stop=stop)) == g.text
    with pytest.raises(monet.Error, match="stop"):
        default_model.generate(prompt, stop=[""])


def test_greedy_generate_matches_reference(checkpoints):
    """Greedy ids are the float64 reference's argmax, token by token (a tiny f32 checkpoint)."""
    path = checkpoints["vd"][0]
    ref = reference.load(path)
    prompt, want = [1, 17, 42, 5], []
    for _ in range(10):
        logits, _ = reference.forward(ref, prompt + want)
        top2 = np.sort(logits[-1])[-2:]
        assert top2[1] - top2[0] > 1e-4  # no near-tie that float32 could flip
        want.append(int(np.argmax(logits[-1])))
    g = monet.Model(path).generate(prompt, max_tokens=10, temperature=0)
    # the checkpoint has no tokenizer: ids only, and EOS (id 2) would end it early
    assert g.ids == want[:len(g.ids)] and (len(g.ids) == 10 or want[len(g.ids)] == 2)


def test_stream_closed_early(default_model):
    it = default_model.stream("Once upon a time", max_tokens=200, temperature=0)
    first = next(it)
    it.close()  # the worker stops at its next token and is joined
    assert first
    assert default_model.generate("Once", max_tokens=3, temperature=0).ids  # the model is still usable


def test_eval_loss_equals_cli(default_model, monet_bin, tmp_path):
    text = open(os.path.join(REPO, "models", "monet-vd-books", "README.md"), encoding="utf-8").read()[:6000]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    want = json.loads(run(monet_bin, "eval-loss", "--data", tmp_path / "t.txt", "--context", "128", "--json",
                          *CLI_F32).stdout)
    loss, ppl = default_model.eval_loss(text, context=128)
    assert abs(loss - want["loss"]) < 2e-6 and abs(ppl - np.exp(loss)) < 1e-9 * ppl
    for bad in (1, 513):
        with pytest.raises(monet.Error, match="context"):
            default_model.eval_loss(text, context=bad)


def test_model_basics(default_model):
    m = default_model
    assert m.config["model_type"] == "monet" and m.config["moe_experts"] == 64 and "auto_map" in m.config
    assert os.path.samefile(m.path, monet.DEFAULT_MODEL) and m.threads >= 1
    ids = m.tokenize("Hello world")
    assert ids[0] == 1 and m.tokenize("Hello world", add_special=False) == ids[1:]
    assert m.detokenize(ids) == "Hello world" and m.detokenize(ids, skip_special=False).startswith("<s>")
    assert monet.Model(threads=1).threads == 1


def test_errors(checkpoints, tmp_path):
    assert issubclass(monet.Error, ValueError)
    with pytest.raises(monet.Error, match="no-such-dir"):
        monet.Model(str(tmp_path / "no-such-dir"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(monet.Error, match="config.json"):
        monet.Model(tmp_path / "broken")
    path = checkpoints["vd"][0]
    m = monet.Model(path)
    for bad in ([1, 2, 256], [-1], [5, 2**40]):
        with pytest.raises(monet.Error, match="outside the vocabulary"):
            m.forward(bad)
    with pytest.raises(monet.Error, match="no tokens"):
        m.forward([])
    with pytest.raises(TypeError):
        m.forward([1.5, 2.0])
    with pytest.raises(monet.Error, match="logits"):
        m.forward(IDS, logits="first")
    with pytest.raises(monet.Error, match="no tokenizer"):
        m.tokenize("text")  # the random checkpoint has no tokenizer files
    # masks: checked against the model, messages naming the file
    with pytest.raises(monet.Error, match="group"):
        m.forward(IDS, mask=monet.Mask(experts=[(7, 1)]))
    with pytest.raises(monet.Error, match="expert"):
        m.forward(IDS, mask=monet.Mask(experts=[(0, 32 * 32)]))
    with pytest.raises(monet.Error, match="side"):
        m.forward(IDS, mask=monet.Mask(components=[(0, 3, 1)]))
    (tmp_path / "bad.json").write_text(json.dumps({"experts": [{"group": 0, "expert": 99999}]}))
    with pytest.raises(monet.Error, match="bad.json"):
        m.forward(IDS, mask=monet.Mask.load(tmp_path / "bad.json"))
    (tmp_path / "bad2.json").write_text(json.dumps({"expert": []}))
    with pytest.raises(monet.Error, match='bad2.json: unknown key "expert"'):
        monet.Mask.load(tmp_path / "bad2.json")
    (tmp_path / "bad3.json").write_text("{")
    with pytest.raises(monet.Error, match="bad3.json: not valid JSON"):
        monet.Mask.load(tmp_path / "bad3.json")
    with pytest.raises(monet.Error, match="cannot open"):
        monet.Mask.load(tmp_path / "missing.json")
    with pytest.raises(TypeError):
        m.forward(IDS, mask={"experts": []})
    with pytest.raises(monet.Error, match="temperature"):
        m.generate([1, 2], temperature=-1)
    with pytest.raises(monet.Error, match="threads"):
        monet.Model(path, threads=-2)


def test_threads_share_one_model(checkpoints, default_model):
    """4 threads on one Model (GIL released in compute) give the serial results, bit for bit."""
    m = monet.Model(checkpoints["hd"][0])
    inputs = [list(np.random.default_rng(s).integers(0, 256, 10 + 7 * s)) for s in range(8)]
    capture = ["resid_pre.1", "moe_out.2"]
    serial = [m.forward(ids, capture=capture) for ids in inputs]
    prompts = ["It was a fine morning", "The whale", "Call me", "She said"]
    serial_gen = [default_model.generate(p, max_tokens=12, temperature=0).ids for p in prompts]
    results, gens, errors = {}, {}, []

    def work(k):
        try:
            for rep in range(3):
                for i in range(k, len(inputs), 4):
                    results[(i, rep)] = m.forward(inputs[i], capture=capture)
            gens[k] = default_model.generate(prompts[k], max_tokens=12, temperature=0).ids
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 3 * len(inputs)
    for (i, rep), out in results.items():
        assert set(out) == set(serial[i])
        for k in serial[i]:
            np.testing.assert_array_equal(out[k], serial[i][k], err_msg=f"input {i} rep {rep} {k}")
    assert [gens[k] for k in range(4)] == serial_gen


INTERRUPT = textwrap.dedent("""
    import sys, time, monet
    what = sys.argv[1]
    if what == "forward":
        from monet_ref.make_checkpoint import make_checkpoint
        make_checkpoint(sys.argv[2], seed=1, layers=2, groups=2, hidden=128, max_pos=16384)
        m = monet.Model(sys.argv[2])
        ids = [i % 256 for i in range(16384)]
        m.forward(ids[:600])  # warm
        call = lambda: m.forward(ids)
    elif what in ("generate", "stream"):
        from monet_ref.make_checkpoint import make_checkpoint
        make_checkpoint(sys.argv[2], seed=1, vocab=301, layers=2, groups=2, hidden=128, max_pos=16384,
                        tokenizer=True, extra_config={"eos_token_id": None})  # no EOS: it runs to max_tokens
        m = monet.Model(sys.argv[2])
        kw = dict(max_tokens=16000, temperature=0)
        call = (lambda: m.generate([1, 5, 9], **kw)) if what == "generate" else (lambda: list(m.stream([1, 5, 9], **kw)))
    else:
        m = monet.Model()
        text = open(sys.argv[2]).read() * 40
        call = lambda: m.eval_loss(text, context=512)
    t0 = time.time()
    print("started", flush=True)
    try:
        call()
        print("finished", time.time() - t0, flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.time() - t0, flush=True)
""")


@pytest.mark.parametrize("what", ["forward", "generate", "stream", "eval_loss"])
def test_ctrl_c_interrupts(tmp_path, what):
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT)
    arg = tmp_path / "ckpt" if what != "eval_loss" else os.path.join(REPO, "models", "monet-vd-books", "README.md")
    # the installed package first, then python/ for monet_ref (python/monet is the unbuilt source)
    site = os.path.dirname(os.path.dirname(os.path.abspath(monet.__file__)))
    env = dict(os.environ, PYTHONPATH=site + os.pathsep + os.path.join(REPO, "python"))
    proc = subprocess.Popen([sys.executable, str(script), what, str(arg)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(1.0)
    t_signal = time.time()
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0
    assert out.startswith("interrupted"), out  # not "finished": the call was cut short
    assert time.time() - t_signal < 10


def test_fresh_venv_wheel(tmp_path, monet_bin):
    """The wheel alone (no build tree, no checkout): install it into a new venv and generate
    with the embedded default model, as the README's check does."""
    wheels = sorted(glob.glob(os.path.join(REPO, "build-python", "dist", "monet_cpp-*.whl")), key=os.path.getmtime)
    assert wheels, "no wheel in build-python/dist: run bash scripts/build_python.sh"
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", venv)  # numpy from the system
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheels[-1])
    code = "import monet; print(monet.Model().generate('Once', max_tokens=8, temperature=0).text, end='')"
    got = run(venv / "bin" / "python", "-c", code, cwd=tmp_path, env={"PATH": os.environ["PATH"]}).stdout
    site = run(venv / "bin" / "python", "-c", "import monet, os; print(os.path.dirname(monet.__file__))",
               cwd=tmp_path).stdout.strip()
    assert site.startswith(str(venv))
    assert REPO not in run("readelf", "-d", glob.glob(os.path.join(site, "_monet*.so"))[0]).stdout  # no build-tree RUNPATH
    # the CLI in a fresh process too (compute "auto" as the README's check: see CLI_F32)
    want = run(monet_bin, "generate", "-p", "Once", "-n", "8", "--temperature", "0").stdout.rstrip("\n")
    assert got == want and len(got) > 5


# --- OpenAI-shaped completions ---------------------------------------------

def test_create_completion(default_model):
    m = default_model
    prompt = "It was a fine morning, and"
    g = m.generate(prompt, max_tokens=12, temperature=0)
    c = m.create_completion(prompt, max_tokens=12, temperature=0)
    assert c["object"] == "text_completion" and c["id"].startswith("cmpl-") and isinstance(c["created"], int)
    assert c["choices"] == [{"text": g.text, "index": 0, "logprobs": None, "finish_reason": "length"}]
    n_prompt = len(m.tokenize(prompt))
    assert c["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12}
    assert m.create_completion(prompt, max_tokens=12, temperature=0, echo=True)["choices"][0]["text"] == prompt + g.text
    chunks = list(m.create_completion(prompt, max_tokens=12, temperature=0, stream=True))
    assert all(ch["object"] == "text_completion" and ch["id"] == chunks[0]["id"] for ch in chunks)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == g.text
    assert [ch["choices"][0]["finish_reason"] for ch in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1]["usage"] == c["usage"]
    # sampled with a seed: generate()'s text; a stop string ends it with "stop"
    kw = dict(max_tokens=16, temperature=0.9, top_k=30, seed=3)
    assert m.create_completion(prompt, **kw)["choices"][0]["text"] == m.generate(prompt, **kw).text
    stop = g.text[4:8]
    cut = m.create_completion(prompt, max_tokens=12, temperature=0, stop=stop)["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == g.text[:g.text.index(stop)]


def render_ids(monet_bin, model_dir, messages, tmp_path):
    f = tmp_path / "conv.json"
    f.write_text(json.dumps(messages))
    out = run(monet_bin, "chat", "--model", model_dir, "--render", f, "--add-generation-prompt").stdout
    return [int(x) for x in out.rsplit("\n", 2)[1].split(",")]


def test_create_chat_completion(default_model, monet_bin, tmp_path):
    """The checkpoint's chat template (the default model's: LLaMA-2) renders the prompt as
    `monet chat --render` does; the reply is greedy generate() from those ids."""
    m = default_model
    messages = [{"role": "system", "content": "You write like Jane Austen."},
                {"role": "user", "content": "Describe a ball."}]
    ids = render_ids(monet_bin, m.path, messages, tmp_path)
    want = m.generate(ids, max_tokens=20, temperature=0)
    c = m.create_chat_completion(messages, max_tokens=20, temperature=0)
    assert c["object"] == "chat.completion" and c["id"].startswith("chatcmpl-")
    assert c["choices"] == [{"index": 0, "message": {"role": "assistant", "content": want.text}, "logprobs": None,
                             "finish_reason": want.finish_reason}]
    assert c["usage"]["prompt_tokens"] == len(ids) and c["usage"]["completion_tokens"] == len(want.ids)
    chunks = list(m.create_chat_completion(messages, max_tokens=20, temperature=0, stream=True))
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == want.text
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason
    # a named format instead of the template; errors name what is wrong
    chatml = m.create_chat_completion(messages[1:], max_tokens=5, temperature=0, chat_format="chatml")
    assert chatml["usage"]["prompt_tokens"] == len(m.tokenize("<|im_start|>user\nDescribe a ball.<|im_end|>\n"
                                                              "<|im_start|>assistant\n", add_special=False))
    with pytest.raises(monet.Error, match="alternate"):
        m.create_chat_completion([{"role": "assistant", "content": "x"}])
    with pytest.raises(monet.Error, match="role"):
        m.create_chat_completion([{"content": "x"}])
    with pytest.raises(monet.Error, match="chat"):
        m.create_chat_completion(messages, chat_format="alpaca")


def test_chat_completion_ends_at_end_of_turn(tmp_path, monet_bin):
    """A ChatML checkpoint: <|im_end|> ends the reply (not part of it), as in `monet chat`."""
    from test_chat import TEMPLATES
    path = str(tmp_path / "chatml")
    make_checkpoint(path, vocab=301, layers=2, groups=2, seed=21, tokenizer=True, chat_template=TEMPLATES["chatml"])
    m = monet.Model(path)
    messages = [{"role": "user", "content": "Hi"}]
    ids = render_ids(monet_bin, path, messages, tmp_path)
    c = m.create_chat_completion(messages, max_tokens=8, temperature=0)
    assert c["usage"]["prompt_tokens"] == len(ids)
    assert c["choices"][0]["message"]["content"] == m.generate(ids, max_tokens=8, temperature=0).text[:len(
        c["choices"][0]["message"]["content"])]
    no_template = str(tmp_path / "plain")
    make_checkpoint(no_template, vocab=301, layers=2, groups=2, seed=2, tokenizer=True)
    with pytest.raises(monet.Error, match="chat_template"):
        monet.Model(no_template).create_chat_completion(messages)


# --- interpretability: domain experts, expert outputs, the index -------------

HELDOUT = os.path.join(REPO, "tests", "data", "heldout")


def test_find_experts_equal_cli(default_model, monet_bin, tmp_path):
    files = {"austen": os.path.join(HELDOUT, "austen-persuasion-end.txt"),
             "melville": os.path.join(HELDOUT, "melville-moby-dick-end.txt")}
    run(monet_bin, "find-experts", *[a for n, f in files.items() for a in ("--domain", f"{n}={f}")],
        "--out-dir", tmp_path / "masks", *CLI_F32)
    got = default_model.find_experts({n: open(f, encoding="utf-8").read() for n, f in files.items()})
    assert set(got) == set(files)
    for n in files:
        want = monet.Mask.load(tmp_path / "masks" / f"{n}.json")
        assert got[n] == want and len(got[n]) > 10, n
    with pytest.raises(monet.Error, match="two"):
        default_model.find_experts({"a": "text"})


def test_expert_outputs(default_model):
    outs = default_model.expert_outputs(1, 77, n=5)
    assert len(outs) == 5 and [o[2] for o in outs] == sorted((o[2] for o in outs), reverse=True)
    assert all(default_model.token_text(i) == t for i, t, _ in outs)
    with pytest.raises(monet.Error, match="expert"):
        default_model.expert_outputs(0, 64 * 64)
    with pytest.raises(monet.Error, match="group"):
        default_model.expert_outputs(4, 0)


def test_index(tmp_path, monet_bin):
    """Index.build writes what `monet index` writes; the queries return the viewer's data."""
    path = str(tmp_path / "vd")
    make_checkpoint(path, vocab=301, layers=2, groups=1, seed=41, tokenizer=True, max_pos=256)
    corpus = tmp_path / "a.txt"
    corpus.write_text("the heat at the east seat is the other one. " * 4 + "to the north: 42 + 17 = 59. " * 3)
    run(monet_bin, "index", "--model", path, "--corpus", corpus, "--out", tmp_path / "cli.db", "--context", "32",
        "--top-k", "4")
    m = monet.Model(path)
    ix = monet.Index.build(m, corpus, tmp_path / "py.db", context=32, top_k=4)
    cli = monet.Index(tmp_path / "cli.db")
    assert ix.tokens == cli.tokens == len(m.tokenize(corpus.read_text(), add_special=False))
    assert ix.settings == dict(cli.settings, model=ix.settings["model"])
    assert ix.settings["experts"] == 32 and ix.settings["groups"] == 2 and ix.settings["top_k"] == 4
    for g in range(2):
        top = ix.experts(g, limit=20)
        assert top == cli.experts(g, limit=20) and len(top) == 20
        assert [e["count"] for e in top] == sorted((e["count"] for e in top), reverse=True)
        assert ix.fired(g) >= 20 and ix.experts(g, limit=5, offset=3) == top[3:8]
        by_max = ix.experts(g, order="max", limit=10)
        assert [e["max_prob"] for e in by_max] == sorted((e["max_prob"] for e in by_max), reverse=True)
        e = ix.expert(g, top[0]["expert"])
        assert e == cli.expert(g, top[0]["expert"])
        assert e["count"] == top[0]["count"] and e["i"] * 32 + e["j"] == top[0]["expert"]
        assert 0 < len(e["contexts"]) <= 4
        assert [c["prob"] for c in e["contexts"]] == sorted((c["prob"] for c in e["contexts"]), reverse=True)
        for c in e["contexts"]:
            assert c["context"][c["focus"]] == c["token"]
    # search: the experts whose top contexts fire on a token, with how many of those contexts
    found = ix.search("the", limit=1000)
    assert found and found == cli.search("the", limit=1000) and ix.search(" the ", limit=3) == found[:3]
    for f in found[:6]:
        hits = [c for c in ix.expert(f["group"], f["expert"])["contexts"] if c["token"].strip() == "the"]
        assert f["contexts"] == len(hits) and abs(f["max_prob"] - max(c["prob"] for c in hits)) < 1e-12
    assert ix.search("zebra") == []
    never = ix.expert(0, next(i for i in range(1024) if i not in {e["expert"] for e in ix.experts(0, limit=1024)}))
    assert never["count"] == 0 and never["contexts"] == []
    with pytest.raises(monet.Error, match="order"):
        ix.experts(0, order="loud")
    with pytest.raises(monet.Error, match="group"):
        ix.expert(5, 0)
    with pytest.raises(monet.Error, match="nope.db"):
        monet.Index(tmp_path / "nope.db")
    (tmp_path / "junk.db").write_text("not a database")
    with pytest.raises(monet.Error, match="junk.db"):
        monet.Index(tmp_path / "junk.db")


# --- images (VisionMonet / llava_monet checkpoints) --------------------------

PHOTO = os.path.join(REPO, "tests", "data", "images", "grace_hopper.jpg")
LLAVA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                  "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from monet_ref import make_checkpoint as mc
    d = str(tmp_path_factory.mktemp("llava"))
    mc.make_llava_checkpoint(d, vocab=320, tokenizer=True, chat_template=LLAVA_TEMPLATE)
    return d


def test_forward_with_an_image_equals_cli(llava, monet_bin, tmp_path):
    """forward(image=...) is `monet vision --model`'s pass: the same ids, logits and routers, bit for bit."""
    ids = [1, 40, monet.IMAGE_TOKEN, 41, 42]
    run(monet_bin, "vision", "--model", llava, "--image", PHOTO, "--ids", ",".join(map(str, ids)),
        "--out", tmp_path / "v.safetensors")
    cli = read_safetensors(str(tmp_path / "v.safetensors"))
    m = monet.Model(llava)
    out = m.forward(ids, image=PHOTO, capture=["resid_post.0"])
    T = len(cli["ids"])
    assert T > len(ids) and out["ids"].dtype == np.int32 and list(out["ids"]) == list(cli["ids"])
    for k in ["logits"] + [k for k in cli if k.startswith("router.")]:
        np.testing.assert_array_equal(out[k], cli[k], err_msg=k)
    assert out["resid_post.0"].shape == (T, m.config["hidden_size"])
    # the bytes of the file, and a text prompt with <image>, give the same
    with open(PHOTO, "rb") as f:
        data = f.read()
    np.testing.assert_array_equal(m.forward(ids, image=data)["logits"], out["logits"])
    text = m.forward("look <image> here", image=[PHOTO])
    n_image = int((out["ids"] == monet.IMAGE_TOKEN).sum())
    head, tail = m.tokenize("look "), m.tokenize(" here", add_special=False)  # LLaVA: chunk by chunk
    assert list(text["ids"]) == head + [monet.IMAGE_TOKEN] * n_image + tail


def test_generate_with_an_image_equals_cli(llava, monet_bin):
    m = monet.Model(llava)
    ids = [1, 40, monet.IMAGE_TOKEN, 41, 42]
    want = cli_generate(monet_bin, "--model", llava, "--image", PHOTO, "--ids", ",".join(map(str, ids)), "-n", "8",
                        "--temperature", "0")
    g = m.generate(ids, image=PHOTO, max_tokens=8, temperature=0)
    assert g.ids == want and g.prompt_tokens > len(ids)
    prompt = "<image>\nWhat is it?"
    want_text = run(monet_bin, "generate", "--model", llava, "--image", PHOTO, "-p", prompt, "-n", "8",
                    "--temperature", "0").stdout.rstrip("\n")
    assert m.generate(prompt, image=PHOTO, max_tokens=8, temperature=0).text == want_text
    assert "".join(m.stream(prompt, image=PHOTO, max_tokens=8, temperature=0)) == want_text


def test_image_errors(llava, checkpoints, tmp_path):
    m = monet.Model(llava)
    with pytest.raises(monet.Error, match="placeholder|<image>"):
        m.forward("no placeholder here", image=PHOTO)
    with pytest.raises(monet.Error, match="ends with an image"):
        m.generate("look: <image>", image=PHOTO, max_tokens=2)
    with pytest.raises(monet.Error, match="image 0"):
        m.forward([1, monet.IMAGE_TOKEN, 5], image=b"not an image at all")
    with pytest.raises(monet.Error, match="missing.jpg"):
        m.forward([1, monet.IMAGE_TOKEN, 5], image=str(tmp_path / "missing.jpg"))
    with pytest.raises(TypeError):
        m.forward([1, monet.IMAGE_TOKEN, 5], image=3)
    with pytest.raises(monet.Error, match="outside the vocabulary"):
        m.forward([1, monet.IMAGE_TOKEN, 5])  # an image marker without an image
    with pytest.raises(monet.Error):  # a text-only checkpoint has no vision tower
        monet.Model(checkpoints["vd"][0]).forward([1, monet.IMAGE_TOKEN, 5], image=PHOTO)


def test_experts_with_an_image_equal_cli(llava, monet_bin):
    ids = [1, 40, monet.IMAGE_TOKEN, 41]
    want = json.loads(run(monet_bin, "experts", "--model", llava, "--image", PHOTO, "--ids", ",".join(map(str, ids)),
                          "--json").stdout)["tokens"]
    got = monet.Model(llava).experts(ids, image=PHOTO)
    assert len(got) == len(want) == 3 + 16
    for g_tok, w_tok in zip(got, want):
        for key in ("position", "id", "piece", "image", "patch", "row", "col"):
            assert g_tok.get(key) == w_tok.get(key), key
        for g, w in zip(g_tok["groups"], w_tok["groups"]):
            assert [e[0] for e in g["experts"]] == [e["id"] for e in w["experts"]]
