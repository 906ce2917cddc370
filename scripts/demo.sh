#!/usr/bin/env bash
# Set up, serve the bundled model with vLLM and the Entropix sampler
# (--sampler entropix; its preset is `auto`, the default: the preset made for
# the served model), then ask one question twice on that server: stock greedy
# (vLLM's own sampler, temperature 0) and Entropix. Prints both answers, the
# tokens where Entropix left the model's most likely token (and which branch
# chose them), the branch report of the Entropix answer (python -m
# entropix_vllm.report), and stops the server.
#
#   bash scripts/demo.sh                      # default question
#   PROMPT="Why is the sky blue?" bash scripts/demo.sh
#
# Environment: PROMPT, SEED (the Entropix request's seed, default 0: the same
# answer every run), MAX_TOKENS (default 96), PORT (default: a free port),
# WAIT_S (how long to wait for the server, default 900 s), VLLM_CPU_KVCACHE_SPACE
# (GiB, default 2), TRACE (the per-token trace file, default: a temporary file,
# removed at the end).
#
# The server runs without torch.compile (--compilation-config={"mode":0}): it
# starts in about 40 s on 2 cores instead of compiling for 2-3 minutes; this
# demo is about the answers, not serving speed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

T_START=$(date +%s)
bash scripts/setup.sh

VPY="$ROOT/.venv/bin/python"
MODEL=$("$VPY" -m entropix_vllm.bundled)
NAME=bundled
PROMPT=${PROMPT:-"Write a haiku about the sea."}
SEED=${SEED:-0}
MAX_TOKENS=${MAX_TOKENS:-96}
WAIT_S=${WAIT_S:-900}
PORT=${PORT:-$("$VPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

KEEP_TRACE=1
if [ -z "${TRACE:-}" ]; then
    TRACE=$(mktemp "${TMPDIR:-/tmp}/entropix-demo-trace.XXXXXX.jsonl")
    KEEP_TRACE=0
fi
ANSWER_TRACE=$(mktemp "${TMPDIR:-/tmp}/entropix-demo-answer.XXXXXX.jsonl")

# The vLLM serve flags, in one place. No preset is named: the engine's default,
# `auto`, picks the preset made for the served model (else classic) and logs why.
SERVE_FLAGS="--dtype float32 --max-model-len 4096 --served-model-name $NAME --host 127.0.0.1 --port $PORT"
SERVE_FLAGS="$SERVE_FLAGS --compilation-config={\"mode\":0}"
SERVE_FLAGS="$SERVE_FLAGS --sampler entropix --additional-config.entropix.trace_path=$TRACE"

export HF_HUB_OFFLINE=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export VLLM_USE_AOT_COMPILE=0

LOG=$(mktemp "${TMPDIR:-/tmp}/entropix-demo-serve.XXXXXX.log")
say() { printf '[demo] %s\n' "$*"; }

say "serving $MODEL"
say "vllm serve flags: $SERVE_FLAGS (log: $LOG)"
# Its own process group, so that stopping it stops its engine processes too.
# shellcheck disable=SC2086
setsid "$ROOT/.venv/bin/vllm" serve "$MODEL" $SERVE_FLAGS >"$LOG" 2>&1 </dev/null &
SERVER_PID=$!

stop_server() {
    local rc=$?
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        say "stopping the server (pid $SERVER_PID)"
        kill -INT -- "-$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    [ "$rc" -eq 0 ] && rm -f "$LOG"
    [ "$KEEP_TRACE" -eq 0 ] && rm -f "$TRACE"
    rm -f "$ANSWER_TRACE"
    [ "$rc" -eq 0 ] && say "done in $(( $(date +%s) - T_START )) s"
    exit "$rc"
}
trap stop_server EXIT
trap 'exit 130' INT TERM

fail() {
    say "ERROR: $*"
    say "last lines of the server log ($LOG):"
    tail -n 40 "$LOG" | sed 's/^/    /'
    exit 1
}

T0=$(date +%s)
say "waiting for http://127.0.0.1:$PORT/health (up to ${WAIT_S} s)"
until "$VPY" -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited during start-up"
    [ $(( $(date +%s) - T0 )) -ge "$WAIT_S" ] && fail "the server was not healthy after ${WAIT_S} s"
    sleep 2
done
say "server ready after $(( $(date +%s) - T0 )) s"

# The start-up line naming the engine's preset and why (written by the worker).
PRESET_LINE=$(grep -o 'Entropix preset .*' "$LOG" | head -n 1 || true)
[ -n "$PRESET_LINE" ] || fail "the server log names no Entropix preset"
PRESET=$(printf '%s\n' "$PRESET_LINE" | sed -E 's/^Entropix preset ([^ ]+) .*/\1/')
say "server log: $PRESET_LINE"

"$VPY" - "$PORT" "$NAME" "$PROMPT" "$MAX_TOKENS" "$SEED" "$PRESET" "$TRACE" "$ANSWER_TRACE" <<'EOF' || fail "the chat completion requests failed"
import json, sys, textwrap, time
from openai import OpenAI

port, name, prompt, max_tokens, seed, preset, trace, answer_trace = sys.argv[1:9]
max_tokens, seed = int(max_tokens), int(seed)
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)
messages = [{"role": "user", "content": prompt}]


def show(title, r, t):
    text = r.choices[0].message.content.strip()
    print(f"{title}: {r.usage.completion_tokens} tokens, {time.time() - t:.1f} s, "
          f"finish_reason={r.choices[0].finish_reason}")
    for line in text.splitlines() or [""]:
        print(textwrap.fill(line, 100, initial_indent="    ", subsequent_indent="    ") or "    ")
    print()
    if not text:
        sys.exit("empty answer")


# Both timed requests have the same shape. vLLM's first request with logprobs pays a
# one-off cost of a few seconds (stock rows too); a 1-token request takes it untimed.
LOGPROBS, IDS = dict(logprobs=True, top_logprobs=2), {"return_token_ids": True}
client.chat.completions.create(model=name, messages=messages, max_tokens=1, temperature=0,
                               extra_body=IDS, **LOGPROBS)

print(f"\nPrompt: {prompt}\n")
t = time.time()
greedy = client.chat.completions.create(
    model=name, messages=messages, max_tokens=max_tokens, temperature=0, **LOGPROBS,
    extra_body={**IDS, "vllm_xargs": {"entropix": False}})  # vLLM's own sampler, greedy
show("Stock greedy (vLLM's sampler, temperature 0)", greedy, t)

t = time.time()
ent = client.chat.completions.create(                          # the server's Entropix default
    model=name, messages=messages, max_tokens=max_tokens, seed=seed, extra_body=IDS, **LOGPROBS)
show(f"Entropix (preset {preset}, seed {seed})", ent, t)

# This answer's records in the trace (written by a background thread of the worker).
n = len(ent.choices[0].token_ids)
recs = []
for _ in range(60):
    with open(trace, encoding="utf-8") as f:
        recs = [json.loads(l) for l in f if l.strip()]
    recs = sorted((r for r in recs if r["request_id"].startswith(ent.id + "-")),
                  key=lambda r: r["index"])
    if len(recs) >= n:
        break
    time.sleep(0.5)
with open(answer_trace, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in recs)
if len(recs) != n:
    sys.exit(f"the trace holds {len(recs)} records of the Entropix answer, expected {n}")

# Where Entropix left the model's most likely token (vLLM lists the sampled token
# and the most likely ones: with two, the most likely is among them).
off = []
for i, (lp, rec) in enumerate(zip(ent.choices[0].logprobs.content, recs)):
    best = max(lp.top_logprobs, key=lambda x: x.logprob)
    if best.logprob > lp.logprob + 1e-6:
        off.append(f"    token {i}: {lp.token!r} instead of {best.token!r} ({rec['branch']} branch, "
                   f"entropy {rec['entropy']:.2f} bits, varentropy {rec['varentropy']:.2f})")
print(f"Entropix took the model's most likely token {n - len(off)} times out of {n}; "
      f"the others:" if off else f"Entropix took the model's most likely token at all {n} tokens.")
print("\n".join(off))
EOF

echo
say "branch report of the Entropix answer (python -m entropix_vllm.report TRACE --preset $PRESET):"
"$VPY" -m entropix_vllm.report "$ANSWER_TRACE" --preset "$PRESET" | sed 's/^/    /'
