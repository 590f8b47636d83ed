#!/usr/bin/env bash
# The image quickstart: detect faces in a folder of photos with the real YOLOv8n (NudeNet),
# query the detections with SQL, and draw them.
# Needs: cargo, and python3 with pip (to fetch ONNX Runtime and the model from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --quiet
ferry="${CARGO_TARGET_DIR:-target}/debug/ferry"

"$ferry" models fetch yolov8n-nudenet     # -> models/yolov8n-nudenet (model.onnx, class names inside)
"$ferry" run pipelines/photos.yaml         # -> out/photos.parquet, a `detections` list per photo

echo "== faces found, best first =="
"$ferry" query "
  SELECT path, d['label'] AS label, round(d['score'], 3) AS score,
         CAST(d['box']['xmin'] AS INT) AS x, CAST(d['box']['ymin'] AS INT) AS y,
         CAST(d['box']['xmax'] - d['box']['xmin'] AS INT) AS width
  FROM (SELECT path, unnest(detections) AS d FROM photos)
  ORDER BY score DESC"

echo "== photos without a face =="
"$ferry" query "SELECT path FROM photos WHERE cardinality(detections) = 0 ORDER BY path"

# Boxes, labels and scores drawn on each photo -> out/render/<photo>.png
"$ferry" render "SELECT path, detections FROM photos" --result detections --name path --out out/render
