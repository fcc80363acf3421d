"""The safe torch.save reader (`monet torch-to-safetensors`), against torch.load.

Files written by torch.save (Debian's torch): bf16/f16/f32 tensors, scalars,
empty and strided views, storages shared by several tensors, state_dicts
(OrderedDict with _metadata), nn.Parameters, and a LLaVA mm_projector.bin.
Refused with a clear error, and never executed: a pickle that calls
os.system, the legacy (pre-zip) format, non-tensor values, integer tensors,
compressed entries, truncated, corrupted and garbage files, and a view that
reaches past its storage.
"""
import io
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest


torch = pytest.importorskip("torch", reason="torch (python3-torch, scripts/deps.sh) is not installed")


def convert(monet_bin, src, dst):
    return subprocess.run([monet_bin, "torch-to-safetensors", str(src), str(dst)], capture_output=True, text=True)


def as_bits(t):
    """A tensor's exact values as numpy (bf16/f16 as their bit patterns)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def read_bits(path):
    """safetensors -> name -> exact values, BF16/F16 as bit patterns."""
    import json
    import struct
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        dt = {"BF16": np.uint16, "F16": np.uint16, "F32": np.float32}[info["dtype"]]
        out[name] = (info["dtype"], np.frombuffer(raw[8 + n + b:8 + n + e], dtype=dt).reshape(info["shape"]))
    return out


def check_same(monet_bin, tmp_path, obj, name="ckpt.bin"):
    src, dst = tmp_path / name, tmp_path / (name + ".safetensors")
    torch.save(obj, src)
    r = convert(monet_bin, src, dst)
    assert r.returncode == 0, r.stderr
    got = read_bits(dst)
    ref = torch.load(src)
    assert sorted(got) == sorted(ref), "names differ"
    for k, t in ref.items():
        dtype, arr = got[k]
        assert dtype == {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[t.dtype], k
        assert arr.shape == tuple(t.shape), k
        assert np.array_equal(arr, as_bits(t)), k
    return got


def test_tensor_dicts_match_torch_load(monet_bin, tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    shared = torch.randn(20, generator=g).to(torch.bfloat16)
    check_same(monet_bin, tmp_path, {
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, 4, generator=g).half(),
        "f32": torch.randn(9, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": base.t(),                 # strided view
        "column": base[:, 2],                   # offset + stride
        "slice": base[1:4, ::2],
        "shared_a": shared[:10].view(2, 5),     # two views of one storage
        "shared_b": shared[5:],
        "big": torch.randn(300, 257, generator=g).to(torch.bfloat16),
    })


def test_state_dict_and_parameters(monet_bin, tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)).to(torch.bfloat16)
    check_same(monet_bin, tmp_path, mlp.state_dict(), "state_dict.bin")  # OrderedDict + _metadata (BUILD)
    check_same(monet_bin, tmp_path, dict(mlp.named_parameters()), "params.bin")  # _rebuild_parameter


def test_llava_mm_projector_layout(monet_bin, tmp_path):
    """What LLaVA's trainer writes: {k: param.detach().cpu().clone()} of the projector, bf16."""
    torch.manual_seed(1)
    proj = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 48)).to(torch.bfloat16)
    weights = {f"model.mm_projector.{k}": v.detach().cpu().clone() for k, v in proj.named_parameters()}
    got = check_same(monet_bin, tmp_path, weights, "mm_projector.bin")
    assert sorted(got) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                           "model.mm_projector.2.bias", "model.mm_projector.2.weight"]


def rezip(src, dst, edit=None, compression=zipfile.ZIP_STORED):
    """Copies a torch zip, optionally editing entries (name -> bytes -> bytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if edit:
                data = edit(info.filename, data)
            zout.writestr(info.filename, data)


def expect_refused(monet_bin, path, tmp_path, *words):
    out = tmp_path / "never.safetensors"
    r = convert(monet_bin, path, out)
    assert r.returncode == 1, f"{path}: accepted ({r.stdout})"
    assert str(path) in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, f"'{w}' not in: {r.stderr}"
    assert "internal error" not in r.stderr
    assert not out.exists()


def test_malicious_and_broken_files_are_refused(monet_bin, tmp_path):
    good = tmp_path / "good.bin"
    torch.save({"w": torch.randn(4, 3), "b": torch.randn(4)}, good)

    # A pickle that would run a shell command if it were unpickled.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.bin"
    rezip(good, evil, lambda n, d: pickle.dumps({"w": Evil()}, protocol=2) if n.endswith("data.pkl") else d)
    expect_refused(monet_bin, evil, tmp_path, "refusing global", "system")
    assert not marker.exists()

    # The same payload hidden inside a tensor's backward hooks.
    hooks = tmp_path / "hooks.bin"
    rezip(good, hooks, lambda n, d: d.replace(b"collections\nOrderedDict\n", b"posix\nsystem\n")
          if n.endswith("data.pkl") else d)
    expect_refused(monet_bin, hooks, tmp_path, "refusing global posix.system")

    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.randn(2)}, legacy, _use_new_zipfile_serialization=False)
    expect_refused(monet_bin, legacy, tmp_path, "legacy")

    mixed = tmp_path / "mixed.bin"
    torch.save({"w": torch.randn(2), "step": 7}, mixed)
    expect_refused(monet_bin, mixed, tmp_path, "step", "expected a tensor")

    longs = tmp_path / "long.bin"
    torch.save({"ids": torch.arange(5)}, longs)
    expect_refused(monet_bin, longs, tmp_path, "refusing global torch.LongStorage")

    nested = tmp_path / "nested.bin"
    torch.save({"state_dict": {"w": torch.randn(2)}}, nested)
    expect_refused(monet_bin, nested, tmp_path, "state_dict", "expected a tensor")

    notdict = tmp_path / "list.bin"
    torch.save([torch.randn(2)], notdict)
    expect_refused(monet_bin, notdict, tmp_path)

    deflated = tmp_path / "deflated.bin"
    rezip(good, deflated, compression=zipfile.ZIP_DEFLATED)
    expect_refused(monet_bin, deflated, tmp_path, "compressed entry")

    raw = good.read_bytes()
    for frac in (0.1, 0.5, 0.95):
        cut = tmp_path / f"cut{frac}.bin"
        cut.write_bytes(raw[:int(len(raw) * frac)])
        expect_refused(monet_bin, cut, tmp_path)

    corrupt = tmp_path / "corrupt.bin"  # one flipped bit inside a storage
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        payload = z.read([n for n in z.namelist() if n.endswith("data/0")][0])
    b = bytearray(raw)
    b[raw.index(payload)] ^= 0x01
    corrupt.write_bytes(bytes(b))
    expect_refused(monet_bin, corrupt, tmp_path, "CRC mismatch")

    past = tmp_path / "past.bin"  # shape (4, 3) -> (5, 3): 15 elements from a 12-element storage
    rezip(good, past, lambda n, d: d.replace(b"K\x04K\x03\x86", b"K\x05K\x03\x86", 1) if n.endswith("data.pkl") else d)
    expect_refused(monet_bin, past, tmp_path, "reaches past its storage")

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    expect_refused(monet_bin, garbage, tmp_path, "not a torch.save checkpoint")

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    expect_refused(monet_bin, empty, tmp_path, "empty")


def test_random_corruptions_never_crash(monet_bin, tmp_path):
    """Byte flips anywhere (the zip directory, the pickle, the data): an error or a valid result, never a crash."""
    src = tmp_path / "src.bin"
    torch.save({"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.randn(5).half(), "c": torch.randn(2, 2).t()}, src)
    raw = src.read_bytes()
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        pkl = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    rng = np.random.default_rng(3)
    errors = 0
    for trial in range(150):
        f = tmp_path / "mut.bin"
        if trial % 2:
            # inside the pickle, re-zipped with a valid CRC so that the interpreter sees it
            p = bytearray(pkl)
            for _ in range(1 + trial % 3):
                p[int(rng.integers(0, len(p)))] ^= int(rng.integers(1, 256))
            rezip(src, f, lambda n, d: bytes(p) if n.endswith("data.pkl") else d)
        else:
            b = bytearray(raw)
            for _ in range(1 + trial % 3):
                b[int(rng.integers(0, len(b)))] ^= int(rng.integers(1, 256))
            f.write_bytes(bytes(b))
        r = convert(monet_bin, f, tmp_path / "mut.safetensors")
        assert r.returncode in (0, 1), f"trial {trial}: rc {r.returncode}: {r.stderr}"
        assert "internal error" not in r.stderr
        errors += r.returncode == 1
    assert errors > 50  # the corruptions are mostly caught
