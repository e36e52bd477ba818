"""ChannelNormCodec: standardized canvases for captioned_3band_full (cdm/models/text.py)."""

from __future__ import annotations

import pytest
import torch

from cdm.models.text import ChannelNormCodec, LatentCodec, latent_codec, model_shape


def test_round_trip_centres_each_channel_and_keeps_the_shape():
    codec = ChannelNormCodec(mean=[-0.5, 0.0, 0.25], std=[0.5, 1.0, 2.0])
    assert isinstance(codec, LatentCodec)
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    z = codec.encode(x)
    torch.testing.assert_close(z[:, 0], (x[:, 0] + 0.5) / 0.5)
    torch.testing.assert_close(z[:, 2], (x[:, 2] - 0.25) / 2.0)
    torch.testing.assert_close(codec.decode(z), x)
    assert model_shape(codec, 3, 8) == (3, 8, 8)
    # standardizing with the data's own moments gives zero mean and unit std per channel
    own = ChannelNormCodec(x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist())
    y = own.encode(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)


def test_bad_constants_and_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="positive std"):
        ChannelNormCodec(mean=[0.0], std=[0.0])
    with pytest.raises(ValueError, match="one mean and one positive std per channel"):
        ChannelNormCodec(mean=[0.0, 0.0], std=[1.0])
    codec = ChannelNormCodec(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="3 channels"):
        codec.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="data.channels=1"):
        codec.latent_shape(1, 8)


def test_the_full_table2_experiment_builds_its_codec_and_does_not_clip_x0():
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=["experiment=captioned_3band_full"])
    codec = latent_codec(cfg.backbone)
    assert isinstance(codec, ChannelNormCodec)
    assert model_shape(codec, cfg.data.channels, cfg.data.resolution) == (3, 32, 32)
    assert cfg.backbone.scheduler.clip_sample is False
