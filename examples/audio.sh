#!/usr/bin/env bash
# The audio quickstart: find the speech in a folder of recordings with the real Silero VAD, and
# query the segments with SQL.
# Needs: cargo, and python3 with pip (to fetch ONNX Runtime and the model from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --quiet
ferry="${CARGO_TARGET_DIR:-target}/debug/ferry"

"$ferry" models fetch silero-vad           # -> models/silero-vad (silero_vad.onnx)
"$ferry" run pipelines/speech.yaml         # -> out/speech.parquet, a `speech` list per recording

echo "== speech segments =="
"$ferry" query "
  SELECT path, round(s['start'], 2) AS start_s, round(s['end'], 2) AS end_s
  FROM (SELECT path, unnest(speech) AS s FROM speech)
  ORDER BY path, start_s"

echo "== seconds of speech per recording =="
"$ferry" query "
  SELECT path, cardinality(speech) AS segments,
         round(coalesce(sum(s['end'] - s['start']), 0), 2) AS speech_s
  FROM speech LEFT JOIN (SELECT path AS p, unnest(speech) AS s FROM speech) ON p = path
  GROUP BY path, speech ORDER BY path"
