#!/usr/bin/env bash
# The cluster path's cost on one machine: the same embedding job run locally, on a Ballista
# cluster of one executor, and of two executors (all on 127.0.0.1), and a small job's overhead.
#
#   benches/cluster.sh [ROWS]     (default 20000 texts; real minilm from models/minilm)
#
# FERRY: the binary (default target/release/ferry, built if missing). Each executor gets the
# machine's cores as slots divided by the executors, so one and two executors use the same CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROWS=${1:-20000}
FERRY=${FERRY:-$ROOT/target/release/ferry}
WORK=${WORK:-$ROOT/target/bench-cluster}
[ -x "$FERRY" ] || cargo build --release --locked
[ -d models/minilm ] || "$FERRY" models fetch minilm --dir models >/dev/null
mkdir -p "$WORK/in" "$WORK/operators"
cp operators/minilm.yaml "$WORK/operators/"
sed -i "s|model: ../models/minilm|model: $ROOT/models/minilm|" "$WORK/operators/minilm.yaml"

if [ ! -f "$WORK/in/rows" ] || [ "$(cat "$WORK/in/rows")" != "$ROWS" ]; then
  python3 benches/make_bench_texts.py "$WORK/texts.jsonl" "$ROWS" >/dev/null 2>&1
  rm -f "$WORK"/in/*.parquet
  # Four files, so a cluster has partitions to spread.
  for f in 0 1 2 3; do
    "$FERRY" query "SELECT id, text FROM t WHERE id % 4 = $f" --table "t=$WORK/texts.jsonl" \
      --output "$WORK/in/part-$f.parquet" >/dev/null
  done
  echo "$ROWS" >"$WORK/in/rows"
  "$FERRY" query "SELECT * FROM t WHERE id < 200" --table "t=$WORK/texts.jsonl" \
    --output "$WORK/small.parquet" >/dev/null
fi

pipeline() { # NAME SOURCE OUT
  printf 'name: %s\nsource:\n  parquet:\n    path: %s\nsteps:\n  - operator: minilm\n    inputs: [text]\n    output: embedding\nsink:\n  parquet:\n    path: %s\n' \
    "$1" "$2" "$3" >"$WORK/$1.yaml"
  echo "$WORK/$1.yaml"
}
seconds() { # COMMAND...: wall seconds
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null 2>&1
  end=$(date +%s.%N)
  awk -v a="$start" -v b="$end" 'BEGIN {print b - a}' 
}

BIG=$(pipeline big "$WORK/in" "$WORK/out-big.parquet")
SMALL=$(pipeline small "$WORK/small.parquet" "$WORK/out-small.parquet")
local_big=$(seconds "$FERRY" --operators "$WORK/operators" run -q "$BIG")
local_small=$(seconds "$FERRY" --operators "$WORK/operators" run -q "$SMALL")
calc() { awk "BEGIN {print $1}"; }
printf 'local:        %6.0f rows/s; small job (200 rows) %.2f s\n' \
  "$(calc "$ROWS / $local_big")" "$local_small"

CORES=$(nproc)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
for n in 1 2; do
  cleanup
  PIDS=()
  port=$((51000 + n * 100))
  "$FERRY" --operators "$WORK/operators" scheduler --bind "127.0.0.1:$port" 2>"$WORK/scheduler.log" &
  PIDS+=($!)
  sleep 2
  for i in $(seq 1 "$n"); do
    mkdir -p "$WORK/work-$i"
    "$FERRY" --operators "$WORK/operators" executor --scheduler "127.0.0.1:$port" \
      --port $((port + 10 * i)) --slots $(((CORES + n - 1) / n)) --work-dir "$WORK/work-$i" \
      2>"$WORK/executor-$i.log" &
    PIDS+=($!)
  done
  sleep 3
  big=$(seconds "$FERRY" --operators "$WORK/operators" run -q "$BIG" --cluster "df://127.0.0.1:$port")
  small=$(seconds "$FERRY" --operators "$WORK/operators" run -q "$SMALL" --cluster "df://127.0.0.1:$port")
  printf '%d executor(s): %6.0f rows/s (%.2fx local); small job %.2f s (+%.2f s)\n' "$n" \
    "$(calc "$ROWS / $big")" "$(calc "$local_big / $big")" "$small" \
    "$(calc "$small - $local_small")"
done
