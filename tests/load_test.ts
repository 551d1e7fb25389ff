/**
 * The load test, short: 50 clients at once on an in-process cluster for a few seconds,
 * with the same mixed workload as testing/load.ts (rpc put/get/delete of their own keys,
 * submit and map through their own Client), every value checked. Afterwards nothing
 * may be left: no connection to any node beyond the baseline, no key on a worker, no
 * task on the scheduler.
 *
 * Connections are counted with `ss -tanp` (Deno refuses /proc to anything short of
 * --allow-all): the sockets this process holds, and among them the ones accepted on
 * each node's port.
 */

import assert from "node:assert/strict";
import { Client, parseAddress, rpc, type SchedulerOps, type WorkerOps } from "../mod.ts";
import {
  KEY_PREFIX,
  KINDS,
  opsTable,
  runLoad,
  TASK_PREFIXES,
  type TcpSocket,
  tcpSockets,
  warmUp,
} from "../testing/load.ts";
import { spawnNode } from "../client/spawn.ts";
import { eventually, startCluster } from "./_helpers.ts";

const CLIENTS = 50;
const SECONDS = 4;

/** This process's TCP connections: in all, and accepted on each of `ports`. */
async function connections(
  ports: number[],
): Promise<{ total: number; byPort: number[]; sockets: TcpSocket[] }> {
  const mine = (await tcpSockets()).filter((s) => s.pids.includes(Deno.pid));
  return {
    total: mine.length,
    byPort: ports.map((p) => mine.filter((s) => s.localPort === p).length),
    sockets: mine,
  };
}

Deno.test("load: 50 clients of mixed rpc and client work for 4 s; no errors, nothing left behind", async () => {
  await using cluster = await startCluster(2);
  const scheduler = cluster.scheduler.address;
  const workers = cluster.workers.map((w) => w.address);
  const ports = [scheduler, ...workers].map((a) => parseAddress(a).port);

  await warmUp(scheduler, workers);
  // The scheduler holds one connection per worker; a worker one from its peer.
  await eventually(async () => (await connections(ports)).byPort.join() === "2,1,1");
  const before = await connections(ports);

  const seed = 42;
  console.log(`seed ${seed}`);
  const report = await runLoad({ scheduler, workers, clients: CLIENTS, seconds: SECONDS, seed });
  const summary = `${opsTable(report)}\nerrors: ${report.errors}\n${report.errorSamples.join("\n")}`;
  assert.equal(report.errors, 0, summary);
  for (const kind of KINDS) assert.ok(report.ops[kind] > 0, `no ${kind} completed:\n${summary}`);
  // A floor, not a speed target: on a busy 2-core machine 50 clients check far fewer values.
  assert.ok(report.checks > 200, `only ${report.checks} values checked:\n${summary}`);
  assert.ok(report.bigValues > 0, `no 1 MiB value went through:\n${summary}`);

  // Every client closed its Client and its rpcs: the nodes see only the baseline again.
  let after = before;
  try {
    await eventually(async () => {
      after = await connections(ports);
      return after.total === before.total && after.byPort.join() === before.byPort.join();
    }, 5_000);
  } catch {
    const extra = after.sockets.filter((s) =>
      !before.sockets.some((b) => b.localPort === s.localPort && b.peerPort === s.peerPort)
    );
    assert.fail(
      `connections after the load: ${after.total} (by node ${after.byPort}), before: ${before.total} ` +
        `(${before.byPort}); new: ${
          extra.map((s) => `${s.state} :${s.localPort}->:${s.peerPort}`).join(", ")
        }`,
    );
  }

  // No key on a worker (every client deleted its own, released its futures) ...
  await eventually(() => cluster.workers.every((w) => w.data.size === 0)).catch(() => {});
  for (const w of cluster.workers) assert.deepEqual(w.data.keys(), [], `${w.address} still holds keys`);
  // ... and the scheduler forgot them all.
  await using s = rpc<SchedulerOps>(scheduler);
  assert.deepEqual(await s.who_has({}), {});
  const progress = await s.progress();
  const left = Object.keys(progress).filter((p) => p === KEY_PREFIX || TASK_PREFIXES.includes(p));
  assert.deepEqual(left, [], `tasks left on the scheduler: ${JSON.stringify(progress)}`);
  for (const info of await s.workers()) {
    assert.equal(info.nkeys, 0, `${info.address} still counted with keys`);
  }

  // The nodes still serve new clients.
  await using client = await Client.connect(scheduler);
  const f = client.submit((x: number) => x * 2, 21);
  assert.equal(await f.result(), 42);
  f.release();
  for (const w of workers) {
    await using peer = rpc<WorkerOps>(w);
    assert.equal(await peer.ping(), "pong");
  }
});

/** `promise` settled as `{ value }` or `{ error }`, or `{ error: "no answer" }` after `ms`. */
async function settle<T>(promise: Promise<T>, ms: number): Promise<{ value: T } | { error: string }> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<{ error: string }>((resolve) => {
    timer = setTimeout(() => resolve({ error: `no answer within ${ms} ms` }), ms);
  });
  try {
    return await Promise.race([
      promise.then((value) => ({ value }), (e) => ({ error: `${e.name}: ${e.message}` })),
      timeout,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

// Found by this load test's probes. The client sends a turn's update_graph before its
// release_keys: a future released and the same pure key submitted again in one turn
// reaches the scheduler as "want it" then "release it", and the scheduler drops the
// only want of the new future. A finished key is freed under it (result() rejects with
// MissingDataError although status is "finished"); a pending one is released and its
// future never settles. One turn later (after an await) both work.
Deno.test("bug: a pure key released and submitted again in the same turn keeps its result", async () => {
  await using cluster = await startCluster(2);
  await using client = await Client.connect(cluster.scheduler.address);
  const inc = (x: number) => x + 1;

  const first = client.submit(inc, 41);
  assert.equal(await first.result(), 42);
  first.release();
  const again = client.submit(inc, 41); // same key, same turn as the release
  const finished = await settle(again.result(), 3_000);
  const finishedStatus = again.status;
  again.release();

  const pending = client.submit(inc, 99);
  pending.release();
  const pendingAgain = client.submit(inc, 99);
  const stillPending = await settle(pendingAgain.result(), 3_000);
  pendingAgain.release();

  assert.deepEqual(
    { finished, stillPending },
    { finished: { value: 42 }, stillPending: { value: 100 } },
    `the finished key's future says ${finishedStatus}`,
  );
});

// Found by this load test's probes. The scheduler's function table (source -> id, in
// SchedulerTasks), each worker's record of the ids it was sent, and the worker's own
// id -> function map only ever grow: every distinct function source a client submits
// stays in the scheduler's and the workers' memory after every future using it is
// released and the client has gone. Clients that build function sources (or many
// clients with many lambdas) grow the nodes without bound. Here a scheduler with a
// 32 MB heap must carry 4,000 distinct 16 KiB functions (64 MB of source, submitted
// and released 500 at a time); a scheduler that forgets unused functions survives
// it (as it survives the same bytes sent as task arguments), one that keeps them dies
// of heap exhaustion after about 2,000.
Deno.test("bug: distinct functions do not stay in the scheduler's memory after release", async () => {
  const scheduler = await spawnNode(["scheduler", "--port", "0", "--log-level", "warn"], {
    env: { DENO_V8_FLAGS: "--max-old-space-size=32" },
  });
  const worker = await spawnNode(["worker", scheduler.address, "--nthreads", "1", "--log-level", "warn"]);
  const padding = `/*${"x".repeat(16 * 1024)}*/`;
  let released = 0;
  let failure = "";
  try {
    for (let round = 0; round < 8 && !failure; round++) {
      try {
        await using client = await Client.connect(scheduler.address);
        const futures = Array.from(
          { length: 500 },
          (_, i) => client.submit({ source: `(x) => x + ${round * 500 + i} ${padding}` }, 1),
        );
        await client.gather(futures);
        for (const f of futures) f.release();
        released += futures.length;
      } catch (error) {
        failure = `${(error as Error).name}: ${(error as Error).message}`;
      }
    }
  } finally {
    await worker.stop();
    const status = await scheduler.stop();
    assert.equal(
      failure,
      "",
      `the scheduler (32 MB heap) failed after ${released} distinct functions, all released: ${failure}; ` +
        `it exited with ${status.signal ?? status.code}: ${
          scheduler.log.find((l) => /heap|memory/i.test(l)) ?? ""
        }`,
    );
  }
});
