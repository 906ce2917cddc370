"""The per-token trace (entropix_vllm.trace) and its report CLI (entropix_vllm.report).

Real files, real threads and processes, the CLI as a subprocess; no mocks.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import zlib
from collections import Counter

import pytest
import torch

from entropix_vllm import report
from entropix_vllm.config import EntropixConfig
from entropix_vllm.reference import BRANCH_NAMES, select_branch
from entropix_vllm.report.reader import TraceFormatError, read_trace, recompute_branches
from entropix_vllm.trace import RECORD_FIELDS, TENSOR_FIELDS, TraceWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULTS = EntropixConfig()
THRESHOLDS = {k: getattr(DEFAULTS, k) for k in
              ("low_ent_thresh", "med_ent_thresh", "high_ent_thresh",
               "low_vent_thresh", "high_vent_thresh")}


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def make_batch(B: int, seed: int, ent=None, vent=None) -> dict:
    """A ``[B]`` tensor per trace field; float32 values of widely varying
    magnitude; branch codes from SPEC section 3 on the float32 entropy figures."""
    g = torch.Generator().manual_seed(seed)

    def spread():
        mag = torch.empty(B, dtype=torch.float64).uniform_(-8, 2, generator=g)
        return (torch.rand(B, generator=g, dtype=torch.float64) * 10.0 ** mag).float()

    ent = torch.rand(B, generator=g) * 7 if ent is None else torch.tensor(ent, dtype=torch.float32)
    vent = spread() * 20 if vent is None else torch.tensor(vent, dtype=torch.float32)
    branch = select_branch(ent.double(), vent.double(), THRESHOLDS)
    return {
        "token_id": torch.randint(0, 150_000, (B,), generator=g),
        "entropy": ent, "varentropy": vent,
        "attn_entropy": spread(), "attn_varentropy": spread(),
        "agreement": torch.rand(B, generator=g), "interaction_strength": spread(),
        "branch": branch, "temperature": torch.rand(B, generator=g) * 2,
        "top_k": torch.randint(1, 101, (B,), generator=g, dtype=torch.int32),
        "top_p": torch.rand(B, generator=g), "min_p": torch.rand(B, generator=g) * 0.5,
    }


def expected_records(request_ids, indices, tensors, rows=None) -> list[dict]:
    rows = range(tensors["entropy"].shape[0]) if rows is None else rows
    out = []
    for rid, idx, r in zip(request_ids, indices, rows):
        rec = {"request_id": rid, "index": idx}
        for name in TENSOR_FIELDS:
            v = tensors[name][r].item()
            rec[name] = BRANCH_NAMES[v] if name == "branch" else v
        out.append(rec)
    return out


def multiset(records) -> Counter:
    return Counter(json.dumps(r, sort_keys=True) for r in records)


def parse_lines(path) -> list[dict]:
    """Every line of the file must be a complete JSON object ending in a newline."""
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("utf-8").split("\n")[:-1]]


def write_batches(path: str, tag: str, n_batches: int, B: int, writer=None) -> list[dict]:
    """Submit ``n_batches`` batches through ``writer`` (or a new one on ``path``)."""
    own = writer is None
    w = TraceWriter(path) if own else writer
    expected = []
    for i in range(n_batches):
        t = make_batch(B, seed=zlib.crc32(f"{tag}-{i}".encode()))
        ids = [f"{tag}-{i}-{b % 3}" for b in range(B)]
        idx = [i * B + b for b in range(B)]
        w.submit(ids, idx, t)
        expected += expected_records(ids, idx, t)
    if own:
        w.close()
    return expected


def _process_worker(path: str, tag: str, n_batches: int, B: int, queue) -> None:
    queue.put(write_batches(path, tag, n_batches, B))


# ----------------------------------------------------------------------------
# TraceWriter
# ----------------------------------------------------------------------------
def test_record_format_and_exact_floats(tmp_path):
    B = 64
    t = make_batch(B, seed=1)
    special = torch.tensor([0.0, 1e-45, 1.17e-38, 3.4e38, 0.1, 1 / 3, 5.0, -0.0])
    t["attn_varentropy"][: len(special)] = special
    ids, idx = [f"req{b}" for b in range(B)], list(range(100, 100 + B))
    path = tmp_path / "sub" / "dir" / "trace.jsonl"  # parent directories are created
    with TraceWriter(str(path)) as w:
        w.submit(ids, idx, t)
    assert w.flush(timeout=1.0)

    lines = path.read_text().splitlines()
    assert len(lines) == B
    recs = [json.loads(line) for line in lines]
    for b, rec in enumerate(recs):
        assert list(rec) == list(RECORD_FIELDS)  # key order
        assert rec["request_id"] == ids[b] and rec["index"] == idx[b]
        for name in ("index", "token_id", "top_k"):
            assert type(rec[name]) is int
        assert rec["token_id"] == t["token_id"][b].item() and rec["top_k"] == t["top_k"][b].item()
        assert rec["branch"] == BRANCH_NAMES[t["branch"][b].item()]
        for name in TENSOR_FIELDS:
            if name in ("token_id", "top_k", "branch"):
                continue
            assert type(rec[name]) is float
            # exact: the float64 value of the float32 input, bit for bit
            assert rec[name] == t[name][b].item(), (name, b)
            assert torch.tensor(rec[name], dtype=torch.float32).item() == t[name][b].item()
    assert math.copysign(1.0, recs[7]["attn_varentropy"]) == -1.0  # -0.0 survives
    assert read_trace(str(path)) == recs


def test_rows_selection(tmp_path):
    t = make_batch(8, seed=2)
    rows = [5, 0, 3]
    ids, idx = ["a", "b", "c"], [7, 0, 2]
    path = str(tmp_path / "t.jsonl")
    w = TraceWriter(path)
    w.submit(ids, idx, t, rows=rows)
    w.submit([], [], t, rows=[])  # nothing selected: nothing written
    with pytest.raises(ValueError, match="3 rows selected but 2 request ids"):
        w.submit(["a", "b"], [0, 1], t, rows=rows)
    with pytest.raises(ValueError, match="missing tensors"):
        w.submit(["a"], [0], {k: v for k, v in t.items() if k != "min_p"}, rows=[0])
    w.close()
    assert read_trace(path) == expected_records(ids, idx, t, rows)


def test_branch_names(tmp_path):
    t = make_batch(6, seed=3)
    t["branch"] = torch.tensor([0, 1, 2, 3, 4, 2], dtype=torch.int32)
    path = str(tmp_path / "t.jsonl")
    with TraceWriter(path) as w:
        w.submit(list("abcdef"), list(range(6)), t)
    assert [r["branch"] for r in read_trace(path)] == [
        "argmax", "insert_cot", "explore", "resample", "adaptive", "explore"]


def test_four_threads_one_writer(tmp_path):
    path = str(tmp_path / "t.jsonl")
    w = TraceWriter(path)
    results = [None] * 4

    def work(k):
        results[k] = write_batches(path, f"t{k}", n_batches=40, B=8, writer=w)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert w.flush(timeout=30)
    got = parse_lines(path)
    w.close()
    assert multiset(got) == multiset(sum(results, []))
    assert len(got) == 4 * 40 * 8


def test_four_threads_own_writers_one_file(tmp_path):
    path = str(tmp_path / "t.jsonl")
    results = [None] * 4

    def work(k):
        results[k] = write_batches(path, f"w{k}", n_batches=40, B=8)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert multiset(parse_lines(path)) == multiset(sum(results, []))


def test_two_processes_and_parent_one_file(tmp_path):
    path = str(tmp_path / "shared" / "t.jsonl")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(path, f"p{k}", 60, 16, q))
             for k in range(2)]
    for p in procs:
        p.start()
    expected = write_batches(path, "parent", 60, 16)  # concurrently with the children
    for _ in procs:
        expected += q.get(timeout=60)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    got = parse_lines(path)
    assert len(got) == 3 * 60 * 16
    assert multiset(got) == multiset(expected)


def test_flush_close_and_submit_after_close(tmp_path, caplog):
    path = str(tmp_path / "t.jsonl")
    w = TraceWriter(path)
    assert w.flush(timeout=0.5)  # nothing pending
    t = make_batch(4, seed=4)
    w.submit(list("abcd"), [0, 1, 2, 3], t)
    w.close()
    w.close()  # idempotent
    with caplog.at_level(logging.ERROR, logger="entropix_vllm"):
        w.submit(list("abcd"), [0, 1, 2, 3], t)  # logged, not raised
    assert "after close" in caplog.text
    assert len(read_trace(path)) == 4


def test_unwritable_path_raises_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = str(blocker / "trace.jsonl")  # parent is a regular file
    with pytest.raises(OSError, match="trace.jsonl"):
        TraceWriter(bad)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_write_errors_logged_once_never_raised(caplog):
    w = TraceWriter("/dev/full")  # every write fails with ENOSPC
    t = make_batch(4, seed=5)
    with caplog.at_level(logging.ERROR, logger="entropix_vllm"):
        for i in range(3):
            w.submit(list("abcd"), [i] * 4, t)
        assert w.flush(timeout=10)
        w.close()
    errors = [r for r in caplog.records if r.name == "entropix_vllm" and r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "/dev/full" in errors[0].getMessage()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_submit_does_not_synchronise(tmp_path):
    t = {k: v.cuda() for k, v in make_batch(32, seed=6).items()}
    rows = [31, 2, 7, 0]
    path = str(tmp_path / "t.jsonl")
    w = TraceWriter(path)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        w.submit(["a", "b", "c", "d"], [0, 1, 2, 3], t, rows=rows)
        w.submit([f"x{b}" for b in range(32)], list(range(32)), t)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    w.close()
    cpu = {k: v.cpu() for k, v in t.items()}
    want = (expected_records(["a", "b", "c", "d"], [0, 1, 2, 3], cpu, rows)
            + expected_records([f"x{b}" for b in range(32)], list(range(32)), cpu))
    assert read_trace(path) == want


# ----------------------------------------------------------------------------
# read_trace / recompute_branches
# ----------------------------------------------------------------------------
def rec(ent, vent, rid="r", branch="adaptive"):
    return {"request_id": rid, "index": 0, "entropy": ent, "varentropy": vent, "branch": branch}


up, down = (lambda x: math.nextafter(x, math.inf)), (lambda x: math.nextafter(x, -math.inf))

# (entropy, varentropy, SPEC section 3 branch with the default thresholds)
THRESHOLD_CASES = [
    (down(0.1), down(0.1), "argmax"),
    (0.1, 0.05, "adaptive"),            # entropy exactly 0.1 is not < 0.1
    (0.05, 0.1, "adaptive"),            # varentropy exactly 0.1 is not < 0.1
    (0.0, 0.0, "argmax"),
    (5.0, 0.05, "adaptive"),            # entropy exactly 5.0 is not > 5.0
    (up(5.0), down(0.1), "insert_cot"),
    (up(5.0), 0.1, "adaptive"),
    (down(5.0), 5.0, "adaptive"),       # varentropy exactly 5.0 is not > 5.0
    (down(5.0), up(5.0), "explore"),
    (0.05, up(5.0), "explore"),          # low entropy, high varentropy: explore, not argmax
    (3.0, 6.0, "explore"),              # explore is checked before resample
    (up(3.0), 6.0, "explore"),
    (5.0, up(5.0), "resample"),         # ent not < 5, ent > 3, vent > 5
    (7.0, 40.0, "resample"),
    (3.0, 5.0, "adaptive"),
    (2.0, 1.0, "adaptive"),
    (float("nan"), 0.0, "adaptive"),
]


def test_recompute_branches_at_thresholds():
    records = [rec(e, v) for e, v, _ in THRESHOLD_CASES]
    want = [b for _, _, b in THRESHOLD_CASES]
    assert recompute_branches(records) == want
    assert recompute_branches(records, EntropixConfig()) == want
    assert recompute_branches([]) == []


def test_recompute_branches_per_request_config():
    wide = DEFAULTS.replace({"low_ent_thresh": 0.2, "high_vent_thresh": 8.0})
    records = [rec(0.15, 0.05, "a"), rec(0.15, 0.05, "b"), rec(1.0, 6.0, "a"), rec(1.0, 6.0, "b")]
    configs = {"a": DEFAULTS, "b": wide}
    assert recompute_branches(records, configs) == ["adaptive", "argmax", "explore", "adaptive"]
    assert recompute_branches(records, wide) == ["argmax", "argmax", "adaptive", "adaptive"]
    with pytest.raises(KeyError, match="'b'"):
        recompute_branches(records, {"a": DEFAULTS})
    assert recompute_branches(records, {"a": DEFAULTS}, default=wide) == \
        ["adaptive", "argmax", "explore", "adaptive"]


def test_traced_branches_agree_with_recomputation(tmp_path):
    path = str(tmp_path / "t.jsonl")
    ent = [c[0] for c in THRESHOLD_CASES if not math.isnan(c[0])]
    vent = [c[1] for c in THRESHOLD_CASES if not math.isnan(c[0])]
    expected = write_batches(path, "x", 5, 40)
    t = make_batch(len(ent), seed=7, ent=ent, vent=vent)
    with TraceWriter(path) as w:
        w.submit(["edge"] * len(ent), list(range(len(ent))), t)
    records = read_trace(path)
    assert len(records) == len(expected) + len(ent)
    assert [r["branch"] for r in records] == recompute_branches(records)


def test_read_trace_errors(tmp_path):
    good = json.dumps(expected_records(["a"], [0], make_batch(1, seed=8))[0])
    p = tmp_path / "t.jsonl"
    p.write_text(good + "\n\n" + good + "\n{not json\n")
    with pytest.raises(TraceFormatError, match="line 4"):
        read_trace(str(p))
    p.write_text(good + "\n" + json.dumps({"request_id": "a"}) + "\n")
    with pytest.raises(TraceFormatError, match="line 2: missing keys"):
        read_trace(str(p))
    p.write_text("[1, 2]\n")
    with pytest.raises(TraceFormatError, match="line 1: not a JSON object"):
        read_trace(str(p))
    with pytest.raises(FileNotFoundError):
        read_trace(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------
# report CLI
# ----------------------------------------------------------------------------
# Branch counts of the generated trace (insert_cot deliberately absent).
CLI_COUNTS = {"argmax": 3, "insert_cot": 0, "explore": 4, "resample": 2, "adaptive": 5}
CLI_POINTS = {"argmax": (0.05, 0.01), "explore": (1.0, 6.0), "resample": (6.0, 9.0),
              "adaptive": (2.0, 1.0)}


def make_cli_trace(path: str) -> list[dict]:
    ent, vent, ids = [], [], []
    for name, n in CLI_COUNTS.items():
        for i in range(n):
            e, v = CLI_POINTS[name]
            ent.append(e)
            vent.append(v)
            ids.append(f"req{i % 2}")
    t = make_batch(len(ent), seed=9, ent=ent, vent=vent)
    with TraceWriter(path) as w:
        w.submit(ids, list(range(len(ent))), t)
    return read_trace(path)


def run_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "entropix_vllm.report", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every CLI subprocess, started together (each pays the torch import)."""
    d = tmp_path_factory.mktemp("cli")
    trace = str(d / "trace.jsonl")
    make_cli_trace(trace)
    bad = d / "bad.jsonl"
    lines = open(trace).read().splitlines()
    bad.write_text("\n".join(lines[:4] + ['{"request_id": "x", "index": 1,'] + lines[4:]) + "\n")
    png = str(d / "plane.png")
    procs = {
        "ok": run_cli(trace, "--plot", png),
        "bad_key": run_cli(trace, "--set", "low_ent_thres=0.2"),
        "malformed": run_cli(str(bad)),
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[name] = (p.returncode, stdout, stderr)
    out["png"] = png
    out["trace"] = trace
    return out


def branch_table(stdout: str) -> dict:
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in BRANCH_NAMES:
            rows[parts[0]] = (int(parts[1]), float(parts[2].rstrip("%")))
    return rows


def test_cli_counts_and_plot(cli_runs):
    rc, stdout, stderr = cli_runs["ok"]
    assert rc == 0, stderr
    total = sum(CLI_COUNTS.values())
    table = branch_table(stdout)
    assert list(table) == list(BRANCH_NAMES)  # all five, zeros included
    for name, n in CLI_COUNTS.items():
        assert table[name][0] == n
        assert table[name][1] == pytest.approx(100.0 * n / total, abs=0.01)
    assert "requests: 2" in stdout and f"tokens: {total}" in stdout
    assert "disagreements with the recomputed branch: 0" in stdout
    with open(cli_runs["png"], "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000


def test_cli_bad_set_key(cli_runs):
    rc, stdout, stderr = cli_runs["bad_key"]
    assert rc == 2
    assert "low_ent_thres" in stderr and "unknown" in stderr
    assert "Traceback" not in stderr


def test_cli_malformed_line(cli_runs):
    rc, stdout, stderr = cli_runs["malformed"]
    assert rc == 2
    assert "line 5" in stderr and "Traceback" not in stderr


def test_report_main_in_process(cli_runs, tmp_path, capsys):
    trace = cli_runs["trace"]
    # --set changes the recomputation: with low_ent_thresh=0.01 the argmax rows disagree.
    assert report.main([trace, "--set", "low_ent_thresh=0.01"]) == 0
    out = capsys.readouterr().out
    assert f"disagreements with the recomputed branch: {CLI_COUNTS['argmax']}" in out
    assert "low_ent_thresh=0.01" in out

    cases = [
        ([trace, "--set", "low_ent_thresh=abc"], "low_ent_thresh"),
        ([trace, "--set", "low_ent_thresh=-1"], "low_ent_thresh"),
        ([trace, "--set", "low_ent_thresh"], "name=value"),
        ([str(tmp_path / "missing.jsonl")], "not found"),
    ]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases.append(([str(empty)], "empty"))
    for argv, needle in cases:
        assert report.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err, (argv, err)


def test_format_is_what_json_writes():
    """The column-wise formatter gives, byte for byte, ``json.dumps`` of each
    record (the reference), for awkward ids and every kind of float."""
    from entropix_vllm.trace import format_records

    rng = random.Random(5)
    values = [0.0, -0.0, 1e-45, 1.17e-38, 3.4e38, 0.1, 1 / 3, 5.0, 2.0 ** 60, math.nan,
              math.inf, -math.inf, -7.25]
    ids = ['plain', 'quo"te', 'back\\slash', 'tab\there', 'ünï©ødé', 'nl\nx', '', 'cmpl-9']
    n = len(ids)
    columns = []
    for name in TENSOR_FIELDS:
        if name == "branch":
            columns.append([float(rng.choice([0, 1, 2, 3, 4, 7, math.nan])) for _ in range(n)])
        elif name in ("token_id", "top_k"):
            columns.append([float(rng.choice([0, 1, 49151, 128255, math.nan])) for _ in range(n)])
        else:
            columns.append([rng.choice(values) for _ in range(n)])
    idx = [rng.randrange(0, 10 ** 6) for _ in range(n)]
    expected = []
    for r in range(n):
        rec = {"request_id": ids[r], "index": idx[r]}
        for name, col in zip(TENSOR_FIELDS, columns):
            v = col[r]
            if name == "branch":
                ok = math.isfinite(v) and 0 <= v < len(BRANCH_NAMES)
                rec[name] = BRANCH_NAMES[int(v)] if ok else f"code{v:g}"
            elif name in ("token_id", "top_k"):
                rec[name] = int(v) if math.isfinite(v) else v
            else:
                rec[name] = v
        expected.append(json.dumps(rec, separators=(",", ":")) + "\n")
    assert format_records(ids, idx, columns) == "".join(expected)
