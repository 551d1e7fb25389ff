import assert from "node:assert/strict";
import { RemoteError, rpc, type SchedulerOps, type WorkerOps } from "../mod.ts";
import { BIGINT_BYTES_MAX, Decoder, Encoder, EXT_BIGINT } from "../protocol/codec.ts";
import { frameHeader, MessageReader } from "../protocol/framing.ts";
import { schedulerOps, workerOps } from "../protocol/ops.ts";
import * as v from "../protocol/_validate.ts";
import { connect } from "../protocol/transport.ts";
import { PROTOCOL_VERSION } from "../protocol/handshake.ts";
import { parseAddress } from "../protocol/address.ts";
import { spawnNode } from "../client/spawn.ts";
import { eventually, startCluster } from "./_helpers.ts";

const encoder = new Encoder();
const decoder = new Decoder();

/** A raw connection that sends hand-made bytes and reads whole replies. */
async function raw(address: string) {
  const conn = await connect(parseAddress(address));
  const reader = new MessageReader(conn);
  // The node speaks first: its hello (no auth token is set in these tests).
  const hello = await reader.next();
  const greeting = decoder.decode(hello![0]) as Record<string, unknown>;
  assert.deepEqual([greeting.dist, greeting.auth, typeof greeting.frame_bytes_max], [
    PROTOCOL_VERSION,
    null,
    "number",
  ]);
  return {
    async send(bytes: Uint8Array) {
      let done = 0;
      while (done < bytes.length) done += await conn.write(bytes.subarray(done));
    },
    async sendMessage(message: unknown) {
      const { head, buffers } = encoder.encode(message);
      const frames = [head, ...buffers];
      await this.send(frameHeader(frames));
      for (const f of frames) await this.send(f);
    },
    async reply(): Promise<Record<string, unknown> | null> {
      const frames = await reader.next();
      return frames && decoder.decode(frames[0], frames.slice(1)) as Record<string, unknown>;
    },
    /** Resolves true if the node closed the connection. */
    async closedByPeer(): Promise<boolean> {
      try {
        return (await reader.next()) === null;
      } catch {
        return true;
      }
    },
    close: () => conn.close(),
  };
}

/** Stores a value on the worker and checks, after the abuse, that it is intact. */
async function withData(address: string, abuse: () => Promise<void>) {
  await using alice = rpc<WorkerOps>(address);
  const x = new Float64Array([1, 2, 3]);
  await alice.update_data({ data: { x } });
  await abuse();
  assert.deepEqual((await alice.get_data({ keys: ["x"] })).x, x);
  assert.equal(await alice.ping(), "pong");
}

Deno.test("garbage bytes close that connection only; the node keeps serving and keeps its data", async () => {
  await using cluster = await startCluster(1);
  const address = cluster.workers[0].address;
  await withData(address, async () => {
    const garbage = [
      new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
      new Uint8Array([1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0xc1, 0xc1, 0xc1]), // a frame of bytes no msgpack starts with
      new Uint8Array([0, 0, 0, 0]), // zero frames
      new Uint8Array(64).fill(0xff),
    ];
    for (const bytes of garbage) {
      const c = await raw(address);
      await c.send(bytes);
      assert.ok(await c.closedByPeer(), `closed after ${bytes.slice(0, 8)}`);
      c.close();
    }
  });
});

Deno.test("an oversize frame is refused from its header, before the body arrives", async () => {
  await using cluster = await startCluster(1, { frameBytesMax: 1024 });
  const address = cluster.workers[0].address;
  await withData(address, async () => {
    const c = await raw(address);
    const header = new Uint8Array(12);
    new DataView(header.buffer).setUint32(0, 1, true);
    new DataView(header.buffer).setUint32(4, 2 ** 31, true); // 2 GiB declared, never sent
    await c.send(header);
    assert.ok(await c.closedByPeer());
    c.close();
  });
  // Large values are refused by the node's limit too, and it keeps serving.
  await using alice = rpc<WorkerOps>(address);
  await assert.rejects(alice.update_data({ data: { big: new Uint8Array(4096) } }));
  assert.equal(await alice.ping(), "pong");
});

Deno.test("bad envelopes get an error reply when they carry an id, and the connection stays usable", async () => {
  await using cluster = await startCluster(1);
  const c = await raw(cluster.workers[0].address);
  try {
    await c.sendMessage({ id: 1, op: 42 });
    const r1 = await c.reply();
    assert.equal(r1?.reply, 1);
    assert.match((r1?.error as { message: string }).message, /field "op" must be a string/);
    await c.sendMessage(["not", "an", "envelope"]); // no id: ignored
    await c.sendMessage({ op: "ping", id: 2 });
    assert.deepEqual(await c.reply(), { reply: 2, result: "pong" });
    await c.sendMessage({ op: "no_such_op", id: 3, args: {} });
    const r3 = await c.reply();
    assert.match(
      (r3?.error as { message: string }).message,
      /Unknown op "no_such_op": a worker serves cancel_task, compute, compute_task/,
    );
    // An op from a newer peer is refused by name, and the connection goes on.
    await c.sendMessage({ op: "ping", id: 4 });
    assert.deepEqual(await c.reply(), { reply: 4, result: "pong" });
  } finally {
    c.close();
  }
});

Deno.test("a node of another protocol version is refused at the handshake, saying both versions and what to do", async () => {
  // A hand-made node that greets as protocol 1 would, before fields were renamed.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const served = (async () => {
    const conn = await listener.accept();
    const { head } = encoder.encode({ dist: 1, auth: null, frameBytesMax: 1024 });
    await conn.write(new Uint8Array([...frameHeader([head]), ...head]));
    // The client hangs up on it: read until it does.
    const buf = new Uint8Array(64);
    while ((await conn.read(buf).catch(() => null)) !== null) { /* until closed */ }
    conn.close();
  })();
  try {
    await using old = rpc<WorkerOps>(`tcp://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`);
    await assert.rejects(
      old.ping({}),
      new RegExp(
        `speaks protocol 1, not ${PROTOCOL_VERSION}: every node and client of a cluster must run the same dist protocol`,
      ),
    );
  } finally {
    await served;
    listener.close();
  }
});

/** Arguments that are wrong for every op: not an object, and an unknown field. */
const wrongForEveryOp: [unknown, RegExp][] = [
  [42, /expected an object/],
  [{ bogus: 1 }, /unknown field "bogus"/],
  // Names every object inherits are unknown fields too (an `in` check let them through).
  [{ toString: 1 }, /unknown field "toString"/],
  [{ constructor: 1 }, /unknown field "constructor"/],
  [{ hasOwnProperty: "x" }, /unknown field "hasOwnProperty"/],
  [JSON.parse('{"__proto__": 1}'), /unknown field "__proto__"/],
];

/** Arguments with a wrong type in a named field, per op. */
const wrongField: Record<string, [unknown, RegExp][]> = {
  get_data: [
    [{ keys: "x" }, /args\.keys: expected an array of strings/],
    [
      { keys: ["ok", "file-😀x".slice(0, 6)] },
      /args\.keys\[1\]: expected a well-formed string \(a key\), got one with a lone surrogate at index 5/,
    ],
    [{ keys: [1] }, /args\.keys\[0\]/],
    [
      {},
      /args\.keys: missing/,
    ],
  ],
  update_data: [[{ data: [1] }, /args\.data: expected an object/], [
    { data: {}, report: "yes" },
    /args\.report/,
  ], [{ data: { "\uDC00x": 1 } }, /args\.data field "\\udc00x": expected a well-formed string \(a key\)/]],
  delete_data: [[{ keys: [null] }, /args\.keys\[0\]/], [{ keys: [], report: 1 }, /args\.report/], [
    { keys: ["a\uD800b"] },
    /args\.keys\[0\]: expected a well-formed string \(a key\), got one with a lone surrogate at index 1/,
  ]],
  compute: [
    [{ key: 1, function: { source: "(x) => x" } }, /args\.key: expected a string/],
    [{ key: "k", function: { code: "(x) => x" } }, /expected a function or \{ module, name \}, got object/],
    [{ key: "k", function: { source: "(x) => x" }, keys: "x" }, /args\.keys/],
    [{ key: "k", function: { source: "(x) => x" }, args: {} }, /args\.args: expected an array/],
    [{ key: "k", function: { source: "not javascript (" } }, /does not compile/],
  ],
  register: [
    [{ address: 7 }, /args\.address: expected an address tcp:\/\/host:port, got a number/],
    [
      { address: "not an address" },
      /args\.address: expected an address tcp:\/\/host:port, got a string \(not an address\)/,
    ],
    [
      // People may type host:port; nodes say their addresses with the scheme.
      { address: "127.0.0.1:8786" },
      /args\.address: expected an address tcp:\/\/host:port, got a string \(127\.0\.0\.1:8786\)/,
    ],
    [
      { address: "tcp://nowhere" },
      /args\.address: Invalid address "tcp:\/\/nowhere": expected host:port/,
    ],
    [{ address: "tcp://a:1", nthreads: 0 }, /args\.nthreads: expected a whole number from 1 up/],
    [
      { address: "tcp://a:1", nthreads: -1 },
      /args\.nthreads/,
    ],
  ],
  unregister: [[{}, /args\.address: missing/]],
  add_keys: [[{ address: "tcp://a:1", keys: [1] }, /args\.keys\[0\]/], [
    { address: "tcp://nobody:1", keys: ["k"] },
    /Unknown worker tcp:\/\/nobody:1/,
  ]],
  remove_keys: [[{ address: "tcp://a:1" }, /args\.keys: missing/]],
  who_has: [[{ keys: "k" }, /args\.keys/], [
    { keys: ["\uD800"] },
    /args\.keys\[0\]: expected a well-formed string/,
  ]],
  has_what: [[{ workers: [1] }, /args\.workers\[0\]/]],
  broadcast: [[{ msg: { op: "" } }, /args\.msg\.op/], [{ msg: "ping" }, /args\.msg: expected an object/]],
};

async function checkEveryOp(address: string, ops: Record<string, unknown>, kind: string) {
  await using node = rpc(address);
  for (const op of Object.keys(ops)) {
    const cases = [...(Object.hasOwn(wrongField, op) ? wrongField[op] : []), ...wrongForEveryOp];
    for (const [args, pattern] of cases) {
      if (op === "delete_data" && kind === "scheduler" && JSON.stringify(args).includes("report")) continue;
      const error = await node.call(op, args).catch((e) => e);
      assert.ok(error instanceof Error, `${kind} ${op} ${JSON.stringify(args)} should fail`);
      assert.match(error.message, pattern, `${kind} ${op} ${JSON.stringify(args)}`);
      if (error instanceof RemoteError && /^(args|expected)/.test(pattern.source)) {
        assert.match(error.message, new RegExp(`^Bad arguments for op ${op}: `));
      }
    }
  }
  assert.equal(await node.call("ping"), "pong");
}

Deno.test("bad arguments for every worker op get an error naming the op and the field", async () => {
  await using cluster = await startCluster(1);
  await withData(
    cluster.workers[0].address,
    () => checkEveryOp(cluster.workers[0].address, workerOps, "worker"),
  );
});

Deno.test("bad arguments for every scheduler op get an error naming the op and the field", async () => {
  await using cluster = await startCluster(1);
  await checkEveryOp(cluster.scheduler.address, schedulerOps, "scheduler");
  await using center = rpc<SchedulerOps>(cluster.scheduler.address);
  assert.deepEqual(Object.keys(await center.ncores()), [cluster.workers[0].address]);
});

Deno.test("a compute whose function field is malformed on the wire is refused by the worker", async () => {
  await using cluster = await startCluster(1);
  const c = await raw(cluster.workers[0].address);
  try {
    await c.sendMessage({ op: "compute", id: 7, args: { key: "k", function: "(x) => x" } });
    const r = await c.reply();
    assert.equal(r?.reply, 7);
    assert.equal(
      (r?.error as { message: string }).message,
      "Bad arguments for op compute: args.function: expected { source } or { module, name }, got a string ((x) => x)",
    );
  } finally {
    c.close();
  }
});

/** A request whose args hold a bigint ext of `size` magnitude bytes: hand-made, the Encoder refuses it. */
function hugeBigintRequest(id: number, size: number): Uint8Array[] {
  const { head } = encoder.encode({ op: "ping", id, args: { n: null } });
  // The envelope ends with the nil of args.n: put the extension in its place.
  const ext = new Uint8Array(6 + 1 + size).fill(0x7f);
  ext[0] = 0xc9;
  new DataView(ext.buffer).setUint32(1, size + 1);
  ext[5] = EXT_BIGINT;
  ext[6] = 0;
  assert.equal(head.at(-1), 0xc0);
  const bytes = new Uint8Array(head.length - 1 + ext.length);
  bytes.set(head.subarray(0, -1));
  bytes.set(ext, head.length - 1);
  return [bytes];
}

Deno.test("a huge bigint on the wire is refused at once; the nodes keep answering and their heartbeats keep working", async () => {
  // Real processes: a node frozen by a quadratic decode must not freeze this test with it.
  const scheduler = await spawnNode(["scheduler", "--port", "0", "--worker-ttl", "3"]);
  const worker = await spawnNode(["worker", scheduler.address, "--name", "alice"]);
  try {
    await using center = rpc<SchedulerOps>(scheduler.address);
    await eventually(async () => (await center.workers()).length === 1);
    for (const address of [scheduler.address, worker.address]) {
      // 256 KiB of magnitude: the byte-at-a-time decode took ~20 s, the TTL is 3 s.
      for (const size of [BIGINT_BYTES_MAX + 1, 256 * 1024]) {
        const c = await raw(address);
        const frames = hugeBigintRequest(9, size);
        const start = performance.now();
        await c.send(frameHeader(frames));
        for (const f of frames) await c.send(f);
        assert.ok(await c.closedByPeer(), "the connection that sent it is closed (malformed msgpack)");
        c.close();
        const ms = performance.now() - start;
        assert.ok(ms < 2_000, `refused after ${ms.toFixed(0)} ms`);
      }
      await using node = rpc(address);
      assert.equal(await node.call("ping"), "pong");
    }
    const log = () => scheduler.log.join("\n");
    assert.match(log(), /a bigint of 262144 bytes, past BIGINT_BYTES_MAX \(65536\)/);
    // The worker is still registered and heard from: its heartbeats kept arriving.
    const [info] = await center.workers();
    assert.equal(info?.name, "alice", log());
    assert.ok(info.last_seen < 3, `last heard ${info.last_seen} s ago`);
  } finally {
    await worker.stop();
    await scheduler.stop();
  }
});

Deno.test("checked arguments: nil optional fields become absent; a message checked whole is handed over as it came", () => {
  const schema = v.object({
    key: v.key,
    n: v.optional(v.number),
    inner: v.optional(v.object({ a: v.number, b: v.optional(v.string) })),
  });
  const whole = { key: "k", n: 1, inner: { a: 2, b: "x" } };
  const checked = schema.parse(whole, "args");
  assert.equal(checked, whole, "nothing to drop: no copy");
  assert.equal(checked.inner, whole.inner);

  const withNil = { key: "k", n: null, inner: { a: 2 } };
  const dropped = schema.parse(withNil, "args") as Record<string, unknown>;
  assert.notEqual(dropped, withNil);
  assert.deepEqual(dropped, { key: "k", inner: { a: 2 } });
  assert.equal(Object.hasOwn(dropped, "n"), false, "a nil optional field is absent, so a default applies");

  const nestedNil = { key: "k", inner: { a: 2, b: null } };
  const outer = schema.parse(nestedNil, "args") as Record<string, unknown>;
  assert.deepEqual(
    outer,
    { key: "k", inner: { a: 2 } },
    "a nested object with a nil field is copied, and its parent",
  );
  assert.equal(Object.hasOwn(outer.inner as object, "b"), false);
  assert.deepEqual(nestedNil, { key: "k", inner: { a: 2, b: null } }, "what came is left as it was");
  assert.throws(() => schema.parse(undefined, "args"), /args\.key: missing/);
});
