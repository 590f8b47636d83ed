"""Python baselines for `cargo bench --bench audio`: the same recordings (16 kHz WAV files of up to
30 s) transcribed by
- `faster-whisper`: faster-whisper's WhisperModel (CTranslate2) on the CTranslate2 files the
  ONNX exports were converted from, at a compute type (`float32`, `int8`), with the decoding
  ferry and the transformers pipeline do: `<|notimestamps|>`, one temperature (no fallback), no
  VAD, no conditioning on earlier text, no no-speech skipping, the same beam size;
- `optimum`: the transformers ASR pipeline on optimum's ORTModelForSpeechSeq2Seq over the same
  ONNX files ferry runs (needs tests/fixtures/requirements.txt: torch, transformers,
  optimum-onnx), the same beam size.
Both read the files themselves (decoding included); one warm-up call first, model loading
excluded. Prints one JSON object: seconds, texts (in the listing's order).

    python benches/audio_baselines.py faster-whisper CT2_DIR COMPUTE_TYPE BEAMS LANGUAGE LISTING
    python benches/audio_baselines.py optimum ONNX_DIR - BEAMS LANGUAGE LISTING

LANGUAGE: a code (`en`), or `-` for an English-only model.
"""

import json
import sys
import time


def faster_whisper(model_dir, compute_type, beams, language, paths):
    from faster_whisper import WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=0)

    def one(path):
        segments, _ = model.transcribe(
            path,
            beam_size=beams,
            language=language,
            task="transcribe",
            without_timestamps=True,
            temperature=0.0,
            condition_on_previous_text=False,
            vad_filter=False,
            no_speech_threshold=None,
            log_prob_threshold=None,
            compression_ratio_threshold=None,
        )
        return "".join(s.text for s in segments)

    one(paths[0])
    start = time.perf_counter()
    texts = [one(p) for p in paths]
    return time.perf_counter() - start, texts


def optimum(model_dir, _compute_type, beams, language, paths):
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
    from transformers import AutoFeatureExtractor, AutoTokenizer, pipeline

    model = ORTModelForSpeechSeq2Seq.from_pretrained(model_dir)
    asr = pipeline(
        "automatic-speech-recognition",
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        feature_extractor=AutoFeatureExtractor.from_pretrained(model_dir),
    )
    kwargs = {"num_beams": beams}
    if language:
        kwargs["language"] = language
    asr(paths[0], generate_kwargs=kwargs)
    start = time.perf_counter()
    texts = [asr(p, generate_kwargs=kwargs)["text"] for p in paths]
    return time.perf_counter() - start, texts


def main():
    kind, model_dir, compute_type, beams, language, listing = sys.argv[1:7]
    paths = [line.strip() for line in open(listing) if line.strip()]
    run = {"faster-whisper": faster_whisper, "optimum": optimum}[kind]
    seconds, texts = run(model_dir, compute_type, int(beams), None if language == "-" else language, paths)
    print(json.dumps({"seconds": seconds, "texts": texts}))


if __name__ == "__main__":
    main()
