"""Every coefficient of SPEC section 3 (:class:`EntropixConfig`), its default,
its range, and how a value given as a key is checked and coerced.

Every invalid value raises :class:`EntropixConfigError` whose message names the
key and the accepted range. The presets are in :mod:`.presets`, the engine's
``entropix`` section and the per-request keys in :mod:`.parsing`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

# Number of candidates the fused logit kernels keep per row (owned by
# contract.py). Every branch must sample with a top_k no larger than this
# (validated below).
from ..contract import K_MAX

#: The per-request keys' namespace: ``entropix`` (on/off) and ``entropix_<name>``.
REQUEST_PREFIX = "entropix_"
REQUEST_SWITCH = "entropix"
REQUEST_PRESET = REQUEST_PREFIX + "preset"

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


