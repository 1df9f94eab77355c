"""Ingest: the real ISLES'22 case, every bad input, conversion on Ray and in-process, resume."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from stroke_ray.cli import app
from stroke_ray.datasets import discover
from stroke_ray.errors import ConfigError, InputFileError
from stroke_ray.grid import cube_affine, resample_mask
from stroke_ray.ingest import convert_dataset, load_case, make_levels, sha256_of
from stroke_ray.store import StrokeStore

SHAPE = (12, 12, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-12.0, -12.0, -10.0]


# --- the real ISLES'22 case ------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_case(isles_sample):
    cases, problems = discover(isles_sample)
    assert problems == []
    case = cases[0]
    return case, load_case(case.images, case.mask, subject=case.subject)


def test_real_case_on_the_dwi_grid(real_case):
    files, case = real_case
    dwi = nib.load(files.images["dwi"])
    assert case.modalities == ["dwi", "adc", "flair"]
    assert case.image.shape == (3, 112, 112, 73) and case.image.dtype == np.float32
    assert case.mask.dtype == np.uint8 and int(case.mask.sum()) == 523
    np.testing.assert_allclose(case.affine, dwi.affine)
    np.testing.assert_allclose(case.image[0], np.asarray(dwi.dataobj, np.float32))
    ref = case.attrs["reference"]
    assert ref["modality"] == "dwi" and ref["shape"] == [112, 112, 73] and ref["orientation"] == "LAS"
    flair_src = case.attrs["sources"]["flair"]
    assert flair_src["shape"] == [512, 512, 29] and flair_src["sha256"] == sha256_of(files.images["flair"])
    assert case.attrs["sources"]["mask"]["dtype"] == "uint16"
    json.dumps(case.attrs)  # JSON-able as the store needs


def test_flair_resampled_onto_dwi_brain(real_case):
    _, case = real_case
    dwi, flair = case.image[0], case.image[2]
    assert np.count_nonzero(flair) > 0.2 * flair.size

    def brain(x):
        return x > 0.1 * np.percentile(x, 99.5)

    dwi_brain, flair_brain = brain(dwi), brain(flair)
    overlap = 2 * np.count_nonzero(dwi_brain & flair_brain) / (dwi_brain.sum() + flair_brain.sum())
    assert overlap > 0.8, overlap
    # Intensities agree voxel by voxel where both see brain: the grids really are aligned.
    both = dwi_brain & flair_brain
    assert np.corrcoef(dwi[both], flair[both])[0, 1] > 0.3
    # A deliberately shifted FLAIR would correlate far less with the DWI brain outline.
    shifted = np.roll(flair_brain, 8, axis=1)
    assert overlap > 2 * np.count_nonzero(dwi_brain & shifted) / (dwi_brain.sum() + shifted.sum()) + 0.05


def test_real_case_norm_stats_are_per_channel_brain(real_case):
    _, case = real_case
    norm = case.attrs["norm"]
    assert norm["region"] == "brain" and len(norm["mean"]) == 3 and len(norm["std"]) == 3
    for c in range(3):
        channel = case.image[c]
        assert norm["mean"][c] > channel.mean()  # background excluded raises the mean
        assert norm["std"][c] > 0


def test_real_case_levels_and_store_round_trip(real_case, tmp_path):
    files, case = real_case
    levels = make_levels(case, [32])
    assert set(levels) == {"native", "32"}
    cube = levels["32"]
    assert cube.image.shape == (3, 32, 32, 32) and cube.mask.shape == (32, 32, 32)
    np.testing.assert_allclose(cube.affine, cube_affine((112, 112, 73), case.affine, 32))
    assert cube.mask.sum() > 0 and np.count_nonzero(cube.image[2]) > 0

    store = StrokeStore.create(str(tmp_path / "s.zarr"), case.modalities, ["native", "32"])
    store.write_subject(case.subject, levels, case.attrs)
    store = StrokeStore.open(str(tmp_path / "s.zarr"))
    assert store.subjects() == [files.subject]
    np.testing.assert_allclose(store.affine(files.subject), nib.load(files.images["dwi"]).affine)
    native_mask = store.mask(files.subject)[...]
    assert int(native_mask.sum()) == 523

    # Back to the mask file's own space: the stored mask reproduces the original exactly.
    original = nib.load(files.mask)
    back = resample_mask(native_mask, store.affine(files.subject), original.shape, original.affine)
    np.testing.assert_array_equal(back, np.asarray(original.dataobj).astype(np.uint8))


# --- tiny synthetic cases --------------------------------------------------------------------
def blob_image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    head = (x**2 + y**2 + z**2 < 0.8).astype(np.float32)
    return (head * (100 + 10 * rng.standard_normal(SHAPE))).astype(np.float32)


def blob_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:8, 4:8, 3:7] = 1
    return mask


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def make_subject(root: Path, sub: str, seed: int = 0, modalities=("dwi", "adc", "flair")) -> dict[str, Path]:
    raw = root / "rawdata" / sub / "ses-1"
    paths = {m: save(raw / f"{sub}_ses-1_{m}.nii.gz", blob_image(seed + i)) for i, m in enumerate(modalities)}
    paths["mask"] = save(root / "derivatives" / sub / "ses-1" / f"{sub}_ses-1_msk.nii.gz", blob_mask())
    return paths


def save_singular(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save with only an sform (nibabel cannot build a qform from a singular matrix)."""
    img = nib.Nifti1Image(data, None)
    img.set_sform(affine, code=2)
    img.set_qform(None, code=0)
    nib.save(img, str(path))
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def break_subject(paths: dict[str, Path], how: str) -> Path:
    """Damage one file of a subject in one way; returns the damaged file."""
    if how == "truncated":
        truncate(paths["adc"])
        return paths["adc"]
    if how == "4d":
        save(paths["flair"], np.stack([blob_image()] * 3, axis=-1))
        return paths["flair"]
    if how == "nan":
        data = blob_image()
        data[1, 2, 3] = np.nan
        save(paths["dwi"], data)
        return paths["dwi"]
    if how == "nonbinary":
        save(paths["mask"], blob_mask() * 2)
        return paths["mask"]
    if how == "singular-mask-grid":
        bad = AFFINE.copy()
        bad[2, 2] = 0.0
        return save_singular(paths["mask"], np.zeros((6, 6, 5), np.uint8), bad)
    if how == "garbage":
        paths["dwi"].write_bytes(b"not a nifti at all" * 10)
        return paths["dwi"]
    if how == "degenerate":
        bad = AFFINE.copy()
        bad[:3, 0] = 0.0
        return save_singular(paths["dwi"], blob_image(), bad)
    if how == "inf-after-cast":
        data = blob_image().astype(np.float64)
        data[2, 3, 4] = 1e300
        return save(paths["dwi"], data)
    if how == "all-zero":
        return save(paths["flair"], np.zeros(SHAPE, np.float32))
    if how == "mask-other-grid":
        shifted = AFFINE.copy()
        shifted[0, 3] += 2.0
        return save(paths["mask"], blob_mask(), shifted)
    if how == "no-orientation":
        paths["adc"].unlink()
        nib.save(nib.Nifti1Image(blob_image(), None, header=nib.Nifti1Header()), str(paths["adc"]))
        return paths["adc"]
    if how == "voxel-size":
        return save(paths["adc"], blob_image(), np.diag([2.0, 2.0, 40.0, 1.0]))
    if how == "too-wide":
        return save(paths["flair"], np.ones((1100, 2, 2), np.float32))
    if how == "bomb":
        # A valid header and image, then 64 MiB more zeros in the same gzip stream.
        raw = nib.Nifti1Image(blob_image(), AFFINE).to_bytes()
        comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        blob = comp.compress(raw) + b"".join(comp.compress(b"\0" * (1 << 20)) for _ in range(64)) + comp.flush()
        paths["adc"].write_bytes(blob)
        return paths["adc"]
    if how == "empty-file":
        paths["dwi"].write_bytes(b"")
        return paths["dwi"]
    if how == "no-overlap":
        return save(paths["flair"], blob_image(2), far_away())
    if how == "mask-outside-fov":  # an error only with --resample-masks; without, the grids differ
        return save(paths["mask"], blob_mask(), far_away())
    raise ValueError(how)


def far_away() -> np.ndarray:
    """The test grid moved 1 m along x: its field of view misses the reference's entirely."""
    moved = AFFINE.copy()
    moved[0, 3] += 1000.0
    return moved


BAD = {
    "truncated": "truncated image data: the stream ends after",
    "4d": "4D image with 3 volumes; a 3D volume is expected",
    "nan": "1 NaN/inf voxels",
    "nonbinary": "mask is not binary: has values 2 besides 0 and 1",
    "singular-mask-grid": "does not match the dwi grid .* cannot be resampled onto it: degenerate affine",
    "garbage": "not a readable NIfTI image",
    "degenerate": "degenerate affine",
    "inf-after-cast": "1 voxels exceed the float32 range \\(largest 1e\\+300\\) and would become inf",
    "all-zero": "every voxel is 0: the image is empty",
    "mask-other-grid": "mask grid differs from the dwi grid \\(affines differ by up to 2 mm\\); pass --resample-masks",
    "no-orientation": "no orientation: qform_code and sform_code are both 0",
    "voxel-size": "voxel size 2 x 2 x 40 mm is outside the allowed 0.1-20 mm",
    "too-wide": "image of shape \\(1100, 2, 2\\) is larger than the limit of 1024 voxels per axis",
    "bomb": "image data is longer than the 6112 bytes its header promises",
    "empty-file": "empty file",
    "no-overlap": "does not overlap the dwi image's field of view \\(check the affines\\)",
}
# Bad only when masks are resampled (`--resample-masks`); without it, the grid difference is the error.
BAD_WHEN_RESAMPLED = {
    "mask-outside-fov": "mask lesion lies outside the dwi image's field of view",
}


def images_of(paths):
    return {m: p for m, p in paths.items() if m != "mask"}


@pytest.mark.parametrize("how", sorted(BAD))
def test_bad_input_names_file_and_problem(tmp_path, how):
    paths = make_subject(tmp_path, "sub-01")
    damaged = break_subject(paths, how)
    with pytest.raises(InputFileError, match=BAD[how]) as info:
        load_case(images_of(paths), paths["mask"])
    assert info.value.path == str(damaged)
    assert str(info.value).startswith(f"{damaged}: ")


@pytest.mark.parametrize("how", sorted(BAD_WHEN_RESAMPLED))
def test_bad_input_with_resampled_masks_names_file_and_problem(tmp_path, how):
    root = tmp_path / "ds"
    paths = make_subject(root, "sub-01")
    damaged = break_subject(paths, how)
    with pytest.raises(InputFileError, match="mask grid differs from the dwi grid"):
        load_case(images_of(paths), paths["mask"])
    with pytest.raises(InputFileError, match=BAD_WHEN_RESAMPLED[how]) as info:
        load_case(images_of(paths), paths["mask"], resample_masks=True)
    assert info.value.path == str(damaged)
    assert str(info.value).startswith(f"{damaged}: ")
    # Through the CLI: its own line and a non-zero exit, while the good subject converts.
    make_subject(root, "sub-good", seed=5)
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["convert", str(root), "-o", str(out), "--levels", "16", "--spacing", "",
                                      "--resample-masks", "--in-process"])
    assert result.exit_code == 1, result.output
    assert "converted 1, skipped 0 (already complete), failed 1" in result.output
    mine = [line for line in result.output.replace("\r", "\n").splitlines() if line.startswith("sub-01: ")]
    assert len(mine) == 1 and mine[0].startswith(f"sub-01: {damaged}: "), result.output
    assert re.search(BAD_WHEN_RESAMPLED[how], mine[0]), mine[0]
    assert StrokeStore.open(str(out)).subjects() == ["sub-good"]


def test_missing_file(tmp_path):
    paths = make_subject(tmp_path, "sub-01")
    paths["adc"].unlink()
    with pytest.raises(InputFileError, match="adc.nii.gz: file does not exist"):
        load_case(images_of(paths), paths["mask"])


def test_trailing_singleton_dim_is_squeezed_and_mask_resampled(tmp_path):
    paths = make_subject(tmp_path, "sub-01")
    save(paths["adc"], blob_image(1)[..., None])
    # The mask on a grid twice as fine, voxel centres placed so the coarse grid is exact.
    fine = AFFINE.copy()
    fine[:3, :3] /= 2
    fine[:3, 3] -= 0.5
    save(paths["mask"], np.repeat(np.repeat(np.repeat(blob_mask(), 2, 0), 2, 1), 2, 2).astype(np.uint16), fine)
    with pytest.raises(InputFileError, match="mask grid differs from the dwi grid .* vs .*; pass --resample-masks"):
        load_case(images_of(paths), paths["mask"])
    case = load_case(images_of(paths), paths["mask"], resample_masks=True)
    assert case.image.shape == (3, *SHAPE)
    np.testing.assert_array_equal(case.image[1], blob_image(1))
    np.testing.assert_array_equal(case.mask, blob_mask())


def test_other_modality_on_its_own_grid_is_resampled(tmp_path):
    paths = make_subject(tmp_path, "sub-01")
    # FLAIR with the same content on a grid shifted by one voxel along x: after resampling
    # through the affines it must land back where the DWI grid expects it.
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    content = blob_image(2)
    save(paths["flair"], np.roll(content, -1, axis=0), shifted)
    case = load_case(images_of(paths), paths["mask"])
    np.testing.assert_allclose(case.image[2][1:-1], content[1:-1], atol=1e-4)


# --- conversion -------------------------------------------------------------------------------
@pytest.fixture()
def mixed_dataset(tmp_path) -> tuple[Path, dict[str, Path]]:
    """Two good subjects and five bad ones (plus one missing its FLAIR)."""
    root = tmp_path / "mixed"
    make_subject(root, "sub-good1", seed=0)
    make_subject(root, "sub-good2", seed=5)
    damaged = {}
    for i, how in enumerate(["truncated", "4d", "nan", "nonbinary", "singular-mask-grid"]):
        sub = f"sub-bad{i}"
        damaged[sub] = break_subject(make_subject(root, sub, seed=10 + i), how)
    (root / "rawdata" / "sub-bad5" / "ses-1").mkdir(parents=True)
    paths = make_subject(root, "sub-bad5", seed=20)
    paths["flair"].unlink()
    damaged["sub-bad5"] = paths["flair"]
    return root, damaged


def check_mixed_report(report, damaged, store_url):
    assert report.converted == 2 and report.skipped == 0
    assert sorted(p.subject for p in report.failed) == sorted(damaged)
    for problem in report.failed:
        assert problem.path == str(damaged[problem.subject])
    lines = report.summary().splitlines()
    assert lines[0] == "converted 2, skipped 0 (already complete), failed 6"
    assert any(line.startswith("sub-bad2: ") and line.endswith("1 NaN/inf voxels") for line in lines)
    store = StrokeStore.open(store_url)
    assert store.subjects() == ["sub-good1", "sub-good2"]
    assert store.subjects(include_incomplete=True) == ["sub-good1", "sub-good2"]
    assert store.image("sub-good1", "16").shape == (3, 16, 16, 16)
    np.testing.assert_array_equal(store.mask("sub-good2")[...], blob_mask())


def test_convert_on_ray_collects_failures(mixed_dataset, tmp_path, ray_local):
    root, damaged = mixed_dataset
    url = f"file://{tmp_path / 'ray.zarr'}"
    report = convert_dataset(str(root), url, levels=[16], progress=False)
    check_mixed_report(report, damaged, url)


def test_convert_in_process_to_memory_url(mixed_dataset):
    root, damaged = mixed_dataset
    url = "memory://test-ingest/mixed.zarr"
    report = convert_dataset(str(root), url, levels=[16], parallel=False, progress=False)
    check_mixed_report(report, damaged, url)
    assert StrokeStore.open(url).normalization == "zscore"


def test_resume_skips_rewrites_and_reconverts(tmp_path):
    root = tmp_path / "ds"
    paths = {sub: make_subject(root, sub, seed=i) for i, sub in enumerate(["sub-a", "sub-b", "sub-c"])}
    out = str(tmp_path / "s.zarr")
    first = convert_dataset(str(root), out, levels=[16], normalization="none", parallel=False, progress=False)
    assert (first.converted, first.skipped, first.failed) == (3, 0, [])

    store = StrokeStore.open(out, mode="r+")
    # sub-a: an interrupted first write (a version half there, never made current).
    holder = store.group["subjects"]["sub-a"]
    version = holder.attrs["current"]
    holder.attrs.put({})
    del holder[version]["16"]
    assert store.subjects() == ["sub-b", "sub-c"]
    # sub-b: its DWI changed on disk since the conversion.
    save(paths["sub-b"]["dwi"], blob_image(99))

    again = convert_dataset(str(root), out, levels=[16], normalization="none", parallel=False, progress=False)
    assert (again.converted, again.skipped, again.failed) == (2, 1, [])
    store = StrokeStore.open(out)
    assert store.subjects() == ["sub-a", "sub-b", "sub-c"]
    assert store.image("sub-a", "16").shape == (3, 16, 16, 16)
    np.testing.assert_array_equal(store.image("sub-b")[0], blob_image(99))
    assert store.meta("sub-b")["sources"]["dwi"]["sha256"] == sha256_of(paths["sub-b"]["dwi"])

    third = convert_dataset(str(root), out, levels=[16], normalization="none", parallel=False, progress=False)
    assert (third.converted, third.skipped) == (0, 3)
    # A store made with other settings is refused rather than mixed.
    with pytest.raises(Exception, match="existing store was made with"):
        convert_dataset(str(root), out, levels=[16], normalization="zscore", parallel=False, progress=False)


def test_convert_rejects_bad_settings(tmp_path):
    root = tmp_path / "ds"
    make_subject(root, "sub-a")
    with pytest.raises(ConfigError, match="unknown normalization"):
        convert_dataset(str(root), str(tmp_path / "s.zarr"), normalization="minmax", parallel=False)
    with pytest.raises(ConfigError, match="unknown modality 't1w'"):
        convert_dataset(str(root), str(tmp_path / "s.zarr"), modalities=["t1w"], parallel=False)
    assert not (tmp_path / "s.zarr").exists()


def test_cli_convert_into_a_store_of_other_settings_names_the_flags_that_match_it(tmp_path):
    root = tmp_path / "ds"
    make_subject(root, "sub-a")
    out = str(tmp_path / "s.zarr")
    runner = CliRunner()
    made = ["-m", "dwi,adc", "--levels", "16", "--spacing", "4", "--normalization", "none"]
    first = runner.invoke(app, ["convert", str(root), "-o", out, *made, "--in-process"])
    assert first.exit_code == 0, first.output

    other = runner.invoke(app, ["convert", str(root), "-o", out, "--levels", "8", "--in-process"])
    assert other.exit_code == 2, other.output
    errors = [line for line in other.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out}: existing store was made with "), other.output
    line = errors[0]
    assert "modalities dwi,adc, levels native,16,4mm, normalization none, not " in line
    flags = re.search(r"convert with (.*); else use another output path$", line)
    assert flags and flags[1] == "-m dwi,adc --levels 16 --spacing 4 --normalization none"
    store = StrokeStore.open(out)
    assert store.levels == ["native", "16", "4mm"] and store.subjects() == ["sub-a"]  # nothing written

    # the flags named reproduce the store: the subject is found complete
    again = runner.invoke(app, ["convert", str(root), "-o", out, *flags[1].split(), "--in-process"])
    assert again.exit_code == 0, again.output
    assert "converted 0, skipped 1" in again.output


def test_cli_convert_exit_codes(mixed_dataset, tmp_path):
    root, damaged = mixed_dataset
    runner = CliRunner()
    out = str(tmp_path / "cli.zarr")
    result = runner.invoke(app, ["convert", str(root), "-o", out, "--levels", "16", "--in-process"])
    assert result.exit_code == 1, result.output
    assert "converted 2, skipped 0 (already complete), failed 6" in result.output
    assert f"sub-bad0: {damaged['sub-bad0']}: truncated image data: the stream ends after" in result.output
    result = runner.invoke(app, ["convert", str(root), "-o", out, "-m", "dwi,t2", "--in-process"])
    assert result.exit_code == 2
    assert "unknown modality 't2'" in result.output


def test_every_bad_input_is_one_line_and_the_good_subjects_convert(tmp_path):
    """One folder holding every kind of bad input beside two good subjects (CLI, in process)."""
    root = tmp_path / "all-bad"
    make_subject(root, "sub-good1", seed=0)
    make_subject(root, "sub-good2", seed=5)
    damaged = {}
    for i, how in enumerate(sorted(BAD)):
        damaged[f"sub-bad-{how}"] = break_subject(make_subject(root, f"sub-bad-{how}", seed=10 + i), how)
    out = tmp_path / "all.zarr"
    result = CliRunner().invoke(app, ["convert", str(root), "-o", str(out), "--levels", "16", "--in-process"])
    assert result.exit_code == 1, result.output
    assert f"converted 2, skipped 0 (already complete), failed {len(BAD)}" in result.output
    lines = result.output.replace("\r", "\n").splitlines()
    for subject, path in damaged.items():
        how = subject[len("sub-bad-"):]
        mine = [line for line in lines if line.startswith(f"{subject}: ")]
        assert len(mine) == 1, (subject, lines)
        assert mine[0].startswith(f"{subject}: {path}: ")
        assert re.search(BAD[how], mine[0]), (how, mine[0])
    assert StrokeStore.open(str(out)).subjects() == ["sub-good1", "sub-good2"]
