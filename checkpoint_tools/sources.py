"""Read HF-named tensors lazily, one at a time, from an HF safetensors directory or a GGUF file."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch


class ConversionError(RuntimeError):
    """Bad input for the converter; the message names the file or tensor at fault."""


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def copy_tokenizer_files(src: Path, out: Path) -> None:
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, out / f)


class SafetensorsSource:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ConversionError(f"{cfg_path}: missing (an HF model directory needs config.json)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from None
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{path}: no *.safetensors files")
        self._where: dict[str, str] = {}
        self._handles = {}
        for f in files:
            fp = path / f
            if not fp.is_file():
                raise ConversionError(f"{fp}: listed in model.safetensors.index.json but missing")
            try:
                h = safe_open(str(fp), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ConversionError(f"{fp}: unreadable safetensors file ({e})") from None
            self._handles[f] = h
            for name in h.keys():
                self._where[name] = f

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise ConversionError(f"{self.path}: tensor '{name}' missing")
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:  # a truncated file fails here, on the first tensor past its end
            raise ConversionError(f"{self.path / f}: tensor '{name}' unreadable ({e})") from None

    def save_tokenizer(self, out: Path) -> None:
        copy_tokenizer_files(self.path, out)


# llama.cpp tensor names -> HF names.
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_TOP:
        return _GGUF_TOP[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
    return None


class GGUFSource:
    def __init__(self, path: Path):
        from gguf import GGUFReader
        from transformers import AutoConfig

        self.path = path
        try:
            self._reader = GGUFReader(str(path))
        except Exception as e:
            raise ConversionError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        arch = bytes(self._reader.fields["general.architecture"].parts[-1]).decode()
        if arch not in _GGUF_ARCH:
            raise ConversionError(f"{path}: field 'general.architecture': {arch!r} is not supported")
        self._tensors = {}
        for t in self._reader.tensors:
            hf = _hf_name(t.name)
            if hf is None:
                raise ConversionError(f"{path}: tensor '{t.name}' has no HF equivalent")
            self._tensors[hf] = t
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
        cfg["architectures"] = [_GGUF_ARCH[arch]]
        cfg["dtype"] = "float32"  # dequantized
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        for k in ("_name_or_path", "_model_name_or_path", "transformers_version"):
            cfg.pop(k, None)
        self.config = cfg
        # llama.cpp stores Llama's Q and K rows permuted for its rotary kernel.
        self._unpermute_heads = (
            {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]} if arch == "llama" else {}
        )

    @property
    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        t = self._tensors.get(name)
        if t is None:
            raise ConversionError(f"{self.path}: tensor '{name}' missing")
        try:
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
        except Exception as e:
            raise ConversionError(f"{self.path}: tensor '{t.name}' unreadable ({e})") from None
        proj = name.split(".")[-2]
        if proj in self._unpermute_heads:
            n = self._unpermute_heads[proj]
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w.contiguous()

    def save_tokenizer(self, out: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        tok.save_pretrained(str(out))


def open_source(src: str | Path):
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    if src.is_dir():
        return SafetensorsSource(src)
    if src.suffix == ".gguf":
        return GGUFSource(src)
    raise ConversionError(f"{src}: expected an HF model directory or a .gguf file")
