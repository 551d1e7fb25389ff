import assert from "node:assert/strict";
import { ExecutorPool } from "../worker/executors.ts";
import { CancelledError } from "../protocol/errors.ts";
import { eventually } from "./_helpers.ts";

const add = { source: "(a, b) => a + b" };
// The pause is the behaviour under test: two tasks that overlap in time.
const slow = { source: "(ms) => new Promise((resolve) => setTimeout(() => resolve(ms), ms))" };

Deno.test("executors start when a task first needs them, one per task running at once", async () => {
  const pool = new ExecutorPool(2);
  try {
    assert.equal(pool.started, 0, "a pool nobody gave work starts nothing");
    assert.equal((await pool.run(add, [1, 2], "a")).result, 3);
    assert.equal(pool.started, 1, "one task at a time needs one executor");
    assert.equal((await pool.run(add, [3, 4], "b")).result, 7);
    assert.equal(pool.started, 1, "an idle executor is used before another starts");
    const both = await Promise.all([pool.run(slow, [200], "c"), pool.run(slow, [200], "d")]);
    assert.equal(pool.started, 2);
    assert.notEqual(both[0].thread, both[1].thread, "two tasks at once run on two executors");
  } finally {
    pool.close();
  }
});

Deno.test("a cancelled task's executor stops, and the next task starts a fresh one", async () => {
  const pool = new ExecutorPool(1);
  try {
    const running = pool.run({ source: "() => { for (;;); }" }, [], "spin");
    // Wait until it runs: the executor has started.
    await eventually(() => pool.running > 0);
    assert.equal(pool.cancel("spin"), true);
    await assert.rejects(running, CancelledError);
    assert.equal(pool.started, 0, "the stopped executor is not replaced before it is needed");
    assert.equal((await pool.run(add, [1, 1], "after")).result, 2);
    assert.equal(pool.started, 1);
  } finally {
    pool.close();
  }
});

Deno.test("a cancelled task next in an executor's line is let go without stopping the executor", async () => {
  const pool = new ExecutorPool(1, { read: true, write: true });
  const runs = await Deno.makeTempFile();
  try {
    // "first" notes each run of it in a file, then takes 300 ms.
    const noted = {
      source: `async (path) => {
        await Deno.writeTextFile(path, "run;", { append: true });
        await new Promise((resolve) => setTimeout(resolve, 300));
        return 300;
      }`,
    };
    // Asked in one turn, both go to the one executor: "next" waits behind "first".
    const first = pool.run(noted, [runs], "first");
    const next = pool.run(add, [1, 2], "next");
    await eventually(async () => (await Deno.readTextFile(runs)) !== "");
    assert.equal(pool.cancel("next"), true);
    await assert.rejects(next, CancelledError);
    assert.equal((await first).result, 300);
    assert.equal(await Deno.readTextFile(runs), "run;", "the task it waited behind ran on, once");
    assert.equal((await pool.run(add, [2, 2], "after")).result, 4);
    assert.equal(pool.started, 1);
  } finally {
    pool.close();
    await Deno.remove(runs);
  }
});

Deno.test("task permissions beyond the process's fail when the pool is made, not at the first task", () => {
  // The tests run without --allow-ffi.
  assert.equal(Deno.permissions.querySync({ name: "ffi" }).state === "granted", false);
  assert.throws(
    () => new ExecutorPool(1, { ffi: true }),
    /The task permissions .*"ffi":true.* ask for more than this worker process has/,
  );
  // Permissions the process has are fine, and start nothing either.
  const pool = new ExecutorPool(1, { net: true, read: false });
  assert.equal(pool.started, 0);
  pool.close();
});
