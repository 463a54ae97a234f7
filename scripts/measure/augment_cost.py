"""What each batch augmentation costs per epoch, side by side: 55,000 training images at batch 128 (430
batches), the augmentation alone, on one torch thread, on real MNIST pixels; the fastest of 3 rounds, the
augmentations taking turns within each round.

    python scripts/measure/augment_cost.py --mnist ../shared/datasets/mnist  # rewrites docs/extending.md's block
    python scripts/measure/augment_cost.py --mnist ../shared/datasets/mnist --no-docs
"""

import argparse
import gzip
import sys
import time
from pathlib import Path

import torch

from mnist_lit.augment import Compose, ElasticDeformation, RandomAffine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "figures"))  # the docs' blocks: scripts/figures/
from generated_block import header, publish  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"
AUGMENTS = {"`RandomAffine()` (±10°, ±2 px, 90-110 %)": RandomAffine(),
            "`ElasticDeformation()` (α 34, σ 4)": ElasticDeformation(),
            "`ElasticDeformation(noise_spacing=4)` (the same field from 16x fewer draws)":
                ElasticDeformation(noise_spacing=4),
            "`Compose([ElasticDeformation(), RandomAffine()])`": Compose([ElasticDeformation(), RandomAffine()])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", required=True, help="folder of the four MNIST .gz files")
    parser.add_argument("--no-docs", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    raw = gzip.decompress((Path(options.mnist) / "train-images-idx3-ubyte.gz").read_bytes())
    images = torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=16).view(-1, 28, 28)[:55_000]
    batches = images.split(128)
    best = {name: float("inf") for name in AUGMENTS}
    for _ in range(3):
        for name, augment in AUGMENTS.items():
            started = time.perf_counter()
            for i, batch in enumerate(batches):
                augment(batch.float(), torch.Generator().manual_seed(i))
            best[name] = min(best[name], time.perf_counter() - started)
    lines = [header("measure/augment_cost.py", "one torch thread"),
             "| augmentation | s per epoch (55,000 images, batch 128), the augmentation alone | × RandomAffine's |",
             "|---|---|---|"]
    affine = next(iter(best.values()))
    lines += [f"| {name} | {s:.2f} | {s / affine:.1f} |" for name, s in best.items()]
    publish(DOC, "measure/augment_cost.py", lines, print_only=options.no_docs)


if __name__ == "__main__":
    main()
