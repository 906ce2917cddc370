#!/usr/bin/env bash
# Set up, serve the bundled model with vLLM and the Entropix sampler
# (--sampler entropix), ask it one question, print the answer and which Entropix
# branch chose each token (from the per-token trace), stop the server.
#
#   bash scripts/demo.sh                      # default question
#   PROMPT="Why is the sky blue?" bash scripts/demo.sh
#
# Environment: PORT (default: a free port), PROMPT, MAX_TOKENS (default 96),
# WAIT_S (how long to wait for the server, default 900 s: the first start on a
# machine compiles the model, about 2-3 minutes on 2 cores; later starts reuse
# vLLM's compile cache), VLLM_CPU_KVCACHE_SPACE (GiB, default 2), TRACE (the
# per-token trace file, default: a temporary file, removed at the end).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash scripts/setup.sh

VPY="$ROOT/.venv/bin/python"
MODEL=$("$VPY" -m entropix_vllm.bundled)
NAME=bundled
PROMPT=${PROMPT:-"What is the capital of France?"}
MAX_TOKENS=${MAX_TOKENS:-96}
WAIT_S=${WAIT_S:-900}
PORT=${PORT:-$("$VPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

KEEP_TRACE=1
if [ -z "${TRACE:-}" ]; then
    TRACE=$(mktemp "${TMPDIR:-/tmp}/entropix-demo-trace.XXXXXX.jsonl")
    KEEP_TRACE=0
fi

# The vLLM serve flags, in one place.
SERVE_FLAGS="--dtype float32 --max-model-len 4096 --served-model-name $NAME --host 127.0.0.1 --port $PORT"
SERVE_FLAGS="$SERVE_FLAGS --sampler entropix --additional-config.entropix.trace_path=$TRACE"

export HF_HUB_OFFLINE=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}

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
say "waiting for http://127.0.0.1:$PORT/health (up to ${WAIT_S} s; the first start compiles the model)"
until "$VPY" -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited during start-up"
    [ $(( $(date +%s) - T0 )) -ge "$WAIT_S" ] && fail "the server was not healthy after ${WAIT_S} s"
    sleep 2
done
say "server ready after $(( $(date +%s) - T0 )) s"

"$VPY" - "$PORT" "$NAME" "$PROMPT" "$MAX_TOKENS" <<'EOF' || fail "the chat completion request failed"
import sys, time
from openai import OpenAI

port, name, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)
t = time.time()
r = client.chat.completions.create(model=name, max_tokens=max_tokens,
                                   messages=[{"role": "user", "content": prompt}])
answer = r.choices[0].message.content
print(f"\nPrompt: {prompt}\nAnswer: {answer.strip()}\n")
print(f"[demo] {r.usage.completion_tokens} tokens in {time.time() - t:.1f} s "
      f"(finish_reason={r.choices[0].finish_reason})")
if not answer.strip():
    sys.exit("empty answer")
EOF

# The trace is written by a background thread of the worker: give it a moment.
for _ in $(seq 1 20); do [ -s "$TRACE" ] && break; sleep 0.5; done
say "which Entropix branch chose each token (python -m entropix_vllm.report TRACE):"
"$VPY" -m entropix_vllm.report "$TRACE" | sed 's/^/    /'
