import assert from "node:assert/strict";
import { Client, NoWorkersError, rpc, type SchedulerOps, taskOptions, type WorkerOps } from "../mod.ts";
import { startScheduler, startWorker } from "../node.ts";
import { clusterInfo, formatInfo } from "../client/info.ts";
import { type NodeProcess, spawnNode } from "../client/spawn.ts";
import { eventually, metricAt, startCluster, testLogger } from "./_helpers.ts";

const inc = (x: number) => x + 1;
const add = (a: number, b: number) => a + b;

/**
 * Real node processes, stopped at the end whatever happens. Workers run without a nanny:
 * these tests kill and stop the worker process itself (tests/nanny_test.ts has the nanny).
 */
class Nodes implements AsyncDisposable {
  list: NodeProcess[] = [];
  async spawn(...args: string[]): Promise<NodeProcess> {
    const node = await spawnNode([
      ...args,
      ...(args[0] === "worker" ? ["--no-nanny"] : []),
      "--log-level",
      "info",
    ]);
    this.list.push(node);
    return node;
  }
  async [Symbol.asyncDispose]() {
    for (const n of this.list.reverse()) {
      try {
        n.child.kill("SIGCONT");
      } catch { /* exited */ }
      await n.stop();
    }
  }
}

/** `promise`, or a failure after `ms` that shows `context()` (the nodes' last log lines). */
async function within<T>(ms: number, promise: Promise<T>, context: () => string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`No answer within ${ms} ms. Node logs:\n${context()}`)),
          ms,
        );
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

async function whoHas(scheduler: string, keys?: string[]) {
  await using s = rpc<SchedulerOps>(scheduler);
  return await s.who_has(keys ? { keys } : {});
}

Deno.test("a worker killed mid-computation: its tasks run elsewhere, lost keys are recomputed from lineage", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0");
  const alice = await nodes.spawn(
    "worker",
    scheduler.address,
    ...["--name", "alice", "--nthreads", "1", "--http-port", "0"],
  );
  await nodes.spawn("worker", scheduler.address, "--name", "bob", "--nthreads", "1");
  const aliceMetrics = /Metrics at (\S+)/.exec(await alice.waitForLog(/Metrics at \S+/))![1];
  await using center = rpc<SchedulerOps>(scheduler.address);
  await using client = await Client.connect(scheduler.address);
  // Stage 1 lands on both workers; stage 2 is slow, so alice dies while it runs.
  const stage1 = client.map((i: number) => i * 10, Array.from({ length: 20 }, (_, i) => i));
  await client.gather(stage1);
  const slow = (x: number) => {
    const end = Date.now() + 100;
    while (Date.now() < end) { /* work */ }
    return x + 1;
  };
  const stage2 = stage1.map((f) => client.submit(slow, f));
  const total = client.submit((...xs: number[]) => xs.reduce((p, q) => p + q, 0), ...stage2);
  // The kill lands while alice runs stage 2: her executor is in a task, and more of hers
  // wait behind it (tasks take 100 ms, the kill follows the look by far less).
  let running = 0;
  let processing = 0;
  await eventually(async () => {
    const workers = await center.workers();
    running = await metricAt(aliceMetrics, "dist_worker_tasks_running");
    processing = workers.find((w) => w.address === alice.address)?.processing ?? 0;
    return running >= 1 && processing >= 2;
  }, 10_000);
  alice.child.kill("SIGKILL");
  assert.ok(running >= 1 && processing >= 2, `alice ran ${running} task(s) of ${processing} at the kill`);
  assert.equal(await total.result(), 10 * 190 + 20);
  // What alice had not finished ran on bob.
  const held = await whoHas(scheduler.address, [total.key, ...stage2.map((f) => f.key)]);
  for (const key of Object.keys(held)) assert.deepEqual(held[key].includes(alice.address), false, key);
  assert.notDeepEqual(held[total.key], [alice.address]);
});

Deno.test("data that was only scattered and is lost with its worker fails result() clearly, never hangs", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0");
  const alice = await nodes.spawn("worker", scheduler.address, "--name", "alice");
  await nodes.spawn("worker", scheduler.address, "--name", "bob");
  await using client = await Client.connect(scheduler.address);
  const [x] = await client.scatter([new Float64Array([1, 2, 3])], { workers: ["alice"] });
  const y = client.submit((v: Float64Array) => v.length, x);
  assert.equal(await y.result(), 3);
  alice.child.kill("SIGKILL");
  await alice.status;
  const z = client.submit((v: Float64Array) => v[0], x);
  const error = await z.result().catch((e) => e);
  assert.equal(error.name, "MissingDataError");
  assert.match(error.message, /lost/);
  const again: Error = await x.result().then(() => new Error("x resolved"), (e) => e);
  assert.equal(again.name, "MissingDataError", String(again));
  // y was computed and is held elsewhere or recomputable; the cluster goes on.
  assert.equal(await client.submit(inc, 41).result(), 42);
});

Deno.test("a task that kills its worker is retried elsewhere, then fails with KilledWorker; the cluster stays up", async () => {
  const dir = await Deno.makeTempDir();
  try {
    // The flaky task below leaves a mark on disk: executors are fresh after a death.
    await using cluster = await startCluster(2, { taskPermissions: { read: [dir], write: [dir] } });
    await using client = await Client.connect(cluster.scheduler.address);
    const killer = client.submit(() => {
      Deno.exit(1);
    }, taskOptions({ key: "killer-1" }));
    const error = await killer.result().catch((e) => e);
    assert.equal(error.name, "KilledWorker");
    assert.match(error.message, /killer-1/);
    assert.match(error.message, /allowed_failures=3/);
    assert.equal(error.task, "killer-1");
    // A task that exits only the first time succeeds when it runs again.
    const flaky = client.submit((mark: string) => {
      try {
        Deno.statSync(mark);
      } catch {
        Deno.writeTextFileSync(mark, "ran");
        Deno.exit(2);
      }
      return "survived";
    }, `${dir}/mark`);
    assert.equal(await flaky.result(), "survived");
    assert.deepEqual(await client.gather(client.map(inc, [1, 2, 3])), [2, 3, 4]);
    for (const w of cluster.workers) {
      await using r = rpc<WorkerOps>(w.address);
      assert.equal(await r.ping(), "pong");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a hung worker (SIGSTOP) is removed after the TTL; work goes on; once resumed it registers again", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0", "--worker-ttl", "1");
  const workers = [
    await nodes.spawn("worker", scheduler.address, "--name", "alice", "--nthreads", "1"),
    await nodes.spawn("worker", scheduler.address, "--name", "bob", "--nthreads", "1"),
  ];
  await using client = await Client.connect(scheduler.address);
  await using center = rpc<SchedulerOps>(scheduler.address);
  const x = client.submit(inc, 1);
  assert.equal(await x.result(), 2);
  // Freeze the worker that holds x: its connection stays open, only the silence tells.
  const [holder] = (await center.who_has({ keys: [x.key] }))[x.key];
  const hung = workers.find((w) => w.address === holder)!;
  const other = workers.find((w) => w !== hung)!;
  hung.child.kill("SIGSTOP");
  await eventually(async () => Object.keys(await center.ncores()).length === 1, 10_000);
  assert.deepEqual(Object.keys(await center.ncores()), [other.address]);
  // x lived on the hung worker only: it is recomputed on the other one.
  const y = client.submit(add, x, 10);
  assert.equal(await y.result(), 12);
  hung.child.kill("SIGCONT");
  await eventually(async () => Object.keys(await center.ncores()).length === 2, 15_000);
  // It came back with what it held: x has a copy there again.
  const held = await center.who_has({ keys: [x.key] });
  assert.ok(held[x.key].includes(hung.address), JSON.stringify(held));
});

Deno.test("the scheduler restarts: workers re-register with their keys, the client reconnects, work goes on", async () => {
  await using nodes = new Nodes();
  const first = await nodes.spawn("scheduler", "--port", "0");
  const port = first.address.split(":").pop()!;
  const alice = await nodes.spawn("worker", first.address, "--name", "alice", "--death-timeout", "30");
  await using client = await Client.connect(first.address);
  const x = client.submit(inc, 1, taskOptions({ key: "x-before" }));
  assert.equal(await x.result(), 2);
  first.child.kill("SIGKILL");
  await first.status;
  await nodes.spawn("scheduler", "--port", port);
  await alice.waitForLog(/Lost the scheduler/);
  // Submitted while the scheduler was away or coming back: it runs once the client is back.
  const y = client.submit(add, x, 40);
  assert.equal(
    await within(
      20_000,
      y.result(),
      () => nodes.list.map((n) => n.log.slice(-15).join("\n")).join("\n---\n"),
    ),
    42,
  );
  assert.equal(await x.result(), 2);
  assert.deepEqual(await whoHas(first.address, ["x-before"]), { "x-before": [alice.address] });
  assert.deepEqual(await client.gather(client.map(inc, [1, 2])), [2, 3]);
});

Deno.test("retire_workers moves the keys that exist nowhere else, then stops the worker", async () => {
  await using cluster = await startCluster(3);
  const [alice, bob, carol] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  await using center = rpc<SchedulerOps>(cluster.scheduler.address);
  const [only] = await client.scatter([new Float64Array([7, 8])], { workers: ["alice"] });
  const [both] = await client.scatter([9], { workers: ["alice", "bob"], broadcast: true });
  const reply = await center.retire_workers({ workers: [alice.address] });
  assert.deepEqual(reply, { retired: [alice.address], moved: 1 });
  await alice.closed;
  const held = await center.who_has({ keys: [only.key, both.key] });
  assert.equal(held[only.key].length, 1);
  assert.ok([bob.address, carol.address].includes(held[only.key][0]));
  assert.deepEqual(held[both.key], [bob.address]);
  assert.deepEqual(await only.result(), new Float64Array([7, 8]));
});

Deno.test("a stale copy: the worker asks again, reports it missing, and the input is recomputed", async () => {
  await using cluster = await startCluster(2);
  await using client = await Client.connect(cluster.scheduler.address);
  const x = client.submit((n: number) => n * 3, 5, taskOptions({ key: "x-stale" }));
  assert.equal(await x.result(), 15);
  const [holder] = (await whoHas(cluster.scheduler.address, ["x-stale"]))["x-stale"];
  // The holder drops x behind the scheduler's back: who_has is now wrong.
  {
    await using r = rpc<WorkerOps>(holder);
    await r.delete_data({ keys: ["x-stale"], report: false });
  }
  const y = client.submit(add, x, 1);
  assert.equal(await y.result(), 16);
});

Deno.test("a worker that cannot find its scheduler gives up after the death timeout", async () => {
  const scheduler = await startScheduler({ port: 0, log: testLogger("s") });
  const address = scheduler.address;
  await scheduler.close();
  const started = Date.now();
  await assert.rejects(
    startWorker({ scheduler: address, deathTimeoutMs: 300, log: testLogger("w"), nthreads: 1 }),
    /Cannot register with scheduler/,
  );
  assert.ok(Date.now() - started < 5_000);
});

/** The keys a worker holds, asked of the worker itself. */
async function keysOf(worker: string): Promise<string[]> {
  await using r = rpc<WorkerOps>(worker);
  return (await r.keys()).sort();
}

Deno.test("the scheduler restarts while a graph runs whose intermediates were released: the held future completes, unowned keys are freed", async () => {
  await using nodes = new Nodes();
  const grace = ["--unclaimed-grace", "3"];
  const first = await nodes.spawn("scheduler", "--port", "0", ...grace);
  const port = first.address.split(":").pop()!;
  const alice = await nodes.spawn("worker", first.address, "--name", "alice", "--nthreads", "2");
  await using client = await Client.connect(first.address);
  const logs = () => nodes.list.map((n) => n.log.slice(-15).join("\n")).join("\n---\n");
  const parts = client.map(inc, [1, 2, 3, 4]);
  const slowSum = (ms: number, ...xs: number[]) => {
    const end = Date.now() + ms;
    while (Date.now() < end) { /* work */ }
    return xs.reduce((p, q) => p + q, 0);
  };
  const mid = client.submit(slowSum, 1_500, ...parts);
  const total = client.submit(add, mid, 100);
  const stray = client.submit(inc, 1_000);
  assert.equal(await stray.result(), 1_001);
  // Only the final future is held: the parts and the sum live on as its lineage.
  const partKeys = parts.map((p) => p.key);
  for (const f of [...parts, mid]) f.release();
  await eventually(async () =>
    Object.values(await whoHas(first.address, partKeys)).every((h) => h.length > 0)
  );
  first.child.kill("SIGKILL");
  await first.status;
  // Released while the scheduler is away: nobody will claim it when alice brings it back.
  stray.release();
  await nodes.spawn("scheduler", "--port", port, ...grace);
  assert.equal(await within(20_000, total.result(), logs), 2 + 3 + 4 + 5 + 100);
  // Once the grace is over, alice holds what a future holds, and nothing else.
  await within(20_000, eventually(async () => (await keysOf(alice.address)).length === 1, 20_000), logs);
  assert.deepEqual(await keysOf(alice.address), [total.key]);
});

Deno.test("a worker resumed past its TTL comes back with a key released meanwhile: the key is freed", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn(
    "scheduler",
    "--port",
    "0",
    "--worker-ttl",
    "1",
    "--unclaimed-grace",
    "1",
  );
  const workers = [
    await nodes.spawn("worker", scheduler.address, "--name", "alice", "--nthreads", "1"),
    await nodes.spawn("worker", scheduler.address, "--name", "bob", "--nthreads", "1"),
  ];
  await using client = await Client.connect(scheduler.address);
  await using center = rpc<SchedulerOps>(scheduler.address);
  const x = client.submit(inc, 1, taskOptions({ key: "x-ttl" }));
  assert.equal(await x.result(), 2);
  const [holder] = (await center.who_has({ keys: [x.key] }))[x.key];
  const hung = workers.find((w) => w.address === holder)!;
  hung.child.kill("SIGSTOP");
  await eventually(async () => Object.keys(await center.ncores()).length === 1, 10_000);
  x.release();
  await eventually(async () => (await center.who_has({ keys: [x.key] }))[x.key].length === 0, 10_000);
  hung.child.kill("SIGCONT");
  await eventually(async () => Object.keys(await center.ncores()).length === 2, 15_000);
  await eventually(async () => !(await keysOf(hung.address)).includes(x.key), 10_000);
  for (const w of workers) assert.deepEqual(await keysOf(w.address), []);
});

Deno.test("scattered data brought back after a scheduler restart is freed when its future is released", async () => {
  await using nodes = new Nodes();
  const grace = ["--unclaimed-grace", "5"];
  const first = await nodes.spawn("scheduler", "--port", "0", ...grace);
  const port = first.address.split(":").pop()!;
  const alice = await nodes.spawn("worker", first.address, "--name", "alice");
  await using client = await Client.connect(first.address);
  const [data] = await client.scatter([new Float64Array([1, 2, 3])]);
  // alice's own data (update_data that reports) stays until deleted, restart or not.
  {
    await using r = rpc<WorkerOps>(alice.address);
    await r.update_data({ data: { "own-1": 1 } });
  }
  const stray = client.submit(inc, 1_000);
  assert.equal(await stray.result(), 1_001);
  first.child.kill("SIGKILL");
  await first.status;
  stray.release();
  await nodes.spawn("scheduler", "--port", port, ...grace);
  const logs = () => nodes.list.map((n) => n.log.slice(-15).join("\n")).join("\n---\n");
  assert.deepEqual(await within(20_000, data.result(), logs), new Float64Array([1, 2, 3]));
  await within(
    20_000,
    eventually(async () => (await whoHas(first.address, [data.key]))[data.key].length === 1, 20_000),
    logs,
  );
  data.release();
  // The stray key goes once the grace is over; the released scattered key at once.
  await eventually(async () => (await keysOf(alice.address)).length === 1, 15_000);
  assert.deepEqual(await keysOf(alice.address), ["own-1"]);
  assert.deepEqual((await whoHas(first.address, ["own-1"]))["own-1"], [alice.address]);
});

Deno.test("a task whose only worker was killed fails with NoWorkersError after the no-workers timeout", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0", "--no-workers-timeout", "1");
  const alice = await nodes.spawn("worker", scheduler.address, "--name", "alice", "--nthreads", "1");
  await using client = await Client.connect(scheduler.address);
  await using center = rpc<SchedulerOps>(scheduler.address);
  assert.equal(await client.submit(inc, 1).result(), 2);
  const slow = (x: number) => {
    const end = Date.now() + 5_000;
    while (Date.now() < end) { /* work */ }
    return x;
  };
  const running = client.submit(slow, 1);
  const prefix = running.key.slice(0, running.key.lastIndexOf("-"));
  await eventually(async () => (await center.progress())[prefix]?.processing === 1);
  alice.child.kill("SIGKILL");
  await alice.status;
  const later = client.submit(inc, 2);
  for (const f of [running, later]) {
    const error = await within(10_000, f.result().then(() => null, (e) => e), () => scheduler.log.join("\n"));
    assert.ok(error instanceof Error, `${f.key} resolved`);
    assert.equal(error.name, "NoWorkersError");
    assert.ok(error instanceof NoWorkersError, "a NoWorkersError is caught by its class");
    assert.match(error.message, /no worker was connected for 1000 ms \(no-workers-timeout\)/);
  }
});

Deno.test("a task no worker may run is never silent: the scheduler's log, dist info and its future say why it waits", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0", "--no-dashboard");
  await nodes.spawn("worker", scheduler.address, "--name", "alice", "--nthreads", "1");
  await using client = await Client.connect(scheduler.address);
  const stuck = client.submit(inc, 1, taskOptions({ workers: ["worker-9"] }));
  assert.match(await stuck.why(), /^queued: /);
  const line = await scheduler.waitForLog(/may run only on worker-9/, 10_000);
  assert.match(line, /WARN/);
  assert.match(
    line,
    /1 task \(e\.g\. "inc-[^"]+"\) may run only on worker-9, and no connected worker is one/,
  );
  assert.match(
    await stuck.why(),
    /^queued: it may run only on worker-9, and no connected worker is one; it fails in \d+ s \(--no-workers-timeout\)/,
  );
  const info = formatInfo(await clusterInfo(scheduler.address));
  assert.match(info, /Problems:\n {2}queue: 1 task .* may run only on worker-9/);
  // A worker it may run on arrives: it runs, and the problem is gone.
  await nodes.spawn("worker", scheduler.address, "--name", "worker-9", "--nthreads", "1");
  assert.equal(await stuck.result(), 2);
  assert.match(await stuck.why(), /^done: in memory on worker-9/);
  await eventually(
    async () => !formatInfo(await clusterInfo(scheduler.address)).includes("Problems:"),
    5_000,
  );
});
