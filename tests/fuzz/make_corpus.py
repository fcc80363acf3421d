"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/)
from the test data and the default model: a handful of small, valid inputs
per target, from which libFuzzer's mutations start.

    python3 tests/fuzz/make_corpus.py      # rewrites tests/fuzz/corpus
"""
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "python"))

import numpy as np  # noqa: E402

from monet_ref.chat_templates import LLAMA2  # noqa: E402
from monet_ref.make_checkpoint import write_tiny_tokenizer  # noqa: E402
from monet_ref.safetensors_io import write_safetensors  # noqa: E402

DEFAULT_MODEL = os.path.join(REPO, "models", "monet-vd-books")
OUT = os.path.join(HERE, "corpus")


def put(target, name, data):
    os.makedirs(os.path.join(OUT, target), exist_ok=True)
    with open(os.path.join(OUT, target, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors_seeds(tmp):
    cases = {
        "f32-bf16": ({"a": ("F32", np.arange(6, dtype=np.float32).reshape(2, 3)),
                      "b": ("BF16", np.array([1.5, -2, 0, 3], dtype=np.float32))}, {"format": "pt"}),
        "mixed": ({"h": ("F16", np.array([0.5, 1, -1], dtype=np.float16)), "n": ("I64", np.array(7, dtype=np.int64)),
                   "e": ("U8", np.zeros((0,), dtype=np.uint8)), "d": ("F64", np.array([[1.0, 2.0]])),
                   "m": ("BOOL", np.array([True, False]))}, None),
        "router": ({"model.layers.0.router.norm1.running_var": ("F32", np.ones(4, dtype=np.float32)),
                    "model.layers.0.router.w1.weight": ("BF16", np.full((8, 4), 0.25, dtype=np.float32))},
                   {"format": "pt"}),
    }
    for name, (tensors, meta) in cases.items():
        path = os.path.join(tmp, name + ".safetensors")
        write_safetensors(path, tensors, meta)
        put("safetensors", name, open(path, "rb").read())
    header = b"{}"
    put("safetensors", "empty", struct.pack("<Q", len(header)) + header)


def config_seeds():
    put("config", "default-model", open(os.path.join(DEFAULT_MODEL, "config.json")).read())
    released = {"architectures": ["MonetForCausalLM"], "model_type": "monet", "bos_token_id": 1, "eos_token_id": 2,
                "hidden_act": "relu2", "hidden_size": 2048, "max_position_embeddings": 2048,
                "moe_decompose": "vertical", "moe_dim": 16, "moe_experts": 512, "moe_groups": 4, "moe_heads": 8,
                "moe_topk": 8, "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16,
                "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "vocab_size": 32000}
    put("config", "released-1.4b-vd", json.dumps(released, indent=2))
    hd = dict(released, moe_decompose="horizontal", moe_dim=7, tie_word_embeddings=True, eos_token_id=[2, 32001],
              pad_token_id=None, num_key_value_heads=4, dtype="float16", head_dim=128,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    del hd["torch_dtype"]
    put("config", "hd-gqa-v5", json.dumps(hd))
    put("config", "defaults", "{}")


def tokenizer_json_seeds(tmp):
    write_tiny_tokenizer(tmp, chat_template=LLAMA2)
    tok = open(os.path.join(tmp, "tokenizer.json"), encoding="utf-8").read()
    cfg = open(os.path.join(tmp, "tokenizer_config.json"), encoding="utf-8").read()
    text = "The heat at the east seat, is it? 42 + 17 = 59\n"
    put("tokenizer_json", "classic", "\0".join([tok, cfg, text]))
    meta = json.loads(tok)
    meta["normalizer"] = None
    meta["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}
    meta["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}
    meta["added_tokens"].append({"id": 3, "content": "[INST]", "single_word": False, "lstrip": True, "rstrip": True,
                                 "normalized": False, "special": False})
    cfg2 = json.dumps({"add_bos_token": True, "add_eos_token": True, "bos_token": {"content": "<s>"},
                       "eos_token": "</s>"})
    put("tokenizer_json", "metaspace", "\0".join([json.dumps(meta, ensure_ascii=False), cfg2,
                                                 "<s>[INST] hi there [/INST] ok</s>  two  spaces"]))
    post = json.loads(tok)
    post["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                         {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                                                 "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
    post["model"]["merges"] = [m.split(" ") for m in post["model"]["merges"]]
    put("tokenizer_json", "post-processor", "\0".join([json.dumps(post, ensure_ascii=False), "",
                                                      "na\u00efve caf\u00e9 \u65e5\u672c \U0001f642 \xff"]))


def varint(v):
    out = b""
    while True:
        b = v & 0x7F
        v >>= 7
        out += bytes([b | (0x80 if v else 0)])
        if not v:
            return out


def read_varint(data, i):
    v, shift = 0, 0
    while True:
        b = data[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def proto_fields(data):
    """(field, wire, raw bytes of the whole field) of a protobuf message."""
    i = 0
    while i < len(data):
        start = i
        key, i = read_varint(data, i)
        wire = key & 7
        if wire == 0:
            _, i = read_varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            n, i = read_varint(data, i)
            i += n
        elif wire == 5:
            i += 4
        yield key >> 3, wire, data[start:i]


def tokenizer_model_seeds():
    """The default model's tokenizer.model cut to its first pieces (control,
    bytes and a few hundred merges), and a hand-made one."""
    data = open(os.path.join(DEFAULT_MODEL, "tokenizer.model"), "rb").read()
    kept, pieces = [], 0
    for field, wire, raw in proto_fields(data):
        if field == 1 and wire == 2:
            pieces += 1
            if pieces > 400:
                continue
        kept.append(raw)
    small = b"".join(kept)
    text = "It was a fine morning, and the whale swam towards the ship. \u00e9\u00e8 \U0001f642"
    put("tokenizer_model", "default-model-400", b"\0".join([b"", text.encode(), small]))
    cfg = json.dumps({"legacy": False, "add_bos_token": True, "add_eos_token": True,
                      "added_tokens_decoder": {"400": {"content": "[X]", "special": True, "normalized": False,
                                                       "lstrip": False, "rstrip": False, "single_word": False}}})
    put("tokenizer_model", "legacy-false-added", b"\0".join([cfg.encode(), b"<s>a [X] b</s>", small]))

    def piece(p, score, kind):
        body = b"\x0a" + varint(len(p)) + p + b"\x15" + struct.pack("<f", score) + b"\x18" + varint(kind)
        return b"\x0a" + varint(len(body)) + body
    tiny = piece(b"<unk>", 0, 2) + piece(b"<s>", 0, 3) + piece(b"</s>", 0, 3)
    tiny += b"".join(piece(b"<0x%02X>" % b, 0, 6) for b in range(256))
    for k, (p, kind) in enumerate([("\u2581", 1), ("a", 1), ("b", 1), ("ab", 1), ("\u2581a", 1), ("xy", 5), ("[U]", 4)]):
        tiny += piece(p.encode(), -1.0 - k, kind)
    trainer = b"\x18" + varint(2) + b"\x98\x02" + varint(1)  # model_type BPE, byte_fallback
    normalizer = b"\x0a\x08identity\x18\x01\x20\x00\x28\x01"
    tiny += b"\x12" + varint(len(trainer)) + trainer + b"\x1a" + varint(len(normalizer)) + normalizer
    put("tokenizer_model", "hand-made", b"\0".join([b"", "ab ba xy [U] \u2581a".encode(), tiny]))


def chat_seeds():
    mistral = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
               "{% endif %}{% endfor %}")
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    put("chat", "llama2", "\0".join([LLAMA2, "system", "Be brief.", "user", " Hi! ", "assistant", "Hello.", "user", "Why?"]))
    put("chat", "mistral", "\0".join([mistral, "user", "Hi", "assistant", "Hello", "user", "More"]))
    put("chat", "chatml", "\0".join([chatml, "system", "You are helpful.", "user", "2 + 2?"]))
    put("chat", "no-template", "\0".join(["", "user", "hello"]))
    put("chat", "names", "\0".join(["chatml", "assistant", "first"]))


def mask_seeds():
    put("mask", "experts-and-components", json.dumps(
        {"experts": [{"group": 0, "expert": 5}, {"group": 1, "expert": 4095}, {"group": 0, "expert": 5}],
         "components": [{"group": 0, "side": 1, "index": 3}, {"group": 1, "side": 2, "index": 63}]}))
    put("mask", "empty", json.dumps({"experts": []}))
    put("mask", "components", json.dumps({"components": [{"group": 0, "side": 2, "index": 15}]}))


def index_seeds(tmp):
    """A real index of the default model over two short documents (build/monet
    or $MONET_BIN), compacted into 512-byte pages so that it stays small."""
    monet = os.environ.get("MONET_BIN", os.path.join(REPO, "build", "monet"))
    docs = []
    for i, text in enumerate(["The whale swam.", "A fine morning."]):
        docs.append(os.path.join(tmp, f"doc{i}.txt"))
        with open(docs[-1], "w") as f:
            f.write(text)
    db = os.path.join(tmp, "index.db")
    subprocess.run([monet, "index", "--model", DEFAULT_MODEL, "--corpus", *docs, "--out", db, "--top-k", "1",
                    "--window", "2", "--context", "16", "--threshold", "0.5"], check=True, capture_output=True)
    con = sqlite3.connect(db)
    con.execute("PRAGMA page_size = 512")
    con.execute("VACUUM")
    con.close()
    with open(db, "rb") as f:
        put("index", "two-documents.db", f.read())


def http_request(head, body=b"", client=b""):
    """An input of the HTTP targets (tests/fuzz/fuzz_http.h): the request
    head, how the client reads the answer, the body."""
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    return b"\0".join([head.encode(), client, body])


def http_seeds():
    model = "monet-vd-books"
    viewer = {
        "info": http_request("GET /api/info"),
        "experts": http_request("GET /api/experts?group=1&order=max&limit=5&offset=2"),
        "experts-by-id": http_request("GET /api/experts?order=id"),
        "expert": http_request("GET /api/expert?group=0&expert=7"),
        "search": http_request("GET /api/search?token=whale&limit=3"),
        "probe": http_request("POST /api/probe\nContent-Type: application/json",
                              {"text": "The whale swam.", "threshold": 0.05, "top": 3, "next": 4}),
        "probe-mask": http_request("POST /api/probe", {"text": "A fine", "mask": {"experts": [{"group": 0, "expert": 5}]}}),
        "page": http_request("GET /"),
        "bad-group": http_request("GET /api/expert?group=9&expert=x"),
        "bad-probe": http_request("POST /api/probe", b'{"text": 5'),
    }
    for name, data in viewer.items():
        put("http_viewer", name, data)
    auth = "\nAuthorization: Bearer fuzz-key\nContent-Type: application/json"
    openai = {
        "completion": http_request("POST /v1/completions" + auth,
                                   {"model": model, "prompt": "The whale", "max_tokens": 4, "temperature": 0}),
        "completion-echo-logprobs": http_request("POST /v1/completions" + auth,
                                                 {"model": model, "prompt": [[1, 450, 2], "A fine"], "max_tokens": 3,
                                                  "echo": True, "logprobs": 2, "n": 2, "seed": 7, "stop": ["."]}),
        "completion-stream": http_request("POST /v1/completions" + auth,
                                          {"model": model, "prompt": "Once", "max_tokens": 5, "stream": True,
                                           "stream_options": {"include_usage": True}, "return_token_ids": True}),
        "completion-stream-gone": http_request("POST /v1/completions" + auth,
                                               {"model": model, "prompt": "Once", "max_tokens": 20, "stream": True},
                                               b"x3"),
        "chat": http_request("POST /v1/chat/completions" + auth,
                             {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                              "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 2,
                              "return_experts": {"threshold": 0.1, "top": 2},
                              "expert_mask": {"experts": [{"group": 0, "expert": 3}]}}),
        "chat-stream": http_request("POST /v1/chat/completions" + auth,
                                    {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                     "max_tokens": 3, "stream": True, "return_experts": True}),
        "chat-long-gone": http_request("POST /v1/chat/completions" + auth,
                                       {"model": model, "messages": [{"role": "user", "content": "Tell"}], "n": 4},
                                       b"w2"),
        "tokenize": http_request("POST /tokenize" + auth, {"content": "the cat", "add_special": False}),
        "detokenize": http_request("POST /detokenize" + auth, {"tokens": [1, 450, 6635], "skip_special": False}),
        "models": http_request("GET /v1/models" + auth),
        "metrics": http_request("GET /metrics" + auth),
        "health": http_request("GET /health"),
        "no-key": http_request("GET /v1/models"),
        "bad-json": http_request("POST /v1/completions" + auth, b'{"model": "x", "prompt": "x"'),
        "too-long": http_request("POST /v1/completions" + auth, {"model": model, "prompt": "x " * 40, "max_tokens": 8}),
        "no-route": http_request("DELETE /v1/files" + auth),
    }
    for name, data in openai.items():
        put("http_openai", name, data)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        safetensors_seeds(tmp)
        tokenizer_json_seeds(tmp)
        index_seeds(tmp)
    config_seeds()
    tokenizer_model_seeds()
    chat_seeds()
    mask_seeds()
    http_seeds()
    for target in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, target))
        size = sum(os.path.getsize(os.path.join(OUT, target, f)) for f in files)
        print(f"{target}: {len(files)} seeds, {size} bytes")


if __name__ == "__main__":
    main()
