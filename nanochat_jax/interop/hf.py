"""Export to Hugging Face's layout for transformers' `NanoChatForCausalLM` (transformers >= 5).

The HF class computes what our model computes: relu^2 MLP, parameter-free RMSNorm after the
embedding, before each block half and at the end, half-split rotary with nanochat's sign, QK-norm
after rotary, GQA, untied head, tanh softcap. `check_exportable` refuses a model with any field or
weight beyond these, rather than write one that computes differently. Everything is written with
numpy and json (no torch): `model.safetensors` (fp32), `config.json`, `tokenizer.json` (nanochat's
tiktoken vocabulary as byte-level BPE with merges recovered from its ranks, or our SentencePiece
BPE with byte fallback) and `tokenizer_config.json` with a chat template rendering conversations
as nanochat does. Unlike ours, HF tokenizers read special-token strings typed in text as specials.
"""
import dataclasses
import inspect
import json
import struct
from pathlib import Path

import jax
import numpy as np

from nanochat_jax import model as model_lib
from nanochat_jax.interop.nanochat import IncompatibleCheckpoint, state_dict_from_params, weight_names
from nanochat_jax.tokenizer import SPACE_META, SPECIAL_TOKENS, Tokenizer
from nanochat_jax.tokenizer_tiktoken import TiktokenTokenizer

HF_NAMES = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight",
            "attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
            "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# GPTConfig fields with an HF equivalent, and those that only choose how the same math runs
MAPPED_FIELDS = {"vocab_size", "n_layer", "dim", "n_head", "n_kv_head", "sequence_len", "rope_base", "softcap"}
EXECUTION_FIELDS = {"compute_dtype", "attention", "remat", "loss_chunk"}
RMS_EPS = inspect.signature(model_lib.rms_norm).parameters["eps"].default

# nanochat's rendering (conversation.render_conversation): a system message joins the first user turn
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}<|user_start|>{{ ns.system + m['content'] }}<|user_end|>{% set ns.system = '' %}"
    "{% elif m['role'] == 'assistant' %}<|assistant_start|>{{ m['content'] }}<|assistant_end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant_start|>{% endif %}"
)


def hf_name(key: str) -> str:
    """transformers' name for a nanochat state-dict key."""
    if key in HF_NAMES:
        return HF_NAMES[key]
    _, _, layer, part, name, _ = key.split(".")  # transformer.h.<i>.<part>.<name>.weight
    return f"model.layers.{layer}.{HF_NAMES[f'{part}.{name}']}.weight"


def check_exportable(model_cfg: model_lib.GPTConfig, params) -> None:
    unknown = sorted({f.name for f in dataclasses.fields(model_cfg)} - MAPPED_FIELDS - EXECUTION_FIELDS)
    if unknown:
        raise IncompatibleCheckpoint(f"transformers' NanoChat has no equivalent for model fields {unknown}")
    ours = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    known = {jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in path))
             for _, path in weight_names(model_cfg.n_layer)}
    if ours != known:
        raise IncompatibleCheckpoint(f"weights transformers' NanoChat does not have: {sorted(ours - known)[:8]}")


def write_safetensors(path, tensors: dict) -> None:
    """The safetensors format: u64 header length, JSON header (dtype, shape, byte range), raw data."""
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": dtypes[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def hf_config(model_cfg: model_lib.GPTConfig, tokenizer) -> dict:
    end = tokenizer.encode_special("<|assistant_end|>")
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat",
        "vocab_size": model_cfg.vocab_size, "hidden_size": model_cfg.dim,
        "intermediate_size": 4 * model_cfg.dim, "num_hidden_layers": model_cfg.n_layer,
        "num_attention_heads": model_cfg.n_head, "num_key_value_heads": model_cfg.n_kv_head,
        "max_position_embeddings": model_cfg.sequence_len, "hidden_act": "relu2", "rms_norm_eps": RMS_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rope_base},
        "final_logit_softcapping": model_cfg.softcap, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_id, "eos_token_id": [end, tokenizer.bos_id],
        "pad_token_id": end, "dtype": "float32",
    }


# ---- tokenizers: ours as tokenizers' tokenizer.json ----------------------------------------------

def _bos_template(bos: int) -> dict:
    """Post-processor putting <|bos|> first, as every nanochat document and conversation starts."""
    first = {"SpecialToken": {"id": "<|bos|>", "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [bos], "tokens": ["<|bos|>"]}}}


def _added(tokens: list[tuple[int, str]]) -> list[dict]:
    return [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True} for i, s in tokens]


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _split_by_lower_ranks(ranks: dict, token: bytes) -> list[bytes]:
    """tiktoken's BPE of `token` using only merges ranked below it: the two parts it was made from."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        if ranks.get(parts[best] + parts[best + 1], limit) >= limit:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def tokenizer_json(tokenizer: TiktokenTokenizer) -> dict:
    """nanochat's tiktoken encoding as tokenizers' byte-level BPE with its split regex."""
    enc = tokenizer.encoding
    ranks = enc._mergeable_ranks
    chars = _byte_chars()
    text = lambda token: "".join(chars[b] for b in token)
    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.get):
        parts = _split_by_lower_ranks(ranks, token)
        if len(parts) != 2:
            raise IncompatibleCheckpoint(f"token {token!r} is not a merge of two lower-ranked tokens: not BPE")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    specials = sorted((i, s) for s, i in enc._special_tokens.items())
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(specials),
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": _bos_template(tokenizer.bos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,  # as tiktoken: a chunk that is a whole token is that token
                  "vocab": {text(t): r for t, r in ranks.items()}, "merges": merges},
    }


def sentencepiece_tokenizer_json(tokenizer: Tokenizer) -> dict:
    """Our SentencePiece BPE as tokenizers' BPE: spaces become U+2581, words start at a run of them
    (SentencePiece's split), characters outside the vocabulary fall back to byte tokens, and a pair
    merges with the priority of the piece it makes (SentencePiece's score; every split of a piece
    into two pieces is a merge). A literal U+2581 in text reads as a space there, unlike here."""
    sp = tokenizer.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {p: i for p, i in vocab.items() if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))}
    merges = []
    for piece in sorted(normal, key=lambda p: (-sp.get_score(normal[p]), normal[p])):
        merges += [f"{piece[:k]} {piece[k:]}" for k in range(1, len(piece))
                   if piece[:k] in normal and piece[k:] in normal]
    specials = [(i, sp.id_to_piece(i)) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    space = SPACE_META
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(specials),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": space},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": f"{space}+"}, "behavior": "MergedWithNext",
                          "invert": False},
        "post_processor": _bos_template(tokenizer.bos_id),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": space}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(0), "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config(tokenizer, model_cfg: model_lib.GPTConfig) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
            "pad_token": "<|assistant_end|>", "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
            "model_max_length": model_cfg.sequence_len, "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE}


def export(loaded, out) -> dict:
    """Write a loaded model (`loading.LoadedModel`) in transformers' NanoChat layout into `out`."""
    cfg, tok = loaded.model_cfg, loaded.tokenizer
    check_exportable(cfg, loaded.params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = state_dict_from_params(loaded.params, cfg.n_layer)
    write_safetensors(out / "model.safetensors", {hf_name(k): v for k, v in state.items()})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tok), indent=2))
    spec = tokenizer_json(tok) if isinstance(tok, TiktokenTokenizer) else sentencepiece_tokenizer_json(tok)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, cfg), indent=2))
    return {"files": ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"],
            "tokenizer": type(tok).__name__}
