"""CPython multiprocessing figures for benches/benches/sync.rs (same shapes).

Run with `python3 benches/python/sync_bench.py`; prints its own timings.
"""
import multiprocessing as mp
import time


def lock_uncontended(n=1_000_000):
    lock = mp.Lock()
    acquire, release = lock.acquire, lock.release
    t = time.perf_counter()
    for _ in range(n):
        acquire()
        release()
    return (time.perf_counter() - t) / n


def _add_locked(v, barrier, n, out):
    barrier.wait()
    t = time.perf_counter()
    for _ in range(n):
        with v.get_lock():
            v.value += 1
    out.put(time.perf_counter() - t)


def value_locked_two_procs(total=1_000_000):
    v = mp.Value("q", 0)
    barrier = mp.Barrier(2)
    out = mp.Queue()
    procs = [mp.Process(target=_add_locked, args=(v, barrier, total // 2, out)) for _ in range(2)]
    for p in procs:
        p.start()
    slowest = max(out.get(), out.get())
    for p in procs:
        p.join()
    assert v.value == total
    return slowest / total


def _event_echo(ping, pong, rounds):
    for _ in range(rounds):
        ping.wait()
        ping.clear()
        pong.set()


def event_round_trip(rounds=10_000):
    ping, pong = mp.Event(), mp.Event()
    p = mp.Process(target=_event_echo, args=(ping, pong, rounds + 1))
    p.start()

    def one():
        ping.set()
        pong.wait()
        pong.clear()

    one()
    t = time.perf_counter()
    for _ in range(rounds):
        one()
    elapsed = time.perf_counter() - t
    p.join()
    return elapsed / rounds


def _condition_echo(cond, turn, rounds):
    for _ in range(rounds):
        with cond:
            cond.wait_for(lambda: turn.value != 0)
            turn.value = 0
            cond.notify_all()


def condition_round_trip(rounds=10_000):
    cond = mp.Condition()
    turn = mp.RawValue("i", 0)
    p = mp.Process(target=_condition_echo, args=(cond, turn, rounds + 1))
    p.start()

    def one():
        with cond:
            turn.value = 1
            cond.notify_all()
            cond.wait_for(lambda: turn.value == 0)

    one()
    t = time.perf_counter()
    for _ in range(rounds):
        one()
    elapsed = time.perf_counter() - t
    p.join()
    return elapsed / rounds


if __name__ == "__main__":
    mp.set_start_method("spawn")
    print(f"  Lock acquire+release uncontended: {lock_uncontended() * 1e9:10.1f} ns")
    print(f"  Value += 1 under its lock, 2 procs: {value_locked_two_procs() * 1e9:10.1f} ns per increment")
    print(f"  Event ping-pong round trip:        {event_round_trip() * 1e9:10.1f} ns")
    print(f"  Condition ping-pong round trip:    {condition_round_trip() * 1e9:10.1f} ns")
