"""CPython's multiprocessing.Pool on the same workloads as benches/pool.rs.

Prints one JSON object per line: {"name": ..., "seconds": [...]}; the Rust
bench reads them and puts CPython in the same table. Usage:
    python3 pool_bench.py [--quick]
"""
import json
import multiprocessing as mp
import resource
import sys
import time


def cube(x):
    return x * x * x


def burn(iters):
    acc = 0
    for i in range(iters):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


def timed(fn, runs):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def emit(name, seconds, **extra):
    print(json.dumps(dict(name=name, seconds=seconds, **extra)), flush=True)


def main():
    runs = 3 if "--quick" in sys.argv else 5
    n = 1_000_000
    for method in ("fork", "spawn"):
        ctx = mp.get_context(method)

        def cold():
            with ctx.Pool(2) as p:
                p.map(cube, range(n))

        emit(f"cpython_{method}_map_1m_cold", timed(cold, runs))
        with ctx.Pool(2) as p:
            p.map(cube, range(1000))  # warm up
            emit(f"cpython_{method}_map_1m_warm", timed(lambda: p.map(cube, range(n)), runs))
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            tiny = timed(lambda: p.map(cube, range(10_000), chunksize=1), runs)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            emit(f"cpython_{method}_map_10k_chunksize1", tiny,
                 parent_cpu_per_task_us=cpu / (10_000 * runs) * 1e6)

    # 200 tasks of ~8 ms CPU: speedup and parent CPU per task.
    iters = 1000
    while True:
        t = time.perf_counter()
        burn(iters)
        if time.perf_counter() - t > 0.008:
            break
        iters = int(iters * 1.5)
    seq = timed(lambda: [burn(iters) for _ in range(200)], 1)
    with mp.get_context("fork").Pool(2) as p:
        p.map(cube, range(10))
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        par = timed(lambda: p.map(burn, [iters] * 200), 1)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        emit("cpython_fork_200x8ms", par, sequential=seq[0], parent_cpu_per_task_us=cpu / 200 * 1e6)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        par = timed(lambda: p.map(burn, [iters] * 200, chunksize=1), 1)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        emit("cpython_fork_200x8ms_chunksize1", par, sequential=seq[0],
             parent_cpu_per_task_us=cpu / 200 * 1e6)


if __name__ == "__main__":
    main()
