"""Shared test setup.

Without a CUDA device the Triton kernels run in the Triton interpreter on CPU
tensors; ``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function
is defined (i.e. before ``triton_kernels`` modules are imported), so it is set
here, ahead of every test module.

The package is imported as installed (``scripts/setup.sh``: editable, with
its C++ extension); a bare checkout without an install (a GPU machine with
only torch and Triton, ``scripts/gpu_check.sh``) takes it from the repository
root instead.
"""

import os
import sys

import torch

try:
    import entropix_vllm  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test modules live in layer folders (reference/, kernels/, integration/, e2e/);
# the shared helpers (e2e_server, tiny_model, sync_audit, ...) stay here.
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

#: Markers by folder (pyproject.toml registers them): ``-m "not e2e"`` is the
#: fast selection; ``slow`` marks what takes minutes (parallel engines, tuning).
_FOLDER_MARKS = {"e2e": ("e2e",)}


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bundled_model() -> str:
    """The bundled model's folder (``scripts/setup.sh`` builds it); skips when absent."""
    from entropix_vllm import bundled

    try:
        return bundled.bundled_model_path(build=False)
    except FileNotFoundError as e:
        pytest.skip(f"the bundled model is not built ({e})")


@pytest.fixture(scope="session")
def vllm_cli() -> str:
    """The ``vllm`` console script of this environment; skips when absent."""
    from e2e_server import vllm_executable

    path = vllm_executable()
    if not os.path.exists(path):
        pytest.skip(f"no vllm executable at {path}")
    return path


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = os.path.relpath(str(item.fspath), TESTS).split(os.sep)
        for mark in _FOLDER_MARKS.get(parts[0], ()):
            item.add_marker(getattr(pytest.mark, mark))
