"""Constructed inputs for the probe tests: a tiny llama with known language neurons, and .mo files."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import torch
from helpers import save_checkpoint, tiny_config

N_WORDS = 64            # language "a" is tokens a0..a63 (ids 0-63), language "b" is b0..b63 (ids 64-127)
A_NEURON = (1, 5)       # (layer, index): gate reads +dim 0, fires only on language a
B_NEURON = (2, 7)       # fires only on language b


def word_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"a{i}": i for i in range(N_WORDS)} | {f"b{i}": N_WORDS + i for i in range(N_WORDS)}
    vocab |= {"[UNK]": 2 * N_WORDS, "[PAD]": 2 * N_WORDS + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(path)
    return fast


def wired_model(path, n_layers: int = 4, zero_attention0: bool = False) -> Path:
    """A tiny llama where dimension 0 of the residual stream is +10 on language a and -10 on b, and
    nothing but the two wired gate neurons reads it; every other activation is the same on a text
    and its mirror (a_i -> b_i). With zero_attention0, layer 0's attention output is zero,
    so layer 0's MLP input is the normed embedding (checkable by hand)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    cfg = tiny_config("llama", num_hidden_layers=n_layers, vocab_size=2 * N_WORDS + 2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = sd["model.embed_tokens.weight"]
    emb[N_WORDS:2 * N_WORDS] = emb[:N_WORDS]
    emb[:, 0] = 0
    emb[:N_WORDS, 0], emb[N_WORDS:2 * N_WORDS, 0] = 10.0, -10.0
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            sd[p + m + ".weight"][:, 0] = 0
        sd[p + "self_attn.o_proj.weight"][0, :] = 0
        sd[p + "mlp.down_proj.weight"][0, :] = 0
    if zero_attention0:
        sd["model.layers.0.self_attn.o_proj.weight"][:] = 0
    for (layer, j), sign in ((A_NEURON, 1.0), (B_NEURON, -1.0)):
        g = sd[f"model.layers.{layer}.mlp.gate_proj.weight"]
        g[j] = 0
        g[j, 0] = sign
        sd[f"model.layers.{layer}.mlp.down_proj.weight"][:, j] = 0
    save_checkpoint(path, sd, cfg)
    word_tokenizer(path)
    return path


def mirrored_texts(n: int, seed: int = 0, words=(4, 12)) -> tuple[list[str], list[str]]:
    """n texts of language a and their mirrors in language b (same word indices)."""
    rng = random.Random(seed)
    idx = [[rng.randrange(N_WORDS) for _ in range(rng.randint(*words))] for _ in range(n)]
    return [" ".join(f"a{i}" for i in t) for t in idx], [" ".join(f"b{i}" for i in t) for t in idx]


def write_mo(path, entries: dict, charset: str = "UTF-8") -> Path:
    """A GNU .mo file (what msgfmt writes, without the optional hash table).

    entries: {msgid: msgstr}; a key "ctx\\x04msgid" has a context; a tuple key (singular, plural)
    with a list value gives plural forms.
    """
    header = f"Content-Type: text/plain; charset={charset}\nPlural-Forms: nplurals=2; plural=(n != 1);\n"
    items = {b"": header.encode()}
    for key, value in entries.items():
        if isinstance(key, tuple):
            items["\0".join(key).encode(charset)] = "\0".join(value).encode(charset)
        else:
            items[key.encode(charset)] = value.encode(charset)
    keys = sorted(items)
    n = len(keys)
    orig_tab, trans_tab = 28, 28 + 8 * n
    data_start = 28 + 16 * n
    blobs, orig, trans = b"", [], []
    for k in keys:
        orig.append((len(k), data_start + len(blobs)))
        blobs += k + b"\0"
    for k in keys:
        trans.append((len(items[k]), data_start + len(blobs)))
        blobs += items[k] + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, n, orig_tab, trans_tab, 0, data_start)
    out += b"".join(struct.pack("<2I", *x) for x in orig) + b"".join(struct.pack("<2I", *x) for x in trans)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(out + blobs)
    return Path(path)
