"""`monet plot-loss`: a PNG from train.csv files, and clear failures on bad input."""
import math
import os
import struct
import subprocess

HEADER = "step,tokens,lr,loss,loss_lm,loss_unif,loss_amb,grad_norm,val_loss,tokens_per_s,elapsed_s\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_csv(path, steps=40, scale=1.0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(HEADER)
        for i in range(1, steps + 1):
            lm = scale * (3.0 + 7.0 * math.exp(-i / 10))
            val = f"{lm + 0.1:.4f}" if i % 10 == 0 else ""
            f.write(f"{i},{i * 512},0.0003,{lm + 0.01:.4f},{lm:.4f},5.1,0.3,0.9,{val},1000.0,{i * 0.5:.1f}\n")
    return path


def run(monet_bin, *args):
    return subprocess.run([monet_bin, "plot-loss", *args], capture_output=True, text=True, timeout=120)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, head
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_one_and_several_logs(monet_bin, tmp_path):
    a = write_csv(str(tmp_path / "run-a" / "train.csv"))
    b = write_csv(str(tmp_path / "run-b" / "train.csv"), scale=1.2)
    out = str(tmp_path / "loss.png")
    proc = run(monet_bin, a, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (1000, 600)

    out2 = str(tmp_path / "two.png")
    proc = run(monet_bin, a, b, "--out", out2, "--title", "runs", "--width", "640", "--height", "400",
               "--log-y", "--smooth", "0.9")
    assert proc.returncode == 0, proc.stderr
    assert png_size(out2) == (640, 400)
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


def test_plot_bad_input(monet_bin, tmp_path):
    out = str(tmp_path / "loss.png")
    good = write_csv(str(tmp_path / "ok" / "train.csv"))

    proc = run(monet_bin, str(tmp_path / "missing.csv"), "--out", out)
    assert proc.returncode == 1
    assert "missing.csv" in proc.stderr and "no such file" in proc.stderr

    bad_header = tmp_path / "bad_header.csv"
    bad_header.write_text("step,loss\n1,3.0\n")
    proc = run(monet_bin, str(bad_header), "--out", out)
    assert proc.returncode == 1
    assert f"{bad_header}:1:" in proc.stderr and "loss_lm" in proc.stderr

    bad_value = tmp_path / "bad_value.csv"
    bad_value.write_text(HEADER + "1,512,0.001,3.0,2.9,5,0.3,1.0,,100,1\n2,1024,0.001,3.0,abc,5,0.3,1.0,,100,2\n")
    proc = run(monet_bin, good, str(bad_value), "--out", out)
    assert proc.returncode == 1
    assert f"{bad_value}:3:" in proc.stderr and '"abc" is not a number' in proc.stderr

    empty = tmp_path / "empty.csv"
    empty.write_text(HEADER)
    proc = run(monet_bin, str(empty), "--out", out)
    assert proc.returncode == 1 and "no data rows" in proc.stderr

    proc = run(monet_bin, good, "--out", out, "--smooth", "1.5")
    assert proc.returncode == 1 and "--smooth" in proc.stderr

    proc = run(monet_bin, good)  # --out is required
    assert proc.returncode != 0 and "--out" in proc.stderr

    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]
