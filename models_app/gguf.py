"""Import llama-family GGUF files as mlx-lm model folders (no torch, no Django).

The header is parsed in pure Python (cheap metadata, up-front checks); tensors come from
``mx.load``, are dequantized, renamed to the HF llama layout and saved with mlx-lm's savers;
the tokenizer is rebuilt from the GGUF vocabulary with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx

SUPPORTED_ARCHS = {"llama"}
# ggml tensor type id -> name; (elements, bytes) per block for the types we can import.
_GGML_NAMES = (
    "F32 F16 Q4_0 Q4_1 Q4_2 Q4_3 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ2_XXS "
    "IQ2_XS IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 IQ1_M BF16"
)
_GGML_TYPES = dict(enumerate(_GGML_NAMES.split()))
_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34)}
_SUPPORTED_MSG = "only Q4_0, Q4_1, Q8_0, F16, F32 GGUF files can be imported"
# llama.cpp's general.file_type (LLAMA_FTYPE_*) -> the name users see in file names.
_FTYPE_NAMES = (
    "F32 F16 Q4_0 Q4_1 Q4_1_F16 Q4_2 Q4_3 Q8_0 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S "
    "Q4_K_M Q5_K_S Q5_K_M Q6_K"
)
_FILE_TYPES = dict(enumerate(_FTYPE_NAMES.split())) | {32: "BF16"}
_SCALARS = {**dict(enumerate("BbHhIif?")), 10: "Q", 11: "q", 12: "d"}  # GGUF value types
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Llama 3's pre-tokenizer regex (HF tokenizer.json of Llama-3.x).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {"smollm", "default", "gpt-2", "llama-bpe", "llama3"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFError(ValueError):
    """A GGUF file that cannot be imported; the message is meant for end users."""


class _Reader:
    """Bounds-checked little-endian reader over the mmapped header."""

    def __init__(self, buf: mmap.mmap, name: str) -> None:
        self.buf, self.pos, self.name = buf, 0, name

    def skip(self, n: int) -> int:
        """Advance n bytes; returns the old position."""
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.name} is truncated (incomplete download?)")
        self.pos += n
        return self.pos - n

    def take(self, fmt: str) -> Any:
        return struct.unpack_from("<" + fmt, self.buf, self.skip(struct.calcsize("<" + fmt)))[0]

    def string(self, keep: bool = True) -> str | None:
        n = self.take("Q")
        start = self.skip(n)
        return self.buf[start : start + n].decode("utf-8", "replace") if keep else None

    def value(self, vtype: int) -> Any:
        """Read one metadata value; arrays are skipped and returned as their length."""
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.take("I"), self.take("Q")
            if etype in _SCALARS:  # skip in one step: the token/score arrays are large
                self.skip(n * struct.calcsize("<" + _SCALARS[etype]))
            else:
                for _ in range(n):
                    self.string(keep=False) if etype == 8 else self.value(etype)
            return n
        if vtype not in _SCALARS:
            raise GGUFError(f"{self.name} is corrupt (unknown metadata type {vtype})")
        return self.take(_SCALARS[vtype])


def _scan(path: Path) -> tuple[dict, dict, list[tuple[str, list[int], str, int]], int, int]:
    """Parse the GGUF header: (metadata, array lengths, tensor infos, data start, file size)."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path.name} is not a GGUF file")
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Reader(buf, path.name)
            r.pos = 4
            version = r.take("I")
            if version not in (2, 3):
                raise GGUFError(f"{path.name}: unsupported GGUF version {version}")
            n_tensors, n_kv = r.take("Q"), r.take("Q")
            meta: dict[str, Any] = {}
            lengths: dict[str, int] = {}
            for _ in range(n_kv):
                key, vtype = r.string(), r.take("I")
                (lengths if vtype == 9 else meta)[key] = r.value(vtype)
            tensors = []
            for _ in range(n_tensors):
                name, ndim = r.string(), r.take("I")
                dims = [r.take("Q") for _ in range(ndim)]
                ttype, offset = r.take("I"), r.take("Q")
                tensors.append((name, dims, _GGML_TYPES.get(ttype, f"type {ttype}"), offset))
            align = int(meta.get("general.alignment", 32))
            data_start = (r.pos + align - 1) // align * align
    return meta, lengths, tensors, data_start, size


def _problem(meta: dict, tensors: list, data_start: int, size: int, name: str) -> str | None:
    """The first reason convert_gguf would refuse this file, or None."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        return f"unsupported architecture '{arch}': only llama-family GGUF files can be imported"
    if meta.get(f"{arch}.expert_count", 0):
        return "mixture-of-experts models are not supported"
    for tname, _, ttype, _ in tensors:
        if ttype not in _BLOCKS:
            return f"unsupported tensor type {ttype} in {tname}: {_SUPPORTED_MSG}"
    tok_model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if tok_model != "gpt2":
        return (
            f"unsupported tokenizer '{tok_model}': only GPT-2 style byte-level BPE "
            "tokenizers can be imported"
        )
    if pre not in _PRE_TOKENIZERS:
        return f"unsupported pre-tokenizer '{pre}'"
    for tname, dims, ttype, offset in tensors:
        per, nbytes = _BLOCKS[ttype]
        if data_start + offset + math.prod(dims) // per * nbytes > size:
            return f"{name} is truncated at tensor {tname} (incomplete download?)"
    return None


def gguf_truncation(path: str | os.PathLike) -> str | None:
    """Why llama.cpp could not read this file as a whole (a bad header, a tensor past its end),
    whatever its tensor types; None when it is complete."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    meta, _, tensors, data_start, size = _scan(path)
    if not meta.get("general.architecture"):
        return f"{path.name} names no architecture (general.architecture)"
    for tname, dims, ttype, offset in tensors:
        try:
            per, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[ttype]]
        except KeyError:
            return f"{path.name}: unknown tensor type {ttype} in {tname}"
        if data_start + offset + math.prod(dims) // per * nbytes > size:
            return f"{path.name} is truncated at tensor {tname} (incomplete download?)"
    return None


def read_gguf_info(path: str | os.PathLike) -> dict:
    """Summarise a GGUF file without loading tensors; `problem` says why it can't be imported."""
    path = Path(path)
    meta, lengths, tensors, data_start, size = _scan(path)
    arch = meta.get("general.architecture")
    types = dict(Counter(ttype for _, _, ttype, _ in tensors))
    file_type = _FILE_TYPES.get(meta.get("general.file_type", -1))
    if file_type is None and types:  # older files lack general.file_type
        file_type = max(types, key=types.get)
    return {
        "architecture": arch,
        "name": meta.get("general.name") or path.stem,
        "context_length": meta.get(f"{arch}.context_length"),
        "hidden_size": meta.get(f"{arch}.embedding_length"),
        "num_layers": meta.get(f"{arch}.block_count"),
        "vocab_size": lengths.get("tokenizer.ggml.tokens"),
        "n_params": sum(math.prod(dims) for _, dims, _, _ in tensors),
        "has_chat_template": bool(meta.get("tokenizer.chat_template")),
        "file_type": file_type,
        "tensor_types": types,
        "size_bytes": size,
        "problem": _problem(meta, tensors, data_start, size, path.name),
    }


def _num(md: dict, key: str, default: Any = None) -> Any:
    """A scalar metadata value as a Python number; required when no default is given."""
    v = md.get(key, default)
    if v is None:
        raise GGUFError(f"missing metadata '{key}'")
    if isinstance(v, mx.array):
        vals = set(v.tolist()) if v.size > 1 else {v.item()}
        if len(vals) != 1:  # per-layer values are fine only when all layers agree
            raise GGUFError(f"per-layer '{key}' values are not supported")
        return vals.pop()
    return v


def _f32(x: float) -> float:
    """GGUF floats are float32: 1e-05 arrives as 9.9999997e-06; keep the short form."""
    return float(f"{x:.7g}")


def _llama3_scaling(rope_freqs: mx.array, head_dim: int, base: float) -> dict:
    """Recover Llama 3 rope_scaling from llama.cpp's rope_freqs tensor (it stores the factors)."""
    got = rope_freqs.astype(mx.float32).tolist()
    factor, low, high, orig = max(got), 1.0, 4.0, 8192
    want = []  # llama.cpp's formula (convert_hf_to_gguf, LlamaModel.generate_extra_tensors)
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        smooth = min(1.0, max(0.0, (orig / wavelen - low) / (high - low)))
        want.append(1 / ((1 - smooth) / factor + smooth))
    if len(want) != len(got) or any(
        abs(a - b) > 1e-3 * max(1.0, b) for a, b in zip(got, want, strict=True)
    ):
        raise GGUFError("unsupported rope scaling (rope_freqs does not match Llama 3 settings)")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


def _config(md: dict, tensors: dict, dtype: str) -> dict:
    """The HF-style llama config.json for this GGUF."""
    p = md["general.architecture"] + "."
    hidden, heads = int(_num(md, p + "embedding_length")), int(_num(md, p + "attention.head_count"))
    kv_heads = int(_num(md, p + "attention.head_count_kv", heads))
    head_dim = int(_num(md, p + "attention.key_length", hidden // heads))
    if int(_num(md, p + "rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError("partial rotary embeddings are not supported")
    theta = _f32(_num(md, p + "rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(_num(md, p + "feed_forward_length")),
        "num_hidden_layers": int(_num(md, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_num(md, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_traditional": False,  # Q/K rows are un-permuted below
        "max_position_embeddings": int(_num(md, p + "context_length", 2048)),
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    scaling = md.get(p + "rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        config["rope_scaling"] = _llama3_scaling(tensors["rope_freqs.weight"], head_dim, theta)
    elif scaling == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": _f32(_num(md, p + "rope.scaling.factor")),
        }
    elif scaling != "none":
        raise GGUFError(f"unsupported rope scaling '{scaling}'")
    special = _special_ids(md)
    if "bos" in special:
        config["bos_token_id"] = special["bos"]
    if special.get("eos"):
        config["eos_token_id"] = special["eos"][0] if len(special["eos"]) == 1 else special["eos"]
    return config


def _special_ids(md: dict) -> dict[str, Any]:
    """bos/unk/pad ids and the list of stop ids (eos plus end-of-turn tokens)."""
    key = "tokenizer.ggml.{}_token_id".format
    out: dict[str, Any] = {
        kind: int(_num(md, key(k)))
        for kind, k in (("bos", "bos"), ("unk", "unknown"), ("pad", "padding"))
        if key(k) in md
    }
    eos = [int(_num(md, key(k))) for k in ("eos", "eot", "eom") if key(k) in md]
    out["eos"] = list(dict.fromkeys(eos))  # de-duplicated, eos first
    return out


def _weights(tensors: dict, config: dict, dtype: mx.Dtype) -> dict[str, mx.array]:
    """Dequantize, rename and un-permute all tensors."""
    out = {}
    for key, w in tensors.items():
        if key.endswith((".scales", ".biases")) or key == "rope_freqs.weight":
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", key)
        stem, suffix = key.rsplit(".", 1)
        if m and m.group(2) in _LAYER_NAMES:
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
        elif stem in _TOP_NAMES:
            name = f"{_TOP_NAMES[stem]}.{suffix}"
        else:
            raise GGUFError(f"unexpected tensor {key}: not a plain llama model")
        if suffix == "weight" and f"{stem}.scales" in tensors:
            s, b = tensors[f"{stem}.scales"], tensors[f"{stem}.biases"]
            bits = w.shape[-1] // s.shape[-1]  # ggml blocks are 32 wide: 32*bits/32 words
            # float32 scales so the dequantized values keep full precision
            w = mx.dequantize(
                w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits
            )
        w = w.astype(dtype)
        if m and m.group(2) in ("attn_q", "attn_k"):
            # llama.cpp interleaves each head's rows for its rope (convert_hf_to_gguf permute):
            # undo it so mlx's standard (non-traditional) rope applies.
            n = config["num_attention_heads" if m.group(2) == "attn_q" else "num_key_value_heads"]
            rows = w.shape[0]
            w = w.reshape(n, rows // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        mx.eval(w)  # materialise one tensor at a time to bound peak memory
        out[name] = w
    return out


def _tokenizer(md: dict) -> tuple[Any, dict]:
    """Rebuild a byte-level BPE `tokenizers.Tokenizer` and the tokenizer_config entries."""
    from tokenizers import AddedToken as Added
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types = md["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in md else []
    pre = md.get("tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    llama3 = pre in ("llama-bpe", "llama3")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not llama3)
    if pre == "smollm":  # SmolLM2 splits every digit before the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    ids = _special_ids(md)
    name = {k: tokens[v] for k, v in ids.items() if k != "eos"}
    if ids["eos"]:
        name["eos"] = tokens[ids["eos"][0]]
    post = processors.ByteLevel(trim_offsets=False)
    if bool(_num(md, "tokenizer.ggml.add_bos_token", False)) and "bos" in name:
        bos = (name["bos"], ids["bos"])
        single, pair = f"{bos[0]} $A", f"{bos[0]} $A {bos[0]} $B:1"
        template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=[bos])
        post = processors.Sequence([post, template])
    tok.post_processor = post
    # Control tokens (type 3) are special: single ids, dropped by skip_special_tokens.
    control = [tokens[i] for i, t in enumerate(types) if t == 3]
    tok.add_special_tokens([Added(t, special=True, normalized=False) for t in control])
    tok.add_tokens(
        [Added(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
    )
    cfg: dict[str, Any] = {f"{k}_token": v for k, v in name.items()}
    cfg["additional_special_tokens"] = [t for t in control if t not in name.values()]
    return tok, cfg


def _write_tokenizer(md: dict, config: dict, folder: Path) -> None:
    tok, special = _tokenizer(md)
    tok.save(str(folder / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    if md.get("tokenizer.chat_template"):
        tok_config["chat_template"] = md["tokenizer.chat_template"]
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    if "pad" in (ids := _special_ids(md)):
        gen["pad_token_id"] = ids["pad"]
    for fname, data in (
        ("tokenizer_config.json", tok_config),
        ("special_tokens_map.json", special),
        ("generation_config.json", gen),
    ):
        (folder / fname).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _convert_into(path: Path, folder: Path, dtype: str) -> dict:
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    try:
        tensors, md = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx's messages are terse; say what is supported
        raise GGUFError(f"cannot read {path.name} ({e}); {_SUPPORTED_MSG}") from e
    config = _config(md, tensors, dtype)
    weights = _weights(tensors, config, _DTYPES[dtype])
    del tensors
    model = llama.Model(llama.ModelArgs.from_dict(config))
    try:  # strict load catches missing tensors and shape mismatches before anything is saved
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise GGUFError(f"tensors do not match a llama model: {e}") from e
    del weights
    save_model(folder, model, donate_model=True)
    save_config(dict(config), folder / "config.json")
    _write_tokenizer(md, config, folder)
    return config


def convert_gguf(
    path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32"
) -> dict:
    """Convert a llama GGUF into an mlx-lm folder at out_dir (atomically); returns config.

    float32 is the default because float16/quantized weights are 10-40x slower on mlx's CPU.
    """
    path, out = Path(path), Path(out_dir)
    if dtype not in _DTYPES:
        raise GGUFError(f"unsupported dtype '{dtype}': use one of {', '.join(_DTYPES)}")
    if out.exists():
        raise GGUFError(f"{out} already exists")
    meta, _, tensors, data_start, size = _scan(path)
    if problem := _problem(meta, tensors, data_start, size, path.name):
        raise GGUFError(problem)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same parent => the final rename is atomic; readers never see a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        config = _convert_into(path, tmp, dtype)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():  # created meanwhile: rename would replace an empty dir silently
            raise GGUFError(f"{out} already exists")
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, GGUFError) or not isinstance(e, Exception):
            raise
        raise GGUFError(f"could not convert {path.name}: {e}") from e
    return config


def make_tiny_model(
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> None:
    """Write a tiny random-weight float32 llama using tokenizer_dir's tokenizer (for tests)."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer

    src, out = Path(tokenizer_dir), Path(out_dir)
    vocab = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    config: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tie_word_embeddings,
    }
    has_config = (src / "config.json").exists()
    src_config = json.loads((src / "config.json").read_text()) if has_config else {}
    config.update({k: src_config[k] for k in ("bos_token_id", "eos_token_id") if k in src_config})
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Explicit keys (not the global RNG) so the same seed always gives the same weights.
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for (k, v), key in zip(params, keys, strict=True):
        norm = k.endswith("norm.weight")
        new.append((k, mx.ones(v.shape) if norm else 0.02 * mx.random.normal(v.shape, key=key)))
    model.update(tree_unflatten(new))
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    for f in src.glob("*.json"):  # tokenizer files and generation_config, not the weights index
        if f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, out / f.name)
