"""EntropixConfig: SPEC section 3 defaults, validation messages, parsing.

Every error must name the exact key the user wrote (``entropix_<name>`` for the
per-request keys of ``vllm_xargs``, ``additional_config.entropix.<name>`` for the
server's ``--additional-config``) and state the accepted range.
"""

from __future__ import annotations

import math

import pytest

from entropix_vllm.config import EngineConfig, EntropixConfig, EntropixConfigError, parse_request_args
from entropix_vllm.contract import K_MAX

# SPEC section 3, written out by hand.
SPEC_DEFAULTS = {
    "temperature": 0.666, "top_p": 0.90, "top_k": 27, "min_p": 0.03,
    "low_ent_thresh": 0.1, "med_ent_thresh": 3.0, "high_ent_thresh": 5.0,
    "low_vent_thresh": 0.1, "high_vent_thresh": 5.0,
    "n_adaptive_samples": 5,
    # insert CoT: T = min(1.5, T0*(1.3 + 0.2*aE))
    "helv_attn_ent_offset": 1.3, "helv_attn_ent_coef": 0.2, "helv_max_temp": 1.5,
    # explore: T = min(1.5, T0*(1.2 + 0.3*IS)), top_k = max(5, int(K0*(1 + 0.5*(1 - agr))))
    "lehv_interaction_strength_offset": 1.2, "lehv_interaction_strength_coef": 0.3,
    "lehv_max_temp": 1.5, "lehv_min_top_k": 5, "lehv_top_k_agree_coef": 0.5,
    # resample: T = max(2.0, T0*(2.0 + 0.5*aV)), top_p = max(0.5, P0 - 0.2*aE)
    "hehv_attn_vent_offset": 2.0, "hehv_attn_vent_coef": 0.5, "hehv_min_temp": 2.0,
    "hehv_attn_ent_coef": 0.2, "hehv_min_top_p": 0.5,
    # adaptive
    "ada_temp_logits": 0.3, "ada_temp_attn": 0.2, "ada_temp_agree": 0.2,
    "ada_top_p": 0.1, "ada_top_p_min": 0.1, "ada_top_p_max": 1.0,
    "ada_top_k_int": 0.3, "ada_top_k_agree": 0.2, "ada_top_k_min": 1, "ada_top_k_max": 100,
    "ada_min_p": 0.5, "ada_min_p_min": 0.01, "ada_min_p_max": 0.5,
}


def test_defaults_match_spec():
    cfg = EntropixConfig()
    for name, value in SPEC_DEFAULTS.items():
        got = getattr(cfg, name)
        assert got == value and type(got) is type(value), (name, got, value)


def test_every_field_has_a_spec_default():
    assert set(EntropixConfig.field_names()) == set(SPEC_DEFAULTS)


# ----------------------------------------------------------------------------
# Validation errors, through both entry points
# ----------------------------------------------------------------------------
def request_error(extra_args, base=None) -> EntropixConfigError:
    with pytest.raises(EntropixConfigError) as ei:
        parse_request_args(extra_args, base)
    return ei.value


def engine_error(additional_config) -> EntropixConfigError:
    with pytest.raises(EntropixConfigError) as ei:
        EngineConfig.from_additional_config(additional_config)
    return ei.value


def assert_names(err: EntropixConfigError, key: str, *phrases: str):
    msg = str(err)
    assert err.key == key, msg
    assert msg.startswith(key + ":"), msg
    for phrase in phrases:
        assert phrase in msg, (phrase, msg)


# (coefficient, bad value, accepted-range text)
BAD_VALUES = [
    ("top_p", "abc", "(0, 1]"),
    ("top_p", "", "(0, 1]"),
    ("top_p", True, "(0, 1]"),
    ("top_p", [0.5], "(0, 1]"),
    ("top_p", {"a": 1}, "(0, 1]"),
    ("top_p", None, "(0, 1]"),
    ("top_p", math.nan, "(0, 1]"),
    ("top_p", "nan", "(0, 1]"),
    ("top_p", math.inf, "(0, 1]"),
    ("top_p", "-inf", "(0, 1]"),
    ("top_p", 0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_p", -0.1, "(0, 1]"),
    ("temperature", 0, "(0, 100]"),
    ("temperature", 0.0, "(0, 100]"),
    ("temperature", -0.5, "(0, 100]"),
    ("temperature", False, "(0, 100]"),
    ("min_p", 1, "[0, 1)"),
    ("min_p", 1.0, "[0, 1)"),
    ("min_p", -0.01, "[0, 1)"),
    ("top_k", 0, f"[1, {K_MAX}]"),
    ("top_k", -3, f"[1, {K_MAX}]"),
    ("top_k", 2.5, f"[1, {K_MAX}]"),
    ("top_k", "2.5", f"[1, {K_MAX}]"),
    ("top_k", "ten", f"[1, {K_MAX}]"),
    ("top_k", True, f"[1, {K_MAX}]"),
    ("n_adaptive_samples", 0, "[1, 64]"),
    ("n_adaptive_samples", 65, "[1, 64]"),
    ("lehv_min_top_k", K_MAX + 1, f"[1, {K_MAX}]"),
    ("low_ent_thresh", -1.0, "[0, 1e+06]"),
    ("high_vent_thresh", math.inf, "[0, 1e+06]"),
    ("hehv_min_temp", 0.0, "(0, 100]"),
    ("hehv_min_top_p", 0.0, "(0, 1]"),
    ("ada_temp_agree", 1.0, "[0, 1)"),
    ("ada_min_p_max", 1.0, "[0, 1)"),
    ("ada_top_k_max", K_MAX + 1, f"[1, {K_MAX}]"),
]


@pytest.mark.parametrize("name,value,accepted", BAD_VALUES)
def test_bad_value_per_request(name, value, accepted):
    err = request_error({f"entropix_{name}": value})
    assert_names(err, f"entropix_{name}", accepted)


@pytest.mark.parametrize("name,value,accepted", BAD_VALUES)
def test_bad_value_engine(name, value, accepted):
    err = engine_error({"sampler": "entropix", "entropix": {name: value}})
    assert_names(err, f"additional_config.entropix.{name}", accepted)


def test_bad_value_message_shows_the_value():
    assert "'abc'" in str(request_error({"entropix_top_p": "abc"}))
    assert "1.5" in str(request_error({"entropix_top_p": 1.5}))
    assert "boolean" in str(request_error({"entropix_top_k": True}))


def test_top_k_too_large_for_the_candidate_buffer():
    # The explore branch widens top_k by (1 + lehv_top_k_agree_coef) = 1.5 at most, and
    # must fit the K_MAX candidates: the largest top_k is int(K_MAX / 1.5).
    limit = int(K_MAX / 1.5)
    parse_request_args({"entropix_top_k": limit})  # accepted
    err = request_error({"entropix_top_k": limit + 1})
    assert_names(err, "entropix_top_k", f"[1, {limit}]", str(K_MAX))
    err = engine_error({"entropix": {"top_k": 100}})
    assert_names(err, "additional_config.entropix.top_k", f"[1, {limit}]")
    # A smaller widening allows a larger top_k: (1 + 0) * 120 <= K_MAX.
    parse_request_args({"entropix_top_k": 120, "entropix_lehv_top_k_agree_coef": 0})


def test_cross_field_errors():
    err = request_error({"entropix_ada_top_k_min": 50, "entropix_ada_top_k_max": 40})
    assert_names(err, "entropix_ada_top_k_min", "<= ada_top_k_max (40)")
    err = engine_error({"entropix": {"ada_top_p_min": 0.9, "ada_top_p_max": 0.5}})
    assert_names(err, "additional_config.entropix.ada_top_p_min", "<= ada_top_p_max (0.5)")
    err = request_error({"entropix_ada_min_p_min": 0.3, "entropix_ada_min_p_max": 0.2})
    assert_names(err, "entropix_ada_min_p_min", "<= ada_min_p_max (0.2)")
    # A per-request value that clashes with the engine's configuration.
    base = EngineConfig.from_additional_config({"entropix": {"ada_top_k_max": 20}}).sampler
    err = request_error({"entropix_ada_top_k_min": 30}, base)
    assert_names(err, "entropix_ada_top_k_min", "<= ada_top_k_max (20)")


def test_unknown_keys():
    err = request_error({"entropix_temprature": 0.5})
    assert_names(err, "entropix_temprature", "unknown", "entropix_temperature", "entropix_top_p")
    err = engine_error({"entropix": {"topp": 0.5}})
    assert_names(err, "additional_config.entropix.topp", "unknown",
                 "additional_config.entropix.top_p")
    # Engine-only options are not per-request coefficients.
    assert_names(request_error({"entropix_attn_layer": 3}), "entropix_attn_layer", "unknown")


@pytest.mark.parametrize("value", ["maybe", 2, -1, 0.5, [True], None])
def test_bad_switch(value):
    assert_names(request_error({"entropix": value}), "entropix", "true or false")


@pytest.mark.parametrize("value", ["maybe", 2])
def test_bad_default_on(value):
    err = engine_error({"entropix": {"default_on": value}})
    assert_names(err, "additional_config.entropix.default_on", "true or false")


@pytest.mark.parametrize("value", [-1, "", True, 1.5, [3], None])
def test_bad_cot_token_per_request(value):
    err = request_error({"entropix_cot_token": value})
    assert_names(err, "entropix_cot_token", "integer >= 0", "non-empty string")


@pytest.mark.parametrize("value", [-1, "", False, 2.5])
def test_bad_cot_token_engine(value):
    err = engine_error({"entropix": {"cot_token": value}})
    assert_names(err, "additional_config.entropix.cot_token", "integer >= 0", "non-empty string")


@pytest.mark.parametrize("value", ["entropy", "Entropix", "", 1, None])
def test_bad_sampler(value):
    err = engine_error({"sampler": value})
    assert_names(err, "additional_config.sampler", "'default' or 'entropix'")


def test_bad_engine_options():
    assert_names(engine_error({"entropix": {"attn_layer": "last"}}),
                 "additional_config.entropix.attn_layer", "integer layer index")
    assert_names(engine_error({"entropix": {"attn_layer": 1.5}}),
                 "additional_config.entropix.attn_layer", "integer layer index")
    assert_names(engine_error({"entropix": {"trace_path": ""}}),
                 "additional_config.entropix.trace_path", "file path")
    assert_names(engine_error({"entropix": [("top_p", 0.5)]}),
                 "additional_config.entropix", "mapping")


def test_direct_construction_names_the_field():
    with pytest.raises(EntropixConfigError) as ei:
        EntropixConfig(top_p=2.0)
    assert_names(ei.value, "top_p", "(0, 1]")


# ----------------------------------------------------------------------------
# Valid parsing
# ----------------------------------------------------------------------------
def test_numeric_strings_accepted():
    req, cfg = parse_request_args({"entropix_top_p": "0.5", "entropix_top_k": " 12 ",
                                   "entropix_min_p": "0", "entropix_n_adaptive_samples": "3",
                                   "entropix_temperature": "1e-1"})
    assert (cfg.top_p, cfg.top_k, cfg.min_p, cfg.n_adaptive_samples) == (0.5, 12, 0.0, 3)
    assert cfg.temperature == 0.1
    assert type(cfg.top_k) is int and type(cfg.top_p) is float
    assert dict(req.overrides) == {"top_p": 0.5, "top_k": 12, "min_p": 0.0,
                                   "n_adaptive_samples": 3, "temperature": 0.1}
    # Integral floats are accepted for integer fields; ints for float fields.
    _, cfg = parse_request_args({"entropix_top_k": 7.0, "entropix_top_p": 1})
    assert cfg.top_k == 7 and type(cfg.top_k) is int and cfg.top_p == 1.0


def test_boundaries_accepted():
    _, cfg = parse_request_args({"entropix_top_p": 1, "entropix_min_p": 0.999,
                                 "entropix_top_k": 1, "entropix_n_adaptive_samples": 64,
                                 "entropix_low_ent_thresh": 0})
    assert (cfg.top_p, cfg.min_p, cfg.top_k, cfg.n_adaptive_samples, cfg.low_ent_thresh) == \
        (1.0, 0.999, 1, 64, 0.0)


def test_request_overrides_on_top_of_engine_config():
    eng = EngineConfig.from_additional_config(
        {"sampler": "entropix", "other_plugin": {"x": 1},
         "entropix": {"temperature": "0.5", "top_k": 40, "attn_layer": "3", "cot_token": "...",
                      "default_on": "false", "trace_path": "/tmp/t.jsonl"}})
    assert eng.enabled is True
    assert eng.sampler.temperature == 0.5 and eng.sampler.top_k == 40
    assert eng.options.attn_layer == 3 and eng.options.cot_token == "..."
    assert eng.options.default_on is False and eng.options.trace_path == "/tmp/t.jsonl"

    req, cfg = parse_request_args({"entropix": "true", "entropix_top_k": "30",
                                   "entropix_cot_token": 2564, "seed_of_someone_else": "x"},
                                  base=eng.sampler)
    assert req.enabled is True and req.cot_token == 2564
    assert dict(req.overrides) == {"top_k": 30}
    assert cfg.top_k == 30                    # request
    assert cfg.temperature == 0.5             # engine
    assert cfg.top_p == 0.90                  # SPEC default
    # The engine's configuration is not changed by a request.
    assert eng.sampler.top_k == 40


def test_no_entropix_keys():
    req, cfg = parse_request_args(None)
    assert req.enabled is None and dict(req.overrides) == {} and req.cot_token is None
    assert cfg == EntropixConfig()
    req, _ = parse_request_args({"entropix": False, "foo": 1})
    assert req.enabled is False
    eng = EngineConfig.from_additional_config(None)
    assert eng.enabled is False and eng.sampler == EntropixConfig()
    assert EngineConfig.from_additional_config({"sampler": "default"}).enabled is False
