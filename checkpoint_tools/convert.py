"""remp-convert: HF safetensors / GGUF <-> Megatron dist-checkpoint (loadable at any TP×PP).

A converted model directory holds ``config.json`` (the HF config, source of the ModelSpec),
the tokenizer files, and ``megatron/`` (a ``torch_dist`` dist-checkpoint). Conversion goes
through a TP1·PP1 megatron model in this process: megatron's own ``sharded_state_dict`` then
writes global, topology-free tensors. Source tensors are read one at a time, so the process
never holds more than the model plus one source tensor. Output is written to a sibling temp
directory and renamed into place only when complete.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from remp_megatron.model import MEGATRON_SUBDIR
from remp_megatron.quiet import quiet_third_party
from remp_megatron.spec import ModelSpec, SpecError

from .mapping import ignorable_hf_tensor, rules
from .sources import ConversionError, copy_tokenizer_files, open_source

SHARD_BYTES = 2 * 1024**3  # HF-style shard size for exported safetensors


def _check_free(out: Path) -> None:
    if out.exists():
        raise ConversionError(f"{out}: already exists (refusing to overwrite)")


@contextlib.contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    _check_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tp1pp1_model(spec: ModelSpec):
    """A single-process world holding the whole model at TP1·PP1."""
    from remp_megatron import groups
    from remp_megatron.model import build_stage_model
    from remp_megatron.runtime import init_distributed
    from remp_megatron.topology import Topology

    rt = init_distributed()
    groups.activate(Topology(1, 1))
    return build_stage_model(spec, Topology(1, 1), 0, rt.device)


def import_model(src: str | Path, out: str | Path) -> ModelSpec:
    _check_free(Path(out))
    source = open_source(src)
    spec = ModelSpec.from_hf_config(source.config, source=f"{src} (config)")
    model = _tp1pp1_model(spec)
    params = model.state_dict()
    used: set[str] = set()
    for rule in tqdm(rules(spec), desc="import tensors", unit="tensor", file=sys.stderr):
        parts = [source.get(n) for n in rule.hf]
        used.update(rule.hf)
        for name, t in zip(rule.hf, parts):
            if t.dtype != spec.torch_dtype:
                raise ConversionError(f"{src}: tensor '{name}' is {t.dtype}, config says {spec.dtype}")
        try:
            value = rule.join(parts)
        except RuntimeError as e:
            raise ConversionError(f"{src}: tensors {list(rule.hf)} have unexpected shapes ({e})") from None
        target = params[rule.megatron]
        if value.shape != target.shape:
            raise ConversionError(
                f"{src}: tensor(s) {list(rule.hf)} give shape {tuple(value.shape)}, "
                f"config implies {tuple(target.shape)} for {rule.megatron}"
            )
        target.copy_(value)
        del parts, value
    extra = sorted(n for n in source.names - used if not ignorable_hf_tensor(n, spec))
    if extra:
        raise ConversionError(f"{src}: unexpected tensor(s) for {spec.architecture}: {extra[:5]}")
    from megatron.core import dist_checkpointing

    out = Path(out)
    with _atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(source.config, indent=2))
        source.save_tokenizer(tmp)
        with _progress("writing megatron dist-checkpoint"):
            (tmp / MEGATRON_SUBDIR).mkdir()
            dist_checkpointing.save(model.sharded_state_dict(), str(tmp / MEGATRON_SUBDIR))
    return spec


def export_model(src: str | Path, out: str | Path) -> ModelSpec:
    from safetensors.torch import save_file

    from remp_megatron.model import load_stage_weights

    src, out = Path(src), Path(out)
    _check_free(out)
    spec = _spec_of(src)
    model = _tp1pp1_model(spec)
    with _progress("loading megatron dist-checkpoint"):
        load_stage_weights(model, src)
    params = model.state_dict()
    with _atomic_dir(out) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for rule in tqdm(rules(spec), desc="export tensors", unit="tensor", file=sys.stderr):
            for name, t in zip(rule.hf, rule.split(params[rule.megatron])):
                nbytes = t.numel() * t.element_size()
                if size + nbytes > SHARD_BYTES and shards[-1]:
                    shards.append({})
                    size = 0
                shards[-1][name] = t.contiguous()
                size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
        shutil.copy2(src / "config.json", tmp / "config.json")
        copy_tokenizer_files(src, tmp)
    return spec


def inspect_model(path: str | Path) -> str:
    from megatron.core import dist_checkpointing

    path = Path(path)
    spec = _spec_of(path)
    meta = dist_checkpointing.load_tensors_metadata(str(path / MEGATRON_SUBDIR))
    tensors = sorted((k, tuple(v.global_shape), str(v.dtype)) for k, v in meta.items() if hasattr(v, "global_shape"))
    n_params = sum(torch.Size(s).numel() for _, s, _ in tensors)
    lines = [
        f"model dir     {path}",
        f"architecture  {spec.architecture}  layers={spec.num_layers} hidden={spec.hidden_size} "
        f"heads={spec.num_heads} kv_heads={spec.num_kv_heads} head_dim={spec.head_dim} "
        f"ffn={spec.intermediate_size} vocab={spec.vocab_size} tied={spec.tie_word_embeddings} "
        f"qkv_bias={spec.qkv_bias} rope_theta={spec.rope_theta:g}",
        f"parameters    {n_params:,}",
        f"dtype         {spec.dtype}",
        f"tensors       {len(tensors)}",
    ]
    lines += [f"  {k:60s} {str(list(s)):>22s} {d}" for k, s, d in tensors]
    return "\n".join(lines)


def _spec_of(path: Path) -> ModelSpec:
    if not (path / MEGATRON_SUBDIR / "metadata.json").is_file():
        raise ConversionError(f"{path}: not a converted model directory (no {MEGATRON_SUBDIR}/metadata.json)")
    return ModelSpec.from_file(path / "config.json")


@contextlib.contextmanager
def _progress(what: str):
    bar = tqdm(total=1, desc=what, file=sys.stderr, bar_format="{desc}: {elapsed}")
    try:
        yield
    finally:
        bar.update(1)
        bar.close()


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    p = argparse.ArgumentParser(prog="remp-convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("import", help="HF dir or .gguf -> megatron model dir")
    a.add_argument("src")
    a.add_argument("out")
    e = sub.add_parser("export", help="megatron model dir -> HF safetensors dir")
    e.add_argument("src")
    e.add_argument("out")
    i = sub.add_parser("inspect", help="describe a megatron model dir")
    i.add_argument("dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.cmd == "import":
            spec = import_model(args.src, args.out)
            print(f"imported {spec.architecture} ({spec.num_layers} layers) -> {args.out}")
        elif args.cmd == "export":
            export_model(args.src, args.out)
            print(f"exported -> {args.out}")
        else:
            print(inspect_model(args.dir))
    except (ConversionError, SpecError) as e:
        print(f"remp-convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
