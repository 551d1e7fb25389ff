/**
 * What a connection may cost a node before and after it proves anything: HTTP bodies
 * under a byte limit and a deadline, replies that wait for a reader that does not read
 * (backpressure, then a drop), and connections still in the handshake (small buffers,
 * a cap that drops the oldest). Real TCP on 127.0.0.1, and a real scheduler process
 * where the hole crashed one.
 *
 * @module
 */

import assert from "node:assert/strict";
import { createLogger, type Logger } from "../util/log.ts";
import { HTTP_BODY_BYTES_MAX, startHttp } from "../util/http.ts";
import { spawnNode } from "../client/spawn.ts";
import { parseAddress } from "../protocol/address.ts";
import { Encoder } from "../protocol/codec.ts";
import { frameHeader, HANDSHAKE_READ_BYTES, MessageReader } from "../protocol/framing.ts";
import { clientHandshake } from "../protocol/handshake.ts";
import { rpc } from "../mod.ts";
import { serve } from "../protocol/server.ts";
import { connect } from "../protocol/transport.ts";
import { eventually } from "./_helpers.ts";

const TOKEN = "conn-limits-test-token";
const text = new TextEncoder();
const MiB = 1024 * 1024;

/** A logger that keeps its lines, for tests that check what a node said. */
function capturingLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  const at = (level: string) => (message: string) => void lines.push(`${level} ${message}`);
  return { lines, debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") };
}

/**
 * Reads from `conn` until it closes, `timeoutMs` passes, or (with `response`) one whole
 * HTTP response with a content-length has arrived; the text received.
 */
async function readUntilClosed(
  conn: Deno.Conn,
  timeoutMs: number,
  response = false,
): Promise<{ text: string; closed: boolean }> {
  const buf = new Uint8Array(16 * 1024);
  let received = "";
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<"late">((resolve) => timer = setTimeout(() => resolve("late"), timeoutMs));
  const whole = () => {
    const end = received.indexOf("\r\n\r\n");
    const length = /content-length: (\d+)/i.exec(received.slice(0, end));
    return end >= 0 && length !== null && received.length >= end + 4 + Number(length[1]);
  };
  try {
    while (true) {
      const n = await Promise.race([conn.read(buf).catch(() => null), late]);
      if (n === "late") return { text: received, closed: false };
      if (n === null) return { text: received, closed: true };
      received += new TextDecoder().decode(buf.subarray(0, n));
      if (response && whole()) return { text: received, closed: false };
    }
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Sends `head` and then up to `sendBytesMax` of body in 1 MiB pieces (chunked when
 * `chunked`), stopping once the server answers; the answer's first line and text.
 */
async function postHuge(
  url: string,
  path: string,
  options: { chunked: boolean; sendBytesMax: number; timeoutMs: number },
): Promise<{ status: string; text: string; sent: number; closed: boolean }> {
  const { hostname, port } = new URL(url);
  const conn = await Deno.connect({ hostname, port: Number(port) });
  try {
    const length = options.chunked ? "transfer-encoding: chunked" : `content-length: ${700 * MiB}`;
    await conn.write(
      text.encode(
        `POST ${path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\n${length}\r\n\r\n`,
      ),
    );
    const piece = new Uint8Array(MiB).fill(0x61);
    const framed = options.chunked
      ? new Uint8Array([...text.encode(`${MiB.toString(16)}\r\n`), ...piece, ...text.encode("\r\n")])
      : piece;
    let answered = false;
    const answer = readUntilClosed(conn, options.timeoutMs, true).finally(() => answered = true);
    let sent = 0;
    // After its answer the server discards what still comes: stop sending once it is in.
    while (!answered && sent < options.sendBytesMax) {
      try {
        await conn.write(framed);
      } catch {
        break; // the server closed: its answer, if any, is already in
      }
      sent += piece.length;
      // The pause is the behaviour under test: a sender that keeps sending, a piece at a time.
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
    const got = await answer;
    // After its answer the node closes the connection: nothing more is read from it.
    const closed = got.closed || (await readUntilClosed(conn, 3_000)).closed;
    return { status: got.text.split("\r\n")[0], text: got.text, sent, closed };
  } finally {
    conn.close();
  }
}

async function login(url: string, token: string): Promise<Response> {
  const response = await fetch(`${url}/login`, {
    method: "POST",
    body: new URLSearchParams({ token }),
    redirect: "manual",
  });
  await response.body?.cancel();
  return response;
}

// ---- HTTP bodies ----

Deno.test("http: a huge body gets 413 from a real scheduler, which keeps serving and still logs in", async () => {
  const node = await spawnNode(["scheduler", "--port", "0", "--dashboard-port", "0"], {
    env: { DIST_AUTH_TOKEN: TOKEN },
  });
  try {
    const line = await node.waitForLog(/Dashboard at http:\/\/\S+/);
    const url = /Dashboard at (http:\/\/\S+)/.exec(line)![1];
    // Past ~512 MiB the old form parser crashed the process; 64 MiB is enough to show
    // that nothing waits for the whole body any more.
    for (const [path, chunked] of [["/login", false], ["/login", true], ["/metrics", false]] as const) {
      const got = await postHuge(url, path, { chunked, sendBytesMax: 64 * MiB, timeoutMs: 15_000 });
      assert.match(got.status, /^HTTP\/1\.1 413/, `${path} chunked=${chunked}: ${got.text.slice(0, 200)}`);
      assert.match(got.text, new RegExp(`Request body too large: the limit is ${HTTP_BODY_BYTES_MAX} bytes`));
      assert.equal(got.closed, true, `${path} chunked=${chunked}: the connection stays open`);
    }
    const health = await fetch(`${url}/health`);
    assert.equal(health.status, 200);
    await health.body?.cancel();
    assert.equal((await login(url, TOKEN)).status, 303);
    assert.equal((await login(url, "wrong-token-wrong")).status, 401);
  } finally {
    const status = await node.stop();
    assert.ok(!node.log.some((l) => /panicked|unwrap\(\)/.test(l)), node.log.join("\n"));
    assert.equal(status.signal ?? "SIGTERM", "SIGTERM");
  }
});

Deno.test("http: a slowly dripped body is cut with 408 after the body timeout; a normal login works", async () => {
  const bodyTimeoutMs = 300;
  const http = await startHttp({
    host: "127.0.0.1",
    port: 0,
    authToken: TOKEN,
    routes: [],
    log: createLogger("http", "silent"),
    bodyTimeoutMs,
  });
  const { port } = new URL(http.url);
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: Number(port) });
  try {
    await conn.write(text.encode(`POST /login HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n`));
    const started = performance.now();
    let stop = false;
    const drip = (async () => {
      while (!stop) {
        await conn.write(text.encode("t")).catch(() => stop = true);
        // The pause is the behaviour under test: a peer that drips its body a byte at a time.
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    })();
    const got = await readUntilClosed(conn, 5_000, true);
    // And the connection is closed: the dripping peer costs nothing more.
    const after = await readUntilClosed(conn, 3_000).finally(() => stop = true);
    await drip;
    assert.equal(after.closed, true, "the node closed the connection after its 408");
    const ms = performance.now() - started;
    assert.match(got.text, /^HTTP\/1\.1 408/, got.text);
    assert.match(got.text, /Request body too slow: it did not arrive within 300 ms/);
    assert.ok(ms >= bodyTimeoutMs && ms < 4_000, `cut after ${Math.round(ms)} ms`);
    assert.equal((await login(http.url, TOKEN)).status, 303);
  } finally {
    conn.close();
    await http.close();
  }
});

Deno.test("http: a head that trickles in gets 408 and is closed; past connectionsMax the oldest idle one goes", async () => {
  const connectionsMax = 4;
  const http = await startHttp({
    host: "127.0.0.1",
    port: 0,
    routes: [],
    log: createLogger("http", "silent"),
    headTimeoutMs: 300,
    connectionsMax,
  });
  const { port } = new URL(http.url);
  const conns: Deno.Conn[] = [];
  try {
    const slow = await Deno.connect({ hostname: "127.0.0.1", port: Number(port) });
    conns.push(slow);
    await slow.write(text.encode("GET /health HTTP/1.1\r\nhost: x\r\n"));
    const started = performance.now();
    const got = await readUntilClosed(slow, 5_000);
    const ms = performance.now() - started;
    assert.match(got.text, /^HTTP\/1\.1 408/, got.text);
    assert.match(got.text, /Request head too slow/);
    assert.equal(got.closed, true);
    assert.ok(ms >= 250 && ms < 4_000, `cut after ${Math.round(ms)} ms`);

    // connectionsMax idle connections fill the server; a newcomer takes the oldest one's place.
    const idle: Deno.Conn[] = [];
    for (let i = 0; i < connectionsMax; i++) {
      idle.push(await Deno.connect({ hostname: "127.0.0.1", port: Number(port) }));
    }
    conns.push(...idle);
    await eventually(async () => {
      const health = await fetch(`${http.url}/health`);
      await health.body?.cancel();
      return health.status === 200;
    }, 3_000);
    assert.deepEqual(await readUntilClosed(idle[0], 2_000), { text: "", closed: true });
    // The others still wait for their requests: the newest answers.
    await idle.at(-1)!.write(text.encode("GET /health HTTP/1.1\r\nhost: x\r\n\r\n"));
    assert.match((await readUntilClosed(idle.at(-1)!, 2_000)).text, /^HTTP\/1\.1 200/);
  } finally {
    for (const conn of conns) conn.close();
    await http.close();
  }
});

// ---- replies that wait for a reader ----

const encoder = new Encoder();

function request(op: string, id: number, args: unknown): Uint8Array {
  const { head } = encoder.encode({ op, id, args }, "args");
  const header = frameHeader([head]);
  const bytes = new Uint8Array(header.length + head.length);
  bytes.set(header);
  bytes.set(head, header.length);
  return bytes;
}

/** A server whose get_data answers with a 16,000-byte value (copied into the writer's arena). */
async function valueServer(options: { writeQueueBytesMax: number; writeStallMs: number; log: Logger }) {
  const value = new Uint8Array(16_000).fill(7);
  return await serve(
    { host: "127.0.0.1", port: 0 },
    (op) => op === "get_data" ? { k: value } : "pong",
    options,
  );
}

/** A raw peer past the handshake that sends `n` get_data requests in one go. */
async function pipeline(address: string, n: number) {
  const conn = await connect(parseAddress(address));
  const { reader } = await clientHandshake(conn);
  const all: Uint8Array[] = [];
  for (let id = 1; id <= n; id++) all.push(request("get_data", id, { keys: ["k"] }));
  const bytes = new Uint8Array(all.reduce((a, b) => a + b.length, 0));
  let at = 0;
  for (const b of all) {
    bytes.set(b, at);
    at += b.length;
  }
  let done = 0;
  while (done < bytes.length) done += await conn.write(bytes.subarray(done));
  return { conn, reader };
}

/**
 * A raw peer that asks for get_data in batches and never reads, until the node closes it.
 * However much the kernel buffers on loopback (up to `tcp_rmem` max, 32 MiB on some
 * machines), the replies outgrow it and the node's own queue fills.
 */
async function flood(address: string) {
  const conn = await connect(parseAddress(address));
  await clientHandshake(conn);
  let id = 0;
  const sent = (async () => {
    try {
      for (;;) {
        const batch: Uint8Array[] = [];
        for (let i = 0; i < 500; i++) batch.push(request("get_data", ++id, { keys: ["k"] }));
        const bytes = new Uint8Array(batch.reduce((a, b) => a + b.length, 0));
        let at = 0;
        for (const b of batch) {
          bytes.set(b, at);
          at += b.length;
        }
        let done = 0;
        while (done < bytes.length) done += await conn.write(bytes.subarray(done));
      }
    } catch {
      // The node dropped us (or the test closed the connection): the point.
    }
  })();
  return { conn, sent };
}

Deno.test("backpressure: a peer that never reads holds at most the queue limit, is dropped after the stall time, others are served", async () => {
  const writeQueueBytesMax = 1 * MiB;
  const writeStallMs = 500;
  const log = capturingLogger();
  const server = await valueServer({ writeQueueBytesMax, writeStallMs, log });
  // Replies of 16 KB, asked for until the node gives up on this peer.
  const { conn, sent } = await flood(server.url);
  try {
    let peak = 0;
    let served = 0;
    await using other = rpc(server.url);
    const started = performance.now();
    await eventually(async () => {
      for (const comm of server.comms) peak = Math.max(peak, comm.queuedBytes);
      // Other clients are answered while the stalled one waits.
      assert.equal(await other.call("ping", {}, { timeoutMs: 2_000 }), "pong");
      served++;
      return server.comms.size === 1;
    }, 10_000);
    const ms = performance.now() - started;
    assert.ok(peak > 0, "the stalled peer's replies were queued");
    // One reply may go over: the limit is checked before each request is read.
    assert.ok(peak <= writeQueueBytesMax + 17_000, `peak queue ${peak} bytes (limit ${writeQueueBytesMax})`);
    assert.ok(served > 3, `${served} calls served meanwhile`);
    assert.ok(ms >= writeStallMs, `dropped after ${Math.round(ms)} ms`);
    assert.ok(
      log.lines.some((l) => /Closing connection: .* took nothing for 500 ms while \d+ bytes waited/.test(l)),
      log.lines.join("\n"),
    );
  } finally {
    conn.close();
    await sent;
    await server.close();
  }
});

Deno.test("backpressure: a slow reader that reads in the end gets every reply, in order", async () => {
  const writeQueueBytesMax = 1 * MiB;
  const server = await valueServer({ writeQueueBytesMax, writeStallMs: 5_000, log: capturingLogger() });
  const n = 2_000;
  const { conn, reader } = await pipeline(server.url, n);
  try {
    // Wait until the node has stopped reading this peer: its queue went over the limit.
    await eventually(() => [...server.comms].some((c) => c.queuedBytes > writeQueueBytesMax / 2), 5_000);
    const replies = new MessageReader(conn);
    void reader; // the handshake's reader has nothing buffered past the verdict
    for (let id = 1; id <= n; id++) {
      const frames = await replies.next();
      assert.ok(frames, `reply ${id} arrived`);
      const bytes = frames[0];
      // { reply: id, result: { k: <16,000 bytes> } }: the id is what matters here.
      assert.ok(bytes.length > 16_000, `reply ${id} carries the value`);
      // The pause is the behaviour under test: a reader that is slow, but reads.
      if (id % 100 === 0) await new Promise((resolve) => setTimeout(resolve, 5));
    }
    assert.equal(server.comms.size, 1, "the slow reader kept its connection");
  } finally {
    conn.close();
    await server.close();
  }
});

Deno.test("backpressure: a peer that leaves while its replies wait is closed at once, its queue released", async () => {
  const server = await valueServer({
    writeQueueBytesMax: 1 * MiB,
    writeStallMs: 20_000,
    log: capturingLogger(),
  });
  const { conn, sent } = await flood(server.url);
  try {
    await eventually(() => [...server.comms].some((c) => c.queuedBytes > MiB / 2), 5_000);
    const [comm] = server.comms;
    conn.close();
    // Not after the stall time: the paused read loop still learns that the peer left.
    await eventually(() => server.comms.size === 0, 5_000);
    assert.equal(comm.queuedBytes, 0);
  } finally {
    await sent;
    await server.close();
  }
});

// ---- connections in the handshake ----

Deno.test("handshake: a stranger holds a small read buffer; past handshakesMax the oldest is dropped; a real peer gets in", async () => {
  const handshakesMax = 20;
  const log = capturingLogger();
  const server = await serve({ host: "127.0.0.1", port: 0 }, () => "pong", {
    authToken: TOKEN,
    handshakesMax,
    log,
  });
  const strangers: Deno.Conn[] = [];
  try {
    const { port } = parseAddress(server.url);
    for (let i = 0; i < 30; i++) strangers.push(await Deno.connect({ hostname: "127.0.0.1", port }));
    // The first ten were dropped: the node closed them (after its hello).
    for (const conn of strangers.slice(0, 10)) {
      assert.equal((await readUntilClosed(conn, 3_000)).closed, true);
    }
    await eventually(() => server.handshaking().count === handshakesMax);
    assert.ok(log.lines.some((l) => /the oldest goes \(1 dropped so far\)/.test(l)), log.lines.join("\n"));
    const { count, bufferBytes } = server.handshaking();
    assert.equal(count, handshakesMax);
    assert.ok(
      bufferBytes <= handshakesMax * HANDSHAKE_READ_BYTES,
      `${bufferBytes} bytes of read buffers for ${count} strangers (${bufferBytes / count} each)`,
    );
    await using peer = rpc(server.url, { authToken: TOKEN });
    assert.equal(await peer.call("ping"), "pong");
  } finally {
    for (const conn of strangers) conn.close();
    await server.close();
  }
});
