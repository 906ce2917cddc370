"""Checks the seam against vLLM's *source*: every entry of
``vllm_api.INTERNALS`` is where the table says, read with ``ast`` (nothing
imported).

The start-up probe (:func:`probe`, on the installed vLLM, in every process the
plugin is loaded in) and the drift test (``tests/integration/test_vllm_drift.py``,
on the installed 0.32 and on the 0.33.0 wheel) run the same :func:`check`.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from .vllm_api import INTERNALS, SERIES, Internal, series_of


class Source:
    """The ``.py`` files of one vLLM, read from a directory or a wheel."""

    def __init__(self, read: Callable[[str], Optional[str]], label: str):
        self._read = read
        self.label = label
        self._trees: Dict[str, Optional[ast.Module]] = {}

    @classmethod
    def directory(cls, root: str) -> "Source":
        """``root`` holds the ``vllm/`` package (e.g. site-packages)."""
        def read(rel):
            p = os.path.join(root, rel)
            if not os.path.isfile(p):
                return None
            with open(p, encoding="utf-8") as f:
                return f.read()
        return cls(read, root)

    @classmethod
    def installed(cls) -> "Source":
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("vllm is not installed")
        return cls.directory(os.path.dirname(list(spec.submodule_search_locations)[0]))

    @classmethod
    def wheel(cls, path: str) -> "Source":
        z = zipfile.ZipFile(path)
        names = set(z.namelist())

        def read(rel):
            return z.read(rel).decode("utf-8") if rel in names else None
        return cls(read, path)

    def version(self) -> str:
        """``__version__`` of ``vllm/_version.py`` (read, not imported)."""
        text = self._read("vllm/_version.py") or ""
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and any(
                    isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
                return str(node.value.value)
        return ""

    def tree(self, module: str) -> Optional[ast.Module]:
        if module not in self._trees:
            rel = module.replace(".", "/")
            text = self._read(rel + ".py")
            if text is None:
                text = self._read(rel + "/__init__.py")
            self._trees[module] = None if text is None else ast.parse(text)
        return self._trees[module]

    def is_package(self, module: str) -> bool:
        return self._read(module.replace(".", "/") + "/__init__.py") is not None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level(body) -> list:
    """Module-level statements, entering if / try blocks (not ``if TYPE_CHECKING``)."""
    out = []
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                out += _top_level(node.body)
            out += _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body)
            for h in node.handlers:
                out += _top_level(h.body)
            out += _top_level(node.orelse) + _top_level(node.finalbody)
        else:
            out.append(node)
    return out


def _absolute(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Resolver:
    def __init__(self, source: Source):
        self.src = source
        self._bodies: dict = {}
        self._attrs: dict = {}

    def body(self, node: ast.ClassDef) -> dict:
        if id(node) not in self._bodies:
            self._bodies[id(node)] = _class_body_names(node)
        return self._bodies[id(node)]

    def self_attributes(self, node: ast.ClassDef) -> set:
        if id(node) not in self._attrs:
            self._attrs[id(node)] = _self_attributes(node)
        return self._attrs[id(node)]

    def binding(self, module: str, name: str, depth: int = 0):
        """``(module, node)`` where ``module.name`` is defined (following
        re-exports and star imports), or None."""
        tree = self.src.tree(module)
        if tree is None or depth > 12:
            return None
        stars = []
        found = None
        for node in _top_level(tree.body):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.name == name:
                found = (module, node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name) and n.id == name:
                            found = (module, node)
            elif isinstance(node, ast.ImportFrom):
                src = _absolute(module, self.src.is_package(module), node)
                for a in node.names:
                    if a.name == "*":
                        stars.append(src)
                    elif (a.asname or a.name) == name:
                        sub = self.binding(src, a.name, depth + 1)
                        if sub is None and self.src.tree(f"{src}.{a.name}") is not None:
                            sub = (f"{src}.{a.name}", self.src.tree(f"{src}.{a.name}"))
                        found = sub or (module, node)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if (a.asname or a.name.split(".")[0]) == name:
                        found = (module, node)
        if found is not None:
            return found
        for src in stars:
            sub = self.binding(src, name, depth + 1)
            if sub is not None:
                return sub
        return None

    def cls(self, module: str, name: str):
        b = self.binding(module, name)
        if b is not None and isinstance(b[1], ast.ClassDef):
            return b
        return None

    def mro(self, module: str, node: ast.ClassDef, depth: int = 0):
        """The class and its resolvable bases, depth first."""
        yield module, node
        if depth > 12:
            return
        for base in node.bases:
            while isinstance(base, ast.Subscript):
                base = base.value
            if isinstance(base, ast.Name):
                b = self.cls(module, base.id)
            elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
                b = self.cls(module, base.attr)
            else:
                b = None
            if b is not None:
                yield from self.mro(b[0], b[1], depth + 1)


def _decorators(fn) -> set:
    out = set()
    for d in fn.decorator_list:
        if isinstance(d, ast.Call):
            d = d.func
        if isinstance(d, ast.Name):
            out.add(d.id)
        elif isinstance(d, ast.Attribute):
            out.add(d.attr)
    return out


def _params(fn) -> list:
    a = fn.args
    return [x.arg for x in a.posonlyargs + a.args], [x.arg for x in a.kwonlyargs]


def _class_body_names(node: ast.ClassDef) -> dict:
    out = {}
    for st in node.body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[st.name] = st
        elif isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
            out.setdefault(st.target.id, st)
        elif isinstance(st, ast.Assign):
            for t in st.targets:
                if isinstance(t, ast.Name):
                    out.setdefault(t.id, st)
    return out


def _self_attributes(node: ast.ClassDef) -> set:
    out = set()
    for st in ast.walk(node):
        targets = []
        if isinstance(st, ast.Assign):
            targets = st.targets
        elif isinstance(st, (ast.AnnAssign, ast.AugAssign)):
            targets = [st.target]
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) \
                        and n.value.id == "self":
                    out.add(n.attr)
    return out


def _check_one(r: _Resolver, e: Internal) -> Optional[str]:
    """None when ``e`` holds in this source, else why not."""
    if e.kind == "module":
        return None if r.src.tree(e.module) is not None else "module not found"
    if r.src.tree(e.module) is None:
        return f"module {e.module} not found"
    parts = e.qualname.split(".")
    if e.kind in ("name", "class", "function") and len(parts) == 1:
        b = r.binding(e.module, parts[0])
        if b is None:
            return f"no {parts[0]} in {e.module}"
        node = b[1]
        if e.kind == "class" and not isinstance(node, ast.ClassDef):
            return f"{parts[0]} is not a class"
        if e.kind == "function":
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return f"{parts[0]} is not a function"
            return _check_params(node, e)
        return None
    b = r.cls(e.module, parts[0])
    if b is None:
        return f"no class {parts[0]} in {e.module}"
    member = parts[1]
    for mod, cnode in r.mro(*b):
        node = r.body(cnode).get(member)
        if e.kind in ("method", "property"):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                is_prop = bool(_decorators(node) & {"property", "cached_property"})
                if e.kind == "property" and not is_prop:
                    return f"{parts[0]}.{member} is not a property"
                if e.kind == "method" and is_prop:
                    return f"{parts[0]}.{member} is a property, not a method"
                return _check_params(node, e) if e.kind == "method" else None
            if node is not None:
                return f"{parts[0]}.{member} is not a {e.kind}"
        elif e.kind == "field":
            if node is not None:
                return None
        elif e.kind == "attribute":
            if node is not None or member in r.self_attributes(cnode):
                return None
        else:  # pragma: no cover - a typo in INTERNALS
            return f"unknown kind {e.kind}"
    return f"{parts[0]} has no {e.kind} {member}"


def _check_params(fn, e: Internal) -> Optional[str]:
    pos, kwonly = _params(fn)
    if not e.params:
        return None
    if e.positional:
        if pos[:len(e.params)] != list(e.params):
            return (f"parameters ({', '.join(pos[:len(e.params) + 2])}...) do not begin with "
                    f"({', '.join(e.params)})")
        return None
    names = pos + kwonly
    missing = [p for p in e.params if p not in names]
    if missing:
        return f"no parameter {', '.join(map(repr, missing))} (has {', '.join(names)})"
    idx = [names.index(p) for p in e.params]
    if idx != sorted(idx):
        return f"parameters {', '.join(e.params)} are in another order ({', '.join(names)})"
    return None


def check(source: Source, series: str,
          internals: Sequence[Internal] = INTERNALS) -> List[str]:
    """Every entry of ``internals`` for ``series`` that ``source`` lacks, as
    ``"<path> (<kind>): <why>"``; empty when all hold."""
    r = _Resolver(source)
    out = []
    for e in internals:
        if series not in e.series:
            continue
        why = _check_one(r, e)
        if why is not None:
            out.append(f"{e}: {why}")
    return out


@dataclass
class ProbeResult:
    version: str
    series: str
    problems: List[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def probe(source: Optional[Source] = None, version: Optional[str] = None) -> ProbeResult:
    """The start-up probe: the installed vLLM's version is supported and every
    internal of its series is where :data:`INTERNALS` says."""
    source = source or Source.installed()
    version = version or source.version() or "unknown"
    series = series_of(version)
    if series not in SERIES:
        return ProbeResult(version, series, [
            f"vLLM {version} is not a supported version (supported: "
            f"{', '.join(s + '.x' for s in SERIES)})"])
    return ProbeResult(version, series, check(source, series))
