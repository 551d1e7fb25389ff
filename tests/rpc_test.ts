import assert from "node:assert/strict";
import { BusyError, ConnectionClosedError, RemoteError, rpc, TimeoutError, type WorkerOps } from "../mod.ts";
import { Comm, type Dispatch, READ_TURN_MS, REQUESTS_IN_FLIGHT_MAX } from "../protocol/comm.ts";
import { serve, type Server } from "../protocol/server.ts";
import { eventually, startCluster } from "./_helpers.ts";

/** A handler's own pause: the behaviour under test (replies that come back out of order), never a wait for something. */
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A real server on 127.0.0.1:0 with ops made for the test. */
function testServer(dispatch: Dispatch): Promise<Server> {
  return serve({ host: "127.0.0.1", port: 0 }, dispatch);
}

Deno.test("one rpc reuses one connection; concurrent calls each get their own reply", async () => {
  const server = await testServer(async (op, args) => {
    const { n, delayMs } = args as { n: number; delayMs: number };
    await sleep(delayMs);
    return { op, n };
  });
  try {
    await using client = rpc(server.url);
    // Later calls finish first: replies must still reach the right callers.
    const replies = await Promise.all(
      Array.from({ length: 50 }, (_, n) => client.call("echo", { n, delayMs: 50 - n })),
    );
    assert.deepEqual(replies, Array.from({ length: 50 }, (_, n) => ({ op: "echo", n })));
    assert.equal(server.comms.size, 1);
    await client.call("echo", { n: 0, delayMs: 0 });
    assert.equal(server.comms.size, 1);
  } finally {
    await server.close();
  }
});

Deno.test("a flood of requests from another process still lets timers run (the read loop yields every READ_TURN_MS)", async () => {
  // Another process sends 1,200 notices of ~0.5 ms each, 4 KiB apiece, at once: ~600 ms of
  // handling. Most reads find their bytes in the kernel already and resolve without the
  // event loop going round, so timers run only if the loop yields to them, at least every
  // READ_TURN_MS: a 1 ms interval must tick while the flood is still being handled.
  const handled: number[] = [];
  const server = await testServer((op, args) => {
    if (op !== "burn") return null;
    const t = performance.now();
    while (performance.now() - t < 0.5) { /* a handler's own work */ }
    handled.push(performance.now());
    return (args as { n: number }).n;
  });
  const ticks: number[] = [];
  const interval = setInterval(() => ticks.push(performance.now()), 1);
  // Notices: no reply is written in between, which would let the event loop go round.
  const flood = `
    import { openComm } from ${JSON.stringify(new URL("../protocol/handshake.ts", import.meta.url).href)};
    import { parseAddress } from ${JSON.stringify(new URL("../protocol/address.ts", import.meta.url).href)};
    const comm = await openComm(parseAddress(${JSON.stringify(server.url)}));
    await comm.call("warm");
    const pad = "x".repeat(4096);
    for (let n = 0; n < 1200; n++) comm.notify("burn", { n, pad });
    await comm.call("warm");
    await comm.close();`;
  try {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["eval", "--no-config", flood],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    assert.equal(handled.length, 1200);
    const [first, last] = [handled[0], handled[handled.length - 1]];
    const during = ticks.filter((t) => t > first && t < last).length;
    assert.ok(last - first > 3 * READ_TURN_MS, `the flood took ${(last - first).toFixed(0)} ms`);
    // At least one tick per yield; half as many yields as the flood has turns, for slack.
    const turns = Math.floor((last - first) / READ_TURN_MS);
    assert.ok(
      during >= turns / 2,
      `timers ran ${during} times during ${(last - first).toFixed(0)} ms of requests`,
    );
  } finally {
    clearInterval(interval);
    await server.close();
  }
});

Deno.test("a remote failure rejects with RemoteError carrying name, message and stack", async () => {
  const server = await testServer(() => {
    throw new SyntaxError("bad thing");
  });
  try {
    await using client = rpc(server.url);
    const error = await client.call("anything").catch((e) => e);
    assert.ok(error instanceof RemoteError);
    assert.equal(error.name, "RemoteError");
    assert.equal(error.remoteName, "SyntaxError");
    assert.equal(error.message, "bad thing");
    assert.equal(error.op, "anything");
    assert.match(error.remoteStack, /SyntaxError: bad thing/);
  } finally {
    await server.close();
  }
});

Deno.test("handlers answering at once, with a promise or a thenable, or failing either way, all reply", async () => {
  const server = await testServer((op, args) => {
    const { n } = args as { n: number };
    switch (op) {
      case "now":
        return { n };
      case "later":
        return sleep(n % 3).then(() => ({ n }));
      case "thenable":
        return { then: (resolve: (value: unknown) => void) => resolve({ n }) };
      case "throw":
        throw new RangeError(`sync ${n}`);
      default:
        return Promise.reject(new TypeError(`async ${n}`));
    }
  });
  try {
    await using client = rpc(server.url);
    const ops = ["now", "later", "thenable", "throw", "reject"];
    // 500 calls in one turn: their requests arrive together and are read in one go.
    const replies = await Promise.all(
      Array.from({ length: 500 }, (_, n) =>
        client.call(ops[n % ops.length], { n }).then(
          (value) => value,
          (error: RemoteError) => `${error.remoteName}: ${error.message}`,
        )),
    );
    replies.forEach((reply, n) => {
      const op = ops[n % ops.length];
      if (op === "throw") assert.equal(reply, `RangeError: sync ${n}`);
      else if (op === "reject") assert.equal(reply, `TypeError: async ${n}`);
      else assert.deepEqual(reply, { n }, `${op} ${n}`);
    });
  } finally {
    await server.close();
  }
});

Deno.test("a busy reply rejects the call with BusyError, told by its name on the wire and not its text", async () => {
  const server = await testServer((op) => {
    if (op === "busy") throw new BusyError("Come back later: 3 sends already run");
    throw new RangeError("Busy: but a RangeError");
  });
  try {
    await using client = rpc(server.url);
    const busy = await client.call("busy").catch((e) => e);
    assert.ok(busy instanceof BusyError, `got ${busy}`);
    assert.equal(busy.message, "Come back later: 3 sends already run");
    const remote = busy.cause;
    assert.ok(remote instanceof RemoteError);
    assert.equal(remote.op, "busy");
    assert.match(remote.remoteStack, /BusyError: Come back later/);
    const other = await client.call("other").catch((e) => e);
    assert.ok(other instanceof RemoteError && !(other instanceof BusyError));
    assert.equal(other.remoteName, "RangeError");
  } finally {
    await server.close();
  }
});

Deno.test("a connection already running REQUESTS_IN_FLIGHT_MAX requests answers the next with BusyError", async () => {
  const release = Promise.withResolvers<void>();
  let arrived = 0;
  const server = await testServer(async (op) => {
    if (op === "hang") {
      arrived++;
      await release.promise;
    }
    return op;
  });
  try {
    await using client = rpc(server.url);
    const hanging = Array.from({ length: REQUESTS_IN_FLIGHT_MAX }, () => client.call("hang"));
    await eventually(() => arrived === REQUESTS_IN_FLIGHT_MAX);
    const error = await client.call("ping").catch((e) => e);
    assert.ok(error instanceof BusyError, `got ${error}`);
    assert.match(error.message, /^Busy: 10000 calls already run on this connection$/);
    release.resolve();
    await Promise.all(hanging);
    assert.equal(await client.call("ping"), "ping");
  } finally {
    release.resolve();
    await server.close();
  }
});

Deno.test("a lost connection rejects every pending call at once; the next call reconnects", async () => {
  const never = Promise.withResolvers<void>();
  let arrived = 0;
  const server = await testServer(async (op) => {
    if (op === "hang") {
      arrived++;
      await never.promise;
    }
    return "pong";
  });
  try {
    await using client = rpc(server.url);
    const pending = [client.call("hang"), client.call("hang"), client.call("hang")];
    await eventually(() => arrived === 3);
    for (const comm of server.comms) comm.close();
    const results = await Promise.allSettled(pending);
    for (const r of results) {
      assert.equal(r.status, "rejected");
      assert.ok((r as PromiseRejectedResult).reason instanceof ConnectionClosedError);
    }
    assert.equal(await client.call("ping"), "pong");
  } finally {
    never.resolve();
    await server.close();
  }
});

Deno.test("timeouts and abort signals reject the call; the connection stays usable", async () => {
  const release = Promise.withResolvers<void>();
  const server = await testServer(async (op) => {
    if (op === "slow") await release.promise;
    return op;
  });
  try {
    await using client = rpc(server.url);
    await assert.rejects(client.call("slow", {}, { timeoutMs: 30 }), TimeoutError);
    const controller = new AbortController();
    const aborted = client.call("slow", {}, { signal: controller.signal });
    controller.abort(new Error("changed my mind"));
    await assert.rejects(aborted, /changed my mind/);
    const already = AbortSignal.abort(new Error("before"));
    await assert.rejects(client.call("fast", {}, { signal: already }), /before/);
    assert.equal(await client.call("fast"), "fast");
  } finally {
    release.resolve();
    await server.close();
  }
});

Deno.test("connecting to nothing says where and why", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  await using client = rpc({ host: "127.0.0.1", port });
  const error = await client.call("ping").catch((e) => e);
  assert.ok(error instanceof ConnectionClosedError);
  assert.equal(error.message, `Cannot connect to tcp://127.0.0.1:${port}: connection refused`);
});

Deno.test("bad addresses are refused with a clear error", () => {
  assert.throws(() => rpc("http://127.0.0.1:8786"), /expected host:port, tcp:\/\/host:port/);
  assert.throws(() => rpc("tcp://host:99999"), /expected a port from 0 to 65535/);
  assert.throws(() => rpc({ host: "", port: 1 }), /host must be a non-empty string/);
  assert.throws(() => rpc(42 as never), TypeError);
  assert.equal(rpc("tcp://[::1]:8786").address, "tcp://[::1]:8786");
  // host:port, as Dask takes it: TCP.
  assert.equal(rpc("127.0.0.1:8786").address, "tcp://127.0.0.1:8786");
  assert.equal(rpc("[::1]:8786").address, "tcp://[::1]:8786");
});

Deno.test("an rpc is not a thenable, closes with await using, and refuses calls once closed", async () => {
  await using cluster = await startCluster(1);
  const client = rpc<WorkerOps>(cluster.workers[0].address);
  assert.equal(await client, client);
  assert.equal(await client.ping(), "pong");
  const identity = await client.identity();
  assert.equal(identity.type, "worker");
  assert.equal(identity.name, "alice");
  assert.equal(identity.address, cluster.workers[0].address);
  assert.equal(identity.scheduler, cluster.scheduler.address);
  assert.equal(identity.nthreads, 1);
  await client.close();
  await assert.rejects(client.ping(), ConnectionClosedError);
});

Deno.test("typed arrays of every kind, bigints and large buffers cross the wire intact", async () => {
  await using cluster = await startCluster(1);
  await using alice = rpc<WorkerOps>(cluster.workers[0].address);
  const big = new Float64Array(4 * 1024 * 1024).map((_, i) => i * 0.5); // 32 MiB, out of band
  const data: Record<string, unknown> = {
    u8: new Uint8Array([1, 2, 255]),
    i8: new Int8Array([-128, 127]),
    c8: new Uint8ClampedArray([0, 255]),
    i16: new Int16Array([-32768, 32767]),
    u16: new Uint16Array([65535]),
    i32: new Int32Array([-(2 ** 31)]),
    u32: new Uint32Array([2 ** 32 - 1]),
    f32: new Float32Array([1.5, -0.25]),
    f64: new Float64Array([Math.PI, -0]),
    b64: new BigInt64Array([-(2n ** 63n)]),
    bu64: new BigUint64Array([2n ** 64n - 1n]),
    big,
    n: 2n ** 100n,
    nested: { list: [1, "two", null, true, new Float32Array([3])], when: new Date(0) },
  };
  const reply = await alice.update_data({ data });
  assert.equal(reply.nbytes.big, big.byteLength);
  const back = await alice.get_data({ keys: Object.keys(data) });
  for (const [key, value] of Object.entries(data)) {
    if (ArrayBuffer.isView(value)) assert.equal(back[key]!.constructor, value.constructor, key);
    assert.deepEqual(back[key], value, key);
  }
});

Deno.test("values that cannot travel are refused at the sender, naming the key and path", async () => {
  await using cluster = await startCluster(1);
  await using alice = rpc<WorkerOps>(cluster.workers[0].address);
  await assert.rejects(
    alice.update_data({ data: { x: { deep: [1, () => 2] } } }),
    (e: Error) => e instanceof TypeError && /args\.data\.x\.deep\[1\]: a function/.test(e.message),
  );
  await assert.rejects(
    alice.update_data({ data: { y: Symbol("s") } }),
    /args\.data\.y: a symbol cannot travel/,
  );
  class Point {
    x = 1;
  }
  await assert.rejects(alice.update_data({ data: { p: new Point() } }), /args\.data\.p: a Point instance/);
  assert.deepEqual(await alice.keys(), []);
});

/**
 * Two Comms joined by an in-memory pipe that logs, per end, when a read starts and when a
 * write is made: the order of the two is the behaviour under test.
 */
class LoggingPipeEnd {
  readonly remoteAddress = "memory";
  readonly local = { host: "memory", port: 0 };
  peer!: LoggingPipeEnd;
  #bytes: Uint8Array[] = [];
  #waiting: { p: Uint8Array; resolve: (n: number | null) => void } | null = null;
  #closed = false;

  constructor(readonly name: string, readonly log: string[]) {}

  read(p: Uint8Array): Promise<number | null> {
    this.log.push(`${this.name} read`);
    if (this.#bytes.length > 0) return Promise.resolve(this.#take(p));
    if (this.#closed) return Promise.resolve(null);
    return new Promise((resolve) => this.#waiting = { p, resolve });
  }

  write(p: Uint8Array): Promise<number> {
    this.log.push(`${this.name} write`);
    this.peer.#deliver(p.slice());
    return Promise.resolve(p.byteLength);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#waiting?.resolve(null);
    this.#waiting = null;
    this.peer.close();
  }

  setRef(): void {}

  #deliver(bytes: Uint8Array): void {
    this.#bytes.push(bytes);
    const waiting = this.#waiting;
    if (waiting === null) return;
    this.#waiting = null;
    waiting.resolve(this.#take(waiting.p));
  }

  #take(p: Uint8Array): number {
    const first = this.#bytes[0];
    const n = Math.min(first.byteLength, p.byteLength);
    p.set(first.subarray(0, n));
    if (n === first.byteLength) this.#bytes.shift();
    else this.#bytes[0] = first.subarray(n);
    return n;
  }
}

Deno.test("a message queued while a read loop handles one leaves before its next read starts, at both ends", async () => {
  const log: string[] = [];
  const c = new LoggingPipeEnd("client", log);
  const s = new LoggingPipeEnd("server", log);
  c.peer = s;
  s.peer = c;
  const server = new Comm(s, { dispatch: () => "pong" });
  const client = new Comm(c, { keepsAlive: "busy" });
  try {
    // A caller that calls in turn, as most do: each reply's continuation makes the next call.
    for (let i = 0; i < 3; i++) assert.equal(await client.call("ping"), "pong");
    await client.flushed();
    const serverEnd = log.filter((e) => e.startsWith("server"));
    const clientEnd = log.filter((e) => e.startsWith("client"));
    // The server answers each request before it starts the read for the next one.
    assert.deepEqual(serverEnd, [
      "server read",
      "server write",
      "server read",
      "server write",
      "server read",
      "server write",
      "server read",
    ]);
    // The client's next request leaves before the read for its reply starts.
    assert.deepEqual(clientEnd, [
      "client write",
      "client read",
      "client write",
      "client read",
      "client write",
      "client read",
    ]);
  } finally {
    await client.close();
    await server.close();
  }
});
