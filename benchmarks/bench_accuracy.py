"""Accuracy benchmark: the seed's recipe, each step of ours, and nnU-Net v2, on shifted cases.

    .venv/bin/python benchmarks/bench_accuracy.py [--budget-min 30] [--train-cases 24]
        [--test-cases 8] [--variants seed,spacing,...,ensemble] [--peer] [--override JSON --tag=-x]
        [--peer] [--work bench-work/accuracy]

Training cases come from `stroke-ray synth` (the `train` profile, with the real-scan DWI
artefacts); the held-out cases from the same generator's `shifted` profile, which training
never sees (other scanners and resolutions, flipped and oblique axes, other contrasts and
noise, clusters of 2-5 mm embolic lesions beside territorial infarcts). Every variant trains
on the same store for the same compute: `time_budget_s` on the training process's CPU clock
(budget-min x 60 x threads CPU seconds, i.e. what `threads` dedicated cores give in
budget-min minutes), so a loaded machine does not favour whichever ran when it was quiet.
Variants, each adding one step to the one before:

    seed               64^3 whole-field-of-view cube, threshold sampling, no augmentation,
                       DiceBCE, no deep supervision (the seed study's recipe)
    spacing            the 2 mm physical-spacing level with the planner's patch and batch,
                       foreground oversampling, Dice+CE
    augment            + strong augmentation
    deep_supervision   + deep supervision
    lesion_sampling    + the lesion sampler (every lesion alike in the foreground patches),
                       half the patches centred on a lesion
    instance_norm      + InstanceNorm instead of BatchNorm
    small_lesion_weight + cross-entropy weighted up to 20x on small lesions: the training
                       recipe (configs/recipe.yaml, checked)
    postprocess        + the threshold and minimum lesion size chosen on validation, same model
    tta                + mirroring test-time augmentation (8 flips), same model
    ensemble           5-fold cross-validation, each fold a fifth of the budget, the fold
                       ensemble with TTA and postprocessing chosen out of fold

`--peer` adds nnU-Net v2 (`benchmarks/peer_nnunet.py`: its own 3d_fullres plan and
preprocessing, a trainer stopped by the same CPU budget, its own mirroring TTA) on the same
training cases (exported from the same store), scored by the same metric code on the same
held-out cases. Everything is scored on each held-out case's own grid (its DWI), per case
and per lesion-size bin (< 1 ml, 1-10 ml, > 10 ml); the recipe's model is also scored on the
real ISLES'22 sample case. Results: <work>/results-b<budget>-s<seed>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "isles22-sample"
MODALITIES = ["dwi", "adc", "flair"]
ALL_VARIANTS = ("seed", "spacing", "augment", "deep_supervision", "lesion_sampling", "instance_norm",
                "small_lesion_weight", "postprocess", "tta", "ensemble")
# Inference-only variants reuse the model of the variant they extend.
REUSES = {"postprocess": "small_lesion_weight", "tta": "small_lesion_weight"}
# The training fields every step of the recipe sets; the last training step must match the
# shipped recipe (stroke_ray/resources/configs/recipe.yaml) on all of them.
RECIPE_FIELDS = ("data.level", "data.sampler", "data.foreground_fraction", "loss", "augment.preset",
                 "model.deep_supervision", "model.norm", "model.architecture", "small_lesion_weight")


@dataclass
class Variant:
    name: str
    train: dict = field(default_factory=dict)  # TrainConfig fields over the common base
    tta_axes: tuple[int, ...] = ()
    postprocess: bool = False
    folds: int = 0


def variants(plan_patch: list[int], plan_batch: int) -> dict[str, Variant]:
    seed = {"data": {"level": "64", "patch_size": 64, "sampler": "threshold", "threshold": 0.2},
            "batch_size": 2, "augment": {"preset": "none"}, "loss": "dice_bce",
            "model": {"deep_supervision": False, "norm": "batch"}}
    spacing = {"data": {"level": "2mm", "patch_size": plan_patch, "sampler": "foreground",
                        "foreground_fraction": 0.33}, "batch_size": plan_batch,
               "augment": {"preset": "none"}, "loss": "dice_ce",
               "model": {"deep_supervision": False, "norm": "batch"}}
    augment = _merge(spacing, {"augment": {"preset": "strong"}})
    supervised = _merge(augment, {"model": {"deep_supervision": True}})
    lesion = _merge(supervised, {"data": {"sampler": "lesion", "foreground_fraction": 0.5}})
    instance = _merge(lesion, {"model": {"norm": "instance"}})
    recipe = _merge(instance, {"small_lesion_weight": 20.0})
    check_recipe(recipe)
    return {
        "seed": Variant("seed", seed),
        "spacing": Variant("spacing", spacing),
        "augment": Variant("augment", augment),
        "deep_supervision": Variant("deep_supervision", supervised),
        "lesion_sampling": Variant("lesion_sampling", lesion),
        "instance_norm": Variant("instance_norm", instance),
        "small_lesion_weight": Variant("small_lesion_weight", recipe),
        "postprocess": Variant("postprocess", recipe, postprocess=True),
        "tta": Variant("tta", recipe, tta_axes=(0, 1, 2), postprocess=True),
        "ensemble": Variant("ensemble", recipe, tta_axes=(0, 1, 2), postprocess=True, folds=5),
    }


def check_recipe(steps: dict) -> None:
    """The benchmark's recipe is the shipped one: every field the steps set agrees with it."""
    from stroke_ray.config import TrainConfig, flatten

    shipped = flatten(TrainConfig.from_yaml("recipe").model_dump(mode="json"))
    built = flatten(TrainConfig.from_dict(steps).model_dump(mode="json"))
    wrong = {k: (built[k], shipped[k]) for k in RECIPE_FIELDS if built[k] != shipped[k]}
    if wrong:
        raise SystemExit(f"the benchmark's recipe differs from configs/recipe.yaml: {wrong}")


def _merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


def make_data(work: Path, args) -> tuple[Path, Path, Path]:
    """(training dataset, held-out dataset, training store), each made once."""
    from stroke_ray.ingest import convert_dataset
    from stroke_ray.synth import generate_dataset

    train_dir, test_dir, store = work / "train", work / "test", work / "train.zarr"
    if not (train_dir / ".stroke-ray-synth").exists() or len(list((train_dir / "rawdata").glob("sub-*"))) < args.train_cases:
        say(f"synth: {args.train_cases} training cases (profile train, seed {args.seed})")
        generate_dataset(train_dir, args.train_cases, seed=args.seed, progress=False, profile="train")
    if not (test_dir / ".stroke-ray-synth").exists() or len(list((test_dir / "rawdata").glob("sub-*"))) < args.test_cases:
        say(f"synth: {args.test_cases} held-out cases (profile shifted, seed {args.seed + 1})")
        generate_dataset(test_dir, args.test_cases, seed=args.seed + 1, progress=False, profile="shifted")
    report = convert_dataset(str(train_dir), str(store), levels=["64", "2mm"], progress=False, parallel=False)
    say(f"store: {report.summary().splitlines()[0]}")
    return train_dir, test_dir, store


# --------------------------------------------------------------------------- training


def base_config(work: Path, store: Path, args, widths: list[int]) -> dict:
    return {
        "experiment": "accuracy-bench",
        "storage_path": str(work / "runs"),
        "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "data": {"store": str(store), "val_fraction": 0.15, "split_seed": 0, "samples_per_volume": 4},
        "model": {"architecture": "unet3d", "widths": widths},
        "optim": {"optimizer": "adamw", "lr": args.lr, "schedule": "cosine", "weight_decay": 3e-5},
        "epochs": 100_000,  # the budget ends training
        "steps_per_epoch": args.steps_per_epoch,
        "batch_size": 2,
        "time_budget_s": args.budget_min * 60.0 * args.threads,
        "time_budget_clock": "process",
        "cpus_per_worker": args.threads,
        "val_max_subjects": 3,
        "val_overlap": 0.25,
        "seed": args.seed,
    }


def train_variant(variant: Variant, base: dict, args) -> tuple[Path, dict]:
    """(checkpoint file, training facts) of one variant, trained once (reused on a re-run)."""
    from stroke_ray.config import TrainConfig

    raw = _merge(_merge(base, variant.train), json.loads(args.override))
    raw["name"] = f"acc-{variant.name}-b{args.budget_min:g}-s{args.seed}{args.tag}"
    cfg = TrainConfig.from_dict(raw, source=f"variant {variant.name}")
    done = Path(cfg.storage_path) / f"{cfg.name}.json"
    if done.exists():
        facts = json.loads(done.read_text())
        say(f"{variant.name}: reusing {facts['checkpoint']}")
        return Path(facts["checkpoint"]), facts
    t = time.perf_counter()
    if variant.folds:
        from stroke_ray.crossval import cross_validate

        cfg = cfg.model_copy(update={"time_budget_s": cfg.time_budget_s / variant.folds})
        cv = cross_validate(cfg, variant.folds)
        checkpoint, metrics = cv.ensemble, dict(cv.oof_metrics)
    else:
        from stroke_ray.train import run_training

        result = run_training(cfg)
        with result.checkpoint.as_directory() as d:
            checkpoint = Path(cfg.storage_path) / f"{cfg.name}.pt"
            checkpoint.write_bytes((Path(d) / "checkpoint.pt").read_bytes())
        metrics = dict(result.metrics or {})
    facts = {"checkpoint": str(checkpoint), "wall_s": time.perf_counter() - t,
             "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
             "config": cfg.model_dump(mode="json")}
    done.write_text(json.dumps(facts, indent=2))
    say(f"{variant.name}: trained in {facts['wall_s']:.0f} s wall, "
        f"epochs {metrics.get('epoch', '?')}, val_dice {metrics.get('val_dice', metrics.get('oof_dice', float('nan'))):.3f}")
    return checkpoint, facts


# --------------------------------------------------------------------------- scoring


def truth_masks(dataset: Path) -> dict[str, Path]:
    from stroke_ray.datasets import open_dataset

    cases, _ = open_dataset(dataset, "auto").discover(MODALITIES, require_mask=True)
    return {c.subject: c.mask for c in cases}


def score(pred_dir: Path, rows: list[dict], truths: dict[str, Path]) -> dict:
    """Per-case metrics (from predict's rows) and lesion counts per size bin, summed."""
    from stroke_ray.metrics import SIZE_BINS_ML, f1_from_counts, lesion_counts_by_size

    bins = {name: {"tp": 0, "fp": 0, "fn": 0} for name, _, _ in SIZE_BINS_ML}
    cases = []
    for row in rows:
        truth_img = nib.load(truths[row["subject"]])
        truth = np.asarray(truth_img.dataobj) > 0
        pred = np.asarray(nib.load(pred_dir / row["mask_file"]).dataobj) > 0
        counts = lesion_counts_by_size(pred, truth, truth_img.header.get_zooms()[:3])
        for name, c in counts.items():
            for k in c:
                bins[name][k] += c[k]
        cases.append({k: row.get(k) for k in ("subject", "dice", "lesion_f1", "abs_volume_diff_ml",
                                              "abs_lesion_count_diff", "volume_ml", "truth_volume_ml")})
    mean = {k: float(np.mean([c[k] for c in cases])) for k in
            ("dice", "lesion_f1", "abs_volume_diff_ml", "abs_lesion_count_diff")}
    per_bin = {name: {**c, "f1": f1_from_counts(c["tp"], c["fp"], c["fn"])} for name, c in bins.items()}
    return {"mean": mean, "bins": per_bin, "cases": cases}


def stored_or_plain(variant: Variant) -> dict:
    """Postprocessing as chosen on validation (stored in the checkpoint), or none: 0.5, no removal."""
    return {} if variant.postprocess else {"threshold": 0.5, "min_lesion_ml": 0.0}


def predict_and_score(name: str, checkpoint: Path, test_dir: Path, truths, work: Path, variant: Variant) -> dict:
    from stroke_ray.predict import predict_dataset

    out = work / "predictions" / name
    t = time.perf_counter()
    report = predict_dataset(test_dir, str(checkpoint), out, device="cpu", progress=False, overwrite=True,
                             tta_axes=variant.tta_axes, **stored_or_plain(variant))
    if report.failed:
        raise SystemExit(f"{name}: prediction failed: {report.failed}")
    result = score(out, report.rows, truths)
    result["predict_s"] = time.perf_counter() - t
    return result


def score_real_case(checkpoint: Path, work: Path, variant: Variant) -> dict:
    from stroke_ray.predict import predict_dataset

    out = work / "predictions" / "real-sample"
    report = predict_dataset(SAMPLE, str(checkpoint), out, device="cpu", progress=False, overwrite=True,
                             tta_axes=variant.tta_axes, **stored_or_plain(variant))
    truths = truth_masks(SAMPLE)
    return score(out, report.rows, truths)


# --------------------------------------------------------------------------- nnU-Net v2


def run_peer(store: Path, test_dir: Path, truths, work: Path, args) -> dict:
    """nnU-Net v2 trained on the same store (its native level, exported as an nnU-Net raw
    dataset) for the same CPU budget, predicting the held-out cases on their own grids."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peer_nnunet import run_nnunet  # benchmark-only module beside this one

    from stroke_ray.ingest import convert_dataset

    test_store = work / "test.zarr"
    convert_dataset(str(test_dir), str(test_store), levels=[], progress=False, parallel=False)
    t = time.perf_counter()
    masks = run_nnunet(store, test_store, work / f"nnunet-b{args.budget_min:g}-s{args.seed}",
                       budget_s=args.budget_min * 60.0 * args.threads, seed=args.seed,
                       threads=args.threads, clock="process")
    wall = time.perf_counter() - t
    result = score_peer([{"subject": s, "mask_file": str(m)} for s, m in masks.items()], truths)
    result["wall_s"] = wall
    return result


def score_peer(rows: list[dict], truths: dict[str, Path]) -> dict:
    """nnU-Net's masks scored like ours: isles_metrics on the case's own grid."""
    from stroke_ray.metrics import isles_metrics

    scored = []
    for row in rows:
        truth_img = nib.load(truths[row["subject"]])
        truth = np.asarray(truth_img.dataobj) > 0
        pred = np.asarray(nib.load(row["mask_file"]).dataobj) > 0
        spacing = truth_img.header.get_zooms()[:3]
        m = isles_metrics(pred, truth, spacing)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        scored.append({"subject": row["subject"], "mask_file": row["mask_file"], **m,
                       "volume_ml": float(pred.sum()) * voxel_ml, "truth_volume_ml": float(truth.sum()) * voxel_ml})
    return score(Path("/"), scored, truths)


# --------------------------------------------------------------------------- report


def ordered(results: dict) -> list[str]:
    """Variant names in the order the recipe adds its steps, then the peers."""
    names = list(results["variants"])
    return [n for n in ALL_VARIANTS if n in names] + [n for n in names if n not in ALL_VARIANTS]


def markdown(results: dict, args) -> str:
    lines = [
        f"Training: {args.train_cases} synthetic cases (train profile); held out: {args.test_cases} cases "
        f"(shifted profile); budget {args.budget_min:g} min x {args.threads} cores of process CPU time per variant.",
        "",
        "| variant | Dice | lesion F1 | abs vol diff ml | abs count diff | F1 < 1 ml | F1 1-10 ml | F1 > 10 ml | epochs | train wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ordered(results):
        r = results["variants"][name]
        m, b = r["mean"], r["bins"]

        def f(x):
            return "-" if x is None else f"{x:.3f}"

        lines.append(
            f"| {name} | {m['dice']:.3f} | {m['lesion_f1']:.3f} | {m['abs_volume_diff_ml']:.2f} | "
            f"{m['abs_lesion_count_diff']:.2f} | {f(b['<1ml']['f1'])} | {f(b['1-10ml']['f1'])} | {f(b['>10ml']['f1'])} | "
            f"{r.get('epochs', '-')} | {r.get('wall_s', 0):.0f} |"
        )
    if "real_case" in results:
        m = results["real_case"]["mean"]
        lines += ["", f"Real ISLES'22 sample case ({results['real_case_variant']}): Dice {m['dice']:.3f}, "
                      f"lesion F1 {m['lesion_f1']:.3f}, |volume diff| {m['abs_volume_diff_ml']:.2f} ml, "
                      f"|count diff| {m['abs_lesion_count_diff']:.0f}"]
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ordered(results)
    bins = ["<1ml", "1-10ml", ">10ml"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [results["variants"][name]["bins"][b]["f1"] or 0.0 for b in bins]
        axes[0].bar(np.arange(len(bins)) + i * width, vals, width, label=name)
    axes[0].set_xticks(np.arange(len(bins)) + width * (len(names) - 1) / 2, [f"lesions {b}" for b in bins])
    axes[0].set_ylabel("lesion F1 (held-out, shifted)")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7, ncol=2)
    dice = [results["variants"][n]["mean"]["dice"] for n in names]
    f1 = [results["variants"][n]["mean"]["lesion_f1"] for n in names]
    x = np.arange(len(names))
    axes[1].bar(x - 0.2, dice, 0.4, label="Dice")
    axes[1].bar(x + 0.2, f1, 0.4, label="lesion F1")
    axes[1].set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    axes[1].set_ylim(0, 1)
    axes[1].axhline(0.80, color="grey", lw=0.8, ls="--")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-min", type=float, default=30.0, help="minutes of `threads` cores per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-cases", type=int, default=24)
    ap.add_argument("--test-cases", type=int, default=8)
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS))
    ap.add_argument("--peer", action="store_true", help="also run nnU-Net v2 (pip install -e .[peer])")
    ap.add_argument("--memory-gb", type=float, default=None, help="planner budget (default: the planner's)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=REPO / "bench-work" / "accuracy")
    ap.add_argument("--override", default="{}",
                    help="JSON merged into every variant's training config (an experiment on top of the recipe)")
    ap.add_argument("--tag", default="", help="suffix of run names and the results file (with --override)")
    ap.add_argument("--figure", type=Path, default=None, help="also save the figure here (e.g. docs/img/...)")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # Idle OpenMP threads sleep instead of spinning, so a process's CPU clock counts work.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("RAY_DISABLE_DASHBOARD", "1")
    from stroke_ray.plan import GIB, fingerprint, plan_training
    from stroke_ray.raycluster import connect

    t0 = time.perf_counter()
    _, test_dir, store = make_data(work, args)
    # The recipe's plan, as `stroke-ray plan STORE --level 2mm` makes it on this machine.
    fp = fingerprint(str(store), "2mm")
    planned = plan_training(fp, memory_budget=None if args.memory_gb is None else int(args.memory_gb * GIB))
    patch, widths = list(planned.patch_size), list(planned.widths)
    say(f"plan at 2mm: median shape {fp.median_shape}, patch {patch}, batch {planned.batch_size}, widths {widths}")
    truths = truth_masks(test_dir)
    table = variants(patch, planned.batch_size)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    connect(None, num_cpus=args.threads)
    base = base_config(work, store, args, widths)
    # Results accumulate over invocations with the same budget and seed (e.g. the headline
    # variants first, the ablations later); a variant run again replaces its entry.
    results_file = work / f"results-b{args.budget_min:g}-s{args.seed}{args.tag}.json"
    results: dict = json.loads(results_file.read_text()) if results_file.exists() else {"variants": {}}
    results.update({"args": {k: str(v) for k, v in vars(args).items()}, "plan": planned.as_dict()})
    trained: dict[str, tuple[Path, dict]] = {}
    for name in wanted:
        variant = table[name]
        source = REUSES.get(name, name)
        if source not in trained:
            trained[source] = train_variant(table[source], base, args)
        checkpoint, facts = trained[source]
        say(f"{name}: predicting {len(truths)} held-out cases")
        r = predict_and_score(name, checkpoint, test_dir, truths, work, variant)
        r["epochs"] = int(facts["metrics"].get("epoch", -1)) + 1 if "epoch" in facts["metrics"] else "-"
        r["wall_s"] = facts["wall_s"]
        r["train_metrics"] = facts["metrics"]
        results["variants"][name] = r
        say(f"{name}: Dice {r['mean']['dice']:.3f}, lesion F1 {r['mean']['lesion_f1']:.3f}, "
            f"F1 by size {[r['bins'][b]['f1'] for b in r['bins']]}")
        results_file.write_text(json.dumps(results, indent=2, default=str))
    if args.peer:
        say("nnU-Net v2: export, plan, preprocess, train, predict")
        results["variants"]["nnU-Net v2"] = run_peer(store, test_dir, truths, work, args)
        results_file.write_text(json.dumps(results, indent=2, default=str))
    final = next((n for n in ("tta", "postprocess", "small_lesion_weight") if n in wanted), None)
    if final is not None and SAMPLE.exists():
        source = REUSES.get(final, final)
        results["real_case"] = score_real_case(trained[source][0], work, table[final])
        results["real_case_variant"] = final
    results["seconds"] = time.perf_counter() - t0
    results["loadavg"] = open("/proc/loadavg").read().split()[:3]
    results_file.write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results, args)
    results_file.with_suffix(".md").write_text(text)
    figure(results, results_file.with_suffix(".png"))
    if args.figure is not None:
        figure(results, args.figure)
    print(text)


if __name__ == "__main__":
    main()
