#!/usr/bin/env python3
"""Dask distributed's side of `deno task bench:compare` (bench/compare.ts runs this).

The driver starts Dask's scheduler and workers itself; this script only measures, with
the same operations dist's side does, and prints one JSON line on stdout (progress goes
to stderr). Modes:

  raw-server
      An echo server and a sink server on 127.0.0.1, asyncio on raw sockets (the event
      loop Dask runs on), for the raw TCP limits. Prints {"echo": PORT, "sink": PORT},
      then serves until killed. The sink reads a header (u64 LE length, u64 LE mode),
      that many bytes, and acks with one byte. Mode 0 reads into one reused 1 MiB buffer
      (the limit); mode 1 into new memory per transfer, allocated the way Dask's TCP comm
      allocates a message it receives (numpy.empty: distributed.protocol.utils.host_array).

  startup --scheduler ADDRESS --samples N --worker-argv JSON
      N times: wait until the scheduler lists no worker, start a worker process
      (WORKER_ARGV + [ADDRESS]), poll the scheduler every 2 ms until it lists it, and stop
      it. Prints {"seconds": [...]}.

  bench --scheduler A --alice A --alice-pid PID --bob A --echo PORT --sink PORT --plan JSON
      Every figure of the comparison, in dist's order; prints the samples as JSON.

  bigger --scheduler A --chunks N --chunk-bytes B --timeout S
      The bigger-than-memory job: N float64 chunks of B bytes made on the workers
      (chunk i holds (i + j) % 7 at j), a sum of each, and their total. Prints
      {"seconds", "result", "error"}; error is null when it finished within S seconds.

Plain Python 3 with Debian's python3-distributed and python3-numpy (2022.12).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

perf_counter = time.perf_counter
MB = 1e6
RAW_WRITE_CHUNK_BYTES = 16 * 1024 * 1024
POLL_S = 0.002
STARTUP_TIMEOUT_S = 60.0
WORKERS_GONE_TIMEOUT_S = 30.0


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def stop_on_sigterm() -> None:
    """SIGTERM runs `finally` blocks (children are stopped), as SIGINT does."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# ---- raw TCP: the limits, asyncio on non-blocking sockets ----


async def read_full(loop, sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            return False
        got += n
    return True


async def serve_echo(loop, conn: socket.socket) -> None:
    buf = bytearray(64 * 1024)
    view = memoryview(buf)
    try:
        while True:
            n = await loop.sock_recv_into(conn, view)
            if n == 0:
                break
            await loop.sock_sendall(conn, view[:n])
    except OSError:
        pass
    finally:
        conn.close()


def fresh_buffer(nbytes: int):
    try:
        import numpy

        return numpy.empty(nbytes, dtype=numpy.uint8)
    except ImportError:
        return bytearray(nbytes)


async def serve_sink(loop, conn: socket.socket) -> None:
    header = bytearray(16)
    reused = bytearray(1024 * 1024)
    reused_view = memoryview(reused)
    try:
        while await read_full(loop, conn, memoryview(header)):
            total, mode = struct.unpack("<QQ", header)
            if mode == 0:
                left = total
                while left > 0:
                    n = await loop.sock_recv_into(conn, reused_view[: min(left, len(reused))])
                    if n == 0:
                        raise OSError("closed inside a transfer")
                    left -= n
            else:
                fresh = fresh_buffer(total)
                if not await read_full(loop, conn, memoryview(fresh).cast("B")):
                    raise OSError("closed inside a transfer")
                del fresh
            await loop.sock_sendall(conn, b"\x01")
    except OSError:
        pass
    finally:
        conn.close()


async def raw_server() -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for serve in (serve_echo, serve_sink):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.setblocking(False)
        servers.append((s, serve))
    print(json.dumps({"echo": servers[0][0].getsockname()[1], "sink": servers[1][0].getsockname()[1]}), flush=True)

    async def accept(s, serve):
        while True:
            conn, _ = await loop.sock_accept(s)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop.create_task(serve(loop, conn))

    await asyncio.gather(*(accept(s, serve) for s, serve in servers))


async def raw_connect(loop, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class RawEcho:
    """Round trips of 8 bytes through the echo server; microseconds each."""

    def __init__(self, loop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.back = bytearray(8)
        self.view = memoryview(self.back)
        self.i = 0

    async def round_trip(self) -> float:
        out = struct.pack("<Q", self.i)
        self.i += 1
        t0 = perf_counter()
        await self.loop.sock_sendall(self.sock, out)
        if not await read_full(self.loop, self.sock, self.view):
            raise OSError("The raw echo server closed the connection")
        t1 = perf_counter()
        if bytes(self.back) != out:
            raise ValueError("The echo came back wrong")
        return (t1 - t0) * 1e6


async def raw_bulk(loop, sock: socket.socket, data: memoryview, fresh: bool) -> float:
    """Sends `data` through the sink; MB/s."""
    header = struct.pack("<QQ", len(data), 1 if fresh else 0)
    ack = bytearray(1)
    t0 = perf_counter()
    await loop.sock_sendall(sock, header)
    for at in range(0, len(data), RAW_WRITE_CHUNK_BYTES):
        await loop.sock_sendall(sock, data[at : at + RAW_WRITE_CHUNK_BYTES])
    if not await read_full(loop, sock, memoryview(ack)):
        raise OSError("The raw sink closed the connection")
    t1 = perf_counter()
    return len(data) / MB / (t1 - t0)


# ---- startup: seconds from starting a worker process until the scheduler lists it ----


def die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if this script dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


async def startup(scheduler: str, samples: int, worker_argv: list[str]) -> dict:
    from distributed.core import rpc

    async with rpc(scheduler) as center:

        async def listed() -> int:
            return len(await center.ncores())

        seconds = []
        for i in range(samples):
            deadline = perf_counter() + WORKERS_GONE_TIMEOUT_S
            while await listed() > 0:
                if perf_counter() > deadline:
                    raise TimeoutError("The previous worker never left the scheduler")
                await asyncio.sleep(0.01)
            t0 = perf_counter()
            child = subprocess.Popen(
                worker_argv + [scheduler],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
            try:
                while await listed() < 1:
                    if child.poll() is not None:
                        raise RuntimeError(f"The worker exited with {child.returncode} before registering")
                    if perf_counter() - t0 > STARTUP_TIMEOUT_S:
                        raise TimeoutError("The worker did not register in time")
                    await asyncio.sleep(POLL_S)
                seconds.append(perf_counter() - t0)
                progress(f"dask worker {i + 1}/{samples} registered in {seconds[-1]:.3f} s")
            finally:
                child.terminate()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        return {"seconds": seconds}


# ---- the cluster figures ----


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def first_sum(u, v):
    return u[0] + v[0]


def length(a):
    return len(a)


def minor_faults(pid):
    """Minor page faults of `pid` so far (/proc/PID/stat field 10), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2 :].split()[7])
    except (OSError, ValueError, IndexError):
        return None


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


async def rounds(plan: dict, once, budget_s=None, warmup=None) -> list:
    """Full-size warm-up rounds until plan["taskWarmupS"] has passed (at least one; each
    appended to `warmup` if given, rounds -1, -2, ... so that no two share keys), then up
    to plan["rounds"] rounds; after the first, another starts only while the figure is
    within its budget (as bench/compare.ts does for dist)."""
    budget_s = plan["roundBudgetS"] if budget_s is None else budget_s
    warmup = [] if warmup is None else warmup
    w0 = perf_counter()
    while True:
        warmup.append(await once(-1 - len(warmup)))
        if perf_counter() - w0 >= plan["taskWarmupS"]:
            break
    out = []
    t0 = perf_counter()
    while len(out) < plan["rounds"] and (not out or perf_counter() - t0 < budget_s):
        out.append(await once(len(out)))
    return out


async def map_rate(client, n: int, r: int) -> float:
    base = (r + 2) * 10**7
    t = perf_counter()
    futures = client.map(inc, range(base, base + n))
    results = await client.gather(futures)
    s = perf_counter() - t
    if results[-1] != base + n:
        raise ValueError("map gave a wrong result")
    del futures, results
    return n / s


async def tree_rate(client, leaves: int, r: int) -> float:
    base = (r + 2) * 10**7
    t = perf_counter()
    level = client.map(inc, range(base, base + leaves))
    tasks = len(level)
    while len(level) > 1:
        level = [client.submit(add, level[i], level[i + 1]) for i in range(0, len(level), 2)]
        tasks += len(level)
    total = await level[0].result()
    s = perf_counter() - t
    expected = leaves * (base + 1) + leaves * (leaves - 1) // 2
    if total != expected:
        raise ValueError(f"tree gave {total}, expected {expected}")
    del level
    return tasks / s


async def chain_ms(client, n: int, r: int) -> float:
    base = (r + 2) * 10**7
    t = perf_counter()
    f = client.submit(inc, base)
    for _ in range(1, n):
        f = client.submit(inc, f)
    value = await f.result()
    ms = (perf_counter() - t) * 1000 / n
    if value != base + n:
        raise ValueError("chain gave a wrong result")
    del f
    return ms


async def seed_ms(client, np, workers: list, seeds: int, r: int) -> float:
    """x on one worker, a fresh `a` on the other; z <- add(x, a) through the client."""
    x = await client.scatter(np.ones(1000), workers=[workers[0]], direct=True, hash=False)
    samples = []
    for i in range(seeds):
        value = float((r + 1) * seeds + i)
        a = await client.scatter(np.array([value]), workers=[workers[1]], direct=True, hash=False)
        t = perf_counter()
        z = client.submit(first_sum, x, a)
        got = await z.result()
        samples.append((perf_counter() - t) * 1000)
        if got != 1 + value:
            raise ValueError(f"seed exchange gave {got}, expected {1 + value}")
        del z, a
    del x
    return median(samples)


async def transfers(client, plan: dict, make, verify, alice: str, alice_pid: int, bob: str) -> dict:
    """Per run: scatter to Bob, gather from Bob, then Alice computes len() of it (she
    fetches it from Bob). The warm-up run moves the same value (as on dist's side)."""
    value = make(plan["transferBytes"])
    nbytes = memoryview(value).nbytes
    out = {"scatter": [], "gather": [], "w2w": [], "w2wFaults": []}
    t0 = perf_counter()
    for run in range(-1, plan["transferRuns"]):
        if run > 0 and perf_counter() - t0 > plan["transferBudgetS"]:
            break
        t = perf_counter()
        fut = await client.scatter(value, workers=[bob], direct=True, hash=False)
        scatter_s = perf_counter() - t
        holders = await client.who_has(fut)
        if list(holders[fut.key]) != [bob]:
            raise ValueError(f"scatter put {fut.key} on {holders[fut.key]}, not on Bob")

        t = perf_counter()
        got = await client.gather(fut, direct=True)
        gather_s = perf_counter() - t
        verify(got, value)
        del got

        faults0 = minor_faults(alice_pid)
        t = perf_counter()
        n = await client.submit(length, fut, workers=[alice], pure=False).result()
        w2w_s = perf_counter() - t
        faults1 = minor_faults(alice_pid)
        if n != len(value):
            raise ValueError(f"Alice computed length {n}, expected {len(value)}")
        holders = await client.who_has(fut)
        if alice not in holders[fut.key]:
            raise ValueError("Alice did not keep a replica: she never fetched it")
        del fut
        gc.collect()
        await asyncio.sleep(0.2)  # the workers free it before the next run
        if run >= 0:
            out["scatter"].append(nbytes / MB / scatter_s)
            out["gather"].append(nbytes / MB / gather_s)
            out["w2w"].append(nbytes / MB / w2w_s)
            if faults0 is not None and faults1 is not None:
                out["w2wFaults"].append(faults1 - faults0)
    return out


async def bench(args) -> dict:
    import numpy as np
    import distributed
    from distributed import Client
    from distributed.comm import connect
    from distributed.core import send_recv

    plan = json.loads(args.plan)
    loop = asyncio.get_running_loop()
    result: dict = {
        "versions": {
            "distributed": distributed.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        }
    }

    client = await Client(args.scheduler, asynchronous=True)
    echo_sock = sink_sock = comm = None
    try:
        workers = sorted((await client.scheduler.identity())["workers"])
        if sorted([args.alice, args.bob]) != workers:
            raise ValueError(f"Expected workers {args.alice} and {args.bob}, the scheduler knows {workers}")

        # Round trips: raw and rpc get_data alternate in blocks, as on dist's side.
        progress(f"dask: raw and rpc round trips ({plan['roundTrips']} each, alternating)")
        tiny = await client.scatter({"tiny": 1}, workers=[args.alice], direct=True)  # held until the end
        echo_sock = await raw_connect(loop, args.echo)
        echo = RawEcho(loop, echo_sock)
        comm = await connect(args.alice)

        async def rpc_round_trip() -> float:
            # What a Dask peer does to fetch a key (distributed.worker.get_data_from_worker):
            # send_recv get_data, then acknowledge with "OK". The clock stops when the data is
            # here; the acknowledgement is not counted.
            t0 = perf_counter()
            reply = await send_recv(comm, op="get_data", keys=["tiny"], who=None, reply=True)
            t1 = perf_counter()
            if reply.get("status") != "OK" or reply["data"].get("tiny") != 1:
                raise ValueError(f"get_data tiny: unexpected reply {reply!r}")
            await comm.write("OK")
            return (t1 - t0) * 1e6

        for _ in range(plan["roundTripWarmup"]):
            await echo.round_trip()
            await rpc_round_trip()
        raw, rpc = [], []
        per_block = -(-plan["roundTrips"] // plan["roundTripBlocks"])
        for _ in range(plan["roundTripBlocks"]):
            for _ in range(per_block):
                raw.append(await echo.round_trip())
            for _ in range(per_block):
                rpc.append(await rpc_round_trip())
        result["rawRoundTripUs"] = raw
        result["rpcRoundTripUs"] = rpc
        del tiny

        progress(f"dask: raw bulk, {plan['bulkBytes'] >> 20} MiB x {plan['bulkRuns']}, reused and fresh memory")
        sink_sock = await raw_connect(loop, args.sink)
        data = memoryview(np.random.default_rng(2).bytes(plan["bulkBytes"]))
        await raw_bulk(loop, sink_sock, data, False)  # warm-up: the kernel's socket buffers
        await raw_bulk(loop, sink_sock, data, False)
        await raw_bulk(loop, sink_sock, data, True)
        reused, fresh = [], []
        for _ in range(plan["bulkRuns"]):
            reused.append(await raw_bulk(loop, sink_sock, data, False))
            fresh.append(await raw_bulk(loop, sink_sock, data, True))
        result["rawBulkMBps"] = reused
        result["rawBulkFreshMBps"] = fresh
        del data

        progress(f"dask: map(inc, {plan['mapTasks']}) + gather, {plan['rounds']} rounds after a warm-up")
        result["mapWarmupTasksPerS"] = []
        result["mapTasksPerS"] = await rounds(
            plan,
            lambda r: map_rate(client, plan["mapTasks"], r),
            warmup=result["mapWarmupTasksPerS"],
        )
        progress(f"dask: tree reduction of {plan['treeLeaves']} leaves")
        result["treeTasksPerS"] = await rounds(plan, lambda r: tree_rate(client, plan["treeLeaves"], r))
        progress(f"dask: chain of {plan['chain']}")
        result["chainMsPerTask"] = await rounds(plan, lambda r: chain_ms(client, plan["chain"], r))
        progress(f"dask: seed exchange ({plan['seeds']} per round)")
        workers = [args.alice, args.bob]
        result["seedMs"] = await rounds(plan, lambda r: seed_ms(client, np, workers, plan["seeds"], r))

        def check_at(n):
            return [0, 1, 12345 % n, n >> 1, n - 1]

        rng = np.random.default_rng(1)

        # Random data (incompressible: Dask's lz4 finds nothing to gain and sends it as is),
        # as dist's side; and the compressible arange of earlier runs as a row of its own.
        def make_f64(nbytes):
            return rng.random(nbytes // 8)

        def make_bytes(nbytes):
            return rng.bytes(nbytes)

        def make_f64_arange(nbytes):
            return np.arange(nbytes // 8, dtype=np.float64)

        def verify_array(v, value):
            if not isinstance(v, np.ndarray) or v.dtype != np.float64 or v.nbytes != value.nbytes:
                raise ValueError(f"expected a float64 array of {value.nbytes} bytes, got {type(v)}")
            for i in check_at(len(v)):
                if v[i] != value[i]:
                    raise ValueError(f"element {i} is {v[i]}, sent {value[i]}")

        def verify_bytes(v, value):
            if not isinstance(v, bytes) or len(v) != len(value):
                raise ValueError(f"expected {len(value)} bytes, got {type(v)}")
            for i in check_at(len(v)):
                if v[i] != value[i]:
                    raise ValueError(f"byte {i} is {v[i]}, sent {value[i]}")

        n = plan["transferBytes"]
        kinds = (
            ("f64", make_f64, verify_array),
            ("bytes", make_bytes, verify_bytes),
            ("f64_arange", make_f64_arange, verify_array),
        )
        for name, make, verify in kinds:
            progress(f"dask: {n >> 20} MiB {name}: scatter, gather, worker to worker")
            result[f"transfer_{name}"] = await transfers(client, plan, make, verify, args.alice, args.alice_pid, args.bob)
    finally:
        for s in (echo_sock, sink_sock):
            if s is not None:
                s.close()
        if comm is not None:
            await comm.close()
        await client.close()
    return result


def make_chunk(i, n):
    import numpy as np

    # In place, as dist's side fills one array: no temporaries.
    a = np.arange(i, i + n, dtype=np.float64)
    np.remainder(a, 7, out=a)
    return a


def chunk_sum(a):
    return float(a.sum())


def add_all(xs):
    return sum(xs)


async def bigger(args) -> dict:
    from distributed import Client

    async with Client(args.scheduler, asynchronous=True) as client:
        started = perf_counter()
        n = args.chunk_bytes // 8
        chunks = client.map(make_chunk, range(args.chunks), n=n)
        sums = client.map(chunk_sum, chunks)
        total = client.submit(add_all, sums)
        result = None
        error = None
        try:
            result = await asyncio.wait_for(total, args.timeout)
        except asyncio.TimeoutError:
            error = f"not finished after {args.timeout:.0f} s"
        except Exception as e:  # what the job ended with: KilledWorker, a lost key
            error = f"{type(e).__name__}: {e}"[:300]
        seconds = perf_counter() - started
        await client.cancel([total, *sums, *chunks])
    return {"seconds": seconds, "result": result, "error": error}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("raw-server")
    s = sub.add_parser("startup")
    s.add_argument("--scheduler", required=True)
    s.add_argument("--samples", type=int, required=True)
    s.add_argument("--worker-argv", required=True, help="JSON list: the worker command without the scheduler")
    b = sub.add_parser("bench")
    for name in ("--scheduler", "--alice", "--bob", "--plan"):
        b.add_argument(name, required=True)
    b.add_argument("--alice-pid", type=int, required=True)
    b.add_argument("--echo", type=int, required=True)
    b.add_argument("--sink", type=int, required=True)
    g = sub.add_parser("bigger")
    g.add_argument("--scheduler", required=True)
    g.add_argument("--chunks", type=int, required=True)
    g.add_argument("--chunk-bytes", type=int, required=True)
    g.add_argument("--timeout", type=float, required=True)
    args = parser.parse_args()
    stop_on_sigterm()
    if args.mode == "raw-server":
        try:
            asyncio.run(raw_server())
        except (KeyboardInterrupt, SystemExit):
            pass
        return 0
    if args.mode == "startup":
        out = asyncio.run(startup(args.scheduler, args.samples, json.loads(args.worker_argv)))
    elif args.mode == "bigger":
        out = asyncio.run(bigger(args))
    else:
        out = asyncio.run(bench(args))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
