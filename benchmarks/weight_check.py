"""What checking a model's weights costs every stage, beside what every stage already reads, in one run.

A random Qwen2 in bfloat16 (about --gb GB of safetensors) is written to a temporary folder, then timed:

1. check: ``models.check_weights``, new: every parameter of the architecture present, every tensor finite
   (each tensor read once; run once per process and model);
2. fingerprint: ``models.fingerprint``, the sha256 of every file, which rollout, hessians and prune already
   compute of the dense model.

Both read the files from the page cache (they were just written), as a stage's second read does.

    python benchmarks/weight_check.py --gb 1
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from stages import models
from stages.toy import build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="Approximate size of the weights in GB (bfloat16).")
    args = parser.parse_args()
    hidden, intermediate, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate
    layers = max(1, round((args.gb * 1e9 / 2 - vocab * hidden) / per_layer))
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=vocab,
        tie_word_embeddings=True,
    )
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)
        files = sorted(folder.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files) / 1e9
        start = time.perf_counter()
        models.check_weights(folder, files)
        check_s = time.perf_counter() - start
        start = time.perf_counter()
        models.fingerprint(str(folder))
        fingerprint_s = time.perf_counter() - start
    print(f"{layers} layers, {size:.2f} GB of bfloat16 weights, 1 torch thread")
    print(f"check_weights  {check_s:7.2f} s  {size / check_s:6.2f} GB/s")
    print(f"fingerprint    {fingerprint_s:7.2f} s  {size / fingerprint_s:6.2f} GB/s")
    print(f"check / fingerprint: {check_s / fingerprint_s:.2f}x")


if __name__ == "__main__":
    main()
