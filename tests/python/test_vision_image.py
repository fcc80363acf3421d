"""Image input for vision models: `monet vision` against PIL and Hugging Face.

- decoding: the RGB that `monet vision` decodes equals PIL's
  Image.open(f).convert("RGB") (the LLaVA loader) byte for byte, for JPEG
  (baseline, progressive, 4:4:4 and 4:2:0, greyscale, CMYK), PNG (every colour
  type, palettes with transparency, 1-bit, 16-bit, interlaced) and WebP
  (lossy, lossless, alpha); 16-bit greyscale PNGs are the one documented
  difference (PIL clips them to 255, monet keeps the high byte);
- preprocessing: pixel_values equal CLIPImageProcessor's (the acceptance bound
  is 1/255 after normalisation; what is measured is float rounding, < 1e-6),
  with LLaVA's expand2square ("pad") and with the processor alone ("crop"), on
  two real photographs (tests/data/images) and crops of them of many sizes and
  aspect ratios, down- and upscaled;
- bad input: truncated files, other formats, empty files and decompression
  bombs (huge dimensions in a small file) fail with a message naming the
  file, and write nothing.
"""
import io
import os
import struct
import subprocess
import zlib

import numpy as np
import pytest

from monet_ref.safetensors_io import read_safetensors

PIL = pytest.importorskip("PIL", reason="Pillow (python3-pil, scripts/deps.sh) is not installed")
from PIL import Image  # noqa: E402

IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "images")
PHOTOS = ["grace_hopper.jpg", "rocket.jpg"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_processor():
    transformers = pytest.importorskip("transformers", reason="transformers (python/requirements.txt) is not installed")
    # openai/clip-vit-base-patch16's preprocessor_config.json are the class defaults
    proc = transformers.CLIPImageProcessor()
    assert proc.size == {"shortest_edge": 224} and proc.crop_size == {"height": 224, "width": 224}
    assert tuple(proc.image_mean) == CLIP_MEAN and tuple(proc.image_std) == CLIP_STD
    return proc


def expand2square(img, background):
    """LLaVA's llava.mm_utils.expand2square."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def run_vision(monet_bin, path, out, mode):
    args = [monet_bin, "vision", "--image", str(path), "--out", str(out)] + (["--crop"] if mode == "crop" else [])
    return subprocess.run(args, capture_output=True, text=True)


def photo(name):
    return Image.open(os.path.join(IMAGES, name)).convert("RGB")


def variants(tmp_path):
    """(file, description) for every decoder path, made with PIL from the two photos."""
    gh, rk = photo("grace_hopper.jpg"), photo("rocket.jpg")
    out = [(os.path.join(IMAGES, n), n) for n in PHOTOS]

    def save(img, name, **kw):
        p = tmp_path / name
        img.save(p, **kw)
        out.append((str(p), name))

    # Crops of many sizes and aspect ratios: tall, wide, tiny (upscaled), odd.
    save(gh.crop((10, 0, 310, 600)), "tall_300x600.jpg", quality=92)
    save(rk.crop((0, 100, 640, 260)), "wide_640x160.jpg", quality=92, subsampling=0)  # 4:4:4
    save(rk.crop((200, 150, 261, 187)), "tiny_61x37.png")
    save(gh.crop((100, 100, 323, 323)), "square_223.png")
    save(gh.crop((0, 0, 225, 224)), "almost_square_225x224.webp", lossless=True)
    save(rk.crop((0, 0, 640, 41)), "strip_640x41.jpg", quality=85, subsampling=2)  # 4:2:0
    save(gh.crop((0, 0, 17, 599)), "sliver_17x599.png")
    save(rk.resize((1280, 854), Image.BICUBIC), "large_1280x854.jpg", quality=90)
    # JPEG kinds
    save(gh, "progressive.jpg", quality=80, progressive=True)
    save(rk.convert("L"), "grey.jpg", quality=90)
    save(gh.convert("CMYK"), "cmyk.jpg", quality=90)
    # PNG colour types
    save(rk.convert("L"), "grey.png")
    save(gh.convert("LA"), "grey_alpha.png")
    rgba = rk.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rk.size))
    save(rgba, "rgba.png")
    save(gh.quantize(64), "palette.png")
    save(rk.quantize(16), "palette_trns.png", transparency=3)
    save(gh.convert("1"), "bilevel.png")
    save(rk, "interlaced.png", optimize=False)
    # WebP
    save(gh, "lossy.webp", quality=80)
    save(rgba, "lossy_alpha.webp", quality=80)
    save(rk, "lossless.webp", lossless=True)
    # interlaced PNG and 16-bit RGB are written by hand: PIL writes neither
    out.append((write_png16_rgb(tmp_path / "rgb16.png", np.asarray(rk)), "rgb16.png"))
    out.append((write_png_interlaced(tmp_path / "adam7.png", np.asarray(gh.crop((0, 0, 101, 77)))), "adam7.png"))
    return out


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_file(width, height, depth, color, raw, interlace=0):
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def write_png16_rgb(path, rgb8):
    """16-bit RGB whose high bytes are the photo and low bytes noise."""
    h, w, _ = rgb8.shape
    rng = np.random.default_rng(0)
    v16 = (rgb8.astype(">u2") << 8) | rng.integers(0, 256, size=rgb8.shape).astype(">u2")
    raw = b"".join(b"\0" + v16[y].tobytes() for y in range(h))
    path.write_bytes(png_file(w, h, 16, 2, raw))
    return str(path)


def write_png_interlaced(path, rgb8):
    """Adam7-interlaced 8-bit RGB."""
    h, w, _ = rgb8.shape
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = rgb8[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue
        raw += b"".join(b"\0" + row.tobytes() for row in sub)
    path.write_bytes(png_file(w, h, 8, 2, raw, interlace=1))
    return str(path)


def test_decode_and_preprocess_match_pil_and_clip_processor(monet_bin, tmp_path):
    proc = clip_processor()
    background = tuple(int(x * 255) for x in proc.image_mean)
    report = []
    for path, what in variants(tmp_path):
        pil = Image.open(path).convert("RGB")
        for mode in ("pad", "crop"):
            out = tmp_path / "out.safetensors"
            r = run_vision(monet_bin, path, out, mode)
            assert r.returncode == 0, f"{what}: {r.stderr}"
            got = read_safetensors(str(out))
            decoded = got["image"]
            assert decoded.shape == (pil.size[1], pil.size[0], 3), what
            assert np.array_equal(decoded, np.asarray(pil)), f"{what}: decoded RGB differs from PIL's"
            img = expand2square(pil, background) if mode == "pad" else pil
            ref = proc.preprocess(img, return_tensors="np")["pixel_values"][0]
            assert got["pixel_values"].shape == ref.shape == (3, 224, 224)
            err = float(np.abs(got["pixel_values"] - ref).max())
            report.append(f"{what} {pil.size[0]}x{pil.size[1]} {mode}: {err:.2e}")
            assert err <= 1e-6, f"{what} ({mode}): pixel_values differ from CLIPImageProcessor by {err}"
    print("\nmax |pixel_values - CLIPImageProcessor|:\n  " + "\n  ".join(report))


def test_png16_grey_keeps_the_high_byte(monet_bin, tmp_path):
    """PIL clips 16-bit grey to 0..255 (mode I -> RGB); monet keeps the high byte, as for 16-bit RGB."""
    rng = np.random.default_rng(1)
    v = rng.integers(0, 65536, size=(19, 23)).astype(">u2")
    path = tmp_path / "grey16.png"
    path.write_bytes(png_file(23, 19, 16, 0, b"".join(b"\0" + row.tobytes() for row in v)))
    out = tmp_path / "o.safetensors"
    r = run_vision(monet_bin, path, out, "pad")
    assert r.returncode == 0, r.stderr
    decoded = read_safetensors(str(out))["image"]
    assert np.array_equal(decoded, np.repeat((v >> 8).astype(np.uint8)[..., None], 3, axis=2))


def bad_images(tmp_path):
    """(file, expected words in the error) for inputs that must be refused."""
    gh = photo("grace_hopper.jpg")
    cases = []

    def encoded(fmt, **kw):
        b = io.BytesIO()
        gh.save(b, fmt, **kw)
        return b.getvalue()

    def put(name, data, words):
        p = tmp_path / name
        p.write_bytes(data)
        cases.append((str(p), words))

    jpg, png, webp = encoded("JPEG", quality=90), encoded("PNG"), encoded("WEBP", quality=80)
    for frac in (0.02, 0.5, 0.98):
        put(f"cut{frac}.jpg", jpg[:int(len(jpg) * frac)], ["truncated"])
        put(f"cut{frac}.png", png[:int(len(png) * frac)], ["truncated"])
        put(f"cut{frac}.webp", webp[:int(len(webp) * frac)], ["truncated"])
    put("cut_header.jpg", jpg[:40], ["JPEG"])
    put("image.gif", encoded("GIF"), ["GIF", "not supported"])
    put("image.bmp", encoded("BMP"), ["BMP", "not supported"])
    put("notes.txt", b"just some text, not an image\n", ["not a JPEG, PNG or WebP"])
    put("empty.png", b"", ["empty"])
    # Decompression bombs: small files whose headers claim huge images.
    sof = jpg.index(b"\xff\xc0")  # baseline SOF0: length(2) precision(1) height(2) width(2)
    put("bomb.jpg", jpg[:sof + 5] + struct.pack(">HH", 60000, 60000) + jpg[sof + 9:], ["60000x60000", "limit"])
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    put("bomb.png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + png_chunk(b"IEND", b""), ["100000x100000", "limit"])
    lossless = encoded("WEBP", lossless=True)
    assert lossless[12:16] == b"VP8L" and lossless[20] == 0x2F
    bits = int.from_bytes(lossless[21:25], "little")
    bits = (bits & ~((1 << 28) - 1)) | 0x3FFF | (0x3FFF << 14)  # 16384 x 16384
    put("bomb.webp", lossless[:21] + bits.to_bytes(4, "little") + lossless[25:], ["16384x16384", "limit"])
    # A corrupt byte inside the compressed data of an intact PNG container.
    idat = png.index(b"IDAT")
    put("corrupt.png", png[:idat + 20] + bytes([png[idat + 20] ^ 0xFF]) + png[idat + 21:], ["bad PNG"])
    return cases


def test_bad_images_are_refused_with_clear_errors(monet_bin, tmp_path):
    for path, words in bad_images(tmp_path):
        out = tmp_path / "never.safetensors"
        r = run_vision(monet_bin, path, out, "pad")
        assert r.returncode == 1, f"{path}: expected an error, got rc {r.returncode}: {r.stdout}{r.stderr}"
        msg = r.stderr
        assert path in msg, f"the error does not name the file: {msg}"
        for w in words:
            assert w in msg, f"{os.path.basename(path)}: '{w}' not in the error: {msg}"
        assert "internal error" not in msg
        assert not out.exists()
