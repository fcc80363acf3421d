"""Chat: template rendering against transformers' apply_chat_template, and
`monet chat` driven through a pseudo-terminal."""
import json
import os
import pty
import select
import shutil
import subprocess
import time

import pytest

from monet_ref import chat_templates

from monet_ref.make_checkpoint import make_checkpoint

# Templates of the three families, written here in Jinja as checkpoints carry them.
TEMPLATES = {
    "llama2": chat_templates.LLAMA2,
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
        " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  What is 2+2?  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello, how can I help? "},
     {"role": "user", "content": "Tell me a joke\nabout cats."}],
    [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
]


def tokenizer_dir(tmp_path, name, template):
    from monet_ref.make_checkpoint import write_tiny_tokenizer
    d = tmp_path / f"tok-{name}"
    d.mkdir()
    write_tiny_tokenizer(str(d), template)
    return d


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_render_matches_transformers(monet_bin, tmp_path, name):
    from transformers import AutoTokenizer
    d = tokenizer_dir(tmp_path, name, TEMPLATES[name])
    hf = AutoTokenizer.from_pretrained(str(d))
    checked = 0
    for k, conv in enumerate(CONVERSATIONS):
        if name == "mistral" and conv[0]["role"] == "system":
            continue
        for gen_prompt in (False, True):
            f = tmp_path / f"conv{k}.json"
            f.write_text(json.dumps(conv))
            args = [monet_bin, "chat", "--model", str(d), "--render", str(f)] + (["--add-generation-prompt"] if gen_prompt else [])
            proc = subprocess.run(args, capture_output=True, timeout=60)
            assert proc.returncode == 0, proc.stderr.decode()
            text, ids = proc.stdout.decode().rsplit("\n", 2)[:2]
            want_text = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen_prompt)
            want_ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen_prompt)
            assert text == want_text
            assert [int(x) for x in ids.split(",")] == list(want_ids)
            checked += 1
    assert checked >= 4


def test_template_errors(monet_bin, tmp_path):
    d = tokenizer_dir(tmp_path, "weird", "{{ messages[0]['content'] }}")
    f = tmp_path / "c.json"
    f.write_text(json.dumps(CONVERSATIONS[0]))
    proc = subprocess.run([monet_bin, "chat", "--model", str(d), "--render", str(f)], capture_output=True, text=True)
    assert proc.returncode != 0 and "--template" in proc.stderr
    d2 = tokenizer_dir(tmp_path, "mistral2", TEMPLATES["mistral"])
    f.write_text(json.dumps(CONVERSATIONS[1]))
    proc = subprocess.run([monet_bin, "chat", "--model", str(d2), "--render", str(f)], capture_output=True, text=True)
    assert proc.returncode != 0 and "system" in proc.stderr


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat") / "vd")
    make_checkpoint(path, vocab=301, layers=2, groups=2, seed=21, tokenizer=True, max_pos=512,
                    chat_template=TEMPLATES["llama2"])
    return path


def read_until(fd, marker: bytes, timeout=30.0) -> bytes:
    buf, end = b"", time.time() + timeout
    while marker not in buf:
        left = end - time.time()
        assert left > 0, f"timed out waiting for {marker!r}; got {buf!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_chat_in_a_terminal(monet_bin, chat_model, tmp_path):
    """Two turns through a pseudo-terminal; the first reply equals greedy
    generation on the rendered prompt; the second turn reuses the cache; Ctrl-D quits."""
    conv = tmp_path / "turn1.json"
    conv.write_text(json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]))
    rendered = subprocess.run([monet_bin, "chat", "--model", chat_model, "--render", str(conv)],
                              capture_output=True, text=True, check=True).stdout
    ids = rendered.rsplit("\n", 2)[1]
    expected = subprocess.run([monet_bin, "generate", "--model", chat_model, "--ids", ids, "-n", "12",
                               "--temperature", "0"], capture_output=True, check=True).stdout.rstrip(b"\n")

    master, slave = pty.openpty()
    proc = subprocess.Popen([monet_bin, "chat", "--model", chat_model, "--system", "be brief", "-n", "12",
                             "--temperature", "0"], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        banner = read_until(master, b"> ")
        assert b"llama2 template" in banner
        os.write(master, b"hello there\n")
        out = read_until(master, b"> ")
        assert b"0 reused" in out
        reply = out.split(b"hello there\r\n", 1)[1].split(b"\r\n[", 1)[0]
        assert reply.replace(b"\r\n", b"\n") == expected
        os.write(master, b"and again\n")
        out2 = read_until(master, b"> ")
        reused = int(out2.split(b" reused")[0].rsplit(b"(", 1)[1])
        assert reused > 20, out2
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_chat_with_mask_from_a_pipe(monet_bin, chat_model, tmp_path):
    """chat --mask (stdin not a terminal): the reply equals greedy generate --mask on the rendered prompt."""
    conv = tmp_path / "turn.json"
    conv.write_text(json.dumps([{"role": "user", "content": "hello there"}]))
    ids = subprocess.run([monet_bin, "chat", "--model", chat_model, "--render", str(conv), "--add-generation-prompt"],
                         capture_output=True, text=True, check=True).stdout.rsplit("\n", 2)[1]
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"components": [{"group": 0, "side": 1, "index": i} for i in range(0, 32, 2)]}))
    replies = {}
    for masked in (False, True):
        extra = ["--mask", str(mask)] if masked else []
        gen = subprocess.run([monet_bin, "generate", "--model", chat_model, "--ids", ids, "-n", "12", "--temperature",
                              "0", *extra], capture_output=True, check=True).stdout
        chat = subprocess.run([monet_bin, "chat", "--model", chat_model, "-n", "12", "--temperature", "0", *extra],
                              input=b"hello there\n", capture_output=True, check=True)
        assert chat.stdout == gen.rstrip(b"\n") + b"\n"
        replies[masked] = chat.stdout
    assert replies[True] != replies[False]  # the mask changes the reply
