"""Training-time augmentation: alignment, ranges, seeding, air fill, configuration, search."""

from __future__ import annotations

import pytest
import torch

from stroke_ray.augment import augment_batch, default_air, step_generator
from stroke_ray.augment_config import AUGMENT_PRESETS, AugmentConfig
from stroke_ray.config import TrainConfig
from stroke_ray.errors import ConfigError

N = 32
SPATIAL = ("rotation", "scale", "elastic")
INTENSITY = ("bias_field", "noise", "blur", "brightness", "contrast", "low_res", "thick_slices", "gamma")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # As in a training worker (Ray sets OMP_NUM_THREADS to its CPUs, 1 by default); two
    # threads on a busy 2-core machine spend most of these small ops waiting for each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def only(**transforms) -> AugmentConfig:
    """Preset none plus the given transforms, e.g. only(rotation={"p": 1.0})."""
    return AugmentConfig(preset="none", **transforms)


def everything(p: float = 1.0) -> AugmentConfig:
    """Every transform on every sample and channel."""
    per_channel = {"p": p, "p_per_channel": 1.0}
    return AugmentConfig(
        preset="strong", flip={"p": 0.5}, rotation={"p": p}, scale={"p": p}, elastic={"p": p},
        gamma={"p": p, "p_inverted": p}, thick_slices={"p": p},
        **{name: per_channel for name in ("bias_field", "blur", "brightness", "contrast", "low_res")},
        noise={"p": p},
    )


def blob_batch(b: int = 2, c: int = 2, centre=(20.0, 13.0, 17.0), radius: float = 4.0):
    """A smooth bright blob off the patch centre: image channels = blob, mask = blob > 0.5."""
    axes = torch.arange(N, dtype=torch.float32)
    x, y, z = torch.meshgrid(axes, axes, axes, indexing="ij")
    d2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
    blob = torch.exp(-d2 / (2 * radius**2))
    image = blob.expand(b, c, N, N, N).clone()
    mask = (blob > 0.5).float().expand(b, 1, N, N, N).clone()
    return image, mask


def centroid(volume: torch.Tensor) -> torch.Tensor:
    """Centroid (3,) in voxel indices of a non-negative (X, Y, Z) volume."""
    axes = torch.arange(N, dtype=torch.float64)
    w = volume.double()
    grids = torch.meshgrid(axes, axes, axes, indexing="ij")
    return torch.stack([(g * w).sum() / w.sum() for g in grids])


def run(image, mask, cfg, step=0, air=None, seed=0):
    return augment_batch(image, mask, cfg, generator=step_generator("cpu", seed, 0, step), air=air)


# --- behaviour -----------------------------------------------------------------------------


def test_none_is_the_identity():
    image, mask = torch.randn(2, 3, N, N, N), (torch.rand(2, 1, N, N, N) > 0.8).float()
    for step in range(5):
        out_image, out_mask = run(image, mask, AugmentConfig(), step=step)
        assert out_image is image and out_mask is mask


def test_image_and_mask_stay_aligned_under_every_spatial_transform():
    # The image is the mask itself (air 0): resampled with the same grid, the image at >= 0.5
    # must be exactly the mask, sample by sample, whatever rotation/scale/elastic/flip drew.
    _, mask = blob_batch(b=4, c=1, radius=6.0)
    cfg = only(flip={"p": 0.5}, rotation={"p": 1.0}, scale={"p": 1.0}, elastic={"p": 1.0})
    for step in range(4):
        out_image, out_mask = run(mask.clone(), mask, cfg, step=step, air=torch.zeros(1))
        assert not torch.equal(out_mask, mask)  # something moved
        assert torch.equal((out_image >= 0.5).float(), out_mask)


def test_known_point_maps_to_the_same_voxel_in_image_and_mask():
    # Zooming in 2x about the patch centre moves a point at offset d to offset 2d; flipping
    # axis 0 then mirrors it. Both the image blob and the mask blob must land there.
    centre = torch.tensor([18.0, 13.5, 17.0])
    image, mask = blob_batch(b=1, c=1, centre=tuple(centre.tolist()), radius=1.5)
    mid = (N - 1) / 2
    zoomed = mid + 2 * (centre - mid)
    out_image, out_mask = run(image, mask, only(scale={"p": 1.0, "range": (2.0, 2.0)}), air=torch.zeros(1))
    assert torch.allclose(centroid(out_image[0, 0]).float(), zoomed, atol=0.3)
    assert torch.allclose(centroid(out_mask[0, 0]).float(), zoomed, atol=0.3)
    flipped = zoomed.clone()
    flipped[0] = N - 1 - flipped[0]
    both = only(scale={"p": 1.0, "range": (2.0, 2.0)}, flip={"p": 1.0})
    out_image, out_mask = run(image, mask, both, air=torch.zeros(1))
    expect = N - 1 - zoomed  # p = 1 flips all three axes
    assert torch.allclose(centroid(out_image[0, 0]).float(), expect, atol=0.3)
    assert torch.allclose(centroid(out_mask[0, 0]).float(), expect, atol=0.3)


def test_flips_are_exact_mirrors():
    image, mask = torch.randn(2, 2, N, N, N), (torch.rand(2, 1, N, N, N) > 0.8).float()
    out_image, out_mask = run(image, mask, only(flip={"p": 1.0}))
    assert torch.equal(out_image, image.flip(2, 3, 4)) and torch.equal(out_mask, mask.flip(2, 3, 4))


def test_outside_the_patch_is_filled_with_air_and_the_mask_with_zero():
    image = torch.rand(2, 3, N, N, N) + 1.0  # brighter than any air value
    mask = torch.ones(2, 1, N, N, N)
    air = torch.tensor([-1.5, -0.7, -2.0])
    shrink = only(scale={"p": 1.0, "range": (0.7, 0.7)}, rotation={"p": 1.0, "degrees": 30.0})
    out_image, out_mask = run(image, mask, shrink, air=air)
    for corner in [(0, 0, 0), (N - 1, N - 1, N - 1), (0, N - 1, 0)]:
        assert torch.allclose(out_image[(slice(None), slice(None), *corner)], air.expand(2, 3))
        assert (out_mask[(slice(None), 0, *corner)] == 0).all()
    # per-sample air (as PatchDataset batches it) and the default, each channel's minimum
    per_sample = torch.stack([air, air - 1.0])
    out_image, _ = run(image, mask, shrink, air=per_sample)
    assert torch.allclose(out_image[:, :, 0, 0, 0], per_sample)
    out_image, _ = run(image, mask, shrink)
    assert torch.allclose(out_image[:, :, 0, 0, 0], default_air(image))


def test_dtypes_and_value_ranges_are_kept():
    image = torch.randn(2, 3, N, N, N)
    mask = (torch.rand(2, 1, N, N, N) > 0.7).float()
    air = default_air(image)
    for step in range(3):
        out_image, out_mask = run(image, mask, everything(), step=step, air=air)
        assert out_image.dtype == torch.float32 and out_mask.dtype == torch.float32
        assert out_image.shape == image.shape and out_mask.shape == mask.shape
        assert torch.isfinite(out_image).all()
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    # spatial resampling interpolates: values stay within [air, max] of each channel
    spatial = only(rotation={"p": 1.0}, scale={"p": 1.0}, elastic={"p": 1.0})
    out_image, _ = run(image, mask, spatial, air=air)
    lo, hi = image.flatten(2).amin(2), image.flatten(2).amax(2)
    assert (out_image.flatten(2).amin(2) >= torch.minimum(lo, air) - 1e-5).all()
    assert (out_image.flatten(2).amax(2) <= hi + 1e-5).all()
    # contrast keeps each channel within its own range (nnU-Net's preserve_range)
    out_image, _ = run(image, mask, only(contrast={"p": 1.0, "range": (1.5, 1.5)}))
    assert (out_image.flatten(2).amax(2) <= hi + 1e-5).all() and (out_image.flatten(2).amin(2) >= lo - 1e-5).all()


def test_intensity_transforms_leave_the_mask_and_air_structure_alone():
    image, mask = blob_batch(b=2, c=3)
    out_image, out_mask = run(image, mask, only(**{n: {"p": 1.0} for n in INTENSITY}), air=torch.zeros(3))
    assert out_mask is mask
    assert not torch.equal(out_image, image)
    # brightness is multiplicative about air: a zero-air image scaled stays zero where it was zero
    flat = torch.zeros(1, 1, N, N, N)
    flat[..., 10:20, 10:20, 10:20] = 1.0
    out, _ = run(flat, flat.clone(), only(brightness={"p": 1.0, "range": (1.2, 1.2)}), air=torch.zeros(1))
    assert torch.allclose(out, flat * 1.2)


def test_thick_slices_average_along_one_axis_per_sample_and_keep_the_range():
    # One bright plane per sample, across axis 0, 1 or 2 (sample 0, 1, 2): averaging slabs
    # along that plane's normal spreads it onto its neighbours and lowers its peak; averaging
    # along any other axis leaves it as it is. So exactly one of a sample's transforms changes it.
    zoom = (0.25, 0.25)
    plane = torch.zeros(3, 2, N, N, N)
    for s in range(3):
        index = [s, slice(None), slice(None), slice(None), slice(None)]
        index[2 + s] = 13
        plane[tuple(index)] = 1.0
    mask = (torch.rand(3, 1, N, N, N) > 0.9).float()
    changed = torch.zeros(3, dtype=torch.int64)
    for step in range(12):
        out, out_mask = run(plane, mask, only(thick_slices={"p": 1.0, "zoom": zoom}), step=step, air=torch.zeros(2))
        assert out_mask is mask  # the lesion stays where it is: the network must find it whole
        assert out.min() >= -1e-6 and out.max() <= 1.0 + 1e-6  # convex combinations only
        assert torch.equal(out[:, 0], out[:, 1])  # all channels of a sample alike
        for s in range(3):
            if not torch.allclose(out[s], plane[s], atol=1e-6):
                changed[s] += 1
                assert out[s].max() < 0.6  # the plane spread over a 4-voxel slab
                assert torch.isclose(out[s].sum(), plane[s].sum(), rtol=0.05)  # slab means keep the signal
    # over 12 draws each sample's normal was drawn sometimes, but not always
    assert (changed > 0).all() and (changed < 12).all()


def test_seeded_and_reproducible():
    image, mask = torch.randn(2, 2, N, N, N), (torch.rand(2, 1, N, N, N) > 0.8).float()
    a = run(image, mask, everything(), step=7, seed=3)
    b = run(image, mask, everything(), step=7, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = run(image, mask, everything(), step=8, seed=3)
    d = run(image, mask, everything(), step=7, seed=4)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    g1, g2 = step_generator("cpu", 0, 0, 5), step_generator("cpu", 0, 1, 5)  # ranks differ
    assert not torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_bad_inputs_raise():
    image, mask = torch.randn(2, 2, N, N, N), torch.zeros(2, 1, N, N, N)
    with pytest.raises(ValueError, match="mask"):
        run(image, mask[:, :, :-1], everything())
    with pytest.raises(ValueError, match="mask"):
        run(image[0], mask[0], everything())


# --- configuration -------------------------------------------------------------------------


def test_presets_by_name_and_per_transform_overrides():
    assert TrainConfig().augment.resolved() == AugmentConfig(preset="none").resolved()
    named = TrainConfig.from_dict({"augment": "strong"}).augment
    assert named == AugmentConfig(preset="strong")
    cfg = TrainConfig.from_dict(
        {"augment": {"preset": "strong", "rotation": {"degrees": 15}, "elastic": {"p": 0.2}}}
    ).augment.resolved()
    assert cfg.rotation.degrees == 15 and cfg.rotation.p == AUGMENT_PRESETS["strong"]["rotation"]["p"]
    assert cfg.elastic.p == 0.2 and cfg.elastic.magnitude == AUGMENT_PRESETS["strong"]["elastic"]["magnitude"]
    none = AugmentConfig(preset="none").resolved()
    assert all(getattr(none, name).p == 0.0 for name in ("flip", *SPATIAL, *INTENSITY))
    assert none.gamma.p_inverted == 0.0
    strong = AugmentConfig(preset="strong").resolved()
    assert strong.flip.p == 0.5 and strong.rotation.degrees == 30.0 and strong.scale.range == (0.7, 1.4)
    # a dumped config (checkpoint, MLflow, Tune) reloads to the same augmentation
    raw = TrainConfig.from_dict({"augment": {"preset": "light", "noise": {"p": 0.5}}}).model_dump(mode="json")
    assert TrainConfig.from_dict(raw).augment.resolved().noise.p == 0.5
    assert TrainConfig.from_dict(raw).augment.preset == "light"


@pytest.mark.parametrize(
    "raw, field",
    [
        ("heavy", "augment.preset"),
        ({"elastic": {"p": 1.5}}, "augment.elastic.p"),
        ({"scale": {"range": [1.4, 0.7]}}, "augment.scale.range"),
        ({"scale": {"range": [0.0, 1.4]}}, "augment.scale.range"),
        ({"rotation": {"degrees": -5}}, "augment.rotation.degrees"),
        ({"rotaton": {"p": 0.1}}, "augment.rotaton"),
        ({"blur": {"p_per_channel": 2}}, "augment.blur.p_per_channel"),
    ],
)
def test_config_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TrainConfig.from_dict({"augment": raw}, source="train.yaml")


def test_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    from stroke_ray.augment_spatial import gaussian_blur

    rows = torch.randn(2, 12, 13, 14)
    sigma = torch.tensor([[1.0, 0.5, 0.8], [0.6, 1.0, 0.7]])
    out = gaussian_blur(rows, sigma)
    for r in range(2):
        # scipy's radius is int(truncate * sigma + 0.5); ours ceil(3 * max sigma) = 3 for all
        expect = gaussian_filter(rows[r].double().numpy(), sigma[r].tolist(), mode="nearest", radius=3)
        assert torch.allclose(out[r].double(), torch.from_numpy(expect), atol=1e-5)


def test_train_command_rejects_a_bad_preset(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stroke_ray.cli import app

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "train.yaml"
    config.write_text("augment: {preset: light, elastic: {p: 0.3}}\n")
    # a bad preset fails at validation, before any store, Ray or MLflow run is touched
    out = CliRunner().invoke(app, ["train", "--config", str(config), "--augment", "heavy"])
    assert out.exit_code == 2 and "augment.preset" in out.output and "train.yaml" in out.output
    assert not (tmp_path / "mlflow.db").exists()


def test_rotation_of_a_non_cubic_patch_is_a_rotation_in_voxel_space():
    import torch.nn.functional as F

    from stroke_ray.augment_spatial import voxel_affine_grid

    shape = (32, 24, 40)
    mid = torch.tensor([(e - 1) / 2 for e in shape])
    axes = [torch.arange(e, dtype=torch.float32) for e in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    point = mid + torch.tensor([5.0, 0.0, 3.0])
    blob = torch.exp(-((x - point[0]) ** 2 + (y - point[1]) ** 2 + (z - point[2]) ** 2) / 2.0)
    # 90 degrees in the (X, Y) plane: input offset = R @ output offset
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = F.grid_sample(blob[None, None], voxel_affine_grid(rot[None], shape), align_corners=False)[0, 0]
    grids = torch.meshgrid(*[a.double() for a in axes], indexing="ij")
    found = torch.stack([(g * out).sum() / out.sum() for g in grids]).float()
    expect = mid + rot.T @ (point - mid)  # output offset = R^T @ input offset
    assert torch.allclose(found, expect, atol=0.05), (found, expect)


def test_a_one_voxel_lesion_survives_rotation_and_zoom_at_its_brightest_voxel():
    # A single lesion voxel under a rotation or a zoom out spreads below 0.5 everywhere;
    # thresholding alone would erase it while the image still shows it.
    image = torch.zeros(8, 1, N, N, N)
    image[:, 0, 15, 17, 14] = 1.0
    mask = image.clone()
    cfg = only(rotation={"p": 1.0, "degrees": 30.0}, scale={"p": 1.0, "range": (0.7, 1.0)})
    erased = 0
    for step in range(3):
        out_image, out_mask = run(image, mask, cfg, step=step, air=torch.zeros(1))
        erased += int(((out_image >= 0.5).flatten(1).sum(1) == 0).sum())
        for i in range(8):
            peak = out_image[i, 0] == out_image[i, 0].max()
            if out_image[i, 0].max() >= 0.1:
                assert out_mask[i, 0].sum() >= 1 and bool(out_mask[i, 0][peak].all()), (step, i)
            assert bool((out_mask[i, 0] <= (out_image[i, 0] > 0)).all())  # never outside the lesion's spread
    assert erased > 0  # the draws did push the lesion below 0.5 somewhere
