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
``entropix_vllm/presets/*.json`` (``classic``: SPEC section 3's defaults;
``smollm2-135m-instruct``: the bundled model's, made by ``python -m
entropix_vllm.tune``) and JSON files the server loads at start-up. A preset
file may record the model it was made for (``match``, see
:mod:`entropix_vllm.model_id`); ``auto`` (:data:`AUTO_PRESET`, the engine's
default) is the built-in or loaded preset made for the served model, else
``classic`` (:func:`choose_auto`). Order of precedence, lowest first:

* engine: SPEC defaults < the engine's ``preset`` (default ``auto``) < the
  ``entropix`` section's explicit coefficients;
* request: the engine's coefficients, or, when the request names an
  ``entropix_preset`` (``auto`` too), SPEC defaults < that preset (the
  engine's coefficients do not apply then); < the request's
  ``entropix_<name>`` keys.
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
from .model_id import ModelIdentity, ModelIdError, ModelSource, RecordError, identify, parse_record

#: The engine's ``sampler`` values (``--sampler``): vLLM's own, or Entropix.
SAMPLERS = ("default", "entropix")
REQUEST_PREFIX = "entropix_"
REQUEST_SWITCH = "entropix"
REQUEST_PRESET = REQUEST_PREFIX + "preset"

#: Folder of the built-in presets (one ``<name>.json`` each).
PRESET_DIR = Path(__file__).resolve().parent / "presets"
#: The preset whose coefficients are SPEC section 3's defaults.
DEFAULT_PRESET = "classic"
#: The preset name that picks the preset made for the served model (else classic).
AUTO_PRESET = "auto"
#: What an engine uses when its ``entropix`` section names no preset.
ENGINE_DEFAULT_PRESET = AUTO_PRESET
_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# Finite upper bounds of the unbounded-looking coefficients: every product the
# branch formulas of SPEC section 3 form from them (with the figures, which are
# finite bits / bits^2 / |scores|) stays finite in float32, and every derived
# temperature, top_k, top_p and min_p is finite.
MAX_TEMP = 100.0        # temperatures (T0 and the branches' caps/floors)
MAX_THRESH = 1e6        # entropy / varentropy thresholds (1e6: "never fires")
MAX_COEF = 1e3          # offsets and coefficients of the branch formulas
#: Longest text a value may have to be parsed as a number (a float's repr is
#: < 30 characters; longer digit strings are refused before int()/float()).
MAX_NUMBER_TEXT = 64
#: Longest CoT text (one token's text is far shorter) and file path accepted.
MAX_COT_TEXT = 256
MAX_PATH_TEXT = 4096
#: Longest echo of a refused value in an error message.
MAX_ECHO = 80


class EntropixConfigError(ValueError):
    """An invalid Entropix configuration value; the message names the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.reason = message
        super().__init__(f"{key}: {message}")


def show(value: Any, limit: int = MAX_ECHO) -> str:
    """A bounded, printable echo of a refused value (never raises)."""
    try:
        if isinstance(value, str):
            text = repr(value[:limit + 1])
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
            return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
        else:
            text = repr(value)
    except Exception:  # a repr that fails (e.g. int-to-str limits)
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        extra = f" ({len(value)} characters)" if isinstance(value, str) else ""
        text = text[:limit] + "..." + extra
    return text


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", type(None): "null", str: "a string",
            bool: "a boolean"}.get(type(value), type(value).__name__)


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
    temperature: float = _f(0.666, 0.0, MAX_TEMP, lo_open=True, doc="T0")
    top_p: float = _f(0.90, 0.0, 1.0, lo_open=True, doc="P0")
    top_k: int = _i(27, 1, K_MAX, doc="K0 (explore widens it by up to 1+lehv_top_k_agree_coef)")
    min_p: float = _f(0.03, 0.0, 1.0, hi_open=True, doc="M0")

    # Thresholds (bits, bits^2).
    low_ent_thresh: float = _f(0.1, 0.0, MAX_THRESH)
    med_ent_thresh: float = _f(3.0, 0.0, MAX_THRESH)
    high_ent_thresh: float = _f(5.0, 0.0, MAX_THRESH)
    low_vent_thresh: float = _f(0.1, 0.0, MAX_THRESH)
    high_vent_thresh: float = _f(5.0, 0.0, MAX_THRESH)

    # Insert-CoT branch: T = min(helv_max_temp, T0*(offset + coef*aE)).
    helv_attn_ent_offset: float = _f(1.3, 0.0, MAX_COEF)
    helv_attn_ent_coef: float = _f(0.2, 0.0, MAX_COEF)
    helv_max_temp: float = _f(1.5, 0.0, MAX_TEMP, lo_open=True)

    # Explore branch: T = min(lehv_max_temp, T0*(offset + coef*IS)),
    # top_k = max(lehv_min_top_k, int(K0*(1 + lehv_top_k_agree_coef*(1-agr)))).
    lehv_interaction_strength_offset: float = _f(1.2, 0.0, MAX_COEF)
    lehv_interaction_strength_coef: float = _f(0.3, 0.0, MAX_COEF)
    lehv_max_temp: float = _f(1.5, 0.0, MAX_TEMP, lo_open=True)
    lehv_min_top_k: int = _i(5, 1, K_MAX)
    lehv_top_k_agree_coef: float = _f(0.5, 0.0, K_MAX - 1.0,
                                       doc="top_k * (1 + this) must stay <= K_MAX")

    # Resample branch: T = max(hehv_min_temp, T0*(offset + coef*aV)),
    # top_p = max(hehv_min_top_p, P0 - hehv_attn_ent_coef*aE).
    hehv_attn_vent_offset: float = _f(2.0, 0.0, MAX_COEF)
    hehv_attn_vent_coef: float = _f(0.5, 0.0, MAX_COEF)
    hehv_min_temp: float = _f(2.0, 0.0, MAX_TEMP, lo_open=True)
    hehv_attn_ent_coef: float = _f(0.2, 0.0, MAX_COEF)
    hehv_min_top_p: float = _f(0.5, 0.0, 1.0, lo_open=True)

    # Adaptive branch.
    n_adaptive_samples: int = _i(5, 1, 64)
    ada_temp_logits: float = _f(0.3, 0.0, MAX_COEF)
    ada_temp_attn: float = _f(0.2, 0.0, MAX_COEF)
    ada_temp_agree: float = _f(0.2, 0.0, 1.0, hi_open=True, doc="< 1 keeps T > 0 (agreement <= 1)")
    ada_top_p: float = _f(0.1, 0.0, MAX_COEF)
    ada_top_p_min: float = _f(0.1, 0.0, 1.0, lo_open=True)
    ada_top_p_max: float = _f(1.0, 0.0, 1.0, lo_open=True)
    ada_top_k_int: float = _f(0.3, 0.0, MAX_COEF)
    ada_top_k_agree: float = _f(0.2, 0.0, MAX_COEF)
    ada_top_k_min: int = _i(1, 1, K_MAX)
    ada_top_k_max: int = _i(100, 1, K_MAX)
    ada_min_p: float = _f(0.5, 0.0, MAX_COEF)
    ada_min_p_min: float = _f(0.01, 0.0, 1.0, hi_open=True)
    ada_min_p_max: float = _f(0.5, 0.0, 1.0, hi_open=True)

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name), f.name))
        self._check_cross_field(prefix="")

    # -- cross-field constraints --------------------------------------------
    def _check_cross_field(self, prefix: str, sent: Optional[set] = None) -> None:
        """Limits involving several coefficients. The error names the keys of
        ``sent`` (those the user gave) among those involved, so a refusal never
        names a key that was not sent; ``sent`` None: any may be named."""

        def pick(*names):
            given = [n for n in names if sent is None or n in sent]
            return given or list(names)

        widest = int(self.top_k * (1.0 + self.lehv_top_k_agree_coef))
        if widest > K_MAX:
            names = pick("lehv_top_k_agree_coef", "top_k") if sent is not None \
                else ["top_k", "lehv_top_k_agree_coef"]
            why = (f"the explore branch's widened top_k (top_k * (1 + lehv_top_k_agree_coef) "
                   f"= {self.top_k} * (1 + {self.lehv_top_k_agree_coef:g}) = {widest}) must fit "
                   f"the {K_MAX} candidates the fused kernel keeps")
            if names[0] == "top_k":
                limit = max(1, int(K_MAX / (1.0 + self.lehv_top_k_agree_coef)))
                rng = f"an integer in [1, {limit}] (with lehv_top_k_agree_coef {self.lehv_top_k_agree_coef:g})"
            else:
                limit = K_MAX / self.top_k - 1.0
                rng = f"a finite number in [0, {limit:g}] (with top_k {self.top_k})"
            value = getattr(self, names[0])
            raise EntropixConfigError(prefix + names[0], f"expected {rng}: {why}; got {value!r}")
        for lo_name, hi_name in (("ada_top_k_min", "ada_top_k_max"),
                                 ("ada_top_p_min", "ada_top_p_max"),
                                 ("ada_min_p_min", "ada_min_p_max")):
            lo, hi = getattr(self, lo_name), getattr(self, hi_name)
            if lo > hi:
                name = pick(lo_name, hi_name)[0]
                if name == lo_name:
                    raise EntropixConfigError(
                        prefix + lo_name, f"must be <= {hi_name} ({hi!r}); got {lo!r}")
                raise EntropixConfigError(
                    prefix + hi_name, f"must be >= {lo_name} ({lo!r}); got {hi!r}")

    # -- builders ------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, overrides: Mapping[str, Any], prefix: str = "") -> "EntropixConfig":
        """A copy with ``overrides`` applied; errors name ``prefix + key``
        (cross-field errors: one of the keys of ``overrides``)."""
        known = {f.name: f for f in fields(self)}
        values = {}
        for key, value in overrides.items():
            if key not in known:
                raise unknown_key_error(prefix, key, known)
            values[key] = _coerce(known[key], value, prefix + key)
        out = _unchecked_replace(self, values)
        out._check_cross_field(prefix, sent=set(values))
        return out


#: The columns of a coefficient table, in order: EntropixConfig's fields (the
#: kernels read the ones of ``contract.DECIDE_COLUMNS`` by index).
COEFF_NAMES = EntropixConfig.field_names()


def _unchecked_replace(cfg: "EntropixConfig", values: Mapping[str, Any]) -> "EntropixConfig":
    """``cfg`` with already-coerced ``values``, without the cross-field check."""
    out = object.__new__(type(cfg))
    for f in fields(cfg):
        object.__setattr__(out, f.name, values.get(f.name, getattr(cfg, f.name)))
    return out


def _norm_key(key: str) -> str:
    """A key as compared for near misses: no case, spaces, '-' or '_'."""
    return re.sub(r"[\s_-]+", "", key).lower()


def unknown_key_error(prefix: str, key: str, known) -> EntropixConfigError:
    """The refusal of an unknown key, with the closest known one."""
    import difflib

    names = list(known)

    def core(name: str) -> str:  # compared without the shared "entropix" prefix
        n = _norm_key(name)
        return n[len(REQUEST_SWITCH):] if n.startswith(REQUEST_SWITCH) else n

    by_norm = {_norm_key(n): n for n in names}
    by_core = {core(n): n for n in names if core(n)}
    hint = by_norm.get(_norm_key(key)) if isinstance(key, str) else None
    if hint is None and isinstance(key, str) and core(key):
        close = difflib.get_close_matches(core(key)[:100], list(by_core), n=1, cutoff=0.75)
        hint = by_core[close[0]] if close else None
    shown = show(key) if isinstance(key, str) else show(key)
    key_s = key if isinstance(key, str) and len(key) <= MAX_ECHO else shown
    msg = "unknown Entropix coefficient"
    known_list = ", ".join(prefix + n for n in names)
    if hint is not None:
        msg += f"; did you mean {prefix + hint!r}? Known keys are {known_list}"
    else:
        msg += f"; known keys are {known_list}"
    return EntropixConfigError(prefix + str(key_s), msg)


# Keys of the engine-wide `entropix` section that are not sampling coefficients.
@dataclass(frozen=True)
class EngineOptions:
    """Engine-wide options that are not per-request coefficients."""

    attn_layer: int = -1          # which attention layer feeds the attention figures
    cot_token: Optional[Union[int, str]] = None  # None: resolved from the tokenizer
    trace_path: Optional[str] = None
    default_on: bool = True       # with --sampler entropix, requests use Entropix unless they opt out
    preset: Optional[str] = None  # parsed: the chosen preset's name (given: a name, auto or a file)
    presets: tuple = ()           # more preset files whose names requests may use


_ENGINE_KEYS = {f.name for f in fields(EngineOptions)}
#: attn_layer: an index into the model's layers (negative: from the end).
_ATTN_LAYER_FIELD = field(default=-1, metadata=_meta("int", -100000, 100000))


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


def _parse_number_text(text: str, kind: str):
    """int/float of a short numeric text, else None (never raises)."""
    t = text.strip()
    if not t or len(t) > MAX_NUMBER_TEXT:
        return None
    try:
        return int(t) if kind == "int" else float(t)
    except (ValueError, OverflowError):
        pass
    if kind == "int":  # "5.0", "1e1": an integral number
        try:
            v = float(t)
        except (ValueError, OverflowError):
            return None
        return v
    return None


def _coerce(f: dataclasses.Field, value: Any, key: str):
    """``value`` as ``f``'s kind within its range, or EntropixConfigError.

    Total: any Python value (what a JSON body or a config file can hold, and
    more) gives a value or the error naming ``key`` and the accepted range.
    """
    meta = f.metadata
    kind = meta["kind"]
    accepted = _describe(meta)

    def refuse(what=None):
        return EntropixConfigError(key, f"expected {accepted}, got {what or show(value)}")

    if isinstance(value, bool):
        raise EntropixConfigError(key, f"expected {accepted}, got a boolean ({value})")
    if isinstance(value, str):
        parsed = _parse_number_text(value, kind)
        if parsed is None:
            raise refuse()
        num = parsed
    elif isinstance(value, (int, float)):
        num = value
    else:
        raise refuse(f"{_type_name(value)} {show(value)}")
    if isinstance(num, float) and not math.isfinite(num):
        raise refuse()
    lo, hi = meta["lo"], meta["hi"]
    # Range first, on the exact value (ints of any size compare exactly with floats).
    if lo is not None and (num < lo or (meta["lo_open"] and num == lo)):
        raise refuse()
    if hi is not None and (num > hi or (meta["hi_open"] and num == hi)):
        raise refuse()
    if kind == "int":
        if isinstance(num, float):
            if num != math.floor(num):
                raise refuse()
            num = int(num)
        return int(num)
    return float(num)


def parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise EntropixConfigError(key, f"expected true or false, got {show(value)}")


def _text_ok(value: str) -> bool:
    """A string that is valid Unicode text (no lone surrogates, no NUL)."""
    try:
        value.encode("utf-8")
    except UnicodeError:
        return False
    return "\x00" not in value


def parse_cot_token(value: Any, key: str) -> Union[int, str]:
    expected = (f"expected a token id (integer >= 0) or a non-empty string (at most "
                f"{MAX_COT_TEXT} characters, one token of the model)")
    if isinstance(value, bool):
        raise EntropixConfigError(key, f"{expected}, got {show(value)}")
    if isinstance(value, int):
        if value < 0 or value >= 2 ** 31:
            raise EntropixConfigError(key, f"{expected}, got {show(value)}")
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() \
            and 0 <= value < 2 ** 31:
        return int(value)
    if isinstance(value, str) and value != "" and len(value) <= MAX_COT_TEXT and _text_ok(value):
        return value
    if isinstance(value, str) and value and not _text_ok(value):
        raise EntropixConfigError(key, f"{expected}; got a text that is not valid Unicode "
                                       f"(a lone surrogate or NUL): {show(value)}")
    raise EntropixConfigError(key, f"{expected}, got {show(value)}")


# ----------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------
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


@dataclass(frozen=True)
class EngineConfig:
    """What `additional_config` says about Entropix for a whole engine."""

    enabled: bool = False
    sampler: EntropixConfig = field(default_factory=EntropixConfig)
    options: EngineOptions = field(default_factory=EngineOptions)
    #: Presets requests may name: the built-ins, the files loaded at start-up
    #: and ``auto`` (the preset made for the served model, else classic).
    presets: Mapping[str, Preset] = field(default_factory=builtin_presets)
    #: Why the engine's preset (``options.preset``) is the one it is (for the log).
    preset_reason: str = ""
    #: A warning about the engine's preset (named, but made for another model).
    preset_warning: Optional[str] = None
    #: Coefficients the ``entropix`` section sets over the preset's.
    explicit: tuple = ()

    def preset_line(self) -> str:
        """The start-up log line naming the engine's preset and why."""
        line = f"Entropix preset {self.options.preset} ({self.preset_reason})"
        if self.explicit:
            line += "; set over it by additional_config.entropix: " + ", ".join(self.explicit)
        return line

    @classmethod
    def from_additional_config(cls, additional_config: Optional[Mapping[str, Any]],
                               model: Optional[ModelSource] = None) -> "EngineConfig":
        """Parse ``{"sampler": "entropix"|"default", "entropix": {...}}``.

        Keys of the ``entropix`` section are coefficient names of
        :class:`EntropixConfig` or engine options (``attn_layer``, ``cot_token``,
        ``trace_path``, ``default_on``, ``preset``, ``presets``). The
        coefficients are SPEC defaults, then the ``preset``'s (default:
        ``auto``), then the section's own. ``model`` is the served model, which
        ``auto`` identifies (only when the sampler is on; without a model auto
        is classic). Other top-level keys of ``additional_config`` belong to
        other plugins and are left alone.
        """
        ac = dict(additional_config or {})
        sampler = ac.get("sampler", "default")
        if sampler not in SAMPLERS:
            raise EntropixConfigError(
                "additional_config.sampler", f"expected 'default' or 'entropix', got {show(sampler)}")
        for key in ac:
            if isinstance(key, str) and key not in ("entropix", "sampler") \
                    and _norm_key(key) in ("entropix", "sampler"):
                right = "entropix" if _norm_key(key) == "entropix" else "sampler"
                raise EntropixConfigError(f"additional_config.{show(key)}",
                                          f"unknown key; did you mean 'additional_config.{right}'?")
        section = ac.get("entropix", {}) or {}
        if not isinstance(section, Mapping):
            raise EntropixConfigError(
                "additional_config.entropix", f"expected a mapping of coefficients, got {show(section)}")
        coeffs, opts = {}, {}
        every_key = set(EntropixConfig.field_names()) | _ENGINE_KEYS
        for key, value in section.items():
            if key not in every_key:
                raise unknown_key_error("additional_config.entropix.", key,
                                        list(EntropixConfig.field_names()) + sorted(_ENGINE_KEYS))
            if key in _ENGINE_KEYS:
                opts[key] = value
            else:
                coeffs[key] = value
        p = "additional_config.entropix."
        known = dict(builtin_presets())
        for path in _preset_paths(opts.get("presets"), p + "presets"):
            loaded = load_preset_file(path, p + "presets")
            _register(known, loaded, p + "presets")
        given = opts.get("preset")
        is_auto = given is None or (isinstance(given, str) and given.strip() == AUTO_PRESET)
        named = None
        if not is_auto:
            named = _engine_preset(given, p + "preset", known)
            if named.source != "built-in":
                _register(known, named, p + "preset")
        enabled = sampler == "entropix"
        auto = choose_auto(known, model if enabled else None)
        known[AUTO_PRESET] = auto.preset
        warning = None
        if named is None:
            chosen = auto.preset
            reason = ("auto, the default: " if given is None else f"{p}preset=auto: ") + auto.reason
        else:
            chosen = named
            reason = f"named by {p}preset"
            if named.match and auto.identity is not None and not named.made_for(auto.identity):
                made = ", ".join(sorted({r.get("model") or "?" for r in named.match}))
                warning = (f"Entropix preset {named.name!r} was made for another model ({made}); "
                           f"the served model (fingerprint {auto.identity.fingerprint}) is not "
                           "in its match records. Using it as named.")
        values = dict(chosen.coefficients)
        values.update(coeffs)
        try:
            cfg = EntropixConfig().replace(values, prefix=p)
        except EntropixConfigError as e:
            if e.key[len(p):] in chosen.coefficients and e.key[len(p):] not in coeffs:
                how = "" if named is not None else f" (chosen by {AUTO_PRESET})"
                raise EntropixConfigError(
                    p + "preset", f"preset {chosen.name!r}{how}: {e}") from None
            raise
        options = dataclasses.replace(_parse_engine_options(opts), preset=chosen.name)
        return cls(enabled=enabled, sampler=cfg, options=options, presets=known,
                   preset_reason=reason, preset_warning=warning, explicit=tuple(coeffs))


def _preset_paths(value: Any, key: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in (x.strip() for x in value.split(",")) if v]
    if not isinstance(value, (list, tuple)) or len(value) > 256 or not all(
            isinstance(v, str) and v and len(v) <= MAX_PATH_TEXT and _text_ok(v) for v in value):
        raise EntropixConfigError(key, f"expected a list of preset file paths, got {show(value)}")
    return list(value)


def _register(known: dict, preset: Preset, key: str) -> None:
    if preset.name == AUTO_PRESET:  # parse_preset refuses it too
        raise EntropixConfigError(key, f"a preset file cannot be named {AUTO_PRESET!r}")
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
        try:
            kw["attn_layer"] = _coerce(_ATTN_LAYER_FIELD, opts["attn_layer"], p + "attn_layer")
        except EntropixConfigError as e:
            raise EntropixConfigError(e.key, "expected an integer layer index, " + e.reason[len("expected "):]) from None
    if "cot_token" in opts and opts["cot_token"] is not None:
        kw["cot_token"] = parse_cot_token(opts["cot_token"], p + "cot_token")
    if "trace_path" in opts and opts["trace_path"] is not None:
        v = opts["trace_path"]
        if not isinstance(v, str) or not v or len(v) > MAX_PATH_TEXT or not _text_ok(v):
            raise EntropixConfigError(p + "trace_path", f"expected a file path (a non-empty text "
                                                        f"of at most {MAX_PATH_TEXT} characters), "
                                                        f"got {show(v)}")
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
        raise EntropixConfigError("vllm_xargs", f"expected a mapping, got {show(extra_args)}")
    base = base or EntropixConfig()
    enabled: Optional[bool] = None
    overrides: dict[str, Any] = {}
    cot = None
    preset = None
    for key, value in (extra_args or {}).items():
        if not is_request_key(key):
            continue
        check_request_key(key)
        if key == REQUEST_SWITCH:
            enabled = parse_bool(value, key)
        elif key == REQUEST_PRESET:
            preset = request_preset(value, key, builtin_presets() if presets is None else presets)
        else:
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


#: Every key a request may send, by its normalized form (see :func:`_norm_key`).
def request_keys() -> tuple:
    return (REQUEST_SWITCH, REQUEST_PRESET, REQUEST_PREFIX + "cot_token") + tuple(
        REQUEST_PREFIX + n for n in EntropixConfig.field_names())


@functools.lru_cache(maxsize=1)
def _request_keys_by_norm() -> Mapping[str, str]:
    return {_norm_key(k): k for k in request_keys()}


def is_request_key(key: Any) -> bool:
    """Whether ``key`` is in the ``entropix`` namespace: ``entropix`` or
    ``entropix<anything>`` ignoring case, spaces, ``-`` and ``_``."""
    return isinstance(key, str) and _norm_key(key).startswith(REQUEST_SWITCH)


def check_request_key(key: str) -> None:
    """Refuse a namespace key that is not exactly a known request key, with the
    intended key when it is a near miss (case, spaces, ``-``/``_``)."""
    known = request_keys()
    if key in known:
        return
    right = _request_keys_by_norm().get(_norm_key(key))
    if right is not None:
        raise EntropixConfigError(key if len(key) <= MAX_ECHO else show(key),
                                  f"not an Entropix key as written; did you mean {right!r}?")
    if key.startswith(REQUEST_PREFIX):
        name = key[len(REQUEST_PREFIX):]
        if name in _ENGINE_KEYS:
            raise EntropixConfigError(key, "unknown per-request key: an engine option, not a per-request key (set it with "
                                           f"--additional-config.entropix.{name}=...)")
    raise unknown_key_error("", key, known)
