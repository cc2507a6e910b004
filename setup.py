from setuptools import find_packages, setup

setup(
    name="remp-megatron",
    version="0.1.0",
    description="Serving backend for Megatron-format LLMs that changes TP×PP while serving",
    python_requires=">=3.11",
    packages=find_packages(include=["remp_megatron*", "checkpoint_tools*", "server*"]),
    # torch is installed first, pinned, by the Makefile (an unpinned torch pulls CUDA wheels).
    install_requires=[
        "megatron-core==0.16.1",
        "deepspeed>=0.19,<0.20",
        "pydantic>=2,<3",
        "transformers>=4.57",
        "accelerate",
        "safetensors",
        "gguf>=0.17",
        "tqdm",
        "psutil",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
    entry_points={"console_scripts": ["remp-convert=checkpoint_tools.convert:main"]},
)
