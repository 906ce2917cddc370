"""The package's import structure, read from its source (``ast``, nothing imported).

* No import circle: no two modules of the package import each other, directly
  or through others (every ``import`` counts, also those inside functions).
* The Triton kernels import, of the package, only ``entropix_vllm.contract``
  (and each other); ``contract.py`` imports nothing of the package.
* ``integration/vllm_api.py`` is the only module that imports vLLM.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = "entropix_vllm"


def _modules() -> dict:
    """{module name: file} of the package (``triton_kernels/`` is installed as
    ``entropix_vllm.triton_kernels``)."""
    out = {}
    for base, prefix in ((ROOT / PKG, PKG), (ROOT / "triton_kernels", f"{PKG}.triton_kernels")):
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = f
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set:
    """Every module name ``name``'s source imports (absolute; anywhere in the file)."""
    tree = ast.parse(MODULES[name].read_text())
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = ".".join(base[:len(base) - (node.level - 1)])
                mod = f"{parent}.{node.module}" if node.module else parent
            else:
                mod = node.module or ""
            out.add(mod)
            for a in node.names:  # `from . import x` imports the submodule x
                if f"{mod}.{a.name}" in MODULES:
                    out.add(f"{mod}.{a.name}")
    return out


def _package_edges() -> dict:
    graph = {}
    for name in MODULES:
        deps = {d for d in _imports(name) if d in MODULES and d != name}
        # `from entropix_vllm import x` names the package only to reach x
        deps.discard(PKG) if name != PKG else None
        graph[name] = deps
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_the_package():
    for name in ("entropix_vllm.ops", "entropix_vllm.integration.plugin",
                 "entropix_vllm.integration.mrv2", "entropix_vllm.triton_kernels.entropix_decide"):
        assert name in MODULES
    g = _package_edges()
    assert "entropix_vllm.integration.vllm_api" in g["entropix_vllm.integration.plugin"]
    assert "entropix_vllm.triton_kernels.candidate_sampling" in \
        g["entropix_vllm.triton_kernels.entropix_decide"]


def test_no_import_circle():
    assert _cycles(_package_edges()) == []


def test_a_circle_would_be_found():
    g = _package_edges()
    g["entropix_vllm.contract"] = g["entropix_vllm.contract"] | {"entropix_vllm.ops"}
    assert any("entropix_vllm.contract" in c and "entropix_vllm.ops" in c for c in _cycles(g))


def test_kernels_import_only_the_contract():
    kernels = [m for m in MODULES if m.startswith(f"{PKG}.triton_kernels")]
    assert len(kernels) >= 6
    for name in kernels:
        ours = {d for d in _imports(name) if d == PKG or d.startswith(PKG + ".")}
        assert ours <= {f"{PKG}.contract", PKG} | set(kernels), (name, ours)
        if PKG in ours:  # `from entropix_vllm import contract`
            assert f"{PKG}.contract" in ours, name
        assert not {d for d in _imports(name) if d.split(".")[0] == "vllm"}, name
    assert {d for d in _imports(f"{PKG}.contract") if d.startswith(PKG)} == set()


def test_only_the_seam_imports_vllm():
    importers = sorted(m for m in MODULES if any(d == "vllm" or d.startswith("vllm.")
                                                 for d in _imports(m)))
    assert importers == [f"{PKG}.integration.vllm_api"], importers
