"""An int8 copy of an optimum Whisper export for `cargo bench --bench audio`: ONNX Runtime's
dynamic quantization (int8 weights of MatMul and Gemm, activations quantized per call, as
CTranslate2's `int8` compute type does) of encoder_model.onnx, decoder_model.onnx and
decoder_with_past_model.onnx (the merged decoder is left out: its If subgraphs are not
quantized), and the JSON files as they are.

    python benches/quantize_whisper.py EXPORT_DIR OUT_DIR
"""

import shutil
import sys
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".json" or f.name in ("merges.txt", "vocab.json"):
            shutil.copy(f, out / f.name)
    for name in ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"]:
        quantize_dynamic(src / name, out / name, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    print("wrote", out)


if __name__ == "__main__":
    main()
