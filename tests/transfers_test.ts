import assert from "node:assert/strict";
import { BusyError, Client, rpc, taskOptions, type WorkerOps } from "../mod.ts";
import { eventually, startCluster } from "./_helpers.ts";
import { Encoder } from "../protocol/codec.ts";
import { frameHeader } from "../protocol/framing.ts";
import { openComm } from "../protocol/handshake.ts";
import { fetchData, Holders } from "../protocol/fetch.ts";
import type { Comm } from "../protocol/comm.ts";
import { delay } from "../util/time.ts";
import { parseAddress } from "../protocol/address.ts";

const MIB = 1024 * 1024;

Deno.test("a worker sends at most transfersOutMax large values at once; more get BusyError, small ones never", async () => {
  await using cluster = await startCluster(1, { transfersOutMax: 1 });
  const address = cluster.workers[0].address;
  await using setup = rpc<WorkerOps>(address);
  const big = new Uint8Array(64 * MIB).fill(7);
  await setup.update_data({ data: { big, small: new Uint8Array(1000) } });

  await using a = rpc<WorkerOps>(address);
  await using b = rpc<WorkerOps>(address);
  await using c = rpc<WorkerOps>(address);
  const [first, second, small] = await Promise.allSettled([
    a.get_data({ keys: ["big"] }),
    b.get_data({ keys: ["big"] }),
    c.get_data({ keys: ["small"] }),
  ]);
  assert.equal(first.status, "fulfilled");
  assert.equal((first.value.big as Uint8Array).byteLength, 64 * MIB);
  assert.equal(small.status, "fulfilled", "a small value is served while a large one is sent");
  assert.equal(second.status, "rejected");
  const error = second.reason as BusyError;
  assert.ok(error instanceof BusyError);
  assert.match(error.message, /Busy: .* sends 1 large values already; ask again later/);
  // Once the first reply has left, the slot is free again.
  const again = await b.get_data({ keys: ["big"] });
  assert.equal((again.big as Uint8Array)[64 * MIB - 1], 7);
});

Deno.test("fetchers turned away busy ask again after the Holders pause, and all get their values", async () => {
  await using cluster = await startCluster(1, { transfersOutMax: 1 });
  const address = cluster.workers[0].address;
  await using setup = rpc<WorkerOps>(address);
  await setup.update_data({ data: { big: new Float64Array(4 * MIB).fill(1.5) } });
  const comms = await Promise.all([0, 1, 2].map(() => openComm(parseAddress(address))));
  try {
    let busy = 0;
    // Each fetcher follows the Holders policy: turned away busy, it asks again after its pause.
    const fetch = async (comm: Comm) => {
      const holders = new Holders();
      holders.learn("big", [address]);
      for (;;) {
        const now = performance.now();
        if (holders.choose(["big"], now).size === 0) {
          await delay(holders.wakeAt(now)! - now);
          continue;
        }
        try {
          return await fetchData(comm, ["big"]);
        } catch (error) {
          if (!(error instanceof BusyError)) throw error;
          busy++;
          holders.busy(address, ["big"], performance.now());
        }
      }
    };
    const got = await Promise.all(comms.map(fetch));
    for (const g of got) assert.equal((g.big as Float64Array)[4 * MIB - 1], 1.5);
    assert.ok(busy >= 1, "three fetches at once from a worker that sends one at a time");
  } finally {
    for (const comm of comms) comm.close();
  }
});

Deno.test("with one large transfer at a time, peers and clients fetching at once all get the value", async () => {
  await using cluster = await startCluster(3, { transfersOutMax: 1 });
  const [alice] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  const [big] = await client.scatter([new Float64Array(2 * MIB).fill(2)], { workers: [alice.address] });
  const sum = (a: Float64Array) => a.reduce((s, x) => s + x, 0);
  // Bob and carol both need alice's value at once, and the client gathers it twice meanwhile.
  const sums = ["bob", "carol"].map((w) =>
    client.submit(sum, big, taskOptions({ workers: [w], pure: false })).result()
  );
  const gathered = [client.gather(big), client.gather(big)];
  for (const s of await Promise.all(sums)) assert.equal(s, 4 * MIB);
  for (const g of await Promise.all(gathered)) assert.equal((g as Float64Array).length, 2 * MIB);
});

/** The value of one sample in a worker's /metrics text. */
async function metric(url: string, sample: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${sample} `));
  assert.ok(line, `no sample ${sample} in ${url}/metrics`);
  return Number(line.split(" ")[1]);
}

/**
 * Asks the worker at `address` for `key` and never reads the reply: its one large-transfer
 * slot (transfersOutMax 1) stays taken until the returned connection closes.
 */
async function takeTheSlot(address: string, key: string): Promise<Deno.Conn> {
  const { host, port } = parseAddress(address);
  const stalled = await Deno.connect({ hostname: host, port });
  try {
    const { head } = new Encoder().encode({ op: "get_data", id: 1, args: { keys: [key] } }, "args");
    await stalled.write(new Uint8Array([...frameHeader([head]), ...head]));
    await using a = rpc<WorkerOps>(address);
    await eventually(() => a.get_data({ keys: [key] }).then(() => false, (e) => e instanceof BusyError));
    return stalled;
  } catch (error) {
    stalled.close();
    throw error;
  }
}

Deno.test("a worker told busy fetches from another holder at once instead of waiting", async () => {
  await using cluster = await startCluster(3, { transfersOutMax: 1, httpPort: 0 });
  const [alice, bob, carol] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  const bigs = await client.scatter([new Float64Array(4 * MIB).fill(1), new Float64Array(4 * MIB).fill(2)], {
    workers: [alice.address],
  });
  const length = (a: Float64Array) => a.length;
  // Bob takes copies: now alice and bob hold both.
  for (const big of bigs) {
    assert.equal(
      await client.submit(length, big, taskOptions({ workers: ["bob"], pure: false })).result(),
      4 * MIB,
    );
    assert.ok(bob.data.has(big.key));
  }

  const stalled = await takeTheSlot(alice.address, bigs[0].key);
  try {
    const servedBefore = await metric(alice.httpUrl!, 'dist_worker_busy_total{side="served"}');
    // Carol needs both, for two tasks: a worker asks a peer one fetch at a time and picks
    // a holder at random, so one of them is asked of alice, who says busy; carol takes
    // bob's copy. Waiting out alice would take until the stalled peer goes (the end of
    // this test).
    const started = Date.now();
    const got = await Promise.all(
      bigs.map((big) =>
        client.submit(length, big, taskOptions({ workers: ["carol"], pure: false })).result()
      ),
    );
    assert.deepEqual(got, [4 * MIB, 4 * MIB]);
    assert.ok(Date.now() - started < 10_000, `carol took ${Date.now() - started} ms`);
    for (const big of bigs) assert.ok(carol.data.has(big.key));
    const served = await metric(alice.httpUrl!, 'dist_worker_busy_total{side="served"}') - servedBefore;
    const waited = await metric(carol.httpUrl!, 'dist_worker_busy_total{side="waited"}');
    assert.ok(
      served >= 1 && waited === served,
      `alice said busy ${served} times, carol heard it ${waited} times`,
    );
  } finally {
    stalled.close();
  }
});

Deno.test("a client told busy gathers from another holder it knows of instead of waiting", async () => {
  await using cluster = await startCluster(2, { transfersOutMax: 1 });
  const [alice] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  // On both workers: the client learns both holders.
  const [big] = await client.scatter([new Float64Array(4 * MIB).fill(1)], { broadcast: true });
  const stalled = await takeTheSlot(alice.address, big.key);
  try {
    // Each gather picks a holder at random; one that meets busy alice must turn to bob,
    // since waiting her out would last until the stalled peer goes (the end of this test).
    for (let i = 0; i < 8; i++) {
      const started = Date.now();
      const value = await client.gather(big) as Float64Array;
      assert.equal(value.length, 4 * MIB);
      assert.ok(Date.now() - started < 10_000, `gather ${i} took ${Date.now() - started} ms`);
    }
  } finally {
    stalled.close();
  }
});

Deno.test("a client told busy looks up where else the value is, then gathers it there", async () => {
  await using cluster = await startCluster(2, { transfersOutMax: 1 });
  const [alice, bob] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  // The client knows alice only; bob takes a copy for a task of his.
  const [big] = await client.scatter([new Float64Array(4 * MIB).fill(1)], { workers: [alice.address] });
  const length = (a: Float64Array) => a.length;
  await client.submit(length, big, taskOptions({ workers: ["bob"], pure: false })).result();
  assert.ok(bob.data.has(big.key));
  const stalled = await takeTheSlot(alice.address, big.key);
  try {
    const started = Date.now();
    const value = await client.gather(big) as Float64Array;
    assert.equal(value.length, 4 * MIB);
    assert.ok(Date.now() - started < 10_000, `the gather took ${Date.now() - started} ms`);
  } finally {
    stalled.close();
  }
});

Deno.test("transfers: tasks on one worker that need the same input fetch it once", async () => {
  await using cluster = await startCluster(2, { httpPort: 0, nthreads: 4 });
  const [alice, bob] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  const bytes = 32_000_000;
  const [big] = await client.scatter([new Float64Array(bytes / 8).fill(2)], { workers: [alice.address] });
  const before = await metric(bob.httpUrl!, 'dist_worker_transferred_bytes_total{direction="in"}');
  // Four tasks at once on bob, each needing the value only alice holds.
  const sums = Array.from(
    { length: 4 },
    (_, i) =>
      client.submit(
        (a: Float64Array, k: number) => a[0] * a.length + k,
        big,
        i,
        taskOptions({ workers: [bob.address] }),
      ),
  );
  assert.deepEqual(await client.gather(sums), [0, 1, 2, 3].map((k) => 2 * (bytes / 8) + k));
  const fetched = await metric(bob.httpUrl!, 'dist_worker_transferred_bytes_total{direction="in"}') - before;
  assert.ok(
    fetched >= bytes && fetched < 2 * bytes,
    `bob fetched ${fetched} bytes for one ${bytes}-byte input`,
  );
});
