"""Start `remp serve` as a subprocess on an ephemeral port and wait until it serves (tests, demo, benchmarks)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServerProcess:
    """``remp serve --model MODEL --nproc NPROC --tp TP --pp PP *EXTRA --port 0``, serving once constructed.

    Its stdout and stderr go to ``workdir/NAME.log`` (``.log_path``); ``.addr`` is ``127.0.0.1:PORT``, and with
    ``--http-port`` in ``extra``, ``.http_url`` is ``http://127.0.0.1:HTTP_PORT`` (else None);
    ``env`` adds to the environment. If the server exits or is not serving within ``timeout`` seconds, it is
    stopped and RuntimeError carries the log's tail. A context manager: leaving it stops the server.
    """

    def __init__(self, model, nproc: int, tp: int, pp: int, *extra, workdir: Path, name: str = "server",
                 timeout: float = 240, env: dict[str, str] | None = None):
        self.log_path = Path(workdir) / f"{name}.log"
        port_file = Path(workdir) / f"{name}.port"
        port_file.unlink(missing_ok=True)  # a stale one would look like a started server
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--nproc", str(nproc),
               "--tp", str(tp), "--pp", str(pp), "--port", "0", "--port-file", str(port_file), *map(str, extra)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text()):
            exited = self.proc.poll() is not None
            if exited or time.monotonic() > deadline:
                why = f"exited with code {self.proc.returncode}" if exited else f"was not serving after {timeout:.0f} s"
                self.stop()
                raise RuntimeError(f"`remp serve` {why}; the end of {self.log_path}:\n"
                                   f"{self.log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        ports = json.loads(port_file.read_text())
        self.addr = f"127.0.0.1:{ports['port']}"
        self.http_url = f"http://127.0.0.1:{ports['http_port']}" if "http_port" in ports else None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful shutdown), SIGKILL after ``timeout`` seconds; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
