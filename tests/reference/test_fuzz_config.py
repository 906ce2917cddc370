"""Property-based fuzz of both parsers (``hypothesis``): the engine section
(``EngineConfig.from_additional_config``) and the request keys
(``parse_request_args``).

For ANY JSON-like value (any type, any size, NaN/Infinity, huge integers,
long digit strings, lone UTF-16 surrogates, long texts) under any key:

* the parser returns, or raises ``EntropixConfigError`` naming a key that was
  sent, with a bounded message; never another exception;
* on success every coefficient is finite and within its declared range, and
  every derived branch parameter (SPEC section 3, ``reference.branch_params``)
  is finite and in range at the extremes of the figures;
* a near miss of a key (case, spaces, ``-``/``_``) is refused naming the key.
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import torch  # noqa: E402

from entropix_vllm import reference  # noqa: E402
from entropix_vllm.config import (EngineConfig, EntropixConfig, EntropixConfigError,  # noqa: E402
                                  parse_request_args, request_keys)
from entropix_vllm.contract import K_MAX, AttnStats  # noqa: E402

MAX_MESSAGE = 2500   # the longest message: an unknown key with the list of known keys

COEFFS = EntropixConfig.field_names()
ENGINE_OPTIONS = ("attn_layer", "cot_token", "trace_path", "default_on", "preset", "presets")

# Text with everything: lone surrogates (category Cs), NUL, any plane.
any_char = st.characters(blacklist_categories=())
odd_text = st.one_of(
    st.text(any_char, max_size=40),
    st.text("0123456789", min_size=20, max_size=500),                   # long digit strings
    st.sampled_from(["nan", "NaN", "inf", "-Infinity", "1e308", "1.7e308", "1e400", "-0",
                     "0x10", "1_000", " 5 ", "5.0", "2.5", "\ud800", "\udfff", "\x00",
                     "9" * 400, "1" + "0" * 4400, "word " * 7000, "٣", "５"]),
)
special_numbers = st.sampled_from([0, -0.0, 1, -1, 2 ** 31, 2 ** 53 + 1, 2 ** 63, -2 ** 63,
                                   2 ** 64, 10 ** 400, -10 ** 400, 1e308, 1.7e308, -1.7e308,
                                   math.inf, -math.inf, math.nan, 5e-324, 1e-300, 127.0, 128,
                                   129, 0.999999, 1.0000001, K_MAX - 1.0])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), special_numbers,
                    st.floats(allow_nan=True, allow_infinity=True), odd_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)


def near_misses(key: str):
    """Variants of ``key`` that differ only in case, spaces and '-'/'_'."""
    return st.tuples(st.sampled_from(["", " ", "  ", "\t"]),
                     st.sampled_from(["", " ", "\n"]),
                     st.sampled_from(["upper", "title", "swap", "dash", "drop", "same"])
                     ).map(lambda t: t[0] + _mutate(key, t[2]) + t[1])


def _mutate(key, how):
    return {"upper": key.upper(), "title": key.title(), "swap": key.swapcase(),
            "dash": key.replace("_", "-"), "drop": key.replace("_", ""), "same": key}[how]


request_key = st.one_of(st.sampled_from(request_keys()),
                        st.sampled_from(request_keys()).flatmap(near_misses),
                        st.text(any_char, max_size=30).map(lambda s: "entropix_" + s))


def check_error(e: EntropixConfigError, sent_keys, prefix=""):
    msg = str(e)
    assert isinstance(e, EntropixConfigError)
    assert len(msg) <= MAX_MESSAGE, (len(msg), msg[:300])
    assert msg.startswith(e.key + ":"), msg[:300]
    names = {prefix + str(k) for k in sent_keys}
    assert e.key in names or any(e.key.startswith(prefix + str(k)[:40]) for k in sent_keys) \
        or e.key == "vllm_xargs" or e.key.startswith("additional_config"), (e.key, names)
    assert "[1, 0]" not in msg and "(0, 0)" not in msg, msg


def check_config(cfg: EntropixConfig):
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        m = f.metadata
        assert isinstance(v, int if m["kind"] == "int" else float) and not isinstance(v, bool)
        assert math.isfinite(v), (f.name, v)
        if m["lo"] is not None:
            assert v >= m["lo"] and not (m["lo_open"] and v == m["lo"]), (f.name, v)
        assert m["hi"] is not None, f"{f.name} has no finite upper bound"
        assert v <= m["hi"] and not (m["hi_open"] and v == m["hi"]), (f.name, v)
    check_derived(cfg)


# The figures' extremes: entropy <= log2(vocab) (~17 bits for 128k), varentropy,
# attention entropy/varentropy, agreement in [0, 1], interaction strength.
_FIG = torch.tensor([[e, v, ae, av, agr, s]
                     for e in (0.0, 17.0) for v in (0.0, 400.0) for ae in (0.0, 20.0)
                     for av in (0.0, 400.0) for agr in (0.0, 1.0) for s in (0.0, 1e3)],
                    dtype=torch.float64)


def check_derived(cfg: EntropixConfig):
    n = _FIG.shape[0]
    c = reference.config_tensors([cfg] * n)
    attn = AttnStats(attn_entropy=_FIG[:, 2], attn_varentropy=_FIG[:, 3], agreement=_FIG[:, 4],
                     interaction_strength=_FIG[:, 5])
    # Every branch, whatever the thresholds: evaluate each branch's formulas.
    for branch_cfg in _forcing(cfg):
        p = reference.branch_params(_FIG[:, 0], _FIG[:, 1], attn,
                                    reference.config_tensors([branch_cfg] * n))
        for name in ("temperature", "top_p", "min_p"):
            t = getattr(p, name)
            assert torch.isfinite(t).all(), (name, t)
        assert ((p.top_k >= 1) & (p.top_k <= K_MAX)).all(), p.top_k
        assert ((p.top_p > 0) & (p.top_p <= 1)).all(), p.top_p
        assert ((p.min_p >= 0) & (p.min_p < 1)).all(), p.min_p
        assert (p.temperature >= 0).all()
        assert ((p.temperature > 0) | (p.branch == reference.ARGMAX)).all(), p.temperature
    del c


def _forcing(cfg):
    """``cfg`` with thresholds that route every row to each branch in turn."""
    big = 1e6
    for th in ({"low_ent_thresh": 0, "high_ent_thresh": 0, "low_vent_thresh": big},       # insert
               {"low_ent_thresh": 0, "low_vent_thresh": 0, "high_ent_thresh": big,
                "high_vent_thresh": 0},                                                  # explore
               {"low_ent_thresh": 0, "low_vent_thresh": 0, "med_ent_thresh": 0,
                "high_ent_thresh": 0, "high_vent_thresh": 0},                            # resample
               {"low_ent_thresh": 0, "low_vent_thresh": 0, "high_ent_thresh": big,
                "high_vent_thresh": big}):                                               # adaptive
        yield cfg.replace(th)


FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.dictionaries(request_key, json_values, max_size=4))
def test_request_parser_is_total(xargs):
    try:
        _, cfg = parse_request_args(xargs)
    except EntropixConfigError as e:
        check_error(e, list(xargs))
        return
    check_config(cfg)


@FUZZ
@given(st.sampled_from(COEFFS), json_values)
def test_request_coefficient_any_value(name, value):
    key = "entropix_" + name
    try:
        _, cfg = parse_request_args({key: value})
    except EntropixConfigError as e:
        check_error(e, [key])
        assert e.key == key, str(e)[:200]
        assert "expected" in str(e) or "must be" in str(e)
        return
    check_config(cfg)


@FUZZ
@given(st.dictionaries(st.sampled_from(COEFFS), scalars, min_size=2, max_size=6))
def test_cross_field_refusals_name_a_sent_key(xargs):
    sent = {"entropix_" + k: v for k, v in xargs.items()}
    try:
        _, cfg = parse_request_args(sent)
    except EntropixConfigError as e:
        check_error(e, list(sent))
        assert e.key in sent, (e.key, list(sent))
        return
    check_config(cfg)


@FUZZ
@given(st.sampled_from(request_keys()).flatmap(near_misses), scalars)
def test_near_miss_keys_refused_naming_the_key(key, value):
    right = next(k for k in request_keys()
                 if k.replace("_", "") == key.strip().lower().replace("-", "").replace("_", ""))
    if key == right:
        return
    with pytest.raises(EntropixConfigError) as ei:
        parse_request_args({key: value})
    assert f"did you mean {right!r}" in str(ei.value), str(ei.value)[:300]


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(COEFFS + ENGINE_OPTIONS),
                                 st.text(any_char, max_size=20)),
                       json_values, max_size=4),
       st.one_of(st.just("entropix"), st.just("default"), json_values))
def test_engine_parser_is_total(section, sampler):
    ac = {"sampler": sampler, "entropix": section}
    try:
        eng = EngineConfig.from_additional_config(ac)
    except EntropixConfigError as e:
        check_error(e, list(section), prefix="additional_config.entropix.")
        return
    check_config(eng.sampler)


@FUZZ
@given(json_values)
def test_engine_section_of_any_type(section):
    try:
        EngineConfig.from_additional_config({"sampler": "entropix", "entropix": section})
    except EntropixConfigError as e:
        assert len(str(e)) <= MAX_MESSAGE


@pytest.mark.parametrize("xargs,key,phrase", [
    ({"entropix_top_k": 1.7e308}, "entropix_top_k", "[1, 128]"),
    ({"entropix_top_k": "9" * 400}, "entropix_top_k", "[1, 128]"),
    ({"entropix_lehv_top_k_agree_coef": 1e308}, "entropix_lehv_top_k_agree_coef", "[0, 127]"),
    ({"entropix_lehv_top_k_agree_coef": 4}, "entropix_lehv_top_k_agree_coef", "[0, 3.74074]"),
    ({"entropix_cot_token": "\ud800"}, "entropix_cot_token", "not valid Unicode"),
    ({"entropix_cot_token": "word " * 7000}, "entropix_cot_token", "at most 256"),
    ({"entropix_temperature": 1e308}, "entropix_temperature", "(0, 100]"),
    ({"entropix_temperature": 2 ** 63}, "entropix_temperature", "(0, 100]"),
    ({"entropix_ada_min_p": 1e300, "entropix_min_p": 0}, "entropix_ada_min_p", "[0, 1000]"),
    ({"Entropix_top_p": 0.5}, "Entropix_top_p", "did you mean 'entropix_top_p'"),
    ({"entropix-top_p": 0.5}, "entropix-top_p", "did you mean 'entropix_top_p'"),
    ({" entropix_top_p": 0.5}, " entropix_top_p", "did you mean 'entropix_top_p'"),
    ({"ENTROPIX": True}, "ENTROPIX", "did you mean 'entropix'"),
    ({"entropixtop_p": 0.5}, "entropixtop_p", "did you mean 'entropix_top_p'"),
])
def test_issue_cases(xargs, key, phrase):
    with pytest.raises(EntropixConfigError) as ei:
        parse_request_args(xargs)
    assert ei.value.key == key and phrase in str(ei.value), str(ei.value)[:300]
    assert len(str(ei.value)) < 400


def test_widened_top_k_names_the_sent_key():
    # Only top_k sent: top_k is named, with a non-empty range.
    with pytest.raises(EntropixConfigError) as ei:
        parse_request_args({"entropix_top_k": 100})
    assert ei.value.key == "entropix_top_k" and "[1, 85]" in str(ei.value)
    # Both sent: one of them, with a range that contains valid values.
    with pytest.raises(EntropixConfigError) as ei:
        parse_request_args({"entropix_top_k": 128, "entropix_lehv_top_k_agree_coef": 127})
    assert ei.value.key in ("entropix_top_k", "entropix_lehv_top_k_agree_coef")
    # The largest values together that fit.
    _, cfg = parse_request_args({"entropix_top_k": 1, "entropix_lehv_top_k_agree_coef": 127})
    check_config(cfg)
