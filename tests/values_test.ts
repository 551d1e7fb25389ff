/**
 * Every kind of value the README lists travels any number of hops, small and large
 * (large binary values land in a worker's shared memory), and comes back the type it
 * was sent as.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, taskOptions } from "../mod.ts";
import { startCluster } from "./_helpers.ts";

const KIB = 1024;

/** Bytes of a large value: past the 64 KiB from which frames land in shared memory. */
const LARGE_BYTES = 70 * KIB;

function ramp(n: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 7 + 3) & 0xff;
  return out;
}

/** Each kind, small and large, by name. */
function values(): Record<string, unknown> {
  const out: Record<string, unknown> = {
    null: null,
    boolean: true,
    number: 1.5,
    string: "héllo",
    "string large": "x".repeat(LARGE_BYTES),
    array: [1, "two", [3]],
    object: { a: 1, b: { c: "d" } },
    bigint: 2n ** 70n,
    date: new Date(1_700_000_000_123),
    map: new Map<unknown, unknown>([["a", 1], [2, "b"]]),
    set: new Set([1, "two"]),
    // Past 64 KiB of msgpack head: the head itself lands in shared memory.
    "array large": Array.from({ length: 20_000 }, (_, i) => i * 1.5),
    "object large": Object.fromEntries(Array.from({ length: 5_000 }, (_, i) => [`k${i}`, i])),
    "map large": new Map(Array.from({ length: 5_000 }, (_, i) => [`k${i}`, [i, 2n ** BigInt(i % 80)]])),
    "set large": new Set(Array.from({ length: 10_000 }, (_, i) => `s${i}`)),
    "dates large": Array.from({ length: 8_000 }, (_, i) => new Date(1_700_000_000_000 + i)),
  };
  const ctors = [
    Uint8Array,
    Int8Array,
    Uint8ClampedArray,
    Int16Array,
    Uint16Array,
    Int32Array,
    Uint32Array,
    Float32Array,
    Float64Array,
    BigInt64Array,
    BigUint64Array,
  ];
  for (const [size, bytes] of [["small", 64], ["large", LARGE_BYTES]] as const) {
    for (const ctor of ctors) {
      out[`${ctor.name} ${size}`] = new (ctor as Float64ArrayConstructor)(ramp(bytes).buffer);
    }
    out[`ArrayBuffer ${size}`] = ramp(bytes).buffer;
    // A view that does not start at its buffer's start keeps its class and contents.
    out[`Float64Array view ${size}`] = new Float64Array(ramp(bytes + 16).buffer, 8, bytes / 8);
    out[`ArrayBuffer in a Map ${size}`] = new Map([["buf", ramp(bytes).buffer]]);
    out[`ArrayBuffer in a Set ${size}`] = new Set([ramp(bytes).buffer]);
    out[`nested ${size}`] = { list: [ramp(bytes).buffer, new Int16Array(ramp(bytes).buffer)] };
  }
  return out;
}

Deno.test("every kind of value, small and large, travels client, worker, worker, executor, worker, client as itself", async () => {
  await using cluster = await startCluster(3);
  const [alice, bob, carol] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  const sent = values();
  const names = Object.keys(sent);
  const scattered = await client.scatter(names.map((n) => sent[n]), { workers: [alice.address] });
  const same = <T>(v: T) => v;
  // Alice -> bob (fetched for a task; the executor hands it back), bob -> carol the same way.
  const onBob = scattered.map((f) => client.submit(same, f, taskOptions({ workers: ["bob"], pure: false })));
  const onCarol = onBob.map((f) => client.submit(same, f, taskOptions({ workers: ["carol"], pure: false })));
  const [direct, hopped] = await Promise.all([client.gather(scattered), client.gather(onCarol)]);
  assert.ok(bob.data.size >= names.length && carol.data.size >= names.length, "the tasks ran where told");
  assert.ok(alice.data.size >= names.length);
  names.forEach((name, i) => {
    assert.deepStrictEqual(direct[i], sent[name], `${name}, gathered from the worker it was scattered to`);
    assert.deepStrictEqual(hopped[i], sent[name], `${name}, after three more hops`);
  });
  // Inside a task too: an ArrayBuffer is an ArrayBuffer, a typed array keeps its class.
  const kind = (v: unknown) => Object.prototype.toString.call(v);
  const kinds = await client.gather(
    onBob.map((f) => client.submit(kind, f, taskOptions({ workers: ["carol"], pure: false }))),
  );
  names.forEach((name, i) => assert.equal(kinds[i], kind(sent[name]), `${name} inside a task`));
});

Deno.test("a small view of a large buffer counts the whole buffer it keeps alive in nbytes", async () => {
  await using cluster = await startCluster(1, { httpPort: 0 });
  const [alice] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  const MIB = 1024 * KIB;
  const view = client.submit(() => new Uint8Array(8 * 1024 * 1024).fill(5).subarray(0, 8));
  const nested = client.submit(() => {
    const big = new Float64Array(1024 * 1024);
    return { head: big.subarray(0, 1), tail: big.subarray(-1) };
  });
  const [v, n] = await client.gather([view, nested]) as [Uint8Array, { head: Float64Array }];
  assert.deepEqual(v, new Uint8Array(8).fill(5), "the value is the view");
  assert.equal(n.head.length, 1);
  const sizes = alice.data.nbytes([view.key, nested.key]);
  assert.ok(sizes[view.key] >= 8 * MIB, `the view counts ${sizes[view.key]} bytes`);
  assert.ok(
    sizes[nested.key] >= 8 * MIB && sizes[nested.key] < 9 * MIB,
    `the pair counts ${sizes[nested.key]}`,
  );
  const text = await (await fetch(`${alice.httpUrl}/metrics`)).text();
  const held = Number(/^dist_worker_bytes (\S+)$/m.exec(text)?.[1]);
  assert.ok(held >= 16 * MIB, `the worker reports ${held} bytes held`);
});
