"""Median time of multiprocessing.Process start + join of a trivial target, in ms."""
import multiprocessing as mp
import statistics
import sys
import time


def trivial():
    pass


def main():
    method = sys.argv[1] if len(sys.argv) > 1 else "fork"
    ctx = mp.get_context(method)
    n = 12 if method == "spawn" else 40
    if method == "forkserver":
        # Started before the clock, as the Rust side's start_forkserver.
        p = ctx.Process(target=trivial)
        p.start()
        p.join()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        p = ctx.Process(target=trivial)
        p.start()
        p.join()
        samples.append(time.perf_counter() - t)
    print(f"{statistics.median(samples) * 1e3:.3f}")


if __name__ == "__main__":
    main()
