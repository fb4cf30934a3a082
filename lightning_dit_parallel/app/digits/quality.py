"""Sample quality of the digits DiT: the share of generated images a classifier assigns to the requested class.

The classifier (an RBF support-vector machine) is trained at start-up, in about a second, on the same
preprocessed digits the DiT was trained on; it scores about 0.99 on held-out real digits.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from lightning_dit_parallel.app.digits.data import IMAGE_SIZE, digit_images


class DigitClassifier:
    """Classifies (N, 1, 16, 16) images in [0, 1] as digits 0..9.

    Args:
        size: image side the classifier is trained on (that of the generated images).
        holdout: fraction of the data kept out of training to measure the classifier's own accuracy.
        seed: seed of the train/held-out split.
    """

    def __init__(self, size: int = IMAGE_SIZE, holdout: float = 0.2, seed: int = 0) -> None:
        from sklearn.svm import SVC

        images, labels = digit_images(size)
        features = self._features((images + 1.0) / 2.0)
        order = np.random.default_rng(seed).permutation(len(labels))
        cut = int(len(order) * (1.0 - holdout))
        train, test = order[:cut], order[cut:]
        self.size = size
        self.svm = SVC(gamma="scale", C=10.0).fit(features[train], labels.numpy()[train])
        self.holdout_accuracy = float((self.svm.predict(features[test]) == labels.numpy()[test]).mean())

    @staticmethod
    def _features(images: Tensor) -> np.ndarray:
        return images.detach().float().cpu().reshape(images.shape[0], -1).numpy()  # (N, 1, H, W) -> (N, H*W)

    def predict(self, images: Tensor) -> Tensor:
        """Predicted digit (N,) for images (N, 1, size, size) in [0, 1]."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, self.size, self.size):
            raise ValueError(f"expected images (N, 1, {self.size}, {self.size}), got {tuple(images.shape)}.")
        return torch.as_tensor(self.svm.predict(self._features(images)))


@lru_cache(maxsize=2)
def digit_classifier(size: int = IMAGE_SIZE) -> DigitClassifier:
    """One classifier per process (training it takes about a second)."""
    return DigitClassifier(size)


def class_accuracy(images: Tensor, labels: Tensor) -> float:
    """Share of ``images`` (N, 1, 16, 16) in [0, 1] that the classifier assigns to ``labels`` (N,)."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"need as many labels as images (and at least one), got {images.shape[0]} and {labels.shape[0]}."
        )
    predicted = digit_classifier(images.shape[-1]).predict(images)
    return float((predicted == labels.cpu()).float().mean())


class ClassAccuracy:
    """Scores ordered predictions against the requests' labels: ``score(images, dataset, indices) -> float``.

    Args:
        label_key: the request key holding the asked-for class.
    """

    def __init__(self, label_key: str = "class_label") -> None:
        self.label_key = label_key

    def __call__(self, images: Tensor, dataset, indices: Tensor) -> float:
        labels = torch.stack([torch.as_tensor(dataset[i][self.label_key]) for i in indices.tolist()])  # (N,)
        return class_accuracy(images, labels)
