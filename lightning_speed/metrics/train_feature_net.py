"""Train the offline Fashion-MNIST feature network used for FID.

Run::

    python -m lightning_speed.metrics.train_feature_net \
        --root /usr/share/datasets/fashion-mnist \
        --out lightning_speed/metrics/weights/fashion_mnist_net.pt

Writes the state_dict (fp16, small enough to commit) and, next to it, a JSON with the test accuracy,
epochs, seed, date and the command. Runs on CPU in minutes; a GPU is used when present.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lightning_speed.metrics.fashion_net import FashionMNISTFeatureNet

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    """Minimal IDX reader (gzipped or plain): magic (2 zero bytes, dtype code, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{stem}(.gz) not found in {root}; pass --root pointing to the Fashion-MNIST IDX files")


def load_split(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 1, 28, 28) and labels as long (N,)."""
    images_stem, labels_stem = _FILES[split]
    images = _read_idx(_find(Path(root), images_stem))
    labels = _read_idx(_find(Path(root), labels_stem))
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels on padded [-1, 1] images (N, 1, 32, 32)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()  # one shift per batch keeps it cheap
    return padded[:, :, dy : dy + 32, dx : dx + 32]


@torch.no_grad()
def evaluate(net: FashionMNISTFeatureNet, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Top-1 accuracy on uint8 images."""
    net.eval()
    correct = 0
    for i in range(0, len(images), 1000):
        logits = net(images[i : i + 1000].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i : i + 1000]).sum())
    return correct / len(images)


def train(root: str, epochs: int, seed: int, batch_size: int, lr: float, device: torch.device) -> tuple[FashionMNISTFeatureNet, float]:
    """Train from scratch; returns the net and its test accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = load_split(root, "train")
    test_x, test_y = load_split(root, "test")
    train_f = F.pad(train_x.float() / 127.5 - 1.0, (2, 2, 2, 2), value=-1.0)
    net = FashionMNISTFeatureNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = len(train_x) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    for epoch in range(epochs):
        net.train()
        start = time.time()
        perm = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            x = _augment(train_f[idx], generator).to(device)
            y = train_y[idx].to(device)
            loss = F.cross_entropy(net(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = evaluate(net, test_x, test_y, device)
        print(f"epoch {epoch + 1}/{epochs} loss {total / steps_per_epoch:.4f} test_acc {acc:.4f} ({time.time() - start:.0f}s)", flush=True)
    return net, evaluate(net, test_x, test_y, device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="folder with the four IDX files")
    parser.add_argument("--out", default="lightning_speed/metrics/weights/fashion_mnist_net.pt")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--fp32", action="store_true", help="save fp32 weights instead of fp16")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, acc = train(args.root, args.epochs, args.seed, args.batch_size, args.lr, device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if args.fp32 else torch.float16
    state = {k: (v.to(dtype) if v.is_floating_point() else v).cpu() for k, v in net.state_dict().items()}
    torch.save(state, out)
    from lightning_speed.metrics.features import load_fashion_mnist_feature_net

    saved_acc = evaluate(load_fashion_mnist_feature_net(out).to(device), *load_split(args.root, "test"), device)
    print(f"test accuracy {acc:.4f} (trained), {saved_acc:.4f} (saved {dtype} weights)")
    record = {
        "accuracy": round(saved_acc, 4),
        "split": "test (10k)",
        "epochs": args.epochs,
        "seed": args.seed,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": "python -m lightning_speed.metrics.train_feature_net " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
