import assert from "node:assert/strict";
import { Client, RemoteError, rpc, taskOptions, type WorkerOps } from "../mod.ts";
import { startCluster } from "./_helpers.ts";
import { openComm } from "../protocol/handshake.ts";
import { fetchData } from "../protocol/fetch.ts";
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
  const error = second.reason as RemoteError;
  assert.ok(error instanceof RemoteError);
  assert.equal(error.remoteName, "BusyError");
  assert.match(error.message, /Busy: .* sends 1 large values already; ask again later/);
  // Once the first reply has left, the slot is free again.
  const again = await b.get_data({ keys: ["big"] });
  assert.equal((again.big as Uint8Array)[64 * MIB - 1], 7);
});

Deno.test("fetches wait out a busy worker and all get their values", async () => {
  await using cluster = await startCluster(1, { transfersOutMax: 1 });
  const address = cluster.workers[0].address;
  await using setup = rpc<WorkerOps>(address);
  await setup.update_data({ data: { big: new Float64Array(4 * MIB).fill(1.5) } });
  const comms = await Promise.all([0, 1, 2].map(() => openComm(parseAddress(address))));
  try {
    let busy = 0;
    const got = await Promise.all(comms.map((comm) => fetchData(comm, ["big"], { onBusy: () => busy++ })));
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
