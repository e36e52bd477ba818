"""Per-sample quality scores for ``sharding=by_score`` (the paper's aesthetic bands AE6+ / AE6- /
AE5-): the dataset's own score column, a no-reference sharpness score computed from the pixels, or
a noise estimate, or a user's file of ``id, score``.

Each scorer is a callable ``scorer(dataset) -> np.ndarray [len(dataset)]`` chosen by
``sharding/scorer=column|noise|sharpness|file`` (Hydra nodes with ``_target_``; ``column``, the default,
reads the dataset's ``scores``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from cdm.data.manifest import abbreviate


class DatasetScores:
    """The dataset's own column (e.g. the captioned canvases' known quality, an npz's ``scores``,
    a COCO-style file's per-image ``score``)."""

    def __init__(self, key: str = "scores") -> None:
        self.key = key

    def __call__(self, dataset) -> np.ndarray:
        scores = getattr(dataset, self.key, None)
        if scores is None:
            raise ValueError(
                f"sharding=by_score: dataset {dataset.name!r} has no {self.key!r} column; provide "
                "scores (a 'scores' array in an npz, 'score' in a captions file), or compute them: "
                "sharding/scorer=noise|sharpness, or sharding/scorer=file sharding.scorer.path=FILE; or use "
                "sharding=random/by_class"
            )
        return np.asarray(scores, dtype=np.float64)


class SharpnessScore:
    """Variance of the Laplacian of each image's grey levels (Pech-Pacheco et al. 2000, a standard
    no-reference focus measure): blur lowers it, so on data degraded by blur the score orders the
    samples by quality. Computed on the dataset's float images in [-1, 1]; noise raises it, so
    ``smooth`` (a Gaussian sigma in pixels, 0: none) can be applied first."""

    def __init__(self, smooth: float = 0.0) -> None:
        self.smooth = float(smooth)

    def __call__(self, dataset) -> np.ndarray:
        out = np.empty(len(dataset), dtype=np.float64)
        for i in range(len(dataset)):
            grey = np.asarray(dataset[i]["image"], dtype=np.float64).mean(axis=0)
            if self.smooth > 0:
                grey = ndimage.gaussian_filter(grey, self.smooth)
            out[i] = ndimage.laplace(grey).var()
        return out


# Immerkaer's mask: the difference of two Laplacians, blind to a locally linear image
NOISE_MASK = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


class NoiseScore:
    """Minus the noise standard deviation of each image by Immerkaer's fast estimator (J.
    Immerkaer, "Fast noise variance estimation", CVIU 1996: sigma = sqrt(pi/2) / (6 (W-2)(H-2))
    sum |I * N|), on grey levels in [-1, 1]: higher is cleaner. On the captioned canvases, whose
    degradations add noise with the blur, it separates the quality levels
    (tests/test_scores.py)."""

    def __call__(self, dataset) -> np.ndarray:
        out = np.empty(len(dataset), dtype=np.float64)
        for i in range(len(dataset)):
            grey = np.asarray(dataset[i]["image"], dtype=np.float64).mean(axis=0)
            residual = ndimage.convolve(grey, NOISE_MASK, mode="reflect")[1:-1, 1:-1]
            out[i] = -np.sqrt(np.pi / 2) * np.abs(residual).sum() / (6 * residual.size)
        return out


class ScoreFile:
    """Scores from a user's file keyed by sample id: a CSV with ``id`` and ``score`` columns, or a
    JSON object ``{id: score}``. Every training sample must have one (test samples, which are
    never sharded, may be left out: NaN; ids not in the dataset are ignored)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path).expanduser()

    def read(self) -> dict[str, float]:
        """``{id: score}`` from the file."""
        if not self.path.is_file():
            raise FileNotFoundError(
                f"sharding.scorer.path={self.path} does not exist: give a CSV (id,score) or a "
                "JSON {id: score} file"
            )
        if self.path.suffix.lower() == ".json":
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{self.path}: expected a JSON object {{id: score}}")
            return {str(k): float(v) for k, v in data.items()}
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"id", "score"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{self.path}: a scores CSV needs a header with 'id' and 'score' columns, "
                    f"got {reader.fieldnames}"
                )
            return {row["id"]: float(row["score"]) for row in reader}

    def __call__(self, dataset) -> np.ndarray:
        scores = self.read()
        splits = getattr(dataset, "splits", ["train"] * len(dataset.ids))
        missing = [i for i, split in zip(dataset.ids, splits, strict=True)
                   if split == "train" and i not in scores]  # fmt: skip
        if missing:
            n_train = sum(split == "train" for split in splits)
            raise ValueError(
                f"{self.path}: {len(missing)} of {n_train} training samples of {dataset.name!r} "
                f"have no score ({abbreviate(missing, 3)}); add a row per sample id"
            )
        return np.array([scores.get(i, np.nan) for i in dataset.ids], dtype=np.float64)
