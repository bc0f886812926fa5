"""The split server under load and under abuse, on loopback: what a well-behaved edge sees.

    python benchmarks/bench_server.py [--ckpt RQ_CKPT_WITH_MODELS] [--seconds 15] [--workers 1]

Starts ``tools/split_server.py`` (signed frames, default limits) on a full-grid KITTI PointPillarRQ and
sends it real frames (the 40 raw scans of ../shared/data coded at (3, 64)):

1. N = 1, 4, 16 well-behaved edges (each its own key id, connection and address) sending back to back:
   frames/s served, answered busy (shed), latency p50 / p99 (ms, served frames).
2. One well-behaved edge while, from other addresses, 50 slowloris connections (1 byte/s), 200 idle
   connections and a burst of 50 concurrent valid frames every 3 s run: its p99 against its idle p99
   (reference: phase 1, N = 1; goal <= 3x) and the server's peak memory (VmHWM) against the bound it
   prints at start.

Without --ckpt it builds the model of benchmarks/bench_edge.py (quantizer fitted to 4 raw scans; timing
does not depend on the weights).
"""
import argparse
import json
import multiprocessing as mp
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench_edge import SETS, prepared_checkpoint, scans

REPO = Path(__file__).resolve().parents[1]
ATTACK_ADDRESSES = {"slowloris": "127.0.0.2", "idle": "127.0.0.3", "burst": "127.0.0.4"}


def coded_frames(ckpt: Path):
    from pcdet_ext.deploy import runtime
    from pcdet_ext.edge import read_scan
    model, dataset, _ = runtime.load_split_model(ckpt=ckpt)
    server = runtime.ServerRuntime.from_checkpoint(model, dataset, ckpt)
    edge = runtime.EdgeRuntime(model, dataset, server.models, 3, 64)
    return [edge.encode(read_scan(p))[0] for p in scans(SETS["kitti_raw"])]


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def edge_loop(port, key, frames, stop_at, out, source):
    """Send frames back to back from ``source`` until ``stop_at``; append (outcome, ms) to ``out``."""
    from pcdet_ext.edge.transport import BUSY, FrameClient, TransportError
    client = FrameClient("127.0.0.1", port, timeout_s=60, key=key, source=source)
    i = 0
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        try:
            client.request(frames[i % len(frames)])
            out.append(("ok", (time.perf_counter() - t0) * 1e3))
        except TransportError as exc:
            out.append(("busy" if exc.status == BUSY else exc.reason, (time.perf_counter() - t0) * 1e3))
            if exc.status == BUSY:
                time.sleep(0.05)  # a shed edge backs off before its next frame
        i += 1
    client.close()


def clients(port, keys, frames, seconds):
    stop_at = time.monotonic() + seconds
    outs = [[] for _ in keys]
    threads = [threading.Thread(target=edge_loop, args=(port, k, frames, stop_at, o, f"127.0.1.{i + 1}"))
               for i, (k, o) in enumerate(zip(keys, outs))]  # each edge a vehicle of its own
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def attack(port, burst_keys, frames, seconds, report):
    """Slowloris, idle and repeated bursts from their own addresses, for ``seconds`` (runs in a child process)."""
    from pcdet_ext.edge.auth import FRAME, seal
    from pcdet_ext.edge.transport import LENGTH
    stop_at = time.monotonic() + seconds
    counts = {"slowloris_dropped": 0, "idle_refused_or_dropped": 0, "burst_ok": 0, "burst_busy": 0, "burst_other": 0}
    lock = threading.Lock()

    def note(name):
        with lock:
            counts[name] += 1

    def slowloris():
        try:
            s = socket.create_connection(("127.0.0.1", port), source_address=(ATTACK_ADDRESSES["slowloris"], 0))
            wire = LENGTH.pack(5000) + bytes(5000)
            for b in wire:
                if time.monotonic() > stop_at:
                    return
                s.sendall(bytes([b]))
                time.sleep(1.0)
        except OSError:
            note("slowloris_dropped")

    def idle():
        try:
            s = socket.create_connection(("127.0.0.1", port), source_address=(ATTACK_ADDRESSES["idle"], 0))
            s.settimeout(max(0.1, stop_at - time.monotonic()))
            if s.recv(1 << 16) is not None:
                note("idle_refused_or_dropped")  # answered busy (over the cap) or closed
        except socket.timeout:
            pass
        except OSError:
            note("idle_refused_or_dropped")

    def burst_one(i, seq):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60,
                                          source_address=(ATTACK_ADDRESSES["burst"], 0)) as s:
                env = seal(FRAME, frames[i % len(frames)], seq, burst_keys[i])
                s.sendall(LENGTH.pack(len(env)) + env)
                head = s.recv(4, socket.MSG_WAITALL)
                status = s.recv(1)[0] if len(head) == 4 else None
                note("burst_ok" if status == 0 else "burst_busy" if status == 2 else "burst_other")
        except (OSError, IndexError):
            note("burst_other")

    threads = [threading.Thread(target=slowloris, daemon=True) for _ in range(50)]
    threads += [threading.Thread(target=idle, daemon=True) for _ in range(200)]
    for t in threads:
        t.start()
    round_ = 0
    while time.monotonic() < stop_at - 1:
        seq = time.time_ns() // 1000 + round_
        burst = [threading.Thread(target=burst_one, args=(i, seq), daemon=True) for i in range(50)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(30)
        round_ += 1
        time.sleep(3.0)
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + 2)
    report.put({**counts, "bursts": round_})


def stats(out):
    ok = [ms for what, ms in out if what == "ok"]
    return {"served": len(ok), "shed": sum(what == "busy" for what, _ in out),
            "other": sum(what not in ("ok", "busy") for what, _ in out),
            "p50": float(np.percentile(ok, 50)) if ok else float("nan"),
            "p99": float(np.percentile(ok, 99)) if ok else float("nan")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="RQ checkpoint with bitstream models (default: built here)")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    p.add_argument("--workers", type=int, default=1, help="the server's --workers")
    args = p.parse_args()
    from pcdet_ext.edge.auth import Key, write_new_key
    tmp = Path(tempfile.mkdtemp(prefix="bench_server_"))
    ckpt = Path(args.ckpt) if args.ckpt else prepared_checkpoint(tmp)
    frames = coded_frames(ckpt)
    keys = [write_new_key(f"edge{i}", tmp / f"edge{i}.key") for i in range(16)]
    burst_keys = [Key(f"burst{i}", bytes([i + 1]) * 32) for i in range(50)]
    server_keys = tmp / "server.keys"
    server_keys.write_text("".join(f"{k.key_id} {k.secret.hex()}\n" for k in keys + burst_keys))
    server_keys.chmod(0o600)
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen([sys.executable, str(REPO / "tools/split_server.py"), "--ckpt", str(ckpt), "--port", "0",
                               "--key_file", str(server_keys), "--workers", str(args.workers)],
                              stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(REPO))
    try:
        banner = server.stdout.readline().strip()
        port = int(server.stdout.readline().strip().rsplit(":", 1)[1])
        bound = float(re.search(r"memory bound (\d+) MiB", banner).group(1))
        print(f"server: {banner}\nframes: {len(frames)} real scans at (3, 64), mean {np.mean([len(f) for f in frames]):.0f} B;"
              f" {args.seconds:g} s per phase; machine: {mp.cpu_count()} CPUs")
        print(f"{'phase':>24} {'frames/s':>8} {'served':>6} {'shed':>5} {'p50 ms':>8} {'p99 ms':>8}")
        idle_p99 = None
        for n in (1, 4, 16):
            outs = clients(port, keys[:n], frames, args.seconds)
            every = stats([o for out in outs for o in out])
            idle_p99 = idle_p99 or every["p99"]
            print(f"{f'{n} edge(s)':>24} {every['served'] / args.seconds:8.2f} {every['served']:6d} {every['shed']:5d} "
                  f"{every['p50']:8.1f} {every['p99']:8.1f}")
        report = mp.Queue()
        attacker = mp.Process(target=attack, args=(port, burst_keys, frames, args.seconds + 4, report))
        attacker.start()
        time.sleep(2.0)  # the slow and idle connections are in place
        (under,) = clients(port, keys[:1], frames, args.seconds)
        attacker.join(args.seconds + 60)
        attacked = stats(under)
        print(f"{'1 edge under attack':>24} {attacked['served'] / args.seconds:8.2f} {attacked['served']:6d} "
              f"{attacked['shed']:5d} {attacked['p50']:8.1f} {attacked['p99']:8.1f}")
        print(f"attack: {json.dumps(report.get(timeout=10))}")
        from pcdet_ext.edge.transport import FrameClient
        with FrameClient("127.0.0.1", port, key=keys[0]) as c:
            print(f"server counters: {json.dumps(c.health())}")
        peak = vm_hwm_mib(server.pid)
        print(f"well-behaved edge p99 under attack / idle p99: {attacked['p99'] / idle_p99:.2f} (goal <= 3); "
              f"server peak memory {peak:.0f} MiB / bound {bound:.0f} MiB = {peak / bound:.2f} (goal <= 1)")
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


if __name__ == "__main__":
    main()
