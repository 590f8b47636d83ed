"""Writes English speech for the transcription benchmark: prose paragraphs of Python's standard
library docstrings (benches/make_bench_texts.py) spoken by espeak-ng, one paragraph per file,
resampled by ffmpeg to 16 kHz mono 16-bit WAV, 8 to 28 s each, in a fixed order, until the
files add up to the duration asked for. Writes OUT_DIR/speech-NNNN.wav and OUT_DIR/texts.jsonl
(file, seconds, text). Needs `espeak-ng` and `ffmpeg` on PATH (Debian packages).

    python3 benches/make_speech.py OUT_DIR [MINUTES]
"""
import json
import re
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_bench_texts import paragraphs  # noqa: E402

PROSE = re.compile(r"^[A-Z][A-Za-z ,.;'-]+[.]$")


def main():
    out = Path(sys.argv[1])
    minutes = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    out.mkdir(parents=True, exist_ok=True)
    rows, total, seen = [], 0.0, set()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        for text in paragraphs():
            words = len(text.split())
            if not PROSE.match(text) or not 20 <= words <= 75 or text in seen:
                continue
            seen.add(text)
            path = out / f"speech-{len(rows):04d}.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], check=True, capture_output=True)
            subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-i", str(raw), "-ac", "1", "-ar", "16000",
                            "-sample_fmt", "s16", str(path)], check=True)
            with wave.open(str(path)) as w:
                seconds = w.getnframes() / w.getframerate()
            if not 8.0 <= seconds <= 28.0:
                path.unlink()
                continue
            rows.append({"file": path.name, "seconds": seconds, "text": text})
            total += seconds
            if total >= minutes * 60:
                break
    (out / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} files, {total:.0f} s of speech in {out}")


if __name__ == "__main__":
    main()
