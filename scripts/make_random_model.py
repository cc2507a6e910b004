"""Make a random model (HF safetensors) of a preset size and convert it for ReMP.

    python scripts/make_random_model.py --size 125m --out runs/llama-125m
    python scripts/make_random_model.py --size moe-1b --out runs/mixtral-1b

Benchmarks use it where a model bigger than the tiny test models is needed; weights are made
locally (never downloaded, never committed).
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# (transformers model class, config class, config)
PRESETS = {
    # ~125M parameters; 4 KV heads and 12 layers allow TP in {1,2,4} and PP in {1,2,3,4}.
    "125m": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4)),
    "tiny": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4)),
    # ~0.94B parameters (8 experts of 50M per layer, top 2: ~0.25B active per token); TP in
    # {1,2,4}, EP in {1,2,4} (dividing TP), PP in {1,2,4}.
    "moe-1b": ("MixtralForCausalLM", "MixtralConfig", dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)),
}


def main():
    import transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=PRESETS, default="125m")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model_cls, config_cls, preset = PRESETS[args.size]
    torch.manual_seed(args.seed)
    cfg = getattr(transformers, config_cls)(max_position_embeddings=2048, rope_theta=10000.0,
                                            tie_word_embeddings=False, **preset)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        for w in model.parameters():
            w.normal_(0, 0.05)
    n = sum(w.numel() for w in model.parameters())
    print(f"random {model_cls} {args.size}: {n / 1e6:.1f}M parameters", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        subprocess.run([sys.executable, "-m", "checkpoint_tools.convert", "import", tmp, str(Path(args.out))],
                       check=True)


if __name__ == "__main__":
    main()
