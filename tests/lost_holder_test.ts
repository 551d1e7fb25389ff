/**
 * A gather whose holder dies waits for the key to be recomputed, with real worker
 * processes killed by SIGKILL.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, rpc, type SchedulerOps } from "../mod.ts";
import { startScheduler } from "../node.ts";
import { type NodeProcess, spawnNode } from "../client/spawn.ts";
import { eventually, testLogger } from "./_helpers.ts";

Deno.test("result() of a recomputable key whose holder is killed right before or during it returns the recomputed value", async () => {
  await using scheduler = await startScheduler({ port: 0, log: testLogger("scheduler") });
  const workers: NodeProcess[] = [];
  try {
    for (const name of ["alice", "bob"]) {
      workers.push(
        await spawnNode(["worker", scheduler.address, "--name", name, "--nthreads", "1", "--no-nanny"]),
      );
    }
    await using client = await Client.connect(scheduler.address);
    await using s = rpc<SchedulerOps>(scheduler.address);
    await eventually(async () => (await s.workers({})).length === 2, 30_000);
    // Slow enough that the recompute is still running when result() first asks: the
    // pause is the behaviour under test.
    const slow = async (x: number) => {
      await new Promise((resolve) => setTimeout(resolve, 500));
      return new Float64Array(4 * 1024 * 1024).fill(x);
    };
    for (let round = 0; round < 2; round++) {
      const f = client.submit(slow, round + 1);
      await f.wait();
      const [holder] = (await s.who_has({ keys: [f.key] }))[f.key];
      const victim = workers.find((w) => w.address === holder)!;
      // Round 0 kills the holder right before result(), round 1 while result() fetches.
      let result: Promise<unknown> | null = round === 1 ? f.result() : null;
      victim.child.kill("SIGKILL");
      await victim.status;
      result ??= f.result();
      const value = await result as Float64Array;
      assert.equal(value.length, 4 * 1024 * 1024);
      assert.equal(value[value.length - 1], round + 1);
      // A fresh worker takes the dead one's place for the next round.
      workers.splice(workers.indexOf(victim), 1);
      workers.push(await spawnNode(["worker", scheduler.address, "--nthreads", "1", "--no-nanny"]));
      await eventually(async () => (await s.workers({})).length === 2, 30_000);
    }
  } finally {
    for (const w of workers) await w.stop();
  }
});
