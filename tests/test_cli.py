"""`remp serve` flags come from the config models: their defaults, their names, their errors (pure)."""
from pathlib import Path

import pytest

from remp_megatron.config import EngineConfig
from remp_megatron.policy import PolicyConfig
from server import cli
from server.config import ServerConfig

MODEL = Path("runs/some-model")


def serve_config(monkeypatch, *flags: str) -> ServerConfig:
    seen = []
    monkeypatch.setattr(cli, "cmd_serve", lambda args: seen.append(args) or 0)
    assert cli.main(["serve", "--model", str(MODEL), "--nproc", "1", *flags]) == 0
    return cli.serve_config(seen[0])


def test_no_flags_gives_the_model_defaults(monkeypatch):
    assert serve_config(monkeypatch) == ServerConfig(model=MODEL.resolve())


def test_each_flag_sets_its_field(monkeypatch):
    cfg = serve_config(
        monkeypatch, "--tp", "2", "--pp", "3", "--ep", "2", "--host", "localhost", "--port", "0", "--http-port", "0",
        "--served-model-name", "m", "--metrics-port", "9",
        "--admin-token-file", "tok", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--max-prompt-tokens", "7",
        "--max-new-tokens", "8", "--shutdown-grace", "1.5", "--kv-budget-mb", "8", "--max-num-seqs", "2",
        "--max-tokens-per-step", "6", "--dtype", "bf16", "--max-queue", "3", "--block-size", "4", "--policy-profile", "p.json", "--policy", "--policy-interval", "0.5",
        "--policy-low", "0", "--policy-high", "2", "--policy-patience", "5", "--policy-min-dwell", "0")
    assert cfg == ServerConfig(
        model=MODEL.resolve(), tp=2, pp=3, ep=2, host="localhost", port=0, http_port=0, served_model_name="m",
        metrics_port=9, admin_token_file=Path("tok"),
        tls_cert=Path("c.pem"), tls_key=Path("k.pem"), max_prompt_tokens=7, max_new_tokens=8, shutdown_grace_s=1.5,
        engine=EngineConfig(kv_budget_mb=8, max_num_seqs=2, max_tokens_per_step=6, dtype="bf16", max_queue=3,
                            block_size=4),
        policy_profile=Path("p.json"), policy_enabled=True,
        policy=PolicyConfig(interval_s=0.5, low_load=0, high_load=2, patience=5, min_dwell_s=0))


def test_dtype_is_one_of_the_serving_dtypes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--model", str(MODEL), "--nproc", "1", "--dtype", "float8"])
    err = capsys.readouterr().err
    assert "argument --dtype: invalid choice: 'float8'" in err and all(d in err for d in ("fp32", "bf16", "fp16"))


def test_help_lists_every_flag_with_its_models_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(flag in text for flag in cli.SERVE_FLAGS.values())
    assert f"--port PORT gRPC port (0: any free port) (default: {ServerConfig.model_fields['port'].default})" in text
    assert f"--max-queue MAX_QUEUE {EngineConfig.model_fields['max_queue'].description} " \
           f"(default: {EngineConfig().max_queue})" in text
    assert f"--policy-min-dwell POLICY_MIN_DWELL {PolicyConfig.model_fields['min_dwell_s'].description} " \
           f"(default: {PolicyConfig().min_dwell_s})" in text


@pytest.mark.parametrize("flags, error", [
    (["--port", "70000"], "--port: Input should be less than or equal to 65535"),
    (["--max-queue", "0"], "--max-queue: Input should be greater than or equal to 1"),
    (["--policy-low", "7"], "policy: low_load (7.0) must be below high_load (6.0)"),
    (["--policy-profile", "runs/none.json"], "runs/none.json: cannot read the cost profile: No such file or directory"),
])
def test_a_bad_value_is_one_clear_line(flags, error, capsys):
    assert cli.main(["serve", "--model", str(MODEL), "--nproc", "1", *flags]) == 2
    assert capsys.readouterr().err == f"remp: error: {error}\n"
