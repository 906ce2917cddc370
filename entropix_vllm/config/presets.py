"""Presets: named sets of coefficients.

The built-ins are ``entropix_vllm/presets/*.json`` (``classic``: SPEC section 3's
defaults; ``smollm2-135m-instruct``: the bundled model's, made by ``python -m
entropix_vllm.tune``); more preset files can be loaded at start-up. A preset
file may record the model it was made for (``match``, see
:mod:`entropix_vllm.model_id`); ``auto`` (:data:`AUTO_PRESET`, the engine's
default) is the built-in or loaded preset made for the served model, else
``classic`` (:func:`choose_auto`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ..model_id import ModelIdentity, ModelIdError, ModelSource, RecordError, identify, parse_record
from .coefficients import (MAX_PATH_TEXT, EntropixConfig, EntropixConfigError, _text_ok,
                           _type_name, show)

#: Folder of the built-in presets (one ``<name>.json`` each).
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
#: The preset whose coefficients are SPEC section 3's defaults.
DEFAULT_PRESET = "classic"
#: The preset name that picks the preset made for the served model (else classic).
AUTO_PRESET = "auto"
#: What an engine uses when its ``entropix`` section names no preset.
ENGINE_DEFAULT_PRESET = AUTO_PRESET
_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

_PRESET_FILE_KEYS = ("name", "description", "coefficients", "match", "provenance")
#: Most match records one preset file may hold.
MAX_MATCH_RECORDS = 64


@dataclass(frozen=True)
class Preset:
    """A named set of coefficient values (the rest keep SPEC defaults)."""

    name: str
    coefficients: Mapping[str, Any]
    source: str = "built-in"
    description: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    #: The models it was made for (match records of :mod:`entropix_vllm.model_id`).
    match: tuple = ()

    def config(self) -> "EntropixConfig":
        """SPEC defaults with this preset's coefficients."""
        return EntropixConfig().replace(self.coefficients, prefix=f"preset {self.name}: ")

    def made_for(self, identity: Optional[ModelIdentity]) -> bool:
        """Whether one of its match records is ``identity``'s."""
        return identity is not None and any(identity.matches(r) for r in self.match)


def parse_preset(data: Any, source: str, default_name: Optional[str] = None) -> Preset:
    """A preset from its JSON form; errors name ``source`` and the key.

    Form: ``{"name": str, "description": str, "coefficients": {name: value},
    "match": {...} or [{...}, ...], "provenance": {...}}`` (only
    ``coefficients`` is required; ``name`` defaults to ``default_name``;
    ``match``: the models it was made for, records of
    :func:`entropix_vllm.model_id.parse_record`), or a plain ``{name: value}``
    mapping of coefficients.
    """
    if not isinstance(data, Mapping):
        raise EntropixConfigError(source, f"a preset must be a JSON object, got {type(data).__name__}")
    if "coefficients" in data:
        unknown = [k for k in data if k not in _PRESET_FILE_KEYS]
        if unknown:
            raise EntropixConfigError(source, f"unknown preset key {show(unknown[0])}; a preset file "
                                              f"has {', '.join(_PRESET_FILE_KEYS)}")
        coeffs = data["coefficients"]
        if not isinstance(coeffs, Mapping):
            raise EntropixConfigError(source + ": coefficients", "expected an object of coefficients")
        name = data.get("name", default_name)
        description = data.get("description", "")
        provenance = data.get("provenance", {})
        if not isinstance(description, str):
            raise EntropixConfigError(source + ": description", "expected a string")
        if not isinstance(provenance, Mapping):
            raise EntropixConfigError(source + ": provenance", "expected an object")
        match = _parse_match(data.get("match"), source + ": match")
    else:
        coeffs, name, description, provenance, match = data, default_name, "", {}, ()
    if not isinstance(name, str) or not _PRESET_NAME.match(name):
        raise EntropixConfigError(source + ": name", "expected a preset name (letters, digits, "
                                                     f"'.', '_', '-'), got {show(name)}")
    if name == AUTO_PRESET:
        raise EntropixConfigError(source + ": name", f"{AUTO_PRESET!r} is reserved (it picks the "
                                                     "preset made for the served model); rename it")
    cfg = EntropixConfig().replace(dict(coeffs), prefix=f"{source}: coefficients.")
    values = {k: getattr(cfg, k) for k in coeffs}
    return Preset(name=name, coefficients=values, source=source, description=description,
                  provenance=dict(provenance), match=match)


def _parse_match(value: Any, key: str) -> tuple:
    """A preset file's ``match``: one record or a list of them (None: none)."""
    if value is None:
        return ()
    records = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not 1 <= len(value) <= MAX_MATCH_RECORDS:
        raise EntropixConfigError(key, f"expected a record or a list of 1 to {MAX_MATCH_RECORDS} "
                                       f"records, got a list of {len(value)}")
    out = []
    for i, rec in enumerate(records):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        try:
            out.append(parse_record(rec))
        except RecordError as e:
            raise EntropixConfigError(f"{where}.{e.field}" if e.field else where, e.reason) from None
    return tuple(out)


def load_preset_file(path: str, key: str) -> Preset:
    """A preset JSON file (``key`` names the setting that gave the path)."""
    where = f"{key}: {path}"
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise EntropixConfigError(key, f"cannot read preset file {path!r}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EntropixConfigError(key, f"preset file {path!r} is not valid JSON: {e}") from None
    return parse_preset(data, where, default_name=Path(path).stem)


@functools.lru_cache(maxsize=1)
def builtin_presets() -> Mapping[str, Preset]:
    """The built-in presets by name (files of :data:`PRESET_DIR`)."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        preset = load_preset_file(str(path), f"built-in preset {path.name}")
        if preset.name != path.stem:
            raise EntropixConfigError(f"built-in preset {path.name}",
                                      f"its name {preset.name!r} differs from the file name")
        out[preset.name] = dataclasses.replace(preset, source="built-in")
    if DEFAULT_PRESET not in out:
        out[DEFAULT_PRESET] = Preset(DEFAULT_PRESET, {}, description="SPEC section 3's defaults")
    return out


def looks_like_path(value: str) -> bool:
    return ("/" in value or "\\" in value or value.endswith(".json") or value.startswith("~")
            or value.startswith(".") or os.sep in value)


def _engine_preset(value: Any, key: str, known: Mapping[str, Preset]) -> Preset:
    names = ", ".join(list(known) + [AUTO_PRESET])
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_PATH_TEXT \
            or not _text_ok(value):
        raise EntropixConfigError(key, f"expected a preset name ({names}) or the path "
                                       f"of a preset JSON file, got {show(value)}")
    value = value.strip()
    if value in known:
        return known[value]
    if looks_like_path(value) or os.path.exists(value):
        return load_preset_file(value, key)
    raise EntropixConfigError(key, f"unknown preset {show(value)}; built-in presets are "
                                   f"{', '.join(known)} ({AUTO_PRESET}: the one made for the "
                                   "served model), or give the path of a preset JSON file")


@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` means on one engine: the preset, why, and the model's identity."""

    preset: Preset
    reason: str
    identity: Optional[ModelIdentity] = None


def choose_auto(known: Mapping[str, Preset], model: Optional[ModelSource]) -> AutoChoice:
    """The preset of ``known`` made for ``model`` (its match record is the
    model's identity), else ``classic``; with the reason, for the log.

    Loaded preset files come before the built-ins (a user's own preset for
    the model wins), each group in the order given; when several match, the
    first is taken and the reason names the others. A model that cannot be
    identified gets ``classic`` with the cause.
    """
    classic = known.get(DEFAULT_PRESET) or builtin_presets()[DEFAULT_PRESET]
    fallback = "so classic: SPEC section 3's defaults"
    if model is None:
        return AutoChoice(classic, f"no served model to identify, {fallback}")
    try:
        ident = identify(model)
    except ModelIdError as e:
        return AutoChoice(classic, f"cannot identify the served model ({e}), {fallback}")
    except Exception as e:  # never let identification stop a server
        return AutoChoice(classic, f"cannot identify the served model ({type(e).__name__}: "
                                   f"{str(e)[:200]}), {fallback}")
    ordered = [p for p in known.values() if p.source != "built-in"] + \
        [p for p in known.values() if p.source == "built-in"]
    hits = [p for p in ordered if p.made_for(ident)]
    where = lambda p: "built-in preset" if p.source == "built-in" else \
        f"preset file {p.source.split(': ', 1)[-1]}"  # noqa: E731
    if hits:
        first = hits[0]
        why = (f"made for this model: the {where(first)} {first.name!r} records its "
               f"architecture, tokenizer and weights (model fingerprint {ident.fingerprint})")
        if len(hits) > 1:
            why += "; also made for it: " + ", ".join(p.name for p in hits[1:])
        return AutoChoice(first, why, ident)
    why = (f"no built-in or loaded preset records this model (model fingerprint "
           f"{ident.fingerprint}), {fallback}")
    near = []
    for p in ordered:
        for rec in p.match:
            same = ident.compare(rec)
            if "architecture" in same and "tokenizer" in same:
                near.append(f"{p.name!r} was made for {rec.get('model') or 'a model'} with the "
                            "same architecture and tokenizer but other weights")
                break
    if near:
        why += "; " + "; ".join(near[:3])
    return AutoChoice(classic, why, ident)


def request_preset(value: Any, key: str, known: Mapping[str, Preset]) -> Preset:
    """The preset a request names: a name the server knows, never a path."""
    if not isinstance(value, str):
        raise EntropixConfigError(key, f"expected a preset name ({', '.join(known)}), got "
                                       f"{_type_name(value)} {show(value)}")
    name = value.strip()
    if looks_like_path(name):
        raise EntropixConfigError(key, "a request names a preset, it cannot give a file path "
                                       "(preset files are loaded by the server at start-up: "
                                       "--additional-config.entropix.preset=PATH); known presets: "
                                       + ", ".join(known))
    if name not in known:
        raise EntropixConfigError(key, f"unknown preset {show(name)}; this server knows "
                                       + ", ".join(known))
    return known[name]
