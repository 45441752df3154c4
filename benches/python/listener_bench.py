"""CPython's multiprocessing.connection Listener/Client, measured the way
benches/benches/listener.rs measures multiproc (that bench runs this
script and prints both side by side): a round trip of send(42)/recv()
over TCP loopback with an authkey, the echo in another process, and an
authenticated connect + accept (3.11: HMAC-MD5 challenge-response).
Prints `name = seconds` lines (medians of 5 runs).

Run: python3 benches/python/listener_bench.py
"""
import multiprocessing as mp
import statistics
import threading
import time
from multiprocessing.connection import Client, Listener

KEY = b"bench key"


def echo(address):
    conn = Client(address, authkey=KEY)
    try:
        while True:
            conn.send(conn.recv())
    except EOFError:
        pass


def round_trip(n=20000):
    with Listener(("127.0.0.1", 0), authkey=KEY) as listener:
        p = mp.Process(target=echo, args=(listener.address,))
        p.start()
        conn = listener.accept()
        for _ in range(1000):
            conn.send(42)
            conn.recv()
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                conn.send(42)
                conn.recv()
            runs.append((time.perf_counter() - t) / n)
        conn.close()
        p.join()
    return statistics.median(runs)


def connects(n=100):
    listener = Listener(("127.0.0.1", 0), authkey=KEY)

    def serve():
        while True:
            listener.accept().close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            Client(listener.address, authkey=KEY).close()
        runs.append((time.perf_counter() - start) / n)
    # The daemon thread ends with the interpreter.
    return statistics.median(runs)


if __name__ == "__main__":
    mp.set_start_method("fork")
    print(f"cpython_tcp_round_trip = {round_trip()}")
    print(f"cpython_authenticated_connect = {connects()}")
