/**
 * Values that together pass the frame limit are fetched in parts, each of which fits:
 * worker to worker, and worker to client.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, RemoteError, rpc, taskOptions, type WorkerOps } from "../mod.ts";
import { startCluster } from "./_helpers.ts";
import type { DataPart } from "../protocol/ops.ts";

const KIB = 1024;
/** The nodes' frame (and message) limit here: small, so a few values pass it. */
const LIMIT_BYTES = 1024 * KIB;

Deno.test("a worker needing several values that together pass the frame limit fetches them in parts", async () => {
  await using cluster = await startCluster(2, { frameBytesMax: LIMIT_BYTES });
  const [alice, bob] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address, { frameBytesMax: LIMIT_BYTES });
  // Each fits alone; the two, or the twenty, do not.
  const big = [];
  for (let i = 0; i < 2; i++) {
    big.push(...await client.scatter([new Float64Array(75 * KIB).fill(i + 1)], { workers: [alice.address] }));
  }
  const small = await client.scatter(
    Array.from({ length: 20 }, (_, i) => new Uint8Array(100 * KIB).fill(i)),
    { workers: [alice.address] },
  );
  const total = (...xs: ArrayLike<number>[]) => xs.reduce((s, x) => s + x[0] * x.length, 0);
  const onBob = client.submit(total, ...big, ...small, taskOptions({ workers: ["bob"], pure: false }));
  const expected = 75 * KIB * 3 + 100 * KIB * (19 * 20 / 2);
  assert.equal(await onBob.result(), expected);
  for (const f of [...big, ...small]) assert.ok(bob.data.has(f.key), `bob fetched ${f.key}`);
});

Deno.test("a client gathers values that together pass the frame limit in parts", async () => {
  await using cluster = await startCluster(1, { frameBytesMax: LIMIT_BYTES });
  const [alice] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address, { frameBytesMax: LIMIT_BYTES });
  const futures = [];
  for (let i = 0; i < 3; i++) {
    const [f] = await client.scatter([new Uint8Array(600 * KIB).fill(i + 1).buffer], {
      workers: [alice.address],
    });
    futures.push(f);
  }
  const values = await client.gather(futures) as ArrayBuffer[];
  values.forEach((v, i) => {
    assert.ok(v instanceof ArrayBuffer);
    assert.equal(v.byteLength, 600 * KIB);
    assert.equal(new Uint8Array(v)[600 * KIB - 1], i + 1);
  });
});

Deno.test("get_data with bytes_max answers the values that fit and names the rest; one value past the limit still fails clearly", async () => {
  await using cluster = await startCluster(1, { frameBytesMax: LIMIT_BYTES });
  await using alice = rpc<WorkerOps>(cluster.workers[0].address, { frameBytesMax: LIMIT_BYTES });
  for (const key of ["a", "b", "c"]) {
    await alice.update_data({ data: { [key]: new Uint8Array(400 * KIB).fill(key.charCodeAt(0)) } });
  }
  const part = await alice.get_data({
    keys: ["a", "nope", "b", "c"],
    bytes_max: LIMIT_BYTES,
  }) as unknown as DataPart;
  assert.deepEqual(Object.keys(part.data), ["a", "b"]);
  assert.deepEqual(part.rest, ["c"], "a key it lacks is in neither");
  const next = await alice.get_data({ keys: part.rest, bytes_max: LIMIT_BYTES }) as unknown as DataPart;
  assert.deepEqual(Object.keys(next.data), ["c"]);
  assert.deepEqual(next.rest, []);
  // Without bytes_max, the old reply: all at once, or a clear error.
  await assert.rejects(
    alice.get_data({ keys: ["a", "b", "c"] }),
    (e) => e instanceof RemoteError && /over the limit of 1048576/.test(e.message),
  );
});
