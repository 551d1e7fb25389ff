/**
 * Security: the auth token (in process, on the wire, through the CLI), TLS and mutual
 * TLS, the warning for open listeners, sandboxed tasks, and the connection limits.
 *
 * @module
 */

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import {
  Client,
  ConnectionClosedError,
  type Future,
  type Logger,
  rpc,
  type TaskError,
  taskOptions,
  type WorkerOps,
} from "../mod.ts";
import { startScheduler, startWorker } from "../node.ts";
import { parseAddress } from "../protocol/address.ts";
import { Decoder, Encoder } from "../protocol/codec.ts";
import { frameHeader, MessageReader } from "../protocol/framing.ts";
import { AuthenticationError, PROTOCOL_VERSION } from "../protocol/handshake.ts";
import type { TlsOptions } from "../protocol/transport.ts";
import { NODE_PERMISSIONS, type NodeProcess, spawnNode } from "../client/spawn.ts";
import { eventually, startCluster, testLogger } from "./_helpers.ts";

const TOKEN = "correct-horse-battery-staple-0123";
const WRONG = "incorrect-horse-battery-staple-99";
/** A refusal must come well before any timeout would have fired. */
const REFUSAL_MS_MAX = 5_000;
const MAIN = new URL("../main.ts", import.meta.url);
/** What the warning for an open listener must say. */
const OPEN_WARNING = /anyone who can reach this port can read and delete its data and run any code/;
const text = new TextEncoder();

const add = (a: number, b: number) => a + b;

/** A logger that keeps every line, prefixed with its level. */
function capture(): { log: Logger; lines: string[]; warnings: () => string[] } {
  const lines: string[] = [];
  const at = (level: string) => (message: string) => void lines.push(`${level} ${message}`);
  return {
    lines,
    log: { debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") },
    warnings: () => lines.filter((l) => l.startsWith("warn ")),
  };
}

/** Where `needle` first occurs in `hay`, or -1. */
function indexOfBytes(hay: Uint8Array, needle: Uint8Array): number {
  outer: for (let i = 0; i + needle.length <= hay.length; i++) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) out.set(c, (at += c.length) - c.length);
  return out;
}

/** `message` framed as it travels: header, msgpack head, out-of-band buffers. */
function framed(message: unknown): Uint8Array {
  const { head, buffers } = new Encoder().encode(message, "message");
  const frames = [head, ...buffers];
  return concat([frameHeader(frames), ...frames]);
}

function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch {
    // Closed already.
  }
}

/** A raw TCP connection that speaks frames by hand, to act as a misbehaving peer. */
class RawPeer {
  readonly conn: Deno.Conn;
  #reader: MessageReader;
  #decoder = new Decoder();

  private constructor(conn: Deno.Conn) {
    this.conn = conn;
    this.#reader = new MessageReader(conn, { frameBytesMax: 1 << 20 });
  }

  static async connect(address: string): Promise<RawPeer> {
    const { host, port } = parseAddress(address);
    return new RawPeer(await Deno.connect({ hostname: host, port }));
  }

  static accept(conn: Deno.Conn): RawPeer {
    return new RawPeer(conn);
  }

  /** The next message; "closed" at end of stream or when the peer reset the connection. */
  async next(): Promise<Record<string, unknown> | "closed"> {
    try {
      const frames = await this.#reader.next();
      if (frames === null) return "closed";
      return this.#decoder.decode(frames[0], frames.slice(1)) as Record<string, unknown>;
    } catch (error) {
      if (error instanceof ConnectionClosedError || error instanceof Deno.errors.ConnectionReset) {
        return "closed";
      }
      throw error;
    }
  }

  async write(bytes: Uint8Array): Promise<void> {
    let done = 0;
    while (done < bytes.length) done += await this.conn.write(bytes.subarray(done));
  }

  close(): void {
    closeQuietly(this.conn);
  }
}

/** A TCP relay to `target` that records every byte both ways. */
function startRelay(target: string) {
  const { host, port } = parseAddress(target);
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const toNode: Uint8Array[] = [];
  const fromNode: Uint8Array[] = [];
  const pipes: Promise<unknown>[] = [];
  const pump = async (from: Deno.Conn, to: Deno.Conn, record: Uint8Array[], done: () => void) => {
    const buf = new Uint8Array(64 * 1024);
    try {
      for (;;) {
        const n = await from.read(buf);
        if (n === null) break;
        record.push(buf.slice(0, n));
        let written = 0;
        while (written < n) written += await to.write(buf.subarray(written, n));
      }
    } catch {
      // Either side went away: the relay closes both.
    } finally {
      done();
    }
  };
  const accepting = (async () => {
    for await (const down of listener) {
      let up: Deno.Conn;
      try {
        up = await Deno.connect({ hostname: host, port });
      } catch {
        closeQuietly(down);
        continue;
      }
      const both = () => {
        closeQuietly(down);
        closeQuietly(up);
      };
      pipes.push(pump(down, up, toNode, both), pump(up, down, fromNode, both));
    }
  })();
  return {
    address: `tcp://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`,
    toNode,
    fromNode,
    async close() {
      listener.close();
      await accepting;
      await Promise.all(pipes);
    },
  };
}

/** Asserts `promise` rejects with an AuthenticationError whose message matches every pattern. */
async function rejectsAuth(promise: Promise<unknown>, ...patterns: RegExp[]): Promise<void> {
  await assert.rejects(promise, (error: Error) => {
    assert.ok(error instanceof AuthenticationError, `expected an AuthenticationError, got ${error}`);
    for (const p of patterns) assert.match(error.message, p);
    return true;
  });
}

// ---- 1. the auth token, in process ----

Deno.test("auth: a cluster with a token computes end to end, worker-to-worker fetches included", async () => {
  await using scheduler = await startScheduler({ port: 0, authToken: TOKEN, log: testLogger("scheduler") });
  await using alice = await startWorker({
    scheduler: scheduler.address,
    name: "alice",
    nthreads: 1,
    authToken: TOKEN,
    log: testLogger("alice"),
  });
  await using bob = await startWorker({
    scheduler: scheduler.address,
    name: "bob",
    nthreads: 1,
    authToken: TOKEN,
    log: testLogger("bob"),
  });
  await using client = await Client.connect(scheduler.address, { authToken: TOKEN });
  const [x] = await client.scatter([1], { workers: ["alice"] });
  const [a] = await client.scatter([2], { workers: ["bob"] });
  assert.ok(alice.data.has(x.key) && !alice.data.has(a.key));
  assert.ok(bob.data.has(a.key) && !bob.data.has(x.key));
  const z = client.submit(add, x, a);
  assert.equal(await z.result(), 3);
  // Whoever ran it fetched the other input from its peer, over an authenticated connection.
  assert.ok(alice.data.has(a.key) || bob.data.has(x.key), "no worker fetched from its peer");
  assert.deepEqual(await client.gather(client.map(add, [1, 2, 3], [10, 20, 30])), [11, 22, 33]);
});

Deno.test("auth: rpc without the token or with a wrong one is refused; the node keeps serving", async () => {
  const { log, warnings } = capture();
  await using scheduler = await startScheduler({ port: 0, authToken: TOKEN, log });
  {
    await using anonymous = rpc(scheduler.address);
    await rejectsAuth(anonymous.ping(), /requires an auth token/, /DIST_AUTH_TOKEN/);
  }
  {
    await using wrong = rpc(scheduler.address, { authToken: WRONG });
    await rejectsAuth(wrong.ping(), /refused/, /wrong auth token/);
  }
  await using right = rpc(scheduler.address, { authToken: TOKEN });
  assert.equal(await right.ping(), "pong");
  assert.deepEqual(await right.workers(), []);
  await eventually(() => warnings().some((w) => /wrong auth token/.test(w)));
  assert.ok(warnings().every((w) => !w.includes(TOKEN) && !w.includes(WRONG)), "a log line shows a token");
});

Deno.test("auth: a raw connection that sends garbage or an op instead of the proof gets one error and is closed", async () => {
  await using scheduler = await startScheduler({ port: 0, authToken: TOKEN, log: testLogger("scheduler") });
  const cases: [string, Uint8Array, RegExp][] = [
    [
      "http",
      text.encode("GET / HTTP/1.1\r\nHost: example\r\n\r\n"),
      /first message must be the auth proof \(Bad frame header/,
    ],
    [
      "huge frame",
      frameHeader([new Uint8Array(0)]).map((b, i) => i === 6 ? 0x10 : b), // declares 1 MiB
      /first message must be the auth proof \(Frame too large/,
    ],
    [
      "op",
      framed({ op: "terminate", id: 1, args: {} }),
      /the first message must be the auth proof \{ proof, nonce \}; this node requires an auth token/,
    ],
  ];
  for (const [what, bytes, expected] of cases) {
    const peer = await RawPeer.connect(scheduler.address);
    try {
      const hello = await peer.next();
      assert.ok(hello !== "closed", `${what}: no hello`);
      assert.equal(hello.dist, PROTOCOL_VERSION);
      assert.equal(hello.auth, "hmac-sha256");
      assert.ok(hello.nonce instanceof Uint8Array && hello.nonce.length === 32, `${what}: bad nonce`);
      await peer.write(bytes);
      const verdict = await peer.next();
      assert.ok(verdict !== "closed", `${what}: closed without saying why`);
      assert.equal(verdict.ok, false, what);
      const error = verdict.error as { name: string; message: string };
      assert.equal(error.name, "AuthenticationError", what);
      assert.match(error.message, /^Authentication failed: /, what);
      assert.match(error.message, expected, what);
      assert.equal(await peer.next(), "closed", `${what}: more than one message, or left open`);
    } finally {
      peer.close();
    }
  }
  // The terminate sent in place of a proof did nothing.
  await using right = rpc(scheduler.address, { authToken: TOKEN });
  assert.equal(await right.ping(), "pong");
});

Deno.test("auth: the proofs are HMAC-SHA256 as PROTOCOL.md gives them (a peer written from the text gets in)", async () => {
  await using scheduler = await startScheduler({ port: 0, authToken: TOKEN, log: testLogger("scheduler") });
  const proofOf = (label: string, a: Uint8Array, b: Uint8Array) =>
    new Uint8Array(createHmac("sha256", TOKEN).update(label).update(a).update(b).digest());
  const peer = await RawPeer.connect(scheduler.address);
  try {
    const hello = await peer.next();
    assert.ok(hello !== "closed" && hello.nonce instanceof Uint8Array, "no hello");
    const nonce = crypto.getRandomValues(new Uint8Array(32));
    await peer.write(framed({ proof: proofOf("client", hello.nonce, nonce), nonce }));
    const verdict = await peer.next();
    assert.ok(verdict !== "closed", "closed without a verdict");
    assert.equal(verdict.ok, true, JSON.stringify(verdict.error));
    assert.deepEqual(verdict.proof, proofOf("server", nonce, hello.nonce));
    await peer.write(framed({ op: "ping", id: 1 }));
    const reply = await peer.next();
    assert.ok(reply !== "closed", "no reply to ping");
    assert.equal(reply.result, "pong");
  } finally {
    peer.close();
  }
});

Deno.test("auth: the token never crosses the wire (every byte of an exchange, both ways)", async () => {
  await using scheduler = await startScheduler({ port: 0, authToken: TOKEN, log: testLogger("scheduler") });
  await using alice = await startWorker({
    scheduler: scheduler.address,
    name: "alice",
    nthreads: 1,
    authToken: TOKEN,
    log: testLogger("alice"),
  });
  const relay = startRelay(alice.address);
  try {
    await using viaRelay = rpc<WorkerOps>(relay.address, { authToken: TOKEN });
    assert.equal(await viaRelay.ping(), "pong");
    await viaRelay.update_data({ data: { note: "visible-payload" } });
    assert.deepEqual(await viaRelay.get_data({ keys: ["note"] }), { note: "visible-payload" });
    await viaRelay.compute({ key: "twice", function: (s: string) => s + s, keys: ["note"] });
  } finally {
    await relay.close();
  }
  const up = concat(relay.toNode);
  const down = concat(relay.fromNode);
  // The capture is real: the handshake and the payload are in it, in clear.
  assert.ok(indexOfBytes(down, text.encode("hmac-sha256")) >= 0, "no hello in the capture");
  assert.ok(indexOfBytes(up, text.encode("visible-payload")) >= 0, "no payload in the capture");
  for (const form of [TOKEN, TOKEN.slice(0, 12), btoa(TOKEN).slice(0, 16)]) {
    const needle = text.encode(form);
    assert.equal(indexOfBytes(up, needle), -1, `client -> node carries ${JSON.stringify(form)}`);
    assert.equal(indexOfBytes(down, needle), -1, `node -> client carries ${JSON.stringify(form)}`);
  }
});

Deno.test("auth: a client that reaches an impostor (no token, bogus proof) refuses it", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const address = `tcp://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`;
  const impostor = (async () => {
    const peer = RawPeer.accept(await listener.accept());
    try {
      await peer.write(framed({
        dist: PROTOCOL_VERSION,
        auth: "hmac-sha256",
        nonce: crypto.getRandomValues(new Uint8Array(32)),
      }));
      const proof = await peer.next();
      assert.ok(proof !== "closed" && proof.proof instanceof Uint8Array, "the client sent no proof");
      await peer.write(framed({ ok: true, proof: crypto.getRandomValues(new Uint8Array(32)) }));
      // The client must hang up, sending nothing more.
      return await peer.next();
    } finally {
      peer.close();
    }
  })();
  try {
    await using victim = rpc(address, { authToken: TOKEN });
    await rejectsAuth(victim.ping(), /does not know the auth token/, /impostor/);
    assert.equal(await impostor, "closed");
  } finally {
    listener.close();
    await impostor.catch(() => {});
  }
});

Deno.test("auth: a client or worker holding a token refuses a server that does not ask for it (downgrade)", async () => {
  // An impostor that skips the challenge: { auth: null }, then answers whatever comes.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const address = `tcp://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`;
  const received: unknown[] = [];
  const impostor = (async () => {
    const peer = RawPeer.accept(await listener.accept());
    try {
      await peer.write(framed({ dist: PROTOCOL_VERSION, auth: null }));
      for (;;) {
        const message = await peer.next();
        if (message === "closed") return;
        received.push(message.op);
        if (typeof message.id === "number") await peer.write(framed({ reply: message.id, result: "pong" }));
      }
    } finally {
      peer.close();
    }
  })();
  let outcome: unknown;
  try {
    await using victim = rpc(address, { authToken: TOKEN, timeoutMs: 2_000 });
    outcome = await victim.ping().then((reply) => reply, (error) => error);
  } finally {
    listener.close();
    await impostor.catch(() => {});
  }
  // A real node without a token: a worker holding one must not register with it.
  await using open = await startScheduler({ port: 0, log: testLogger("scheduler") });
  const worker = await startWorker({
    scheduler: open.address,
    nthreads: 1,
    authToken: TOKEN,
    deathTimeoutMs: 500,
    log: testLogger("worker"),
  }).then((w) => w.close().then(() => "registered"), (error) => error);

  assert.deepEqual(received, [], "the client sent ops to a server that never proved it knows the token");
  assert.ok(outcome instanceof AuthenticationError, `the client got ${String(outcome)}`);
  assert.ok(worker instanceof AuthenticationError, `the worker with a token ${String(worker)}`);
});

Deno.test("auth: a worker with a wrong or no token cannot register, and fails fast", async () => {
  await using scheduler = await startScheduler({ port: 0, authToken: TOKEN, log: testLogger("scheduler") });
  for (
    const [authToken, expected] of [[WRONG, /wrong auth token/], [
      undefined,
      /requires an auth token/,
    ]] as const
  ) {
    const started = performance.now();
    await rejectsAuth(
      startWorker({
        scheduler: scheduler.address,
        nthreads: 1,
        authToken,
        deathTimeoutMs: 20_000,
        log: testLogger("intruder"),
      }),
      expected,
    );
    const ms = performance.now() - started;
    assert.ok(ms < REFUSAL_MS_MAX, `refused after ${Math.round(ms)} ms, not at once`);
  }
  await using s = rpc(scheduler.address, { authToken: TOKEN });
  assert.deepEqual(await s.workers(), []);
});

// ---- 2. the CLI with a token ----

/** Runs `dist ARGS...` to its end. */
async function dist(args: string[], env?: Record<string, string>) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...NODE_PERMISSIONS, MAIN.href, ...args],
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

Deno.test("cli: nodes take the token from DIST_AUTH_TOKEN or --auth-token-file; a short token exits 2", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dist-security-" });
  const nodes: NodeProcess[] = [];
  try {
    const tokenFile = `${dir}/token`;
    await Deno.writeTextFile(tokenFile, `${TOKEN}\n`);
    const shortFile = `${dir}/short`;
    await Deno.writeTextFile(shortFile, "tooshort\n");
    const shortRuns = Promise.all([
      dist(["scheduler", "--port", "0"], { DIST_AUTH_TOKEN: "tooshort" }),
      dist(["scheduler", "--port", "0", "--auth-token-file", shortFile]),
      dist(["worker", "tcp://127.0.0.1:1", "--auth-token", "tooshort"]),
    ]);

    const scheduler = await spawnNode(["scheduler", "--port", "0"], { env: { DIST_AUTH_TOKEN: TOKEN } });
    nodes.push(scheduler);
    const intruder = dist(["worker", scheduler.address, "--nthreads", "1", "--death-timeout", "20"], {
      DIST_AUTH_TOKEN: WRONG,
    });
    const started = await Promise.allSettled([
      spawnNode(["worker", scheduler.address, "--nthreads", "1", "--name", "from-env"], {
        env: { DIST_AUTH_TOKEN: TOKEN },
      }),
      spawnNode([
        "worker",
        scheduler.address,
        "--nthreads",
        "1",
        "--name",
        "from-file",
        "--auth-token-file",
        tokenFile,
      ]),
    ]);
    for (const s of started) if (s.status === "fulfilled") nodes.push(s.value);
    for (const s of started) if (s.status === "rejected") throw s.reason;

    {
      await using client = await Client.connect(scheduler.address, { authToken: TOKEN });
      await using s = rpc(scheduler.address, { authToken: TOKEN });
      assert.deepEqual((await s.workers()).map((w) => w.name).sort(), ["from-env", "from-file"]);
      // Data on one worker, the task pinned to the other: the peer fetch authenticates too.
      const [x] = await client.scatter([20], { workers: ["from-env"] });
      const z = client.submit(add, x, 22, taskOptions({ workers: ["from-file"] }));
      assert.equal(await z.result(), 42);
    }
    await rejectsAuth(Client.connect(scheduler.address), /requires an auth token/);

    const refused = await intruder;
    // 3: refused by its scheduler, a nanny would not start it again.
    assert.equal(refused.code, 3, refused.stderr);
    assert.match(refused.stderr, /wrong auth token/);
    assert.ok(!refused.stderr.includes(WRONG), "the worker printed its token");
    for (const run of await shortRuns) {
      assert.equal(run.code, 2, run.stderr);
      assert.match(run.stderr, /auth token is too short: use at least 16 characters/);
    }
    for (const node of nodes) {
      assert.ok(node.log.every((line) => !line.includes(TOKEN)), "a node logged the token");
    }
  } finally {
    for (const node of nodes.reverse()) await node.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- 3. TLS ----

async function openssl(dir: string, ...args: string[]): Promise<void> {
  const out = await new Deno.Command("openssl", { args, cwd: dir, stdout: "piped", stderr: "piped" })
    .output();
  if (!out.success) {
    throw new Error(`openssl ${args.join(" ")} failed: ${new TextDecoder().decode(out.stderr)}`);
  }
}

const EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/** A self-signed CA, `NAME.pem` and `NAME.key` in `dir`. */
async function makeCa(dir: string, name: string): Promise<string> {
  await openssl(
    dir,
    "req",
    "-x509",
    ...EC_KEY,
    "-keyout",
    `${name}.key`,
    "-out",
    `${name}.pem`,
    "-days",
    "2",
    "-subj",
    `/CN=dist test ${name}`,
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
  );
  return await Deno.readTextFile(`${dir}/${name}.pem`);
}

/** A v3 leaf certificate for 127.0.0.1 signed by CA `ca`, with extended key usage `usage`. */
async function makeCert(dir: string, ca: string, name: string, usage: string): Promise<TlsOptions> {
  await openssl(
    dir,
    "req",
    "-new",
    ...EC_KEY,
    "-keyout",
    `${name}.key`,
    "-out",
    `${name}.csr`,
    "-subj",
    `/CN=${name}`,
  );
  await Deno.writeTextFile(
    `${dir}/${name}.ext`,
    [
      "basicConstraints=critical,CA:FALSE",
      "keyUsage=critical,digitalSignature",
      `extendedKeyUsage=${usage}`,
      "subjectAltName=IP:127.0.0.1",
      "subjectKeyIdentifier=hash",
      "authorityKeyIdentifier=keyid",
    ].join("\n") + "\n",
  );
  const serial = `0x${
    Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("")
  }`;
  await openssl(
    dir,
    "x509",
    "-req",
    "-in",
    `${name}.csr`,
    "-CA",
    `${ca}.pem`,
    "-CAkey",
    `${ca}.key`,
    "-set_serial",
    serial,
    "-days",
    "2",
    "-sha256",
    "-extfile",
    `${name}.ext`,
    "-out",
    `${name}.pem`,
  );
  return {
    cert: await Deno.readTextFile(`${dir}/${name}.pem`),
    key: await Deno.readTextFile(`${dir}/${name}.key`),
  };
}

/** Asserts `promise` rejects with a connection error, promptly (a refusal, not a timeout). */
async function refused(promise: Promise<unknown>, what: string): Promise<void> {
  const started = performance.now();
  await assert.rejects(promise, (error: Error) => {
    assert.ok(
      error instanceof ConnectionClosedError,
      `${what}: expected a ConnectionClosedError, got ${error.name}: ${error.message}`,
    );
    assert.doesNotMatch(error.message, /took over/, `${what}: refused by a timeout, not by TLS`);
    return true;
  });
  const ms = performance.now() - started;
  assert.ok(ms < REFUSAL_MS_MAX, `${what}: refused after ${Math.round(ms)} ms`);
}

Deno.test("tls: tls:// clusters, mutual TLS refusals, and TLS with a token", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "dist-tls-" });
  try {
    const [ca, otherCa] = await Promise.all([makeCa(dir, "ca"), makeCa(dir, "other-ca")]);
    const [server, node, client, stranger] = await Promise.all([
      makeCert(dir, "ca", "server", "serverAuth"),
      // A worker listens (server) and connects to the scheduler and its peers (client).
      makeCert(dir, "ca", "node", "serverAuth,clientAuth"),
      makeCert(dir, "ca", "client", "clientAuth"),
      makeCert(dir, "other-ca", "stranger", "clientAuth"),
    ]);
    const handshakeTimeoutMs = 20_000;

    await t.step("a mutual-TLS cluster computes, worker to worker too; strangers are refused", async () => {
      await using scheduler = await startScheduler({
        port: 0,
        tls: { ...server, ca },
        log: testLogger("scheduler"),
      });
      assert.match(scheduler.address, /^tls:\/\/127\.0\.0\.1:\d+$/);
      const workerOptions = (name: string) => ({
        scheduler: scheduler.address,
        name,
        nthreads: 1,
        tls: { ...node, ca },
        log: testLogger(name),
      });
      await using alice = await startWorker(workerOptions("alice"));
      await using bob = await startWorker(workerOptions("bob"));
      assert.match(alice.address, /^tls:\/\//);
      assert.match(bob.address, /^tls:\/\//);
      {
        await using c = await Client.connect(scheduler.address, { tls: { ...client, ca } });
        const [x] = await c.scatter([1], { workers: ["alice"] });
        const [a] = await c.scatter([2], { workers: ["bob"] });
        assert.equal(await c.submit(add, x, a).result(), 3);
        assert.ok(alice.data.has(a.key) || bob.data.has(x.key), "no worker fetched from its peer");
      }
      const attempts: [string, TlsOptions | undefined][] = [
        ["no client certificate", { ca }],
        ["a certificate from another CA", { ...stranger, ca }],
        ["not trusting the server's CA", { ...client, ca: otherCa }],
        ["no TLS options (system roots)", undefined],
      ];
      for (const [what, tls] of attempts) {
        for (const target of [scheduler.address, alice.address]) {
          await using r = rpc(target, { tls, handshakeTimeoutMs });
          await refused(r.ping(), `${what} -> ${target}`);
        }
        await refused(Client.connect(scheduler.address, { tls, handshakeTimeoutMs }), `client, ${what}`);
      }
      await using ok = rpc(scheduler.address, { tls: { ...client, ca } });
      assert.equal((await ok.workers()).length, 2);
    });

    await t.step("TLS without a CA on the server: any client that trusts it connects", async () => {
      await using scheduler = await startScheduler({ port: 0, tls: server, log: testLogger("scheduler") });
      assert.match(scheduler.address, /^tls:\/\//);
      await using r = rpc(scheduler.address, { tls: { ca } });
      assert.equal(await r.ping(), "pong");
      await using plain = rpc(scheduler.address, { handshakeTimeoutMs });
      await refused(plain.ping(), "untrusted CA");
    });

    await t.step(
      "a tls:// peer that never completes the TLS handshake is given up after handshakeTimeoutMs",
      async () => {
        const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
        const held: Deno.Conn[] = [];
        const holding = (async () => {
          for await (const conn of listener) held.push(conn);
        })();
        const started = performance.now();
        const r = rpc(`tls://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`, {
          tls: { ca },
          handshakeTimeoutMs: 300,
        });
        const ping = r.ping().then(() => "connected", (error: Error) => error);
        let timer: ReturnType<typeof setTimeout> | undefined;
        const outcome = await Promise.race([
          ping,
          new Promise<string>((resolve) =>
            timer = setTimeout(() => resolve("still waiting after 3 s"), 3_000)
          ),
        ]);
        clearTimeout(timer);
        const ms = performance.now() - started;
        // Let a hung attempt end, so nothing is left open.
        for (const conn of held) closeQuietly(conn);
        listener.close();
        await holding;
        await ping;
        await r.close();
        assert.ok(outcome instanceof Error, `a TLS connect to a silent peer: ${String(outcome)}`);
        assert.ok(ms < 2_000, `gave up after ${Math.round(ms)} ms, not after handshakeTimeoutMs (300 ms)`);
      },
    );

    await t.step(
      "a tls:// node closes a TCP connection that never starts TLS after handshakeTimeoutMs",
      async () => {
        await using scheduler = await startScheduler({
          port: 0,
          authToken: TOKEN,
          tls: { ...server, ca },
          handshakeTimeoutMs: 200,
          connectionsMax: 2,
          log: testLogger("scheduler"),
        });
        const { port } = parseAddress(scheduler.address);
        const silent = await Promise.all([1, 2, 3].map(() => Deno.connect({ hostname: "127.0.0.1", port })));
        try {
          const started = performance.now();
          let timer: ReturnType<typeof setTimeout> | undefined;
          const outcome = await Promise.race([
            Promise.all(silent.map((c) => c.read(new Uint8Array(16)).then((n) => n, () => null))),
            new Promise<string>((resolve) =>
              timer = setTimeout(() => resolve("still open after 2.5 s"), 2_500)
            ),
          ]);
          clearTimeout(timer);
          assert.deepEqual(outcome, [null, null, null], "silent pre-TLS connections stay open");
          assert.ok(performance.now() - started < 2_000);
        } finally {
          for (const conn of silent) closeQuietly(conn);
        }
      },
    );

    await t.step("tls:// on every interface with neither a client CA nor a token warns", async () => {
      const open = capture();
      await (await startScheduler({ host: "0.0.0.0", port: 0, tls: server, log: open.log })).close();
      const guarded = capture();
      await (await startScheduler({ host: "0.0.0.0", port: 0, tls: { ...server, ca }, log: guarded.log }))
        .close();
      assert.deepEqual(guarded.warnings().filter((w) => OPEN_WARNING.test(w)), [], "mutual TLS warned");
      // Without a client CA any TLS client gets in: the same warning applies.
      assert.ok(
        open.warnings().some((w) => OPEN_WARNING.test(w)),
        `no warning for tls:// without --tls-ca or a token:\n${open.lines.join("\n")}`,
      );
    });

    await t.step("TLS plus a token: both are needed", async () => {
      await using scheduler = await startScheduler({
        port: 0,
        authToken: TOKEN,
        tls: { ...server, ca },
        log: testLogger("scheduler"),
      });
      await using alice = await startWorker({
        scheduler: scheduler.address,
        name: "alice",
        nthreads: 1,
        authToken: TOKEN,
        tls: { ...node, ca },
        log: testLogger("alice"),
      });
      assert.match(alice.address, /^tls:\/\//);
      {
        await using c = await Client.connect(scheduler.address, { authToken: TOKEN, tls: { ...client, ca } });
        assert.deepEqual(await c.gather(c.map(add, [1, 2], [3, 4])), [4, 6]);
      }
      await using noToken = rpc(scheduler.address, { tls: { ...client, ca } });
      await rejectsAuth(noToken.ping(), /requires an auth token/);
      await using wrongToken = rpc(alice.address, { authToken: WRONG, tls: { ...client, ca } });
      await rejectsAuth(wrongToken.ping(), /wrong auth token/);
      await using noCert = rpc(scheduler.address, { authToken: TOKEN, tls: { ca }, handshakeTimeoutMs });
      await refused(noCert.ping(), "token but no certificate");
      // A worker whose certificate another CA signed never gets in, token or not.
      await assert.rejects(
        startWorker({
          scheduler: scheduler.address,
          nthreads: 1,
          authToken: TOKEN,
          tls: { ...stranger, ca },
          deathTimeoutMs: 500,
          handshakeTimeoutMs,
          log: testLogger("stranger"),
        }),
        ConnectionClosedError,
      );
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- 4. the warning for open listeners ----

Deno.test("warning: listening beyond loopback without a token or TLS says what anyone on the network can do", async () => {
  const open = capture();
  await (await startScheduler({ host: "0.0.0.0", port: 0, log: open.log })).close();
  const warned = open.warnings().filter((w) => OPEN_WARNING.test(w));
  assert.equal(warned.length, 1, open.lines.join("\n"));
  assert.match(warned[0], /0\.0\.0\.0/);
  assert.match(warned[0], /neither an auth token nor client certificates/);
  // The advice is the README's: a token from the environment or a file, not argv (visible in ps).
  assert.match(warned[0], /DIST_AUTH_TOKEN or --auth-token-file/);

  // A worker on every interface warns as well.
  {
    const log = capture();
    await using scheduler = await startScheduler({ port: 0, log: testLogger("scheduler") });
    await (await startWorker({ scheduler: scheduler.address, host: "0.0.0.0", nthreads: 1, log: log.log }))
      .close();
    assert.ok(log.warnings().some((w) => OPEN_WARNING.test(w)), log.lines.join("\n"));
  }

  for (
    const [what, options] of [
      ["a token", { host: "0.0.0.0", authToken: TOKEN }],
      ["loopback only", { host: "127.0.0.1" }],
    ] as const
  ) {
    const quiet = capture();
    await (await startScheduler({ ...options, port: 0, log: quiet.log })).close();
    assert.deepEqual(quiet.warnings().filter((w) => OPEN_WARNING.test(w)), [], what);
  }
});

// ---- 5. sandboxed tasks ----

/** Asserts the task's future rejects with NotCapable naming `permission`. */
async function notCapable(future: Future, permission: string): Promise<void> {
  await assert.rejects(future.result(), (error: TaskError) => {
    assert.equal(error.name, "NotCapable", `${permission}: got ${error.name}: ${error.message}`);
    assert.match(error.message, new RegExp(`Requires ${permission} access`));
    return true;
  });
}

const readFile = async (path: string) => await Deno.readTextFile(path);
const readEnv = (name: string) => Deno.env.get(name) ?? null;

Deno.test("sandbox: tasks get no permissions by default; read and env follow taskPermissions", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dist-sandbox-" });
  try {
    const secret = `${dir}/secret.txt`;
    const other = `${dir}/other.txt`;
    await Deno.writeTextFile(secret, "top secret");
    await Deno.writeTextFile(other, "not yours");

    {
      await using cluster = await startCluster(1);
      await using client = await Client.connect(cluster.scheduler.address);
      const { port } = parseAddress(cluster.scheduler.address);
      await notCapable(client.submit(readFile, secret), "read");
      await notCapable(client.submit(readEnv, "PATH"), "env");
      await notCapable(
        client.submit(
          async (cmd: string) => (await new Deno.Command(cmd, { args: ["hi"] }).output()).code,
          "echo",
        ),
        "run",
      );
      await notCapable(
        client.submit(async (p: number) => {
          const conn = await Deno.connect({ hostname: "127.0.0.1", port: p });
          conn.close();
          return "connected";
        }, port),
        "net",
      );
      await notCapable(
        client.submit(async (path: string) => await Deno.writeTextFile(path, "overwritten"), secret),
        "write",
      );
      assert.equal(await Deno.readTextFile(secret), "top secret");
      // Nor through the side doors: fetch, dynamic import, system information.
      await notCapable(
        client.submit(async (url: string) => (await fetch(url)).status, `http://127.0.0.1:${port}/`),
        "net",
      );
      await notCapable(
        client.submit(async (url: string) => await (await fetch(url)).text(), `file://${secret}`),
        "read",
      );
      await assert.rejects(
        client.submit(
          async (url: string) => Object.keys(await import(url)),
          new URL("../util/log.ts", import.meta.url).href,
        )
          .result(),
        /Requires read access/,
      );
      await notCapable(client.submit(() => Deno.hostname()), "sys");
      // A task cannot hand itself more through a nested worker either.
      await assert.rejects(
        client.submit(() => {
          const w = new Worker("data:text/javascript,close()", {
            type: "module",
            deno: { permissions: { read: true } },
          } as WorkerOptions);
          w.terminate();
          return "escalated";
        }).result(),
        (error: Error) => /NotCapable|PermissionDenied/.test(error.name) || /escalate/i.test(error.message),
      );
      // The worker is still up and computing.
      assert.equal(await client.submit(add, 1, 2).result(), 3);
      await using w = rpc<WorkerOps>(cluster.workers[0].address);
      assert.equal(await w.ping(), "pong");
    }

    {
      await using cluster = await startCluster(1, {
        taskPermissions: {
          read: [secret],
          env: false,
          net: false,
          run: false,
          write: false,
          ffi: false,
          sys: false,
          import: false,
        },
      });
      await using client = await Client.connect(cluster.scheduler.address);
      assert.equal(await client.submit(readFile, secret).result(), "top secret");
      await notCapable(client.submit(readFile, other), "read");
      await notCapable(client.submit(readEnv, "PATH"), "env");
    }

    {
      await using cluster = await startCluster(1, { taskPermissions: "inherit" });
      await using client = await Client.connect(cluster.scheduler.address);
      assert.equal(await client.submit(readEnv, "PATH").result(), Deno.env.get("PATH") ?? null);
      assert.equal(await client.submit(readFile, other).result(), "not yours");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- 6. limits ----

Deno.test("limits: connectionsMax refuses the connection past the limit; the first ones keep working", async () => {
  const { log, warnings } = capture();
  await using scheduler = await startScheduler({ port: 0, connectionsMax: 2, log });
  const first = rpc(scheduler.address);
  const second = rpc(scheduler.address);
  try {
    assert.equal(await first.ping(), "pong");
    assert.equal(await second.ping(), "pong");
    {
      await using third = rpc(scheduler.address);
      await assert.rejects(third.ping(), ConnectionClosedError);
    }
    assert.ok(warnings().some((w) => /2 connections open \(the limit\)/.test(w)), warnings().join("\n"));
    assert.equal(await first.ping(), "pong");
    assert.equal(await second.ping(), "pong");
    // A place freed is a place taken again.
    await first.close();
    await eventually(async () => {
      await using again = rpc(scheduler.address);
      return await again.ping().then(() => true, () => false);
    });
  } finally {
    await first.close();
    await second.close();
  }
});

Deno.test("limits: a connection that never answers the auth challenge is closed after handshakeTimeoutMs", async () => {
  const { log, warnings } = capture();
  const timeoutMs = 200;
  await using scheduler = await startScheduler({
    port: 0,
    authToken: TOKEN,
    handshakeTimeoutMs: timeoutMs,
    log,
  });
  const silent = await RawPeer.connect(scheduler.address);
  const slow = await RawPeer.connect(scheduler.address);
  try {
    const started = performance.now();
    const [hello, other] = await Promise.all([silent.next(), slow.next()]);
    assert.ok(hello !== "closed" && hello.auth === "hmac-sha256");
    assert.ok(other !== "closed" && other.auth === "hmac-sha256");
    // One says nothing; the other starts a message and stalls.
    await slow.write(new Uint8Array([1, 0]));
    const [a, b] = await Promise.all([silent.next(), slow.next()]);
    const ms = performance.now() - started;
    assert.equal(a, "closed");
    assert.equal(b, "closed");
    assert.ok(ms >= timeoutMs * 0.9 && ms < timeoutMs + 2_000, `closed after ${Math.round(ms)} ms`);
    await eventually(() => warnings().filter((w) => /took over 200 ms/.test(w)).length === 2);
  } finally {
    silent.close();
    slow.close();
  }
  await using right = rpc(scheduler.address, { authToken: TOKEN });
  assert.equal(await right.ping(), "pong");
});

Deno.test("limits: frameBytesMax refuses a large update_data with a clear error; the node keeps serving", async () => {
  const { log, warnings } = capture();
  const frameBytesMax = 64 * 1024;
  await using scheduler = await startScheduler({ port: 0, log: testLogger("scheduler") });
  await using worker = await startWorker({ scheduler: scheduler.address, nthreads: 1, frameBytesMax, log });
  let refusal: unknown = null;
  {
    await using big = rpc<WorkerOps>(worker.address);
    await big.update_data({ data: { small: new Uint8Array(1024) } });
    refusal = await big.update_data({ data: { big: new Uint8Array(4 * frameBytesMax) } }).then(
      () => null,
      (error) => error,
    );
  }
  assert.ok(refusal instanceof Error, "the node accepted a message over its frameBytesMax");
  assert.ok(!worker.data.has("big"));
  // The caller's side refused it before sending (the node announced its limit in its
  // hello), so the connection stays up and the node never had to read it.
  assert.equal(warnings().filter((w) => /Frame too large/.test(w)).length, 0);
  await using next = rpc<WorkerOps>(worker.address);
  await next.update_data({ data: { after: 1 } });
  assert.deepEqual(await next.get_data({ keys: ["small", "after"] }), {
    small: new Uint8Array(1024),
    after: 1,
  });
  // The caller learns why too, not only that the connection went away.
  assert.match(
    (refusal as Error).message,
    /too large|over the limit|frameBytesMax|65536/i,
    `the caller got: ${(refusal as Error).name}: ${(refusal as Error).message}`,
  );
});
