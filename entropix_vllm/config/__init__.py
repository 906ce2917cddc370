"""Entropix configuration: the coefficients, the presets, and how an engine's
``entropix`` section and a request's keys become them.

Three rooms, one job each:

* :mod:`.coefficients`: every coefficient of SPEC section 3
  (:class:`EntropixConfig`), its default and range, the check and coercion of
  a value given as a key (:class:`EntropixConfigError` names the key and the
  accepted range);
* :mod:`.presets`: named sets of coefficients (built-in and loaded files, the
  model a file records, ``auto``);
* :mod:`.parsing`: the engine's ``additional_config`` (:class:`EngineConfig`)
  and the per-request keys (:func:`parse_request_args`), with their order of
  precedence.

This package's namespace is the door the rest of the project uses.
"""

from .coefficients import (COEFF_NAMES, MAX_COEF, MAX_COT_TEXT, MAX_ECHO, MAX_NUMBER_TEXT,
                           MAX_PATH_TEXT, MAX_TEMP, MAX_THRESH, REQUEST_PREFIX, REQUEST_PRESET,
                           REQUEST_SWITCH, EntropixConfig, EntropixConfigError, parse_bool,
                           parse_cot_token, show, unknown_key_error)
from .parsing import (SAMPLERS, EngineConfig, EngineOptions, RequestConfig, check_request_key,
                      is_request_key, parse_request_args, request_keys)
from .presets import (AUTO_PRESET, DEFAULT_PRESET, ENGINE_DEFAULT_PRESET, MAX_MATCH_RECORDS,
                      PRESET_DIR, AutoChoice, Preset, builtin_presets, choose_auto,
                      load_preset_file, looks_like_path, parse_preset, request_preset)

__all__ = [
    "COEFF_NAMES", "MAX_COEF", "MAX_COT_TEXT", "MAX_ECHO", "MAX_NUMBER_TEXT", "MAX_PATH_TEXT",
    "MAX_TEMP", "MAX_THRESH", "REQUEST_PREFIX", "REQUEST_PRESET", "REQUEST_SWITCH",
    "EntropixConfig", "EntropixConfigError", "parse_bool", "parse_cot_token", "show",
    "unknown_key_error", "SAMPLERS", "EngineConfig", "EngineOptions", "RequestConfig",
    "check_request_key", "is_request_key", "parse_request_args", "request_keys", "AUTO_PRESET",
    "DEFAULT_PRESET", "ENGINE_DEFAULT_PRESET", "MAX_MATCH_RECORDS", "PRESET_DIR", "AutoChoice",
    "Preset", "builtin_presets", "choose_auto", "load_preset_file", "looks_like_path",
    "parse_preset", "request_preset",
]
