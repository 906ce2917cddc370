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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

# Number of candidates the fused logit kernels keep per row. Every branch must
# sample with a top_k no larger than this (validated below).
K_MAX = 128

REQUEST_PREFIX = "entropix_"
REQUEST_SWITCH = "entropix"


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


@dataclass(frozen=True)
class EngineConfig:
    """What `additional_config` says about Entropix for a whole engine."""

    enabled: bool = False
    sampler: EntropixConfig = field(default_factory=EntropixConfig)
    options: EngineOptions = field(default_factory=EngineOptions)

    @classmethod
    def from_additional_config(cls, additional_config: Optional[Mapping[str, Any]]) -> "EngineConfig":
        """Parse ``{"sampler": "entropix"|"default", "entropix": {...}}``.

        Keys of the ``entropix`` section are coefficient names of
        :class:`EntropixConfig` or engine options (``attn_layer``, ``cot_token``,
        ``trace_path``, ``default_on``). Other top-level keys of
        ``additional_config`` belong to other plugins and are left alone.
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
        cfg = EntropixConfig().replace(coeffs, prefix="additional_config.entropix.")
        options = _parse_engine_options(opts)
        return cls(enabled=(sampler == "entropix"), sampler=cfg, options=options)


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


def parse_request_args(extra_args: Optional[Mapping[str, Any]],
                       base: Optional[EntropixConfig] = None) -> tuple[RequestConfig, EntropixConfig]:
    """Validate the flat per-request keys of ``extra_args``.

    Returns the parsed request options and the effective coefficients (``base``
    with the overrides applied; cross-field limits are checked on the result).
    Keys not starting with ``entropix`` belong to others and are ignored here.
    Unknown ``entropix_*`` keys raise.
    """
    base = base or EntropixConfig()
    enabled: Optional[bool] = None
    overrides: dict[str, Any] = {}
    cot = None
    for key, value in (extra_args or {}).items():
        if key == REQUEST_SWITCH:
            enabled = parse_bool(value, key)
        elif key.startswith(REQUEST_PREFIX):
            name = key[len(REQUEST_PREFIX):]
            if name == "cot_token":
                cot = parse_cot_token(value, key)
            else:
                overrides[name] = value
    if not isinstance(extra_args, (Mapping, type(None))):
        raise EntropixConfigError("vllm_xargs", f"expected a mapping, got {extra_args!r}")
    cfg = base.replace(overrides, prefix=REQUEST_PREFIX)
    parsed = {k: getattr(cfg, k) for k in overrides}
    return RequestConfig(enabled=enabled, overrides=parsed, cot_token=cot), cfg
