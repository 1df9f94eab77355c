"""The HTTP service under load and under attack, with and without the proxy's request guard.

Two local Ray Serve instances are measured one after the other, each in its own process
(the guard is installed when a proxy starts, from its environment):

    guard off   Ray 2.60's proxy as it comes (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH unset)
    guard on    the proxy with stroke_ray.http_guard, as `stroke-ray serve` runs it

Attacks (one after the other, on one server): `bombs` - three .nii.gz uploads of ~0.2 MB
that declare 512x512x256 volumes; `big_alone` - a 1 GiB chunked upload (no length, so only
counting can refuse it); `slow` - stalled uploads (a byte every 2 s) filling more than the
prediction slots, then GET /healthz and a real prediction while they hang; `big` - the 1 GiB
upload again while the stalled uploads hang. For each: the status codes, the
seconds to the answer, and the peak resident memory of the proxy and the replica (sampled
from /proc every 50 ms, only processes of this benchmark's own Ray).

Load (guard on): N clients posting the real ISLES'22 case for M seconds while a mix of bad
requests runs beside them (bombs, oversized chunked uploads, unauthenticated uploads,
stalled uploads); requests/s, p50/p95/p99 latency, errors among good requests, how every
bad one was answered, and peak proxy / replica memory.

Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.

    .venv/bin/python benchmarks/bench_serving_load.py --attacks             # guard off vs on
    .venv/bin/python benchmarks/bench_serving_load.py --load --clients 4 --seconds 60
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
SAMPLE = REPO.parent / "shared" / "data" / "isles22-sample"
SUBJECT, SES = "sub-strokecase0009", "ses-0001"
MODALITIES = ["dwi", "adc", "flair"]
TOKEN = "bench-token-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 64 * 1024**2
GUARD_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


class PeakMemory:
    """Peak RSS (MiB) of this process's descendants whose title starts with each prefix."""

    def __init__(self, prefixes: dict[str, str], period_s: float = 0.05):
        self.prefixes, self.period_s = prefixes, period_s
        self.peak = {k: 0.0 for k in prefixes}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> dict[str, float]:
        found = {k: 0.0 for k in self.prefixes}
        children = _descendants(os.getpid())
        for pid in children:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                for key, prefix in self.prefixes.items():
                    if title.startswith(prefix):
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                            if line.startswith("VmRSS:"):
                                found[key] += int(line.split()[1]) / 1024
            except OSError:
                continue
        return found

    def _run(self) -> None:
        while not self.stop.wait(self.period_s):
            for key, value in self.current().items():
                self.peak[key] = max(self.peak[key], value)

    def __enter__(self):
        self.peak = {k: 0.0 for k in self.prefixes}
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in parents.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def bomb_file(shape=(512, 512, 256)) -> bytes:
    """A .nii.gz of ~70 KB whose header declares `shape` uint8 voxels (all zero)."""
    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(np.eye(4), 1)
    header.set_sform(np.eye(4), 1)
    raw = header.binaryblock + b"\0" * 4 + b"\0" * int(np.prod(shape))
    return gzip.compress(raw, compresslevel=9)


def real_case() -> dict[str, tuple[str, bytes]]:
    folder = SAMPLE / "rawdata" / SUBJECT / SES
    return {m: (f"{SUBJECT}_{SES}_{m}.nii.gz", (folder / f"{SUBJECT}_{SES}_{m}.nii.gz").read_bytes())
            for m in MODALITIES}


class Stalled:
    """`n` uploads that announce 1 MB and send one byte every `every_s` seconds."""

    def __init__(self, port: int, n: int, every_s: float = 2.0, max_s: float = 300.0):
        self.port, self.n, self.every_s, self.max_s = port, n, every_s, max_s
        self.socks: list[socket.socket] = []
        self.answers: list[object] = []  # the status each one got once the server gave up on it
        self.stop = threading.Event()

    def __enter__(self):
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000\r\n\r\n").encode()
        for _ in range(self.n):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(head)
            self.socks.append(sock)
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()
        time.sleep(1.0)  # let them reach the server
        return self

    def _trickle(self) -> None:
        end = time.monotonic() + self.max_s
        while not self.stop.wait(self.every_s) and time.monotonic() < end:
            for sock in list(self.socks):
                try:
                    sock.sendall(b"x")
                except OSError:
                    self.answers.append(_status_of(sock))
                    self.socks.remove(sock)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


def _status_of(sock: socket.socket) -> object:
    """The HTTP status the server sent on `sock` before closing it, or "open"."""
    sock.settimeout(1.0)
    try:
        return int(sock.recv(64).split(b" ")[1])
    except (OSError, IndexError, ValueError):
        return "open"


def _timed(fn):
    t = time.perf_counter()
    try:
        status = fn().status_code
    except Exception as exc:  # noqa: BLE001 - a timeout or reset is a result here
        status = type(exc).__name__
    return status, round(time.perf_counter() - t, 2)


def _big_chunks(total: int):
    piece = b"\0" * 1024**2
    for _ in range(total // len(piece)):
        yield piece


def start(tmp: Path, cpus: int):
    import ray
    from bench_serving import make_checkpoint

    from stroke_ray.service import start_server

    ckpt = make_checkpoint(tmp / "ckpt", "64", [8, 16, 32, 64])
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The service's defaults (1 prediction running, 4 queued per replica) but shorter
    # upload deadlines, so that stalled uploads are refused within the run.
    url = start_server(ckpt, port=port, cpus_per_replica=1, token=TOKEN, max_upload_bytes=LIMIT,
                       body_timeout_s=30, idle_timeout_s=10, request_timeout_s=300)
    return url, port


def attacks(args) -> dict:
    import httpx

    url, port = start(Path(tempfile.mkdtemp(prefix="bench-attacks-")), args.cpus)
    mem = PeakMemory({"proxy": "ray::ProxyActor", "replica": "ray::ServeReplica"})
    out = {"idle": mem.current()}
    case = real_case()
    with httpx.Client(base_url=url, timeout=httpx.Timeout(120, connect=10), headers=AUTH) as client:
        assert client.post("/predict", params={"format": "json"}, files=case).status_code == 200
        out["warm"] = mem.current()
        with mem:
            bomb = bomb_file()
            files = {m: (f"bomb_{m}.nii.gz", bomb) for m in MODALITIES}
            out["bombs"] = {"upload_kb": round(3 * len(bomb) / 1024), "answer": _timed(
                lambda: client.post("/predict", params={"format": "json"}, files=files))}
        out["bombs"]["peak"] = dict(mem.peak)
        with mem:
            out["big_alone"] = {"gib": 1, "answer": _timed(lambda: client.post(
                "/predict", content=_big_chunks(1024**3), timeout=httpx.Timeout(300, connect=10),
                headers={"Content-Type": "multipart/form-data; boundary=x"}))}
        out["big_alone"]["peak"] = dict(mem.peak)
        with mem, Stalled(port, n=6):
            quick = httpx.Timeout(30, connect=10)
            out["slow"] = {"stalled": 6,
                           "healthz": _timed(lambda: client.get("/healthz", timeout=quick)),
                           "predict": _timed(lambda: client.post("/predict", params={"format": "json"},
                                                                 files=case, timeout=quick))}
            out["big"] = {"gib": 1, "answer": _timed(lambda: client.post(
                "/predict", content=_big_chunks(1024**3), timeout=httpx.Timeout(120, connect=10),
                headers={"Content-Type": "multipart/form-data; boundary=x"}))}
        out["slow"]["peak"] = dict(mem.peak)
    return out


def load(args) -> dict:
    import httpx

    url, port = start(Path(tempfile.mkdtemp(prefix="bench-load-")), args.cpus)
    mem = PeakMemory({"proxy": "ray::ProxyActor", "replica": "ray::ServeReplica"})
    case, bomb = real_case(), bomb_file()
    end = time.monotonic() + args.seconds
    good: list[tuple[object, float]] = []
    bad: dict[str, list] = {"bomb": [], "oversized": [], "no token": [], "stalled": []}
    timeout = httpx.Timeout(300, connect=10)

    def good_client():
        with httpx.Client(base_url=url, timeout=timeout, headers=AUTH) as c:
            while time.monotonic() < end:
                good.append(_timed(lambda: c.post("/predict", params={"format": "json"}, files=case)))

    def bad_client():
        files = {m: (f"bomb_{m}.nii.gz", bomb) for m in MODALITIES}
        with httpx.Client(base_url=url, timeout=timeout) as c:
            for _ in range(1000):  # bounded; normally ends by time
                if time.monotonic() >= end:
                    break
                bad["no token"].append(_timed(lambda: c.post("/predict", files=case))[0])
                bad["oversized"].append(_timed(lambda: c.post(
                    "/predict", content=_big_chunks(2 * LIMIT), headers={
                        **AUTH, "Content-Type": "multipart/form-data; boundary=x"}))[0])
                bad["bomb"].append(_timed(lambda: c.post("/predict", files=files, headers=AUTH))[0])
                time.sleep(2.0)

    def stalled_client():
        for _ in range(100):
            if time.monotonic() >= end:
                break
            with Stalled(port, n=4, every_s=2.0, max_s=max(1.0, end - time.monotonic())) as stalled:
                while time.monotonic() < end:
                    time.sleep(0.5)
                bad["stalled"].extend(stalled.answers + [_status_of(sock) for sock in stalled.socks])

    with httpx.Client(base_url=url, timeout=timeout, headers=AUTH) as c:
        assert c.post("/predict", params={"format": "json"}, files=case).status_code == 200
    idle = mem.current()
    threads = [threading.Thread(target=good_client) for _ in range(args.clients)]
    threads += [threading.Thread(target=bad_client), threading.Thread(target=stalled_client)]
    started = time.perf_counter()
    with mem:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - started
    latencies = sorted(s for status, s in good if status == 200)
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"clients": args.clients, "seconds": args.seconds, "wall_s": round(wall, 1),
            "good": len(good), "errors": sum(1 for status, _ in good if status != 200),
            "error_kinds": sorted({str(status) for status, _ in good if status != 200}),
            "rps": round(len(latencies) / wall, 3), "p50": round(q[49], 2), "p95": round(q[94], 2),
            "p99": round(q[98], 2), "bad": {k: _counts(v) for k, v in bad.items()}, "idle": idle,
            "peak": dict(mem.peak)}


def _counts(values: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def child(args) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    result = attacks(args) if args.role == "attacks" else load(args)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(role: str, guard: bool, args) -> dict:
    env = dict(os.environ)
    env[GUARD_ENV] = "stroke_ray.http_guard:proxy_middlewares" if guard else ""
    cmd = [sys.executable, __file__, "--role", role, "--cpus", str(args.cpus),
           "--clients", str(args.clients), "--seconds", str(args.seconds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.seconds + 1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{role} (guard {'on' if guard else 'off'}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", action="store_true", help="bombs, stalled uploads, 1 GiB upload; guard off vs on")
    parser.add_argument("--load", action="store_true", help="N clients for M seconds with bad requests mixed in")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--role", choices=["attacks", "load"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return
    print(f"load average at start: {open('/proc/loadavg').read().split()[:3]}")
    if args.attacks:
        for guard in (False, True):
            result = run_child("attacks", guard, args)
            print(f"guard {'on' if guard else 'off'}: " + json.dumps(result))
    if args.load:
        result = run_child("load", True, args)
        print("load (guard on): " + json.dumps(result))
    print(f"load average at end: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    sys.exit(main())
