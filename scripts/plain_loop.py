"""The speed limit: the same MLP and SGD as mnist_lit, as a raw PyTorch loop (no Lightning, no DataLoader).

    python scripts/plain_loop.py --data-dir data --epochs 2 --batch-size 64

Reads the same IDX files, makes the same 55,000/5,000 split and the same in-memory batches,
then prints one JSON line per epoch (training seconds, val and test accuracy) and a summary
line with peak RSS. benchmark.py runs it beside ``python -m mnist_lit fit``; it imports neither
Lightning nor mnist_lit so that its start-up is the bare minimum.
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


def main() -> None:
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    raw, device = Path(args.data_dir) / "MNIST" / "raw", torch.device(args.device)
    images, labels = load(raw, "train-images-idx3-ubyte"), load(raw, "train-labels-idx1-ubyte").long()
    test_x, test_y = load(raw, "t10k-images-idx3-ubyte"), load(raw, "t10k-labels-idx1-ubyte").long()
    images, labels, test_x, test_y = (t.to(device) for t in (images, labels, test_x, test_y))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(device)
    train_x, train_y = images[order[5000:]], labels[order[5000:]]
    val_x, val_y = images[order[:5000]], labels[order[:5000]]

    h1, h2 = args.hidden
    layers = [nn.Flatten(), nn.Linear(784, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10)]
    net = nn.Sequential(*layers).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    steps = args.epochs * -(-len(train_x) // args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if args.cosine else None

    @torch.no_grad()
    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        return (net(x.float() / 255).argmax(1) == y).float().mean().item()

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    first_step = None
    for epoch in range(args.epochs):
        t0 = sync()
        shuffle = torch.Generator().manual_seed(args.seed + epoch)
        for rows in torch.randperm(len(train_x), generator=shuffle).to(device).split(args.batch_size):
            loss = F.cross_entropy(net(train_x[rows].float() / 255), train_y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched:
                sched.step()
            first_step = first_step or time.time()
        train_s = sync() - t0
        print(json.dumps({"epoch": epoch, "train_s": round(train_s, 3), "val_acc": accuracy(val_x, val_y),
                          "test_acc": accuracy(test_x, test_y), "wall_s": round(time.perf_counter() - start, 2)}),
              flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"summary": True, "first_step_unix": first_step, "peak_rss_mb": round(peak_mb, 1)}))


if __name__ == "__main__":
    main()
