/**
 * Scaling: what the scheduler would like (`desiredWorkers`, the `adaptive_target` op and
 * `dist_scheduler_desired_workers`), `LocalCluster.scale(n)` and `adapt()`, on real worker
 * processes.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, LocalCluster, rpc, type SchedulerOps, taskOptions } from "../mod.ts";
import { SchedulerTasks } from "../scheduler/tasks.ts";
import { eventually, metricAt } from "./_helpers.ts";

const A = "tcp://127.0.0.1:1";

Deno.test("scale: desiredWorkers is the work's expected seconds over 5 s a thread, and what memory needs", () => {
  const s = new SchedulerTasks();
  s.addWorker({ address: A, name: "a", nthreads: 2 }, 0);
  assert.equal(s.desiredWorkers(), 0, "no work, nothing held");
  const tasks = Array.from({ length: 100 }, (_, i) => ({
    key: `slow-${i}`,
    run: { function: { source: "() => 1" }, args: [] },
    deps: [],
  }));
  s.updateGraph("c", tasks, tasks.map((t) => t.key));
  s.drain();
  // Unknown duration: 0.5 s each; 50 s of work over 5 s a thread is 10 threads: 5 workers of 2.
  assert.equal(s.desiredWorkers(), 5);
  s.durations.set("slow", 2);
  assert.equal(s.desiredWorkers(), 20, "200 s of work: 40 threads");
  s.durations.set("slow", 0.001);
  assert.equal(s.desiredWorkers(), 1, "tiny tasks: one worker does");
  // Values held past the target share of the limits need more workers.
  s.workers.get(A)!.metrics = { managed: 1.5e9, memory_limit: 1e9 };
  assert.equal(s.desiredWorkers(), 3, "1.5 GB over 60% of 1 GB each");
});

Deno.test("scale: LocalCluster.scale starts workers and retires the newest, who hand over their data", async () => {
  await using cluster = await LocalCluster.start({ workers: 1, threads: 1, dashboardPort: null });
  await using client = await Client.connect(cluster.address);
  await using center = rpc<SchedulerOps>(cluster.address);
  await cluster.scale(3);
  assert.equal(cluster.workers.length, 3);
  assert.equal((await center.workers()).length, 3);
  // Data only the newest holds survives its retirement.
  const newest = cluster.workers[2];
  const [kept] = await client.scatter([new Float64Array([1, 2, 3])], { workers: [newest] });
  const computed = client.submit((n: number) => n * 2, 21, taskOptions({ workers: [newest] }));
  assert.equal(await computed.result(), 42);
  await cluster.scale(1);
  assert.equal(cluster.workers.length, 1);
  await eventually(async () => (await center.workers()).length === 1, 10_000);
  assert.deepEqual([...await kept.result()], [1, 2, 3]);
  assert.equal(await computed.result(), 42);
  assert.throws(() => cluster.scale(-1), RangeError);
});

Deno.test("scale: adapt follows the work up to its maximum and back down to its minimum", async () => {
  await using cluster = await LocalCluster.start({ workers: 1, threads: 1, dashboardPort: 0 });
  await using client = await Client.connect(cluster.address);
  const adaptive = cluster.adapt({ minimum: 1, maximum: 3, intervalMs: 100, waitCount: 3 });
  const slow = (x: number) => {
    const end = Date.now() + 300;
    while (Date.now() < end) { /* work */ }
    return x;
  };
  const futures = client.map(slow, Array.from({ length: 40 }, (_, i) => i));
  const desired = await metricAt(`${cluster.dashboard}/metrics`, "dist_scheduler_desired_workers");
  assert.ok(desired >= 3, `the scheduler would like ${desired} workers for 40 tasks of unknown duration`);
  await eventually(() => cluster.workers.length === 3, 20_000);
  assert.equal(adaptive.target, 3, "never past its maximum");
  assert.equal((await client.gather(futures)).length, 40);
  for (const f of futures) f.release();
  await eventually(() => cluster.workers.length === 1, 20_000);
  assert.equal(adaptive.target, 1);
  adaptive.stop();
});
