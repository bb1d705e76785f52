"""How many predictions per second does `fashion-cnn serve` answer, how fast, and does its memory
stay put?

A real server process (`fashion_cnn.apps.serve.serve`, what `fashion-cnn serve RUN` runs) is
started on a free loopback port; N concurrent clients (one keep-alive HTTP/1.1 connection
each, all in one asyncio loop in this process) POST Fashion-MNIST test images to
/api/predict, one image or a batch per request, for a bounded time and a bounded number of
requests per configuration. Reported per configuration: requests and images per second,
latency percentiles (p50/p95/p99, from sending a request to reading its whole answer), errors
(a status other than 200, a broken connection, or an answer without one result per image),
and the server's resident memory (VmRSS from /proc) before and after. A soak then sends
`--soak` single-image requests and checks that there is no error and that the server's RSS
grew by at most `--rss-bound-mib` (measured after a warm-up, so that the allocator's first
fill does not count).

    python benchmarks/serve_load.py RUN_DIR                       # 1, 8, 32 clients; 1 and 16 images
    python benchmarks/serve_load.py RUN_DIR --soak 10000 --rss-bound-mib 32
    python benchmarks/serve_load.py --smoke                       # seconds: a tiny run, few requests

The clients share the machine with the server: on a 2-core machine they take part of a core,
so the figures are a lower bound of what the server alone would answer.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import (fmt, machine_info, note, parse_run_args, smoke_run, table,
                    write_result)
from fashion_cnn.data.fashion_mnist import load_data

BOUNDARY = "fashioncnnloadtest"
# The server process: the library's serve(), as `fashion-cnn serve RUN --port P` calls it.
SERVER = ("import sys; from fashion_cnn.apps.serve import serve; "
          "serve(sys.argv[1], port=int(sys.argv[2]), threads=int(sys.argv[3]) or None)")
WARMUP_REQUESTS = 200  # before the first RSS reading: the allocator and caches fill up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # the line is in kB
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def multipart_request(port: int, images: list[np.ndarray], names: list[str],
                      query: str) -> bytes:
    """One complete HTTP/1.1 POST /api/predict request with the images as PNG file fields."""
    parts = []
    for image, name in zip(images, names):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                     f'filename="{name}"\r\nContent-Type: image/png\r\n\r\n'.encode()
                     + buffer.getvalue() + b"\r\n")
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    head = (f"POST /api/predict{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def read_response(reader) -> tuple[int, bytes, bool]:
    """(status, body, whether the server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection", "").lower() != "close"


async def load(port: int, payloads: list[bytes], batch: int, clients: int, seconds: float,
               requests: int) -> dict:
    """`clients` connections sending payloads round-robin until `requests` were sent or
    `seconds` passed; latencies (s) of the answered ones, and the errors."""
    latencies, errors, sent = [], [], 0
    deadline = time.perf_counter() + seconds

    async def client(number: int):
        nonlocal sent
        reader = writer = None
        while sent < requests and time.perf_counter() < deadline:
            payload = payloads[sent % len(payloads)]
            sent += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                start = time.perf_counter()
                writer.write(payload)
                await writer.drain()
                status, body, keep = await read_response(reader)
                latencies.append(time.perf_counter() - start)
                answer = json.loads(body) if status == 200 else {}
                if status != 200 or answer.get("errors") or len(answer.get("results", ())) != batch:
                    errors.append(f"status {status}: {body[:200]!r}")
                if not keep:
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000.0
    percentile = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: None)
    return {"clients": clients, "batch": batch, "requests": len(latencies),
            "seconds": wall, "requests_per_second": len(latencies) / wall,
            "images_per_second": len(latencies) * batch / wall,
            "p50_ms": percentile(50), "p95_ms": percentile(95), "p99_ms": percentile(99),
            "max_ms": float(ms.max()) if len(ms) else None,
            "errors": len(errors), "error_examples": errors[:5]}


def start_server(run_dir, port: int, threads: int, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(run_dir), str(port),
                                str(threads)], stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve_load: the server exited ({process.returncode}); see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                # the Host a client of 127.0.0.1 sends: serve answers no other on loopback
                sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                             f"Connection: close\r\n\r\n".encode())
                if b"200 OK" in sock.recv(1024):
                    return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"serve_load: the server did not answer within 120 s; see {log}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", help="a trained run (fashion-cnn train fast ...)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16],
                   help="images per request (default: 1 and 16)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="at most this long per configuration (default 20)")
    p.add_argument("--requests", type=int, default=3000,
                   help="at most this many requests per configuration (default 3,000)")
    p.add_argument("--explain", action="store_true", help="ask for Grad-CAM overlays too")
    p.add_argument("--soak", type=int, default=0,
                   help="then this many single-image requests (0: no soak)")
    p.add_argument("--soak-clients", type=int, default=8)
    p.add_argument("--rss-bound-mib", type=float, default=32.0,
                   help="the soak fails where the server's RSS grows by more (default 32)")
    p.add_argument("--threads", type=int, default=0,
                   help="the server's torch threads (default: serve's own choice)")
    return parse_run_args(p, argv, "serve_load.json",
                          "a tiny run, 2 clients, a few requests: only shows the script works")


def main(argv=None) -> int:
    args = parse_args(argv)
    data = load_data()
    run_dir = args.run_dir
    if args.smoke:
        run_dir = smoke_run("serve-load-", data, 512, threads=1)
        args.clients, args.batches, args.seconds, args.requests = [1, 2], [1, 4], 5.0, 20
        args.soak = args.soak or 50
    images = data.test_images[:256]
    port = free_port()
    log = args.out.with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    query = "?explain=true" if args.explain else ""
    server = start_server(run_dir, port, args.threads, log)
    try:
        payloads = {batch: [multipart_request(port, [images[(i + j) % len(images)]
                                                     for j in range(batch)],
                                              [f"test-{(i + j) % len(images):05d}.png"
                                               for j in range(batch)], query)
                            for i in range(0, len(images), batch)]
                    for batch in args.batches}
        warmup = asyncio.run(load(port, payloads[args.batches[0]], args.batches[0], 4, 60.0,
                                  WARMUP_REQUESTS))
        note(f"serve_load: warm-up {warmup['requests']} requests, {warmup['errors']} errors")
        results = []
        for batch in args.batches:
            for clients in args.clients:
                before = rss_mib(server.pid)
                note(f"serve_load: {clients} clients, {batch} image(s) per request ...")
                result = asyncio.run(load(port, payloads[batch], batch, clients, args.seconds,
                                          args.requests))
                result.update(rss_before_mib=before, rss_after_mib=rss_mib(server.pid))
                results.append(result)
        soak = None
        if args.soak:
            before = rss_mib(server.pid)
            note(f"serve_load: soak of {args.soak} requests, {args.soak_clients} clients ...")
            soak = asyncio.run(load(port, payloads[1] if 1 in payloads else
                                    [multipart_request(port, [images[0]], ["a.png"], query)],
                                    1, args.soak_clients, float("inf"), args.soak))
            after = rss_mib(server.pid)
            soak.update(rss_before_mib=before, rss_after_mib=after,
                        rss_growth_mib=after - before, rss_bound_mib=args.rss_bound_mib,
                        passed=soak["errors"] == 0 and soak["requests"] == args.soak
                        and after - before <= args.rss_bound_mib)
        peak = rss_mib(server.pid, "VmHWM")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    rows = [[r["clients"], r["batch"], r["requests"], fmt(r["requests_per_second"], 1),
             fmt(r["images_per_second"], 0), fmt(r["p50_ms"], 1), fmt(r["p95_ms"], 1),
             fmt(r["p99_ms"], 1), r["errors"], fmt(r["rss_before_mib"], 1),
             fmt(r["rss_after_mib"], 1)] for r in results]
    if soak:
        rows.append([f"soak {soak['clients']}", 1, soak["requests"],
                     fmt(soak["requests_per_second"], 1), fmt(soak["images_per_second"], 0),
                     fmt(soak["p50_ms"], 1), fmt(soak["p95_ms"], 1), fmt(soak["p99_ms"], 1),
                     soak["errors"], fmt(soak["rss_before_mib"], 1),
                     fmt(soak["rss_after_mib"], 1)])
    print(f"\n{run_dir}: POST /api/predict{query} over loopback, at most {args.requests:,} "
          f"requests or {args.seconds:g} s per row; server peak RSS {peak:.1f} MiB")
    print(table(["clients", "images/req", "requests", "req/s", "img/s", "p50 ms", "p95 ms",
                 "p99 ms", "errors", "RSS before MiB", "RSS after MiB"], rows))
    if soak:
        verdict = "PASS" if soak["passed"] else "FAIL"
        print(f"soak: {soak['requests']:,} requests, {soak['errors']} errors, RSS "
              f"{soak['rss_before_mib']:.1f} -> {soak['rss_after_mib']:.1f} MiB "
              f"(growth {soak['rss_growth_mib']:+.1f}, bound {args.rss_bound_mib:g}): {verdict}")
    write_result(args.out, {
        "benchmark": "serve_load", "machine": machine_info(), "run_dir": str(run_dir),
        "explain": args.explain, "server_threads": args.threads or "default",
        "warmup": warmup, "results": results, "soak": soak, "server_peak_rss_mib": peak,
        "server_log": str(log), "command": " ".join([sys.executable, *sys.argv])})
    return 0 if soak is None or soak["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
