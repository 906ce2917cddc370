"""Presets: the built-ins, preset files, the merge order (SPEC defaults <
preset < explicit keys, for the engine and for a request), and every refusal,
engine-side (a start-up error naming the key) and request-side (the
``EntropixConfigError`` the front end turns into HTTP 400), including a
request preset that looks like a path."""

from __future__ import annotations

import json

import pytest

from entropix_vllm.config import (DEFAULT_PRESET, EngineConfig, EntropixConfig,
                                  EntropixConfigError, builtin_presets, parse_preset,
                                  parse_request_args)

P = "additional_config.entropix."


def engine(section, sampler="entropix"):
    return EngineConfig.from_additional_config({"sampler": sampler, "entropix": section})


def engine_error(section) -> EntropixConfigError:
    with pytest.raises(EntropixConfigError) as ei:
        engine(section)
    return ei.value


def request_error(xargs, eng=None) -> EntropixConfigError:
    eng = eng or engine({})
    with pytest.raises(EntropixConfigError) as ei:
        parse_request_args(xargs, eng.sampler, eng.presets)
    return ei.value


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


# ----------------------------------------------------------------------------
# Built-ins
# ----------------------------------------------------------------------------
def test_classic_is_spec_defaults_and_what_auto_falls_back_to():
    presets = builtin_presets()
    assert DEFAULT_PRESET == "classic" and "classic" in presets
    assert presets["classic"].config() == EntropixConfig()
    # No preset named: auto, which is classic when no served model is known (here:
    # none is given; tests/reference/test_model_id.py gives real ones).
    eng = engine({})
    assert eng.sampler == EntropixConfig() and eng.options.preset == "classic"
    assert eng.preset_reason.startswith("auto, the default: no served model to identify")
    assert engine({"preset": "classic"}).sampler == EntropixConfig()


def test_every_builtin_preset_is_valid_and_named_like_its_file():
    for name, preset in builtin_presets().items():
        cfg = preset.config()                 # raises if a value is out of range
        assert preset.name == name and preset.source == "built-in"
        for k, v in preset.coefficients.items():
            assert getattr(cfg, k) == v


def test_bundled_model_preset_records_its_provenance():
    presets = builtin_presets()
    if "smollm2-135m-instruct" not in presets:
        pytest.fail("the built-in preset smollm2-135m-instruct is missing")
    p = presets["smollm2-135m-instruct"]
    prov = p.provenance
    for key in ("command", "date", "model", "dev", "heldout", "calibration", "search"):
        assert key in prov, key
    assert prov["command"].startswith("python -m entropix_vllm.tune")
    assert prov["heldout"]["results"], "the held-out results are recorded"
    assert p.config() != EntropixConfig()


# ----------------------------------------------------------------------------
# Merge order
# ----------------------------------------------------------------------------
def test_engine_merge_order(tmp_path):
    path = write(tmp_path, "mine.json", {"name": "mine", "coefficients": {
        "temperature": 0.5, "top_k": 20, "high_ent_thresh": 4.0}})
    eng = engine({"preset": path, "top_k": 30})
    assert eng.sampler.temperature == 0.5          # from the preset
    assert eng.sampler.top_k == 30                 # explicit key beats the preset
    assert eng.sampler.high_ent_thresh == 4.0
    assert eng.sampler.top_p == EntropixConfig().top_p   # SPEC default underneath
    assert eng.options.preset == "mine" and "mine" in eng.presets


def test_request_merge_order(tmp_path):
    path = write(tmp_path, "mine.json", {"name": "mine", "coefficients": {"temperature": 0.5,
                                                                          "top_k": 20}})
    eng = engine({"preset": path, "top_p": 0.8})
    # No request preset: the engine's coefficients, then the request's keys.
    req, cfg = parse_request_args({"entropix_top_k": 9}, eng.sampler, eng.presets)
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == (0.5, 0.8, 9) and req.preset is None
    # A request preset replaces the engine's coefficients (SPEC defaults + preset) ...
    req, cfg = parse_request_args({"entropix_preset": "classic"}, eng.sampler, eng.presets)
    assert cfg == EntropixConfig() and req.preset == "classic"
    # ... and the request's own keys still win over it.
    _, cfg = parse_request_args({"entropix_preset": "mine", "entropix_top_k": 7},
                                eng.sampler, eng.presets)
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == (0.5, EntropixConfig().top_p, 7)


def test_extra_preset_files_are_requestable(tmp_path):
    a = write(tmp_path, "a.json", {"name": "alpha", "coefficients": {"top_k": 11}})
    b = write(tmp_path, "beta.json", {"top_k": 12})           # plain mapping, named by its file
    eng = engine({"presets": f"{a}, {b}"})
    assert eng.sampler == EntropixConfig()                   # loading is not choosing
    assert parse_request_args({"entropix_preset": "alpha"}, eng.sampler, eng.presets)[1].top_k == 11
    assert parse_request_args({"entropix_preset": "beta"}, eng.sampler, eng.presets)[1].top_k == 12
    assert engine({"presets": [a]}).options.presets == (a,)


# ----------------------------------------------------------------------------
# Refusals: engine
# ----------------------------------------------------------------------------
def test_engine_unknown_preset_name():
    e = engine_error({"preset": "llama-9000"})
    assert e.key == P + "preset" and "unknown preset 'llama-9000'" in str(e)
    assert "classic" in str(e)


@pytest.mark.parametrize("value", [3, True, "", "   ", ["classic"], {"a": 1}])
def test_engine_preset_wrong_type(value):
    e = engine_error({"preset": value})
    assert e.key == P + "preset"


def test_engine_preset_file_errors(tmp_path):
    missing = str(tmp_path / "nope.json")
    assert "cannot read preset file" in str(engine_error({"preset": missing}))
    bad_json = write(tmp_path, "bad.json", "{not json")
    assert "not valid JSON" in str(engine_error({"preset": bad_json}))
    not_obj = write(tmp_path, "list.json", [1, 2])
    assert "must be a JSON object" in str(engine_error({"preset": not_obj}))
    unknown = write(tmp_path, "u.json", {"coefficients": {"top_kk": 3}})
    e = engine_error({"preset": unknown})
    assert "top_kk" in str(e) and "unknown Entropix coefficient" in str(e)
    out_of_range = write(tmp_path, "r.json", {"coefficients": {"top_p": 1.5}})
    e = engine_error({"preset": out_of_range})
    assert "top_p" in str(e) and "(0, 1]" in str(e) and out_of_range in str(e)
    extra_key = write(tmp_path, "x.json", {"coefficients": {}, "colour": "red"})
    assert "unknown preset key 'colour'" in str(engine_error({"preset": extra_key}))
    bad_name = write(tmp_path, "n.json", {"name": "has space", "coefficients": {}})
    assert "expected a preset name" in str(engine_error({"preset": bad_name}))
    shadow = write(tmp_path, "s.json", {"name": "classic", "coefficients": {"top_k": 3}})
    assert "name of a built-in preset" in str(engine_error({"preset": shadow}))
    a = write(tmp_path, "a1.json", {"name": "same", "coefficients": {}})
    b = write(tmp_path, "a2.json", {"name": "same", "coefficients": {}})
    assert "two preset files are named 'same'" in str(engine_error({"presets": [a, b]}))
    assert engine_error({"presets": 5}).key == P + "presets"


def test_engine_explicit_key_conflicting_with_preset_names_the_key(tmp_path):
    path = write(tmp_path, "k.json", {"coefficients": {"ada_top_k_max": 10}})
    e = engine_error({"preset": path, "ada_top_k_min": 20})
    assert e.key == P + "ada_top_k_min"


# ----------------------------------------------------------------------------
# Refusals: request
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["/etc/passwd", "presets/classic.json", "../x", "mine.json",
                                   "~/p", "C:\\p\\q", "./classic"])
def test_request_preset_path_is_refused(value):
    e = request_error({"entropix_preset": value})
    assert e.key == "entropix_preset" and "cannot give a file path" in str(e)


@pytest.mark.parametrize("value", ["nope", "CLASSIC", "x" * 5000])
def test_request_unknown_preset(value):
    e = request_error({"entropix_preset": value})
    assert e.key == "entropix_preset" and "unknown preset" in str(e)
    assert "classic" in str(e) and len(str(e)) < 400


@pytest.mark.parametrize("value", [1, None, True, ["classic"], {"name": "classic"}])
def test_request_preset_wrong_type(value):
    e = request_error({"entropix_preset": value})
    assert e.key == "entropix_preset" and "expected a preset name" in str(e)


def test_request_cannot_name_a_file_the_engine_did_not_load(tmp_path):
    write(tmp_path, "secret.json", {"coefficients": {"top_k": 3}})
    e = request_error({"entropix_preset": "secret"})
    assert "unknown preset 'secret'" in str(e)


def test_parse_preset_forms():
    p = parse_preset({"top_k": 5}, "x", default_name="plain")
    assert p.name == "plain" and p.coefficients == {"top_k": 5}
    q = parse_preset({"name": "n", "coefficients": {"top_p": "0.5"}}, "x")
    assert q.coefficients == {"top_p": 0.5}           # validated, coerced values
