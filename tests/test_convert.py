"""remp-convert: round trips, inspect, and every bad-input case (real files, real CLI)."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, convert, run
from gguf_writer import write_gguf
from remp_megatron.spec import ModelSpec


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# Every tensor rule is covered: qwen2 has llama's tensors plus QKV biases (llama3 differs from
# llama only in config.json), qwen3_moe qwen3's plus experts and a dense layer; Mixtral's rules
# differ from Qwen3-MoE's only in HF names, which its import (parity, GGUF tests) checks.
@pytest.mark.parametrize("which", ["qwen2", "qwen3_moe"])
def test_round_trip_is_bit_identical(which, request, tmp_path):
    src = request.getfixturevalue(f"{which}_hf")
    mg = request.getfixturevalue(f"{which}_mg")
    convert("export", mg, tmp_path / "back")
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert set(a) == set(b) and a
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def megatron_tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every global tensor of a converted dir's dist-checkpoint, read without a world."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(d / "megatron"))
    meta = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items() if hasattr(v, "size")}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


@pytest.mark.parametrize("which", ["mixtral", "qwen3_moe"])
def test_gguf_import_equals_safetensors_import(which, request, tmp_path):
    """llama.cpp's layout (names; Mixtral as a llama GGUF with experts and permuted Q/K; experts
    stacked per projection; Qwen3-MoE's Q/K norms, head_dim and a dense layer) imports to the same
    megatron tensors and the same ModelSpec as the HF safetensors of the same weights."""
    gguf = write_gguf(request.getfixturevalue(f"{which}_hf"), tmp_path / f"{which}.gguf")
    convert("import", gguf, tmp_path / "mg")
    want_dir = request.getfixturevalue(f"{which}_mg")
    got, want = megatron_tensors(tmp_path / "mg"), megatron_tensors(want_dir)
    assert got.keys() == want.keys() and got
    for k in got:
        assert torch.equal(got[k], want[k]), k
    got_spec, want_spec = (ModelSpec.from_file(d / "config.json") for d in (tmp_path / "mg", want_dir))
    if which == "qwen3_moe":  # GGUF has no norm_topk_prob: llama.cpp renormalises (as Qwen3-MoE releases do)
        assert got_spec.moe.normalize
        want_spec = want_spec.model_copy(update={"moe": want_spec.moe.model_copy(update={"normalize": True})})
    # No tokenizer metadata in this GGUF (so no EOS); GGUF stores the norm epsilon as fp32.
    apart = {"eos_token_ids", "rms_norm_eps"}
    assert got_spec.model_dump(exclude=apart) == want_spec.model_dump(exclude=apart)
    assert got_spec.rms_norm_eps == torch.tensor(want_spec.rms_norm_eps, dtype=torch.float32).item()


def test_sharded_source_was_really_sharded(qwen2_hf):
    assert len(list(qwen2_hf.glob("*.safetensors"))) > 1 and (qwen2_hf / "model.safetensors.index.json").exists()


def test_inspect_reports_architecture_and_parameters(llama_hf, llama_mg):
    out = convert("inspect", llama_mg).stdout
    n = sum(t.numel() for t in hf_tensors(llama_hf).values())
    assert "architecture  llama" in out and f"parameters    {n:,}" in out and "dtype         float32" in out
    assert "decoder.layers.self_attention.linear_qkv.weight" in out


def test_gguf_import_carries_tokenizer_and_config(smol_mg):
    from transformers import AutoTokenizer

    cfg = json.loads((smol_mg / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(str(smol_mg))
    assert len(tok) == 49152 and tok.chat_template


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **over) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(over)
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(d: Path, fn) -> None:
    f = d / "model.safetensors"
    save_file(fn(load_file(f)), f, metadata={"format": "pt"})


def _case(name: str, llama_hf: Path, smol_gguf: Path, tmp: Path) -> tuple[Path, str]:
    """Build a bad input; return (src, text the error must contain)."""
    if name == "missing-src":
        return tmp / "nope", "no such file or directory"
    if name == "no-config":
        d = tmp / "noconfig"
        d.mkdir()
        return d, "config.json: missing"
    if name == "no-weights":
        d = tmp / "noweights"
        d.mkdir()
        shutil.copy(llama_hf / "config.json", d)
        return d, "no *.safetensors files"
    if name == "unsupported-arch":
        d = _copy(llama_hf, tmp / "arch")
        _edit_config(d, architectures=["GPT2LMHeadModel"])
        return d, "field 'architectures'"
    if name == "shape-mismatch":
        d = _copy(llama_hf, tmp / "shape")
        _edit_config(d, intermediate_size=96)
        return d, "mlp.gate_proj.weight"
    if name == "missing-tensor":
        d = _copy(llama_hf, tmp / "missing")
        _rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != "model.layers.3.mlp.up_proj.weight"})
        return d, "tensor 'model.layers.3.mlp.up_proj.weight' missing"
    if name == "extra-tensor":
        d = _copy(llama_hf, tmp / "extra")
        _rewrite_tensors(d, lambda t: {**t, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)})
        return d, "unexpected tensor"
    if name == "truncated-safetensors":
        d = _copy(llama_hf, tmp / "trunc")
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return d, "model.safetensors"
    if name == "corrupt-gguf":
        f = tmp / "broken.gguf"
        f.write_bytes(smol_gguf.read_bytes()[:65536])
        return f, "broken.gguf: not a readable GGUF file"
    if name == "gguf-rope-scaling":
        return write_gguf(llama_hf, tmp / "scaled.gguf", rope_scaling="linear"), "field 'llama.rope.scaling.type'"
    if name == "not-a-model":
        f = tmp / "weights.bin"
        f.write_bytes(b"\0" * 16)
        return f, "expected an HF model directory or a .gguf file"
    raise KeyError(name)


BAD = ["missing-src", "no-config", "no-weights", "unsupported-arch", "shape-mismatch", "missing-tensor",
       "extra-tensor", "truncated-safetensors", "corrupt-gguf", "gguf-rope-scaling", "not-a-model"]


def _assert_one_clear_line(code: int, stderr: str, expected: str, out_parent: Path) -> None:
    assert code != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("remp-convert: error:")]
    assert len(errors) == 1 and expected in errors[0], stderr[-2000:]
    assert list(out_parent.iterdir()) == []  # neither OUT nor a partial temp dir


# Every case runs the CLI's own ``main`` in one child process (a process per case cost ~5 s of
# imports each; a child, because an import sets up torch.distributed state that must not leak
# into pytest); one case also runs as the real `remp-convert` process below.
_RUN_CASES = """
import contextlib, io, json, sys, traceback
from checkpoint_tools.convert import main
results = {}
for case, src, out in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(["import", src, out])
        except BaseException:
            code, _ = 99, traceback.print_exc()
    results[case] = {"code": code, "stderr": err.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_results(llama_hf, smol_gguf, tmp_path_factory) -> dict[str, tuple[dict, str, Path]]:
    cases = {}
    for case in BAD:
        tmp = tmp_path_factory.mktemp(case)
        src, expected = _case(case, llama_hf, smol_gguf, tmp)
        (tmp / "outputs").mkdir()
        cases[case] = (src, expected, tmp / "outputs")
    job = json.dumps([[case, str(src), str(out / "out")] for case, (src, _, out) in cases.items()])
    proc = run([sys.executable, "-c", _RUN_CASES, job], 300, cwd=ROOT)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {case: (results[case], expected, out) for case, (_, expected, out) in cases.items()}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gives_one_clear_line_and_no_output(case, bad_results):
    result, expected, out_parent = bad_results[case]
    _assert_one_clear_line(result["code"], result["stderr"], expected, out_parent)


def test_bad_input_through_the_cli_process(llama_hf, smol_gguf, tmp_path):
    src, expected = _case("shape-mismatch", llama_hf, smol_gguf, tmp_path)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    proc = convert("import", src, out_parent / "out", check=False)
    _assert_one_clear_line(proc.returncode, proc.stderr, expected, out_parent)


def test_existing_output_is_not_overwritten(llama_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = convert("import", llama_hf, out, check=False)
    assert proc.returncode != 0 and "already exists" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_rejects_unconverted_dir(llama_hf, tmp_path):
    proc = convert("export", llama_hf, tmp_path / "x", check=False)
    assert proc.returncode != 0 and "not a converted model directory" in proc.stderr
    assert not (tmp_path / "x").exists()
