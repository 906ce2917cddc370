"""Named sampler configurations of the eval, and the request fields they send.

A sampler is either *stock* (vLLM's own sampling with ``temperature``,
``top_p``, ``top_k``, ``min_p``; sent with ``vllm_xargs.entropix = false`` to
an Entropix server so that it really is vLLM's sampler) or *Entropix*
(``vllm_xargs.entropix = true``, an optional ``entropix_preset`` and
``entropix_<coefficient>`` overrides). Either may add raw request fields with
``body`` (e.g. ``{"repetition_penalty": 1.1}``).

On the command line (``--sampler``, repeatable)::

    NAME                        a built-in (see BUILTIN)
    NAME:key=value,key=value    a built-in with changes, or a new sampler

Keys: ``temperature``, ``top_p``, ``top_k``, ``min_p`` (stock sampling fields;
on an Entropix sampler they are the coefficients T0, P0, K0, M0),
``entropix`` (true/false), ``preset`` (an Entropix preset name) and every
Entropix coefficient name (``high_ent_thresh=4``...), which make the sampler an
Entropix one. In a JSON file (``--samplers FILE``): ``{"NAME": {...}, ...}``
with the same keys, plus ``body`` (an object of raw request fields) and
``entropix`` (true, or an object of coefficients).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ..config import EntropixConfig

STOCK_KEYS = ("temperature", "top_p", "top_k", "min_p")
COEFFICIENTS = EntropixConfig.field_names()


class SamplerSpecError(ValueError):
    """A sampler configuration that cannot be used; names the sampler and key."""


@dataclass(frozen=True)
class SamplerConfig:
    name: str
    entropix: bool = False
    stock: Mapping[str, float] = field(default_factory=dict)     # stock sampling fields
    preset: Optional[str] = None                                 # entropix_preset
    coefficients: Mapping[str, Any] = field(default_factory=dict)  # entropix_<name>
    body: Mapping[str, Any] = field(default_factory=dict)

    @property
    def deterministic(self) -> bool:
        """Stock greedy (temperature 0 or top_k 1): one sample stands for every seed."""
        if self.entropix or self.body:
            return False
        return self.stock.get("temperature", 1.0) == 0 or self.stock.get("top_k", 0) == 1

    def request_fields(self, seed: Optional[int], entropix_server: bool) -> dict:
        """The fields this sampler adds to a request body."""
        out: dict[str, Any] = dict(self.body)
        if seed is not None and not self.deterministic:
            out["seed"] = int(seed)
        if self.entropix:
            xargs = {"entropix": True}
            if self.preset is not None:
                xargs["entropix_preset"] = self.preset
            for k, v in self.coefficients.items():
                xargs[f"entropix_{k}"] = v
        else:
            out.update(self.stock)
            xargs = {"entropix": False} if entropix_server else {}
        if xargs:
            out["vllm_xargs"] = {**out.get("vllm_xargs", {}), **xargs}
        return out

    def describe(self) -> str:
        if not self.entropix:
            parts = [f"{k}={v:g}" for k, v in self.stock.items()] or ["server defaults"]
            return "stock " + " ".join(parts)
        parts = [f"preset={self.preset}"] if self.preset else []
        parts += [f"{k}={v}" for k, v in self.coefficients.items()]
        return "entropix " + (" ".join(parts) or "(server's configuration)")

    def as_dict(self) -> dict:
        return {"name": self.name, "entropix": self.entropix, "stock": dict(self.stock),
                "preset": self.preset, "coefficients": dict(self.coefficients),
                "body": dict(self.body), "description": self.describe()}


BUILTIN: dict[str, SamplerConfig] = {s.name: s for s in (
    SamplerConfig("greedy", stock={"temperature": 0.0}),
    SamplerConfig("t0.7-p0.9", stock={"temperature": 0.7, "top_p": 0.9}),
    SamplerConfig("minp0.1", stock={"temperature": 1.0, "min_p": 0.1}),
    SamplerConfig("t1", stock={"temperature": 1.0}),
    SamplerConfig("entropix", entropix=True),
    SamplerConfig("entropix-classic", entropix=True, preset="classic"),
    SamplerConfig("entropix-smollm2", entropix=True, preset="smollm2-135m-instruct"),
)}


def _number(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SamplerSpecError(f"sampler {name!r}: {key} must be a number, got {value!r}")
    try:
        return float(value) if not isinstance(value, int) else value
    except ValueError:
        raise SamplerSpecError(f"sampler {name!r}: {key} must be a number, got {value!r}") from None


def _bool(name: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise SamplerSpecError(f"sampler {name!r}: {key} must be true or false, got {value!r}")


def build(name: str, keys: Mapping[str, Any], base: Optional[SamplerConfig] = None) -> SamplerConfig:
    """A sampler from ``keys`` applied to ``base`` (a built-in) or to nothing."""
    if not name or any(c in name for c in ",=\n"):
        raise SamplerSpecError(f"sampler name {name!r}: must be non-empty, without ',', '=' "
                               "or newlines")
    entropix = base.entropix if base else None
    stock = dict(base.stock) if base else {}
    coeffs = dict(base.coefficients) if base else {}
    preset = base.preset if base else None
    body = dict(base.body) if base else {}
    sampling: dict[str, Any] = {}
    for key, value in keys.items():
        if key == "entropix":
            if isinstance(value, Mapping):
                entropix = True
                for k, v in value.items():
                    if k not in COEFFICIENTS:
                        raise SamplerSpecError(f"sampler {name!r}: entropix.{k} is not an "
                                               "Entropix coefficient")
                    coeffs[k] = v
            else:
                entropix = _bool(name, key, value)
        elif key == "preset":
            if not isinstance(value, str) or not value:
                raise SamplerSpecError(f"sampler {name!r}: preset must be a preset name")
            preset, entropix = value, True if entropix is None else entropix
        elif key == "body":
            if not isinstance(value, Mapping):
                raise SamplerSpecError(f"sampler {name!r}: body must be an object of request fields")
            body.update(value)
        elif key in STOCK_KEYS:
            sampling[key] = value
        elif key in COEFFICIENTS:
            coeffs[key] = value
            entropix = True if entropix is None else entropix
        else:
            raise SamplerSpecError(
                f"sampler {name!r}: unknown key {key!r}; keys are {', '.join(STOCK_KEYS)}, "
                "entropix, preset, body and the Entropix coefficients")
    entropix = bool(entropix)
    if entropix:
        coeffs.update(sampling)       # T0, P0, K0, M0
    else:
        if coeffs or preset:
            raise SamplerSpecError(f"sampler {name!r}: Entropix keys on a sampler with "
                                   "entropix=false")
        stock.update({k: _number(name, k, v) for k, v in sampling.items()})
    return SamplerConfig(name=name, entropix=entropix, stock=stock, preset=preset,
                         coefficients=coeffs, body=body)


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_cli(spec: str) -> SamplerConfig:
    """``NAME`` or ``NAME:key=value,...`` (see the module docstring)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    keys: dict[str, Any] = {}
    if rest.strip():
        for part in rest.split(","):
            k, eq, v = part.partition("=")
            if not eq or not k.strip():
                raise SamplerSpecError(f"--sampler {spec!r}: expected key=value, got {part!r}")
            keys[k.strip()] = _scalar(v.strip())
    base = BUILTIN.get(name)
    if base is None and not keys:
        raise SamplerSpecError(f"--sampler {spec!r}: not a built-in sampler ({', '.join(BUILTIN)}); "
                               "give keys to define it, e.g. 'hot:temperature=1.2'")
    return build(name, keys, base)


def load_file(path: str) -> list[SamplerConfig]:
    """Samplers of a JSON file: ``{"NAME": {keys}}`` or ``[{"name": NAME, ...}]``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SamplerSpecError(f"--samplers {path}: {e}") from None
    if isinstance(data, list):
        entries = []
        for i, obj in enumerate(data):
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise SamplerSpecError(f"--samplers {path}: entry {i} needs a 'name'")
            entries.append((obj["name"], {k: v for k, v in obj.items() if k != "name"}))
    elif isinstance(data, dict):
        entries = list(data.items())
    else:
        raise SamplerSpecError(f"--samplers {path}: expected an object or a list")
    out = []
    for name, keys in entries:
        if not isinstance(keys, dict):
            raise SamplerSpecError(f"--samplers {path}: sampler {name!r} must be an object")
        out.append(build(name, keys, BUILTIN.get(name)))
    return out


def unique(samplers) -> list[SamplerConfig]:
    seen = set()
    for s in samplers:
        if s.name in seen:
            raise SamplerSpecError(f"sampler name {s.name!r} is used twice")
        seen.add(s.name)
    return list(samplers)
