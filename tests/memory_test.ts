/**
 * A worker process gives back the memory of large values once they are freed, even
 * while idle: values it receives land in shared memory, which V8 does not count toward
 * its next collection.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, type Future, rpc, type SchedulerOps, type WorkerOps } from "../mod.ts";
import { startScheduler } from "../node.ts";
import { spawnNode } from "../client/spawn.ts";
import { eventually, testLogger } from "./_helpers.ts";

const MIB = 1024 * 1024;
const VALUE_BYTES = 64 * MIB;
const ROUNDS = 10;

/** The resident memory of process `pid`, in bytes (as `ps` reports it). */
async function rssOf(pid: number): Promise<number> {
  const out = await new Deno.Command("ps", { args: ["-o", "rss=", "-p", String(pid)] }).output();
  return Number(new TextDecoder().decode(out.stdout).trim()) * 1024;
}

Deno.test({
  name:
    "a worker's idle memory after rounds of large scatters and releases stays near one value, not all of them",
  ignore: Deno.build.os === "windows",
  async fn() {
    await using scheduler = await startScheduler({ port: 0, log: testLogger("scheduler") });
    const worker = await spawnNode(["worker", scheduler.address, "--nthreads", "1"]);
    try {
      await using s = rpc<SchedulerOps>(scheduler.address);
      await eventually(async () => (await s.workers({})).length === 1, 30_000);
      await using client = await Client.connect(scheduler.address);
      await using w = rpc<WorkerOps>(worker.address);
      const before = await rssOf(worker.child.pid);
      for (let round = 0; round < ROUNDS; round++) {
        // A typed array, an ArrayBuffer, and one a task reads (its executor holds it too).
        const value = round % 3 === 1
          ? new Uint8Array(VALUE_BYTES).fill(round).buffer
          : new Float64Array(VALUE_BYTES / 8).fill(round);
        const [f] = await client.scatter([value]);
        if (round % 3 === 2) {
          const first = client.submit((a: Float64Array) => a[0], f as Future<Float64Array>);
          assert.equal(await first.result(), round);
          first.release();
        }
        f.release();
        await eventually(async () => (await w.keys({})).length === 0);
      }
      let after = await rssOf(worker.child.pid);
      try {
        await eventually(
          async () => (after = await rssOf(worker.child.pid)) < before + 2 * VALUE_BYTES,
          10_000,
        );
      } finally {
        console.log(
          `worker RSS before ${(before / MIB).toFixed(1)} MiB, idle after ${ROUNDS} rounds of ${
            VALUE_BYTES / MIB
          } MiB: ${(after / MIB).toFixed(1)} MiB`,
        );
      }
    } finally {
      await worker.stop();
    }
  },
});
