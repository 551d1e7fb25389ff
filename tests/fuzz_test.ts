/**
 * The protocol fuzzer (testing/fuzz.ts) in the test suite: a short seeded run against
 * in-process nodes for a few fixed seeds and one random seed, and the inputs it found
 * that break a node, each kept as a test of its own until it is fixed.
 *
 * A failing seed replays against real processes with `deno task fuzz --seed N`, and one
 * input of it with `--only I` (`--show I` prints what it sends). The targets are given
 * in the CLI's order (the scheduler, then two workers) so a seed makes the same inputs
 * here and there.
 *
 * @module
 */

import assert from "node:assert/strict";
import { isDeepStrictEqual } from "node:util";
import { Client, RemoteError, rpc } from "../mod.ts";
import { startScheduler, startWorker } from "../node.ts";
import {
  connectionCategory,
  formatFailures,
  fuzz,
  fuzzInput,
  type FuzzReport,
  type FuzzTarget,
} from "../testing/fuzz.ts";
import { parseAddress } from "../protocol/address.ts";
import { openComm } from "../protocol/handshake.ts";
import { schedulerOps, workerOps } from "../protocol/ops.ts";
import { type Cluster, startCluster, testLogger } from "./_helpers.ts";

/** Inputs per seed: four seeds make about 4,000 inputs, some 10 s. */
const INPUTS = 1_000;
const FIXED_SEEDS = [1, 2, 3];
/** Growth of this process's V8 heap (the nodes run in it) that counts as a leak. */
const HEAP_GROWTH_MAX_BYTES = 200 * 1024 * 1024;
/** Keys under the fuzzer's canary prefix: the fuzzer never writes them, nor deletes them when it cleans up. */
const OWN_CANARY = "fuzz-canary-test";

function targetsOf(cluster: Cluster): FuzzTarget[] {
  return [
    { address: cluster.scheduler.address, kind: "scheduler" },
    ...cluster.workers.map((w) => ({ address: w.address, kind: "worker" as const })),
  ];
}

function ownCanary(): Record<string, unknown> {
  return {
    [`${OWN_CANARY}-f64`]: Float64Array.from({ length: 3000 }, (_, i) => i / 3),
    [`${OWN_CANARY}-obj`]: {
      a: [1, "b", { c: 2n ** 64n }],
      d: new Uint8Array([9, 8, 7]),
      e: new Map([[1, "x"]]),
    },
  };
}

/** A normal compute on a worker, and a submit through the scheduler that runs on each worker. */
async function roundTrips(cluster: Cluster, n: number): Promise<void> {
  for (const w of cluster.workers) {
    await using node = rpc(w.address, { timeoutMs: 10_000 });
    assert.equal(await node.call("ping"), "pong");
    await node.call("compute", { key: `after-${n}`, function: { source: "(a, b) => a * b" }, args: [n, 3] });
    assert.deepEqual(await node.call("get_data", { keys: [`after-${n}`] }), { [`after-${n}`]: 3 * n });
  }
  await using center = rpc(cluster.scheduler.address, { timeoutMs: 10_000 });
  assert.equal(await center.call("ping"), "pong");
  const client = await Client.connect(cluster.scheduler.address, { reconnectTimeoutMs: 0 });
  try {
    const x = client.submit((a: number) => a + 1, n);
    const y = client.submit((a: number, b: number) => [a, b], x, n);
    assert.deepEqual(await y.result(), [n + 1, n]);
  } finally {
    await client.close();
  }
}

async function fuzzSeed(seed: number): Promise<void> {
  await using cluster = await startCluster(2);
  for (const w of cluster.workers) {
    await using node = rpc(w.address);
    await node.call("update_data", { data: ownCanary() });
  }
  const heapStart = Deno.memoryUsage().heapUsed;
  const report: FuzzReport = await fuzz({
    seed,
    inputs: INPUTS,
    targets: targetsOf(cluster),
    checkEvery: 500,
    replyTimeoutMs: 5_000,
    memoryGrowthMaxBytes: HEAP_GROWTH_MAX_BYTES,
  });
  const replay = `replay: deno task fuzz --seed ${seed} --inputs ${INPUTS}`;
  assert.equal(
    report.failures.length,
    0,
    `seed ${seed}: ${report.failures.length} failures (${replay})\n${formatFailures(report)}`,
  );
  assert.equal(report.inputs + report.skipped, INPUTS, `seed ${seed}: not every input was tried`);
  assert.ok(report.checks >= 3, `seed ${seed}: ${report.checks} checks`);
  for (const kind of ["raw", "envelope", "mutation"] as const) {
    assert.ok(
      report.byCategory[kind] > INPUTS / 10,
      `seed ${seed}: ${report.byCategory[kind]} ${kind} inputs`,
    );
  }
  for (const w of cluster.workers) {
    await using node = rpc(w.address);
    const expected = ownCanary();
    const got = await node.call("get_data", { keys: Object.keys(expected) });
    assert.ok(isDeepStrictEqual(got, expected), `seed ${seed}: the test's canary on ${w.address} changed`);
  }
  await roundTrips(cluster, seed);
  const growth = Deno.memoryUsage().heapUsed - heapStart;
  assert.ok(
    growth < HEAP_GROWTH_MAX_BYTES,
    `seed ${seed}: the heap grew by ${(growth / 2 ** 20).toFixed(1)} MiB over ${INPUTS} inputs`,
  );
}

for (const seed of FIXED_SEEDS) {
  Deno.test(`fuzz: seed ${seed} leaves both node kinds serving, with their data, in bounded memory`, () =>
    fuzzSeed(seed));
}

const randomSeed = crypto.getRandomValues(new Uint32Array(1))[0];
Deno.test(`fuzz: random seed ${randomSeed} leaves both node kinds serving, with their data, in bounded memory`, () =>
  fuzzSeed(randomSeed));

Deno.test("fuzz: a seed makes the same inputs every time, and they reach every op of both node kinds", () => {
  const targets: FuzzTarget[] = [
    { address: "tcp://127.0.0.1:1", kind: "scheduler" },
    { address: "tcp://127.0.0.1:2", kind: "worker" },
    { address: "tcp://127.0.0.1:3", kind: "worker" },
  ];
  const ops = new Set<string>();
  const categories = new Set<string>();
  for (let i = 0; i < 3_000; i++) {
    const a = fuzzInput(7, i, targets);
    const b = fuzzInput(7, i, targets);
    assert.deepEqual(a?.bytes, b?.bytes, `input #${i} of seed 7 differs between two makings`);
    if (a === null) continue;
    categories.add(a.category);
    if (a.op) ops.add(`${a.target.kind}.${a.op}`);
  }
  assert.notDeepEqual(fuzzInput(7, 0, targets)?.bytes, fuzzInput(8, 0, targets)?.bytes);
  assert.deepEqual([...categories].sort(), ["envelope", "mutation", "raw"]);
  const expected = [
    ...Object.keys(workerOps).map((op) => `worker.${op}`),
    ...Object.keys(schedulerOps).map((op) => `scheduler.${op}`),
  ].filter((op) => !op.endsWith(".terminate"));
  assert.deepEqual(expected.filter((op) => !ops.has(op)), [], "ops no input was made for");
});

/** Whether `v` holds a string (as a value or a field name) with a lone surrogate. */
function hasLoneSurrogate(v: unknown, depth = 0): boolean {
  if (typeof v === "string") return !v.isWellFormed();
  if (typeof v !== "object" || v === null || depth > 300 || ArrayBuffer.isView(v)) return false;
  const entries = v instanceof Map
    ? [...v].flat()
    : Array.isArray(v) || v instanceof Set
    ? [...v]
    : Object.entries(v).flat();
  return entries.some((item) => hasLoneSurrogate(item, depth + 1));
}

Deno.test("fuzz: inputs include bigints past the cap, keys and values with lone surrogates, and inherited field names", () => {
  const targets: FuzzTarget[] = [
    { address: "tcp://127.0.0.1:1", kind: "scheduler" },
    { address: "tcp://127.0.0.1:2", kind: "worker" },
    { address: "tcp://127.0.0.1:3", kind: "worker" },
  ];
  // An ext32 bigint header one byte past BIGINT_BYTES_MAX: c9, length 65538, type 1.
  const pastCap = Uint8Array.of(0xc9, 0x00, 0x01, 0x00, 0x02, 0x01);
  const found = { pastCap: 0, lone: 0, inherited: 0 };
  for (let i = 0; i < 6_000; i++) {
    const input = fuzzInput(7, i, targets);
    if (input === null) continue;
    const at = input.bytes.indexOf(0xc9);
    if (at >= 0 && pastCap.every((b, j) => input.bytes[at + j] === b)) {
      found.pastCap++;
      assert.equal(input.end, "close", `input #${i}: a bigint past the cap closes the connection`);
    }
    if (input.messages.some((m) => hasLoneSurrogate(m))) found.lone++;
    if (/envelope inherited/.test(input.how)) found.inherited++;
  }
  assert.ok(found.pastCap > 0 && found.lone > 0 && found.inherited > 0, JSON.stringify(found));
});

// ---- what the fuzzer found: each fails until the bug is fixed ----

const mul = (a: number, b: number) => a * b;

Deno.test("fuzz finding (seed 1, input #566): a compute_task from another connection cannot change what the scheduler's tasks run", async () => {
  // The scheduler numbers functions and sends each worker a function's source once; the
  // worker keeps it by number. Any connection may send compute_task, and its function
  // replaces the one the scheduler's later tasks run by that number.
  await using cluster = await startCluster(1);
  const client = await Client.connect(cluster.scheduler.address, { reconnectTimeoutMs: 0 });
  try {
    assert.equal(await client.submit(mul, 6, 7).result(), 42);
    await using stranger = rpc(cluster.workers[0].address, { timeoutMs: 5_000 });
    // Refused: compute_task is the scheduler's op, on the worker's registration connection.
    await assert.rejects(
      stranger.call("compute_task", {
        key: "fz-zngxpm",
        fn_id: 1,
        function: { source: "async (x) => x" },
        args: [],
        who_has: {},
      }),
      /compute_task is for the scheduler only/,
    );
    assert.equal(
      await client.submit(mul, 6, 8).result(),
      48,
      "the scheduler's task ran the stranger's function",
    );
  } finally {
    await client.close();
  }
});

Deno.test("fuzz finding (seed 12, input #22721): a compute whose function closes its executor gets a reply, and the worker computes on", async () => {
  // The source "close" is the executor's global close(): the executor goes away without
  // a word, and its jobs (this one, and any later one handed to it) never finish.
  await using cluster = await startCluster(1);
  await using worker = rpc(cluster.workers[0].address, { timeoutMs: 5_000 });
  const closing = await worker.call("compute", { key: "x", function: { source: "close" }, args: [] })
    .then(() => "ok", (error) => error);
  assert.ok(closing === "ok" || closing instanceof RemoteError, `no reply: ${closing}`);
  assert.deepEqual(await worker.call("compute", { key: "y", function: { source: "() => 2" } }), {
    status: "OK",
    key: "y",
    nbytes: 1,
  });
});

Deno.test("fuzz finding (seeds 21 #23108, 32 #4861, 31 #29460): optional fields sent as nil count as absent", async () => {
  // PROTOCOL.md: "Optional fields may be absent or nil". The checks accept nil, but the
  // handlers then meet null where they expect undefined, and fail with the engine's TypeError.
  await using cluster = await startCluster(1);
  const address = cluster.workers[0].address;
  await using worker = rpc(address, { timeoutMs: 5_000 });
  await using center = rpc(cluster.scheduler.address, { timeoutMs: 5_000 });
  const calls: [string, () => Promise<unknown>][] = [
    [
      "compute args: nil",
      () => worker.call("compute", { key: "k", function: { source: "() => 1" }, args: null }),
    ],
    [
      "compute keys: nil",
      () => worker.call("compute", { key: "k", function: { source: "() => 1" }, keys: null }),
    ],
    ["who_has keys: nil", () => center.call("who_has", { keys: null })],
    ["add_keys nbytes: nil", () => center.call("add_keys", { address, keys: ["k"], nbytes: null })],
  ];
  const failed: string[] = [];
  for (const [what, call] of calls) {
    await call().catch((error) => failed.push(`${what}: ${(error as Error).message}`));
  }
  assert.deepEqual(failed, []);
});

Deno.test("fuzz finding (seed 22, input #25983): a result that cannot be cloned fails its own task only", async () => {
  // A Proxy passes the msgpack check but not the structured clone back from the executor:
  // the executor dies, and every job it held fails with "The executor failed".
  await using cluster = await startCluster(1);
  await using worker = rpc(cluster.workers[0].address, { timeoutMs: 10_000 });
  // The pause is the behaviour under test: jobs that share the executor with the bad one.
  const slow = "async (i) => { await new Promise((r) => setTimeout(r, 20)); return i; }";
  const results = await Promise.all(
    [0, 1, 2, 3, 4].map((i) =>
      worker.call("compute", {
        key: `k${i}`,
        function: { source: i === 1 ? "() => new Proxy({}, {})" : slow },
        args: [i],
      }).then(() => "ok", (error) => (error as Error).message)
    ),
  );
  assert.deepEqual(results.filter((r, i) => i !== 1 && r !== "ok"), [], "other tasks failed with it");
  assert.match(String(results[1]), /^The result of k1 cannot be kept/);
});

Deno.test("fuzz finding (seed 31, input #21014, among other inputs): a worker's malformed reply does not break retire_workers", async () => {
  // The scheduler asks another worker to copy a retiring worker's keys, and reads
  // `reply.missing` from whatever came back: a worker (here a fuzzer's fake one) that
  // answers nil makes the op fail with the engine's TypeError.
  await using cluster = await startCluster(0);
  const center = parseAddress(cluster.scheduler.address);
  const liar = await openComm(center, { dispatch: () => null });
  const leaving = await openComm(center, { dispatch: () => ({ status: "OK" }) });
  try {
    await liar.call("register", { address: "tcp://127.0.0.1:1" });
    await leaving.call("register", { address: "tcp://127.0.0.1:2", keys: ["x"] });
    const error = await leaving.call("retire_workers", { workers: ["tcp://127.0.0.1:2"], close: false })
      .then(() => null, (e) => e as Error);
    assert.ok(
      error === null || !/Cannot read properties/.test(error.message),
      `retire_workers failed: ${error}`,
    );
  } finally {
    await liar.close();
    await leaving.close();
  }
});

Deno.test({
  name: "fuzz finding: computes with ever new function sources do not keep them all",
  ignore: Deno.build.os === "windows",
  async fn() {
    // The executor pool numbers every source it meets (and each executor keeps every
    // source by number) and never forgets one, even sources that do not compile: each
    // distinct source is kept for the life of the worker. Measured in a process of its
    // own, where the heap can be collected before it is read.
    const script = `
      const { rpc } = await import(${JSON.stringify(new URL("../mod.ts", import.meta.url).href)});
      const { startCluster } = await import(${
      JSON.stringify(new URL("./_helpers.ts", import.meta.url).href)
    });
      const cluster = await startCluster(1);
      const worker = rpc(cluster.workers[0].address);
      const heap = () => (globalThis.gc(), globalThis.gc(), Deno.memoryUsage().heapUsed);
      const compute = (source) => worker.call("compute", { key: "k", function: { source } }).catch(() => {});
      for (let i = 0; i < 20; i++) await compute(i + " (");
      const before = heap();
      for (let i = 0; i < 200; i++) await compute((i + " ").padEnd(100000, "x") + " (");
      console.log(heap() - before);
      await worker.close();
      await cluster.close();
    `;
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["eval", "--v8-flags=--expose-gc", "--unstable-worker-options", script],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    const growth = Number(new TextDecoder().decode(out.stdout).trim());
    assert.ok(
      growth < 5 * 1024 * 1024,
      `200 computes with distinct 100 KB sources (none compiles) left ${
        (growth / 2 ** 20).toFixed(1)
      } MiB behind`,
    );
  },
});

Deno.test("fuzz: the checks pass on a cluster no input touched", async () => {
  // Zero inputs, one check: the canaries, the round trips and the cleanup find nothing wrong.
  await using cluster = await startCluster(2);
  const report = await fuzz({ seed: 0, inputs: 0, targets: targetsOf(cluster) });
  assert.deepEqual(report.failures, []);
  assert.equal(report.checks, 1);
  assert.equal(report.inputs, 0);
});

Deno.test("fuzz: under a small frame limit, a check's values that together pass it are gathered and fetched in parts", async () => {
  // Three seeds: each check picks its own sizes and kinds (typed arrays and ArrayBuffers).
  await using cluster = await startCluster(2, { frameBytesMax: 2 * 1024 * 1024 });
  for (const seed of [1, 2, 3]) {
    const report = await fuzz({ seed, inputs: 0, targets: targetsOf(cluster) });
    assert.deepEqual(report.failures, [], `seed ${seed}`);
  }
});

Deno.test("fuzz: huge and slow HTTP bodies and readers that stop reading leave the nodes serving", async () => {
  // A scheduler with a dashboard (the HTTP target) and two workers (stalled readers of a canary).
  const scheduler = await startScheduler({ port: 0, dashboardPort: 0, log: testLogger("scheduler") });
  const workers = await Promise.all(
    ["alice", "bob"].map((name) =>
      startWorker({ scheduler: scheduler.address, name, nthreads: 1, log: testLogger(name) })
    ),
  );
  try {
    const targets: FuzzTarget[] = [
      { address: scheduler.address, kind: "scheduler", httpUrl: scheduler.dashboard! },
      ...workers.map((w) => ({ address: w.address, kind: "worker" as const })),
    ];
    const seed = 11;
    const only: number[] = [];
    const wanted = { http: 8, stall: 4 };
    for (let i = 0; wanted.http > 0 || wanted.stall > 0; i++) {
      const kind = connectionCategory(seed, i, true);
      if (kind !== null && wanted[kind] > 0) {
        wanted[kind]--;
        only.push(i);
      }
    }
    const report = await fuzz({ seed, inputs: 0, only, targets, replyTimeoutMs: 5_000, concurrency: 4 });
    assert.deepEqual(report.failures, [], formatFailures(report));
    assert.equal(report.byCategory.http, 8);
    assert.equal(report.byCategory.stall, 4);
  } finally {
    await Promise.all(workers.map((w) => w.close()));
    await scheduler.close();
  }
});
