/**
 * The nanny, with real processes: `dist worker` runs one by default. It starts a new
 * worker when the old one dies or passes its memory's terminate share, passes signals on
 * (SIGTERM still hands the keys over), and its worker does not outlive it.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, KilledWorkerError, rpc, type SchedulerOps, taskOptions, type WorkerOps } from "../mod.ts";
import type { NodeProcess } from "../client/spawn.ts";
import { eventually, processAlive as alive, Processes, processTree } from "./_helpers.ts";
import { clusterInfo } from "../client/info.ts";

/** A task that allocates 3 GiB, 64 MiB at a time, touching every page. */
const allocate3GiB = () => {
  const held: Uint8Array[] = [];
  for (let i = 0; i < 48; i++) held.push(new Uint8Array(64 * 1024 * 1024).fill(i + 1));
  return held.length;
};

/** The worker process under a nanny: its only child. */
async function workerPid(nanny: NodeProcess): Promise<number> {
  const below = (await processTree(nanny.child.pid)).slice(1);
  assert.ok(below.length >= 1, `the nanny ${nanny.child.pid} should have a worker process`);
  return below[0];
}

/** The scheduler's workers as name -> address. */
async function workersOf(scheduler: string): Promise<Map<string, string>> {
  await using s = rpc<SchedulerOps>(scheduler);
  return new Map((await s.workers()).map((w) => [w.name, w.address]));
}

Deno.test({
  name:
    "nanny: a worker killed by SIGKILL is back and registered in seconds; SIGTERM to the nanny hands its keys over, then both exit",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using nodes = new Processes();
    const scheduler = await nodes.spawn("scheduler", "--port", "0", "--no-dashboard");
    const alice = await nodes.spawn("worker", scheduler.address, "--name", "alice", "--nthreads", "1");
    await nodes.spawn("worker", scheduler.address, "--name", "bob", "--nthreads", "1", "--no-nanny");
    assert.equal((await workersOf(scheduler.address)).get("alice"), alice.address);
    const first = await workerPid(alice);
    assert.notEqual(first, alice.child.pid, "the worker runs in a process of its own");
    // --memory-limit auto: the node process may read the machine's memory (--allow-sys).
    await eventually(async () =>
      ((await clusterInfo(scheduler.address)).workers.find((w) => w.name === "alice")?.metrics.memory_limit ??
        0) > 0
    );

    const killedAt = performance.now();
    Deno.kill(first, "SIGKILL");
    await eventually(async () => {
      const address = (await workersOf(scheduler.address)).get("alice");
      return address !== undefined && address !== alice.address;
    }, 20_000);
    const backMs = performance.now() - killedAt;
    console.log(`a worker killed by SIGKILL registered again after ${backMs.toFixed(0)} ms`);
    await alice.waitForLog(/nanny alice: Worker process \d+ was killed by SIGKILL after/);
    const second = await workerPid(alice);
    assert.notEqual(second, first);
    assert.ok(!await alive(first));

    // What only the new alice holds moves to bob when the nanny is asked to stop.
    const aliceNow = (await workersOf(scheduler.address)).get("alice")!;
    {
      await using a = rpc<WorkerOps>(aliceNow);
      await a.update_data({ data: { only_alice: new Float64Array([1, 2, 3]) } });
    }
    alice.child.kill("SIGTERM");
    const status = await alice.status;
    assert.equal(status.code, 0, alice.log.join("\n"));
    assert.ok(!await alive(second), "the worker exits with its nanny");
    const workers = await workersOf(scheduler.address);
    assert.deepEqual([...workers.keys()], ["bob"]);
    await using s = rpc<SchedulerOps>(scheduler.address);
    assert.deepEqual((await s.who_has({ keys: ["only_alice"] })).only_alice, [workers.get("bob")]);
    // Stopped on purpose: no new worker was started.
    assert.ok(!alice.log.some((l) => /started again/.test(l) && /WARN/.test(l)), alice.log.join("\n"));
  },
});

Deno.test({
  name:
    "nanny: a task that allocates 3 GiB on a 512 MiB worker gets it restarted, fails with KilledWorker after --allowed-failures, and the rest completes",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using nodes = new Processes();
    const scheduler = await nodes.spawn(
      "scheduler",
      "--port",
      "0",
      "--no-dashboard",
      "--allowed-failures",
      "1",
    );
    const workers = await Promise.all(
      ["alice", "bob"].map((name) =>
        nodes.spawn(
          "worker",
          scheduler.address,
          "--name",
          name,
          "--nthreads",
          "1",
          "--memory-limit",
          "512MiB",
        )
      ),
    );
    await using client = await Client.connect(scheduler.address);
    const hog = client.submit(allocate3GiB, taskOptions({ key: "hog", workers: ["alice"] }));
    // Bob's work goes on meanwhile (a death counts against every task its worker held).
    const rest = client.map(
      (x: number) => x * x,
      Array.from({ length: 20 }, (_, i) => i),
      taskOptions({ workers: ["bob"] }),
    );
    await assert.rejects(hog.result(), (error: Error) => {
      assert.ok(error instanceof KilledWorkerError, `${error.name}: ${error.message}`);
      assert.match(error.message, /hog/);
      return true;
    });
    assert.deepEqual(await client.gather(rest), Array.from({ length: 20 }, (_, i) => i * i));
    // allowed-failures 1: the task ended alice twice, and her nanny started her again each time.
    const kills = () =>
      workers.flatMap((w) => w.log.filter((l) => /closed past its memory's terminate share/.test(l)));
    await eventually(
      async () => kills().length === 2 && (await workersOf(scheduler.address)).size === 2,
      20_000,
    );
    assert.equal(kills().length, 2, workers.map((w) => w.log.join("\n")).join("\n---\n"));
    assert.ok(kills().every((l) => l.includes("nanny alice")));
    // The new workers take work.
    assert.equal(await client.submit((x: number) => x + 1, 41).result(), 42);
  },
});

Deno.test({
  name:
    "nanny: a nanny killed by SIGKILL takes its worker with it, and so does a script that started Client.local",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using nodes = new Processes();
    const scheduler = await nodes.spawn("scheduler", "--port", "0", "--no-dashboard");
    const alice = await nodes.spawn("worker", scheduler.address, "--name", "alice");
    const worker = await workerPid(alice);
    alice.child.kill("SIGKILL");
    await alice.status;
    // The worker saw its stdin close, handed over what it held and left.
    await eventually(async () => !await alive(worker), 20_000);
    assert.equal((await workersOf(scheduler.address)).size, 0);

    // A script that starts a local cluster, then is killed: its nannies and workers stop too.
    const script = `
      import { Client } from ${JSON.stringify(new URL("../mod.ts", import.meta.url).href)};
      const client = await Client.local({ workers: 2, dashboardPort: null });
      console.log(String(Deno.pid));
      setInterval(() => {}, 1_000); // busy with work of its own until it is killed
    `;
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--unstable-worker-options", "-"],
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(script));
    await writer.close();
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let out = "";
    while (!out.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) break;
      out += value;
    }
    const below = (await processTree(child.pid)).slice(1);
    assert.ok(below.length >= 4, `2 nannies and 2 workers under the script: ${below}`);
    child.kill("SIGKILL");
    await child.status;
    await reader.cancel();
    const started = performance.now();
    await eventually(async () => (await Promise.all(below.map(alive))).every((a) => !a), 20_000);
    console.log(
      `the script's nodes all exited ${(performance.now() - started).toFixed(0)} ms after it was killed`,
    );
  },
});

Deno.test({
  name:
    "memory: a task in an executor process that allocates 3 GiB gets its executor stopped, not its worker, and fails with KilledWorker",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using nodes = new Processes();
    const scheduler = await nodes.spawn(
      "scheduler",
      "--port",
      "0",
      "--no-dashboard",
      "--allowed-failures",
      "1",
    );
    const alice = await nodes.spawn(
      "worker",
      scheduler.address,
      ...["--name", "alice", "--nthreads", "1", "--memory-limit", "512MiB", "--isolation", "process"],
    );
    const worker = await workerPid(alice);
    await using client = await Client.connect(scheduler.address);
    const [kept] = await client.scatter([new Float64Array([1, 2, 3])]);
    const hog = client.submit(allocate3GiB, taskOptions({ key: "hog" }));
    await assert.rejects(hog.result(), (error: Error) => {
      assert.ok(error instanceof KilledWorkerError, `${error.name}: ${error.message}`);
      return true;
    });
    const stops = alice.log.filter((l) => /Stopped an executor process holding/.test(l));
    assert.equal(stops.length, 2, alice.log.join("\n"));
    // The same worker process, with its data, still registered and working.
    assert.equal(await workerPid(alice), worker);
    assert.ok(!alice.log.some((l) => /starting a new one/.test(l)), alice.log.join("\n"));
    assert.deepEqual(await kept.result(), new Float64Array([1, 2, 3]));
    assert.equal(await client.submit((x: number) => x + 1, 41).result(), 42);
  },
});
