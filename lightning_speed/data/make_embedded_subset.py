"""Build ``assets/fashion_mnist_subset.npz``: the class-balanced Fashion-MNIST subset shipped in the package.

Usage::

    python -m lightning_speed.data.make_embedded_subset --root /usr/share/datasets/fashion-mnist

Picks ``--train-per-class`` train and ``--test-per-class`` test images of each class with a
fixed seed, keeps them in their original dataset order, and stores uint8 images, labels and
the source indices (for provenance) with ``np.savez_compressed``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .fashion_mnist import FILE_STEMS, find_idx_files, validate_pair
from .idx import read_idx

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "assets" / "fashion_mnist_subset.npz"


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` random indices of every class, returned sorted (original order)."""
    chosen = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if pool.size < per_class:
            raise ValueError(f"class {c} has only {pool.size} images, fewer than per_class={per_class}.")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def build_subset(
    root: str | Path, output: str | Path = DEFAULT_OUTPUT, train_per_class: int = 400, test_per_class: int = 100,
    seed: int = 0,
) -> Path:
    """Write the subset file from the IDX files in ``root``; returns the output path."""
    found, missing = find_idx_files(root)
    if missing:
        raise FileNotFoundError(
            f"{root} lacks {missing}; install them with `apt-get install -y dataset-fashion-mnist` "
            "and pass --root /usr/share/datasets/fashion-mnist."
        )
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        img_stem, lab_stem = FILE_STEMS[split]
        images, labels = read_idx(found[img_stem]), read_idx(found[lab_stem])
        validate_pair(images, labels, (found[img_stem], found[lab_stem]), 10)
        idx = balanced_indices(labels, per_class, rng)
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx].astype(np.uint8)
        arrays[f"{split}_indices"] = idx.astype(np.int32)
    arrays["seed"] = np.array(seed, dtype=np.int64)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(output, **arrays)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_speed.data.make_embedded_subset", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="folder with the IDX files")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = build_subset(args.root, args.output, args.train_per_class, args.test_per_class, args.seed)
    except (FileNotFoundError, ValueError) as err:  # missing files, too many images per class: the message alone
        parser.error(str(err))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
