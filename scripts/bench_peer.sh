#!/usr/bin/env bash
# Ember beside llama.cpp's OpenAI server, on the same SmolLM2 weights and the same
# workload (`ember bench serve --dataset mixed`: prompts of 20-120 words, 80% of
# outputs 8-32 tokens and 20% 120-240, greedy, end tokens banned by logit_bias so
# both servers produce the asked lengths; llama.cpp's default repeat penalty off, so
# both compute the same greedy tokens), at 80% of llama.cpp's measured serial
# throughput (it serves one request at a time; later ones queue).
#
# llama.cpp is not a dependency of Ember: install llama-cpp-python[server] into its
# own environment first (it compiles llama.cpp, about ten minutes here):
#   python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install 'llama-cpp-python[server]'
# then, with Ember's venv active: scripts/bench_peer.sh
# Settings (environment): LLAMA_PY (.venv-llamacpp/bin/python), N (requests per run,
# 100), LOAD (0.8), OUT (results/peer), VARIANTS ("f32 q4_1").
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_PY=${LLAMA_PY:-.venv-llamacpp/bin/python}
N=${N:-100}
LOAD=${LOAD:-0.8}
OUT=${OUT:-results/peer}
VARIANTS=${VARIANTS:-"f32 q4_1"}
THREADS=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
COMMON=(--dataset mixed --seed 0 --no-ignore-eos --logit-bias "0:-100,2:-100" --json)
LLAMA_ARGS=(--model smollm2 --extra-body '{"repeat_penalty": 1.0}')
mkdir -p "$OUT"
"$LLAMA_PY" -c "import llama_cpp.server" 2>/dev/null || {
  echo "error: $LLAMA_PY has no llama_cpp.server: see the top of $0" >&2; exit 1; }

free_port() { python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
wait_up() {  # $1: url, $2: pid
  for _ in $(seq 600); do
    curl -sf "$1/v1/models" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "error: the server at $1 exited" >&2; return 1; }
    sleep 0.5
  done
  echo "error: the server at $1 did not come up" >&2; return 1
}
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

gguf_of() {
  if [ "$1" = q4_1 ]; then python -c "from ember.store.importer import default_model_source as s; print(s())"
  else
    [ -f "$OUT/smollm2-f32.gguf" ] || python -m ember.bench.gguf_f32 "$OUT/smollm2-f32.gguf" >&2
    echo "$OUT/smollm2-f32.gguf"
  fi
}

# Ember: the default model under its own name, every default setting.
EMBER_PORT=$(free_port)
ember serve --port "$EMBER_PORT" >"$OUT/ember.log" 2>&1 & PIDS+=($!)
wait_up "http://127.0.0.1:$EMBER_PORT" "${PIDS[-1]}"
EMBER_MODEL=$(curl -s "http://127.0.0.1:$EMBER_PORT/v1/models" | python -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")

for v in $VARIANTS; do
  port=$(free_port)
  "$LLAMA_PY" -m llama_cpp.server --model "$(gguf_of "$v")" --model_alias smollm2 --host 127.0.0.1 \
    --port "$port" --n_ctx 2048 --n_threads "$THREADS" --n_threads_batch "$THREADS" \
    --interrupt_requests False >"$OUT/llamacpp-$v.log" 2>&1 & PIDS+=($!)
  url="http://127.0.0.1:$port"
  wait_up "$url" "${PIDS[-1]}"
  # Serial throughput: one request at a time, all queued at once.
  ember bench serve --base-url "$url" "${LLAMA_ARGS[@]}" "${COMMON[@]}" --num-prompts 20 \
    --request-rate inf --max-concurrency 1 >"$OUT/capacity-$v.json"
  rate=$(python -c "import json; print(round(json.load(open('$OUT/capacity-$v.json'))['request_throughput'] * $LOAD, 4))")
  echo "$rate" >"$OUT/rate-$v"
  echo "llama.cpp $v: serial throughput x $LOAD = $rate req/s" >&2
  ember bench serve --base-url "$url" "${LLAMA_ARGS[@]}" "${COMMON[@]}" --num-prompts "$N" \
    --request-rate "$rate" >"$OUT/llamacpp-$v.json"
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
  ember bench serve --base-url "http://127.0.0.1:$EMBER_PORT" --model "$EMBER_MODEL" "${COMMON[@]}" \
    --num-prompts "$N" --request-rate "$rate" >"$OUT/ember-at-$v-rate.json"
done

python - "$OUT" $VARIANTS <<'PY'
import json, sys
out, variants = sys.argv[1], sys.argv[2:]
print("| server | rate req/s | mean E2E s | P50 E2E s | P99 E2E s | mean TTFT s | P99 TTFT s | output tok | failed |")
print("|---|---|---|---|---|---|---|---|---|")
for v in variants:
    rate = float(open(f"{out}/rate-{v}").read())
    for label, name in ((f"llama.cpp {v}", f"llamacpp-{v}"), ("Ember float32", f"ember-at-{v}-rate")):
        r = json.load(open(f"{out}/{name}.json"))
        s = {k: r[f"{k}_ms"] / 1e3 for k in ("mean_e2el", "median_e2el", "p99_e2el", "mean_ttft", "p99_ttft")}
        print(f"| {label} | {rate:.3f} | {s['mean_e2el']:.2f} | {s['median_e2el']:.2f} | {s['p99_e2el']:.2f} "
              f"| {s['mean_ttft']:.2f} | {s['p99_ttft']:.2f} | {r['total_output_tokens']} | {r['failed']} |")
PY
