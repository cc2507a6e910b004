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
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
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
# llama.cpp's MoE tensors: the router, and each projection of every expert stacked on axis 0.
_GGUF_EXPERTS = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1, "ffn_down_exps.weight": 2}
# general.architecture -> (HF architecture, with experts); a llama GGUF with experts is Mixtral.
_GGUF_ARCH = {"llama": ("LlamaForCausalLM", "MixtralForCausalLM"), "qwen2": ("Qwen2ForCausalLM", None),
              "qwen3": ("Qwen3ForCausalLM", None), "qwen3moe": (None, "Qwen3MoeForCausalLM")}
# HF names of the router and of (gate, up, down) of expert e in layer i.
_HF_MOE = {
    "MixtralForCausalLM": ("model.layers.{i}.block_sparse_moe.gate.weight",
                           "model.layers.{i}.block_sparse_moe.experts.{e}.{p}.weight", ("w1", "w3", "w2")),
    "Qwen3MoeForCausalLM": ("model.layers.{i}.mlp.gate.weight", "model.layers.{i}.mlp.experts.{e}.{p}.weight",
                            ("gate_proj", "up_proj", "down_proj")),
}


def _hf_names(gguf_name: str, arch: str | None, num_experts: int) -> list[tuple[str, int | None]]:
    """(HF name, expert index or None) for each HF tensor a GGUF tensor holds; [] if unknown."""
    if gguf_name in _GGUF_TOP:
        return [(_GGUF_TOP[gguf_name], None)]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m is None:
        return []
    layer, part = m.groups()
    if part in _GGUF_LAYER:
        return [(f"model.layers.{layer}.{_GGUF_LAYER[part]}", None)]
    if arch in _HF_MOE:
        router, expert, projections = _HF_MOE[arch]
        if part == "ffn_gate_inp.weight":
            return [(router.format(i=layer), None)]
        if part in _GGUF_EXPERTS:
            proj = projections[_GGUF_EXPERTS[part]]
            return [(expert.format(i=layer, e=e, p=proj), e) for e in range(num_experts)]
    return []


class GGUFSource:
    def __init__(self, path: Path):
        from gguf import GGUFReader
        from transformers import AutoConfig

        self.path = path
        try:
            self._reader = GGUFReader(str(path))
        except Exception as e:
            raise ConversionError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        arch = self._field("general.architecture")
        if arch not in _GGUF_ARCH:
            raise ConversionError(f"{path}: field 'general.architecture': {arch!r} is not supported")
        scaling = self._field(f"{arch}.rope.scaling.type", "none")
        if scaling != "none":  # transformers' GGUF config reader drops it: the model would load unscaled
            raise ConversionError(f"{path}: field '{arch}.rope.scaling.type': {scaling!r} is not supported "
                                  "from GGUF (import the HF safetensors)")
        experts = int(self._field(f"{arch}.expert_count", 0))
        hf_arch = _GGUF_ARCH[arch][bool(experts)]
        if hf_arch is None:
            raise ConversionError(f"{path}: field '{arch}.expert_count': {experts} does not fit architecture {arch!r}")
        self._tensors: dict[str, tuple] = {}  # HF name -> (GGUF tensor, expert index or None)
        for t in self._reader.tensors:
            names = _hf_names(t.name, hf_arch, experts)
            if not names:
                raise ConversionError(f"{path}: tensor '{t.name}' has no HF equivalent")
            self._tensors.update({hf: (t, e) for hf, e in names})
        self._stacked: tuple = (None, None)  # the last dequantized expert stack: (GGUF name, tensor)
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
        cfg["architectures"] = [hf_arch]
        head_dim = self._field(f"{arch}.attention.key_length", None)
        if head_dim is not None:
            cfg["head_dim"] = int(head_dim)
        if experts:  # transformers' GGUF config reader knows llama experts not at all, Qwen3-MoE's partly
            cfg["num_experts_per_tok"] = int(self._field(f"{arch}.expert_used_count"))
            if hf_arch == "MixtralForCausalLM":
                cfg["model_type"], cfg["num_local_experts"] = "mixtral", experts
            else:
                cfg["num_experts"] = experts
                cfg["moe_intermediate_size"] = int(self._field(f"{arch}.expert_feed_forward_length"))
                cfg["decoder_sparse_step"] = 1
                cfg["mlp_only_layers"] = sorted(int(t.name.split(".")[1]) for t in self._reader.tensors
                                                if t.name.endswith(".ffn_gate.weight"))
        cfg["dtype"] = "float32"  # dequantized
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        for k in ("_name_or_path", "_model_name_or_path", "transformers_version"):
            cfg.pop(k, None)
        self.config = cfg
        # llama.cpp stores Llama's (and Mixtral's) Q and K rows permuted for its rotary kernel.
        self._unpermute_heads = (
            {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]} if arch == "llama" else {}
        )

    def _field(self, key: str, default=...):
        field = self._reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ConversionError(f"{self.path}: field '{key}' missing")
            return default
        value = field.parts[-1]
        return bytes(value).decode() if field.types[0].name == "STRING" else value[0]

    @property
    def names(self) -> set[str]:
        return set(self._tensors)

    def _dequantize(self, t) -> torch.Tensor:
        from gguf import dequantize

        try:
            return torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
        except Exception as e:
            raise ConversionError(f"{self.path}: tensor '{t.name}' unreadable ({e})") from None

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise ConversionError(f"{self.path}: tensor '{name}' missing")
        t, expert = self._tensors[name]
        if expert is None:
            w = self._dequantize(t)
        else:  # experts are read in order: one stack dequantized at a time
            if self._stacked[0] != t.name:
                self._stacked = (t.name, self._dequantize(t))
            w = self._stacked[1][expert]
        proj = name.split(".")[-2]
        if proj in self._unpermute_heads:
            n = self._unpermute_heads[proj]
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w.contiguous()

    def save_tokenizer(self, out: Path) -> None:
        from transformers import AutoTokenizer

        if "tokenizer.ggml.model" not in self._reader.fields:  # served with token ids only
            return
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
