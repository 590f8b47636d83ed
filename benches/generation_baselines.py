"""Python baseline for `cargo bench --bench generation`: optimum's ORTModelForCausalLM /
ORTModelForSeq2SeqLM `.generate` over the same ONNX files, on the same token ids, in the same
batches, with the same search (greedy or beams, max_new_tokens, no sampling).
Prints one JSON object: seconds (one warm-up batch first, loading excluded) and new_tokens.

    python benches/generation_baselines.py MODEL_DIR PROMPTS_JSON BATCH NUM_BEAMS MAX_NEW
"""

import json
import sys
import time


def new_tokens(rows, eos):
    """New tokens of each row up to and with its first EOS, summed (what ferry counts)."""
    tokens = 0
    for row in rows:
        for t in row:
            tokens += 1
            if t in eos:
                break
    return tokens


def main():
    import torch

    model_dir, prompts_file, batch, beams, max_new = sys.argv[1:6]
    batch, beams, max_new = int(batch), int(beams), int(max_new)
    prompts = json.load(open(prompts_file))
    config = json.load(open(f"{model_dir}/config.json"))
    seq2seq = config.get("is_encoder_decoder", False)
    if seq2seq:
        from optimum.onnxruntime import ORTModelForSeq2SeqLM as Model
    else:
        from optimum.onnxruntime import ORTModelForCausalLM as Model
    model = Model.from_pretrained(model_dir, use_cache=True)
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    pad = gen.pad_token_id if gen.pad_token_id is not None else eos[0]

    def run(rows):
        longest = max(len(r) for r in rows)
        if seq2seq:  # sources padded on the right
            ids = [r + [pad] * (longest - len(r)) for r in rows]
            mask = [[1] * len(r) + [0] * (longest - len(r)) for r in rows]
        else:  # prompts on the left
            ids = [[pad] * (longest - len(r)) + r for r in rows]
            mask = [[0] * (longest - len(r)) + [1] * len(r) for r in rows]
        out = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=max_new,
            num_beams=beams,
            do_sample=False,
            pad_token_id=pad,
        )
        new = out[:, 1:] if seq2seq else out[:, longest:]
        return new_tokens(new.tolist(), eos)

    run(prompts[:batch])
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch):
        tokens += run(prompts[i : i + batch])
    print(json.dumps({"seconds": time.perf_counter() - start, "new_tokens": tokens}))


if __name__ == "__main__":
    main()
