/**
 * A protocol fuzzer for dist nodes. It sends, to every op of the worker and the
 * scheduler (the op tables of protocol/ops.ts), three kinds of input over short-lived
 * raw TCP connections:
 *
 *   raw       random frame headers (counts and lengths within and beyond the limits)
 *             and random bytes, text from other protocols, truncated headers
 *   envelope  well-framed `{op, id, args}` with random payloads: valid arguments with
 *             wrong types, missing and extra fields, random values of every kind the
 *             codec carries (bigints, typed arrays in and out of band, Sets, Maps,
 *             Refs, dates), huge ints, deep nesting, long strings, odd encodings
 *   mutation  a valid call for the op, encoded, then bytes flipped, inserted, deleted
 *             or truncated, frames dropped or added, or field values swapped between
 *             ops
 *
 * Each input is made from its own PRNG (xoshiro128**) seeded with the run's seed and
 * the input's index, so a run is reproducible and any one input can be replayed alone
 * (`--only I`). A node closing the connection is fine; a reply must be a valid result
 * or an error reply; a node must never crash, hang, forget data or leak. Before the
 * run it stores canary values on each worker; between batches and at the end it
 * checks with normal calls that every node answers, the canaries are intact, a
 * compute and a submit round trip work, and memory stays bounded.
 *
 * Inputs that could legitimately shut a node down or wipe the canaries are not sent:
 * anything naming `terminate`, a canary key or a real worker's address, and anything
 * that would make a node reach off this machine or import a module from the network.
 *
 * Run: deno task fuzz [--seed N] [--inputs N] [--seconds S] [--concurrency N] [--check-every N]
 * Replay one input of a run: deno task fuzz --seed N --only I (and --show I prints what it sends).
 * Exits non-zero when anything failed; a failure names the seed and the input.
 *
 * @module
 */

import { isDeepStrictEqual, parseArgs } from "node:util";
import { type NodeProcess, spawnNode } from "../client/spawn.ts";
import { BusyError, Client, type Future, Ref, RemoteError, rpc, taskOptions } from "../mod.ts";
import { isLoopback, parseAddress } from "../protocol/address.ts";
import { BIGINT_BYTES_MAX, Decoder, Encoder } from "../protocol/codec.ts";
import { HTTP_BODY_BYTES_MAX } from "../util/http.ts";
import { deadline } from "../util/time.ts";
import { FRAME_BYTES_MAX, frameHeader, MESSAGE_FRAMES_MAX, MessageReader } from "../protocol/framing.ts";
import { clientHandshake, PROTOCOL_VERSION, tokenFromEnv } from "../protocol/handshake.ts";
import { schedulerOps, workerOps } from "../protocol/ops.ts";
import { type Conn, connect } from "../protocol/transport.ts";
import { Rng } from "./rng.ts";

export { Rng };

// ---- options and report ----

/** A node to fuzz. */
export interface FuzzTarget {
  /** Where it listens, `tcp://host:port`. */
  address: string;
  /** Which op table it serves. */
  kind: "worker" | "scheduler";
  /** Its process id, when it runs as a subprocess: its RSS is read from /proc (with `cat`). Absent: in-process. */
  pid?: number;
  /** The node's frame limit, when not the default (the fuzzer predicts which frames it refuses). */
  frameBytesMax?: number;
  /** Its HTTP server (dashboard or metrics), `http://host:port`: it gets huge and slow bodies too. */
  httpUrl?: string;
}

/** Where a run stands, for progress reports. */
export interface FuzzProgress {
  /** Inputs tried so far. */
  done: number;
  /** Inputs the run will try (at most). */
  total: number;
  /** Time since the start, in ms. */
  elapsedMs: number;
  /** Failures so far. */
  failures: number;
  /** Memory at the last check: each node's RSS (or this process's, for in-process nodes), in bytes. */
  rss: Record<string, number>;
}

/** Options of `fuzz`. */
export interface FuzzOptions {
  /** Seeds the PRNG: the same seed gives the same inputs. */
  seed: number;
  /** How many inputs to try. */
  inputs: number;
  /** The nodes; workers get canaries, a scheduler gets submit round trips through those workers. */
  targets: FuzzTarget[];
  /** Stop taking new inputs after this many seconds. */
  seconds?: number;
  /** Only these input indices (to replay a failure); `inputs` is then ignored. */
  only?: number[];
  /** Connections open at once (default 16). */
  concurrency?: number;
  /** Inputs between checks (default 1000). */
  checkEvery?: number;
  /** How long a request may wait for its reply before it counts as hung, in ms (default 10 s). */
  replyTimeoutMs?: number;
  /** Growth of a node's memory (RSS, or heap for in-process nodes) that counts as a leak (default 512 MiB). */
  memoryGrowthMaxBytes?: number;
  /** The nodes' auth token, if they require one (default DIST_AUTH_TOKEN). */
  authToken?: string;
  /** Called after every check. */
  onProgress?: (progress: FuzzProgress) => void;
  /** Called with each failure as it is found. */
  onFailure?: (failure: FuzzFailure) => void;
  /** Stops the run (e.g. a node process died). */
  signal?: AbortSignal;
}

/** The kinds of input: the three protocol ones, HTTP bodies, readers that stop reading. */
export type FuzzCategory = "raw" | "envelope" | "mutation" | "http" | "stall";

/** Something that went wrong: a crash, a hang, a bad reply, lost data, a leak. */
export interface FuzzFailure {
  /** The run's seed. */
  seed: number;
  /** The input that triggered it; null when a check between inputs found it. */
  input: number | null;
  /** Inputs tried when it was found. */
  after: number;
  /** The node, `worker tcp://...`. */
  target: string;
  /** The input's category. */
  category?: FuzzCategory;
  /** The op the input was made for. */
  op?: string;
  /** What went wrong, in one line. */
  what: string;
  /** How the input was made, and the start of its bytes in hex. */
  detail?: string;
}

/** A node's memory at the start and the end of a run. */
export interface FuzzMemory {
  /** Whose memory: a node, or this process (in-process nodes). */
  name: string;
  /** Resident set size at the first and last check, in bytes. */
  rssStart: number;
  rssEnd: number;
  /** The largest RSS seen at a check. */
  rssPeak: number;
  /** V8 heap in use, for in-process nodes. */
  heapStart?: number;
  heapEnd?: number;
}

/** What a run did and found. */
export interface FuzzReport {
  /** The seed. */
  seed: number;
  /** Inputs tried. */
  inputs: number;
  /** How long it took, in ms. */
  elapsedMs: number;
  /** Inputs tried per category. */
  byCategory: Record<FuzzCategory, number>;
  /** Envelope and mutation inputs per op, `worker.get_data`. */
  byOp: Record<string, number>;
  /** Inputs not sent: they could shut a node down, wipe a canary or reach off this machine. */
  skipped: number;
  /** How the nodes answered the fuzzed messages. */
  replies: {
    /** Valid results. */
    result: number;
    /** Error replies. */
    error: number;
    /** Error replies by error name. */
    errorNames: Record<string, number>;
    /** Messages that get no reply (notices, replies, non-envelopes). */
    none: number;
  };
  /** Connections the node closed (malformed input, mostly). */
  closedByNode: number;
  /** Inputs that declared more bytes than the fuzzer sent: the node waits, the fuzzer hangs up. */
  leftOpen: number;
  /** Requests and notices the nodes sent to the fuzzer's connections (as a fake worker or client). */
  nodeRequests: number;
  /** Checks run (ping, canaries, round trips, memory). */
  checks: number;
  /** Ops of the tables with no template for valid arguments (fuzzed with random ones only). */
  untemplated: string[];
  /** Things worth knowing about the run's environment. */
  notes: string[];
  /** Everything that went wrong. */
  failures: FuzzFailure[];
  /** Memory per node. */
  memory: FuzzMemory[];
}

// ---- constants ----

const CANARY_PREFIX = "fuzz-canary";
const CANARY_F64 = `${CANARY_PREFIX}-f64`;
const CANARY_OBJ = `${CANARY_PREFIX}-obj`;
/** Elements of the Float64Array canary: 32 KiB, so it travels out of band. */
const CANARY_F64_LENGTH = 4096;
/** Ids of the fuzzer's own requests on a fuzz connection; fuzzed ids avoid them. */
const SENTINEL_ID = 900_000_000;
const PRELUDE_ID = 900_000_001;
/** A declared frame missing at most this many bytes is completed with padding; longer ones are left open. */
const PAD_BYTES_MAX = 256 * 1024;
const CONCURRENCY = 16;
const CHECK_EVERY = 1_000;
const REPLY_TIMEOUT_MS = 10_000;
const CHECK_TIMEOUT_MS = 15_000;
/** Computes a check runs at once on each worker: more than its executors. */
const CHECK_COMPUTES = 8;
/**
 * Growth of a node's memory that counts as a leak. A subprocess node is measured by its
 * RSS, which holds the allocator's high-water mark too (an arena per executor thread,
 * huge pages): over 345,718 inputs (seed 931242954) each worker stepped up once, by
 * 260-370 MiB, when a rare mix of large concurrent inputs met, and stayed flat from
 * there to the end; a leak keeps growing past any bound.
 */
const MEMORY_GROWTH_MAX_BYTES = 512 * 1024 * 1024;
/** Checks in a row that must see memory past MEMORY_GROWTH_MAX_BYTES before it is a failure. */
const MEMORY_OVER_CHECKS = 2;
/** Tries at making a safe input from one index before it is skipped. */
const ATTEMPTS_MAX = 8;
const HEX_DUMP_BYTES = 192;
/** Longest failure description kept. */
const WHAT_CHARS_MAX = 400;
/** Most failures kept per run; past it they are only counted. */
const FAILURES_MAX = 200;
/** Keys a check deletes per call. */
const DELETE_BATCH = 2_000;
/** Loopback ports where nothing should listen: fake workers live there, and connecting fails at once. */
const FAKE_PORTS = [1, 2, 3, 4, 5, 6, 8];

// ---- bytes ----

/** A growable byte buffer. */
class Sink {
  buf = new Uint8Array(256);
  len = 0;

  #room(n: number): void {
    if (this.len + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.len + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }

  byte(b: number): void {
    this.#room(1);
    this.buf[this.len++] = b & 0xff;
  }

  bytes(b: Uint8Array): void {
    this.#room(b.length);
    this.buf.set(b, this.len);
    this.len += b.length;
  }

  /** Big-endian unsigned integer of `size` bytes (8: any safe integer, or a bigint). */
  uint(n: number | bigint, size: 1 | 2 | 4 | 8): void {
    let v = BigInt.asUintN(size * 8, BigInt(n));
    const out = new Uint8Array(size);
    for (let i = size - 1; i >= 0; i--) {
      out[i] = Number(v & 0xffn);
      v >>= 8n;
    }
    this.bytes(out);
  }

  done(): Uint8Array {
    return this.buf.slice(0, this.len);
  }
}

function concat(parts: readonly Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function message(frames: readonly Uint8Array[]): Uint8Array {
  return concat([frameHeader(frames), ...frames]);
}

function indexOf(haystack: Uint8Array, needle: Uint8Array): number {
  const first = needle[0];
  const last = haystack.length - needle.length;
  outer: for (let i = haystack.indexOf(first); i !== -1 && i <= last; i = haystack.indexOf(first, i + 1)) {
    for (let j = 1; j < needle.length; j++) if (haystack[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

function hex(bytes: Uint8Array, max = HEX_DUMP_BYTES): string {
  const shown = [...bytes.subarray(0, max)].map((b) => b.toString(16).padStart(2, "0")).join(" ");
  return bytes.length > max ? `${shown} ... (${bytes.length} bytes)` : shown;
}

const textEncoder = new TextEncoder();

// ---- an exotic msgpack writer ----

/** Bytes the exotic writer emits as they are (usually not msgpack at all). */
class Raw {
  constructor(readonly bytes: Uint8Array) {}
}

/** A map whose keys need not be strings (the codec's Encoder only writes string keys). */
class Pairs {
  constructor(readonly pairs: [unknown, unknown][]) {}
}

const TYPED_KINDS = new Map<unknown, number>([
  [Uint8Array.prototype, 0],
  [Int8Array.prototype, 1],
  [Uint8ClampedArray.prototype, 2],
  [Int16Array.prototype, 3],
  [Uint16Array.prototype, 4],
  [Int32Array.prototype, 5],
  [Uint32Array.prototype, 6],
  [Float32Array.prototype, 7],
  [Float64Array.prototype, 8],
  [BigInt64Array.prototype, 9],
  [BigUint64Array.prototype, 10],
]);

/**
 * Writes `value` as msgpack the way another implementation might: headers longer
 * than needed, float32, int64 for small numbers, non-string map keys, out-of-band
 * buffers, timestamps in every form, any nesting depth. Returns the frames.
 */
function writeExotic(value: unknown, rng: Rng): Uint8Array[] {
  const buffers: Uint8Array[] = [];
  const extHeader = (sink: Sink, type: number, length: number) => {
    const options: number[] = [0xc9];
    if (length < 0x100) options.push(0xc7);
    if (length < 0x10000) options.push(0xc8);
    const fix = [1, 2, 4, 8, 16].indexOf(length);
    if (fix >= 0) options.push(0xd4 + fix, 0xd4 + fix);
    const h = rng.pick(options);
    sink.byte(h);
    if (h === 0xc7) sink.uint(length, 1);
    else if (h === 0xc8) sink.uint(length, 2);
    else if (h === 0xc9) sink.uint(length, 4);
    sink.byte(type);
  };
  const lengthHeader = (
    sink: Sink,
    n: number,
    fix: number,
    fixMax: number,
    h8: number | null,
    h16: number,
  ) => {
    const options: number[] = [h16 + 1];
    if (n < 0x10000) options.push(h16);
    if (h8 !== null && n < 0x100) options.push(h8);
    if (n < fixMax) options.push(fix, fix);
    const h = rng.pick(options);
    if (h === fix) return sink.byte(fix | n);
    sink.byte(h);
    if (h === h8) sink.uint(n, 1);
    else if (h === h16) sink.uint(n, 2);
    else sink.uint(n, 4);
  };
  const write = (sink: Sink, v: unknown): void => {
    if (v === null || v === undefined) return sink.byte(0xc0);
    if (typeof v === "boolean") return sink.byte(v ? 0xc3 : 0xc2);
    if (typeof v === "number") {
      if (Number.isSafeInteger(v) && !Object.is(v, -0)) {
        const options: [number, 1 | 2 | 4 | 8 | 0][] = [];
        if (v >= 0 && v < 0x80) options.push([v, 0]);
        if (v < 0 && v >= -32) options.push([v & 0xff, 0]);
        if (v >= 0) {
          if (v < 0x100) options.push([0xcc, 1]);
          if (v < 0x10000) options.push([0xcd, 2]);
          if (v < 0x100000000) options.push([0xce, 4]);
          options.push([0xcf, 8]);
        }
        if (v >= -0x80 && v < 0x80) options.push([0xd0, 1]);
        if (v >= -0x8000 && v < 0x8000) options.push([0xd1, 2]);
        if (v >= -0x80000000 && v < 0x80000000) options.push([0xd2, 4]);
        options.push([0xd3, 8]);
        const [h, size] = rng.pick(options);
        sink.byte(h);
        if (size) sink.uint(v, size);
        return;
      }
      const view = new DataView(new ArrayBuffer(8));
      if ((Number.isNaN(v) || Math.fround(v) === v) && rng.chance(0.5)) {
        view.setFloat32(0, v);
        sink.byte(0xca);
        return sink.bytes(new Uint8Array(view.buffer, 0, 4));
      }
      view.setFloat64(0, v);
      sink.byte(0xcb);
      return sink.bytes(new Uint8Array(view.buffer));
    }
    if (typeof v === "bigint") {
      if (v >= -(2n ** 63n) && v < 2n ** 64n && rng.chance(0.3)) {
        sink.byte(v >= 0n ? 0xcf : 0xd3);
        return sink.uint(v, 8);
      }
      // Through hex: byte-at-a-time shifts are quadratic, and cap-sized bigints are fuzzed too.
      const digits = v === 0n ? "" : (v < 0n ? -v : v).toString(16);
      const mag = (digits.length % 2 ? "0" + digits : digits).match(/../g)?.map((h) => parseInt(h, 16)) ?? [];
      const zeros = rng.chance(0.1) ? rng.int(3) : 0; // not canonical, still readable
      extHeader(sink, 1, 1 + zeros + mag.length);
      sink.byte(v < 0n ? 1 : 0);
      for (let i = 0; i < zeros; i++) sink.byte(0);
      return sink.bytes(new Uint8Array(mag));
    }
    if (typeof v === "string") {
      const utf8 = textEncoder.encode(v);
      lengthHeader(sink, utf8.length, 0xa0, 32, 0xd9, 0xda);
      return sink.bytes(utf8);
    }
    if (typeof v !== "object") return sink.byte(0xc0);
    if (v instanceof Raw) return sink.bytes(v.bytes);
    if (Array.isArray(v)) {
      lengthHeader(sink, v.length, 0x90, 16, null, 0xdc);
      for (const item of v) write(sink, item);
      return;
    }
    if (v instanceof Pairs) {
      lengthHeader(sink, v.pairs.length, 0x80, 16, null, 0xde);
      for (const [k, item] of v.pairs) (write(sink, k), write(sink, item));
      return;
    }
    const binary = v instanceof ArrayBuffer
      ? { kind: 12, bytes: new Uint8Array(v) }
      : ArrayBuffer.isView(v) && TYPED_KINDS.has(Object.getPrototypeOf(v))
      ? {
        kind: TYPED_KINDS.get(Object.getPrototypeOf(v))!,
        bytes: new Uint8Array(v.buffer, v.byteOffset, v.byteLength),
      }
      : null;
    if (binary) {
      const { kind, bytes } = binary;
      if (rng.chance(bytes.length >= 4096 ? 0.6 : 0.1)) {
        extHeader(sink, 3, 5);
        sink.byte(kind);
        sink.uint(buffers.length, 4);
        buffers.push(bytes);
        return;
      }
      if (kind === 0 && rng.chance(0.7)) {
        const h = bytes.length < 0x100 ? rng.pick([0xc4, 0xc5, 0xc6]) : bytes.length < 0x10000 ? 0xc5 : 0xc6;
        sink.byte(h);
        sink.uint(bytes.length, h === 0xc4 ? 1 : h === 0xc5 ? 2 : 4);
        return sink.bytes(bytes);
      }
      extHeader(sink, 2, bytes.length + 1);
      sink.byte(kind);
      return sink.bytes(bytes);
    }
    if (v instanceof Date) {
      const ms = v.getTime();
      const sec = Math.floor(ms / 1000);
      const nanos = (ms - sec * 1000) * 1e6;
      if (nanos === 0 && sec >= 0 && sec < 0x100000000 && rng.chance(0.4)) {
        extHeader(sink, 0xff, 4);
        return sink.uint(sec, 4);
      }
      if (sec >= 0 && sec < 2 ** 34 && rng.chance(0.4)) {
        extHeader(sink, 0xff, 8);
        return sink.uint((BigInt(nanos) << 34n) | BigInt(sec), 8);
      }
      extHeader(sink, 0xff, 12);
      sink.uint(nanos, 4);
      return sink.uint(BigInt(sec), 8);
    }
    if (v instanceof Ref) {
      const utf8 = textEncoder.encode(v.key);
      extHeader(sink, 6, utf8.length);
      return sink.bytes(utf8);
    }
    if (v instanceof Set || v instanceof Map) {
      const inner = new Sink();
      const items = v instanceof Set ? [...v] : [...v].flat();
      lengthHeader(inner, items.length, 0x90, 16, null, 0xdc);
      for (const item of items) write(inner, item);
      extHeader(sink, v instanceof Set ? 4 : 5, inner.len);
      return sink.bytes(inner.done());
    }
    const record = v as Record<string, unknown>;
    const keys = Object.keys(record).filter((k) => record[k] !== undefined);
    lengthHeader(sink, keys.length, 0x80, 16, null, 0xde);
    for (const k of keys) (write(sink, k), write(sink, record[k]));
  };
  const head = new Sink();
  write(head, value);
  return [head.done(), ...buffers];
}

// ---- random values ----

const INTS = [
  ...[0, 1, -1, 31, -32, -33, 127, 128, -128, -129, 255, 256, 32767, -32768, 65535, 65536, 1e21],
  ...[31, 32, 53, 63, 64].flatMap((bits) => [2 ** bits - 1, 2 ** bits, -(2 ** bits)]),
  Number.MAX_VALUE,
];
const FLOATS = [
  0.5,
  -0,
  NaN,
  Infinity,
  -Infinity,
  Number.EPSILON,
  Number.MIN_VALUE,
  3.4028234663852886e38,
  1e-7,
];
const BIGINTS = [
  ...[0n, 1n, -1n, 10n ** 100n, -(2n ** 1024n)],
  ...[53n, 63n, 64n].flatMap((bits) => [2n ** bits - 1n, 2n ** bits, -(2n ** bits)]),
];
const ALL_OPS = [...new Set([...Object.keys(workerOps), ...Object.keys(schedulerOps)])];
const FIELD_NAMES = (
  "keys data report key function args source module name fn_id who_has address nthreads nbytes replicas " +
  "workers msg op id reply result error functions tasks wanted fn deps priority retries duration killed " +
  "missing metrics close message stack"
).split(" ");
/** Strings that break naive code: prototype names, odd Unicode, near-miss addresses. Split on "|". */
const STRINGS = [
  ..."| |\0|__proto__|constructor|prototype|toString|hasOwnProperty|valueOf|then|-|a-b-c|ü|日本語".split("|"),
  ..."\u{1F600}|\uD800|\uFFFF|a\u2028b|\r\n|%s%n%x|../../x|null|NaN|OK|pong|() => 1".split("|"),
  ..."tcp://127.0.0.1:0|tcp://127.0.0.1:65535|tcp://127.0.0.1:65536|tcp://127.0.0.1:-1|tcp://127.0.0.1:"
    .split("|"),
  ..."tcp://:1|tcp://[::1]:1|tls://127.0.0.1:1|tcp://[zz]:1".split("|"),
  ...ALL_OPS,
  ...FIELD_NAMES,
];
const SHARED_KEYS = ["x", "y", "z", "a", "b", "inc-1", "add-2", "fz", "k"];

/** Function sources for compute and tasks: plain, failing, unkeepable, not functions. */
const SOURCES = [
  "(x) => x",
  "(a, b) => a + b",
  "() => 1",
  "(...a) => a.length",
  "async (x) => x",
  "x => [x, x]",
  "function (x) { return typeof x }",
  "async function () { return 'async' }",
  "() => { throw new Error('fuzz') }",
  "() => { throw new RangeError('fuzz range') }",
  "() => { throw null }",
  "() => { throw { name: 5, message: [] } }",
  // Errors whose name is not a string, or cannot be read: a task's future once never settled.
  "() => { const e = new Error('fuzz'); e.name = 5; throw e }",
  "() => { const e = new TypeError('fuzz'); Object.defineProperty(e, 'name', { get() { throw 1 } }); throw e }",
  "() => { throw new Proxy(new Error('p'), { get() { throw 1 } }) }",
  "() => { throw Object.create(null) }",
  "() => Promise.reject(42)",
  "() => () => 0",
  "() => Symbol('s')",
  "() => globalThis",
  "() => new Float64Array(4)",
  "() => new Uint8Array(20000)",
  "(x) => ({ x })",
  "() => undefined",
  "() => 10n ** 40n",
  "() => new Map([[1, 2]])",
  "() => new Set(['a'])",
  "() => new Date(0)",
  "(x) => x?.length ?? -1",
  "(a) => { a.push(1); return a }",
  "() => { const o = {}; o.o = o; return o }",
  "() => new Proxy({}, {})",
  "() => new WeakMap()",
  "() => new DataView(new ArrayBuffer(1))",
  "() => Object.create(null)",
  "() => [ , 1]",
  "() => 'x'.repeat(100000)",
  // Tasks that go for their own worker process (signals, the runtime's ops, its argv).
  "() => Deno.kill(Deno.pid, 'SIGSTOP')",
  "() => Deno.kill(Deno.pid, 'SIGKILL')",
  "() => Deno.kill(0, 'SIGTERM')",
  "() => Deno[Deno.internal]?.core?.ops?.op_kill?.(Deno.pid, 'SIGKILL')",
  "() => Deno.args",
  "class {}",
  "42",
  "'not a function'",
  "not javascript (",
  "",
];
const MODULES = [
  { module: "data:text/javascript,export const f = (x) => [x, 1]", name: "f" },
  { module: "data:text/javascript,export const f = 1", name: "f" },
  { module: "data:text/javascript,export const f = (", name: "f" },
  { module: "data:text/javascript,export default () => 2", name: "default" },
  { module: "data:text/javascript,export const f = (x) => x", name: "g" },
  { module: "fuzz:nothing", name: "f" },
];

/** What one input's generators share. */
interface Gen {
  rng: Rng;
  /** Bytes still allowed for large values in this input. */
  budget: number;
  /** Values only the exotic writer can send (non-string keys, raw bytes). */
  exotic: boolean;
  /** Keys this input uses (shared ones collide across inputs; that is the point). */
  keys: string[];
  /** A fake worker address this input may register. */
  fakeAddress: string;
  /** A client id this input may register. */
  clientId: string;
}

function randomInt(rng: Rng): number {
  const r = rng.int(4);
  if (r < 2) return rng.pick(INTS);
  if (r === 2) return rng.int(256) - 128;
  return (rng.chance(0.5) ? -1 : 1) * rng.int(2 ** 53);
}

function randomFloat(rng: Rng): number {
  return rng.chance(0.4) ? rng.pick(FLOATS) : (rng.float() - 0.5) * 10 ** (rng.int(40) - 10);
}

function randomString(g: Gen): string {
  const { rng } = g;
  const r = rng.int(100);
  if (r < 30) return rng.pick(STRINGS);
  if (r < 50) return rng.pick(g.keys);
  if (r < 75) return String.fromCharCode(...Array.from({ length: rng.int(40) }, () => 32 + rng.int(95)));
  if (r < 90) {
    const chars: number[] = [];
    for (let n = rng.int(20); n > 0; n--) {
      chars.push(
        rng.pick([rng.int(0x80), 0x80 + rng.int(0x780), 0xd800 + rng.int(0x800), rng.int(0x110000)]),
      );
    }
    return chars.map((c) => String.fromCodePoint(c)).join("");
  }
  const n = r < 98 || g.budget < 200_000 ? 100 + rng.int(20_000) : 100_000 + rng.int(900_000);
  g.budget -= n;
  if (rng.chance(0.5)) return "x".repeat(n);
  // Latin-1 text from random bytes: two UTF-8 bytes for half of the characters.
  const chunk = new TextDecoder("latin1").decode(rng.bytes(Math.min(n, 60_000)));
  return chunk.repeat(Math.max(1, Math.floor(n / 60_000)));
}

function randomBinary(g: Gen): unknown {
  const { rng } = g;
  let n = rng.pick([0, 1, 7, 8, 64, 255, 256, 1024, 16383, 16384, 16385, 65536, 70000]);
  if (n > g.budget) n = rng.int(64);
  g.budget -= n;
  const bytes = rng.bytes(n);
  const kinds: ((b: ArrayBuffer, n: number) => unknown)[] = [
    (b) => new Uint8Array(b),
    (b) => new Int8Array(b),
    (b) => new Uint8ClampedArray(b),
    (b, n) => new Int16Array(b, 0, n >> 1),
    (b, n) => new Uint16Array(b, 0, n >> 1),
    (b, n) => new Int32Array(b, 0, n >> 2),
    (b, n) => new Uint32Array(b, 0, n >> 2),
    (b, n) => new Float32Array(b, 0, n >> 2),
    (b, n) => new Float64Array(b, 0, n >> 3),
    (b, n) => new BigInt64Array(b, 0, n >> 3),
    (b, n) => new BigUint64Array(b, 0, n >> 3),
    (b) => b,
  ];
  return rng.pick(kinds)(bytes.buffer as ArrayBuffer, n);
}

function randomDate(rng: Rng): Date {
  return new Date(rng.pick([0, -1, 1, 8.64e15, -8.64e15, 1_700_000_000_123, rng.int(2 ** 42) - 2 ** 41]));
}

/**
 * A msgpack timestamp past a JavaScript Date's range (±8.64e15 ms): it decodes to an
 * invalid Date, which cannot be encoded again, so a node that stores it or passes it on
 * must refuse it cleanly (a task forwarded with one once stayed processing for good).
 */
function dateOutOfRange(rng: Rng): Raw {
  const seconds = rng.pick([
    2n ** 63n - 1n,
    -(2n ** 63n),
    8_640_000_000_001n,
    -8_640_000_000_001n,
    2n ** 40n,
  ]);
  const out = new Uint8Array(15);
  const view = new DataView(out.buffer);
  out.set([0xc7, 12, 0xff]);
  view.setUint32(3, rng.int(1_000_000_000));
  view.setBigInt64(7, seconds);
  return new Raw(out);
}

/** A random value of any kind the codec carries (and, when exotic, some it does not). */
function randomValue(g: Gen, depth = 0): unknown {
  const { rng } = g;
  const roll = rng.int(depth > 3 ? 60 : 100);
  if (roll < 8) return rng.pick([null, true, false, undefined]);
  if (roll < 20) return randomInt(rng);
  if (roll < 26) return randomFloat(rng);
  if (roll < 30) {
    if (rng.chance(0.15)) return hugeBigint(g);
    return rng.chance(0.5) ? rng.pick(BIGINTS) : BigInt(randomInt(rng) || 1) ** BigInt(rng.int(9));
  }
  if (roll < 48) return randomString(g);
  if (roll < 54) return randomBinary(g);
  if (roll < 56) return rng.chance(0.25) ? dateOutOfRange(rng) : randomDate(rng);
  if (roll < 60) return new Ref(rng.pick(g.keys));
  if (depth >= 6) return null;
  if (roll < 72) return Array.from({ length: rng.int(6) }, () => randomValue(g, depth + 1));
  if (roll < 85) {
    const out: Record<string, unknown> = {};
    for (let n = rng.int(6); n > 0; n--) {
      const key = rng.chance(0.5) ? rng.pick(FIELD_NAMES) : randomString(g);
      if (key === "__proto__") {
        Object.defineProperty(out, key, {
          value: randomValue(g, depth + 1),
          enumerable: true,
          writable: true,
        });
      } else out[key] = randomValue(g, depth + 1);
    }
    return out;
  }
  if (roll < 88) return new Set(Array.from({ length: rng.int(5) }, () => randomValue(g, depth + 1)));
  if (roll < 91) {
    return new Map(
      Array.from({ length: rng.int(4) }, () => [randomValue(g, depth + 1), randomValue(g, depth + 1)]),
    );
  }
  if (roll < 93) {
    // Deep nesting around the codec's limit of 256 levels.
    const levels = rng.pick([32, 200, 250, 254, 255, 256, 257, 300, 600]);
    let v: unknown = rng.chance(0.5) ? 1 : "leaf";
    const asObject = rng.chance(0.5);
    for (let i = 0; i < levels; i++) v = asObject ? { a: v } : [v];
    return v;
  }
  if (roll < 95 && g.budget > 100_000) {
    const n = 1_000 + rng.int(20_000);
    g.budget -= n * 4;
    if (rng.chance(0.5)) return Array.from({ length: n }, (_, i) => i & 0xff);
    return Object.fromEntries(Array.from({ length: n >> 2 }, (_, i) => [`k${i}`, i]));
  }
  if (g.exotic && roll < 98) {
    return new Pairs(
      Array.from({ length: 1 + rng.int(4) }, () => [randomValue(g, depth + 1), randomValue(g, depth + 1)]),
    );
  }
  if (g.exotic) return new Raw(rng.bytes(1 + rng.int(12)));
  return {};
}

/**
 * A bigint around BIGINT_BYTES_MAX: at the cap, as a bigint the Encoder sends; past it, as
 * raw ext 1 bytes (the Encoder refuses them, so the exotic writer sends them) that the node must
 * refuse at once.
 */
function hugeBigint(g: Gen): unknown {
  const { rng } = g;
  if (rng.chance(0.3)) {
    return (rng.chance(0.5) ? -1n : 1n) * ((1n << BigInt(BIGINT_BYTES_MAX * 8)) - 1n);
  }
  let size = rng.pick([BIGINT_BYTES_MAX, BIGINT_BYTES_MAX + 1, 256 * 1024, 1024 * 1024]);
  // 256 KiB even past the budget: what took a node ~20 s to decode when bigints had no cap.
  if (size > g.budget) size = Math.min(size, 256 * 1024);
  g.budget -= size;
  const bytes = new Uint8Array(7 + size).fill(rng.int(256));
  bytes[0] = 0xc9;
  new DataView(bytes.buffer).setUint32(1, size + 1);
  bytes[5] = 1;
  bytes[6] = rng.int(2);
  return new Raw(bytes);
}

/** A key cut inside a surrogate pair, as `"file-😀x".slice(0, 6)` does: nodes must refuse it. */
function illFormedKey(g: Gen): string {
  const { rng } = g;
  const base = rng.pick(g.keys);
  return rng.pick([`${base}-\u{1F600}x`.slice(0, base.length + 2), `\uDC00${base}`, `${base}\uD800\uD800`]);
}

/** Names every object inherits: an `in` check for unknown fields lets them through. */
const INHERITED_NAMES = [
  "toString",
  "constructor",
  "__proto__",
  "hasOwnProperty",
  "valueOf",
  "isPrototypeOf",
];

// ---- valid arguments, per op ----

function key(g: Gen): string {
  return g.rng.chance(0.02) ? illFormedKey(g) : g.rng.pick(g.keys);
}

function keys(g: Gen): string[] {
  return Array.from({ length: g.rng.int(4) }, () => key(g));
}

function fakeAddress(g: Gen): string {
  const { rng } = g;
  const port = rng.pick(FAKE_PORTS);
  const r = rng.int(10);
  if (r < 6) return `tcp://127.0.0.${1 + rng.int(254)}:${port}`;
  if (r < 8) return `tcp://[::1]:${port}`;
  if (r < 9) return `tls://127.0.0.1:${port}`;
  return `tcp://localhost:${port}`;
}

function functionSpec(g: Gen): unknown {
  return g.rng.chance(0.85) ? { source: g.rng.pick(SOURCES) } : { ...g.rng.pick(MODULES) };
}

function smallValue(g: Gen): unknown {
  return randomValue({ ...g, budget: Math.min(g.budget, 4096), exotic: false }, 3);
}

function maybe<T>(g: Gen, make: () => T): T | undefined {
  return g.rng.chance(0.5) ? make() : undefined;
}

function whoHas(g: Gen): Record<string, string[]> {
  return Object.fromEntries(
    Array.from(
      { length: g.rng.int(3) },
      () => [key(g), Array.from({ length: g.rng.int(3) }, () => fakeAddress(g))],
    ),
  );
}

type Template = (g: Gen) => Record<string, unknown>;

const WORKER_TEMPLATES: Record<string, Template> = {
  get_data: (g) => ({ keys: keys(g) }),
  update_data: (g) => ({
    data: Object.fromEntries(Array.from({ length: g.rng.int(3) }, () => [key(g), smallValue(g)])),
    report: maybe(g, () => g.rng.chance(0.5)),
  }),
  delete_data: (g) => ({ keys: keys(g), report: maybe(g, () => g.rng.chance(0.5)) }),
  keys: () => ({}),
  identity: () => ({}),
  ping: () => ({}),
  compute: (g) => ({
    key: key(g),
    function: functionSpec(g),
    keys: maybe(g, () => keys(g)),
    args: maybe(
      g,
      () =>
        Array.from(
          { length: g.rng.int(3) },
          () => g.rng.chance(0.3) ? new Ref(key(g).toWellFormed()) : smallValue(g),
        ),
    ),
  }),
  compute_task: (g) => ({
    key: key(g),
    fn_id: g.rng.int(6),
    function: maybe(g, () => functionSpec(g)),
    args: Array.from(
      { length: g.rng.int(3) },
      () => g.rng.chance(0.3) ? new Ref(key(g).toWellFormed()) : smallValue(g),
    ),
    who_has: whoHas(g),
  }),
  free_keys: (g) => ({ keys: keys(g) }),
  gather_keys: (g) => ({ who_has: whoHas(g) }),
  cancel_task: (g) => ({ keys: keys(g) }),
};

function graphTask(g: Gen, nfunctions: number, taskKeys: string[]): Record<string, unknown> {
  const deps = Array.from({ length: g.rng.int(3) }, () => g.rng.chance(0.7) ? g.rng.pick(taskKeys) : key(g));
  return {
    key: g.rng.pick(taskKeys),
    fn: g.rng.chance(0.9) ? g.rng.int(Math.max(1, nfunctions)) : nfunctions,
    args: [
      ...deps.map((d) => new Ref(d.toWellFormed())),
      ...Array.from({ length: g.rng.int(2) }, () => smallValue(g)),
    ],
    deps,
    priority: maybe(g, () => randomInt(g.rng)),
    retries: maybe(g, () => g.rng.int(3)),
    workers: maybe(g, () => [g.rng.chance(0.5) ? g.fakeAddress : fakeAddress(g)]),
  };
}

const SCHEDULER_TEMPLATES: Record<string, Template> = {
  register: (g) => ({
    address: g.fakeAddress,
    name: maybe(g, () => randomString(g)),
    nthreads: maybe(g, () => 1 + g.rng.int(4)),
    keys: maybe(g, () => keys(g)),
    nbytes: maybe(g, () => Object.fromEntries(keys(g).map((k) => [k, g.rng.int(1000)]))),
  }),
  unregister: (g) => ({ address: g.rng.chance(0.7) ? g.fakeAddress : fakeAddress(g) }),
  add_keys: (g) => ({
    address: g.fakeAddress,
    keys: keys(g),
    nbytes: maybe(g, () => Object.fromEntries(keys(g).map((k) => [k, g.rng.int(1000)]))),
    replicas: maybe(g, () => g.rng.chance(0.5)),
  }),
  remove_keys: (g) => ({ address: g.fakeAddress, keys: keys(g) }),
  who_has: (g) => ({ keys: maybe(g, () => keys(g)) }),
  has_what: (g) => ({ workers: maybe(g, () => [g.fakeAddress, fakeAddress(g)]) }),
  ncores: () => ({}),
  workers: () => ({}),
  delete_data: (g) => ({ keys: keys(g) }),
  broadcast: (g) => {
    const op = g.rng.pick(Object.keys(WORKER_TEMPLATES));
    return {
      msg: { op, args: maybe(g, () => WORKER_TEMPLATES[op](g)) },
      workers: maybe(g, () => [g.fakeAddress]),
    };
  },
  identity: () => ({}),
  ping: () => ({}),
  register_client: (g) => ({ id: g.clientId }),
  update_graph: (g) => {
    const functions = Array.from({ length: 1 + g.rng.int(2) }, () => functionSpec(g));
    const taskKeys = Array.from({ length: 1 + g.rng.int(3) }, () => key(g));
    const tasks = Array.from({ length: 1 + g.rng.int(3) }, () => graphTask(g, functions.length, taskKeys));
    return { functions, tasks, wanted: taskKeys.filter(() => g.rng.chance(0.8)) };
  },
  release_keys: (g) => ({ keys: keys(g) }),
  cancel_keys: (g) => ({ keys: keys(g) }),
  scatter: (g) => {
    const who = whoHas(g);
    if (g.rng.chance(0.5)) who[key(g)] = [g.fakeAddress];
    return { who_has: who, nbytes: Object.fromEntries(Object.keys(who).map((k) => [k, g.rng.int(100)])) };
  },
  progress: () => ({}),
  task_finished: (g) => ({ key: key(g), nbytes: g.rng.int(1000), duration: g.rng.float() }),
  task_erred: (g) => ({
    key: key(g),
    error: {
      name: g.rng.pick<unknown>(["Error", "TypeError", "X", 5, null, ["Error"]]),
      message: randomString(g),
      stack: maybe(g, () => ""),
    },
    killed: maybe(g, () => g.rng.chance(0.5)),
  }),
  missing_data: (g) => ({ key: key(g), missing: whoHas(g) }),
  heartbeat: (g) => ({
    address: g.fakeAddress,
    metrics: maybe(g, () => ({ nkeys: g.rng.int(10), rss: g.rng.int(2 ** 30) })),
  }),
  retire_workers: (g) => ({
    workers: [g.rng.chance(0.7) ? g.fakeAddress : fakeAddress(g)],
    close: maybe(g, () => g.rng.chance(0.5)),
  }),
};

/** Ops never sent: they shut the node down. */
const EXCLUDED_OPS = new Set(["terminate"]);
/** Scheduler ops that need a client registered on the connection first. */
const CLIENT_OPS = new Set(["update_graph", "release_keys", "scatter", "cancel_keys"]);
/** Scheduler ops that a registered worker sends. */
const WORKER_SIDE_OPS = new Set([
  "add_keys",
  "remove_keys",
  "heartbeat",
  "task_finished",
  "task_erred",
  "missing_data",
  "retire_workers",
  "unregister",
  "has_what",
]);

function opsOf(kind: FuzzTarget["kind"]): string[] {
  return Object.keys(kind === "worker" ? workerOps : schedulerOps).filter((op) => !EXCLUDED_OPS.has(op));
}

function templateOf(kind: FuzzTarget["kind"], op: string): Template | undefined {
  const table = kind === "worker" ? WORKER_TEMPLATES : SCHEDULER_TEMPLATES;
  return Object.hasOwn(table, op) ? table[op] : undefined;
}

function validArgs(kind: FuzzTarget["kind"], op: string, g: Gen): Record<string, unknown> {
  const template = templateOf(kind, op);
  if (template) return template(g);
  // An op added since the templates were written: random fields of random values.
  return Object.fromEntries(
    Array.from({ length: g.rng.int(3) }, () => [g.rng.pick(FIELD_NAMES), smallValue(g)]),
  );
}

/** Valid calls that set a connection up for `op`: a client or a worker registered on it, data to use. */
function prelude(kind: FuzzTarget["kind"], op: string, g: Gen): { op: string; args: unknown }[] {
  const { rng } = g;
  const out: { op: string; args: unknown }[] = [];
  if (kind === "scheduler") {
    if (CLIENT_OPS.has(op) && rng.chance(0.85)) out.push({ op: "register_client", args: { id: g.clientId } });
    if ((WORKER_SIDE_OPS.has(op) && rng.chance(0.8)) || (op === "update_graph" && rng.chance(0.3))) {
      out.push({ op: "register", args: { address: g.fakeAddress, nthreads: 1 + rng.int(3), keys: keys(g) } });
    }
  } else if ((op === "compute" || op === "get_data" || op === "compute_task") && rng.chance(0.3)) {
    out.push({ op: "update_data", args: { data: { [key(g)]: smallValue(g) }, report: rng.chance(0.5) } });
  }
  return out;
}

// ---- inputs ----

/** One input: the bytes to send, and how it was made. */
interface Input {
  index: number;
  target: FuzzTarget;
  category: FuzzCategory;
  op?: string;
  /** How it was made, for the failure report. */
  how: string;
  /** Everything to send after the hello: prelude and fuzzed bytes. */
  bytes: Uint8Array;
  /** Valid calls sent before the fuzzed message. */
  preludeCount: number;
}

const encoder = new Encoder();

/** Encodes a message with the codec's Encoder, or the exotic writer (also when the Encoder refuses it). */
function encodeMessage(value: unknown, g: Gen, exotic: boolean): Uint8Array[] {
  if (!exotic) {
    try {
      const { head, buffers } = encoder.encode(value, "message");
      return [head, ...buffers];
    } catch {
      // Too deep, or a value only the exotic writer can send.
    }
  }
  return writeExotic(value, g.rng);
}

function freshId(rng: Rng): unknown {
  const r = rng.int(100);
  if (r < 80) return 1 + rng.int(1_000_000);
  if (r < 90) return rng.pick([0, -1, 2 ** 53 - 1, -(2 ** 53 - 1), 2 ** 53, 1.5, NaN]);
  return rng.pick(["1", null, true, 2n ** 64n, [], {}, undefined]);
}

function randomOpName(g: Gen, op: string): unknown {
  const { rng } = g;
  const r = rng.int(12);
  if (r === 0) return op.toUpperCase();
  if (r === 1) return `${op} `;
  if (r === 2) return rng.pick(ALL_OPS);
  if (r === 3) return randomString(g);
  if (r === 4) return rng.pick(["", "__proto__", "constructor", "hasOwnProperty", "toString"]);
  if (r === 5) return randomValue(g);
  return op;
}

/** Category b: a well-framed envelope for `op` with a random or broken payload. */
function envelopeInput(kind: FuzzTarget["kind"], op: string, g: Gen): { frames: Uint8Array[]; how: string } {
  const { rng } = g;
  let args: unknown;
  let strategy: string;
  const r = rng.int(100);
  if (r < 12) {
    strategy = "valid";
    args = validArgs(kind, op, g);
  } else if (r < 30) {
    strategy = "wrong-type";
    const valid = validArgs(kind, op, g);
    const fields = Object.keys(valid);
    const field = fields.length > 0 && rng.chance(0.9) ? rng.pick(fields) : rng.pick(FIELD_NAMES);
    valid[field] = randomValue(g);
    args = valid;
  } else if (r < 40) {
    strategy = "missing";
    const valid = validArgs(kind, op, g);
    const fields = Object.keys(valid);
    if (fields.length > 0) delete valid[rng.pick(fields)];
    args = valid;
  } else if (r < 48) {
    strategy = rng.chance(0.3) ? "inherited" : "extra";
    const valid = validArgs(kind, op, g);
    const name = strategy === "inherited"
      ? rng.pick(INHERITED_NAMES)
      : rng.chance(0.5)
      ? rng.pick(FIELD_NAMES)
      : randomString(g);
    // Defined, not assigned: `valid.__proto__ = x` would set the prototype instead of a field.
    // Never undefined: a field whose value is undefined is not sent, and the input would test nothing.
    Object.defineProperty(valid, name, {
      value: randomValue(g) ?? null,
      enumerable: true,
      writable: true,
      configurable: true,
    });
    args = valid;
  } else if (r < 60) {
    strategy = "nested-wrong";
    const valid = validArgs(kind, op, g);
    const fields = Object.keys(valid).filter((f) => typeof valid[f] === "object" && valid[f] !== null);
    if (fields.length > 0) {
      const inner = valid[rng.pick(fields)] as Record<string, unknown> | unknown[];
      if (Array.isArray(inner)) inner[rng.int(inner.length + 1)] = randomValue(g);
      // A typed array's elements take only numbers (or bigints): not a field to break.
      else if (!(inner instanceof Ref) && !ArrayBuffer.isView(inner)) {
        const innerFields = Object.keys(inner);
        inner[innerFields.length > 0 && rng.chance(0.7) ? rng.pick(innerFields) : randomString(g)] =
          randomValue(g);
      }
    }
    args = valid;
  } else if (r < 82) {
    strategy = "random";
    args = randomValue(g);
  } else if (r < 88) {
    strategy = "absent";
    args = rng.pick([undefined, null, {}, []]);
  } else {
    strategy = "other-op";
    const otherKind = rng.chance(0.7) ? kind : kind === "worker" ? "scheduler" : "worker";
    args = validArgs(otherKind, rng.pick(opsOf(otherKind)), g);
  }
  const envelope: Record<string, unknown> = {};
  const fields: [string, () => unknown][] = [
    ["op", () => rng.chance(0.85) ? op : randomOpName(g, op)],
    ["id", () => freshId(rng)],
    ["args", () => args],
  ];
  if (rng.chance(0.1)) fields.push([rng.pick(["reply", "result", "error", "extra"]), () => randomValue(g)]);
  for (let i = fields.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [fields[i], fields[j]] = [fields[j], fields[i]];
  }
  for (const [name, make] of fields) {
    if (name === "args" && strategy === "absent" && rng.chance(0.5)) continue;
    if (name === "id" && rng.chance(0.1)) continue; // a notice
    envelope[name] = make();
  }
  const exotic = g.exotic;
  return {
    frames: encodeMessage(envelope, g, exotic),
    how: `envelope ${strategy}${exotic ? " exotic" : ""}`,
  };
}

/** Bytes that start msgpack values with lengths, or start none. */
const INTERESTING_BYTES =
  "00 7f 80 8f 90 9f a0 bf c0 c1 c4 c6 c7 c9 ca cb cf d3 d4 d8 d9 db dc dd de df e0 ff"
    .split(" ").map((h) => parseInt(h, 16));

/** One random byte-level mutation of `bytes`. */
function mutateBytes(rng: Rng, bytes: Uint8Array, donor: Uint8Array): { bytes: Uint8Array; how: string } {
  const n = bytes.length;
  const at = rng.int(n + 1);
  const out = bytes.slice();
  switch (rng.int(10)) {
    case 0:
      if (n > 0) out[at % n] ^= 1 << rng.int(8);
      return { bytes: out, how: `flip@${at % Math.max(n, 1)}` };
    case 1:
      if (n > 0) out[at % n] = rng.pick(INTERESTING_BYTES);
      return { bytes: out, how: `set@${at % Math.max(n, 1)}` };
    case 2:
      if (n > 0) out[at % n] = rng.u32();
      return { bytes: out, how: `rand@${at % Math.max(n, 1)}` };
    case 3: {
      const k = 1 + rng.int(8);
      return {
        bytes: concat([bytes.subarray(0, at), rng.bytes(k), bytes.subarray(at)]),
        how: `insert${k}@${at}`,
      };
    }
    case 4: {
      const k = 1 + rng.int(8);
      return { bytes: concat([bytes.subarray(0, at), bytes.subarray(at + k)]), how: `delete${k}@${at}` };
    }
    case 5:
      return { bytes: bytes.slice(0, at), how: `truncate@${at}` };
    case 6: {
      const k = 1 + rng.int(16);
      return {
        bytes: concat([bytes.subarray(0, at), bytes.subarray(at, at + k), bytes.subarray(at)]),
        how: `dup${k}@${at}`,
      };
    }
    case 7: {
      if (n > 0) out[at % n] += rng.chance(0.5) ? 1 : -1;
      return { bytes: out, how: `inc@${at % Math.max(n, 1)}` };
    }
    case 8: {
      const size = rng.pick([2, 4]);
      const value = rng.pick([0, 0xffff, 0xffffffff, 0x7fffffff, 0x80000000, 0x10000, 0x100]);
      for (let i = 0; i < size && at + i < n; i++) out[at + i] = value >>> (8 * (size - 1 - i));
      return { bytes: out, how: `int${size}@${at}` };
    }
    default: {
      // Crossover: the start of this call, the rest of another op's call.
      const cut = rng.int(donor.length + 1);
      return { bytes: concat([bytes.subarray(0, at), donor.subarray(cut)]), how: `splice@${at}/${cut}` };
    }
  }
}

/** Category c: a valid call for `op`, then broken at the byte or the field level. */
function mutationInput(
  kind: FuzzTarget["kind"],
  op: string,
  g: Gen,
  id: number,
): { frames: Uint8Array[]; how: string } {
  const { rng } = g;
  const args = validArgs(kind, op, g);
  const otherOp = rng.pick(opsOf(kind));
  const r = rng.int(100);
  if (r < 20) {
    // Swap field values between ops: the other op's values under this op's names.
    const other = validArgs(rng.chance(0.8) ? kind : kind === "worker" ? "scheduler" : "worker", otherOp, g);
    const values = Object.values(other);
    const swapped: Record<string, unknown> = {};
    for (const field of Object.keys(args)) {
      swapped[field] = values.length > 0 && rng.chance(0.6) ? rng.pick(values) : args[field];
    }
    const send = rng.chance(0.7) ? { op, id, args: swapped } : { op: otherOp, id, args };
    return { frames: encodeMessage(send, g, false), how: `mutation swap with ${otherOp}` };
  }
  const frames = encodeMessage({ op, id, args }, g, g.exotic);
  const donor = encodeMessage({ op: otherOp, id, args: validArgs(kind, otherOp, g) }, g, false)[0];
  if (r < 30 && frames.length >= 1) {
    // Frame-level: drop, add, swap or cut out-of-band buffers.
    const how: string[] = [];
    const out = [...frames];
    const k = rng.int(5);
    if (k === 0 && out.length > 1) (out.pop(), how.push("drop-frame"));
    else if (k === 1) (out.push(rng.bytes(rng.int(64))), how.push("add-frame"));
    else if (k === 2 && out.length > 2) ([out[1], out[2]] = [out[2], out[1]], how.push("swap-frames"));
    else if (k === 3 && out.length > 1) {
      (out[1] = out[1].subarray(0, out[1].length - 1 - rng.int(3)), how.push("cut-frame"));
    } else (out.splice(0, 1, ...[out[0], new Uint8Array(0)]), how.push("empty-frame"));
    return { frames: out, how: `mutation ${how.join(",")}` };
  }
  let head = frames[0];
  const how: string[] = [];
  for (let m = 1 + rng.int(rng.chance(0.7) ? 2 : 6); m > 0; m--) {
    const step = mutateBytes(rng, head, donor);
    head = step.bytes;
    how.push(step.how);
  }
  return { frames: [head, ...frames.slice(1)], how: `mutation ${how.join(",")}` };
}

const TEXT_INPUTS = [
  "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
  "SSH-2.0-OpenSSH_9.0\r\n",
  '{"op":"ping","id":1}\n',
  "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
  "PING\r\n",
  "\0\0\0\0",
];

/** Category a: raw bytes, mostly frame headers that lie. */
function rawInput(g: Gen, frameBytesMax: number): { bytes: Uint8Array; how: string } {
  const { rng } = g;
  const r = rng.int(100);
  if (r < 10) return { bytes: rng.bytes(1 + rng.int(512)), how: "raw garbage" };
  if (r < 16) return { bytes: textEncoder.encode(rng.pick(TEXT_INPUTS)), how: "raw text" };
  if (r < 22) {
    // A valid ping, then garbage.
    const ping = message(encodeMessage({ op: "ping", id: 1 + rng.int(100) }, g, false));
    return { bytes: concat([ping, rng.bytes(rng.int(64))]), how: "raw ping+garbage" };
  }
  if (r < 28) {
    // Part of a header: the node must wait, not fail.
    const header = frameHeader([new Uint8Array(rng.int(100))]);
    return { bytes: header.subarray(0, rng.int(header.length)), how: "raw partial-header" };
  }
  if (r < 36) {
    // A valid envelope in frame 0 followed by unreferenced frames (ignored by the node).
    const head = encodeMessage({ op: "ping", id: 1 + rng.int(100), args: {} }, g, false)[0];
    const count = rng.pick([2, 3, 16, MESSAGE_FRAMES_MAX - 1, MESSAGE_FRAMES_MAX, MESSAGE_FRAMES_MAX + 1]);
    const frames = [head, ...Array.from({ length: count - 1 }, () => rng.bytes(rng.int(4)))];
    return { bytes: message(frames), how: `raw ${count}-frames` };
  }
  // A header with interesting counts and lengths, then some body.
  const count = rng.pick([
    0,
    1,
    1,
    1,
    2,
    3,
    MESSAGE_FRAMES_MAX,
    MESSAGE_FRAMES_MAX + 1,
    0xffffffff,
    rng.u32(),
  ]);
  const frames = Math.min(count, 8 + rng.int(4));
  const header = new Sink();
  const view = new DataView(new ArrayBuffer(4));
  view.setUint32(0, count, true);
  header.bytes(new Uint8Array(view.buffer));
  const lengths: number[] = [];
  for (let i = 0; i < frames; i++) {
    const n = rng.pick([
      0,
      1,
      5,
      rng.int(64),
      rng.int(4096),
      64 * 1024 - 1,
      64 * 1024,
      64 * 1024 + 1,
      frameBytesMax - 1,
      frameBytesMax,
      frameBytesMax + 1,
      2 ** 53 - 1,
      2 ** 53,
      2 ** 64 - 1,
    ]);
    lengths.push(n);
    const le = new Uint8Array(8);
    let v = BigInt.asUintN(64, BigInt(n));
    for (let b = 0; b < 8; b++, v >>= 8n) le[b] = Number(v & 0xffn);
    header.bytes(le);
  }
  const declared = lengths.reduce((a, b) => a + b, 0);
  const body = rng.chance(0.3) && declared < 4096
    ? tokens(g, declared)
    : rng.bytes(Math.min(rng.chance(0.5) ? declared : rng.int(declared + 1), 4096));
  return {
    bytes: concat([header.done(), body]),
    how: `raw header count=${count} lengths=${lengths.join(",")}`,
  };
}

/** About `n` bytes of msgpack-looking tokens: plausible type bytes with random lengths. */
function tokens(g: Gen, n: number): Uint8Array {
  const { rng } = g;
  const sink = new Sink();
  while (sink.len < n) {
    const t = rng.pick([0x80, 0x90, 0xa0, 0xc0, 0xc2, 0xc4, 0xc7, 0xcc, 0xd4, 0xd9, 0xdc, 0xde, 0xe0, 0x00]);
    sink.byte(t | (t < 0xc0 ? rng.int(16) : 0));
    if (t >= 0xc4) sink.byte(rng.int(256));
    if (rng.chance(0.3)) sink.bytes(textEncoder.encode(rng.pick(ALL_OPS)));
  }
  return sink.done().subarray(0, n);
}

// ---- predicting what the node does with the bytes ----

/** A message as the node will see it, and what it owes. */
interface Planned {
  /** Request ids the node owes a reply (one entry per request). */
  replyIds: number[];
  /** The node must close the connection (bad header or malformed msgpack). */
  mustClose: boolean;
  /** The stream stops inside a message: the node waits for more. */
  open: boolean;
  /** Bytes still missing when open. */
  missing: number;
  /** Every message decoded. */
  decoded: unknown[];
  /** The fuzzed message's reply id, if it is a request. */
  fuzzReplyId?: number;
}

const decoder = new Decoder();

/** Splits `stream` into messages the way the node's reader does, and decodes them. */
function plan(stream: Uint8Array, frameBytesMax: number): Planned {
  const out: Planned = { replyIds: [], mustClose: false, open: false, missing: 0, decoded: [] };
  const view = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  let at = 0;
  while (at < stream.length) {
    if (stream.length - at < 4) return { ...out, open: true, missing: 4 - (stream.length - at) };
    const count = view.getUint32(at, true);
    if (count < 1 || count > MESSAGE_FRAMES_MAX) return { ...out, mustClose: true };
    const headerBytes = 4 + 8 * count;
    if (stream.length - at < headerBytes) {
      return { ...out, open: true, missing: headerBytes - (stream.length - at) };
    }
    let total = 0;
    const lengths: number[] = [];
    for (let i = 0; i < count; i++) {
      const lo = view.getUint32(at + 4 + 8 * i, true);
      const hi = view.getUint32(at + 8 + 8 * i, true);
      const n = hi * 0x100000000 + lo;
      if (hi >= 0x200000 || n > frameBytesMax) return { ...out, mustClose: true };
      total += n;
      lengths.push(n);
    }
    if (total > frameBytesMax) return { ...out, mustClose: true };
    if (stream.length - at - headerBytes < total) {
      return { ...out, open: true, missing: total - (stream.length - at - headerBytes) };
    }
    let p = at + headerBytes;
    const frames = lengths.map((n) => {
      const f = stream.subarray(p, p + n);
      p += n;
      return f;
    });
    at = p;
    let m: unknown;
    try {
      m = decoder.decode(frames[0].slice(), frames.slice(1).map((f) => f.slice()));
    } catch {
      return { ...out, mustClose: true };
    }
    out.decoded.push(m);
    if (typeof m !== "object" || m === null || Array.isArray(m)) continue;
    const e = m as Record<string, unknown>;
    if (typeof e.reply === "number") continue;
    const hasId = typeof e.id === "number" && Number.isSafeInteger(e.id);
    if (hasId) out.replyIds.push(e.id as number);
  }
  return out;
}

// ---- safety: what is never sent ----

const FORBIDDEN_SCHEMES = /^(npm|jsr|https?|file|node|blob|wss?|ftp):/i;

function unsafeString(s: string): boolean {
  if (FORBIDDEN_SCHEMES.test(s)) return true;
  if (/^(tcp|tls):\/\//i.test(s)) {
    try {
      return !isLoopback(parseAddress(s).host);
    } catch {
      return false;
    }
  }
  return false;
}

function walkUnsafe(v: unknown, depth = 0): boolean {
  if (depth > 300) return false;
  if (typeof v === "string") return unsafeString(v);
  if (typeof v !== "object" || v === null) return false;
  if (v instanceof Ref) return unsafeString(v.key);
  if (Array.isArray(v) || v instanceof Set) {
    for (const item of v) if (walkUnsafe(item, depth + 1)) return true;
    return false;
  }
  if (v instanceof Map) {
    for (const [k, item] of v) if (walkUnsafe(k, depth + 1) || walkUnsafe(item, depth + 1)) return true;
    return false;
  }
  if (ArrayBuffer.isView(v) || v instanceof ArrayBuffer || v instanceof Date) return false;
  for (const [k, item] of Object.entries(v)) if (unsafeString(k) || walkUnsafe(item, depth + 1)) return true;
  return false;
}

// ---- talking to a node ----

interface Outcome {
  fuzzReply: "result" | "error" | "none" | "missing";
  errorName?: string;
  closedByNode: boolean;
  leftOpen: boolean;
  nodeRequests: number;
  problems: string[];
}

async function writeAll(conn: Pick<Conn, "write">, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.length) done += await conn.write(bytes.subarray(done));
}

function timeout(ms: number): { promise: Promise<"timeout">; cancel: () => void } {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const promise = new Promise<"timeout">((resolve) => timer = setTimeout(() => resolve("timeout"), ms));
  return { promise, cancel: () => clearTimeout(timer) };
}

/** Messages JavaScript gives for faults in the code itself, not for bad input it checked. */
const ENGINE_FAULT =
  /Cannot read properties of|is not a function|is not iterable|Cannot convert|Maximum call stack|is not defined|Invalid array length|Cannot destructure|could not be cloned|The executor failed/;

/**
 * An error reply that is a fault in dist's own code (a TypeError from a handler that
 * trusted its input, an executor that broke), not a refusal or an error of a task's
 * function: the message is the engine's, and the stack starts in one of dist's files.
 */
function internalFault(error: Record<string, unknown>): string | null {
  const message = String(error.message);
  // A function's source that throws while it is evaluated is the task's error, reported as such.
  if (!ENGINE_FAULT.test(message) || /^The function's source does not compile/.test(message)) return null;
  if (/The executor failed/.test(message)) return message;
  const top = String(error.stack ?? "").split("\n").find((line) => line.trimStart().startsWith("at "));
  if (top === undefined || /eval at|<anonymous>|data:/.test(top) || !/file:\/\//.test(top)) return null;
  return `${message} ${top.trim()}`;
}

function checkReplyShape(m: Record<string, unknown>): string | null {
  if ("error" in m) {
    if ("result" in m) return "a reply with both result and error";
    const e = m.error as Record<string, unknown> | null;
    if (typeof e !== "object" || e === null) return `an error reply whose error is ${typeof e}`;
    if (typeof e.name !== "string" || typeof e.message !== "string") {
      return `an error reply without string name and message: ${JSON.stringify(e).slice(0, 200)}`;
    }
    if (e.stack !== undefined && typeof e.stack !== "string") return "an error reply with a non-string stack";
    const fault = internalFault(e);
    if (fault) return `an error reply from a fault in the node's code: ${fault}`;
  }
  return null;
}

/** What a node says first. */
interface Hello {
  reader: MessageReader;
  /** The largest message the node accepts, if it says. */
  frameBytesMax?: number;
}

/**
 * Reads the node's hello on a raw connection (and, with a token, proves it); the
 * reader then reads replies under the normal frame limit. A string says what was wrong.
 */
async function openRaw(conn: Conn, authToken: string | undefined): Promise<Hello | string> {
  if (authToken) {
    // The proof is the handshake module's business; older versions resolved the reader itself.
    const shake = await clientHandshake(conn, { authToken }) as unknown as { reader?: MessageReader };
    const reader = shake.reader ?? shake as unknown as MessageReader;
    reader.configure({ frameBytesMax: FRAME_BYTES_MAX });
    return { reader };
  }
  const reader = new MessageReader(conn);
  const frames = await reader.next();
  if (frames === null) return "the node closed the connection before its hello";
  const hello = new Decoder().decode(frames[0], frames.slice(1)) as Record<string, unknown> | null;
  if (typeof hello !== "object" || hello === null || hello.dist !== PROTOCOL_VERSION) {
    return `the node's hello is not {dist: ${PROTOCOL_VERSION}, ...}: ${Deno.inspect(hello).slice(0, 200)}`;
  }
  if (hello.auth !== null && hello.auth !== undefined) {
    return `the node asks for an auth token (${String(hello.auth)}): set DIST_AUTH_TOKEN or pass authToken`;
  }
  const limit = hello.frame_bytes_max;
  return { reader, frameBytesMax: typeof limit === "number" ? limit : undefined };
}

/** Sends one input on a fresh connection and watches what the node does. */
async function send(
  input: Input,
  expect: Planned,
  options: { replyTimeoutMs: number; authToken?: string; rng: Rng; mayBeClosed: boolean },
): Promise<Outcome> {
  const outcome: Outcome = {
    fuzzReply: expect.fuzzReplyId === undefined ? "none" : "missing",
    closedByNode: false,
    leftOpen: expect.open,
    nodeRequests: 0,
    problems: [],
  };
  const conn = await connect(parseAddress(input.target.address));
  let hungUp = false;
  const hangUp = () => {
    hungUp = true;
    conn.close();
  };
  try {
    const handshake = timeout(options.replyTimeoutMs);
    const hello = await Promise.race([openRaw(conn, options.authToken), handshake.promise]).finally(
      handshake.cancel,
    );
    if (hello === "timeout") {
      outcome.problems.push("no hello from the node");
      return outcome;
    }
    if (typeof hello === "string") {
      outcome.problems.push(hello);
      return outcome;
    }
    const reader = hello.reader;
    const owed = new Map<number, number>();
    for (const id of expect.replyIds) owed.set(id, (owed.get(id) ?? 0) + 1);
    let writing = Promise.resolve();
    const queueWrite = (bytes: Uint8Array) => {
      writing = writing.then(() => writeAll(conn, bytes)).catch(() => {});
      return writing;
    };
    const gen = genFor(options.rng, input.index);
    const replyDecoder = new Decoder();
    const done = () => owed.size === 0 && !expect.mustClose;
    const reading = (async () => {
      try {
        for (;;) {
          const frames = await reader.next();
          if (frames === null) {
            outcome.closedByNode = true;
            return;
          }
          let m: unknown;
          try {
            m = replyDecoder.decode(frames[0], frames.slice(1));
          } catch (error) {
            outcome.problems.push(`the node sent malformed msgpack: ${(error as Error).message}`);
            return;
          }
          if (typeof m !== "object" || m === null || Array.isArray(m)) {
            outcome.problems.push(`the node sent a non-envelope: ${String(m).slice(0, 80)}`);
            continue;
          }
          const e = m as Record<string, unknown>;
          if (typeof e.reply === "number") {
            const left = owed.get(e.reply);
            if (left === undefined) {
              outcome.problems.push(`a reply to id ${e.reply}, which no request of this connection had`);
              continue;
            }
            if (left > 1) owed.set(e.reply, left - 1);
            else owed.delete(e.reply);
            const shape = checkReplyShape(e);
            if (shape) outcome.problems.push(shape);
            if (e.reply === SENTINEL_ID && e.result !== "pong") {
              outcome.problems.push(`ping answered ${JSON.stringify(e.result ?? e.error).slice(0, 200)}`);
            }
            if (e.reply === expect.fuzzReplyId && outcome.fuzzReply === "missing") {
              if ("error" in e) {
                outcome.fuzzReply = "error";
                outcome.errorName = String((e.error as Record<string, unknown> | null)?.name);
              } else outcome.fuzzReply = "result";
            }
            if (done()) return;
            continue;
          }
          // The node calls us: as a fake worker (delete_data, broadcast, compute_task) or a client.
          outcome.nodeRequests++;
          const id = e.id;
          if (typeof id === "number" && Number.isSafeInteger(id)) {
            const r = options.rng.int(10);
            const reply = r < 6
              ? { reply: id, error: { name: "FuzzError", message: "a fuzzer's fake peer", stack: "" } }
              : r < 9
              ? { reply: id, result: randomValue(gen) }
              : { reply: id, error: randomValue(gen) };
            queueWrite(message(encodeMessage(reply, gen, false)));
          }
        }
      } catch {
        if (!hungUp) outcome.closedByNode = true;
      }
    })();
    queueWrite(input.bytes);
    if (!expect.open && !expect.mustClose) {
      owed.set(SENTINEL_ID, (owed.get(SENTINEL_ID) ?? 0) + 1);
      queueWrite(message(encodeMessage({ op: "ping", id: SENTINEL_ID, args: {} }, gen, false)));
    }
    if (expect.open && owed.size === 0) {
      // The node waits for bytes that never come: let it read the header, then hang up.
      await writing;
      await new Promise((resolve) => setTimeout(resolve, options.rng.int(3)));
      hangUp();
      await reading;
      return outcome;
    }
    const late = timeout(options.replyTimeoutMs);
    const result = await Promise.race([reading, late.promise]).finally(late.cancel);
    if (result === "timeout") {
      if (expect.mustClose) {
        outcome.problems.push("the node did not close the connection after malformed input");
      } else {
        const ids = [...owed.keys()].map((id) =>
          id === SENTINEL_ID ? "a ping sent after the input" : `id ${id}`
        );
        outcome.problems.push(`hang: no reply to ${ids.join(", ")} within ${options.replyTimeoutMs} ms`);
      }
    } else if (outcome.closedByNode && !expect.mustClose && owed.size > 0 && !options.mayBeClosed) {
      outcome.problems.push("the node closed the connection after well-formed input");
    } else if (!outcome.closedByNode && expect.mustClose) {
      outcome.problems.push("the node kept the connection open after malformed input");
    }
    hangUp();
    await reading;
    return outcome;
  } finally {
    hangUp();
  }
}

function genFor(rng: Rng, index: number): Gen {
  return {
    rng,
    budget: 4096,
    exotic: false,
    keys: SHARED_KEYS,
    fakeAddress: "tcp://127.0.0.1:1",
    clientId: `fuzz-reply-${index}`,
  };
}

// ---- the run ----

interface RunState {
  options: Required<
    Pick<FuzzOptions, "seed" | "concurrency" | "checkEvery" | "replyTimeoutMs" | "memoryGrowthMaxBytes">
  >;
  targets: FuzzTarget[];
  authToken?: string;
  report: FuzzReport;
  forbidden: Uint8Array[];
  /** Each node's frame limit, as its hello announced. */
  limits: Map<FuzzTarget, number>;
  started: number;
  fatal: boolean;
  checks: number;
  onFailure?: (failure: FuzzFailure) => void;
  memory: Map<string, FuzzMemory & { over: boolean; overChecks: number }>;
}

/** The largest message `target` accepts: as configured, else as its hello said, else the default. */
function limitOf(state: RunState, target: FuzzTarget): number {
  return target.frameBytesMax ?? state.limits.get(target) ?? FRAME_BYTES_MAX;
}

function describeTarget(t: FuzzTarget): string {
  return `${t.kind} ${t.address}`;
}

function fail(state: RunState, failure: Omit<FuzzFailure, "seed" | "after">): void {
  const what = failure.what.length > WHAT_CHARS_MAX
    ? `${failure.what.slice(0, WHAT_CHARS_MAX)}...`
    : failure.what;
  const full: FuzzFailure = { seed: state.options.seed, after: state.report.inputs, ...failure, what };
  if (state.report.failures.length < FAILURES_MAX) state.report.failures.push(full);
  state.onFailure?.(full);
}

/** Makes input `index`: the same seed and index always give the same bytes. */
function makeInput(state: RunState, index: number, attempt: number): Input {
  const rng = new Rng(state.options.seed, index, attempt);
  const target = state.targets[rng.int(state.targets.length)];
  const g: Gen = {
    rng,
    budget: rng.chance(0.02) ? 2_000_000 : 64 * 1024,
    exotic: rng.chance(0.2),
    keys: [...SHARED_KEYS, `fz-${rng.u32().toString(36)}`, `fz-${rng.u32().toString(36)}-1`],
    fakeAddress: "",
    clientId: `fuzz-client-${state.options.seed}-${index}-${attempt}`,
  };
  g.fakeAddress = fakeAddress(g);
  const frameBytesMax = limitOf(state, target);
  const roll = rng.int(100);
  if (roll < 25) {
    const { bytes, how } = rawInput(g, frameBytesMax);
    return { index, target, category: "raw", how, bytes, preludeCount: 0 };
  }
  const op = rng.pick(opsOf(target.kind));
  const setup = prelude(target.kind, op, g).map((call, i) =>
    message(encodeMessage({ op: call.op, id: PRELUDE_ID + i, args: call.args }, g, false))
  );
  const category: FuzzCategory = roll < 65 ? "envelope" : "mutation";
  const made = category === "envelope"
    ? envelopeInput(target.kind, op, g)
    : mutationInput(target.kind, op, g, 1 + rng.int(1_000_000));
  let body = message(made.frames);
  let how = made.how;
  if (rng.chance(0.03)) {
    // The header lies about the lengths of well-made frames.
    const step = mutateBytes(rng, body.subarray(0, 4 + 8 * made.frames.length), body);
    body = concat([step.bytes, body.subarray(4 + 8 * made.frames.length)]);
    how += ` header-${step.how}`;
  }
  const prefix = setup.length ? `prelude ${setup.length}, ` : "";
  return {
    index,
    target,
    category,
    op,
    how: `${prefix}${how}`,
    bytes: concat([...setup, body]),
    preludeCount: setup.length,
  };
}

function unsafeInput(state: RunState, input: Input, expect: Planned): boolean {
  for (const f of state.forbidden) if (indexOf(input.bytes, f) >= 0) return true;
  return expect.decoded.some((m) => walkUnsafe(m));
}

/** Makes input `index`, trying again (deterministically) while it is unsafe; null to skip it. */
function safeInput(state: RunState, index: number): { input: Input; expect: Planned } | null {
  for (let attempt = 0; attempt < ATTEMPTS_MAX; attempt++) {
    const candidate = makeInput(state, index, attempt);
    const frameBytesMax = limitOf(state, candidate.target);
    let planned = plan(candidate.bytes, frameBytesMax);
    if (planned.open && planned.missing <= PAD_BYTES_MAX) {
      // Complete what the header declared, so the node reads the whole message.
      const rng = new Rng(state.options.seed, index, attempt, 1);
      candidate.bytes = concat([candidate.bytes, rng.bytes(planned.missing)]);
      candidate.how += ` padded ${planned.missing}`;
      planned = plan(candidate.bytes, frameBytesMax);
    }
    if (unsafeInput(state, candidate, planned)) continue;
    // The fuzzed message is the last one decoded (the prelude comes first).
    const last = planned.decoded.length > candidate.preludeCount ? planned.decoded.at(-1) : undefined;
    if (typeof last === "object" && last !== null && !Array.isArray(last)) {
      const e = last as Record<string, unknown>;
      if (typeof e.reply !== "number" && typeof e.id === "number" && Number.isSafeInteger(e.id)) {
        planned.fuzzReplyId = e.id;
      }
    }
    return { input: candidate, expect: planned };
  }
  return null;
}

async function runInput(state: RunState, index: number): Promise<void> {
  if (await connectionInput(state, index)) return;
  let made: { input: Input; expect: Planned } | null;
  try {
    made = safeInput(state, index);
  } catch (error) {
    // The fuzzer's own bug: say so, and go on with the other inputs.
    fail(state, {
      input: index,
      target: "the fuzzer",
      what: `cannot make the input: ${(error as Error).stack}`,
    });
    return;
  }
  if (made === null) {
    state.report.skipped++;
    return;
  }
  const { input, expect } = made;
  const report = state.report;
  report.inputs++;
  report.byCategory[input.category]++;
  const opName = `${input.target.kind}.${input.op}`;
  if (input.op) report.byOp[opName] = (report.byOp[opName] ?? 0) + 1;
  const mayBeClosed = input.target.kind === "scheduler" &&
    expect.decoded.some((m) =>
      typeof m === "object" && m !== null && (m as Record<string, unknown>).op === "register"
    );
  let outcome: Outcome;
  try {
    outcome = await send(input, expect, {
      replyTimeoutMs: state.options.replyTimeoutMs,
      authToken: state.authToken,
      rng: new Rng(state.options.seed, index, 2),
      mayBeClosed,
    });
  } catch (error) {
    state.fatal = true;
    fail(state, {
      input: index,
      target: describeTarget(input.target),
      category: input.category,
      op: input.op,
      what: `cannot connect: ${(error as Error).message}`,
      detail: `${input.how}\n${hex(input.bytes)}`,
    });
    return;
  }
  if (outcome.fuzzReply === "result" && / envelope inherited/.test(` ${input.how}`)) {
    outcome.problems.push("args with an inherited field name (toString, __proto__, ...) were accepted");
  }
  if (outcome.fuzzReply === "result") report.replies.result++;
  else if (outcome.fuzzReply === "error") {
    report.replies.error++;
    const name = outcome.errorName ?? "?";
    report.replies.errorNames[name] = (report.replies.errorNames[name] ?? 0) + 1;
  } else if (outcome.fuzzReply === "none") report.replies.none++;
  if (outcome.closedByNode) report.closedByNode++;
  if (outcome.leftOpen) report.leftOpen++;
  report.nodeRequests += outcome.nodeRequests;
  for (const problem of outcome.problems) {
    fail(state, {
      input: index,
      target: describeTarget(input.target),
      category: input.category,
      op: input.op,
      what: problem,
      detail: `${input.how}\n${hex(input.bytes)}`,
    });
  }
}

// ---- HTTP bodies, and readers that stop reading ----

/** Share of inputs that are HTTP bodies (to nodes with an HTTP server), and readers that stop reading. */
const HTTP_INPUT_CHANCE = 0.01;
const STALL_INPUT_CHANCE = 0.005;
/** Most body bytes an HTTP input sends (past the nodes' limit, far below what crashed them). */
const HTTP_SEND_BYTES_MAX = 4 * 1024 * 1024;
/** Most get_data requests a stalled reader pipelines: 3,000 x 32 KiB is 96 MiB of replies, over the queue limit. */
const STALL_REQUESTS_MAX = 3_000;
const HTTP_ROUTES = ["/login", "/metrics", "/api/snapshot", "/health", "/events", "/nope"];

/** Reads an HTTP answer's status line (and its body, if it has a length); "" when none comes in time. */
async function httpAnswer(conn: Deno.Conn, ms: number): Promise<string> {
  const buf = new Uint8Array(8192);
  let text = "";
  const late = timeout(ms);
  try {
    while (true) {
      const n = await Promise.race([conn.read(buf).catch(() => null), late.promise]);
      if (n === "timeout" || n === null) return text;
      text += new TextDecoder().decode(buf.subarray(0, n));
      const end = text.indexOf("\r\n\r\n");
      const length = /content-length: (\d+)/i.exec(text.slice(0, end));
      if (end >= 0 && (length === null || text.length >= end + 4 + Number(length[1]))) return text;
    }
  } finally {
    late.cancel();
  }
}

/**
 * A body to a node's HTTP server: small or past the limit, honest, lying (a huge
 * content-length) or chunked, sent at once or dripped; sometimes abandoned half-way.
 * Past the limit the answer must be 413; any body gets an answer in time.
 */
async function httpBodyInput(state: RunState, target: FuzzTarget, rng: Rng): Promise<string[]> {
  const url = new URL(target.httpUrl!);
  const route = rng.pick(HTTP_ROUTES);
  const over = rng.chance(0.5);
  const size = over ? HTTP_BODY_BYTES_MAX + 1 + rng.int(HTTP_SEND_BYTES_MAX) : rng.int(HTTP_BODY_BYTES_MAX);
  const framing = rng.pick(["length", "lie", "chunked"] as const);
  const drip = rng.chance(0.3);
  const abandon = rng.chance(0.1);
  const declared = framing === "lie" ? 700 * 1024 * 1024 : size;
  const head = `POST ${route} HTTP/1.1\r\nhost: fuzz\r\ncontent-type: application/x-www-form-urlencoded\r\n` +
    (framing === "chunked" ? "transfer-encoding: chunked" : `content-length: ${declared}`) + "\r\n\r\n";
  const conn = await Deno.connect({ hostname: url.hostname, port: Number(url.port) });
  try {
    let answered = false;
    const answer = httpAnswer(conn, state.options.replyTimeoutMs).finally(() => answered = true);
    const piece = (n: number) => {
      const body = textEncoder.encode("token=" + "x".repeat(Math.max(0, n - 6))).subarray(0, n);
      return framing === "chunked"
        ? concat([textEncoder.encode(`${n.toString(16)}\r\n`), body, textEncoder.encode("\r\n")])
        : body;
    };
    await writeAll(conn, textEncoder.encode(head));
    let sent = 0;
    const stopAt = abandon ? rng.int(size + 1) : size;
    while (sent < stopAt && !answered) {
      const n = Math.min(stopAt - sent, drip ? 1 + rng.int(64) : 256 * 1024);
      if (!(await writeAll(conn, piece(n)).then(() => true, () => false))) break;
      sent += n;
      // Dripping lasts at most ~500 ms: well inside the body deadline, so it is answered normally.
      if (drip && sent < 16 * 1024) await new Promise((resolve) => setTimeout(resolve, rng.int(8)));
    }
    if (abandon) return [];
    if (framing === "chunked" && !answered) {
      await writeAll(conn, textEncoder.encode("0\r\n\r\n")).catch(() => {});
    }
    const text = await answer;
    const status = text.split("\r\n")[0];
    const what = `POST ${route} with ${size} body bytes (${framing}${drip ? ", dripped" : ""})`;
    if (!/^HTTP\/1\.1 \d{3}/.test(status)) {
      return [`no HTTP answer to ${what} within ${state.options.replyTimeoutMs} ms`];
    }
    if ((over || framing === "lie") && !status.startsWith("HTTP/1.1 413")) {
      return [`${what} got ${status}, not 413`];
    }
    if (!over && framing !== "lie" && /^HTTP\/1\.1 (413|5\d\d)/.test(status)) {
      return [`${what} got ${status}`];
    }
    return [];
  } finally {
    conn.close();
  }
}

/**
 * A peer that pipelines get_data (of a canary: 32 KiB a reply) or pings and then reads
 * nothing: it hangs up later, or reads every reply slowly in the end and must get them
 * all, in order. The node's memory and answers are checked between batches.
 */
async function stalledReaderInput(
  state: RunState,
  target: FuzzTarget,
  rng: Rng,
  index: number,
): Promise<string[]> {
  const n = 100 + rng.int(STALL_REQUESTS_MAX);
  const op = target.kind === "worker" ? "get_data" : "ping";
  const g = genFor(rng, index);
  const parts: Uint8Array[] = [];
  for (let id = 1; id <= n; id++) {
    const args = op === "get_data" ? { keys: [CANARY_F64] } : {};
    parts.push(message(encodeMessage({ op, id, args }, g, false)));
  }
  const conn = await connect(parseAddress(target.address));
  try {
    const hello = await openRaw(conn, state.authToken);
    if (typeof hello === "string") return [hello];
    // The node may stop reading us part-way (backpressure): the writes go on in the background.
    const writing = writeAll(conn, concat(parts)).catch(() => {});
    await new Promise((resolve) => setTimeout(resolve, rng.int(300)));
    if (rng.chance(0.5)) return []; // it never reads: the node must drop or release it
    const until = deadline(2 * state.options.replyTimeoutMs);
    for (let id = 1; id <= n; id++) {
      const late = timeout(until.remaining());
      const frames = await Promise.race([hello.reader.next(), late.promise]).finally(late.cancel);
      if (frames === "timeout") return [`a slow reader got ${id - 1} of ${n} ${op} replies in time`];
      if (frames === null) return [`the node closed a slow reader after ${id - 1} of ${n} ${op} replies`];
      const reply = new Decoder().decode(frames[0], frames.slice(1)) as Record<string, unknown>;
      if (reply?.reply !== id || "error" in reply) {
        return [`a slow reader's reply ${id} of ${n} was ${Deno.inspect(reply).slice(0, 200)}`];
      }
      if (id % 200 === 0) await new Promise((resolve) => setTimeout(resolve, rng.int(20)));
    }
    await writing;
    return [];
  } finally {
    conn.close();
  }
}

/** Whether input `index` of a run with `seed` is an HTTP body, a stalled reader, or (null) a protocol input. */
export function connectionCategory(seed: number, index: number, http: boolean): "http" | "stall" | null {
  const roll = new Rng(seed, index, 3).float();
  if (roll < HTTP_INPUT_CHANCE) return http ? "http" : null;
  return roll < HTTP_INPUT_CHANCE + STALL_INPUT_CHANCE ? "stall" : null;
}

/** Runs input `index` if it is an HTTP body or a stalled reader; false for the protocol inputs. */
async function connectionInput(state: RunState, index: number): Promise<boolean> {
  const web = state.targets.filter((t) => t.httpUrl !== undefined);
  const category = connectionCategory(state.options.seed, index, web.length > 0);
  if (category === null) return false;
  const rng = new Rng(state.options.seed, index, 4);
  const target = category === "http" ? rng.pick(web) : rng.pick(state.targets);
  state.report.inputs++;
  state.report.byCategory[category]++;
  let problems: string[];
  try {
    problems = category === "http"
      ? await httpBodyInput(state, target, rng)
      : await stalledReaderInput(state, target, rng, index);
  } catch (error) {
    problems = [`cannot connect: ${(error as Error).message}`];
  }
  const where = category === "http" ? `${target.kind} ${target.httpUrl}` : describeTarget(target);
  for (const what of problems) fail(state, { input: index, target: where, category, what });
  return true;
}

/** What input `index` of a run with `seed` sends, without sending it. */
export interface FuzzInput {
  /** The node it goes to. */
  target: FuzzTarget;
  /** Its category. */
  category: FuzzCategory;
  /** The op it was made for (envelopes and mutations). */
  op?: string;
  /** How it was made. */
  how: string;
  /** The bytes sent after the hello. */
  bytes: Uint8Array;
  /** The messages the node decodes from them, in order. */
  messages: unknown[];
  /** What the node does at the end: reads on (`open`), closes (`close`) or answers (`reply`). */
  end: "open" | "close" | "reply";
}

/**
 * Input `index` of a run with `seed` over `targets` (in the same order as the run's),
 * as the run would send it; null when it is skipped as unsafe.
 */
export function fuzzInput(seed: number, index: number, targets: FuzzTarget[]): FuzzInput | null {
  const state = newState({ seed, inputs: 0, targets });
  const made = safeInput(state, index);
  if (made === null) return null;
  const { input, expect } = made;
  const end = expect.open ? "open" : expect.mustClose ? "close" : "reply";
  return { ...input, messages: expect.decoded, end };
}

// ---- checks with normal calls ----

function canaryValues(): Record<string, unknown> {
  const f64 = new Float64Array(CANARY_F64_LENGTH);
  for (let i = 0; i < f64.length; i++) f64[i] = i * 1.5 - 7;
  f64[1] = NaN;
  f64[2] = -0;
  f64[3] = Infinity;
  return {
    [CANARY_F64]: f64,
    [CANARY_OBJ]: {
      name: "canary",
      list: [1, -2, 3.5, "four", null, true, 2 ** 53 - 1],
      nested: { deep: { deeper: [[["x", { y: [1, 2, 3] }]]] } },
      big: 2n ** 70n,
      bytes: new Uint8Array([1, 2, 3, 255]),
      words: new Int16Array([-1, 2, -3]),
      when: new Date(1_700_000_000_000),
      set: new Set([1, "a"]),
      map: new Map<unknown, unknown>([["k", 1], [2, [3]]]),
      unicode: "ü日本\u{1F600}",
      lone: "\u{1F600}".slice(0, 1) + "x\uDC00",
      ref: new Ref("x"),
      empty: { list: [], text: "", object: {} },
    },
  };
}

const CHECK_MUL = (a: number, b: number) => a * b;
const CHECK_PAIR = (x: number) => [x, "ok"];
/** A task whose error has a number for a name: its future must still reject. */
const CHECK_ODD_ERROR = () => {
  const error = new Error("odd");
  (error as unknown as { name: number }).name = 5;
  throw error;
};

async function withDeadline<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  const t = timeout(ms);
  try {
    const result = await Promise.race([promise, t.promise]);
    if (result === "timeout") throw new Error(`${what}: no answer within ${ms} ms`);
    return result as T;
  } finally {
    t.cancel();
  }
}

async function readMemory(state: RunState): Promise<void> {
  const own = state.targets.some((t) => t.pid === undefined);
  const samples: [string, number, number | undefined][] = [];
  if (own) {
    const m = Deno.memoryUsage();
    samples.push(["this process (in-process nodes)", m.rss, m.heapUsed]);
  }
  for (const t of state.targets) {
    if (t.pid === undefined) continue;
    try {
      // Deno reads /proc/PID only with --allow-all; `cat` needs --allow-run alone.
      const cat = await new Deno.Command("cat", {
        args: [`/proc/${t.pid}/status`],
        stdout: "piped",
        stderr: "null",
      })
        .output();
      const kb = /VmRSS:\s+(\d+) kB/.exec(new TextDecoder().decode(cat.stdout));
      if (kb) samples.push([describeTarget(t), Number(kb[1]) * 1024, undefined]);
    } catch {
      // No /proc (not Linux) or no --allow-run: memory is not measured.
    }
  }
  for (const [name, rss, heap] of samples) {
    const m = state.memory.get(name);
    if (m === undefined) {
      state.memory.set(name, {
        name,
        rssStart: rss,
        rssEnd: rss,
        rssPeak: rss,
        heapStart: heap,
        heapEnd: heap,
        over: false,
        overChecks: 0,
      });
      continue;
    }
    m.rssEnd = rss;
    m.rssPeak = Math.max(m.rssPeak, rss);
    m.heapEnd = heap;
    const growth = heap !== undefined && m.heapStart !== undefined ? heap - m.heapStart : rss - m.rssStart;
    // A leak stays; memory a check caught in use (replies queued for a stalled reader, values
    // in flight) is gone by the next one: only growth seen at two checks in a row counts.
    m.overChecks = growth > state.options.memoryGrowthMaxBytes ? m.overChecks + 1 : 0;
    if (m.overChecks >= MEMORY_OVER_CHECKS && !m.over) {
      m.over = true;
      fail(state, {
        input: null,
        target: name,
        what: `memory grew by ${mib(growth)} MiB (${
          heap !== undefined ? "heap" : "RSS"
        }), over the bound of ${mib(state.options.memoryGrowthMaxBytes)} MiB`,
      });
    }
  }
}

function mib(bytes: number): string {
  return (bytes / 1024 / 1024).toFixed(1);
}

/**
 * Checks with normal calls that every node answers, the canaries are intact, and a
 * compute and a submit round trip work; then deletes what the fuzzing stored, so
 * memory reflects leaks only. False if a node is gone.
 */
async function check(state: RunState): Promise<boolean> {
  const n = state.checks++;
  state.report.checks++;
  const security = { authToken: state.authToken, timeoutMs: CHECK_TIMEOUT_MS };
  const canaries = canaryValues();
  const workers = state.targets.filter((t) => t.kind === "worker");
  const scheduler = state.targets.find((t) => t.kind === "scheduler");
  let alive = true;
  const problem = (t: FuzzTarget | string, what: string) =>
    fail(state, { input: null, target: typeof t === "string" ? t : describeTarget(t), what });
  for (const t of state.targets) {
    const node = rpc(t.address, security);
    try {
      const pong = await node.call("ping");
      if (pong !== "pong") problem(t, `ping answered ${JSON.stringify(pong)}`);
      if (t.kind !== "worker") continue;
      const got = await node.call("get_data", { keys: [CANARY_F64, CANARY_OBJ] }) as Record<string, unknown>;
      for (const k of [CANARY_F64, CANARY_OBJ]) {
        if (!isDeepStrictEqual(got[k], canaries[k])) {
          problem(t, `canary ${k} changed: ${Deno.inspect(got[k], { depth: 3 }).slice(0, 300)}`);
        }
      }
      // Several at once: each executor gets one, so a dead executor shows as a hang.
      const key = `fuzz-check-${n}`;
      const keys = Array.from({ length: CHECK_COMPUTES }, (_, i) => `${key}-${i}`);
      await Promise.all(
        keys.map((k, i) =>
          node.call("compute", { key: k, function: { source: "(x, a) => x + a" }, args: [n, i] })
        ),
      );
      await node.call("compute", {
        key: `${key}-len`,
        function: { source: "(v) => v.length" },
        keys: [CANARY_F64],
      });
      const computed = await node.call("get_data", { keys: [...keys, `${key}-len`] }) as Record<
        string,
        unknown
      >;
      const expected = Object.fromEntries([...keys.map((k, i) => [k, n + i]), [
        `${key}-len`,
        CANARY_F64_LENGTH,
      ]]);
      if (!isDeepStrictEqual(computed, expected)) {
        problem(t, `compute round trip gave ${JSON.stringify(computed)}`);
      }
    } catch (error) {
      problem(t, `a normal call failed: ${(error as Error).message}`);
      // A node that answered, even with a refusal, is alive.
      if (!(error instanceof RemoteError || error instanceof BusyError)) alive = false;
    } finally {
      await node.close();
    }
  }
  if (scheduler && workers.length > 0 && alive) {
    const center = rpc(scheduler.address, security);
    let client: Client | null = null;
    try {
      const ncores = await center.call("ncores") as Record<string, number>;
      for (const w of workers) {
        if (!Object.hasOwn(ncores, w.address)) {
          problem(scheduler, `worker ${w.address} is no longer registered`);
        }
      }
      client = await withDeadline(
        Client.connect(scheduler.address, { authToken: state.authToken, reconnectTimeoutMs: 0 }),
        CHECK_TIMEOUT_MS,
        "connecting a client",
      );
      for (const w of workers) {
        if (!Object.hasOwn(ncores, w.address)) continue;
        const on = taskOptions({ workers: [w.address] });
        const product = client.submit(CHECK_MUL, 6, 7 + n, on);
        const pair = client.submit(CHECK_PAIR, product, taskOptions({ workers: [w.address] }));
        const got = await withDeadline(pair.result(), CHECK_TIMEOUT_MS, `submit round trip on ${w.address}`);
        if (!isDeepStrictEqual(got, [6 * (7 + n), "ok"])) {
          problem(
            scheduler,
            `submit round trip on ${w.address} gave ${JSON.stringify(got)}, not [${6 * (7 + n)}, "ok"]`,
          );
        }
        const odd = client.submit(CHECK_ODD_ERROR, taskOptions({ workers: [w.address], pure: false }));
        const outcome = await withDeadline(
          odd.result().then(() => null, (error) => error),
          CHECK_TIMEOUT_MS,
          `a task throwing an Error named 5 on ${w.address}`,
        );
        if (!(outcome instanceof Error)) problem(scheduler, `a task throwing on ${w.address} did not fail`);
      }
    } catch (error) {
      problem(scheduler, `a normal call failed: ${(error as Error).message}`);
    } finally {
      await client?.close().catch(() => {});
      await center.close();
    }
  }
  if (alive) await checkFetchParts(state, n);
  // Delete what the inputs stored (everything but the canaries): memory then shows leaks, not data.
  for (const t of workers) {
    const node = rpc(t.address, security);
    try {
      const held = (await node.call("keys") as string[]).filter((k) => !k.startsWith(CANARY_PREFIX));
      for (let i = 0; i < held.length; i += DELETE_BATCH) {
        await node.call("delete_data", { keys: held.slice(i, i + DELETE_BATCH) });
      }
    } catch (error) {
      problem(t, `cleaning up failed: ${(error as Error).message}`);
    } finally {
      await node.close();
    }
  }
  await readMemory(state);
  return alive;
}

/** Frame limits up to which a check moves values that together pass it (larger would take GiBs). */
const FETCH_PARTS_LIMIT_BYTES_MAX = 64 * 1024 * 1024;
/** The frame limit of the nodes `deno task fuzz` starts. */
const FUZZ_FRAME_BYTES_MAX = 8 * 1024 * 1024;

/**
 * Values that each fit the nodes' frame limit but together pass it: scattered to one
 * worker, gathered by a client, and fetched by another worker for a task, they must come
 * in parts. Seeded per check; runs when the limit is small and there are two workers.
 */
async function checkFetchParts(state: RunState, n: number): Promise<void> {
  const scheduler = state.targets.find((t) => t.kind === "scheduler");
  const [a, b] = state.targets.filter((t) => t.kind === "worker");
  if (!scheduler || !b) return;
  const limit = Math.min(...[scheduler, a, b].map((t) => limitOf(state, t)));
  if (limit > FETCH_PARTS_LIMIT_BYTES_MAX) return;
  const rng = new Rng(state.options.seed, 0xfe7c4, n);
  const values: unknown[] = [];
  for (let total = 0; total <= limit;) {
    const bytes = Math.floor(limit / 4 + rng.int(limit / 4)) & ~7;
    const make = rng.pick([
      () => new Float64Array(bytes / 8).fill(values.length),
      () => new Uint8Array(bytes).fill(values.length),
      () => new Uint8Array(bytes).fill(values.length).buffer,
    ]);
    values.push(make());
    total += bytes;
  }
  const what = `${values.length} values of ${
    values.map((v) => (v as ArrayBuffer).byteLength).join(", ")
  } bytes`;
  let client: Client | null = null;
  try {
    client = await withDeadline(
      Client.connect(scheduler.address, {
        authToken: state.authToken,
        frameBytesMax: limit,
        reconnectTimeoutMs: 0,
      }),
      CHECK_TIMEOUT_MS,
      "connecting a client",
    );
    const futures = await client.scatter(values, { workers: [a.address] });
    const gathered = await withDeadline(client.gather(futures), CHECK_TIMEOUT_MS, `gathering ${what}`);
    if (!isDeepStrictEqual(gathered, values)) {
      fail(state, { input: null, target: describeTarget(a), what: `gathering ${what} changed them` });
    }
    const sizes = client.submit(
      (...vs: ArrayBuffer[]) => vs.map((v) => v.byteLength),
      ...futures as Future<ArrayBuffer>[],
      taskOptions({ workers: [b.address] }),
    );
    const got = await withDeadline(sizes.result(), CHECK_TIMEOUT_MS, `fetching ${what} to ${b.address}`);
    const expected = values.map((v) => (v as ArrayBuffer).byteLength);
    if (!isDeepStrictEqual(got, expected)) {
      fail(state, {
        input: null,
        target: describeTarget(b),
        what: `a task on ${what} saw sizes ${JSON.stringify(got)}`,
      });
    }
  } catch (error) {
    fail(state, {
      input: null,
      target: describeTarget(scheduler),
      what: `moving ${what} under a ${limit}-byte frame limit failed: ${(error as Error).message}`,
    });
  } finally {
    await client?.close().catch(() => {});
  }
}

async function storeCanaries(state: RunState): Promise<boolean> {
  for (const t of state.targets) {
    if (t.kind !== "worker") continue;
    const node = rpc(t.address, { authToken: state.authToken, timeoutMs: CHECK_TIMEOUT_MS });
    try {
      await node.call("update_data", { data: canaryValues() });
    } catch (error) {
      fail(state, {
        input: null,
        target: describeTarget(t),
        what: `cannot store the canaries: ${(error as Error).message}`,
      });
      return false;
    } finally {
      await node.close();
    }
  }
  return true;
}

/** The fake-worker ports something listens on (the nodes' connections there should fail at once). */
async function listeningFakePorts(): Promise<number[]> {
  const out: number[] = [];
  for (const port of FAKE_PORTS) {
    try {
      (await connect({ host: "127.0.0.1", port })).close();
      out.push(port);
    } catch {
      // Refused: as it should be.
    }
  }
  return out;
}

function newState(options: FuzzOptions): RunState {
  const { seed, targets } = options;
  if (!Number.isSafeInteger(seed)) throw new RangeError(`Invalid seed ${seed}: expected a safe integer`);
  if (targets.length === 0) throw new RangeError("Nothing to fuzz: no targets");
  const forbidden = [
    textEncoder.encode(CANARY_PREFIX),
    textEncoder.encode("terminate"),
    ...targets.filter((t) => t.kind === "worker").map((t) => textEncoder.encode(t.address)),
  ];
  const untemplated = [
    ...opsOf("worker").filter((op) => !templateOf("worker", op)).map((op) => `worker.${op}`),
    ...opsOf("scheduler").filter((op) => !templateOf("scheduler", op)).map((op) => `scheduler.${op}`),
  ];
  return {
    options: {
      seed,
      concurrency: options.concurrency ?? CONCURRENCY,
      checkEvery: options.checkEvery ?? CHECK_EVERY,
      replyTimeoutMs: options.replyTimeoutMs ?? REPLY_TIMEOUT_MS,
      memoryGrowthMaxBytes: options.memoryGrowthMaxBytes ?? MEMORY_GROWTH_MAX_BYTES,
    },
    targets,
    authToken: options.authToken ?? tokenFromEnv(),
    report: {
      seed,
      inputs: 0,
      elapsedMs: 0,
      byCategory: { raw: 0, envelope: 0, mutation: 0, http: 0, stall: 0 },
      byOp: {},
      skipped: 0,
      replies: { result: 0, error: 0, errorNames: {}, none: 0 },
      closedByNode: 0,
      leftOpen: 0,
      nodeRequests: 0,
      checks: 0,
      untemplated,
      notes: [],
      failures: [],
      memory: [],
    },
    forbidden,
    limits: new Map(),
    started: performance.now(),
    fatal: false,
    checks: 0,
    onFailure: options.onFailure,
    memory: new Map(),
  };
}

/**
 * Fuzzes the nodes at `targets` with `inputs` inputs made from `seed`, checking
 * between batches that they still serve normal calls, keep their data and stay
 * within bounded memory.
 *
 * @example
 * ```ts
 * const report = await fuzz({ seed: 1, inputs: 1000, targets: [{ address, kind: "worker" }] });
 * console.log(report.failures);
 * ```
 */
export async function fuzz(options: FuzzOptions): Promise<FuzzReport> {
  const state = newState(options);
  for (const target of state.targets) {
    const conn = await connect(parseAddress(target.address));
    try {
      const hello = await withDeadline(openRaw(conn, state.authToken), CHECK_TIMEOUT_MS, "the hello");
      if (typeof hello === "string") throw new Error(`Cannot fuzz ${describeTarget(target)}: ${hello}`);
      if (hello.frameBytesMax !== undefined) state.limits.set(target, hello.frameBytesMax);
    } finally {
      conn.close();
    }
  }
  const listening = await listeningFakePorts();
  if (listening.length > 0) {
    state.report.notes.push(
      `Something listens on 127.0.0.1 port ${listening.join(", ")}: fake workers there may slow replies down`,
    );
  }
  const indices = options.only ?? Array.from({ length: options.inputs }, (_, i) => i);
  const until = deadline(options.seconds === undefined ? Infinity : options.seconds * 1000);
  const stopped = () => state.fatal || until.expired() || options.signal?.aborted === true;
  const progress = () =>
    options.onProgress?.({
      done: state.report.inputs + state.report.skipped,
      total: indices.length,
      elapsedMs: performance.now() - state.started,
      failures: state.report.failures.length,
      rss: Object.fromEntries([...state.memory.values()].map((m) => [m.name, m.rssEnd])),
    });
  if ((await storeCanaries(state)) && (await check(state))) {
    for (let start = 0; start < indices.length && !stopped(); start += state.options.checkEvery) {
      const batch = indices.slice(start, start + state.options.checkEvery);
      let next = 0;
      await Promise.all(
        Array.from({ length: Math.min(state.options.concurrency, batch.length) }, async () => {
          while (next < batch.length && !stopped()) await runInput(state, batch[next++]);
        }),
      );
      if (options.signal?.aborted) break;
      if (!(await check(state))) state.fatal = true;
      progress();
    }
  }
  state.report.elapsedMs = performance.now() - state.started;
  state.report.memory = [...state.memory.values()].map(({ over: _, ...m }) => m);
  return state.report;
}

// ---- the command line ----

/** The summary line: "N inputs tried in S s, seed X, F failures, RSS a→b MiB". */
export function summarize(report: FuzzReport): string {
  const rssStart = report.memory.reduce((a, m) => a + m.rssStart, 0);
  const rssEnd = report.memory.reduce((a, m) => a + m.rssEnd, 0);
  return `${report.inputs} inputs tried in ${(report.elapsedMs / 1000).toFixed(1)} s, seed ${report.seed}, ` +
    `${report.failures.length} failures, RSS ${mib(rssStart)}→${mib(rssEnd)} MiB`;
}

/** Failures as text, each with how to replay it. */
export function formatFailures(report: FuzzReport): string {
  return report.failures.map((f) => {
    const where = f.input === null
      ? `check after ${f.after} inputs`
      : `input #${f.input} (${f.category} ${f.op ?? ""})`;
    const replay = f.input === null ? "" : `\n  replay: deno task fuzz --seed ${f.seed} --only ${f.input}`;
    return `- seed ${f.seed}, ${where}, ${f.target}: ${f.what}${replay}${
      f.detail ? `\n  ${f.detail.replaceAll("\n", "\n  ")}` : ""
    }`;
  }).join("\n");
}

/** Deno's colored stderr, as plain text. */
function stripColors(text: string): string {
  // deno-lint-ignore no-control-regex
  return text.replace(/\x1b\[[0-9;]*m/g, "");
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      seed: { type: "string" },
      inputs: { type: "string", default: "100000" },
      seconds: { type: "string" },
      only: { type: "string" },
      concurrency: { type: "string" },
      "check-every": { type: "string" },
      show: { type: "string" },
    },
  });
  const number = (name: string, text: string | undefined): number | undefined => {
    if (text === undefined) return undefined;
    const n = Number(text);
    if (!Number.isSafeInteger(n) || n < 0) {
      throw new RangeError(`Invalid --${name} ${JSON.stringify(text)}: expected a whole number`);
    }
    return n;
  };
  const seed = number("seed", values.seed) ?? crypto.getRandomValues(new Uint32Array(1))[0];
  const inputs = number("inputs", values.inputs)!;
  const seconds = values.seconds === undefined ? undefined : Number(values.seconds);
  const only = values.only?.split(",").map((s) => number("only", s)!);
  if (values.show !== undefined) {
    // The inputs a run would send to the CLI's nodes (a scheduler, then two workers), without sending them.
    const targets: FuzzTarget[] = [
      { address: "tcp://scheduler.invalid:1", kind: "scheduler" },
      { address: "tcp://alice.invalid:1", kind: "worker" },
      { address: "tcp://bob.invalid:1", kind: "worker" },
    ];
    for (const text of values.show.split(",")) {
      const index = number("show", text)!;
      const input = fuzzInput(seed, index, targets);
      if (input === null) {
        console.log(`input #${index}: skipped (unsafe)`);
        continue;
      }
      console.log(
        `input #${index} to the ${input.target.kind}: ${input.category} ${input.op ?? ""}, ${input.how}`,
      );
      const end =
        { open: "waits for more bytes", close: "closes the connection", reply: "answers" }[input.end];
      console.log(`then the node ${end}; the messages it decodes:`);
      for (const m of input.messages) {
        console.log(Deno.inspect(m, { depth: 10, strAbbreviateSize: 300, colors: false }));
      }
      console.log(hex(input.bytes, 4096));
    }
    return;
  }
  console.log(`seed ${seed}`);
  const nodes: [string, NodeProcess][] = [];
  const died = new AbortController();
  let stopping = false;
  const exits: FuzzFailure[] = [];
  const logged = new Map<string, number>();
  const onLog = (name: string) => (line: string) => {
    // Node stderr: errors the nodes logged (they run at --log-level error), by distinct line.
    const text = `${name}: ${stripColors(line)}`.slice(0, 300);
    if (logged.size < 1000 || logged.has(text)) logged.set(text, (logged.get(text) ?? 0) + 1);
  };
  let report: FuzzReport | null = null;
  try {
    for (const name of ["scheduler", "alice", "bob"]) {
      const args = name === "scheduler"
        ? ["scheduler", "--port", "0", "--dashboard-port", "0"]
        : ["worker", nodes[0][1].address, "--name", name, "--nthreads", "2"];
      // A small frame limit: checks then move values that together pass it (checkFetchParts).
      args.push("--frame-bytes-max", String(FUZZ_FRAME_BYTES_MAX));
      const node = await spawnNode([...args, "--log-level", "error"], { onLog: onLog(name) });
      nodes.push([name, node]);
      node.status.then((status) => {
        if (stopping) return;
        exits.push({
          seed,
          input: null,
          after: report?.inputs ?? -1,
          target: `${name} ${node.address}`,
          what: `the process exited during the run: code ${status.code}, signal ${status.signal ?? "none"}`,
          detail: `its last log lines:\n${stripColors(node.log.slice(-20).join("\n"))}`,
        });
        died.abort();
      });
    }
    const targets: FuzzTarget[] = [];
    for (const [name, node] of nodes) {
      // The scheduler names its dashboard, which gets the HTTP inputs.
      const node0 = rpc(node.address);
      const httpUrl = name === "scheduler"
        ? ((await node0.call("identity")) as Record<string, unknown>).dashboard
        : undefined;
      await node0.close();
      targets.push({
        address: node.address,
        kind: name === "scheduler" ? "scheduler" : "worker",
        pid: node.child.pid,
        httpUrl: typeof httpUrl === "string" ? httpUrl : undefined,
      });
    }
    let lastPrint = 0;
    report = await fuzz({
      seed,
      inputs,
      seconds,
      only,
      concurrency: number("concurrency", values.concurrency),
      checkEvery: number("check-every", values["check-every"]),
      targets,
      signal: died.signal,
      onFailure: (f) =>
        console.log(
          `FAILURE: ${f.what} (seed ${f.seed}, ${f.input === null ? "check" : `input #${f.input}`})`,
        ),
      onProgress: (p) => {
        if (p.elapsedMs - lastPrint < 2000 && p.done < p.total) return;
        lastPrint = p.elapsedMs;
        const rate = (p.done / (p.elapsedMs / 1000)).toFixed(0);
        const seconds = (p.elapsedMs / 1000).toFixed(1);
        const rss = Object.values(p.rss).map(mib).join(" + ");
        console.log(
          `${p.done}/${p.total} inputs, ${seconds} s, ${rate}/s, ${p.failures} failures, RSS ${rss} MiB`,
        );
      },
    });
  } finally {
    stopping = true;
    await Promise.all(nodes.map(([, node]) => node.stop()));
  }
  // A node that died is a failure even when the inputs in flight did not notice.
  await new Promise((resolve) => setTimeout(resolve, 0));
  report.failures.push(...exits);
  const r = report;
  console.log("");
  console.log(`by category: ${JSON.stringify(r.byCategory)}; skipped as unsafe: ${r.skipped}`);
  const names = JSON.stringify(r.replies.errorNames);
  console.log(
    `replies: ${r.replies.result} results, ${r.replies.error} errors ${names}, ${r.replies.none} none due`,
  );
  console.log(`closed by the node: ${r.closedByNode}; left open (declared more than sent): ${r.leftOpen}`);
  console.log(`requests from the nodes to the fuzzer: ${r.nodeRequests}; checks: ${r.checks}`);
  console.log(`per op: ${Object.entries(r.byOp).sort().map(([op, n]) => `${op} ${n}`).join(", ")}`);
  if (r.untemplated.length) console.log(`ops without a valid-call template: ${r.untemplated.join(", ")}`);
  for (const note of r.notes) console.log(`note: ${note}`);
  for (const m of r.memory) {
    console.log(`memory of ${m.name}: RSS ${mib(m.rssStart)}→${mib(m.rssEnd)} MiB (peak ${mib(m.rssPeak)})`);
  }
  if (logged.size > 0) {
    console.log(`node stderr (distinct lines, at most 20):`);
    for (const [line, n] of [...logged].slice(0, 20)) console.log(`  ${n > 1 ? `${n}× ` : ""}${line}`);
  }
  if (r.failures.length) console.log(`\nfailures:\n${formatFailures(r)}`);
  console.log(summarize(r));
  if (r.failures.length > 0) Deno.exitCode = 1;
}

if (import.meta.main) await main();
