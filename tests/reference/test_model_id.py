"""``preset: auto`` without a server (issue #16): what identifies a model
(``entropix_vllm/model_id.py``), the ``match`` of preset files, how ``auto``
chooses (``config.choose_auto``) and says why, the request key
``entropix_preset: "auto"``, the tuner's record and ``report --preset``.

Real files throughout: the bundled model (its folder, a renamed copy made of
symlinks, a renamed copy made of copies) and the tiny random models of
``tests/tiny_model.py`` (two seeds: same architecture and tokenizer, other
weights). The shipped preset's record is compared with one computed here from
the bundled model's files; a preset made for a tiny model is written with the
same CLI that wrote the shipped record.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from entropix_vllm import model_id, report, tune
from entropix_vllm.config import (AUTO_PRESET, DEFAULT_PRESET, ENGINE_DEFAULT_PRESET,
                                  EngineConfig, EntropixConfig, EntropixConfigError,
                                  builtin_presets, parse_request_args)
from entropix_vllm.model_id import ModelIdError, ModelSource, identify

from tiny_model import make_tiny_llama

SMOL = "smollm2-135m-instruct"
P = "additional_config.entropix."
SHIPPED = Path(model_id.__file__).resolve().parent / "presets" / f"{SMOL}.json"


def engine(section=None, model=None, sampler="entropix"):
    ac = {"sampler": sampler}
    if section is not None:
        ac["entropix"] = section
    return EngineConfig.from_additional_config(ac, model=ModelSource(model) if model else None)


def engine_error(section, model=None) -> EntropixConfigError:
    with pytest.raises(EntropixConfigError) as ei:
        engine(section, model)
    return ei.value


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(bundled_model):
    return bundled_model


@pytest.fixture(scope="module")
def renamed(smol, tmp_path_factory):
    """The bundled model's files as symlinks in a folder with another name."""
    folder = tmp_path_factory.mktemp("links") / "my-favourite-model"
    folder.mkdir()
    for f in Path(smol).iterdir():
        (folder / f.name).symlink_to(f)
    return str(folder)


@pytest.fixture(scope="module")
def copied(smol, tmp_path_factory):
    """A real copy (no links) of the bundled model's files, renamed."""
    folder = tmp_path_factory.mktemp("copy") / "totally-different-name"
    shutil.copytree(smol, folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny0") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def tiny_other(tmp_path_factory):
    """The tiny model's architecture and tokenizer with other (seed 1) weights."""
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny1") / "tiny"), seed=1)


def tiny_preset(tmp_path, tiny, name="tiny-tuned", coefficients=None):
    """A preset file made for ``tiny`` the way the shipped one was (the CLI's --add-to)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "coefficients": coefficients or {"top_k": 11},
                                "provenance": {"note": "kept"}}))
    proc = subprocess.run([sys.executable, "-m", "entropix_vllm.model_id", tiny,
                           "--add-to", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return str(path)


# ----------------------------------------------------------------------------
# The identity
# ----------------------------------------------------------------------------
def test_shipped_preset_records_the_bundled_model(smol):
    record = json.loads(SHIPPED.read_text())["match"]
    ident = identify(ModelSource(smol))
    assert ident.record() == record                     # every part, computed from the files
    assert ident.tensors == 272                         # every tensor of the safetensors file
    p = builtin_presets()[SMOL]
    assert p.made_for(ident) and not builtin_presets()[DEFAULT_PRESET].made_for(ident)
    # Its provenance is still the tuner's.
    assert p.provenance["command"].startswith("python -m entropix_vllm.tune")
    assert p.provenance["heldout"]["results"][SMOL]["accuracy"]["n"] == 180


def test_a_renamed_copy_is_the_same_model(smol, renamed, copied):
    a, b, c = (identify(ModelSource(m)) for m in (smol, renamed, copied))
    for other in (b, c):
        assert other.matches(a.record())
        assert (other.architecture, other.tokenizer, other.weights) == \
            (a.architecture, a.tokenizer, a.weights)
    assert (b.model, c.model) == ("my-favourite-model", "totally-different-name")


def test_other_weights_are_another_model(tiny, tiny_other, smol):
    t0, t1 = identify(ModelSource(tiny)), identify(ModelSource(tiny_other))
    assert t0.architecture == t1.architecture and t0.tokenizer == t1.tokenizer
    assert t0.weights != t1.weights and not t1.matches(t0.record())
    s = identify(ModelSource(smol))
    assert s.compare(t0.record()) == ()              # nothing in common with the bundled model


def test_a_changed_tensor_changes_the_weights_hash(tiny, tmp_path):
    """Any of a tensor's sampled bytes (first, middle, last window) changes the hash."""
    import struct
    copy = tmp_path / "tiny-edited"
    shutil.copytree(tiny, copy)
    st = copy / "model.safetensors"
    raw = bytearray(st.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start, end = header["model.norm.weight"]["data_offsets"]
    raw[8 + n + end - 1] ^= 0x01                      # the tensor's last byte
    st.write_bytes(bytes(raw))
    assert identify(ModelSource(str(copy))).weights != identify(ModelSource(tiny)).weights


@pytest.mark.parametrize("case", ["no-folder", "no-weights", "bin-only", "truncated",
                                  "no-tokenizer", "hub-id-not-cached"])
def test_unidentifiable_models_say_why(case, tiny, tmp_path):
    folder = tmp_path / case
    if case == "no-folder":
        src, why = str(tmp_path / "missing"), "neither a local folder nor in the local Hugging Face cache"
    elif case == "hub-id-not-cached":
        src, why = "someone/not-a-cached-model", "neither a local folder nor in the local Hugging Face cache"
    else:
        shutil.copytree(tiny, folder)
        src = str(folder)
        if case in ("no-weights", "bin-only"):
            (folder / "model.safetensors").unlink()
            if case == "bin-only":
                (folder / "pytorch_model.bin").write_bytes(b"\0" * 16)
            why = "no safetensors weights"
        elif case == "truncated":
            st = folder / "model.safetensors"
            st.write_bytes(st.read_bytes()[:-100])
            why = "truncated"
        else:
            (folder / "tokenizer.json").unlink()
            why = "no tokenizer files"
    identify.cache_clear()
    with pytest.raises(ModelIdError, match=why):
        identify(ModelSource(src))
    eng = engine(model=src)
    assert eng.options.preset == DEFAULT_PRESET and eng.sampler == EntropixConfig()
    assert "cannot identify the served model" in eng.preset_line() and why in eng.preset_line()
    assert "so classic" in eng.preset_line()


# ----------------------------------------------------------------------------
# auto: the default, its choice and the log line
# ----------------------------------------------------------------------------
def test_auto_is_the_engine_default_and_picks_the_bundled_models_preset(smol, renamed):
    assert ENGINE_DEFAULT_PRESET == AUTO_PRESET
    want = builtin_presets()[SMOL].config()
    for model in (smol, renamed):
        eng = engine(model=model)                                  # no preset named
        assert eng.options.preset == SMOL and eng.sampler == want
        assert eng.preset_line().startswith(f"Entropix preset {SMOL} (auto, the default: made "
                                            f"for this model: the built-in preset '{SMOL}'")
        assert eng.presets[AUTO_PRESET].name == SMOL
        named = engine({"preset": "auto"}, model=model)
        assert named.sampler == want and f"{P}preset=auto: made for this model" in named.preset_line()


def test_a_model_without_preset_gets_classic_saying_so(tiny):
    eng = engine(model=tiny)
    assert eng.options.preset == DEFAULT_PRESET and eng.sampler == EntropixConfig()
    line = eng.preset_line()
    assert line.startswith("Entropix preset classic (auto, the default: no built-in or loaded "
                           "preset records this model (model fingerprint ")
    assert "so classic: SPEC section 3's defaults" in line
    assert eng.presets[AUTO_PRESET].name == DEFAULT_PRESET


def test_classic_stays_reachable_by_name(smol):
    eng = engine({"preset": "classic"}, model=smol)
    assert eng.sampler == EntropixConfig() and eng.options.preset == "classic"
    assert eng.preset_line() == f"Entropix preset classic (named by {P}preset)"
    assert eng.preset_warning is None                 # classic records no model
    # ... and auto still means the model's preset for requests.
    req, cfg = parse_request_args({"entropix_preset": "auto"}, eng.sampler, eng.presets)
    assert req.preset == SMOL and cfg == builtin_presets()[SMOL].config()


def test_explicit_keys_go_over_the_auto_preset_and_are_named(smol):
    eng = engine({"temperature": 0.5, "top_k": 20}, model=smol)
    base = builtin_presets()[SMOL].coefficients
    assert eng.sampler.temperature == 0.5 and eng.sampler.top_k == 20
    assert eng.sampler.low_ent_thresh == base["low_ent_thresh"]
    assert eng.preset_line().endswith("; set over it by additional_config.entropix: "
                                      "temperature, top_k")


def test_sampler_off_identifies_nothing(smol):
    eng = engine(model=smol, sampler="default")
    assert eng.options.preset == DEFAULT_PRESET
    assert "no served model to identify" in eng.preset_reason


def test_a_loaded_preset_made_for_the_model_wins(tiny, tiny_other, tmp_path):
    mine = tiny_preset(tmp_path, tiny)
    eng = engine({"presets": [mine]}, model=tiny)
    assert eng.options.preset == "tiny-tuned" and eng.sampler.top_k == 11
    assert f"made for this model: the preset file {mine} 'tiny-tuned'" in eng.preset_line()
    # The same architecture and tokenizer with other weights: not that preset.
    other = engine({"presets": [mine]}, model=tiny_other)
    assert other.options.preset == DEFAULT_PRESET and other.sampler == EntropixConfig()
    assert ("'tiny-tuned' was made for tiny with the same architecture and tokenizer but "
            "other weights") in other.preset_line()


def test_two_loaded_presets_for_the_model_first_wins_and_both_are_named(tiny, tmp_path):
    a = tiny_preset(tmp_path, tiny, "first", {"top_k": 12})
    b = tiny_preset(tmp_path, tiny, "second", {"top_k": 13})
    eng = engine({"presets": [a, b]}, model=tiny)
    assert eng.options.preset == "first" and eng.sampler.top_k == 12
    assert "also made for it: second" in eng.preset_line()
    assert parse_request_args({"entropix_preset": "second"}, eng.sampler, eng.presets)[1].top_k == 13


def test_a_named_preset_made_for_another_model_is_used_with_a_warning(tiny, smol):
    eng = engine({"preset": SMOL}, model=tiny)
    assert eng.sampler == builtin_presets()[SMOL].config()
    assert eng.preset_warning.startswith(f"Entropix preset '{SMOL}' was made for another model "
                                         "(SmolLM2-135M-Instruct-f32-v1)")
    assert engine({"preset": SMOL}, model=smol).preset_warning is None


def test_auto_preset_conflicting_with_explicit_keys_names_the_preset(tiny, tmp_path):
    mine = tiny_preset(tmp_path, tiny, "narrow", {"ada_top_k_max": 10})
    e = engine_error({"presets": [mine], "ada_top_k_min": 20}, model=tiny)
    assert e.key == P + "ada_top_k_min"
    mine2 = tiny_preset(tmp_path, tiny, "wide", {"top_k": 80})
    e = engine_error({"presets": [mine2], "lehv_top_k_agree_coef": 1.0}, model=tiny)
    assert e.key == P + "lehv_top_k_agree_coef"


# ----------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------
def test_request_auto_is_the_served_models_preset(smol, tiny):
    eng = engine(model=smol)
    req, cfg = parse_request_args({"entropix_preset": "auto", "entropix_top_k": 9},
                                  eng.sampler, eng.presets)
    assert req.preset == SMOL and cfg == builtin_presets()[SMOL].config().replace({"top_k": 9})
    t = engine(model=tiny)
    req, cfg = parse_request_args({"entropix_preset": "auto"}, t.sampler, t.presets)
    assert req.preset == DEFAULT_PRESET and cfg == EntropixConfig()


@pytest.mark.parametrize("value,needle", [("Auto", "unknown preset 'Auto'"),
                                          ("no-such", "unknown preset 'no-such'"),
                                          ("./auto", "cannot give a file path"),
                                          (1, "expected a preset name")])
def test_request_preset_refusals_list_auto(smol, value, needle):
    eng = engine(model=smol)
    with pytest.raises(EntropixConfigError) as ei:
        parse_request_args({"entropix_preset": value}, eng.sampler, eng.presets)
    assert ei.value.key == "entropix_preset" and needle in str(ei.value)
    assert "auto" in str(ei.value) and "classic" in str(ei.value)


def test_unknown_engine_preset_still_stops_start_up(smol):
    e = engine_error({"preset": "llama-9000"}, model=smol)
    assert e.key == P + "preset" and "unknown preset 'llama-9000'" in str(e)
    assert "(auto: the one made for the served model)" in str(e)


# ----------------------------------------------------------------------------
# The match record in preset files
# ----------------------------------------------------------------------------
GOOD = {"scheme": model_id.SCHEME, "architecture": "sha256:" + "a" * 64,
        "tokenizer": "sha256:" + "b" * 64, "weights": "sha256:" + "c" * 64, "model": "m"}


@pytest.mark.parametrize("match,key,needle", [
    ({**GOOD, "weights": "sha256:xyz"}, "match.weights", "64 lowercase hex digits"),
    ({**GOOD, "scheme": "entropix-model-id/0"}, "match.scheme", "expected 'entropix-model-id/1'"),
    ({k: v for k, v in GOOD.items() if k != "tokenizer"}, "match.tokenizer", "missing"),
    ({**GOOD, "colour": "red"}, "match", "unknown key 'colour'"),
    ({**GOOD, "model": 5}, "match.model", "expected a text"),
    ("sha256:" + "a" * 64, "match", "expected an object"),
    ([GOOD, {**GOOD, "architecture": 1}], "match[1].architecture", "64 lowercase hex digits"),
    ([], "match", "a list of 0"),
])
def test_bad_match_records_stop_start_up_naming_the_field(tmp_path, match, key, needle):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"name": "p", "coefficients": {}, "match": match}))
    e = engine_error({"preset": str(path)})
    assert e.key == f"{P}preset: {path}: {key}", e.key
    assert needle in str(e)
    e = engine_error({"presets": [str(path)]})
    assert e.key == f"{P}presets: {path}: {key}"


def test_a_list_of_records_matches_any_of_them(tiny, tiny_other, tmp_path):
    rec0 = identify(ModelSource(tiny)).record()
    rec1 = identify(ModelSource(tiny_other)).record()
    path = tmp_path / "both.json"
    path.write_text(json.dumps({"name": "both", "coefficients": {"top_k": 14},
                                "match": [rec0, rec1]}))
    for m in (tiny, tiny_other):
        assert engine({"presets": [str(path)]}, model=m).options.preset == "both"


def test_a_preset_file_cannot_be_named_auto(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"name": "auto", "coefficients": {}}))
    e = engine_error({"presets": [str(path)]})
    assert e.key.endswith(": name") and "'auto' is reserved" in str(e)
    plain = tmp_path / "auto.json"                 # a plain mapping is named by its file
    plain.write_text(json.dumps({"top_k": 3}))
    assert "'auto' is reserved" in str(engine_error({"presets": [str(plain)]}))


def test_add_to_keeps_everything_else(tiny, tmp_path):
    path = tiny_preset(tmp_path, tiny)
    data = json.loads(Path(path).read_text())
    assert list(data) == ["name", "coefficients", "match", "provenance"]
    assert data["provenance"] == {"note": "kept"} and data["coefficients"] == {"top_k": 11}
    assert data["match"] == identify(ModelSource(tiny)).record()
    # Running it again replaces the record, it does not add a second one.
    tiny_preset_again = subprocess.run([sys.executable, "-m", "entropix_vllm.model_id", tiny,
                                        "--add-to", path], capture_output=True, text=True)
    assert tiny_preset_again.returncode == 0
    assert json.loads(Path(path).read_text()) == data


def test_model_id_cli_refuses_an_unidentifiable_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "entropix_vllm.model_id", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no safetensors weights" in proc.stderr


# ----------------------------------------------------------------------------
# The tuner's record, the report's preset
# ----------------------------------------------------------------------------
def test_tuner_records_the_served_model(tiny, tmp_path):
    record, note = tune.model_match(tiny, explicit=False)
    assert record == identify(ModelSource(tiny)).record() and "records the model tiny" in note
    # A served name that is no folder (--served-model-name): no record, a note on how to add it.
    record, note = tune.model_match("bundled", explicit=False)
    assert record is None and "python -m entropix_vllm.model_id MODEL_DIR --add-to" in note
    with pytest.raises(ModelIdError):
        tune.model_match(str(tmp_path), explicit=True)   # --model-dir given: an error


def test_report_recomputes_with_the_named_presets_thresholds(tmp_path, capsys):
    smol = builtin_presets()[SMOL].config()
    # One token at entropy 1.0 bits, varentropy 0.5: argmax under the preset
    # (low_ent_thresh 2.2271, low_vent_thresh 1e6), adaptive under classic.
    rec = {"request_id": "r-1", "index": 0, "token_id": 5, "entropy": 1.0, "varentropy": 0.5,
           "attn_entropy": 1.0, "attn_varentropy": 0.1, "agreement": 0.1,
           "interaction_strength": 1.0, "branch": "argmax", "temperature": 1.0, "top_k": 1,
           "top_p": 1.0, "min_p": 0.0}
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps(rec) + "\n")
    assert report.main([str(trace), "--preset", SMOL]) == 0
    out = capsys.readouterr().out
    assert f"low_ent_thresh={smol.low_ent_thresh:g}" in out
    assert "disagreements with the recomputed branch: 0" in out
    assert report.main([str(trace)]) == 0
    assert "disagreements with the recomputed branch: 1" in capsys.readouterr().out
    assert report.main([str(trace), "--preset", "nope"]) == 2
    assert "--preset: unknown preset 'nope'" in capsys.readouterr().err
