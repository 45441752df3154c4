"""CPython's multiprocessing Queue and Pipe, measured the way
benches/benches/queue.rs measures multiproc. Prints its own timings.

Run: python3 benches/python/queue_bench.py
"""
import multiprocessing as mp
import os
import time


def produce(q, n, item):
    for _ in range(n):
        q.put(item)


def produce_lists(q, n, chunk):
    items = list(range(chunk))
    for _ in range(n // chunk):
        q.put(items)


def consume(q, n, done):
    for _ in range(n):
        q.get()
    done.put(1)


def echo(conn):
    try:
        while True:
            conn.send(conn.recv())
    except EOFError:
        pass


def raw_echo(r, w):
    while True:
        b = os.read(r, 8)
        if not b:
            return
        os.write(w, b)


def one_to_one(n, item):
    q = mp.Queue()
    p = mp.Process(target=produce, args=(q, n, item))
    p.start()
    q.get()
    t = time.perf_counter()
    for _ in range(n - 1):
        q.get()
    dt = time.perf_counter() - t
    p.join()
    return (n - 1) / dt


def batch_one_to_one(n, chunk=1024):
    """The batch case: CPython's Queue has no put_many, so a batch is one
    message holding a list of `chunk` ints (what a Python user would do).
    Returns items per second."""
    q = mp.Queue()
    p = mp.Process(target=produce_lists, args=(q, n, chunk))
    p.start()
    q.get()
    t = time.perf_counter()
    for _ in range(n // chunk - 1):
        q.get()
    dt = time.perf_counter() - t
    p.join()
    return (n - chunk) / dt


def four_to_two(n):
    q, done = mp.Queue(), mp.Queue()
    per = n // 4
    cons = [mp.Process(target=consume, args=(q, per * 2, done)) for _ in range(2)]
    prods = [mp.Process(target=produce, args=(q, per, 1)) for _ in range(4)]
    for p in cons + prods:
        p.start()
    t = time.perf_counter()
    done.get()
    done.get()
    dt = time.perf_counter() - t
    for p in cons + prods:
        p.join()
    return per * 4 / dt


def pipe_rtt(n):
    a, b = mp.Pipe()
    p = mp.Process(target=echo, args=(b,))
    p.start()
    a.send(1)
    a.recv()
    t = time.perf_counter()
    for _ in range(n):
        a.send(42)
        a.recv()
    dt = time.perf_counter() - t
    a.close()
    p.terminate()  # the forked child holds a copy of `a`: no EOF
    p.join()
    return dt / n


def raw_pipe_rtt(n):
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    p = mp.Process(target=raw_echo, args=(r1, w2))
    p.start()
    t = time.perf_counter()
    for _ in range(n):
        os.write(w1, b"12345678")
        os.read(r2, 8)
    dt = time.perf_counter() - t
    os.close(w1)
    p.terminate()
    p.join()
    return dt / n


if __name__ == "__main__":
    mp.set_start_method("fork")
    print(f"cpython queue_1p1c u64:       {one_to_one(200_000, 12345) / 1e3:8.1f} k msgs/s")
    print(f"cpython queue_1p1c 1KiB bytes: {one_to_one(100_000, b'x' * 1024) / 1e3:8.1f} k msgs/s")
    print(f"cpython queue batch u64 (lists of 1024): {batch_one_to_one(2_000_000) / 1e6:8.2f} M items/s")
    print(f"cpython queue_4p2c u64:       {four_to_two(200_000) / 1e3:8.1f} k msgs/s")
    print(f"cpython pipe round trip:      {pipe_rtt(20_000) * 1e6:8.1f} us")
    print(f"python raw os.pipe round trip: {raw_pipe_rtt(20_000) * 1e6:8.1f} us")
