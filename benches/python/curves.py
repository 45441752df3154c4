"""CPython's points for benches/benches/curves.rs, measured the same way.

Prints one JSON object per point: {"name": ..., "x": ..., "y": ...}; the
Rust bench reads them and draws them beside its own. Usage:
    python3 curves.py [--quick]
"""
import json
import multiprocessing as mp
import statistics
import sys
import time

import pool_bench  # its timer, and the same tasks as the pool bench
from pool_bench import burn, cube


def produce(q, count, size):
    msg = bytes(size)
    for _ in range(count):
        q.put(msg)


def sink(conn):
    total = 0
    while True:
        m = conn.recv_bytes()
        if not m:
            conn.send_bytes(total.to_bytes(8, "little"))
            total = 0
        else:
            total += len(m)


def timed(fn, runs):
    """The median of `runs` timed calls of `fn`, in seconds."""
    return statistics.median(pool_bench.timed(fn, runs))


def emit(name, x, y):
    print(json.dumps(dict(name=name, x=x, y=y)), flush=True)


def burn_per_us():
    """Iterations of `burn` per µs of CPU: the median of five measurements
    of about 20 ms each, after a warm-up (the interpreter specialises the
    loop's bytecode while it runs)."""
    burn(200_000)
    iters = 1000
    while True:
        t = time.thread_time()  # CPU time: other work may share the cores
        burn(iters)
        d = time.thread_time() - t
        if d > 0.02:
            break
        iters *= 2
    rates = []
    for _ in range(5):
        t = time.thread_time()
        burn(iters)
        rates.append(iters / ((time.thread_time() - t) * 1e6))
    return statistics.median(rates)


def message_count(size, cap):
    return max(8, min(cap, (128 << 20) // size))


def main():
    quick = "--quick" in sys.argv
    ctx = mp.get_context("fork")
    # Calibrated in a worker, where the tasks run (in this parent the
    # same loop measured ~1.5x slower than in the pool's workers).
    with ctx.Pool(1) as p:
        per_us = p.apply(burn_per_us)
    sizes = [1_000, 100_000, 10_000_000] if quick else [1_000, 10_000, 100_000, 1_000_000, 10_000_000]
    costs = [0.1, 10.0, 1000.0] if quick else [0.1, 1.0, 10.0, 100.0, 1000.0]
    with ctx.Pool(2) as p:
        p.map(cube, range(1000))
        for n in sizes:
            runs = 1 if n >= 10_000_000 else (3 if n >= 1_000_000 else 5)
            emit("map_size", n, timed(lambda: p.map(cube, range(n)), runs) * 1e3)
        for cost in costs:
            iters = max(1, int(cost * per_us))
            runs = 1 if cost >= 100 else 3
            t = timed(lambda: p.map(burn, [iters] * 1000), runs)
            emit("map_cost", cost, t * 1e6 / 1000)

    msizes = [8, 4096, 1 << 20, 64 << 20] if quick else [8, 64, 512, 4096, 32 << 10, 256 << 10, 2 << 20, 16 << 20, 64 << 20]
    for size in msizes:
        count = message_count(size, 20_000)
        q = ctx.Queue()
        pr = ctx.Process(target=produce, args=(q, count, size))
        t = time.perf_counter()
        pr.start()
        for _ in range(count):
            q.get()
        dt = time.perf_counter() - t
        pr.join()
        emit("queue_size", size, count * size / dt / 1e6)

    a, b = ctx.Pipe()
    pr = ctx.Process(target=sink, args=(b,))
    pr.start()
    for size in msizes:
        count = message_count(size, 20_000)
        msg = bytes(size)

        def run():
            for _ in range(count):
                a.send_bytes(msg)
            a.send_bytes(b"")
            a.recv_bytes()

        emit("pipe_size", size, count * size / timed(run, 1 if quick else 3) / 1e6)
    pr.terminate()
    pr.join()

    workers = [1, 2, 4, 8] if quick else list(range(1, 9))
    iters = max(1, int(100 * per_us))
    for w in workers:
        with ctx.Pool(w) as p:
            p.map(cube, range(1000))
            emit("workers_burn", w, timed(lambda: p.map(burn, [iters] * 1000), 3) * 1e3)
            emit("workers_cube", w, timed(lambda: p.map(cube, range(1_000_000)), 3) * 1e3)


if __name__ == "__main__":
    main()
