/**
 * Every future settles and no key outlives what wants it, on real nodes over loopback
 * TCP: task errors whatever was thrown, messages the scheduler cannot pass on, worker
 * reports it cannot read, and writes that fail halfway. (Restarts, hung workers and
 * killed ones, with real processes, are in faults_test.ts.)
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, rpc, type SchedulerOps, type WorkerOps } from "../mod.ts";
import { startScheduler, startWorker } from "../node.ts";
import { Encoder } from "../protocol/codec.ts";
import type { Comm } from "../protocol/comm.ts";
import { frameHeader } from "../protocol/framing.ts";
import { openComm } from "../protocol/handshake.ts";
import { parseAddress } from "../protocol/address.ts";
import { eventually, startCluster, testLogger } from "./_helpers.ts";

/** How long a test waits for a future that must settle. */
const SETTLE_TIMEOUT_MS = 10_000;

/** `promise`, or a failure naming `what` after `ms`. */
async function within<T>(ms: number, promise: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The bytes of `message` as another implementation may send them, with every Date in it
 * (written as `new Date(1500)`) turned into a timestamp whose seconds (2^63 - 1) are past
 * the range of a JavaScript Date: our own encoder refuses to write one.
 */
function withDatesOutOfRange(message: Record<string, unknown>): Uint8Array {
  const head = new Encoder().encode(message, "message").head.slice();
  const stamp = [0xc7, 0x0c, 0xff, 0x1d, 0xcd, 0x65, 0x00, 0, 0, 0, 0, 0, 0, 0, 0x01];
  let found = 0;
  for (let i = 0; i + stamp.length <= head.length; i++) {
    if (!stamp.every((b, j) => head[i + j] === b)) continue;
    head.set([0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], i + 3);
    found++;
  }
  assert.ok(found > 0, "no Date(1500) in the message");
  const header = frameHeader([head]);
  const out = new Uint8Array(header.length + head.length);
  out.set(header);
  out.set(head, header.length);
  return out;
}

async function writeAll(comm: Comm, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.length;) done += await comm.conn.write(bytes.subarray(done));
}

Deno.test("a task that throws an Error whose name is a number fails its future with a clear error", async () => {
  await using cluster = await startCluster(1);
  await using client = await Client.connect(cluster.scheduler.address, { reconnectTimeoutMs: 0 });
  const odd = client.submit(() => {
    const error = new Error("the name is a number");
    (error as unknown as { name: number }).name = 5;
    throw error;
  });
  const error = await within(SETTLE_TIMEOUT_MS, odd.result().then(() => null, (e) => e), "the future");
  assert.ok(error instanceof Error, `resolved: ${error}`);
  assert.equal(error.name, "5");
  assert.equal(error.message, "the name is a number");
  // Anything thrown gets strings: a Proxy that throws on every read, a null-prototype object.
  const proxy = client.submit(() => {
    throw new Proxy({}, {
      get() {
        throw new Error("no reading me");
      },
      getPrototypeOf() {
        throw new Error("no reading me");
      },
    });
  });
  const bare = client.submit(() => {
    throw Object.create(null);
  });
  for (const f of [proxy, bare]) {
    const e = await within(SETTLE_TIMEOUT_MS, f.result().then(() => null, (e) => e), f.key);
    assert.ok(e instanceof Error, `${f.key} resolved: ${e}`);
    assert.equal(typeof e.message, "string");
  }
  assert.equal(await client.submit((x: number) => x + 1, 1).result(), 2);
});

Deno.test("a worker's task report that fails its checks fails the task, with the reason, instead of being dropped", async () => {
  // A worker of another implementation (or an older one) reports an error whose name is
  // not a string: the scheduler cannot take the report, and says so to the client.
  await using scheduler = await startScheduler({ port: 0, log: testLogger("scheduler") });
  const address = "tcp://127.0.0.1:9";
  let worker: Comm | null = null;
  worker = await openComm(parseAddress(scheduler.address), {
    dispatch: (op, args) => {
      const key = (args as { key: string }).key;
      if (op === "compute_task") worker!.notify("task_erred", { key, error: { name: 5, message: "bad" } });
      return { status: "OK" };
    },
  });
  try {
    await worker.call("register", { address, nthreads: 1 });
    await using client = await Client.connect(scheduler.address, { reconnectTimeoutMs: 0 });
    const x = client.submit((a: number) => a, 1);
    const error = await within(SETTLE_TIMEOUT_MS, x.result().then(() => null, (e) => e), "the future");
    assert.ok(error instanceof Error, `resolved: ${error}`);
    assert.equal(error.name, "ProtocolError");
    assert.match(
      error.message,
      /task_erred report cannot be accepted: .*args\.error\.name: expected a string/,
    );
  } finally {
    await worker.close();
  }
});

Deno.test("a raw client's graph holding a date out of a Date's range fails its task; nothing stays processing", async () => {
  // Decoded, the timestamp is an invalid Date, which cannot be encoded again: the
  // scheduler could never send the task to a worker.
  await using cluster = await startCluster(1);
  const erred: { key: string; error: { name: string; message: string } }[] = [];
  const done: string[] = [];
  const raw = await openComm(parseAddress(cluster.scheduler.address), {
    dispatch: (op, args) => {
      if (op === "key_erred") erred.push(args as (typeof erred)[number]);
      if (op === "key_done") done.push((args as { key: string }).key);
    },
  });
  try {
    await raw.call("register_client", { id: "raw-client" });
    await writeAll(
      raw,
      withDatesOutOfRange({
        op: "update_graph",
        id: 1_000,
        args: {
          functions: [{ source: "(d) => d" }],
          // The same function twice in one batch: the first message, which carried the
          // function, never reached the worker; the second must carry it too.
          tasks: [
            { key: "when-1", fn: 0, args: [new Date(1500)], deps: [] },
            { key: "when-2", fn: 0, args: [2], deps: [] },
          ],
          wanted: ["when-1", "when-2"],
        },
      }),
    );
    await within(
      SETTLE_TIMEOUT_MS,
      eventually(() => erred.length + done.length === 2, SETTLE_TIMEOUT_MS),
      "key_erred and key_done",
    );
    assert.deepEqual(done, ["when-2"], JSON.stringify(erred));
    assert.equal(erred[0].key, "when-1");
    assert.match(erred[0].error.message, /Task when-1 cannot be sent to a worker: .*invalid Date/);
    await using center = rpc<SchedulerOps>(cluster.scheduler.address);
    assert.deepEqual(await center.progress(), { when: { erred: 1, memory: 1 } });
    // The worker is still in step with the scheduler's function ids.
    await using client = await Client.connect(cluster.scheduler.address, { reconnectTimeoutMs: 0 });
    assert.equal(await client.submit((d: number) => d, 7).result(), 7);
  } finally {
    await raw.close();
  }
});

Deno.test("update_data with a value that cannot be kept stores none of its values", async () => {
  await using cluster = await startCluster(1);
  const worker = cluster.workers[0];
  const raw = await openComm(parseAddress(worker.address));
  try {
    await writeAll(
      raw,
      withDatesOutOfRange({
        op: "update_data",
        id: 1_000,
        args: { data: { "first-1": 1, "second-1": new Date(1500), "third-1": 3 } },
      }),
    );
    // Requests on one connection are taken in order: this one sees what the other left.
    assert.deepEqual(await raw.call("keys"), []);
    await using center = rpc<SchedulerOps>(cluster.scheduler.address);
    assert.deepEqual(await center.who_has({}), {});
  } finally {
    await raw.close();
  }
});

Deno.test("a scatter that one worker refuses takes back the values the others took", async () => {
  // bob accepts messages of 64 KiB at most: the client cannot send him his share.
  await using scheduler = await startScheduler({ port: 0, log: testLogger("scheduler") });
  await using alice = await startWorker({
    scheduler: scheduler.address,
    name: "alice",
    log: testLogger("alice"),
  });
  await using bob = await startWorker({
    scheduler: scheduler.address,
    name: "bob",
    frameBytesMax: 64 * 1024,
    log: testLogger("bob"),
  });
  await using client = await Client.connect(scheduler.address, { reconnectTimeoutMs: 0 });
  await assert.rejects(
    client.scatter({ "big-1": new Float64Array(100_000) }, { broadcast: true }),
    /over the limit/,
  );
  for (const w of [alice, bob]) {
    await using r = rpc<WorkerOps>(w.address);
    assert.deepEqual(await r.keys(), [], `${w.identity.name} kept part of the failed scatter`);
  }
});

Deno.test("a task whose error is too large to report still fails its future, and the worker goes on", async () => {
  // The scheduler takes messages of 256 KiB at most; the task's error message is 1 MB.
  await using cluster = await startCluster(1, { frameBytesMax: 256 * 1024 });
  await using client = await Client.connect(cluster.scheduler.address, { reconnectTimeoutMs: 0 });
  const huge = client.submit(() => {
    throw new RangeError("x".repeat(1_000_000));
  });
  const error = await within(SETTLE_TIMEOUT_MS, huge.result().then(() => null, (e) => e), "the future");
  assert.ok(error instanceof RangeError, `got ${error}`);
  assert.ok(error.message.length < 100_000, `${error.message.length} characters`);
  assert.match(error.message, /^x+… \(\d+ more characters\)$/);
  assert.equal(await client.submit((x: number) => x + 1, 1).result(), 2);
});

Deno.test("a scatter the scheduler cannot record takes back the values the workers took", async () => {
  // The scheduler takes messages of 64 KiB at most: the scatter op naming 2,000 keys is larger.
  await using scheduler = await startScheduler({
    port: 0,
    frameBytesMax: 64 * 1024,
    log: testLogger("scheduler"),
  });
  await using alice = await startWorker({
    scheduler: scheduler.address,
    name: "alice",
    log: testLogger("alice"),
  });
  await using client = await Client.connect(scheduler.address, { reconnectTimeoutMs: 0 });
  const values = Object.fromEntries(
    Array.from({ length: 2_000 }, (_, i) => [`value-${"k".repeat(40)}-${i}`, i]),
  );
  await assert.rejects(client.scatter(values), /over the limit/);
  await using r = rpc<WorkerOps>(alice.address);
  assert.deepEqual(await r.keys(), []);
});

Deno.test("a client keeps the lineage of a pending future only until it is done", async () => {
  // After a restart the client sends its held tasks and the lineage they still need: once
  // the held future has finished, that lineage is gone from the client.
  const first = await startScheduler({ port: 0, log: testLogger("scheduler") });
  const port = Number(first.address.split(":").pop());
  await using alice = await startWorker({
    scheduler: first.address,
    name: "alice",
    log: testLogger("alice"),
  });
  await using client = await Client.connect(first.address);
  const parts = client.map((x: number) => x + 1, [1, 2, 3]);
  const sum = (...xs: number[]) => xs.reduce((a, b) => a + b, 0);
  const mid = client.submit(sum, ...parts);
  const total = client.submit((m: number) => m * 10, mid);
  for (const f of [...parts, mid]) f.release();
  assert.equal(await total.result(), 90);
  await first.close();
  await using second = await startScheduler({ port, log: testLogger("scheduler") });
  await using center = rpc<SchedulerOps>(second.address);
  const prefix = total.key.slice(0, total.key.lastIndexOf("-"));
  // The client is back once a new task runs: what it sent on reconnecting came first.
  const probe = (x: number) => x;
  assert.equal(await within(SETTLE_TIMEOUT_MS, client.submit(probe, 5).result(), "the probe"), 5);
  await eventually(async () => (await center.progress())[prefix]?.memory === 1, SETTLE_TIMEOUT_MS);
  // The parts (same prefix as total) were lineage only: sent again, they would be there.
  assert.deepEqual((await center.progress())[prefix], { memory: 1 });
  assert.deepEqual((await center.who_has({ keys: [total.key] }))[total.key], [alice.address]);
  assert.equal(await total.result(), 90);
});
