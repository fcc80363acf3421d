"""monet: Monet (Mixture of Monosemantic Experts for Transformers) models on
the CPU, from monet.cpp's C++ library.

    import monet
    m = monet.Model()                              # the embedded default model
    out = m.forward("The whale swam towards the ship")
    out["logits"]                                  # [T, V] float32
    out["router.0.g1"]                             # [T, H, E] float32
    m.generate("Once", max_tokens=8, temperature=0).text

Arrays come straight from the library's buffers (no copy); the GIL is
released while the library computes, and one Model may be used from several
threads at once. Errors raise monet.Error (a ValueError) with the library's
message; Ctrl-C interrupts a long forward, generate or eval_loss.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import numpy as np

from . import _monet
from ._monet import Error

__all__ = ["Model", "Mask", "Index", "Generation", "Error", "DEFAULT_MODEL", "IMAGE_TOKEN"]

#: The embedded default model (models/monet-vd-books), shipped in the package.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "monet-vd-books")

TokensOrText = Union[str, Sequence[int], np.ndarray]


class Mask:
    """Experts scaled or removed in a model: composed experts (group, expert
    id[, scale]) and whole components (group, side 1|2, index[, scale]), as
    in `monet ... --mask FILE`. Every expert's term is multiplied, in every
    layer of its group, by the scales of the entries covering it: scale 0
    (the default) removes it, 2.0 doubles it (steering).

        mask = monet.Mask(experts=[(0, 1234), (1, 77, 2.0)], components=[(1, 2, 17)])
        mask.save("law.json"); monet.Mask.load("law.json")

    Expert ids are i * E + j for the pair (i, j) of a group's E x E experts.
    Ranges are checked against the model the mask is used with.
    """

    def __init__(self, experts=(), components=()):
        def entry(e, n):
            e = tuple(e)
            if len(e) not in (n, n + 1):
                raise ValueError(f"{e!r} has {len(e)} values")
            return tuple(int(x) for x in e[:n]) + (float(e[n]) if len(e) > n else 0.0,)

        try:
            self.experts = [entry(e, 2) for e in experts]        # (group, expert, scale)
            self.components = [entry(c, 3) for c in components]  # (group, side, index, scale)
        except (TypeError, ValueError) as e:
            raise Error("Mask: experts are (group, expert[, scale]) and components (group, side, index[, scale]) "
                        f"tuples ({e})") from None
        self.source = "mask"  # names the mask in error messages (the file it was loaded from)

    @classmethod
    def from_json(cls, text: str, source: str = "mask") -> "Mask":
        """A mask from the text of a mask file (source names it in error messages)."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise Error(f"{source}: not valid JSON ({e})") from None
        return cls._from_data(data, source)

    @classmethod
    def load(cls, path) -> "Mask":
        """A mask file: {"experts": [{"group": g, "expert": id, "scale": s}],
        "components": [{"group": g, "side": 1|2, "index": i, "scale": s}]} ("scale" optional, default 0)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise Error(f"{path}: cannot open ({e.strerror})") from None
        except ValueError as e:
            raise Error(f"{path}: not valid JSON ({e})") from None
        return cls._from_data(data, path)

    @classmethod
    def _from_data(cls, data, path) -> "Mask":
        if not isinstance(data, dict):
            raise Error(f'{path}: a mask file is a JSON object with "experts" and/or "components"')
        for key in data:
            if key not in ("experts", "components"):
                raise Error(f'{path}: unknown key "{key}" (expected "experts" and/or "components")')

        def items(key, fields):
            entries = data.get(key, [])
            if not isinstance(entries, list):
                raise Error(f'{path}: "{key}" must be an array')
            out = []
            for n, e in enumerate(entries):
                ok = isinstance(e, dict) and all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool)
                                                 for k in fields)
                unknown = [k for k in (e if isinstance(e, dict) else ()) if k not in fields + ("scale",)]
                scale = e.get("scale", 0.0) if isinstance(e, dict) else 0.0
                if not ok or unknown or isinstance(scale, bool) or not isinstance(scale, (int, float)):
                    raise Error(f"{path}: {key}[{n}] must be an object with integer " +
                                ", ".join(f'"{k}"' for k in fields) + ' and an optional number "scale"')
                out.append(tuple(e[k] for k in fields) + (float(scale),))
            return out

        mask = cls(items("experts", ("group", "expert")), items("components", ("group", "side", "index")))
        mask.source = path
        return mask

    def to_json(self) -> str:
        def with_scale(d, scale):
            if scale != 0.0:
                d["scale"] = scale
            return d

        return json.dumps({"experts": [with_scale({"group": g, "expert": e}, s) for g, e, s in self.experts],
                           "components": [with_scale({"group": g, "side": side, "index": i}, s)
                                          for g, side, i, s in self.components]})

    def save(self, path) -> None:
        """Writes the mask file (to a temporary file, then renamed into place)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.to_json() + "\n")
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise Error(f"{path}: cannot write ({e.strerror})") from None

    def __len__(self) -> int:
        return len(self.experts) + len(self.components)

    def __eq__(self, other) -> bool:
        return isinstance(other, Mask) and (self.experts, self.components) == (other.experts, other.components)

    def __repr__(self) -> str:
        return f"Mask(experts={self.experts!r}, components={self.components!r})"


def _mask_args(mask):
    if mask is None:
        return None, ""
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a monet.Mask, got {type(mask).__name__}")
    return mask.to_json(), mask.source


#: LLaVA's marker of an image in token ids (IMAGE_TOKEN_INDEX)
IMAGE_TOKEN = -200


def _images(image) -> list:
    """[(name, bytes or None)] of forward's image argument: a path, bytes, or a list of them."""
    if image is None:
        return []
    items = image if isinstance(image, (list, tuple)) else [image]
    out = []
    for n, item in enumerate(items):
        if isinstance(item, (bytes, bytearray, memoryview)):
            out.append((f"image {n} (bytes)", bytes(item)))
        elif isinstance(item, (str, os.PathLike)):
            out.append((os.fspath(item), None))
        else:
            raise TypeError(f"image must be a path or the bytes of an image file, got {type(item).__name__}")
    return out


def _stops(stop) -> list:
    if isinstance(stop, str):
        return [stop]
    return [str(s) for s in stop]


@dataclass
class Generation:
    """The result of Model.generate."""
    text: str                 #: the generated text (the prompt not included)
    ids: list = field(default_factory=list)  #: the generated token ids (without the EOS that ended it)
    finish_reason: str = ""   #: "stop" (EOS or a stop string) or "length" (max_tokens or the end of the context)
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0

    def __str__(self) -> str:
        return self.text


class Model:
    """A Monet checkpoint directory (config.json, safetensors weights,
    tokenizer files), loaded for inference.

    path: the checkpoint directory; None: the embedded default model.
    threads: CPU threads for compute; None: all cores.
    compute: the arithmetic of large matrix products: "auto" (bf16 products
        for bf16 weights where the CPU multiplies bf16 natively (AVX-512-BF16 or AMX), float32 otherwise), "f32"
        (exact float32) or "bf16".
    vision_tower, projector: for a VisionMonet (llava_monet) checkpoint, a CLIP
        vision tower directory and projector weights instead of those the
        checkpoint names (as the CLI's --vision-tower / --projector); the tower
        is loaded with the first image.
    huge_pages: weights in 2 MiB pages where the kernel offers them (as the
        CLI's --huge-pages): weight files cached in 4 KiB pages are read
        again into 2 MiB ones (once: the page cache keeps them), converted
        weights copied into huge pages; decode about 1.2x faster.
    """

    def __init__(self, path=None, threads: int | None = None, compute: str = "auto", vision_tower=None,
                 projector=None, huge_pages: bool = False):
        self.path = DEFAULT_MODEL if path is None else os.fspath(path)
        self._m = _monet.Model.load(self.path, 0 if threads is None else int(threads), str(compute),
                                    "" if vision_tower is None else os.fspath(vision_tower),
                                    "" if projector is None else os.fspath(projector), bool(huge_pages))
        with open(os.path.join(self.path, "config.json"), encoding="utf-8") as f:
            self.config: dict = json.load(f)  #: config.json as a dict
        self.threads: int = self._m.threads
        self.backend: str = self._m.backend  #: where and how it computes, e.g. "cpu (avx512bf16 kernels, 2 threads, ...)"

    def __repr__(self) -> str:
        return f"monet.Model({self.path!r}, threads={self.threads})"

    @property
    def router_layers(self) -> list:
        """The layers with a router (one per group of moe_groups layers): the l of "router.{l}.g1"."""
        return self._m.router_layers

    # --- tokens -----------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list:
        """Token ids of text, as transformers' tokenizer(text).input_ids (add_special: BOS/EOS as the
        tokenizer config says)."""
        return self._m.tokenize(text, add_special)

    def detokenize(self, ids, skip_special: bool = True) -> str:
        """The text of ids (special tokens left out unless skip_special=False)."""
        return self._m.detokenize(self._ids(ids), skip_special)

    def token_text(self, token_id: int) -> str:
        """One token's text for display ("<s>" for BOS, spaces kept)."""
        return self._m.token_text(int(token_id))

    def _ids(self, ids) -> list:
        a = np.asarray(ids)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise TypeError("token ids must be a 1-D sequence of integers")
        a = a.astype(np.int64)
        bad = np.flatnonzero((a < -2**31) | (a >= 2**31))  # beyond int32: the library never sees them
        if bad.size:
            pos = int(bad[0])
            raise Error(f"token id {int(a[pos])} at position {pos} is outside the vocabulary [0, {self._m.vocab_size})")
        return a.tolist()

    def _tokens(self, ids_or_text: TokensOrText, images=()) -> list:
        if isinstance(ids_or_text, str):
            # with images, the text between <image> placeholders is tokenized chunk by chunk, as LLaVA does
            return self._m.tokenize_with_images(ids_or_text) if images else self.tokenize(ids_or_text, True)
        return self._ids(ids_or_text)

    # --- compute ----------------------------------------------------------

    def forward(self, ids_or_text: TokensOrText, logits: str | None = "all", routing: bool = True,
                capture: Sequence[str] = (), mask: Mask | None = None, image=None) -> dict:
        """One forward pass over a text (tokenized with BOS) or token ids.

        Returns a dict of float32 numpy arrays keyed as `monet forward`'s file:
        "logits" [T, V] (logits="all"; [1, V] for "last"; absent for None) and,
        with routing, "router.{l}.g1" / "router.{l}.g2" [T, H, E] for every
        router layer l: the router probabilities after threshold and softmax.
        Expert (i, j) of that group has probability sum_h g1[t,h,i] * g2[t,h,j].

        capture: intermediates to return as well, [T, d] each, TransformerLens
        style: "resid_pre.{l}" (the residual stream entering layer l),
        "attn_out.{l}" (the attention block's output), "moe_out.{l}" (the
        expert mix's output), "resid_post.{l}" (the residual stream leaving
        layer l = resid_pre + attn_out + moe_out). Only those named are kept.

        image: for a VisionMonet (llava_monet) checkpoint, an image (a path, or
        the bytes of a JPEG, PNG or WebP file) or a list of them, one per
        "<image>" in the text (or IMAGE_TOKEN = -200 in the ids); each stands
        for the image's patch embeddings. The dict also holds "ids" [T] int32,
        -200 at image positions, as `monet vision --model`'s file.
        """
        mode = "none" if logits is None else logits
        if mode not in ("all", "last", "none"):
            raise Error(f'logits must be "all", "last" or None, got {logits!r}')
        if isinstance(capture, str):
            capture = (capture,)
        images = _images(image)
        return self._m.forward(self._tokens(ids_or_text, images), mode, bool(routing), [str(c) for c in capture],
                               *_mask_args(mask), images)

    def experts(self, ids_or_text: TokensOrText, threshold: float = 0.01, mask: Mask | None = None,
                image=None) -> list:
        """Per token, per router group: the experts whose probability exceeds threshold, most
        probable first, as (expert id, i, j, probability), like `monet experts --json`:
        [{"position", "id", "piece", "groups": [{"group", "count", "experts"[, "removed"]}]}].
        With a mask, experts it removes are listed under "removed", not as firing. image: as in
        forward(); an image patch's entry has "image", "patch", "row", "col" instead of "piece"."""
        images = _images(image)
        return self._m.experts(self._tokens(ids_or_text, images), float(threshold), *_mask_args(mask), images)

    def _sampling(self, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed):
        s = _monet.Sampling()
        s.max_tokens = int(max_tokens)
        s.temperature = float(temperature)
        s.top_k = int(top_k)
        s.top_p = float(top_p)
        s.min_p = float(min_p)
        s.repeat_penalty = float(repeat_penalty)
        s.repeat_last_n = int(repeat_last_n)
        s.seed = secrets.randbits(64) if seed is None else int(seed) % 2**64
        return s

    def generate(self, prompt: TokensOrText, max_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.0, repeat_penalty: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), mask: Mask | None = None, repeat_last_n: int = 64,
                 image=None) -> Generation:
        """Continues prompt (a text, tokenized with BOS, or token ids) by up to max_tokens tokens,
        as `monet generate`: temperature 0 is greedy; EOS, a stop string (not part of the text)
        or the end of the context stops it; the same seed gives the same text (seed None: a
        random one). image: as in forward() (VisionMonet checkpoints; text must follow the
        last image)."""
        s = self._sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        images = _images(image)
        ids, text, reason, n_prompt, t_prompt, t_gen = self._m.generate(self._tokens(prompt, images), s,
                                                                        _stops(stop), *_mask_args(mask), images)
        return Generation(text, ids, reason, n_prompt, t_prompt, t_gen)

    def stream(self, prompt: TokensOrText, max_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, min_p: float = 0.0, repeat_penalty: float = 1.0, seed: int | None = None,
               stop: Sequence[str] = (), mask: Mask | None = None, repeat_last_n: int = 64,
               image=None) -> Iterator[str]:
        """generate(), yielding the text as it is generated (pieces of whole characters);
        the pieces joined are generate()'s text for the same seed."""
        s = self._sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        images = _images(image)
        stream = self._m.stream(self._tokens(prompt, images), s, _stops(stop), *_mask_args(mask), images)
        try:
            while True:
                piece = stream.next()
                if piece is None:
                    return
                yield piece
        finally:
            stream.close()

    def eval_loss(self, text: str, context: int = 256, mask: Mask | None = None) -> tuple:
        """(mean next-token loss, perplexity) of text, evaluated in windows of context tokens
        each starting with BOS, as `monet eval-loss`."""
        loss, _tokens = self._m.eval_loss(text, int(context), *_mask_args(mask))
        return loss, math.exp(loss)

    # --- interpretability -------------------------------------------------

    def find_experts(self, domains: dict, ratio: float = 2.0, min_prob: float = 1e-4, context: int = 512) -> dict:
        """Each domain's experts by the paper's statistic, as `monet find-experts`: expert e of a
        group belongs to domain d when its mean routing probability on d's text is at least ratio
        times that on every other domain (and at least min_prob). domains: {name: text}, two or
        more. Returns {name: Mask} (the masks that remove them)."""
        if not isinstance(domains, dict):
            raise TypeError("domains must be a dict {name: text}")
        names = list(domains)
        masks = self._m.find_experts([str(domains[n]) for n in names], int(context), float(ratio), float(min_prob))
        return {n: Mask.from_json(j, f"domain {n}") for n, j in zip(names, masks)}

    def expert_outputs(self, group: int, expert: int, n: int = 12) -> list:
        """The tokens expert `expert` (= i * E + j) of router group `group` promotes most: what it
        writes into the residual stream read out through the final norm and lm_head, as
        (token id, token text, logit), strongest first (the viewer's "outputs")."""
        return self._m.expert_outputs(int(group), int(expert), int(n))

    # --- OpenAI-shaped completions (as llama-cpp-python) --------------------

    def create_completion(self, prompt: TokensOrText, max_tokens: int = 16, temperature: float = 0.8,
                          top_p: float = 0.95, min_p: float = 0.0, top_k: int = 40, repeat_penalty: float = 1.0,
                          seed: int | None = None, stop: Sequence[str] = (), stream: bool = False,
                          echo: bool = False, mask: Mask | None = None, repeat_last_n: int = 64):
        """An OpenAI text completion, as llama-cpp-python's Llama.create_completion: a dict
        {"id", "object": "text_completion", "created", "model", "choices": [{"text", "index",
        "logprobs", "finish_reason"}], "usage": {"prompt_tokens", "completion_tokens",
        "total_tokens"}}; stream=True: an iterator of such chunks (each choice's "text" a piece,
        the last with the finish_reason). echo: the prompt's text comes first."""
        ids = self._tokens(prompt)
        s = self._sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        meta = dict(id=f"cmpl-{uuid.uuid4()}", object="text_completion", created=int(time.time()), model=self.path)
        prefix = self.detokenize(ids) if echo else ""

        def choice(text, reason):
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}

        if stream:
            return self._stream_chunks(ids, s, stop, mask, meta, prefix,
                                       lambda piece: choice(piece, None), lambda reason: choice("", reason))
        got = self._m.generate(ids, s, _stops(stop), *_mask_args(mask), [])
        return dict(meta, choices=[choice(prefix + got[1], got[2])], usage=_usage(len(ids), len(got[0])))

    def create_chat_completion(self, messages: Sequence[dict], max_tokens: int | None = None,
                               temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.0, top_k: int = 40,
                               repeat_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
                               stream: bool = False, mask: Mask | None = None, chat_format: str | None = None,
                               repeat_last_n: int = 64):
        """An OpenAI chat completion, as llama-cpp-python's Llama.create_chat_completion:
        messages [{"role": "system"|"user"|"assistant", "content": str}] rendered with the
        checkpoint's chat template (tokenizer_config.json; or chat_format "llama2", "mistral",
        "chatml"); the reply ends at the template's end of turn. Returns {"id", "object":
        "chat.completion", "created", "model", "choices": [{"index", "message": {"role":
        "assistant", "content"}, "logprobs", "finish_reason"}], "usage"}; stream=True: an
        iterator of "chat.completion.chunk" dicts with "delta"s ({"role"} first, then
        {"content"} pieces, then {} with the finish_reason). max_tokens None: up to the end of
        the context."""
        pairs = []
        for n, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or \
                    not isinstance(msg.get("content"), str):
                raise Error(f'messages[{n}] must be a dict with string "role" and "content"')
            pairs.append((msg["role"], msg["content"]))
        ids, stop_ids = self._m.chat_prompt(pairs, chat_format or "", True)
        if max_tokens is None:
            max_tokens = max(0, self._m.max_position_embeddings - len(ids))
        s = self._sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        s.stop_ids = stop_ids
        meta = dict(id=f"chatcmpl-{uuid.uuid4()}", created=int(time.time()), model=self.path)
        if stream:
            chunk = dict(meta, object="chat.completion.chunk")

            def chunks():
                yield dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                            "finish_reason": None}])
                yield from self._stream_chunks(
                    ids, s, stop, mask, chunk, "",
                    lambda piece: {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None},
                    lambda reason: {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason})
            return chunks()
        got = self._m.generate(ids, s, _stops(stop), *_mask_args(mask), [])
        message = {"role": "assistant", "content": got[1]}
        return dict(meta, object="chat.completion",
                    choices=[{"index": 0, "message": message, "logprobs": None, "finish_reason": got[2]}],
                    usage=_usage(len(ids), len(got[0])))

    def _stream_chunks(self, ids, s, stop, mask, meta, prefix, piece_choice, end_choice):
        stream = self._m.stream(ids, s, _stops(stop), *_mask_args(mask), [])
        try:
            if prefix:
                yield dict(meta, choices=[piece_choice(prefix)])
            while True:
                piece = stream.next()
                if piece is None:
                    break
                yield dict(meta, choices=[piece_choice(piece)])
            out_ids, reason = stream.result()[:2]
            yield dict(meta, choices=[end_choice(reason)], usage=_usage(len(ids), len(out_ids)))
        finally:
            stream.close()


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Index:
    """An expert index written by `monet index` (or Index.build): for every router group and
    expert, how often it fired and its strongest contexts in the corpus; the data `monet serve`'s
    viewer shows.

        idx = monet.Index("books.db")
        idx.experts(0, limit=10)          # group 0's most active experts
        idx.expert(0, 1234)["contexts"]   # one expert's top contexts
        idx.search("whale")               # experts whose top contexts fire on a token
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._ix = _monet.Index(self.path)

    @classmethod
    def build(cls, model: "Model", corpus, path, top_k: int = 32, window: int = 8, context: int = 256,
              threshold: float = 0.01, resume: bool = False, checkpoint_tokens: int = 200000,
              max_tokens: int = 0) -> "Index":
        """Runs the corpus text files (a path or a list of paths) through model and writes the
        index to path, as `monet index` (resume=True continues an interrupted one); returns it."""
        files = [os.fspath(corpus)] if isinstance(corpus, (str, os.PathLike)) else [os.fspath(f) for f in corpus]
        _monet.build_index(model._m, files, os.fspath(path), int(top_k), int(window), int(context), float(threshold),
                           bool(resume), int(checkpoint_tokens), int(max_tokens))
        return cls(path)

    @property
    def settings(self) -> dict:
        """What the index was built with: model, experts (E), groups, moe_groups, top_k, window,
        context, threshold."""
        return self._ix.settings

    @property
    def tokens(self) -> int:
        """Corpus tokens indexed."""
        return self._ix.tokens

    def experts(self, group: int, order: str = "count", limit: int = 100, offset: int = 0) -> list:
        """The experts of a router group that fired, most active first (order "count": how often
        above the threshold; "max": by strongest probability; "id"), as dicts {"expert",
        "count", "density" (count / tokens), "max_prob"}."""
        return self._ix.experts(int(group), str(order), int(limit), int(offset))[0]

    def fired(self, group: int) -> int:
        """How many experts of the group fired at least once."""
        return self._ix.experts(int(group), "count", 0, 0)[1]

    def expert(self, group: int, expert: int) -> dict:
        """One expert: {"expert", "group", "i", "j", "count", "density", "max_prob", "contexts":
        [{"prob", "doc", "pos", "token", "context" (token texts), "focus" (the firing token's
        place in context)}]}, strongest context first."""
        return self._ix.expert(int(group), int(expert))

    def search(self, token: str, limit: int = 50) -> list:
        """Experts whose top contexts fire on the token (its text as the viewer shows it, e.g.
        "whale"): [{"group", "expert", "contexts", "max_prob"}]."""
        return self._ix.search(str(token), int(limit))

    def __repr__(self) -> str:
        return f"monet.Index({self.path!r}, tokens={self.tokens})"
