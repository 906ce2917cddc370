"""The eval's parts that need no server: scorers on hand-made outputs, task
files (own format and GSM8K's), intervals and paired differences against
values worked out by hand, majority votes, sampler specifications and the
request fields they send, and the shipped task files (the generator
reproduces them; no held-out question is in dev)."""

from __future__ import annotations

import json
import math

import pytest

from entropix_vllm.eval import make_tasks, samplers as S
from entropix_vllm.eval.stats import (Z95, accuracy_interval, majority, mean_interval,
                                      paired_difference)
from entropix_vllm.eval.tasks import (SCORERS, TaskFileError, canonical_number, choice_letter,
                                      load_tasks, numbers, parse_item)


# ----------------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("scorer,output,answer,ok", [
    ("first-number-equals", "61", "61", True),
    ("first-number-equals", "The answer is 61.", "61", True),
    ("first-number-equals", "34 + 27 = 61", "61", False),          # the first number is 34
    ("first-number-equals", "1,000 apples", "1000", True),
    ("first-number-equals", "It costs $12.50 today", "12.5", True),
    ("first-number-equals", "-7 degrees", "-7", True),
    ("first-number-equals", "7.0", "7", True),
    ("first-number-equals", "no digits here", "3", False),
    ("first-number-equals", "x2 = 5", "2", False),                   # part of a word
    ("last-number-equals", "34 + 27 = 61", "61", True),
    ("last-number-equals", "34 + 27 = 61.", "61", True),
    ("last-number-equals", "Sam has 2 + 8 = 10 apples", "10", True),
    ("last-number-equals", "We add 42 and 41:", "83", False),
    ("exact", "  Paris \n", "Paris", True),
    ("exact", "paris", "Paris", False),
    ("exact", "Paris.", "Paris", False),
    ("contains", "The capital of France is PARIS.", "Paris", True),
    ("contains", "The capital of France is Lyon.", "Paris", False),
    ("contains", "It is New Delhi.", "new delhi", True),
    ("regex", "The year was 1969.", r"\b19[0-9]{2}\b", True),
    ("regex", "The year was 2069.", r"\b19[0-9]{2}\b", False),
    ("multiple-choice", "B", "B", True),
    ("multiple-choice", "B) dog", "B", True),
    ("multiple-choice", "(C) cloud", "C", True),
    ("multiple-choice", "The answer is D.", "D", True),
    ("multiple-choice", "answer: b", "B", False),                    # lower case is not a letter
    ("multiple-choice", "A banana is a fruit, so C) banana", "C", True),
    ("multiple-choice", "A) horse", "B", False),
    ("multiple-choice", "I do not know", "A", False),
])
def test_scorers_on_hand_made_outputs(scorer, output, answer, ok):
    assert SCORERS[scorer].correct(output, answer) is ok


def test_number_extraction():
    assert numbers("1,234 and 5.50 and -3, then 007") == ["1234", "5.5", "-3", "7"]
    assert canonical_number(" 42.000 ") == "42"
    assert canonical_number("abc") is None
    assert canonical_number("nan") is None
    assert choice_letter("E.") == "E"
    assert choice_letter("Apples are red") is None


# ----------------------------------------------------------------------------
# Task files
# ----------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_own_format_and_gsm8k(tmp_path):
    own = write_jsonl(tmp_path / "own.jsonl", [
        {"id": "q1", "messages": [{"role": "user", "content": "2+2?"}], "answer": 4,
         "scorer": "first-number-equals", "source": "hand"},
        {"prompt": "Q: capital of Peru?\nA:", "answer": "Lima", "scorer": "contains",
         "stop": "\n", "max_tokens": 8, "family": "geo"},
        "",
    ])
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
        {"question": "Big numbers?", "answer": "work...\n#### 1,200"},
    ])
    items = load_tasks([own, gsm])
    assert [it.id for it in items] == ["q1", "own-2", "gsm8k-1", "gsm8k-2"]
    q1, peru, g1, g2 = items
    assert q1.answer == "4" and q1.meta == {"source": "hand"} and q1.family == "all"
    assert peru.prompt.startswith("Q:") and peru.stop == ("\n",) and peru.max_tokens == 8
    assert peru.family == "geo"
    assert g1.scorer == "last-number-equals" and g1.answer == "7" and g1.family == "gsm8k"
    assert g1.messages[-1]["content"].startswith("Tom has")
    assert g2.answer == "1200" and g2.is_correct("so 1200 in all")
    assert q1.is_correct("4") and not q1.is_correct("5")


@pytest.mark.parametrize("row,needle", [
    ({"answer": "1", "scorer": "exact"}, "exactly one of 'messages'"),
    ({"prompt": "x", "messages": [], "answer": "1", "scorer": "exact"}, "exactly one of"),
    ({"prompt": "x", "answer": "1"}, "no 'scorer'"),
    ({"prompt": "x", "answer": "1", "scorer": "fuzzy"}, "unknown scorer 'fuzzy'"),
    ({"prompt": "x", "answer": "one", "scorer": "first-number-equals"}, "is not a number"),
    ({"prompt": "x", "answer": "(", "scorer": "regex"}, "not a valid regular expression"),
    ({"prompt": "x", "answer": None, "scorer": "exact"}, "'answer' must be"),
    ({"messages": [{"role": "user"}], "answer": "1", "scorer": "exact"}, "'content'"),
    ({"prompt": "x", "answer": "1", "scorer": "exact", "max_tokens": 0}, "max_tokens"),
    ({"question": "q", "answer": "no hashes"}, "must end with '#### <number>'"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_task_lines_name_file_and_line(tmp_path, row, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1", "scorer": "exact"},
                                               row])
    with pytest.raises(TaskFileError) as ei:
        load_tasks([path])
    assert f"{path}:2" in str(ei.value) and needle in str(ei.value)


def test_duplicate_ids_and_default_scorer(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "p", "answer": "1"}])
    assert load_tasks([a], default_scorer="exact")[0].scorer == "exact"
    with pytest.raises(TaskFileError, match="appears twice"):
        load_tasks([a, a], default_scorer="exact")
    with pytest.raises(TaskFileError, match="no such file"):
        load_tasks([str(tmp_path / "missing.jsonl")])


def test_shipped_task_files_are_the_generators_and_disjoint():
    assert make_tasks.main(["--check"]) == 0
    dev, held = load_tasks(["dev"]), load_tasks(["heldout"])
    assert len(dev) >= 150 and len(held) >= 150
    assert not {it.question for it in dev} & {it.question for it in held}
    assert {it.family for it in dev} == {it.family for it in held}
    for it in dev + held:     # every answer is reachable by its scorer
        assert SCORERS[it.scorer].target(it.answer) is not None
    assert len(load_tasks(["tiny"])) == 6


# ----------------------------------------------------------------------------
# Intervals (values worked out by hand)
# ----------------------------------------------------------------------------
def test_mean_interval_known_values():
    # [1, 0, 1, 1]: mean 0.75, sample sd 0.5, se 0.25.
    iv = mean_interval([1, 0, 1, 1])
    assert iv.mean == 0.75 and math.isclose(iv.se, 0.25)
    assert math.isclose(iv.lo, 0.75 - Z95 * 0.25) and math.isclose(iv.hi, 0.75 + Z95 * 0.25)
    assert math.isclose(Z95, 1.959963984540054)
    one = mean_interval([0.3])
    assert (one.lo, one.hi, one.se) == (0.3, 0.3, 0.0)
    with pytest.raises(ValueError):
        mean_interval([])


def test_accuracy_averages_seeds_within_items_and_clips():
    # items: 2 of 2 right, 1 of 2, 0 of 2 -> per-item 1, 0.5, 0; mean 0.5;
    # sd = sqrt((0.25 + 0 + 0.25) / 2) = 0.5, se = 0.5 / sqrt(3).
    iv = accuracy_interval([[True, True], [True, False], [False, False]])
    assert math.isclose(iv.mean, 0.5) and math.isclose(iv.se, 0.5 / math.sqrt(3))
    assert iv.n == 3
    full = accuracy_interval([[True], [True], [True], [False]])   # 0.75 +- 1.96 * 0.25
    assert full.hi == 1.0 and math.isclose(full.lo, 0.75 - Z95 * 0.25)
    assert accuracy_interval([[True], [True]]).hi == 1.0      # clipped, zero spread


def test_paired_difference_known_values():
    a = [[True, True], [True, False], [False, False]]    # 1, .5, 0
    b = [[False], [True, False], [False]]                 # 0, .5, 0
    iv = paired_difference(a, b)
    # differences 1, 0, 0: mean 1/3, sd = sqrt(1/3), se = sqrt(1/3)/sqrt(3) = 1/3
    assert math.isclose(iv.mean, 1 / 3) and math.isclose(iv.se, 1 / 3)
    assert math.isclose(iv.lo, 1 / 3 - Z95 / 3) and iv.hi == min(1.0, 1 / 3 + Z95 / 3)
    same = paired_difference(a, a)
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference(a, b[:2])


def test_paired_interval_is_narrower_than_unpaired_when_items_vary():
    # Two samplers that agree on hard/easy items: pairing removes item variance.
    a = [[True]] * 10 + [[False]] * 10
    b = [[True]] * 9 + [[False]] * 11
    assert paired_difference(a, b).se < accuracy_interval(a).se


def test_majority_vote():
    assert majority(["7", "7", "8"], [True, True, False]) is True
    assert majority(["8", "7", "8"], [False, True, False]) is False
    assert majority(["8", "7"], [False, True]) is False          # tie: first seen wins
    assert majority(["7", "8"], [True, False]) is True
    assert majority([None, None, "7"], [False, False, True]) is True   # None never wins
    assert majority([None, None], [False, False]) is False
    assert majority(["8", "7", "7", "8", "9"], [False, True, True, False, False]) is False


# ----------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------
def test_builtin_and_cli_samplers():
    g = S.parse_cli("greedy")
    assert g.deterministic and g.request_fields(5, True) == {
        "temperature": 0.0, "vllm_xargs": {"entropix": False}}
    assert g.request_fields(5, False) == {"temperature": 0.0}
    t = S.parse_cli("t0.7-p0.9")
    assert t.request_fields(3, True) == {"seed": 3, "temperature": 0.7, "top_p": 0.9,
                                         "vllm_xargs": {"entropix": False}}
    e = S.parse_cli("mine:preset=smollm2-135m-instruct,high_ent_thresh=4,temperature=0.5")
    assert e.entropix and e.name == "mine"
    assert e.request_fields(9, True) == {"seed": 9, "vllm_xargs": {
        "entropix": True, "entropix_preset": "smollm2-135m-instruct",
        "entropix_high_ent_thresh": 4, "entropix_temperature": 0.5}}
    hot = S.parse_cli("hot:temperature=1.2,top_k=40")
    assert not hot.entropix and hot.stock == {"temperature": 1.2, "top_k": 40}
    with_body = S.build("rp", {"temperature": 1, "body": {"repetition_penalty": 1.1}})
    assert with_body.request_fields(1, False)["repetition_penalty"] == 1.1


@pytest.mark.parametrize("spec,needle", [
    ("nosuch", "not a built-in"),
    ("x:temperature", "expected key=value"),
    ("x:tempreature=1", "unknown key 'tempreature'"),
    ("x:entropix=false,high_ent_thresh=3", "Entropix keys on a sampler with entropix=false"),
    ("x:temperature=hot", "must be a number"),
    ("x:entropix=maybe", "true or false"),
])
def test_bad_sampler_specs(spec, needle):
    with pytest.raises(S.SamplerSpecError, match=needle):
        S.parse_cli(spec)


def test_sampler_file_and_unique_names(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"cold": {"temperature": 0.3},
                             "tuned": {"entropix": {"low_ent_thresh": 1.0}, "preset": "classic"}}))
    cold, tuned = S.load_file(str(f))
    assert cold.stock == {"temperature": 0.3}
    assert tuned.entropix and tuned.preset == "classic" and tuned.coefficients == {"low_ent_thresh": 1.0}
    lst = tmp_path / "l.json"
    lst.write_text(json.dumps([{"name": "greedy"}, {"name": "warm", "temperature": 0.9}]))
    names = [s.name for s in S.load_file(str(lst))]
    assert names == ["greedy", "warm"]
    with pytest.raises(S.SamplerSpecError, match="used twice"):
        S.unique([cold, cold])
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"x": {"entropix": {"nope": 1}}}))
    with pytest.raises(S.SamplerSpecError, match="entropix.nope"):
        S.load_file(str(bad))
