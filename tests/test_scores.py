"""Quality scorers for sharding=by_score (issue 14, section 3): a score computed from the pixels
recovers the captioned canvases' degradation bands, and a user's file of id,score gives the same
split as the same scores in a column."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from scipy.stats import spearmanr

from cdm.data.captioned import load_captioned
from cdm.data.scores import DatasetScores, NoiseScore, ScoreFile, SharpnessScore
from cdm.data.sharding import make_split
from cdm.jobs.context import split_data


@pytest.fixture(scope="module")
def degraded():
    return load_captioned(
        n_train=300, n_test=60, kinds=["digits"], degraded_fraction=2 / 3, levels=2
    )


def dominant_levels(dataset, split) -> list[float]:
    quality = np.asarray(dataset.scores, dtype=np.float64)
    levels = []
    for shard in split.shards:
        q = quality[[dataset.id_to_index[i] for i in shard.ids]]
        values, counts = np.unique(q, return_counts=True)
        assert counts.max() / counts.sum() > 0.8, (values, counts)  # one level dominates the band
        levels.append(float(values[counts.argmax()]))
    return levels


def test_the_noise_score_recovers_the_degradation_bands(degraded):
    scores = NoiseScore()(degraded)
    quality = np.asarray(degraded.scores, dtype=np.float64)
    # the levels' score ranges do not overlap: computed from the pixels alone, in the known order
    ranges = [(scores[quality == v].min(), scores[quality == v].max()) for v in (0.0, 0.5, 1.0)]
    assert ranges[0][1] < ranges[1][0] and ranges[1][1] < ranges[2][0], ranges
    split = make_split(degraded, strategy="by_score", n_shards=3, seed=0, scores=scores)
    assert dominant_levels(degraded, split) == [0.0, 0.5, 1.0]  # worst to best: AE5- / AE6- / AE6+


def test_sharpness_falls_with_blur():
    clean = load_captioned(n_train=40, n_test=8, kinds=["digits"], degraded_fraction=0.0)
    from scipy.ndimage import gaussian_filter

    class Blurred:  # the same canvases blurred (no noise): sharpness must rank them below
        name = "blurred"

        def __len__(self):
            return len(clean)

        def __getitem__(self, i):
            image = np.asarray(clean[i]["image"])
            return {"image": gaussian_filter(image, sigma=(0, 1.0, 1.0))}

    sharp, blurred = SharpnessScore()(clean), SharpnessScore()(Blurred())
    assert (sharp > blurred).all()
    assert spearmanr(sharp, SharpnessScore(smooth=0.5)(clean)).statistic > 0.5


def test_a_score_file_splits_like_the_same_column(degraded, tmp_path):
    column = DatasetScores()(degraded)
    by_column = make_split(degraded, strategy="by_score", n_shards=3, seed=0)
    csv_path = tmp_path / "scores.csv"
    csv_path.write_text(
        "id,score\n" + "".join(f"{i},{s}\n" for i, s in zip(degraded.ids, column, strict=True))
    )
    json_path = tmp_path / "scores.json"
    json_path.write_text(json.dumps(dict(zip(degraded.ids, column.tolist(), strict=True))))
    for path in (csv_path, json_path):
        split = make_split(degraded, strategy="by_score", n_shards=3, seed=0,
                           scores=ScoreFile(str(path))(degraded))  # fmt: skip
        assert [m.ids for m in split.shards] == [m.ids for m in by_column.shards]
    # reversed scores reverse the bands: the file is what decides
    json_path.write_text(json.dumps(dict(zip(degraded.ids, (-column).tolist(), strict=True))))
    reversed_split = make_split(degraded, strategy="by_score", n_shards=3, seed=0,
                                scores=ScoreFile(str(json_path))(degraded))  # fmt: skip
    assert dominant_levels(degraded, reversed_split) == [1.0, 0.5, 0.0]


def test_bad_score_files_are_refused_with_the_fix(degraded, tmp_path):
    partial = tmp_path / "partial.csv"
    partial.write_text("id,score\n" + f"{degraded.ids[0]},1.0\n")
    with pytest.raises(
        ValueError, match=r"299 of 300 training samples .* have no score.*add a row"
    ):
        ScoreFile(str(partial))(degraded)
    header = tmp_path / "header.csv"
    header.write_text("name,value\na,1\n")
    with pytest.raises(ValueError, match="'id' and 'score' columns"):
        ScoreFile(str(header))(degraded)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ScoreFile(str(tmp_path / "none.csv"))(degraded)


def test_the_scorer_is_a_config_choice(degraded):
    with initialize_config_module("cdm.conf", version_base=None):
        cfg = compose("train", overrides=["experiment=captioned_3band", "sharding/scorer=noise",
                                          "data.kwargs.n_train=300", "data.kwargs.n_test=60"])  # fmt: skip
    assert cfg.sharding.scorer._target_ == "cdm.data.scores.NoiseScore"
    split = split_data(cfg, degraded)  # no paths.artifacts store: the config's split alone
    expected = make_split(degraded, strategy="by_score", n_shards=3, seed=cfg.seed,
                          safe_fraction=cfg.sharding.safe_fraction, n_slices=cfg.sharding.n_slices,
                          scores=NoiseScore()(degraded))  # fmt: skip
    assert [m.ids for m in split.shards] == [m.ids for m in expected.shards]
