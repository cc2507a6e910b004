from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="remp-megatron",
    version="0.1.0",
    description="Serving backend for Megatron-format LLMs that changes TP×PP while serving",
    python_requires=">=3.11",
    packages=find_packages(include=["remp_megatron*", "checkpoint_tools*", "server*"]),
    # torch==2.13.0 is installed first by the Makefile (an unpinned torch pulls CUDA wheels).
    install_requires=[
        line.strip()
        for line in (Path(__file__).parent / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ],
    package_data={"server": ["proto/remp/v1/*.proto", "proto/remp/v1/*.py"], "remp_megatron": ["csrc/*.cpp", "csrc/*.h"]},
    entry_points={"console_scripts": ["remp-convert=checkpoint_tools.convert:main", "remp=server.cli:main"]},
)
