"""Sliding-window prediction and the mapping between reference and level grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from stroke_ray.config import ModelConfig
from stroke_ray.grid import cube_affine
from stroke_ray.inference import Prediction, predict_case, sliding_window_predict, window_size
from stroke_ray.ingest import PreparedCase, load_case
from stroke_ray.models import build_model, size_multiple


class ChannelLogit(torch.nn.Module):
    """Logit = scale * (channel 0 - shift); insists on sizes that are a multiple of `multiple`.

    With K=2 it returns (0, logit), whose softmax foreground is the same sigmoid."""

    def __init__(self, scale=1.0, shift=0.0, multiple=1, classes=1):
        super().__init__()
        self.scale, self.shift, self.multiple, self.classes = scale, shift, multiple, classes
        self.calls = 0

    def forward(self, x):
        assert all(s % self.multiple == 0 for s in x.shape[2:]), x.shape
        self.calls += 1
        logit = self.scale * (x[:, :1] - self.shift)
        if self.classes == 1:
            return logit
        return torch.cat([torch.zeros_like(logit), logit], 1)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("classes", [1, 2])
def test_fixed_function_gives_expected_probability_at_odd_sizes(classes):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 2, (2, 13, 17, 9)).astype(np.float32)
    model = ChannelLogit(multiple=4, classes=classes)
    prob = sliding_window_predict(model, image, patch_size=6, overlap=0.5, batch_size=3, multiple=4)
    assert prob.shape == (13, 17, 9) and prob.dtype == np.float32
    np.testing.assert_allclose(prob, sigmoid(image[0]), atol=1e-5)
    assert model.calls > 1  # really windowed (13x17x9 in 8^3 windows)
    assert window_size(6, 4) == (8, 8, 8)
    assert window_size((6, 9, 16), 4) == (8, 12, 16)


@pytest.mark.parametrize("axes", [(0, 1, 2), (1,), (0, 2)])
def test_tta_of_a_flip_equivariant_model_equals_no_tta(axes):
    rng = np.random.default_rng(2)
    image = rng.normal(0, 2, (2, 13, 17, 9)).astype(np.float32)
    plain, mirrored = ChannelLogit(multiple=4), ChannelLogit(multiple=4)
    base = sliding_window_predict(plain, image, patch_size=8, overlap=0.5, multiple=4)
    tta = sliding_window_predict(mirrored, image, patch_size=8, overlap=0.5, multiple=4, tta_axes=axes)
    np.testing.assert_allclose(tta, base, atol=1e-6)
    assert mirrored.calls == plain.calls * 2 ** len(axes)  # every window, every mirroring


class Directional(torch.nn.Module):
    """Logit = channel 0 minus its neighbour along x: not flip-equivariant."""

    def forward(self, x):
        c = x[:, :1]
        return c - torch.roll(c, 1, dims=2)


def test_tta_averages_the_mirrored_probabilities_of_each_window():
    rng = np.random.default_rng(3)
    image = rng.normal(0, 2, (1, 8, 8, 8)).astype(np.float32)
    x = torch.from_numpy(image)[None]
    expected = np.zeros((8, 8, 8), np.float32)
    for dims in ((), (2,), (3,), (2, 3)):
        out = torch.sigmoid(Directional()(torch.flip(x, dims) if dims else x))
        expected += (torch.flip(out, dims) if dims else out)[0, 0].numpy() / 4
    got = sliding_window_predict(Directional(), image, patch_size=8, tta_axes=(1, 0))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, sliding_window_predict(Directional(), image, patch_size=8), atol=1e-3)
    with pytest.raises(ValueError, match="distinct values of 0, 1, 2"):
        sliding_window_predict(Directional(), image, patch_size=8, tta_axes=(3,))


def test_tensor_input_and_unet_output_shape():
    cfg = ModelConfig(widths=[2, 4, 8])
    model = build_model(cfg, in_channels=3)
    image = torch.randn(3, 11, 20, 7)
    prob = sliding_window_predict(model, image, patch_size=10, overlap=0.25, multiple=size_multiple(cfg))
    assert prob.shape == (11, 20, 7)
    assert np.all((prob >= 0) & (prob <= 1)) and prob.std() > 0
    assert model.training  # mode restored


def _blob_case(centre, shape=(30, 26, 10), sigma_mm=5.0) -> PreparedCase:
    affine = np.array([[-1.0, 0, 0, 40], [0, 1.0, 0, -20], [0, 0, 3.0, -10], [0, 0, 0, 1]])
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1).astype(float)
    offset = (grid - np.asarray(centre, float)) * np.array([1.0, 1.0, 3.0])
    blob = np.exp(-(offset**2).sum(-1) / (2 * sigma_mm**2)).astype(np.float32)
    image = np.stack([blob, 10 + 5 * blob])
    attrs = {"norm": {"mean": [0.0, 10.0], "std": [1.0, 5.0], "region": "brain"}}
    return PreparedCase("blob", ["dwi", "adc"], image, None, affine, attrs)


def test_predict_case_at_cube_level_returns_reference_grid_and_keeps_location():
    centre = (18.0, 9.0, 4.0)
    case = _blob_case(centre)
    model = ChannelLogit(scale=20.0, shift=0.5)
    pred = predict_case(model, case, level="16", patch_size=8, normalization="zscore", overlap=0.5)
    assert isinstance(pred, Prediction)
    assert pred.level_probability.shape == (16, 16, 16)
    np.testing.assert_array_equal(pred.level_affine, cube_affine(case.image.shape[1:], case.affine, 16))
    assert pred.probability.shape == case.image.shape[1:] and pred.mask.shape == case.image.shape[1:]
    np.testing.assert_array_equal(pred.affine, case.affine)
    assert pred.mask.dtype == np.uint8 and pred.mask.sum() > 0
    truth = case.image[0] >= 0.5
    com_pred = np.array(ndimage.center_of_mass(pred.probability))
    com_truth = np.array(ndimage.center_of_mass(sigmoid(20 * (case.image[0] - 0.5))))
    assert np.abs(com_pred - com_truth).max() < 1.0, (com_pred, com_truth)
    assert np.abs(np.array(ndimage.center_of_mass(pred.mask)) - np.array(centre)).max() < 1.0
    dice = 2 * (pred.mask.astype(bool) & truth).sum() / (pred.mask.sum() + truth.sum())
    assert dice > 0.8
    # off-centre blob: a wrong direction or offset in the level mapping would move it
    moved = predict_case(model, _blob_case((8.0, 19.0, 6.0)), "16", 8, "zscore")
    assert np.abs(np.array(ndimage.center_of_mass(moved.mask)) - [8, 19, 6]).max() < 1.0


def test_predict_case_native_applies_zscore_from_case_attrs():
    case = _blob_case((10, 10, 5))
    case.image[0] = 3.0 + 2.0 * case.image[0]
    case.attrs["norm"]["mean"][0] = 3.0
    case.attrs["norm"]["std"][0] = 2.0
    pred = predict_case(ChannelLogit(), case, level="native", patch_size=8, threshold=0.6)
    np.testing.assert_allclose(pred.probability, sigmoid((case.image[0] - 3.0) / 2.0), atol=1e-5)
    np.testing.assert_array_equal(pred.mask, (pred.probability >= 0.6).astype(np.uint8))
    assert pred.level_probability is None and pred.level_affine is None


def test_predict_real_isles_case_with_unet(isles_sample):
    raw = isles_sample / "rawdata" / "sub-strokecase0009" / "ses-0001"
    images = {m: raw / f"sub-strokecase0009_ses-0001_{m}.nii.gz" for m in ("dwi", "adc", "flair")}
    case = load_case(images, subject="sub-strokecase0009")
    cfg = ModelConfig(widths=[2, 4])
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=3)
    pred = predict_case(model, case, level="32", patch_size=32, multiple=size_multiple(cfg))
    assert pred.probability.shape == (112, 112, 73)
    np.testing.assert_array_equal(pred.affine, case.affine)
    assert np.isfinite(pred.probability).all()
    assert cube_affine((112, 112, 73), case.affine, 32)[0, 0] < 0  # LAS kept on the level grid
