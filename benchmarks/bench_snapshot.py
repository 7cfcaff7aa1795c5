"""What a snapshot's fsync costs: the files a snapshot holds, written, then put on disk.

``Engine.snapshot`` writes the model (``save_pretrained``), the optimizer's
state and a few small files into ``.partial-iter-N``, then fsyncs them all
(``runfolder.sync_folder``) before the rename that makes them ``iter-N``, so
that a power cut cannot leave a snapshot whose files were never written.
This times the two parts on the same bytes, for random-weight models of the
GPT-2 shapes with the AdamW state of one step, in a folder on the disk to
measure (``--folder``; the default is the system's temporary folder)::

    python benchmarks/bench_snapshot.py --models gpt2,gpt2-medium --folder runs
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collapse_tui.runfolder import sync_folder
from collapse_tui.training import build_optimizer

SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280)}


def model_and_optimizer(shape: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A random model of ``shape`` on the CPU and an AdamW that has taken one step (so it has its state)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_head, n_embd = SHAPES[shape]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    optimizer = build_optimizer(model, 4e-5, torch.device("cpu"))
    tokens = torch.randint(0, 50257, (1, 8))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    return model, optimizer


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2,gpt2-medium")
    parser.add_argument("--folder", type=Path, default=None, help="where to write (its disk is measured)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print("| model | GB | write s | fsync s |\n| --- | ---: | ---: | ---: |")
    for shape in args.models.split(","):
        model, optimizer = model_and_optimizer(shape)
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(dir=args.folder) as work:
                path = Path(work) / ".partial-iter-1"
                start = time.perf_counter()
                model.save_pretrained(path)
                torch.save(optimizer.state_dict(), path / "optimizer.pt")
                written = time.perf_counter()
                sync_folder(path)
                synced = time.perf_counter()
                size = folder_bytes(path) / 1e9
                shutil.rmtree(path)
            print(f"| {shape} | {size:.2f} | {written - start:.2f} | {synced - written:.2f} |", flush=True)


if __name__ == "__main__":
    main()
