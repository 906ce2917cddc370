"""Start and stop real ``vllm serve`` processes for the end-to-end tests.

Used by ``tests/e2e/test_e2e_server.py``; importable on its own for manual runs::

    from e2e_server import ServerSpec, start_servers, stop_all   # tests/ on sys.path
    servers = start_servers([ServerSpec("E", ["--sampler", "entropix"])], model, "/tmp/logs")
    ...
    stop_all(servers.values())

Every server:

* runs ``<venv>/bin/vllm serve MODEL`` with the common flags of
  :data:`COMMON_FLAGS` plus its own, on a free port, in its own process group
  (``start_new_session``), so :meth:`Server.stop` kills the API server, the
  engine core and the worker together;
* logs to ``<log_dir>/<name>.log``; when it exits or does not become healthy in
  time, :class:`ServerStartError` carries the tail of that log;
* gets the same environment (offline, KV cache size, one OpenMP thread, no CPU
  pinning, so several servers share the cores and compute the same floats; the
  classic compile cache, see :data:`COMMON_ENV`),
  except what its spec adds (``VLLM_PLUGINS=none`` for stock vLLM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import requests

REPO = Path(__file__).resolve().parent.parent

#: The trace file of the Entropix servers: a fixed path, because vLLM's compile
#: cache is keyed on ``additional_config``, so later runs (and other servers
#: with the same flags) reuse the compiled model. Readers take only the lines
#: appended after their server started and match records by request id.
ENTROPIX_TRACE_PATH = os.path.join(tempfile.gettempdir(), "entropix-vllm-e2e", "trace.jsonl")

# Flags every server gets (besides the model and the port). All servers get the
# same ones so that their numerics and scheduling limits match.
COMMON_FLAGS = ("--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "8",
                "--seed", "0")

# Environment every server gets. One OpenMP thread and no pinning: with vLLM's
# automatic binding every server would pin its worker to the same core.
COMMON_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_LOGGING_LEVEL": "INFO",
    # vllm-cpu 0.32's AOT compile cache never loads back ("'function' object has
    # no attribute 'finalize_loading'"), so every start would recompile (2-3 min
    # on 2 cores); the classic torch.compile cache path does load (about 1 min).
    "VLLM_USE_AOT_COMPILE": "0",
}
# Removed from the inherited environment (the test suite's conftest sets
# TRITON_INTERPRET for its own in-process kernel tests).
DROP_ENV = ("TRITON_INTERPRET", "VLLM_PLUGINS", "VLLM_USE_V2_MODEL_RUNNER")


#: Ordinary chat prompts the server tests send.
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Name three primary colours.",
    "Explain in one sentence what a CPU does.",
    "Tell me a fun fact about octopuses.",
    "List two fruits that are red.",
    "How many legs does a spider have?",
    "Give me a tip for learning to cook.",
)


class ServerStartError(RuntimeError):
    """A server exited or did not become healthy; the message holds its log tail."""


def vllm_executable() -> str:
    exe = Path(sys.executable).with_name("vllm")
    if exe.exists():
        return str(exe)
    venv = REPO / ".venv" / "bin" / "vllm"
    return str(venv)


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ServerSpec:
    name: str
    flags: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)


class Server:
    """One ``vllm serve`` process group."""

    def __init__(self, spec: ServerSpec, model: str, log_dir: Path):
        self.spec = spec
        self.name = spec.name
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"{spec.name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.cmd = [vllm_executable(), "serve", model, "--port", str(self.port),
                    "--host", "127.0.0.1", *COMMON_FLAGS, *spec.flags]

    def start(self) -> "Server":
        env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
        env.update(COMMON_ENV)
        env.update(self.spec.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(("$ " + " ".join(self.cmd) + "\n").encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=str(REPO),
                                         start_new_session=True)
        finally:
            log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def failure(self, why: str) -> ServerStartError:
        return ServerStartError(f"vllm server {self.name} ({' '.join(self.cmd)}) {why}; "
                                f"last lines of {self.log_path}:\n{log_tail(self.log_path)}")

    def terminate(self) -> None:
        """SIGTERM to the whole process group (returns at once)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group id is the leader's pid

    def kill(self) -> None:
        """SIGKILL to whatever is left of the process group; reap the leader."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def gone(self) -> bool:
        return self.proc is None or (self.proc.poll() is not None
                                     and not _group_alive(self.proc.pid))

    def stop(self, grace: float = 15.0) -> None:
        """Terminate the whole process group (SIGTERM, then SIGKILL)."""
        stop_all([self], grace)


def stop_all(servers, grace: float = 15.0) -> None:
    """SIGTERM every server's process group at once, give them ``grace``
    seconds together, then SIGKILL what is left (API server, engine core, worker)."""
    servers = [s for s in servers if s.proc is not None]
    for s in servers:
        s.terminate()
    deadline = time.time() + grace
    while time.time() < deadline and not all(s.gone() for s in servers):
        for s in servers:
            s.proc.poll()
        time.sleep(0.2)
    for s in servers:
        s.kill()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_servers(specs: Sequence[ServerSpec], model: str, log_dir, timeout: float = 900.0,
                  stagger: float = 0.0) -> dict:
    """Start every spec at once and wait until all answer ``/health``.

    On any failure every server started here is stopped and
    :class:`ServerStartError` is raised with the failing server's log tail.
    """
    servers = {}
    try:
        for spec in specs:
            servers[spec.name] = Server(spec, model, Path(log_dir)).start()
            if stagger:
                time.sleep(stagger)
        deadline = time.time() + timeout
        pending = dict(servers)
        while pending:
            for name, s in list(pending.items()):
                if not s.alive():
                    raise s.failure(f"exited with code {s.proc.returncode} before it was ready")
                if s.healthy():
                    del pending[name]
            if pending and time.time() > deadline:
                s = next(iter(pending.values()))
                raise s.failure(f"was not healthy after {timeout:.0f} s")
            if pending:
                time.sleep(2.0)
    except BaseException:
        stop_all(servers.values())
        raise
    return servers
