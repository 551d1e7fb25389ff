import assert from "node:assert/strict";
import { rpc, type SchedulerOps, type WorkerOps } from "../mod.ts";
import { startScheduler, startWorker } from "../node.ts";
import { SchedulerTasks } from "../scheduler/tasks.ts";
import { eventually, startCluster, testLogger } from "./_helpers.ts";

Deno.test("state: workers, keys, replicas and sizes", () => {
  const s = new SchedulerTasks();
  s.addWorker({ address: "tcp://a:1", name: "a", nthreads: 2, keys: ["x"], nbytes: { x: 8 } });
  s.addWorker({ address: "tcp://b:1" });
  s.addKeys("tcp://b:1", ["x", "y"], { x: 8, y: 100 });
  assert.deepEqual(s.whoHasOf(["x", "y", "z"]), { x: ["tcp://a:1", "tcp://b:1"], y: ["tcp://b:1"], z: [] });
  assert.deepEqual(s.hasWhatOf(), { "tcp://a:1": ["x"], "tcp://b:1": ["x", "y"] });
  assert.deepEqual(s.ncores(), { "tcp://a:1": 2, "tcp://b:1": 1 });
  assert.deepEqual(s.workerList().map((w) => [w.name, w.nkeys, w.nbytes]), [["a", 1, 8], [
    "tcp://b:1",
    2,
    108,
  ]]);
  // Re-adding a key does not count its bytes twice.
  s.addKeys("tcp://b:1", ["y"], { y: 100 });
  assert.equal(s.workers.get("tcp://b:1")!.nbytes, 108);
  s.removeKeys("tcp://a:1", ["x", "never-had"]);
  assert.deepEqual(s.whoHasOf(["x"]), { x: ["tcp://b:1"] });
  assert.equal(s.workers.get("tcp://a:1")!.nbytes, 0);
  assert.throws(
    () => s.addKeys("tcp://nobody:1", ["k"]),
    /Unknown worker tcp:\/\/nobody:1: it must register first/,
  );
});

Deno.test("state: removing a worker reports the keys that lost their last copy", () => {
  const s = new SchedulerTasks();
  s.addWorker({ address: "tcp://a:1", keys: ["shared", "only-a"] });
  s.addWorker({ address: "tcp://b:1", keys: ["shared"] });
  assert.deepEqual(s.removeWorker("tcp://a:1"), ["only-a"]);
  assert.deepEqual(s.whoHasOf(), { shared: ["tcp://b:1"] });
  assert.deepEqual(s.removeWorker("tcp://a:1"), []);
  // A worker that registers again replaces its old record, keys and all.
  s.addWorker({ address: "tcp://b:1", keys: ["new"] });
  assert.deepEqual(s.whoHasOf(), { new: ["tcp://b:1"] });
});

Deno.test("state: deleting keys returns which worker must delete what", () => {
  const s = new SchedulerTasks();
  s.addWorker({ address: "tcp://a:1", keys: ["x", "y"] });
  s.addWorker({ address: "tcp://b:1", keys: ["x"] });
  const orders = s.deleteKeys(["x", "y", "unknown"]);
  assert.deepEqual(Object.fromEntries(orders), { "tcp://a:1": ["x", "y"], "tcp://b:1": ["x"] });
  assert.deepEqual(s.whoHasOf(), {});
  assert.equal(s.tasks.size, 0);
});

Deno.test("register records the keys a worker already holds, tied to its connection", async () => {
  await using cluster = await startCluster(0);
  await using center = rpc<SchedulerOps>(cluster.scheduler.address);
  await using fake = rpc<SchedulerOps>(cluster.scheduler.address);
  await fake.register({
    address: "tcp://10.0.0.9:4000",
    name: "ghost",
    nthreads: 4,
    keys: ["k"],
    nbytes: { k: 12 },
  });
  assert.deepEqual(await center.who_has({ keys: ["k"] }), { k: ["tcp://10.0.0.9:4000"] });
  const [ghost, ...others] = await center.workers();
  assert.deepEqual(others, []);
  assert.deepEqual(
    {
      address: ghost.address,
      name: ghost.name,
      nthreads: ghost.nthreads,
      nkeys: ghost.nkeys,
      nbytes: ghost.nbytes,
    },
    { address: "tcp://10.0.0.9:4000", name: "ghost", nthreads: 4, nkeys: 1, nbytes: 12 },
  );
  assert.equal(ghost.processing, 0);
  assert.ok(ghost.last_seen >= 0 && ghost.last_seen < 5);
  // The registration lives as long as the connection it came on.
  await fake.close();
  await eventually(async () => Object.keys(await center.ncores()).length === 0);
  assert.deepEqual(await center.who_has(), {});
});

Deno.test("scheduler ops: has_what, ncores, identity, unregister, delete_data, broadcast", async () => {
  await using cluster = await startCluster(2);
  const [aliceNode, bobNode] = cluster.workers;
  await using center = rpc<SchedulerOps>(cluster.scheduler.address);
  await using alice = rpc<WorkerOps>(aliceNode.address);
  await using bob = rpc<WorkerOps>(bobNode.address);
  await alice.update_data({ data: { x: 1, y: 2 } });
  await bob.update_data({ data: { x: 1 } });

  assert.deepEqual(await center.has_what({ workers: [aliceNode.address] }), {
    [aliceNode.address]: ["x", "y"],
  });
  assert.deepEqual(await center.ncores(), { [aliceNode.address]: 1, [bobNode.address]: 1 });
  const identity = await center.identity();
  assert.equal(identity.type, "scheduler");
  assert.equal(identity.address, cluster.scheduler.address);
  assert.equal(identity.workers, 2);
  assert.equal(await center.ping(), "pong");

  const pings = await center.broadcast({ msg: { op: "ping" } });
  assert.deepEqual(pings, { [aliceNode.address]: "pong", [bobNode.address]: "pong" });
  const keys = await center.broadcast({ msg: { op: "keys" }, workers: [bobNode.address] });
  assert.deepEqual(keys, { [bobNode.address]: ["x"] });
  await assert.rejects(center.broadcast({ msg: { op: "nope" } }), /Worker tcp:\/\/.*Unknown op "nope"/);

  // delete_data drops the metadata and tells every holder to delete.
  await center.delete_data({ keys: ["x"] });
  assert.deepEqual(await center.who_has({ keys: ["x", "y"] }), { x: [], y: [aliceNode.address] });
  assert.deepEqual(await alice.keys(), ["y"]);
  assert.deepEqual(await bob.keys(), []);

  await center.unregister({ address: bobNode.address });
  assert.deepEqual(Object.keys(await center.ncores()), [aliceNode.address]);
});

Deno.test("worker delete_data and update_data report to the scheduler unless told not to", async () => {
  await using cluster = await startCluster(1);
  const address = cluster.workers[0].address;
  await using center = rpc<SchedulerOps>(cluster.scheduler.address);
  await using alice = rpc<WorkerOps>(address);
  assert.deepEqual(await alice.update_data({ data: { a: "hello", b: [1, 2] } }), {
    status: "OK",
    nbytes: { a: 6, b: 3 },
  });
  await alice.update_data({ data: { quiet: 1 }, report: false });
  assert.deepEqual(await center.has_what(), { [address]: ["a", "b"] });
  await alice.delete_data({ keys: ["a", "absent"] });
  assert.deepEqual(await center.has_what(), { [address]: ["b"] });
  await alice.delete_data({ keys: ["b"], report: false });
  assert.deepEqual(await center.has_what(), { [address]: ["b"] });
  assert.deepEqual(await alice.keys(), ["quiet"]);
});

Deno.test("terminate closes a worker (which unregisters) and a scheduler", async () => {
  const cluster = await startCluster(1);
  try {
    await using center = rpc<SchedulerOps>(cluster.scheduler.address);
    await using alice = rpc<WorkerOps>(cluster.workers[0].address);
    assert.deepEqual(await alice.terminate(), { status: "OK" });
    await cluster.workers[0].closed;
    assert.deepEqual(await center.ncores(), {});
    assert.deepEqual(await center.terminate(), { status: "OK" });
    await cluster.scheduler.closed;
  } finally {
    await cluster.close();
  }
});

Deno.test("a worker whose scheduler goes away re-registers with its keys when one returns", async () => {
  const first = await startCluster(0);
  const port = Number(first.scheduler.address.split(":").pop());
  const worker = await startWorker({
    scheduler: first.scheduler.address,
    log: testLogger("w"),
    nthreads: 1,
    deathTimeoutMs: 10_000,
  });
  try {
    await using w = rpc<WorkerOps>(worker.address);
    await w.update_data({ data: { kept: 42 } });
    await first.close();
    const second = await startScheduler({ port, log: testLogger("s2") });
    try {
      await using center = rpc<SchedulerOps>(second.address);
      await eventually(async () => (await center.who_has({ keys: ["kept"] })).kept.length === 1, 10_000);
      assert.deepEqual(await center.who_has({ keys: ["kept"] }), { kept: [worker.address] });
    } finally {
      await worker.close();
      await second.close();
    }
  } finally {
    await worker.close();
  }
});

Deno.test("broadcast refuses the worker's scheduler-only ops: a client cannot rebind a function id behind the scheduler", async () => {
  await using cluster = await startCluster(1);
  const { Client } = await import("../mod.ts");
  await using client = await Client.connect(cluster.scheduler.address);
  const double = (x: number) => 2 * x;
  assert.equal(await client.submit(double, 1).result(), 2);
  await using s = rpc<SchedulerOps>(cluster.scheduler.address);
  // The scheduler's function ids start at 1: relayed on its own connection, this would pass
  // for the scheduler's and bind them to another function on the worker.
  for (let fnId = 1; fnId <= 4; fnId++) {
    await assert.rejects(
      s.broadcast({
        msg: {
          op: "compute_task",
          args: {
            key: `evil-${fnId}`,
            fn_id: fnId,
            function: { source: "() => 'evil'" },
            args: [],
            who_has: {},
          },
        },
      }),
      /Cannot broadcast compute_task: only the scheduler sends it to its workers/,
    );
  }
  for (const op of ["free_keys", "cancel_task", "gather_keys"]) {
    await assert.rejects(s.broadcast({ msg: { op, args: {} } }), new RegExp(`Cannot broadcast ${op}`));
  }
  assert.equal(await client.submit(double, 21).result(), 42);
  // Other ops still go out.
  assert.deepEqual(await s.broadcast({ msg: { op: "ping" } }), { [cluster.workers[0].address]: "pong" });
});

Deno.test("placement: a worker reports a task's run, not its wait, so tiny tasks that waited still go ahead by the hundred", async () => {
  await using cluster = await startCluster(1);
  const { Client } = await import("../mod.ts");
  await using client = await Client.connect(cluster.scheduler.address);
  await using s = rpc<SchedulerOps>(cluster.scheduler.address);
  const tiny = (x: number) => x + 1;
  const nap = async (ms: number) => {
    await new Promise((resolve) => setTimeout(resolve, ms));
    return ms;
  };
  const napAgain = async (ms: number) => {
    await new Promise((resolve) => setTimeout(resolve, ms));
    return ms;
  };
  // Twenty tiny tasks wait ~300 ms behind a nap on the only thread: each runs for
  // microseconds. Counted by their wait, the kind would take 300 ms and go one at a time.
  const first = client.submit(nap, 300);
  const warm = client.map(tiny, Array.from({ length: 20 }, (_, i) => i));
  assert.deepEqual(await Promise.all(warm.map((f) => f.result())), warm.map((_, i) => i + 1));
  assert.equal(await first.result(), 300);
  // Another nap (a kind not seen yet) holds the thread: the tiny tasks sent behind it fill
  // WORKER_AHEAD_MS at TASK_OVERHEAD_US each, ~480 of them (32 before the work was counted).
  const second = client.submit(napAgain, 3_000);
  const many = client.map(tiny, Array.from({ length: 1_000 }, (_, i) => 100 + i));
  let seen = 0;
  await eventually(async () => {
    seen = Math.max(seen, (await s.workers())[0].processing);
    return seen >= 400;
  }, 2_500).catch(() => assert.fail(`the worker held at most ${seen} tasks while the nap ran`));
  assert.equal(await second.result(), 3_000);
  assert.deepEqual(await Promise.all(many.map((f) => f.result())), many.map((_, i) => 101 + i));
});
