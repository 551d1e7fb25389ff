import assert from "node:assert/strict";
import { MissingDataError, ref, RemoteError, rpc, type SchedulerOps, type WorkerOps } from "../mod.ts";
import { startCluster } from "./_helpers.ts";

const add = (x: Float64Array, y: Float64Array) => x.map((v, i) => v + y[i]);

Deno.test("the seed exchange: Alice computes z <- add(x, a), fetching a from Bob", async () => {
  await using cluster = await startCluster(2);
  const [aliceNode, bobNode] = cluster.workers;
  await using alice = rpc<WorkerOps>(aliceNode.address);
  await using bob = rpc<WorkerOps>(bobNode.address);
  await using center = rpc<SchedulerOps>(cluster.scheduler.address);

  await alice.update_data({ data: { x: new Float64Array([1, 2, 3]) } });
  await bob.update_data({ data: { a: new Float64Array([10, 20, 30]) } });
  assert.deepEqual(await center.who_has({ keys: ["a"] }), { a: [bobNode.address] });

  const reply = await alice.compute({ key: "z", function: add, keys: ["x", "a"] });
  assert.deepEqual(reply, { status: "OK", key: "z", nbytes: 24 });

  // The scheduler knows z the moment the reply arrives, and knows Alice's replica of a.
  const whoHas = await center.who_has({ keys: ["z", "a"] });
  assert.deepEqual(whoHas.z, [aliceNode.address]);
  assert.deepEqual(new Set(whoHas.a), new Set([bobNode.address, aliceNode.address]));
  const { z } = await alice.get_data({ keys: ["z"] });
  assert.ok(z instanceof Float64Array);
  assert.deepEqual([...z], [11, 22, 33]);
  // The value itself never went through the scheduler: Bob still has his own a.
  assert.deepEqual(Object.keys(await bob.get_data({ keys: ["a", "z"] })), ["a"]);
});

Deno.test("compute with args mixing literals and refs, async functions, method syntax", async () => {
  await using cluster = await startCluster(2);
  const [aliceNode, bobNode] = cluster.workers;
  await using alice = rpc<WorkerOps>(aliceNode.address);
  await using bob = rpc<WorkerOps>(bobNode.address);
  await bob.update_data({ data: { n: 5, list: [1, 2, 3] } });
  await alice.update_data({ data: { m: 2 } });

  await alice.compute({
    key: "r",
    function: (scale: number, xs: number[], opts: { offset: number; m: number }) =>
      xs.map((x) => x * scale + opts.offset + opts.m),
    args: [ref("n"), ref("list"), { offset: 100, m: ref("m") }],
  });
  assert.deepEqual((await alice.get_data({ keys: ["r"] })).r, [107, 112, 117]);

  await alice.compute({
    key: "s",
    function: async function sum(xs: number[]) {
      // The pause is the behaviour under test: an async task function, awaited.
      await new Promise((resolve) => setTimeout(resolve, 1));
      return xs.reduce((a, b) => a + b, 0);
    },
    keys: ["list"],
  });
  assert.equal((await alice.get_data({ keys: ["s"] })).s, 6);

  const lib = {
    twice(x: number) {
      return 2 * x;
    },
  };
  await alice.compute({ key: "t", function: lib.twice, keys: ["n"] });
  assert.equal((await alice.get_data({ keys: ["t"] })).t, 10);
});

Deno.test("compute fetches many keys from several peers in one batch per peer", async () => {
  const lines: string[] = [];
  const capture = (line: string) => lines.push(line);
  await using cluster = await startCluster(3, {
    log: { debug: capture, info: capture, warn: capture, error: capture },
  });
  const [a, b, c] = cluster.workers.map((w) => rpc<WorkerOps>(w.address));
  try {
    await b.update_data({ data: { b1: 1, b2: 2, b3: 3 } });
    await c.update_data({ data: { c1: 10, c2: 20 } });
    const reply = await a.compute({
      key: "total",
      function: (...xs: number[]) => xs.reduce((p, q) => p + q, 0),
      keys: ["b1", "b2", "b3", "c1", "c2"],
    });
    assert.equal(reply.status, "OK");
    assert.equal((await a.get_data({ keys: ["total"] })).total, 36);
    assert.deepEqual((await a.keys()).sort(), ["b1", "b2", "b3", "c1", "c2", "total"]);
    const fetches = lines.filter((line) => line.startsWith("Fetching"));
    assert.deepEqual(fetches.sort(), [
      `Fetching b1, b2, b3 from ${cluster.workers[1].address}`,
      `Fetching c1, c2 from ${cluster.workers[2].address}`,
    ]);
  } finally {
    await Promise.all([a.close(), b.close(), c.close()]);
  }
});

Deno.test("a missing input rejects with MissingDataError naming the keys; the worker keeps its data", async () => {
  await using cluster = await startCluster(1);
  await using alice = rpc<WorkerOps>(cluster.workers[0].address);
  await alice.update_data({ data: { x: 1 } });
  const error = await alice.compute({
    key: "z",
    function: (x: number, y: number) => x + y,
    keys: ["x", "nope"],
  })
    .catch((e) => e);
  assert.ok(error instanceof RemoteError);
  assert.equal(error.remoteName, new MissingDataError([]).name);
  assert.match(error.message, /"nope"/);
  assert.deepEqual(await alice.get_data({ keys: ["x", "z"] }), { x: 1 });
});

Deno.test("a holder that fails is skipped for the next holder", async () => {
  await using cluster = await startCluster(3);
  const [aliceNode, bobNode, carolNode] = cluster.workers;
  await using alice = rpc<WorkerOps>(aliceNode.address);
  await using bob = rpc<WorkerOps>(bobNode.address);
  await using carol = rpc<WorkerOps>(carolNode.address);
  await bob.update_data({ data: { a: 7 } });
  await carol.update_data({ data: { a: 7 } });
  // Bob drops a behind the scheduler's back: the scheduler still lists him first or second.
  await bob.delete_data({ keys: ["a"], report: false });
  await using center = rpc<SchedulerOps>(cluster.scheduler.address);
  assert.equal((await center.who_has({ keys: ["a"] })).a.length, 2);
  await alice.compute({ key: "b", function: (a: number) => a * 6, keys: ["a"] });
  assert.equal((await alice.get_data({ keys: ["b"] })).b, 42);
});

Deno.test("a function that throws: the call rejects with name, message and stack; nothing is lost", async () => {
  await using cluster = await startCluster(1);
  await using alice = rpc<WorkerOps>(cluster.workers[0].address);
  await alice.update_data({ data: { x: new Float64Array([1, 2]) } });
  const error = await alice.compute({
    key: "bad",
    function: function explode() {
      throw new RangeError("too far");
    },
  }).catch((e) => e);
  assert.ok(error instanceof RemoteError);
  assert.equal(error.op, "compute");
  assert.equal(error.remoteName, "RangeError");
  assert.equal(error.message, "too far");
  assert.match(error.remoteStack, /explode/);
  assert.deepEqual([...(await alice.get_data({ keys: ["x"] })).x as Float64Array], [1, 2]);
  assert.deepEqual(await alice.keys(), ["x"]);
  assert.equal(await alice.ping(), "pong");
});

Deno.test("functions that cannot travel are refused at the sender with advice", async () => {
  await using cluster = await startCluster(1);
  await using alice = rpc<WorkerOps>(cluster.workers[0].address);
  await alice.update_data({ data: { x: 4 } });
  await assert.rejects(
    alice.compute({ key: "q", function: Math.sqrt, keys: ["x"] }),
    /built into the runtime/,
  );
  const bound = function (this: number, x: number) {
    return this + x;
  }.bind(1);
  await assert.rejects(alice.compute({ key: "q", function: bound, keys: ["x"] }), /bound function/);
  class Thing {}
  await assert.rejects(alice.compute({ key: "q", function: Thing as never, keys: ["x"] }), /class/);
  // A closure is refused by the sender: only the source would travel, without `outer`.
  const outer = 10;
  await assert.rejects(
    alice.compute({ key: "q", function: (x: number) => x + outer, keys: ["x"] }),
    /^TypeError: Cannot send an anonymous function: it reads outer, a variable from outside its own body/,
  );
  // A result that cannot be kept (a class instance) is refused, naming the path.
  const kept = await alice.compute({ key: "q", function: () => ({ when: new URL("http://x") }) }).catch((e) =>
    e
  );
  assert.match(kept.message, /q\.when: a URL instance cannot travel/);
  assert.deepEqual(await alice.keys(), ["x"]);
});

Deno.test("functions named by module are imported on the worker", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/lib.ts`;
    await Deno.writeTextFile(path, "export function mul(a: number, b: number): number { return a * b; }\n");
    // Tasks are sandboxed: importing a module from disk needs read access to it.
    await using cluster = await startCluster(1, { taskPermissions: { read: [dir] } });
    await using alice = rpc<WorkerOps>(cluster.workers[0].address);
    await alice.update_data({ data: { x: 6 } });
    const module = new URL(`file://${path}`).href;
    await alice.compute({ key: "y", function: { module, name: "mul" }, keys: ["x"], args: [7] });
    assert.equal((await alice.get_data({ keys: ["y"] })).y, 42);
    await assert.rejects(
      alice.compute({ key: "z", function: { module, name: "nope" } }),
      /no exported function "nope"/,
    );
    await assert.rejects(
      alice.compute({ key: "z", function: { module: `file://${dir}/missing.ts`, name: "f" } }),
      /Cannot import module/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
