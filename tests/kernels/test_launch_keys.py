"""No kernel recompilation per decode step: Triton's specialisation keys of
every launch the public launchers make (``tests/launch_keys.py``, in a
subprocess without the interpreter: real ``JITFunction`` objects, Triton's own
binder and cache key for an sm_90 CUDA backend, plans for 132 SMs, nothing
compiled) do not depend on per-step values and depend on the batch size only
through a bounded set.

* Per-step values: for each scenario, configuration and batch size, every
  draw of the noise depth, sequence lengths, positions, seeds and
  ``max_seq_len`` gives the same set of keys.
* Batch size: over B = 1..64 each kernel of each configuration has one key;
  over 1..256 (65..256 sparsely) at most :data:`BOUND` (default 1): the logit
  statistics kernel has two, its split layout below the SM count and its row
  layout from it on (the merge kernel runs only in the first, the candidates
  kernel only in the second).
* The recorder sees what it should: a toy kernel with a specialised int
  argument and a pointer at a B-dependent offset gets several keys
  (``--canary``), and every kernel of ``triton_kernels/`` is recorded.

Before this change (commit eaeb515) the same probe found, for the SmolLM2-like
configuration (vocabulary 49152, 9 heads / 3 kv heads), 3 + 9 keys of the logit
statistics and merge kernels over B 1..64, 4 + 9 of the attention passes, 6 of
the decision (noise depth), 4 of the (since removed) seeded-noise kernel, and
243 (scenario, B) cells whose keys changed with per-step values.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
try:  # the recorder needs Triton's CUDA backend classes (no GPU)
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    from triton.runtime.jit import create_function_from_signature  # noqa: F401
except ImportError as e:  # pragma: no cover - another Triton layout
    pytest.skip(f"Triton internals the recorder uses are missing: {e}", allow_module_level=True)

PROBE = Path(__file__).resolve().parents[1] / "launch_keys.py"
ROOT = PROBE.parent.parent

#: Kernels allowed more than one key over B = 1..256 (per configuration).
BOUND = {"_logit_stats_kernel": 2}
#: Every kernel of triton_kernels/ (the probe must launch each).
KERNELS = {"_logit_stats_kernel", "_merge_kernel", "_candidates_kernel", "_decide_kernel",
           "_sample_kernel", "_head_partials_kernel", "_agreement_kernel"}


def _probe(*args) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-P", str(PROBE), *args], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def _tables(data: dict):
    by_cell = collections.defaultdict(set)   # (scenario, config, B) -> {variant key sets}
    by_kernel = collections.defaultdict(lambda: collections.defaultdict(set))
    for scen, cfg, B, _, launches in data["records"]:
        by_cell[(scen, cfg, B)].add(frozenset(map(tuple, launches)))
        for kernel, key in launches:
            by_kernel[(scen, cfg, kernel)][B].add(key)
    return by_cell, by_kernel


@pytest.fixture(scope="module")
def probe() -> dict:
    return _probe()


def test_keys_do_not_depend_on_per_step_values(probe):
    by_cell, _ = _tables(probe)
    changing = {cell: len(v) for cell, v in by_cell.items() if len(v) > 1}
    assert not changing, f"keys change with per-step values at fixed B: {changing}"
    # each batch size of each scenario was drawn more than once where it has variants
    assert sum(1 for r in probe["records"] if r[3] > 0) > 1000


def test_keys_depend_on_the_batch_size_through_a_bounded_set(probe):
    _, by_kernel = _tables(probe)
    seen = {k for _, _, k in by_kernel}
    assert seen == KERNELS, f"kernels not launched by the probe: {KERNELS - seen}"
    report, over = [], []
    for (scen, cfg, kernel), byB in sorted(by_kernel.items()):
        k64 = set().union(*(v for B, v in byB.items() if B <= 64))
        kall = set().union(*byB.values())
        report.append(f"{scen} [{cfg}] {kernel}: {len(k64)} over B 1..64, {len(kall)} over 1..256")
        if len(k64) > 1 or len(kall) > BOUND.get(kernel, 1):
            over.append(report[-1])
    assert not over, "\n".join(over)
    print("\n".join(report))


def test_the_recorder_sees_specialisation():
    """A kernel whose int argument and pointer offset follow B (what the
    launchers used to do) gets one key per (B == 1, B % 16 == 0, aligned
    offset) class: the recorder would catch a launcher that does it again."""
    _, by_kernel = _tables(_probe("--canary"))
    (byB,) = by_kernel.values()
    keys = set().union(*byB.values())
    assert len(keys) >= 3, keys
    assert byB[1] != byB[2] and byB[4] != byB[5] and byB[16] != byB[17]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles and launches on a GPU")
def test_cuda_compiles_each_kernel_within_the_bound():
    """On the GPU, Triton's own kernel cache after real launches over the same
    batch sizes and per-step draws (one configuration per kernel, a fresh
    process): one compiled variant per kernel, two of the logit statistics
    kernel when the sweep crosses the SM count."""
    counts = _probe("--cuda")["counts"]
    assert set(counts) == KERNELS
    over = {k: n for k, n in counts.items() if not 1 <= n <= BOUND.get(k, 1)}
    assert not over, counts
