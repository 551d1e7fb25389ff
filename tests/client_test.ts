import assert from "node:assert/strict";
import {
  asCompleted,
  CancelledError,
  Client,
  ConnectionClosedError,
  Future,
  KilledWorkerError,
  ref,
  rpc,
  type SchedulerOps,
  type TaskError,
  taskOptions,
  wait,
  type WorkerOps,
} from "../mod.ts";
import { startScheduler, startWorker } from "../node.ts";
import { spawnNode } from "../client/spawn.ts";
import { BIGINT_BYTES_MAX } from "../protocol/codec.ts";
import { eventually, metricAt, startCluster, testLogger } from "./_helpers.ts";

const inc = (x: number) => x + 1;
/** Takes anything: for the calls that test what cannot be sent, whatever the function. */
const anything = (..._values: unknown[]) => 0;
const add = (a: number, b: number) => a + b;

async function withClient(
  n: number,
  body: (client: Client, cluster: Awaited<ReturnType<typeof startCluster>>) => Promise<void>,
) {
  await using cluster = await startCluster(n);
  await using client = await Client.connect(cluster.scheduler.address);
  await body(client, cluster);
}

Deno.test("client: submit, dependencies, map, gather, get", async () => {
  await withClient(2, async (client) => {
    const x = client.submit(inc, 1);
    const y = client.submit(add, x, 10);
    assert.ok(x instanceof Future);
    assert.equal(await y.result(), 12);
    assert.equal(x.status, "finished");
    assert.deepEqual(await client.gather(client.map(inc, [1, 2, 3])), [2, 3, 4]);
    assert.deepEqual(await client.gather(client.map(add, [1, 2, 3], [10, 20, 30, 40])), [11, 22, 33]);
    // Nested structures keep their shape.
    assert.deepEqual(await client.gather({ a: x, list: [y, 5, { z: x }] }), {
      a: 2,
      list: [12, 5, { z: 2 }],
    });
    assert.equal(await client.get({ a: 1, b: [inc, "a"], c: [add, "a", "b"] }, "c"), 3);
    assert.deepEqual(await client.get({ a: 1, b: [inc, "a"], c: [add, "a", "b"] }, ["a", ["b", "c"]]), [1, [
      2,
      3,
    ]]);
    // Futures inside arrays and objects are dependencies too.
    const total = client.submit((o: { xs: number[] }) => o.xs.reduce((p, q) => p + q, 0), {
      xs: [x, y, 100],
    });
    assert.equal(await total.result(), 114);
  });
});

Deno.test("client: a diamond, a tree reduction and a chain give the right answers", async () => {
  await withClient(2, async (client) => {
    const a = client.submit(inc, 1);
    const b = client.submit((v: number) => v * 10, a);
    const c = client.submit((v: number) => v * 100, a);
    const d = client.submit(add, b, c);
    assert.equal(await d.result(), 220);

    let level = client.map((i: number) => i, Array.from({ length: 64 }, (_, i) => i));
    while (level.length > 1) {
      const next = [];
      for (let i = 0; i < level.length; i += 2) next.push(client.submit(add, level[i], level[i + 1]));
      level = next;
    }
    assert.equal(await level[0].result(), (63 * 64) / 2);

    let f = client.submit(inc, 0);
    for (let i = 0; i < 100; i++) f = client.submit(inc, f);
    assert.equal(await f.result(), 101);
  });
});

Deno.test("client: an error reaches result() with its class, message, stack and task; dependents fail the same way", async () => {
  await withClient(2, async (client) => {
    const bad = client.submit(function boom() {
      throw new RangeError("out of range");
    }, taskOptions({ key: "boom-1" }));
    const dependent = client.submit(inc, bad);
    const fine = client.submit(inc, 41);
    const error = await bad.result().catch((e) => e) as TaskError;
    assert.ok(error instanceof RangeError);
    assert.equal(error.message, "out of range");
    assert.equal(error.task, "boom-1");
    assert.match(error.stack ?? "", /boom/);
    const inherited = await dependent.result().catch((e) => e) as TaskError;
    assert.ok(inherited instanceof RangeError);
    assert.equal(inherited.task, "boom-1");
    assert.equal(dependent.status, "error");
    assert.equal(await fine.result(), 42);
    await assert.rejects(client.gather([fine, bad]), RangeError);
    // A custom error class keeps its name.
    const custom = client.submit(() => {
      class QuotaError extends Error {
        override name = "QuotaError";
      }
      throw new QuotaError("too much");
    }, taskOptions({ pure: false }));
    const e2 = await custom.result().catch((e) => e);
    assert.equal(e2.name, "QuotaError");
    assert.equal(e2.message, "too much");
  });
});

Deno.test("client: retries run a throwing task again", async () => {
  await withClient(1, async (client, cluster) => {
    await using alice = rpc<WorkerOps>(cluster.workers[0].address);
    // The executor's global state survives between runs of the same executor: count tries there.
    const flaky = client.submit(() => {
      const g = globalThis as { tries?: number };
      g.tries = (g.tries ?? 0) + 1;
      if (g.tries < 3) throw new Error(`try ${g.tries}`);
      return g.tries;
    }, taskOptions({ retries: 2, pure: false }));
    assert.equal(await flaky.result(), 3);
    const once = client.submit(() => {
      throw new Error("always");
    }, taskOptions({ retries: 1, pure: false }));
    await assert.rejects(once.result(), /always/);
    assert.equal(await alice.ping(), "pong");
  });
});

Deno.test("client: pure submits share one key and one run; pure: false does not", async () => {
  await withClient(1, async (client) => {
    const a = client.submit(inc, 5);
    const b = client.submit(inc, 5);
    assert.equal(a.key, b.key);
    assert.match(a.key, /^inc-[0-9a-f]{16}$/);
    assert.notEqual(client.submit(inc, 6).key, a.key);
    const c = client.submit(inc, 5, taskOptions({ pure: false }));
    const d = client.submit(inc, 5, taskOptions({ pure: false }));
    assert.notEqual(c.key, d.key);
    assert.deepEqual(await client.gather([a, b, c, d]), [6, 6, 6, 6]);
    const named = client.submit(inc, 1, taskOptions({ key: "my-key" }));
    assert.equal(named.key, "my-key");
    assert.equal(await named.result(), 2);
  });
});

Deno.test("client: release returns memory; the scheduler and workers forget released keys", async () => {
  await withClient(2, async (client, cluster) => {
    await using center = rpc<SchedulerOps>(cluster.scheduler.address);
    const x = client.submit((n: number) => new Float64Array(n), 1000, taskOptions({ key: "big-x" }));
    const y = client.submit((v: Float64Array) => v.length, x, taskOptions({ key: "len-y" }));
    assert.equal(await y.result(), 1000);
    assert.equal((await center.who_has({ keys: ["big-x"] }))["big-x"].length, 1);
    x.release();
    y.release();
    const allKeys = async () => {
      const keys = await Promise.all(cluster.workers.map(async (w) => {
        await using r = rpc<WorkerOps>(w.address);
        return await r.keys();
      }));
      return keys.flat();
    };
    await eventually(async () => (await allKeys()).length === 0);
    assert.deepEqual(await center.who_has(), {});
    // A future released twice, or by another holder of the key, is harmless.
    const a = client.submit(inc, 1);
    const b = client.submit(inc, 1);
    a.release();
    a.release();
    assert.equal(await b.result(), 2);
  });
});

Deno.test("client: intermediate results are freed once their dependents have them", async () => {
  await withClient(1, async (client, cluster) => {
    const graph = { a: 1, b: [inc, "a"], c: [inc, "b"], d: [inc, "c"] };
    assert.equal(await client.get(graph, "d"), 4);
    await using alice = rpc<WorkerOps>(cluster.workers[0].address);
    await eventually(async () => (await alice.keys()).length === 0);
  });
});

Deno.test("client: get computes a 20,000-key chain, and names a cycle however deep it is", async () => {
  await withClient(1, async (client) => {
    const n = 20_000;
    const chain: Record<string, unknown> = { "k-0": 0 };
    for (let i = 1; i < n; i++) chain[`k-${i}`] = [inc, `k-${i - 1}`];
    assert.equal(await client.get(chain, `k-${n - 1}`), n - 1);
    // A cycle at the bottom of a deep chain is found before anything runs.
    chain["k-0"] = [inc, `k-${n - 1}`];
    await assert.rejects(client.get(chain, `k-${n - 1}`), /get: the graph has a cycle through "k-/);
  });
});

Deno.test("client: scatter with placement and broadcast; the seed exchange through the client", async () => {
  await withClient(2, async (client, cluster) => {
    const [aliceNode, bobNode] = cluster.workers;
    await using center = rpc<SchedulerOps>(cluster.scheduler.address);
    const [x] = await client.scatter([new Float64Array(100_000).fill(1)], { workers: [aliceNode.address] });
    const [a] = await client.scatter([new Float64Array([5])], { workers: ["bob"] });
    assert.deepEqual(await center.who_has({ keys: [x.key, a.key] }), {
      [x.key]: [aliceNode.address],
      [a.key]: [bobNode.address],
    });
    // z <- add(x, a): runs on Alice (more bytes local), who fetches a from Bob.
    const z = client.submit((u: Float64Array, v: Float64Array) => u[0] + v[0] + u.length, x, a);
    assert.equal(await z.result(), 100_006);
    const whoHas = await center.who_has({ keys: [z.key, a.key] });
    assert.deepEqual(whoHas[z.key], [aliceNode.address]);
    assert.deepEqual(new Set(whoHas[a.key]), new Set([aliceNode.address, bobNode.address]));

    const named = await client.scatter({ config: { depth: 3 } }, { broadcast: true });
    assert.equal(named.config.key, "config");
    assert.equal((await center.who_has({ keys: ["config"] })).config.length, 2);
    assert.deepEqual(await named.config.result(), { depth: 3 });
    await assert.rejects(
      client.scatter([1], { workers: ["nobody"] }),
      /none of the workers nobody is connected/,
    );
  });
});

Deno.test("client: workers restrictions are honoured", async () => {
  await withClient(2, async (client, cluster) => {
    const [, bobNode] = cluster.workers;
    await using center = rpc<SchedulerOps>(cluster.scheduler.address);
    const fs = client.map(inc, Array.from({ length: 20 }, (_, i) => i), taskOptions({ workers: ["bob"] }));
    await client.gather(fs);
    const whoHas = await center.who_has({ keys: fs.map((f) => f.key) });
    for (const f of fs) assert.deepEqual(whoHas[f.key], [bobNode.address]);
  });
});

Deno.test("client: 10,000-task map", async () => {
  await withClient(2, async (client) => {
    const results = await client.gather(client.map(inc, Array.from({ length: 10_000 }, (_, i) => i)));
    assert.equal(results.length, 10_000);
    assert.equal(results.reduce((p, q) => p + q, 0), (10_000 * 10_001) / 2);
  });
});

Deno.test("client: wait and asCompleted", async () => {
  await withClient(2, async (client) => {
    // The pause is the behaviour under test: a task still running when wait() gives up.
    const slow = client.submit(async (ms: number) => {
      await new Promise((r) => setTimeout(r, ms));
      return ms;
    }, 1_500);
    const fast = client.submit(inc, 1);
    await fast.result();
    const partial = await wait([slow, fast], { timeoutMs: 50 });
    assert.deepEqual(partial.done, [fast]);
    assert.deepEqual(partial.notDone, [slow]);
    const order: Future[] = [];
    for await (const f of asCompleted([slow, fast])) order.push(f);
    assert.deepEqual(order, [fast, slow]);
    const all = await wait([slow, fast]);
    assert.equal(all.notDone.length, 0);
  });
});

Deno.test("client: a task that never returns leaves the worker serving; cancel stops it", async () => {
  await using cluster = await startCluster(1, { httpPort: 0 });
  await using client = await Client.connect(cluster.scheduler.address);
  const forever = client.submit(() => {
    while (true) { /* spin */ }
  }, taskOptions({ pure: false }));
  // The task spins on alice's executor.
  const metrics = `${cluster.workers[0].httpUrl}/metrics`;
  await eventually(async () => (await metricAt(metrics, "dist_worker_tasks_running")) === 1);
  await using alice = rpc<WorkerOps>(cluster.workers[0].address);
  assert.equal(await alice.ping(), "pong");
  await alice.update_data({ data: { still: 1 } });
  assert.deepEqual(await alice.get_data({ keys: ["still"] }), { still: 1 });
  await forever.cancel();
  const error = await forever.result().catch((e) => e);
  assert.ok(error instanceof CancelledError);
  assert.equal(forever.status, "cancelled");
  // The executor was replaced: the worker runs tasks again.
  assert.equal(await client.submit(inc, 99).result(), 100);
});

Deno.test("client: CPU-bound tasks run in parallel on a worker's threads", async () => {
  await using cluster = await startCluster(1, { nthreads: 2 });
  await using client = await Client.connect(cluster.scheduler.address);
  // Each task spins for 200 ms and reports when it ran: parallel runs overlap in time.
  const meet = (me: number) => {
    const start = Date.now();
    while (Date.now() - start < 200) { /* busy */ }
    return { me, start, end: Date.now() };
  };
  const [a, b] = await client.gather(client.map(meet, [1, 2]));
  assert.ok(a.start < b.end && b.start < a.end, `runs did not overlap: ${JSON.stringify([a, b])}`);
});

Deno.test("client: a large typed array reaches the executor in shared memory and stays valid on the worker", async () => {
  await using cluster = await startCluster(1);
  await using client = await Client.connect(cluster.scheduler.address);
  const [data] = await client.scatter([new Float64Array(1 << 20).fill(2)]);
  const seen = client.submit((v: Float64Array) => ({
    shared: v.buffer instanceof SharedArrayBuffer,
    sum: v.reduce((p, q) => p + q, 0),
  }), data);
  assert.deepEqual(await seen.result(), { shared: true, sum: 2 * (1 << 20) });
  // A task's large result is stored once; a later task reads it shared, and the stored copy stays valid.
  const made = client.submit((n: number) => new Float64Array(n).fill(3), 1 << 18);
  const used = client.submit((v: Float64Array) => v.buffer instanceof SharedArrayBuffer && v[5] === 3, made);
  assert.equal(await used.result(), true);
  const back = await made.result() as Float64Array;
  assert.equal(back.length, 1 << 18);
  assert.equal(back[100], 3);
});

Deno.test("client: closing the client frees its data; a closed client refuses work", async () => {
  await using cluster = await startCluster(1);
  const client = await Client.connect(cluster.scheduler.address);
  const x = client.submit(inc, 1);
  assert.equal(await x.result(), 2);
  await client.close();
  assert.throws(() => client.submit(inc, 2), /closed/);
  await using alice = rpc<WorkerOps>(cluster.workers[0].address);
  await eventually(async () => (await alice.keys()).length === 0);
});

Deno.test("client: every method of a closed client rejects with ConnectionClosedError", async () => {
  await using cluster = await startCluster(1);
  const client = await Client.connect(cluster.scheduler.address);
  const x = client.submit(inc, 1);
  assert.equal(await x.result(), 2);
  await client.close();
  const calls: [string, () => unknown][] = [
    ["gather", () => client.gather([x])],
    ["result", () => x.result()],
    ["submit", () => client.submit(inc, 2)],
    ["map", () => client.map(inc, [])],
    ["scatter", () => client.scatter([1])],
    ["get", () => client.get({ a: 1 }, "a")],
  ];
  for (const [name, call] of calls) {
    let error: unknown;
    try {
      await call();
    } catch (e) {
      error = e;
    }
    assert.ok(error instanceof ConnectionClosedError, `${name}: ${error}`);
    assert.match(error.message, /^This client's connection to tcp:\/\/127\.0\.0\.1:\d+ is closed$/, name);
  }
});

Deno.test("client: a circular argument gets the codec's error naming its path, not a stack overflow", async () => {
  await withClient(1, async (client) => {
    const a: Record<string, unknown> = { n: 1 };
    a.self = a;
    const list: unknown[] = [];
    list.push(list);
    for (
      const [submit, path] of [
        [() => client.submit(anything, a), /^Cannot send args\[0\]\.self\.self\.self/],
        [
          () => client.submit(anything, 1, a, taskOptions({ pure: false })),
          /^Cannot send args\[1\]\.self\.self/,
        ],
        [() => client.submit(anything, { deep: [list] }), /^Cannot send args\[0\]\.deep\[0\]\[0\]\[0\]/],
        [() => client.map(anything, [a]), /^Cannot send args\[0\]\.self/],
      ] as const
    ) {
      assert.throws(submit, (error: unknown) => {
        assert.ok(error instanceof TypeError, String(error));
        assert.match(error.message, path);
        assert.match(error.message, /: nested deeper than 256 levels; is it a circular reference\?$/);
        return true;
      });
    }
    await assert.rejects(client.gather(a), /^TypeError: Cannot send value\.self\.self.*circular reference/);
    assert.equal(await client.submit(inc, 1).result(), 2);
  });
});

Deno.test("client: keys with lone surrogates are refused with a TypeError naming the key", async () => {
  await withClient(2, async (client) => {
    const cut = "file-😀x".slice(0, 6); // half of the emoji's surrogate pair
    const advice =
      /: a lone surrogate at index 5; cut strings at code points \(Array\.from\(s\)\), or use s\.toWellFormed\(\)$/;
    const refusals: [() => unknown, string][] = [
      [() => client.submit(inc, 1, taskOptions({ key: cut })), 'submit: key option "file-\\ud83d"'],
      [() => client.get({ [cut]: 1 }, cut), 'get: graph key "file-\\ud83d"'],
      [() => client.get({ [cut]: 1, b: [inc, cut] }, "b"), 'get: graph key "file-\\ud83d"'],
      [() => client.scatter({ [cut]: 1 }), 'scatter: key "file-\\ud83d"'],
      [() => ref(cut), 'ref: key "file-\\ud83d"'],
    ];
    for (const [call, named] of refusals) {
      let error: unknown;
      try {
        await call();
      } catch (e) {
        error = e;
      }
      assert.ok(error instanceof TypeError, `${named}: ${error}`);
      assert.ok(error.message.startsWith(`${named} is not a well-formed string`), error.message);
      assert.match(error.message, advice);
    }
  });
});

Deno.test("client: values with lone surrogates come back identical through a cluster", async () => {
  await withClient(2, async (client) => {
    const cut = "file-😀x".slice(0, 6);
    // In strings, keys of objects and Maps, Sets; there and back.
    const value = { [cut]: [cut, "\uDC00", new Map([[cut, new Set(["a\uD800b"])]])], plain: "😀" };
    const echoed = client.submit((v: unknown) => v, value);
    assert.deepEqual(await echoed.result(), value);
    const [scattered] = await client.scatter([cut]);
    assert.equal(await scattered.result(), cut);
    assert.equal(await client.submit((s: string) => s + "\uDFFF", scattered).result(), cut + "\uDFFF");
    assert.equal(await client.submit(() => "😀".slice(1)).result(), "\uDE00");
    // A function whose name has a lone surrogate still makes a well-formed key.
    const named = { [`f${cut}`]: (x: number) => x * 2 }[`f${cut}`];
    const doubled = client.submit(named, 21);
    assert.ok(doubled.key.isWellFormed(), doubled.key);
    assert.equal(await doubled.result(), 42);
  });
});

Deno.test("client: a bigint argument of BIGINT_BYTES_MAX bytes makes its key at once and round-trips; a larger one is refused", async () => {
  await withClient(1, async (client) => {
    const big = (1n << BigInt(BIGINT_BYTES_MAX * 8)) - 1n;
    const start = performance.now();
    const args = Array.from({ length: 8 }, (_, i) => big - BigInt(i));
    const f = client.submit((...ns: bigint[]) => ns[7] - 1n, ...args);
    const ms = performance.now() - start;
    // The key is a hash of the encoded arguments: byte-at-a-time bigint encoding took ~2 s here.
    assert.ok(ms < 250, `submit took ${ms.toFixed(0)} ms`);
    assert.equal(await f.result(), big - 8n);
    assert.throws(
      () => client.submit((n: number, o: { x: bigint }) => [n, o], 1, { x: big + 1n }),
      (error: unknown) => {
        assert.ok(error instanceof RangeError, String(error));
        assert.equal(
          error.message,
          "Cannot send args[1].x: a bigint of more than 65536 bytes (BIGINT_BYTES_MAX) cannot travel; " +
            "send it as a typed array of its digits, or as a string",
        );
        return true;
      },
    );
    // A task that makes one fails its own task, with the same reason.
    const made = client.submit((bits: number) => 1n << BigInt(bits), BIGINT_BYTES_MAX * 8);
    await assert.rejects(made.result(), /cannot be kept: Cannot send .*BIGINT_BYTES_MAX/);
    assert.equal(await client.submit(inc, 1).result(), 2);
  });
});

Deno.test("client: KilledWorker names the allowed failures (--allowed-failures 1)", async () => {
  const scheduler = await startScheduler({ port: 0, allowedFailures: 1, log: testLogger("scheduler") });
  const workers = [
    await startWorker({ scheduler: scheduler.address, nthreads: 1, log: testLogger("alice") }),
    await startWorker({ scheduler: scheduler.address, nthreads: 1, log: testLogger("bob") }),
  ];
  try {
    await using client = await Client.connect(scheduler.address);
    const killer = client.submit(() => Deno.exit(1), taskOptions({ key: "killer-1" }));
    const error = await killer.result().catch((e) => e);
    assert.equal(error.name, "KilledWorker");
    assert.ok(error instanceof KilledWorkerError, "a KilledWorker is caught by its class");
    assert.equal(
      error.message,
      "Task killer-1 was running when 2 workers (or their executors) died; " +
        "it is not retried past allowed_failures=1. The last time: Task killer-1 killed its executor: " +
        "it ended its executor (Deno.exit or close, code 1)",
    );
  } finally {
    for (const w of workers) await w.close();
    await scheduler.close();
  }
});

Deno.test("Client.local starts worker processes and stops them on close", async () => {
  const client = await Client.local({ workers: 2, threads: 1 });
  let scheduler: string;
  try {
    scheduler = client.scheduler;
    assert.deepEqual(await client.gather(client.map(inc, [1, 2, 3])), [2, 3, 4]);
    await using center = rpc<SchedulerOps>(scheduler);
    const workers = await center.workers();
    assert.equal(workers.length, 2);
  } finally {
    await client.close();
  }
  await assert.rejects(
    (async () => {
      await using center = rpc<SchedulerOps>(scheduler);
      await center.ping();
    })(),
    /connection refused/,
  );
});

Deno.test("dist local prints the scheduler's address and serves a computation", async () => {
  const node = await spawnNode(["local", "--port", "0", "--workers", "2", "--nthreads", "1"]);
  try {
    assert.match(node.address, /^tcp:\/\/127\.0\.0\.1:\d+$/);
    await using center = rpc<SchedulerOps>(node.address);
    assert.equal(Object.keys(await center.ncores()).length, 2);
    await using client = await Client.connect(node.address);
    assert.equal(await client.submit(add, 20, 22).result(), 42);
  } finally {
    const status = await node.stop();
    assert.equal(status.code, 0);
  }
});

Deno.test("client: a closure is refused at the sender, also over a name the executor has as a global", async () => {
  await withClient(1, async (client) => {
    const k = 3;
    assert.throws(
      () => client.submit((x: number) => x * k, 2),
      /^TypeError: Cannot send an anonymous function: it reads k, a variable from outside its own body, .*pass k as an argument/,
    );
    // Executors have `name` and `navigator` of their own: a captured one would silently read those.
    const name = "bob";
    assert.throws(
      () => client.submit((s: string) => s + name, "hi "),
      /it reads name, which the executor has as a global of its own, not this script's name; .*globalThis\.name/,
    );
    assert.throws(
      () => client.map((_: number) => navigator, [1]),
      /it reads navigator, which the executor has/,
    );
    const self = { x: 1 }; // `const self = this` is common: an executor's `self` is its own global
    assert.throws(
      () => client.submit(() => self.x),
      /it reads self, which the executor has as a global of its own/,
    );
    // Globals every executor has, the function's own names, and globalThis.name are fine.
    const fine = client.submit(
      function fact(n: number): unknown {
        const digits = JSON.stringify(Math.max(n, 1));
        return n <= 1
          ? [digits, typeof Deno.pid, typeof crypto.randomUUID(), typeof globalThis.name]
          : fact(n - 1);
      },
      3,
    );
    assert.deepEqual(await fine.result(), ["1", "number", "string", "string"]);
  });
});
