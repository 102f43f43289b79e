"""A real Fashion-MNIST subset shipped inside the package, so the quickstart needs no download.

``assets/fashion_mnist_subset.npz`` holds 4000 train images (400 per class) and 1000 test
images (100 per class), chosen with a fixed seed by ``make_embedded_subset.py``; about 2 MB.
Fashion-MNIST is (c) Zalando SE under the MIT License (``assets/LICENSE_FASHION_MNIST.txt``).
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from .fashion_mnist import FashionMNISTBase

ASSET = "assets/fashion_mnist_subset.npz"


def load_embedded_subset() -> dict[str, np.ndarray]:
    """The subset's arrays: ``{train,test}_{images,labels,indices}``."""
    resource = resources.files("lightning_speed.data").joinpath(ASSET)
    try:
        with resource.open("rb") as f, np.load(f) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"The embedded Fashion-MNIST subset ({ASSET}) is missing from the installed package. "
            "Reinstall lightning_speed, or rebuild it with "
            "`python -m lightning_speed.data.make_embedded_subset --root /usr/share/datasets/fashion-mnist`."
        ) from err


class EmbeddedFashionMNISTDataModule(FashionMNISTBase):
    """Fashion-MNIST subset bundled with the package (4000 train / 1000 test, class-balanced).

    Same preprocessing and arguments as ``FashionMNISTDataModule`` (minus root/download);
    meant for quickstarts, tests and smoke runs, not for benchmark numbers.
    """

    name = "fashion_mnist_embedded"

    # Arguments spelled out and forwarded one by one (not **kwargs): jsonargparse reads this signature.
    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        random_flip: bool = True,
        pad_to: int = 32,
        val_images: int = 1000,
        on_device: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            random_flip=random_flip,
            pad_to=pad_to,
            val_images=val_images,
            on_device=on_device,
            seed=seed,
        )
        self.save_hyperparameters()
        self._arrays: dict[str, np.ndarray] | None = None

    def _load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = load_embedded_subset()
        return self._arrays[f"{split}_images"][:, None], self._arrays[f"{split}_labels"].astype(np.int64)
