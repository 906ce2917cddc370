"""Entropix configuration: every coefficient of SPEC section 3, its default and
its validation.

`EntropixConfig` is built from

* the server's ``additional_config`` (``--additional-config.entropix.<name>=...``
  or ``LLM(..., additional_config={"sampler": "entropix", "entropix": {...}})``)
  with :meth:`EntropixConfig.from_additional_config`, and
* the flat per-request keys of ``SamplingParams.extra_args`` (the OpenAI body's
  ``vllm_xargs``): ``entropix`` (true/false) and one ``entropix_<name>`` key per
  coefficient, with :func:`parse_request_args`.

Every invalid value raises :class:`EntropixConfigError` whose message names the
key and the accepted range.

Presets (:class:`Preset`) are named sets of coefficients: the built-ins of
``entropix_vllm/presets/*.json`` (``classic``: SPEC section 3's defaults, what
applies when no preset is named; ``smollm2-135m-instruct``: the bundled
model's, made by ``python -m entropix_vllm.tune``) and JSON files the server
loads at start-up. Order of precedence, lowest first:

* engine: SPEC defaults < the engine's ``preset`` < the ``entropix`` section's
  explicit coefficients;
* request: the engine's coefficients, or, when the request names an
  ``entropix_preset``, SPEC defaults < that preset (the engine's coefficients
  do not apply then); < the request's ``entropix_<name>`` keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

# Number of candidates the fused logit kernels keep per row (owned by
# contract.py). Every branch must sample with a top_k no larger than this
# (validated below).
from .contract import K_MAX

REQUEST_PREFIX = "entropix_"
REQUEST_SWITCH = "entropix"
REQUEST_PRESET = REQUEST_PREFIX + "preset"

#: Folder of the built-in presets (one ``<name>.json`` each).
PRESET_DIR = Path(__file__).resolve().parent / "presets"
#: The preset whose coefficients are SPEC section 3's defaults.
DEFAULT_PRESET = "classic"
_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class EntropixConfigError(ValueError):
    """An invalid Entropix configuration value; the message names the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


# ----------------------------------------------------------------------------
# Field kinds. Each coefficient declares how it is validated.
# ----------------------------------------------------------------------------
_POS = "a finite number > 0"
_NONNEG = "a finite number >= 0"
_FINITE = "a finite number"


def _meta(kind: str, lo=None, hi=None, lo_open=False, hi_open=False, doc: str = ""):
    return {"kind": kind, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "doc": doc}


def _f(default, lo=None, hi=None, lo_open=False, hi_open=False, doc=""):
    return field(default=default, metadata=_meta("float", lo, hi, lo_open, hi_open, doc))


def _i(default, lo=None, hi=None, doc=""):
    return field(default=default, metadata=_meta("int", lo, hi, doc=doc))


@dataclass(frozen=True)
class EntropixConfig:
    """All Entropix coefficients (SPEC section 3) with their defaults.

    Names follow the research code's ``SamplerConfig`` where it has one
    (``helv`` = high entropy / low varentropy = insert CoT token, ``lehv`` =
    explore, ``hehv`` = resample, ``ada`` = adaptive).
    """

    # Base sampling parameters (T0, P0, K0, M0).
    temperature: float = _f(0.666, 0.0, None, lo_open=True, doc="T0")
    top_p: float = _f(0.90, 0.0, 1.0, lo_open=True, doc="P0")
    top_k: int = _i(27, 1, None, doc="K0 (explore widens it by up to 1+lehv_top_k_agree_coef)")
    min_p: float = _f(0.03, 0.0, 1.0, hi_open=True, doc="M0")

    # Thresholds (bits, bits^2).
    low_ent_thresh: float = _f(0.1, 0.0)
    med_ent_thresh: float = _f(3.0, 0.0)
    high_ent_thresh: float = _f(5.0, 0.0)
    low_vent_thresh: float = _f(0.1, 0.0)
    high_vent_thresh: float = _f(5.0, 0.0)

    # Insert-CoT branch: T = min(helv_max_temp, T0*(offset + coef*aE)).
    helv_attn_ent_offset: float = _f(1.3, 0.0)
    helv_attn_ent_coef: float = _f(0.2, 0.0)
    helv_max_temp: float = _f(1.5, 0.0, lo_open=True)

    # Explore branch: T = min(lehv_max_temp, T0*(offset + coef*IS)),
    # top_k = max(lehv_min_top_k, int(K0*(1 + lehv_top_k_agree_coef*(1-agr)))).
    lehv_interaction_strength_offset: float = _f(1.2, 0.0)
    lehv_interaction_strength_coef: float = _f(0.3, 0.0)
    lehv_max_temp: float = _f(1.5, 0.0, lo_open=True)
    lehv_min_top_k: int = _i(5, 1, K_MAX)
    lehv_top_k_agree_coef: float = _f(0.5, 0.0)

    # Resample branch: T = max(hehv_min_temp, T0*(offset + coef*aV)),
    # top_p = max(hehv_min_top_p, P0 - hehv_attn_ent_coef*aE).
    hehv_attn_vent_offset: float = _f(2.0, 0.0)
    hehv_attn_vent_coef: float = _f(0.5, 0.0)
    hehv_min_temp: float = _f(2.0, 0.0, lo_open=True)
    hehv_attn_ent_coef: float = _f(0.2, 0.0)
    hehv_min_top_p: float = _f(0.5, 0.0, 1.0, lo_open=True)

    # Adaptive branch.
    n_adaptive_samples: int = _i(5, 1, 64)
    ada_temp_logits: float = _f(0.3, 0.0)
    ada_temp_attn: float = _f(0.2, 0.0)
    ada_temp_agree: float = _f(0.2, 0.0, 1.0, hi_open=True, doc="< 1 keeps T > 0 (agreement <= 1)")
    ada_top_p: float = _f(0.1, 0.0)
    ada_top_p_min: float = _f(0.1, 0.0, 1.0, lo_open=True)
    ada_top_p_max: float = _f(1.0, 0.0, 1.0, lo_open=True)
    ada_top_k_int: float = _f(0.3, 0.0)
    ada_top_k_agree: float = _f(0.2, 0.0)
    ada_top_k_min: int = _i(1, 1, K_MAX)
    ada_top_k_max: int = _i(100, 1, K_MAX)
    ada_min_p: float = _f(0.5, 0.0)
    ada_min_p_min: float = _f(0.01, 0.0, 1.0, hi_open=True)
    ada_min_p_max: float = _f(0.5, 0.0, 1.0, hi_open=True)

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name), f.name))
        self._check_cross_field(prefix="")

    # -- cross-field constraints --------------------------------------------
    def _check_cross_field(self, prefix: str) -> None:
        widest = int(self.top_k * (1.0 + self.lehv_top_k_agree_coef))
        if max(widest, self.lehv_min_top_k) > K_MAX:
            limit = int(K_MAX / (1.0 + self.lehv_top_k_agree_coef))
            raise EntropixConfigError(
                prefix + "top_k",
                f"must be an integer in [1, {limit}] so that the explore branch's widened "
                f"top_k (top_k * (1 + lehv_top_k_agree_coef) = {widest}) fits the "
                f"{K_MAX} candidates the fused kernel keeps; got {self.top_k}")
        if self.ada_top_k_min > self.ada_top_k_max:
            raise EntropixConfigError(
                prefix + "ada_top_k_min",
                f"must be <= ada_top_k_max ({self.ada_top_k_max}); got {self.ada_top_k_min}")
        if self.ada_top_p_min > self.ada_top_p_max:
            raise EntropixConfigError(
                prefix + "ada_top_p_min",
                f"must be <= ada_top_p_max ({self.ada_top_p_max}); got {self.ada_top_p_min}")
        if self.ada_min_p_min > self.ada_min_p_max:
            raise EntropixConfigError(
                prefix + "ada_min_p_min",
                f"must be <= ada_min_p_max ({self.ada_min_p_max}); got {self.ada_min_p_min}")

    # -- builders ------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, overrides: Mapping[str, Any], prefix: str = "") -> "EntropixConfig":
        """A copy with ``overrides`` applied; errors name ``prefix + key``."""
        known = {f.name: f for f in fields(self)}
        values = {}
        for key, value in overrides.items():
            if key not in known:
                raise EntropixConfigError(
                    prefix + key,
                    "unknown Entropix coefficient; known keys are "
                    + ", ".join(prefix + n for n in known))
            values[key] = _coerce(known[key], value, prefix + key)
        try:
            out = dataclasses.replace(self, **values)
        except EntropixConfigError as e:  # re-raise naming the user's key
            raise EntropixConfigError(prefix + e.key, str(e).split(": ", 1)[1]) from None
        return out


# Keys of the engine-wide `entropix` section that are not sampling coefficients.
@dataclass(frozen=True)
class EngineOptions:
    """Engine-wide options that are not per-request coefficients."""

    attn_layer: int = -1          # which attention layer feeds the attention figures
    cot_token: Optional[Union[int, str]] = None  # None: resolved from the tokenizer
    trace_path: Optional[str] = None
    default_on: bool = True       # with --sampler entropix, requests use Entropix unless they opt out
    preset: Optional[str] = None  # a built-in preset name or a JSON file (loaded at start-up)
    presets: tuple = ()           # more preset files whose names requests may use


_ENGINE_KEYS = {f.name for f in fields(EngineOptions)}


def _describe(meta) -> str:
    kind, lo, hi = meta["kind"], meta["lo"], meta["hi"]
    what = "an integer" if kind == "int" else "a finite number"
    if lo is None and hi is None:
        return what
    lb = "(" if meta["lo_open"] else "["
    rb = ")" if meta["hi_open"] else "]"
    lo_s = "-inf" if lo is None else f"{lo:g}"
    hi_s = "inf" if hi is None else f"{hi:g}"
    if hi is None:
        rb = ")"
    return f"{what} in {lb}{lo_s}, {hi_s}{rb}"


def _coerce(f: dataclasses.Field, value: Any, key: str):
    meta = f.metadata
    kind = meta["kind"]
    accepted = _describe(meta)
    if isinstance(value, bool):
        raise EntropixConfigError(key, f"expected {accepted}, got a boolean ({value})")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if kind == "int" else float(text)
        except ValueError:
            raise EntropixConfigError(key, f"expected {accepted}, got {value!r}") from None
    if kind == "int":
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise EntropixConfigError(key, f"expected {accepted}, got {value!r}")
            value = int(value)
        if not isinstance(value, int):
            raise EntropixConfigError(key, f"expected {accepted}, got {type(value).__name__} {value!r}")
    else:
        if not isinstance(value, (int, float)):
            raise EntropixConfigError(key, f"expected {accepted}, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise EntropixConfigError(key, f"expected {accepted}, got {value!r}")
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        raise EntropixConfigError(key, f"expected {accepted}, got {value!r}")
    if hi is not None and (value > hi or (meta["hi_open"] and value == hi)):
        raise EntropixConfigError(key, f"expected {accepted}, got {value!r}")
    return value


def parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise EntropixConfigError(key, f"expected true or false, got {value!r}")


def parse_cot_token(value: Any, key: str) -> Union[int, str]:
    if isinstance(value, bool):
        raise EntropixConfigError(key, f"expected a token id (integer >= 0) or a non-empty string, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise EntropixConfigError(key, f"expected a token id (integer >= 0) or a non-empty string, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value != "":
        return value
    raise EntropixConfigError(key, f"expected a token id (integer >= 0) or a non-empty string, got {value!r}")


# ----------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------
_PRESET_FILE_KEYS = ("name", "description", "coefficients", "provenance")


@dataclass(frozen=True)
class Preset:
    """A named set of coefficient values (the rest keep SPEC defaults)."""

    name: str
    coefficients: Mapping[str, Any]
    source: str = "built-in"
    description: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def config(self) -> "EntropixConfig":
        """SPEC defaults with this preset's coefficients."""
        return EntropixConfig().replace(self.coefficients, prefix=f"preset {self.name}: ")


def parse_preset(data: Any, source: str, default_name: Optional[str] = None) -> Preset:
    """A preset from its JSON form; errors name ``source`` and the key.

    Form: ``{"name": str, "description": str, "coefficients": {name: value},
    "provenance": {...}}`` (only ``coefficients`` is required; ``name``
    defaults to ``default_name``), or a plain ``{name: value}`` mapping of
    coefficients.
    """
    if not isinstance(data, Mapping):
        raise EntropixConfigError(source, f"a preset must be a JSON object, got {type(data).__name__}")
    if "coefficients" in data:
        unknown = [k for k in data if k not in _PRESET_FILE_KEYS]
        if unknown:
            raise EntropixConfigError(source, f"unknown preset key {unknown[0]!r}; a preset file "
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
    else:
        coeffs, name, description, provenance = data, default_name, "", {}
    if not isinstance(name, str) or not _PRESET_NAME.match(name):
        raise EntropixConfigError(source + ": name", "expected a preset name (letters, digits, "
                                                     f"'.', '_', '-'), got {name!r}")
    cfg = EntropixConfig().replace(dict(coeffs), prefix=f"{source}: coefficients.")
    values = {k: getattr(cfg, k) for k in coeffs}
    return Preset(name=name, coefficients=values, source=source, description=description,
                  provenance=dict(provenance))


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
    if not isinstance(value, str) or not value.strip():
        raise EntropixConfigError(key, f"expected a preset name ({', '.join(known)}) or the path "
                                       f"of a preset JSON file, got {value!r}")
    value = value.strip()
    if value in known:
        return known[value]
    if looks_like_path(value) or os.path.exists(value):
        return load_preset_file(value, key)
    raise EntropixConfigError(key, f"unknown preset {value!r}; built-in presets are "
                                   f"{', '.join(known)}, or give the path of a preset JSON file")


def request_preset(value: Any, key: str, known: Mapping[str, Preset]) -> Preset:
    """The preset a request names: a name the server knows, never a path."""
    if not isinstance(value, str):
        raise EntropixConfigError(key, f"expected a preset name ({', '.join(known)}), got "
                                       f"{type(value).__name__}")
    name = value.strip()
    if looks_like_path(name):
        raise EntropixConfigError(key, "a request names a preset, it cannot give a file path "
                                       "(preset files are loaded by the server at start-up: "
                                       "--additional-config.entropix.preset=PATH); known presets: "
                                       + ", ".join(known))
    if name not in known:
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise EntropixConfigError(key, f"unknown preset {shown!r}; this server knows "
                                       + ", ".join(known))
    return known[name]


@dataclass(frozen=True)
class EngineConfig:
    """What `additional_config` says about Entropix for a whole engine."""

    enabled: bool = False
    sampler: EntropixConfig = field(default_factory=EntropixConfig)
    options: EngineOptions = field(default_factory=EngineOptions)
    #: Presets requests may name: the built-ins and the files loaded at start-up.
    presets: Mapping[str, Preset] = field(default_factory=builtin_presets)

    @classmethod
    def from_additional_config(cls, additional_config: Optional[Mapping[str, Any]]) -> "EngineConfig":
        """Parse ``{"sampler": "entropix"|"default", "entropix": {...}}``.

        Keys of the ``entropix`` section are coefficient names of
        :class:`EntropixConfig` or engine options (``attn_layer``, ``cot_token``,
        ``trace_path``, ``default_on``, ``preset``, ``presets``). The
        coefficients are SPEC defaults, then the ``preset``'s, then the
        section's own. Other top-level keys of ``additional_config`` belong to
        other plugins and are left alone.
        """
        ac = dict(additional_config or {})
        sampler = ac.get("sampler", "default")
        if sampler not in ("default", "entropix"):
            raise EntropixConfigError(
                "additional_config.sampler", f"expected 'default' or 'entropix', got {sampler!r}")
        section = ac.get("entropix", {}) or {}
        if not isinstance(section, Mapping):
            raise EntropixConfigError(
                "additional_config.entropix", f"expected a mapping of coefficients, got {section!r}")
        coeffs, opts = {}, {}
        for key, value in section.items():
            if key in _ENGINE_KEYS:
                opts[key] = value
            else:
                coeffs[key] = value
        p = "additional_config.entropix."
        known = dict(builtin_presets())
        for path in _preset_paths(opts.get("presets"), p + "presets"):
            loaded = load_preset_file(path, p + "presets")
            _register(known, loaded, p + "presets")
        chosen = None
        if opts.get("preset") is not None:
            chosen = _engine_preset(opts["preset"], p + "preset", known)
            if chosen.source != "built-in":
                _register(known, chosen, p + "preset")
        values = dict(chosen.coefficients) if chosen else {}
        values.update(coeffs)
        try:
            cfg = EntropixConfig().replace(values, prefix=p)
        except EntropixConfigError as e:
            if chosen is not None and e.key[len(p):] in chosen.coefficients \
                    and e.key[len(p):] not in coeffs:
                raise EntropixConfigError(
                    p + "preset", f"preset {chosen.name!r}: {e}") from None
            raise
        options = _parse_engine_options(opts)
        if chosen is not None:
            options = dataclasses.replace(options, preset=chosen.name)
        return cls(enabled=(sampler == "entropix"), sampler=cfg, options=options, presets=known)


def _preset_paths(value: Any, key: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in (x.strip() for x in value.split(",")) if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise EntropixConfigError(key, f"expected a list of preset file paths, got {value!r}")
    return list(value)


def _register(known: dict, preset: Preset, key: str) -> None:
    old = known.get(preset.name)
    if old is not None and old.source == "built-in":
        raise EntropixConfigError(key, f"preset file {preset.source.split(': ', 1)[-1]!r} is named "
                                       f"{preset.name!r}, the name of a built-in preset; rename it")
    if old is not None and old.source != preset.source:
        raise EntropixConfigError(key, f"two preset files are named {preset.name!r}")
    known[preset.name] = preset


def _parse_engine_options(opts: Mapping[str, Any]) -> EngineOptions:
    p = "additional_config.entropix."
    kw: dict[str, Any] = {}
    if "attn_layer" in opts:
        v = opts["attn_layer"]
        if isinstance(v, str):
            try:
                v = int(v.strip())
            except ValueError:
                raise EntropixConfigError(p + "attn_layer", f"expected an integer layer index, got {opts['attn_layer']!r}") from None
        if isinstance(v, bool) or not isinstance(v, int):
            raise EntropixConfigError(p + "attn_layer", f"expected an integer layer index, got {v!r}")
        kw["attn_layer"] = v
    if "cot_token" in opts and opts["cot_token"] is not None:
        kw["cot_token"] = parse_cot_token(opts["cot_token"], p + "cot_token")
    if "trace_path" in opts and opts["trace_path"] is not None:
        v = opts["trace_path"]
        if not isinstance(v, str) or not v:
            raise EntropixConfigError(p + "trace_path", f"expected a file path, got {v!r}")
        kw["trace_path"] = v
    if "default_on" in opts:
        kw["default_on"] = parse_bool(opts["default_on"], p + "default_on")
    if opts.get("presets") is not None:
        kw["presets"] = tuple(_preset_paths(opts["presets"], p + "presets"))
    return EngineOptions(**kw)


@dataclass(frozen=True)
class RequestConfig:
    """What one request's ``extra_args`` say about Entropix.

    ``enabled`` is None when the request does not say (the engine default
    applies). ``overrides`` maps coefficient names (without the prefix) to
    validated values. ``cot_token`` is the per-request CoT token if given.
    """

    enabled: Optional[bool] = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    cot_token: Optional[Union[int, str]] = None
    preset: Optional[str] = None


def parse_request_args(extra_args: Optional[Mapping[str, Any]],
                       base: Optional[EntropixConfig] = None,
                       presets: Optional[Mapping[str, Preset]] = None
                       ) -> tuple[RequestConfig, EntropixConfig]:
    """Validate the flat per-request keys of ``extra_args``.

    Returns the parsed request options and the effective coefficients: ``base``
    (the engine's), or the named ``entropix_preset`` (one of ``presets``,
    default: the built-ins), with the overrides applied; cross-field limits are
    checked on the result. Keys not starting with ``entropix`` belong to others
    and are ignored here. Unknown ``entropix_*`` keys raise.
    """
    if not isinstance(extra_args, (Mapping, type(None))):
        raise EntropixConfigError("vllm_xargs", f"expected a mapping, got {extra_args!r}")
    base = base or EntropixConfig()
    enabled: Optional[bool] = None
    overrides: dict[str, Any] = {}
    cot = None
    preset = None
    for key, value in (extra_args or {}).items():
        if key == REQUEST_SWITCH:
            enabled = parse_bool(value, key)
        elif key == REQUEST_PRESET:
            preset = request_preset(value, key, builtin_presets() if presets is None else presets)
        elif key.startswith(REQUEST_PREFIX):
            name = key[len(REQUEST_PREFIX):]
            if name == "cot_token":
                cot = parse_cot_token(value, key)
            else:
                overrides[name] = value
    if preset is not None:
        base = preset.config()
    cfg = base.replace(overrides, prefix=REQUEST_PREFIX)
    parsed = {k: getattr(cfg, k) for k in overrides}
    return (RequestConfig(enabled=enabled, overrides=parsed, cot_token=cot,
                          preset=preset.name if preset else None), cfg)
