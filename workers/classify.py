"""Category prediction: small softmax heads on the backbone's features, trained on the catalog.

One head per level of the catalog's taxonomy (``master_category``, ``sub_category``,
``article_type``), on the float32 (N, 1280) L2-normalised features of
:class:`workers.embed.Embedder`. The heads were trained by :mod:`workers.train` on
Fashion Product Images (Kaggle, Param Aggarwal; ``styles.csv`` labels); a trained default
ships in ``workers/models/``. A directory of heads holds ``heads.safetensors`` (weights),
``labels.json`` (``{level: [label, ...]}``, the row order of each head), ``config.json``
(architecture, backbone) and ``metrics.json`` (validation accuracy).

Rare classes were folded into the label :data:`OTHER` at training time; :func:`auto_category`
never restricts a search to it.

With the catalog at hand (the worker's replicas, ``lookalike eval``'s index), the heads' softmax is
blended with the labels of the query's nearest catalog products, a similarity-weighted vote:
``p = (1 - KNN_WEIGHT) * heads + KNN_WEIGHT * votes``, each of the ``KNN_K`` neighbours voting
``exp((s - s_max) / KNN_TAU)`` for its label (the weighted kNN of Wu et al., "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination", CVPR 2018; the interpolation of a model's
distribution with a kNN one as in Khandelwal et al., "Generalization through Memorization: Nearest
Neighbor Language Models", ICLR 2020). Only a query whose nearest neighbour is at least
``KNN_MIN_SIMILARITY`` similar is voted on: a photo unlike anything in the catalog keeps the heads'
answer. The constants were chosen on the early-stopping split (``id % 10 == 1``) with the other
training photos of ``images-224`` as the catalog, never on the validation split: first k, tau and
weight on its 224-px photos (grid: k 5, 10, 20, 40; tau 0.02, 0.05, 0.1, 1; weight 0.2-0.5), then
the similarity floor on its 224-px and 60x80 photos together (0, 0.7, 0.75, 0.8, 0.85, 0.9), each
by the best summed accuracy of the three levels; the README gives the figures.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

LEVELS = ("master_category", "sub_category", "article_type")
OTHER = "other"
DEFAULT_DIR = Path(__file__).resolve().parent / "models" / "heads-v2"
TOP = 3
KNN_K = 10  # catalog neighbours that vote (see the module docstring)
KNN_TAU = 0.02  # vote weight exp((s - s_max) / tau), s the cosine similarity
KNN_WEIGHT = 0.5  # share of the votes in the blend
KNN_MIN_SIMILARITY = 0.7  # no votes unless the nearest neighbour's cosine similarity reaches this

# One query's nearest catalog products: (cosine similarity, {level: label or None}), most similar first.
Neighbours = list[tuple[float, dict[str, str | None]]]


class HeadsNet(torch.nn.Module):
    """float32 (N, dim) features -> ``{level: logits (N, classes)}``.

    With ``hidden`` > 0, a shared ``Linear -> GELU -> Dropout`` layer precedes one linear layer
    per level; with ``hidden`` == 0 each level is a linear (multinomial logistic) head. Inputs are
    scaled by ``sqrt(dim)`` first, so that unit-norm features have elements of about unit variance.
    """

    def __init__(self, dim: int, classes: dict[str, int], hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim, self.scale = dim, dim ** 0.5
        self.trunk = (torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout))
                      if hidden else torch.nn.Identity())
        self.heads = torch.nn.ModuleDict({level: torch.nn.Linear(hidden or dim, n) for level, n in classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x * self.scale)
        return {level: head(h) for level, head in self.heads.items()}


class _Probabilities(torch.nn.Module):
    """A :class:`HeadsNet` and its softmax: float32 (N, dim) -> ``{level: probabilities (N, classes)}``."""

    def __init__(self, net: HeadsNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {level: torch.softmax(z, dim=1) for level, z in self.net(x).items()}


class CategoryHeads:
    """Predicts catalog categories from embeddings. ``load()`` is idempotent and thread-safe;
    ``predict()`` calls it.

    Args:
        directory: A directory written by :func:`workers.train.train` (default: the shipped heads).
    """

    def __init__(self, directory: Path | str = DEFAULT_DIR) -> None:
        self.directory = Path(directory)
        self.labels: dict[str, list[str]] = {}
        self.config: dict = {}
        self._net: torch.jit.ScriptModule | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        """The heads' name, e.g. ``heads-v2`` (the directory's name)."""
        return self.directory.name

    def load(self) -> None:
        """Read weights and label maps (once)."""
        with self._lock:
            if self._net is not None:
                return
            from safetensors.torch import load_file

            self.labels = json.loads((self.directory / "labels.json").read_text())
            self.config = json.loads((self.directory / "config.json").read_text())
            net = HeadsNet(self.config["dim"], {level: len(names) for level, names in self.labels.items()},
                           self.config.get("hidden", 0))
            state = {name: tensor.float() for name, tensor in load_file(self.directory / "heads.safetensors").items()}
            net.load_state_dict(state)
            with torch.no_grad():  # traced and frozen, as the embedder: one call, without the GIL, per batch
                self._net = torch.jit.freeze(torch.jit.trace(_Probabilities(net).eval(), torch.zeros(1, net.dim),
                                                             strict=False))

    def probabilities(self, features: np.ndarray, neighbours: list[Neighbours] | None = None
                      ) -> dict[str, np.ndarray]:
        """Probabilities per level: the heads' softmax, blended with the catalog's votes when given.

        Args:
            features: float32 (N, 1280), L2-normalised, from :class:`workers.embed.Embedder`.
            neighbours: Per image, its nearest catalog products (at most :data:`KNN_K` are used); an
                image with none, or none labelled, keeps the heads' softmax. None: the heads alone.

        Returns:
            ``{level: float32 (N, classes)}``, columns in the order of ``self.labels[level]``; rows sum to 1.
        """
        self.load()
        with torch.inference_mode():
            probs = {level: p.numpy() for level, p in
                     self._net(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).items()}
        if neighbours is not None:
            for level, p in probs.items():
                votes = self.votes(level, neighbours)
                voted = votes.sum(axis=1) > 0
                p[voted] = (1 - KNN_WEIGHT) * p[voted] + KNN_WEIGHT * votes[voted]
        return probs

    def votes(self, level: str, neighbours: list[Neighbours]) -> np.ndarray:
        """The similarity-weighted label votes of each image's first :data:`KNN_K` neighbours.

        A label the heads do not know counts for :data:`OTHER` (or not at all if there is none); a
        neighbour without a label at ``level`` does not vote, and nobody votes on an image whose
        nearest neighbour is less similar than :data:`KNN_MIN_SIMILARITY`.

        Returns:
            float32 (N, classes): each row sums to 1, or is all zeros when nobody voted.
        """
        self.load()
        names = self.labels[level]
        column = {name: j for j, name in enumerate(names)}
        other = column.get(OTHER)
        out = np.zeros((len(neighbours), len(names)), dtype=np.float32)
        for row, found in enumerate(neighbours):
            found = found[:KNN_K]
            if not found:
                continue
            best = max(score for score, _ in found)
            if best < KNN_MIN_SIMILARITY:
                continue
            for score, labels in found:
                j = column.get(labels.get(level), other) if labels.get(level) else None
                if j is not None:
                    out[row, j] += np.exp((score - best) / KNN_TAU)
        total = out.sum(axis=1, keepdims=True)
        return np.divide(out, total, out=out, where=total > 0)

    def predict(self, features: np.ndarray, top: int = TOP, neighbours: list[Neighbours] | None = None
                ) -> list[dict[str, list[tuple[str, float]]]]:
        """The ``top`` most likely labels per level, per image.

        Args:
            features: float32 (N, 1280), L2-normalised.
            top: Labels per level.
            neighbours: The catalog's nearest products per image, to blend in (see :meth:`probabilities`).

        Returns:
            N dicts ``{level: [(label, probability), ...]}``, most likely first; probabilities in [0, 1].
        """
        probs = self.probabilities(features, neighbours)
        out: list[dict[str, list[tuple[str, float]]]] = [{} for _ in range(len(features))]
        for level, p in probs.items():
            order = np.argsort(-p, axis=1, kind="stable")[:, :top]
            names = self.labels[level]
            for row, (ranks, values) in enumerate(zip(order, p)):
                out[row][level] = [(names[j], float(values[j])) for j in ranks]
        return out


def auto_category(prediction: dict[str, list[tuple[str, float]]], min_prob: float) -> tuple[str, str] | None:
    """The category a ``category: "auto"`` search is restricted to.

    The rule: the most specific level (``article_type``, then ``sub_category``, then
    ``master_category``) whose top label is not :data:`OTHER` and has probability at least
    ``min_prob``; None (search everything) when no level is that sure.

    Args:
        prediction: One image's output of :meth:`CategoryHeads.predict`.
        min_prob: Threshold in [0, 1].

    Returns:
        ``(level, label)`` or None.
    """
    for level in reversed(LEVELS):
        if prediction.get(level):
            label, prob = prediction[level][0]
            if label != OTHER and prob >= min_prob:
                return level, label
    return None
