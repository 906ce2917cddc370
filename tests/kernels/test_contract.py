"""One owner of what the backends share (``entropix_vllm/contract.py``), and the
per-op backend table of ``entropix_vllm/ops.py``.

* The C++ op's ``Col`` enum (``csrc/decide.cpp``, read as text) lists the
  short names of ``contract.DECIDE_COLUMNS`` in the same order; its branch
  codes and its clamp constants are the contract's; the Triton kernel's
  ``I_*`` launch constants (read from its source: no triton needed) are the
  same columns in the same order.
* ``ops`` passes the decision the columns the contract names, resolves each
  op's backend once from its table, and refuses a backend an op does not
  have, naming it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from entropix_vllm import contract, ops
from entropix_vllm.config import EntropixConfig

ROOT = Path(__file__).resolve().parents[2]
DECIDE_CPP = ROOT / "csrc" / "decide.cpp"
DECIDE_TRITON = ROOT / "triton_kernels" / "entropix_decide.py"


def _cpp_enum(text: str, name: str) -> list:
    m = re.search(r"enum\s+" + name + r"\s*:\s*\w+\s*\{(.*?)\};", text, re.S)
    assert m, f"enum {name} not found in {DECIDE_CPP}"
    return [x.strip() for x in m.group(1).split(",") if x.strip()]


def _cpp_float(text: str, name: str) -> float:
    m = re.search(r"constexpr\s+float\s+" + name + r"\s*=\s*(.*?);", text)
    assert m, f"constexpr float {name} not found in {DECIDE_CPP}"
    expr = m.group(1).strip()
    inner = re.fullmatch(r"static_cast<float>\((.*)\)", expr)
    if inner:
        expr = inner.group(1)
    expr = re.sub(r"(\d)f\b", r"\1", expr)          # 1e-6f -> 1e-6
    value = eval(compile(ast.parse(expr, mode="eval"), "<cpp>", "eval"), {"__builtins__": {}})
    return float(np.float32(value))


def test_decide_columns_are_config_fields_once_each():
    fields = EntropixConfig.field_names()
    names = [f for _, f in contract.DECIDE_COLUMNS]
    shorts = [s for s, _ in contract.DECIDE_COLUMNS]
    assert set(names) <= set(fields) and len(set(names)) == len(names)
    assert len(set(shorts)) == len(shorts)
    assert ops.DECIDE_COLUMNS == tuple(fields.index(f) for f in names)
    with pytest.raises(ValueError, match="no column for"):
        contract.decide_column_indices(fields[1:])


def test_cpp_col_enum_is_the_contract():
    cols = _cpp_enum(DECIDE_CPP.read_text(), "Col")
    assert cols[-1] == "NUM_COLS"
    assert cols[:-1] == [s for s, _ in contract.DECIDE_COLUMNS]


def test_cpp_branch_codes_and_clamps_are_the_contract():
    text = DECIDE_CPP.read_text()
    branches = dict(x.replace(" ", "").split("=") for x in _cpp_enum(text, "Branch"))
    assert branches == {"ARGMAX": str(contract.ARGMAX), "INSERT_COT": str(contract.INSERT_COT),
                        "EXPLORE": str(contract.EXPLORE), "RESAMPLE": str(contract.RESAMPLE),
                        "ADAPTIVE": str(contract.ADAPTIVE)}
    for cpp, py in (("kTopPMin", contract.TOP_P_MIN), ("kTopPMax", contract.TOP_P_MAX),
                    ("kMinPMin", contract.MIN_P_MIN), ("kMinPMax", contract.MIN_P_MAX)):
        assert _cpp_float(text, cpp) == float(np.float32(py)), cpp
    # the draw uses the named constants, no literal clamps
    assert "fclamp(p32, kTopPMin, kTopPMax), fclamp(m32, kMinPMin, kMinPMax)" in text


def test_the_checks_can_fail():
    """The readers above see a change: a reordered enum, another clamp."""
    text = DECIDE_CPP.read_text()
    swapped = text.replace("T0, P0, K0, M0,", "P0, T0, K0, M0,")
    assert _cpp_enum(swapped, "Col")[:-1] != [s for s, _ in contract.DECIDE_COLUMNS]
    other = text.replace("constexpr float kTopPMin = 1e-6f;", "constexpr float kTopPMin = 1e-5f;")
    assert _cpp_float(other, "kTopPMin") != float(np.float32(contract.TOP_P_MIN))


def test_triton_launch_constants_are_the_contract():
    tree = ast.parse(DECIDE_TRITON.read_text())
    kernel = next(n for n in ast.walk(tree)
                  if isinstance(n, ast.FunctionDef) and n.name == "_decide_kernel")
    consts = [a.arg for a in kernel.args.args if a.arg.startswith("I_")]
    assert consts == [f"I_{s}" for s, _ in contract.DECIDE_COLUMNS]
    src = DECIDE_TRITON.read_text()
    for name in ("TOP_P_MIN", "TOP_P_MAX", "MIN_P_MIN", "MIN_P_MAX"):
        assert f"{name} = tl.constexpr(contract.{name})" in src
    assert "1e-6" not in src.split('"""', 2)[2]   # no literal clamp left in the code


def test_backend_table_resolution():
    for op in ops.OPS:
        assert ops.resolve(op, "torch", "cpu") == "torch"
        assert ops.resolve(op, "auto", "meta") == "torch"
    want_cpu = "cpp" if ops.cpp_available() else "torch"
    for op in ("logit_stats", "sample_candidates", "decide_and_sample", "paged_attention_stats"):
        assert ops.resolve(op, "auto", "cpu") == want_cpu
    # an op with only a torch implementation: "auto" takes it; naming another refuses
    ops.IMPLEMENTATIONS["torch_only"] = {"torch": ops.IMPLEMENTATIONS["logit_stats"]["torch"]}
    try:
        assert ops.resolve("torch_only", "auto", "cpu") == "torch"
        with pytest.raises(ValueError, match="torch_only has no cpp implementation"):
            ops.resolve("torch_only", "cpp", "cpu")
    finally:
        del ops.IMPLEMENTATIONS["torch_only"]
        ops.resolve.cache_clear()
    with pytest.raises(ValueError, match="backend"):
        ops.resolve("logit_stats", "cuda", "cpu")
    with pytest.raises(ValueError, match="op"):
        ops.resolve("nope", "auto", "cpu")
    # resolved once: the same function object every call
    dev = torch.device("cpu")
    assert ops.implementation("logit_stats", "auto", dev) is ops.implementation(
        "logit_stats", "auto", dev)
    assert ops.describe("cpu").split(", ") == [f"{op}={ops.resolve(op, 'auto', 'cpu')}"
                                                 for op in ops.OPS]
