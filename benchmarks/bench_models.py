"""Training-step time and peak memory: unet3d vs unet2plus1d vs MONAI BasicUNet (baseline).

Each configuration runs in its own subprocess so that its peak memory can be read cleanly:
on CPU the peak is the growth of ru_maxrss (peak resident set) over the value just before
the first training step (torch's CPU allocator is invisible to tracemalloc); on GPU it is
torch.cuda.max_memory_allocated. Ratios are against BasicUNet with the same widths, size
and batch, measured in the same run.

    .venv/bin/python benchmarks/bench_models.py --widths 16 32 64 128 256 --sizes 64 128 --batches 1 2

BasicUNet takes six feature counts (five levels + the last up-sampling conv); ours
(w0..w4) map to (w0, w1, w2, w3, w4, w0). It is built with BatchNorm and ReLU like ours.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _build(arch: str, widths: list[int], in_channels: int):
    if arch == "basicunet":
        from monai.networks.nets import BasicUNet

        if len(widths) != 5:
            raise SystemExit("BasicUNet has exactly five levels: give five --widths")
        return BasicUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=1,
            features=(*widths, widths[0]),
            act="relu",
            norm="batch",
        )
    from stroke_ray.config import ModelConfig
    from stroke_ray.models import build_model

    return build_model(ModelConfig(architecture=arch, widths=widths), in_channels)


def run_one(spec: dict) -> dict:
    """Time `steps` training steps of one configuration and measure its peak memory."""
    import torch

    from stroke_ray.losses import build_loss
    from stroke_ray.models import count_parameters

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _build(spec["arch"], spec["widths"], spec["in_channels"]).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = build_loss("dice_bce")
    n, b = spec["size"], spec["batch"]
    x = torch.randn(b, spec["in_channels"], n, n, n, device=device)
    y = (torch.rand(b, 1, n, n, n, device=device) > 0.9).float()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (allocator, kernels)
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {**spec, "params": count_parameters(model), "step_s": min(times), "peak_mb": peak_mb, "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--archs", nargs="+", default=["basicunet", "unet3d", "unet2plus1d"])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration (best is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per configuration")
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single JSON spec
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    rows = []
    for size in args.sizes:
        for batch in args.batches:
            for arch in args.archs:  # side by side, so shared-machine load hits all alike
                spec = dict(arch=arch, widths=args.widths, size=size, batch=batch, steps=args.steps,
                            threads=args.threads, in_channels=args.in_channels)
                out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                                     capture_output=True, text=True)
                if out.returncode:
                    lines = out.stderr.strip().splitlines()
                    # SIGKILL with nothing on stderr: the kernel's OOM killer (or a memory cgroup).
                    why = lines[-1] if lines else f"killed by signal {-out.returncode}, out of memory?"
                    rows.append({**spec, "error": why})
                else:
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"# {arch:12s} {size:4d}^3 b{batch}: "
                      + (r["error"] if "error" in r else f"{r['step_s']:.2f} s/step, {r['peak_mb']:.0f} MB"),
                      file=sys.stderr, flush=True)

    base = {(r["size"], r["batch"]): r for r in rows if r["arch"] == "basicunet" and "error" not in r}
    print(f"widths {args.widths}, {args.threads} thread(s), best of {args.steps} steps after 1 warm-up")
    print(f"{'arch':12s} {'size':>5s} {'batch':>5s} {'params':>10s} {'s/step':>8s} {'peak MB':>8s} "
          f"{'time x':>7s} {'mem x':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:12s} {r['size']:5d} {r['batch']:5d}  failed: {r['error']}")
            continue
        ref = base.get((r["size"], r["batch"]))
        tx = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        mx = f"{r['peak_mb'] / ref['peak_mb']:.2f}" if ref and ref["peak_mb"] > 0 else "-"
        print(f"{r['arch']:12s} {r['size']:5d} {r['batch']:5d} {r['params']:10d} {r['step_s']:8.2f} "
              f"{r['peak_mb']:8.0f} {tx:>7s} {mx:>7s}")


if __name__ == "__main__":
    main()
