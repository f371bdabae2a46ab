"""Fashion-MNIST (Zalando): 60,000 train + 10,000 test 28×28 grayscale clothing images in 10 classes.

Same format and loader as :mod:`cnnrun.data.mnist`. Debian's ``dataset-fashion-mnist`` package installs the
four files under /usr/share/datasets/fashion-mnist; they are recompressed there (their gz checksums differ
from the published ones) but their content is identical, which is what is verified, so no download is needed
on a machine that has the package.
"""

from __future__ import annotations

from typing import Tuple

from cnnrun.data import Dataset
from cnnrun.data.download import Checksum, RemoteFile
from cnnrun.data.mnist import IdxDataset, load_idx_dataset

MIRRORS: Tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# SHA-256 of the gz files as distributed (the README publishes their MD5s: 8d4fb7e6…, 25c81989…, bef4ecab…,
# bb300cfd…; these are the same files).
FILES: Tuple[RemoteFile, ...] = (
    RemoteFile(
        "train-images-idx3-ubyte.gz",
        Checksum("sha256", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
    ),
    RemoteFile(
        "train-labels-idx1-ubyte.gz",
        Checksum("sha256", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
    ),
    RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        Checksum("sha256", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
    ),
    RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        Checksum("sha256", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    ),
)
# SHA-256 of the decompressed IDX content, in FILES' order (the Debian copies match these).
CONTENT_SHA256: Tuple[str, ...] = (
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
)
SYSTEM_DIRS: Tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)  # Debian: dataset-fashion-mnist
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def load(cfg) -> Dataset:
    """dataset=fashion_mnist: 70,000 clothing images."""
    spec = IdxDataset("fashion_mnist", FILES, CONTENT_SHA256, MIRRORS, SYSTEM_DIRS, CLASS_NAMES)
    return load_idx_dataset(cfg, spec)
