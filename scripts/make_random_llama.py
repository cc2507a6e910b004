"""Make a random Llama (HF safetensors) of a preset size and convert it for ReMP.

    python scripts/make_random_llama.py --size 125m --out runs/llama-125m

Benchmarks use it where a model bigger than the tiny test models is needed; weights are made
locally (never downloaded, never committed).
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PRESETS = {
    # ~125M parameters; 4 KV heads and 12 layers allow TP in {1,2,4} and PP in {1,2,3,4}.
    "125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=PRESETS, default="125m")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
                      **PRESETS[args.size])
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for w in model.parameters():
            w.normal_(0, 0.05)
    n = sum(w.numel() for w in model.parameters())
    print(f"random llama {args.size}: {n / 1e6:.1f}M parameters", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        subprocess.run([sys.executable, "-m", "checkpoint_tools.convert", "import", tmp, str(Path(args.out))],
                       check=True)


if __name__ == "__main__":
    main()
