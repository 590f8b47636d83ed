#!/usr/bin/env bash
# The quickstart as a stream: a local Kafka-compatible broker, the 240 example texts published
# to a topic, ferry consuming and embedding them into rolling Parquet files, then SQL over them.
# Needs what examples/quickstart.sh needs (cargo, python3 with pip); the broker (tansu) comes
# from PyPI too.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --quiet
ferry="${CARGO_TARGET_DIR:-target}/debug/ferry"
"$ferry" models fetch minilm

"$ferry" dev-broker --port 19092 &   # in memory; stopped when this script exits
broker=$!
trap 'kill $broker 2>/dev/null; wait $broker 2>/dev/null' EXIT
sleep 1

"$ferry" run pipelines/texts-to-kafka.yaml                  # 240 records -> topic `texts`
"$ferry" run pipelines/stream-embed.yaml --until-idle 5s    # a stream; bounded here for the demo

echo "== rows per partition, from the rolled files =="
"$ferry" query "SELECT _partition, count(*) AS rows, min(_offset) AS first, max(_offset) AS last
                FROM stream_embed GROUP BY _partition ORDER BY _partition"
echo "== nearest to a free query =="
"$ferry" query "
  SELECT id, topic, text, round(cosine_similarity(embedding, minilm('trouble in outer space')), 3) AS similarity
  FROM stream_embed ORDER BY similarity DESC LIMIT 3"
