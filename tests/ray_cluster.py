"""The Entropix plugin inside a Ray worker of vLLM, on a local Ray cluster of the test's own.

Used by ``tests/e2e/test_parallel.py``; runnable on its own::

    python tests/ray_cluster.py probe MODEL   # prints one line: PROBE {json}

The script (the Ray driver) starts its own head node (``ray.init``: loopback
only, 2 CPUs) and shuts it down at the end; :func:`probe` runs it in its own
process group and kills that group afterwards, so nothing of Ray outlives the
test and no other cluster is touched. ``probe`` builds an Entropix engine configuration in the driver, then, in an
actor of the cluster (another process, started by the raylet), does what vLLM's
Ray executor does in each of its workers (``RayWorkerProc``: the driver's
environment variables applied with ``setdefault``, then
``WorkerWrapperBase.init_worker``, which loads the ``vllm.general_plugins``
entry points and builds the platform's worker class) and reports whether the
Entropix plugin is active there, its runner patches applied, and the engine's
settings as the worker sees them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def probe(model: str, timeout: float = 400.0, env: dict = None) -> dict:
    """Run ``probe`` in a fresh interpreter (the Ray driver, which starts and
    stops the cluster) in its own process group, killed whatever happens."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "probe", model],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)   # whatever Ray left in the group
        proc.wait()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    if r.returncode != 0 or not lines:
        raise AssertionError(f"the Ray probe failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-6000:]}")
    return json.loads(lines[-1][len("PROBE "):])


# ----------------------------------------------------------------------------
# Script mode
# ----------------------------------------------------------------------------
class _WorkerProbe:
    """An actor set up as vLLM's ``RayWorkerProc`` sets up its worker."""

    def run(self, vllm_config, driver_env: dict) -> dict:
        for key, value in driver_env.items():   # RayWorkerProc.initialize_worker
            os.environ.setdefault(key, value)
        from vllm.v1.worker.worker_base import WorkerWrapperBase

        wrapper = WorkerWrapperBase(rpc_rank=0)
        wrapper.init_worker([{"vllm_config": vllm_config, "local_rank": 0, "rank": 0,
                              "distributed_init_method": "tcp://127.0.0.1:1",
                              "is_driver_worker": True}])
        from entropix_vllm.integration import engine, patches, plugin, vllm_api

        runner = vllm_api.runner_module(vllm_api.MRV1).GPUModelRunner
        cfg = wrapper.vllm_config
        return {
            "pid": os.getpid(),
            "plugin_active": bool(plugin._STATE["active"]),
            "runner_patched": all(patches.patched(getattr(runner, a)) for a in
                                  ("__init__", "execute_model", "initialize_kv_cache")),
            "worker_class": type(wrapper.worker).__name__,
            "entropix_engine": engine.entropix_enabled(cfg),
            "attn_layer": engine.engine_config(cfg).options.attn_layer,
            "vllm_plugins_env": os.environ.get("VLLM_PLUGINS"),
        }


def _probe(model: str) -> None:
    import ray
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.executor.ray_env_utils import get_driver_env_vars
    from vllm.v1.executor.ray_utils import WORKER_SPECIFIC_ENV_VARS

    cfg = EngineArgs(model=model, dtype="float32", max_model_len=512, enforce_eager=True,
                     kv_cache_memory_bytes=64 * 2**20,
                     additional_config={"sampler": "entropix",
                                        "entropix": {"attn_layer": 1}}).create_engine_config()
    # The cluster: this process's own head node, loopback only, gone at shutdown.
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    try:
        actor = ray.remote(num_cpus=1)(_WorkerProbe).options(
            runtime_env=dict(cfg.parallel_config.ray_runtime_env or {})).remote()
        env = get_driver_env_vars(worker_specific_vars=WORKER_SPECIFIC_ENV_VARS)
        out = ray.get(actor.run.remote(cfg, env), timeout=240)
        out["driver_pid"] = os.getpid()
        print("PROBE " + json.dumps(out), flush=True)
        ray.kill(actor)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        _probe(sys.argv[2])
    else:
        raise SystemExit(__doc__)
