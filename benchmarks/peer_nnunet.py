"""The nnU-Net v2 peer of the accuracy benchmark: its own 3d_fullres plan, trained on the CPU
for a wall-clock budget, predicting held-out cases with its own mirroring TTA.

    .venv/bin/pip install -e ".[peer]" "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
    .venv/bin/python benchmarks/peer_nnunet.py --train TRAIN --test TEST --work DIR [--budget 1800] [--seed 0]

TRAIN and TEST are stroke-ray stores (their native level is exported with
`stroke_ray.nnunet_export.export_nnunet`, the code behind `stroke-ray export-nnunet`) or
nnU-Net v2 raw datasets (a folder with dataset.json; TEST may also be a folder of
`<case>_<channel:04d>.nii.gz` files). From Python::

    from peer_nnunet import run_nnunet   # with benchmarks/ on sys.path
    masks = run_nnunet(train_dir, test_dir, work_dir, budget_s=1800, seed=0)   # {case: mask path}

What runs, all nnU-Net's own code (nothing of it is copied here): fingerprint extraction,
the default `ExperimentPlanner` (3d_fullres only; patch and batch size as it plans them),
preprocessing, then a trainer subclass defined below (`nnUNetTrainerBudget`): nnU-Net's
default trainer (augmentation, deep supervision, poly LR, Dice+CE) with 50 iterations per
epoch instead of 250 and 5 validation iterations instead of 50, the number of epochs
re-estimated after every epoch so that the poly schedule reaches its end when the budget
is spent (checked every iteration, with room kept for the epoch's validation iterations:
the last epoch is cut short rather than overrun),
trained on all training cases (fold `all`), seeded. nnU-Net looks trainers up
by class name inside its own package, so this one is driven from Python and its
predictor is built with `nnUNetPredictor.manual_initialization`; prediction uses sliding
windows with Gaussian weighting, step 0.5 and mirroring on all axes, as nnU-Net ships it.

The work happens in a child process (nnU-Net reads nnUNet_raw/nnUNet_preprocessed/
nnUNet_results when imported, so each run gets its own folders under `work`), with 2
torch threads and data augmentation in the main thread (nnUNet_n_proc_DA=0). Nothing is
downloaded. The masks come back on each test case's native grid (the reference
modality's), checked against the input's shape and affine, in `work/masks/<case>.nii.gz`;
`work/peer_result.json` holds the plan, the iterations per second and the time spent in
preprocessing, training and prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID:03d}_StrokeRayPeer"
CONFIGURATION = "3d_fullres"
ITERATIONS_PER_EPOCH = 50
VAL_ITERATIONS_PER_EPOCH = 5


def run_nnunet(train_dir: str | Path, test_dir: str | Path, work_dir: str | Path, budget_s: float = 1800.0,
               seed: int = 0, threads: int = 2, clock: str = "wall") -> dict[str, Path]:
    """Train nnU-Net v2 3d_fullres on `train_dir` for `budget_s` seconds and predict `test_dir`.

    Args:
        train_dir: a stroke-ray store or an nnU-Net v2 raw dataset folder.
        test_dir: a stroke-ray store, an nnU-Net v2 raw dataset folder (its imagesTs, else
            imagesTr) or a folder of `<case>_<channel:04d>.nii.gz` files.
        work_dir: a new or empty folder (or one an earlier run of this function made).
        budget_s: seconds of training (preprocessing and prediction are extra and reported
            separately).
        clock: "wall" for wall-clock seconds, "process" for the training process's CPU
            seconds (what stroke-ray's `time_budget_clock: process` counts).
        seed: seeds Python, numpy and torch in the child process.
        threads: torch threads.

    Returns:
        {case: path of its predicted mask}, each on the case's native grid.

    Raises:
        RuntimeError: nnunetv2 is not installed, or the run failed (see work_dir/peer.log).
    """
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "nnUNet_raw": str(work / "nnUNet_raw"),
           "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
           "nnUNet_results": str(work / "nnUNet_results"), "nnUNet_compile": "f", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--train", str(train_dir), "--test", str(test_dir),
           "--work", str(work), "--budget", str(budget_s), "--seed", str(seed), "--threads", str(threads), "--clock", clock,
           "--in-process"]
    with open(work / "peer.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"nnU-Net peer failed (exit {proc.returncode}); see {work / 'peer.log'}")
    result = json.loads((work / "peer_result.json").read_text())
    return {case: Path(path) for case, path in result["masks"].items()}


# ----------------------------------------------------------------------------- inputs


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


def _raw_training_set(train: Path, raw_root: Path) -> Path:
    """nnUNet_raw/DatasetNNN_...: exported from a store, or a copy of a raw dataset."""
    target = raw_root / DATASET_NAME
    if (target / "dataset.json").is_file():
        return target  # an earlier run of the same work folder
    if _is_store(train):
        from stroke_ray.nnunet_export import export_nnunet

        export_nnunet(str(train), target, progress=False)
    elif (train / "dataset.json").is_file():
        shutil.copytree(train, target, dirs_exist_ok=True)
    else:
        raise SystemExit(f"{train}: neither a stroke-ray store nor an nnU-Net raw dataset (no dataset.json)")
    return target


def _test_images(test: Path, work: Path) -> Path:
    """A folder of `<case>_<channel:04d>.nii.gz` files for the held-out cases."""
    if _is_store(test):
        from stroke_ray.nnunet_export import export_nnunet

        out = work / "test_raw"
        if not (out / "dataset.json").is_file():
            export_nnunet(str(test), out, progress=False)
        return out / "imagesTr"
    for sub in ("imagesTs", "imagesTr"):
        if (test / sub).is_dir():
            return test / sub
    return test


def _cases(images: Path) -> dict[str, Path]:
    """case -> its channel-0 file."""
    return {p.name[: -len("_0000.nii.gz")]: p for p in sorted(images.glob("*_0000.nii.gz"))}


# ----------------------------------------------------------------------------- the run


def _trainer_class(budget_s: float, clock: str = "wall"):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerBudget(nnUNetTrainer):
        """nnU-Net's default trainer for a time budget: short epochs, a poly LR schedule
        stretched over the epochs the budget allows, stops when it is spent. The budget is
        wall-clock seconds, or with clock "process" this process's CPU seconds (all its
        threads; augmentation runs in it, nnUNet_n_proc_DA=0), as stroke-ray's
        `time_budget_clock: process` counts them."""

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = ITERATIONS_PER_EPOCH
            self.num_val_iterations_per_epoch = VAL_ITERATIONS_PER_EPOCH
            self.num_epochs = 1000  # re-estimated from the budget after each epoch
            self.budget_s = budget_s
            self.epoch_seconds: list[float] = []
            self.iterations = 0
            self.val_seconds: float | None = None  # of the last epoch's validation iterations
            self.cpu_seconds = 0.0  # process CPU time of the loop (all threads): less load-bound

        def run_training(self):
            self.on_train_start()
            now = time.process_time if clock == "process" else time.perf_counter
            start, cpu_start = now(), time.process_time()

            def spent() -> float:
                return now() - start

            while self.current_epoch < self.num_epochs:
                epoch_start = now()
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = []
                # The budget is checked every iteration, keeping room for the validation
                # iterations that close the epoch: the last epoch is cut short, not overrun.
                while len(outputs) < self.num_iterations_per_epoch:
                    if outputs and self.val_seconds is None:  # first epoch: a forward pass ~ 1/3 step
                        step = (now() - epoch_start) / len(outputs)
                        reserve = step * self.num_val_iterations_per_epoch / 3
                    else:
                        reserve = self.val_seconds or 0.0
                    if spent() + reserve >= self.budget_s:
                        break
                    outputs.append(self.train_step(next(self.dataloader_train)))
                if not outputs:
                    break
                self.iterations += len(outputs)
                self.on_train_epoch_end(outputs)
                val_start = now()
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val = [self.validation_step(next(self.dataloader_val))
                           for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val)
                self.val_seconds = now() - val_start
                self.on_epoch_end()  # increments current_epoch
                self.epoch_seconds.append(now() - epoch_start)
                self.cpu_seconds = time.process_time() - cpu_start
                per_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds)
                # Stretch or shrink the poly schedule so that it ends with the budget.
                self.num_epochs = self.current_epoch + max(0, int(-(-(self.budget_s - spent()) // per_epoch)))
                self.lr_scheduler.max_steps = max(self.num_epochs, self.current_epoch + 1)
            self.on_train_end()

    return nnUNetTrainerBudget


def _run(args) -> None:
    import random

    import nibabel as nib
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    work = args.work.resolve()
    times: dict[str, float] = {}

    t = time.perf_counter()
    raw = _raw_training_set(args.train.resolve(), Path(os.environ["nnUNet_raw"]))
    test_images = _test_images(args.test.resolve(), work)
    times["export_s"] = time.perf_counter() - t

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    # A work folder whose earlier run got this far resumes: the plan and preprocessed data,
    # then the trained model, are reused (each is written last by its own step).
    earlier = json.loads((work / "peer_steps.json").read_text()) if (work / "peer_steps.json").is_file() else {}
    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    t = time.perf_counter()
    if "preprocess_s" in earlier:
        times["preprocess_s"] = earlier["preprocess_s"]
    else:
        # The planner sets torch's thread count from nnUNet_n_proc_DA, which must be >= 1
        # there; training then augments in the main process (0: no worker processes).
        os.environ["nnUNet_n_proc_DA"] = str(args.threads)
        extract_fingerprints([DATASET_ID], num_processes=args.threads, check_dataset_integrity=True,
                             show_progress_bar=False)
        plan_experiments([DATASET_ID])
        preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(args.threads,),
                   show_progress_bar=False)
        times["preprocess_s"] = time.perf_counter() - t
        _save_steps(work, times)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((raw / "dataset.json").read_text())
    plan = plans["configurations"][CONFIGURATION]

    t = time.perf_counter()
    os.environ["nnUNet_n_proc_DA"] = "0"
    torch.set_num_threads(args.threads)
    plans["continue_training"] = False  # as nnU-Net's own run_training passes it (the trainer pops it)
    trainer = _trainer_class(args.budget, args.clock)(plans, CONFIGURATION, "all", dataset_json, torch.device("cpu"))
    if "train_s" in earlier:
        trainer.initialize()
        trainer.load_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
        for key in ("train_s", "iterations", "epochs", "train_loop_s", "train_cpu_s"):
            times[key] = earlier[key]
    else:
        trainer.run_training()
        times.update(train_s=time.perf_counter() - t, iterations=trainer.iterations, epochs=trainer.current_epoch,
                     train_loop_s=sum(trainer.epoch_seconds), train_cpu_s=trainer.cpu_seconds)
        _save_steps(work, times)
    iterations, train_loop_s = times["iterations"], times["train_loop_s"]

    t = time.perf_counter()
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.manual_initialization(trainer.network, PlansManager(plans), trainer.configuration_manager,
                                    [trainer.network.state_dict()], dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    out = work / "nnunet_predictions"
    out.mkdir(exist_ok=True)
    predictor.predict_from_files_sequential(str(test_images), str(out), save_probabilities=False, overwrite=True)
    times["predict_s"] = time.perf_counter() - t

    # Back on each case's own grid with its own affine (nnU-Net writes through SimpleITK).
    masks_dir = work / "masks"
    masks_dir.mkdir(exist_ok=True)
    masks = {}
    for case, reference_path in _cases(test_images).items():
        reference = nib.load(reference_path)
        predicted = nib.load(out / f"{case}.nii.gz")
        mask = np.asarray(predicted.dataobj)
        if mask.shape != reference.shape[:3] or not np.allclose(predicted.affine, reference.affine, atol=1e-3):
            raise SystemExit(f"{case}: nnU-Net's mask {mask.shape} is not on the input grid {reference.shape}")
        image = nib.Nifti1Image((mask > 0).astype(np.uint8), reference.affine)
        image.set_qform(reference.affine, code=1)
        image.set_sform(reference.affine, code=1)
        path = masks_dir / f"{case}.nii.gz"
        nib.save(image, path)
        masks[case] = str(path)

    result = {
        "masks": masks,
        "plan": {"patch_size": plan["patch_size"], "batch_size": plan["batch_size"], "spacing": plan["spacing"],
                 "median_image_size_in_voxels": plan.get("median_image_size_in_voxels"),
                 "n_stages": len(plan.get("architecture", {}).get("arch_kwargs", {}).get("features_per_stage", [])),
                 "normalization": plan.get("normalization_schemes")},
        "iterations_per_s": iterations / train_loop_s if train_loop_s else 0.0,
        "cpu_seconds_per_iteration": times["train_cpu_s"] / iterations if iterations and times["train_cpu_s"] else None,
        "budget_s": args.budget, "clock": args.clock, "seed": args.seed, "threads": args.threads, **times,
        "ema_pseudo_dice": _ema_pseudo_dice(trainer),
        "load_average": open("/proc/loadavg").read().split()[:3],
    }
    (work / "peer_result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "masks"}, indent=2))


def _ema_pseudo_dice(trainer) -> list[float]:
    """nnU-Net's per-epoch EMA of the validation-patch Dice (its logger moved in 2.6)."""
    logger = getattr(trainer.logger, "local_logger", trainer.logger)
    return [float(x) for x in getattr(logger, "my_fantastic_logging", {}).get("ema_fg_dice", [])]


def _save_steps(work: Path, times: dict) -> None:
    (work / "peer_steps.json").write_text(json.dumps(times, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True, help="stroke-ray store or nnU-Net raw dataset")
    ap.add_argument("--test", type=Path, required=True, help="stroke-ray store, raw dataset or image folder")
    ap.add_argument("--work", type=Path, required=True, help="work folder (nnU-Net's folders go inside)")
    ap.add_argument("--budget", type=float, default=1800.0, help="training seconds (see --clock)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="the budget's clock: wall-clock or this process's CPU seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_process:
        _run(args)
        return
    masks = run_nnunet(args.train, args.test, args.work, args.budget, args.seed, args.threads)
    print(json.dumps({k: str(v) for k, v in masks.items()}, indent=2))
    score(masks, args.work.resolve())
    print(f"details: {args.work.resolve() / 'peer_result.json'}")


def score(masks: dict[str, Path], work: Path) -> None:
    """ISLES'22 metrics of each mask against its label, where the test set came with labels
    (a store, exported to work/test_raw), by the same code as stroke-ray's own validation."""
    import nibabel as nib
    import numpy as np

    from stroke_ray.metrics import isles_metrics

    labels = work / "test_raw" / "labelsTr"
    rows = {}
    for case, path in masks.items():
        label = labels / f"{case}.nii.gz"
        if not label.is_file():
            continue
        truth_img = nib.load(label)
        truth = np.asarray(truth_img.dataobj) > 0
        rows[case] = isles_metrics(np.asarray(nib.load(path).dataobj) > 0, truth, truth_img.header.get_zooms()[:3])
        print(case, {k: round(v, 3) for k, v in rows[case].items()})
    if rows:
        means = {k: float(np.mean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
        print("mean", {k: round(v, 3) for k, v in means.items()})


if __name__ == "__main__":
    main()
