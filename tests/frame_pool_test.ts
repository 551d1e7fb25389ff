/**
 * The pool of received frames' memory: a buffer is reused only once nothing holds it (the
 * store, a reply being written, an executor it was lent to), never when a task's result
 * shares it; and on a real cluster, values received into reused memory are the new
 * values, while results and stashed references that share an old buffer keep its bytes.
 *
 * @module
 */

import assert from "node:assert/strict";
import { FramePool, POOL_FRAME_BYTES_MIN, POOL_IDLE_MS } from "../worker/frame_pool.ts";
import { Client, type Future, taskOptions } from "../mod.ts";
import { eventually, metricAt, startCluster } from "./_helpers.ts";
import { connect } from "../protocol/transport.ts";
import { clientHandshake } from "../protocol/handshake.ts";
import { parseAddress } from "../protocol/address.ts";
import { Decoder, Encoder } from "../protocol/codec.ts";
import { frameHeader } from "../protocol/framing.ts";

const MIB = 1024 * 1024;

Deno.test("frame pool: a buffer comes back for the next frame of its size once nothing holds it", () => {
  const pool = new FramePool();
  const small = pool.take(POOL_FRAME_BYTES_MIN - 1);
  pool.hold(new Uint8Array(small));
  pool.release(new Uint8Array(small));
  assert.equal(pool.freeBytes, 0, "small frames are not kept");

  const a = pool.take(2 * MIB);
  const value = new Float64Array(a);
  pool.hold(value); // the store keeps it
  pool.hold(value); // a reply is written from it
  pool.release(value);
  assert.equal(pool.freeBytes, 0, "still held by the write");
  assert.notEqual(pool.take(2 * MIB), a, "a held buffer is not handed out");
  pool.release(value);
  assert.equal(pool.freeBytes, 2 * MIB);
  assert.notEqual(pool.take(3 * MIB), a, "only a frame of the same size gets it");
  assert.equal(pool.take(2 * MIB), a);
  assert.equal(pool.freeBytes, 0);
  assert.equal(pool.reused, 1);
  assert.equal(pool.reusedBytes, 2 * MIB);
});

Deno.test("frame pool: a lent buffer waits for the executor's report; a shared one never returns", () => {
  const pool = new FramePool();
  const a = pool.take(2 * MIB);
  const b = pool.take(2 * MIB);
  const value = { a: new Float64Array(a), nested: [new Uint8Array(b)] };
  pool.hold(value);
  const first = pool.lend([value]);
  assert.equal(first.ids.length, 2);
  assert.deepEqual(new Set(first.buffers), new Set([a, b]));
  const again = pool.lend([value.a]); // a second task reads a
  const [idA, idB] = first.buffers[0] === a ? first.ids : [...first.ids].reverse();
  pool.shared([idB]); // a task returned b as its result
  pool.release(value);
  assert.equal(pool.freeBytes, 0, "the executor may still read both");
  pool.returned([idA, idB]);
  assert.equal(pool.freeBytes, 0, "a is still lent once");
  pool.returned([idA]);
  pool.returned(again.ids);
  assert.equal(pool.freeBytes, 2 * MIB, "a is back; b is shared with a result for good");
  assert.equal(pool.heldCount, 0, "b's holds still counted: nothing keeps it once they end");
  // A late report for an old lend does not count against the buffer's next value.
  const reused = pool.take(2 * MIB);
  assert.equal(reused, a);
  const next = new Float64Array(reused);
  pool.hold(next);
  pool.returned([idA]);
  assert.equal(pool.heldCount, 1);
  assert.equal(pool.freeBytes, 0);
});

Deno.test("frame pool: a value spilled to free memory gives its buffer back, not to the pool", () => {
  const pool = new FramePool();
  const value = new Uint8Array(pool.take(2 * MIB));
  pool.hold(value);
  pool.release(value, false);
  assert.equal(pool.freeBytes, 0);
  assert.equal(pool.heldCount, 0);
});

Deno.test("frame pool: at most maxBytes kept, oldest out first; idle buffers and trim(all) let go", () => {
  const dropped: number[] = [];
  const pool = new FramePool({ maxBytes: 5 * MIB, onDrop: (bytes) => dropped.push(bytes) });
  const buffers = [2, 2, 2].map((n) => pool.take(n * MIB));
  buffers.forEach((b, i) => {
    pool.hold(new Uint8Array(b));
    pool.release(new Uint8Array(b), true, 1_000 + i);
  });
  assert.equal(pool.freeBytes, 4 * MIB, "the oldest went for the third");
  assert.deepEqual(dropped, [2 * MIB]);
  assert.equal(pool.trim(1_000 + POOL_IDLE_MS), 0, "none idle yet");
  assert.equal(pool.trim(1_001.5 + POOL_IDLE_MS), 2 * MIB, "the older of the two was idle");
  assert.equal(pool.trim(0, true), 2 * MIB);
  assert.equal(pool.freeBytes, 0);
  assert.deepEqual(dropped, [2 * MIB, 2 * MIB, 2 * MIB]);
  const big = pool.take(8 * MIB);
  pool.hold(new Uint8Array(big));
  pool.release(new Uint8Array(big));
  assert.equal(pool.freeBytes, 0, "a buffer over the limit is never kept");
});

Deno.test("frame pool: a worker receives into reused memory, and no value that shares old memory changes", async () => {
  await using cluster = await startCluster(1, { httpPort: 0 });
  const [alice] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  const metrics = `${alice.httpUrl}/metrics`;
  const n = (4 * MIB) / 8;
  const filled = (x: number) => new Float64Array(n).fill(x);
  const on = taskOptions({ workers: [alice.address], pure: false });
  const reusedBytes = () => metricAt(metrics, "dist_worker_frame_pool_reused_bytes_total");

  // A task that keeps its input (its result is the input) and one that stashes it in the
  // executor's globals: neither buffer may be reused, whatever is released.
  const [kept] = await client.scatter([filled(1)], { workers: [alice.address] });
  const same = client.submit((x: Float64Array) => x, kept, on);
  await same.result();
  const [stashed] = await client.scatter([filled(2)], { workers: [alice.address] });
  const stash = client.submit(
    (x: Float64Array) => {
      (globalThis as { stash?: Float64Array }).stash = x;
      return x.length;
    },
    stashed,
    on,
  );
  assert.equal(await stash.result(), n);
  kept.release();
  stashed.release();

  // Values of the same size, each read by a task and let go of: their memory is reused.
  let value: Future<number> | null = null;
  for (let round = 0; round < 6; round++) {
    const [f] = await client.scatter([filled(10 + round)], { workers: [alice.address] });
    value = client.submit((x: Float64Array) => x[0] + x[x.length - 1], f, on);
    assert.equal(await value.result(), 2 * (10 + round), `round ${round} read its own value`);
    value.release();
    f.release();
    // The executor reports its references gone after a collection; then the memory is
    // free for the next value of this size.
    await eventually(async () => (await metricAt(metrics, "dist_worker_frame_pool_bytes")) >= 4 * MIB);
  }
  assert.equal(
    await reusedBytes(),
    5 * 4 * MIB,
    "every value after the first was received into reused memory",
  );

  // What shared old memory still has its own bytes.
  assert.ok((await same.result()).every((x) => x === 1), "a result that is its input kept its bytes");
  const readStash = client.submit(
    () => (globalThis as { stash?: Float64Array }).stash!.every((x) => x === 2),
    on,
  );
  assert.equal(await readStash.result(), true, "a buffer a task still refers to was not reused");
  same.release();
});

Deno.test("frame pool: memory a reply is still being written from is not reused, even once its key is gone", async () => {
  await using cluster = await startCluster(1, { httpPort: 0 });
  const [alice] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  const metrics = `${alice.httpUrl}/metrics`;
  const n = (32 * MIB) / 8;
  const [old] = await client.scatter([new Float64Array(n).fill(7)], { workers: [alice.address] });
  // A reader that asks for the value and then reads nothing: the reply (32 MiB) waits in
  // alice's writer, written from the value's own memory, while the kernel's buffers are full.
  const conn = await connect(parseAddress(alice.address), {});
  try {
    const { reader } = await clientHandshake(conn, {});
    const { head } = new Encoder().encode({ op: "get_data", id: 1, args: { keys: [old.key] } }, "args");
    const header = frameHeader([head]);
    const request = new Uint8Array(header.length + head.length);
    request.set(header);
    request.set(head, header.length);
    await conn.write(request);
    // Counted from the reply's queueing until it has left.
    await eventually(async () => (await metricAt(metrics, "dist_worker_transfers_out")) === 1);
    // The key goes, and a value of the same size comes: it must not land in the memory
    // the reply is still being written from.
    old.release();
    await eventually(() => !alice.data.has(old.key));
    const [next] = await client.scatter([new Float64Array(n).fill(9)], { workers: [alice.address] });
    reader.configure({}); // past the handshake: the node's own limits
    const frames = await reader.next();
    assert.ok(frames !== null);
    const reply = new Decoder().decode(frames[0], frames.slice(1)) as {
      result: Record<string, Float64Array>;
    };
    const got = reply.result[old.key];
    assert.equal(got.length, n);
    assert.ok(got.every((x) => x === 7), "the reply carries the old value's bytes, all of them");
    assert.ok((await next.result()).every((x) => x === 9));
  } finally {
    conn.close();
  }
});
