"""The engine's ``entropix`` section and the per-request keys.

* the server's ``additional_config`` (``--additional-config.entropix.<name>=...``
  or ``LLM(..., additional_config={"sampler": "entropix", "entropix": {...}})``)
  with :meth:`EngineConfig.from_additional_config`: coefficients and the
  engine options (:class:`EngineOptions`);
* the flat per-request keys of ``SamplingParams.extra_args`` (the OpenAI body's
  ``vllm_xargs``): ``entropix`` (true/false) and one ``entropix_<name>`` key per
  coefficient, with :func:`parse_request_args`.

Order of precedence, lowest first:

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
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

from ..model_id import ModelSource
from .coefficients import (MAX_ECHO, MAX_PATH_TEXT, REQUEST_PREFIX, REQUEST_PRESET,
                           REQUEST_SWITCH, EntropixConfig, EntropixConfigError, _coerce, _meta,
                           _norm_key, _text_ok, parse_bool, parse_cot_token, show,
                           unknown_key_error)
from .presets import (AUTO_PRESET, Preset, _engine_preset, builtin_presets, choose_auto,
                      load_preset_file, request_preset)

#: The engine's ``sampler`` values (``--sampler``): vLLM's own, or Entropix.
SAMPLERS = ("default", "entropix")


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
