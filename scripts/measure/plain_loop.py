"""The speed limit: the same MLP and SGD as mnist_lit, as a raw PyTorch loop (no Lightning, no DataLoader).

    python scripts/measure/plain_loop.py --data-dir data --epochs 2 --batch-size 64
    python scripts/measure/plain_loop.py --data-dir data --clip-val 0.5 --clip-algorithm norm --accumulate 2 --save w.pt

Reads the same IDX files, makes the same 55,000/5,000 split and the same in-memory batches,
normalized by the same operations, then prints one JSON line per epoch (training seconds, val and
test accuracy) and a summary line with peak RSS. benchmark.py runs it beside ``python -m mnist_lit
fit``; tests/test_exactness.py checks that mnist_lit's weights equal the ones it ``--save``s, bit
for bit, with clipping and accumulation as Lightning documents them. It imports neither Lightning
nor mnist_lit so that its start-up is the bare minimum.
"""

import argparse
import gzip
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def read_idx(path: Path) -> torch.Tensor:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * ndim).view(dims)


def load(raw_dir: Path, name: str) -> torch.Tensor:
    return read_idx(next(p for p in (raw_dir / name, raw_dir / f"{name}.gz") if p.exists()))


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 784) in [0, 1], by the very operations of mnist_lit's batches."""
    return images.float().flatten(1).mul_(1 / 255).add_(0.0)


def main(argv: list[str] | None = None) -> None:
    """One run, from these arguments (the command line's by default)."""
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=2)
    # Defaults: configs/default.yaml's model, optimizer and batch size.
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, nargs=2, default=[512, 256])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    parser.add_argument("--constant-lr", dest="cosine", action="store_false", help="default: cosine decay per step")
    parser.add_argument("--clip-val", type=float, default=None, help="clip gradients (Trainer.gradient_clip_val)")
    parser.add_argument("--clip-algorithm", choices=["norm", "value"], default="norm")
    parser.add_argument("--accumulate", type=int, default=1, help="batches per SGD step, loss divided by it")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy's label_smoothing")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--save", default=None, help="write the trained network's parameters (a list) here")
    parser.add_argument("--threads", type=int, default=None, help="default: PyTorch's (one per core)")
    parser.add_argument("--keep-denormal", dest="flush_denormal", action="store_false",
                        help="keep subnormal floats (default: flushed in every thread, as mnist_lit fit does)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(args.flush_denormal)  # before the first computation: OpenMP's workers inherit it
    torch.manual_seed(args.seed)

    raw, device = Path(args.data_dir) / "MNIST" / "raw", torch.device(args.device)
    images, labels = load(raw, "train-images-idx3-ubyte"), load(raw, "train-labels-idx1-ubyte").long()
    test_x, test_y = load(raw, "t10k-images-idx3-ubyte"), load(raw, "t10k-labels-idx1-ubyte").long()
    images, labels, test_x, test_y = (t.to(device) for t in (images, labels, test_x, test_y))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(device)
    train_x, train_y = images[order[args.val_size:]], labels[order[args.val_size:]]
    val_x, val_y = images[order[:args.val_size]], labels[order[:args.val_size]]

    h1, h2 = args.hidden
    layers = [nn.Flatten(), nn.Linear(784, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10)]
    net = nn.Sequential(*layers).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    batches = -(-len(train_x) // args.batch_size)
    steps = args.epochs * -(-batches // args.accumulate)  # SGD steps: the last, shorter group of an epoch steps too
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if args.cosine else None

    @torch.no_grad()
    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        return (net(pixels(x)).argmax(1) == y).float().mean().item()

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    first_step = None
    for epoch in range(args.epochs):
        t0 = sync()
        shuffle = torch.Generator().manual_seed(args.seed + epoch)
        for i, rows in enumerate(torch.randperm(len(train_x), generator=shuffle).to(device).split(args.batch_size)):
            loss = F.cross_entropy(net(pixels(train_x[rows])), train_y[rows], label_smoothing=args.label_smoothing)
            (loss / args.accumulate).backward()  # gradients add up over the group
            if (i + 1) % args.accumulate and i + 1 < batches:
                continue
            if args.clip_val is not None and args.clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_val)
            elif args.clip_val is not None:
                torch.nn.utils.clip_grad_value_(net.parameters(), args.clip_val)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched:
                sched.step()
            first_step = first_step or time.time()
        train_s = sync() - t0
        print(json.dumps({"epoch": epoch, "train_s": round(train_s, 3), "val_acc": accuracy(val_x, val_y),
                          "test_acc": accuracy(test_x, test_y), "wall_s": round(time.perf_counter() - start, 2)}),
              flush=True)
    if args.save:
        torch.save([p.detach().cpu() for p in net.parameters()], args.save)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"summary": True, "first_step_unix": first_step, "peak_rss_mb": round(peak_mb, 1)}))


if __name__ == "__main__":
    main()
