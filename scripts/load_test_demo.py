"""Bounded loopback load test of ``reme demo``.

Starts ``reme demo`` on 127.0.0.1 (a free port; the server never listens elsewhere), sends
``--requests`` segmentation requests from ``--concurrency`` threads (half upload a large JPEG,
half pick a bundled photo), then a few misuse probes (5000 classes, a foreign Host header, a
cross-site POST), and prints latency p50 / p95, errors, and the server's resident memory
before and after (VmRSS) and at its peak (VmHWM, Linux ``/proc``). The server is stopped at
the end, and everything stops after ``--max-seconds``.

    python scripts/load_test_demo.py --requests 40 --concurrency 4

Numbers measured with it: docs/performance.md ("Demo server under load").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from PIL import Image

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def proc_mem_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process in MiB (Linux)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data, ctype) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post(url: str, fields, files=None, headers=None, timeout: float = 120.0) -> tuple[int, float, str]:
    body, ctype = multipart(fields, files or {})
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype, **(headers or {})})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, time.perf_counter() - t0, ""
    except urllib.error.HTTPError as exc:
        return exc.code, time.perf_counter() - t0, exc.read().decode(errors="replace")[:200]
    except OSError as exc:
        return -1, time.perf_counter() - t0, repr(exc)[:200]


def big_jpeg(side: int) -> bytes:
    from reme.io import sample_image

    img = Image.fromarray(sample_image("chelsea"))
    s = side / max(img.size)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def wait_ready(base: str, proc: subprocess.Popen, deadline: float) -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the demo server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/api/config", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit("the demo server did not come up in time")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40, help="segmentation requests (default 40)")
    ap.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    ap.add_argument("--upload-side", type=int, default=4000, help="longest side of the uploaded JPEG (default 4000)")
    ap.add_argument("--classes", default="cat, wall, floor, person, sky", help="class field of each request")
    ap.add_argument("--reference", default=None, help="reference folder (default: the embedded one)")
    ap.add_argument("--max-seconds", type=float, default=900, help="stop everything after this (default 900)")
    args = ap.parse_args(argv)
    if not (1 <= args.requests <= 1000 and 1 <= args.concurrency <= 32):
        ap.error("keep --requests in [1, 1000] and --concurrency in [1, 32]")

    stop_at = time.time() + args.max_seconds
    port = free_port()
    base = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "reme.cli", "demo", "--host", HOST, "--port", str(port), "--device", "cpu", "-q"]
    if args.reference:
        cmd += ["--reference", args.reference]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(base, server, min(stop_at, time.time() + 300))
        jpeg = big_jpeg(args.upload_side)
        before = proc_mem_mb(server.pid)
        results = []
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = []
            for i in range(args.requests):
                if i % 2:
                    futures.append(pool.submit(post, base + "/api/segment", {"classes": args.classes},
                                               {"image": ("big.jpg", jpeg, "image/jpeg")}))
                else:
                    futures.append(pool.submit(post, base + "/api/segment",
                                               {"classes": args.classes, "sample": "chelsea"}))
            for f in as_completed(futures, timeout=max(1.0, stop_at - time.time())):
                results.append(f.result())
        wall = time.perf_counter() - t0
        after = proc_mem_mb(server.pid)
        probes = {
            "5000_classes": post(base + "/api/segment", {"classes": ",".join(f"c{i}" for i in range(5000)),
                                                         "sample": "chelsea"}),
            "foreign_host": post(base + "/api/segment", {"classes": "cat", "sample": "chelsea"},
                                 headers={"Host": "evil.example"}),
            "cross_site": post(base + "/api/segment", {"classes": "cat", "sample": "chelsea"},
                               headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}),
        }
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    lat = np.array([r[1] for r in results if r[0] == 200])
    errors = [r for r in results if r[0] != 200]
    summary = {
        "requests": args.requests, "concurrency": args.concurrency, "upload": f"{args.upload_side}px JPEG "
        f"{len(jpeg) / 2**20:.1f} MiB (every 2nd request)", "wall_s": round(wall, 1),
        "ok": int(lat.size), "errors": len(errors), "error_samples": [e[2] for e in errors[:3]],
        "p50_s": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "p95_s": round(float(np.percentile(lat, 95)), 2) if lat.size else None,
        "rss_before_mb": round(before["VmRSS"]), "rss_after_mb": round(after["VmRSS"]),
        "rss_peak_mb": round(after["VmHWM"]),
        "probes": {k: {"status": v[0], "seconds": round(v[1], 2)} for k, v in probes.items()},
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
