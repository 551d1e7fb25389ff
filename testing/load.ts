/**
 * Load test: many clients at once against one cluster, for a bounded time, checking
 * every value and watching the nodes' connections and memory.
 *
 * A scheduler and two workers (one thread each) run as separate processes on
 * 127.0.0.1; this process runs `--clients` clients (default 64) for `--seconds`
 * (default 30). Each client has its own Client and its own rpc connections, and loops
 * over a seeded mix of:
 *
 *   put     rpc update_data of 1-3 of its own keys to a random worker: small values,
 *           sometimes a 1 MiB Float64Array
 *   get     rpc get_data of some of its keys (and one it deleted or never stored) from
 *           a worker; every value must be exactly what it stored, absent keys absent
 *   delete  rpc delete_data of one of its keys
 *   submit  Client.submit of a task and a dependent task restricted to a random worker
 *           (so inputs move between workers), sometimes a 1 MiB result; result() checked
 *   map     Client.map over 5-40 inputs, some ranges shared by all clients (so pure keys
 *           are shared and released by many); gather() checked; futures released
 *
 * Before and after: each node's TCP connections (by `ss -tanp`; Deno refuses /proc to
 * anything short of --allow-all) must come back to the baseline once the clients have
 * closed; each node's RSS (`ps`) at start, peak (sampled every second) and end (after
 * a settle period) must not grow without bound; the workers must hold none of the
 * clients' keys and the scheduler must have forgotten all their tasks.
 *
 * Run: deno task load [--clients N] [--seconds S] [--seed N] [--settle S] [--big P]
 * Exits with code 1 on any error, leak or unbounded growth.
 *
 * `runLoad` and the probes are exported for tests/load_test.ts.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { isDeepStrictEqual } from "node:util";
import { type NodeProcess, spawnNode } from "../client/spawn.ts";
import { type Deadline, deadline } from "../util/time.ts";
import {
  Client,
  type Future,
  type Rpc,
  rpc,
  type SchedulerOps,
  taskOptions,
  type WorkerOps,
} from "../mod.ts";

/** The kinds of operation a client does, in the order the summary prints them. */
export const KINDS = ["put", "get", "delete", "submit", "map"] as const;
/** One kind of operation. */
export type Kind = typeof KINDS[number];

/** How often each kind is picked (relative weights). */
const WEIGHTS: Record<Kind, number> = { put: 30, get: 30, delete: 5, submit: 20, map: 15 };
/** Keys per client: each put writes some of these slots. */
const SLOTS = 8;
/** Elements of a "big" value: 1 MiB of Float64. */
export const BIG_LENGTH = (1 << 20) / 8;
/** Default chance that a put value or a submit result is 1 MiB. */
const BIG_PROBABILITY = 0.02;
/** An operation that takes longer than this counts as an error (a hang). */
const OP_TIMEOUT_MS = 30_000;
/** Error messages kept for the report; all are counted. */
const ERROR_SAMPLES_MAX = 20;
/** Prefix of every rpc key (the scheduler groups keys by the part before the last dash). */
export const KEY_PREFIX = "loadkv";

// Task functions travel as source: no closures, each a name of its own so the
// scheduler's progress (by key prefix) shows what is left of them.
const loadMulAdd = (a: number, b: number, c: number) => a * b + c;
const loadInc = (x: number) => x + 1;
const loadFill = (n: number, start: number) => {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = start + i;
  return out;
};
const loadSum = (xs: Float64Array) => {
  let s = 0;
  for (let i = 0; i < xs.length; i++) s += xs[i];
  return s;
};
/** Task key prefixes this load creates, for the leftover check. */
export const TASK_PREFIXES = ["loadMulAdd", "loadInc", "loadFill", "loadSum"];

/** Options of `runLoad`. */
export interface LoadOptions {
  /** The scheduler's address. */
  scheduler: string;
  /** The workers' addresses. */
  workers: string[];
  /** How many clients run at once. */
  clients: number;
  /** How long they run. */
  seconds: number;
  /** Seeds every client's choices. */
  seed: number;
  /** Chance that a put value or a submit result is 1 MiB (default 0.02). */
  bigProbability?: number;
  /** An operation slower than this is an error (default 30 s). */
  opTimeoutMs?: number;
  /** Called once a second while the load runs. */
  onTick?: (elapsedS: number, report: LoadReport) => void;
}

/** What `runLoad` measured. */
export interface LoadReport {
  /** Clients that ran. */
  clients: number;
  /** Seconds the load ran (from the first client's start to the last one's close). */
  elapsedS: number;
  /** Seconds of the mixed loop (without connecting and cleaning up). */
  loopS: number;
  /** Completed operations per kind. */
  ops: Record<Kind, number>;
  /** Completed operations per kind per whole second of the loop. */
  perSecond: Record<Kind, number[]>;
  /** Latencies in ms per kind. */
  latencyMs: Record<Kind, number[]>;
  /** Values compared with what was expected. */
  checks: number;
  /** Failed operations and wrong values. */
  errors: number;
  /** The first error messages. */
  errorSamples: string[];
  /** 1 MiB values written or computed and checked. */
  bigValues: number;
}

/** mulberry32: small, fast, and the same sequence for the same seed everywhere. */
export function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A small value: a bit of every kind msgpack and the codec carry. */
function smallValue(client: number, n: number): unknown {
  return {
    client,
    n,
    s: `value ${client}/${n}`,
    xs: [n, -n, n / 3],
    nested: { ok: n % 2 === 0, none: null },
    f64: new Float64Array([n, n + 0.5, -n]),
    u8: new Uint8Array([n & 255, (n >> 8) & 255, 7]),
  };
}

/** What a key should hold: a small value itself, or a big one by its start. */
type Expected = { small: unknown } | { bigStart: number };

function bigValue(start: number): Float64Array {
  const out = new Float64Array(BIG_LENGTH);
  for (let i = 0; i < BIG_LENGTH; i++) out[i] = start + i * 0.5;
  return out;
}

function isBig(value: unknown, start: number): boolean {
  if (!(value instanceof Float64Array) || value.length !== BIG_LENGTH) return false;
  for (let i = 0; i < BIG_LENGTH; i++) if (value[i] !== start + i * 0.5) return false;
  return true;
}

function describe(value: unknown): string {
  if (ArrayBuffer.isView(value)) return `${value.constructor.name}(${value.byteLength} bytes)`;
  try {
    return JSON.stringify(value)?.slice(0, 120) ?? String(value);
  } catch {
    return String(value);
  }
}

class CheckError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CheckError";
  }
}

/** Resolves like `promise`, or rejects after `ms`: a hang is an error, not a stuck run. */
function timed<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function emptyByKind<T>(make: () => T): Record<Kind, T> {
  return Object.fromEntries(KINDS.map((k) => [k, make()])) as Record<Kind, T>;
}

/**
 * Runs `clients` clients for `seconds` against the cluster, each with its own Client
 * and rpc connections, and closes them all. Never throws for a failed operation: it
 * counts it in `errors` (with a sample of the messages).
 */
export async function runLoad(options: LoadOptions): Promise<LoadReport> {
  const report: LoadReport = {
    clients: options.clients,
    elapsedS: 0,
    loopS: 0,
    ops: emptyByKind(() => 0),
    perSecond: emptyByKind(() => [] as number[]),
    latencyMs: emptyByKind(() => [] as number[]),
    checks: 0,
    errors: 0,
    errorSamples: [],
    bigValues: 0,
  };
  const started = performance.now();
  let loopStarted = 0;
  let loopEnded = 0;
  const fail = (where: string, error: unknown) => {
    report.errors++;
    if (report.errorSamples.length < ERROR_SAMPLES_MAX) {
      const e = error as Error;
      report.errorSamples.push(`${where}: ${e?.name ?? "Error"}: ${e?.message ?? String(error)}`);
    }
  };
  const check = (ok: boolean, what: () => string) => {
    report.checks++;
    if (!ok) throw new CheckError(what());
  };

  // Everyone connects first, then everyone starts the loop at once.
  const clients = await Promise.all(
    Array.from({ length: options.clients }, async (_, i) => {
      const connecting = Client.connect(options.scheduler);
      try {
        return await timed(connecting, OP_TIMEOUT_MS, `client ${i}: connect`);
      } catch (error) {
        fail(`client ${i}: connect`, error);
        // One that connects after all is closed, not left open.
        connecting.then((c) => c.close(), () => {});
        return null;
      }
    }),
  );
  loopStarted = performance.now();
  const until = deadline(options.seconds * 1000);
  const ticker = options.onTick
    ? setInterval(() => options.onTick!((performance.now() - started) / 1000, report), 1000)
    : undefined;
  try {
    await Promise.all(clients.map((client, i) => {
      if (client === null) return Promise.resolve();
      return oneClient(i, client, {
        ...options,
        until,
        report,
        fail,
        check,
        done: () => loopEnded = Math.max(loopEnded, performance.now()),
        bucket: (kind) => {
          const second = Math.floor((performance.now() - loopStarted) / 1000);
          const counts = report.perSecond[kind];
          while (counts.length <= second) counts.push(0);
          counts[second]++;
        },
      });
    }));
  } finally {
    clearInterval(ticker);
  }
  report.loopS = ((loopEnded || performance.now()) - loopStarted) / 1000;
  report.elapsedS = (performance.now() - started) / 1000;
  return report;
}

interface ClientContext extends LoadOptions {
  until: Deadline;
  report: LoadReport;
  fail: (where: string, error: unknown) => void;
  check: (ok: boolean, what: () => string) => void;
  done: () => void;
  bucket: (kind: Kind) => void;
}

/** One client's loop; closes its Client and rpcs whatever happens. */
async function oneClient(index: number, client: Client, ctx: ClientContext): Promise<void> {
  const rng = random((ctx.seed * 1_000_003 + index * 0x9e3779b9) >>> 0);
  const int = (n: number) => Math.floor(rng() * n);
  const big = ctx.bigProbability ?? BIG_PROBABILITY;
  const timeoutMs = ctx.opTimeoutMs ?? OP_TIMEOUT_MS;
  const { report, check } = ctx;
  const workers = ctx.workers;
  const peers: Rpc<WorkerOps>[] = workers.map((w) => rpc<WorkerOps>(w, { timeoutMs }));
  // What each worker should hold of this client's keys; keys it deleted (or never
  // stored) that must be absent; keys whose fate a failed call left unknown.
  const stored: Map<string, Expected>[] = workers.map(() => new Map());
  const gone: Set<string>[] = workers.map(() => new Set([`${KEY_PREFIX}-c${index}never`]));
  const unsure: Set<string>[] = workers.map(() => new Set());
  const keyOf = (slot: number) => `${KEY_PREFIX}-c${index}s${slot}`;
  let counter = 0;
  const totalWeight = KINDS.reduce((s, k) => s + WEIGHTS[k], 0);
  const pickKind = (): Kind => {
    let r = rng() * totalWeight;
    for (const k of KINDS) if ((r -= WEIGHTS[k]) < 0) return k;
    return "put";
  };
  const withKeys = () => stored.map((m, w) => (m.size > 0 ? w : -1)).filter((w) => w >= 0);

  const ops: Record<Kind, () => Promise<void>> = {
    async put() {
      const w = int(workers.length);
      const data: Record<string, unknown> = {};
      const expect = new Map<string, Expected>();
      for (let n = 1 + int(3); n > 0; n--) {
        const key = keyOf(int(SLOTS));
        const c = ++counter;
        if (rng() < big) {
          const start = index * 1e7 + c;
          data[key] = bigValue(start);
          expect.set(key, { bigStart: start });
          report.bigValues++;
        } else {
          data[key] = smallValue(index, c);
          expect.set(key, { small: smallValue(index, c) });
        }
      }
      try {
        const reply = await peers[w].update_data({ data });
        check(
          reply.status === "OK" &&
            isDeepStrictEqual(Object.keys(reply.nbytes).sort(), [...expect.keys()].sort()),
          () => `update_data to ${workers[w]} replied ${describe(reply)}`,
        );
      } catch (error) {
        for (const key of expect.keys()) {
          stored[w].delete(key);
          gone[w].delete(key);
          unsure[w].add(key);
        }
        throw error;
      }
      for (const [key, e] of expect) {
        stored[w].set(key, e);
        gone[w].delete(key);
        unsure[w].delete(key);
      }
    },

    async get() {
      const candidates = withKeys();
      if (candidates.length === 0) return await ops.put();
      const w = candidates[int(candidates.length)];
      const have = [...stored[w].keys()];
      const keys = new Set<string>();
      for (let n = 1 + int(4); n > 0; n--) keys.add(have[int(have.length)]);
      const absent = [...gone[w]];
      const missing = absent[int(absent.length)];
      const got = await peers[w].get_data({ keys: [...keys, missing] });
      check(
        isDeepStrictEqual(Object.keys(got).sort(), [...keys].sort()),
        () => `get_data from ${workers[w]} gave keys ${Object.keys(got)}, expected ${[...keys]}`,
      );
      for (const key of keys) {
        const e = stored[w].get(key)!;
        const value = got[key];
        if ("bigStart" in e) {
          check(
            isBig(value, e.bigStart),
            () => `${key} on ${workers[w]} is ${describe(value)}, not the big value`,
          );
        } else {
          check(
            isDeepStrictEqual(value, e.small),
            () => `${key} on ${workers[w]} is ${describe(value)}, expected ${describe(e.small)}`,
          );
        }
      }
    },

    async delete() {
      const candidates = withKeys();
      if (candidates.length === 0) return await ops.put();
      const w = candidates[int(candidates.length)];
      const have = [...stored[w].keys()];
      const key = have[int(have.length)];
      stored[w].delete(key);
      unsure[w].add(key);
      const reply = await peers[w].delete_data({ keys: [key] });
      check(reply.status === "OK", () => `delete_data on ${workers[w]} replied ${describe(reply)}`);
      unsure[w].delete(key);
      gone[w].add(key);
    },

    async submit() {
      const c = ++counter;
      const [a, b, k] = [index + 1, c, int(1000)];
      const on = () => taskOptions({ workers: [workers[int(workers.length)]] });
      const futures: Future[] = [];
      try {
        if (rng() < big) {
          // 1 MiB result, then summed where the scheduler (or the restriction) puts it.
          const start = index * 1e7 + c;
          const filled = client.submit(loadFill, BIG_LENGTH, start, on());
          const sum = client.submit(loadSum, filled, on());
          futures.push(filled, sum);
          const [xs, s] = await client.gather([filled, sum]);
          const expected = BIG_LENGTH * start + (BIG_LENGTH * (BIG_LENGTH - 1)) / 2;
          check(
            xs instanceof Float64Array && xs.length === BIG_LENGTH && xs.every((v, i) => v === start + i),
            () => `loadFill(${BIG_LENGTH}, ${start}) gave ${describe(xs)}`,
          );
          check(s === expected, () => `loadSum gave ${s}, expected ${expected}`);
          report.bigValues++;
        } else {
          const first = client.submit(loadMulAdd, a, b, k, on());
          const second = client.submit(loadMulAdd, first, 2, 1, on());
          futures.push(first, second);
          const got = await second.result();
          check(
            got === (a * b + k) * 2 + 1,
            () => `loadMulAdd chain gave ${got}, expected ${(a * b + k) * 2 + 1}`,
          );
          const got1 = await first.result();
          check(got1 === a * b + k, () => `loadMulAdd gave ${got1}, expected ${a * b + k}`);
        }
      } finally {
        for (const f of futures) f.release();
      }
    },

    async map() {
      const n = 5 + int(36);
      // A third of maps use one of a few ranges every client uses: shared pure keys.
      const base = rng() < 0.33 ? int(4) * 100 : (index + 1) * 1e9 + ++counter * 100;
      const xs = Array.from({ length: n }, (_, i) => base + i);
      const futures = client.map(loadInc, xs);
      try {
        const got = await client.gather(futures);
        for (let i = 0; i < n; i++) {
          check(got[i] === xs[i] + 1, () => `loadInc(${xs[i]}) gave ${got[i]}`);
        }
      } finally {
        for (const f of futures) f.release();
      }
    },
  };

  try {
    while (!ctx.until.expired()) {
      const kind = pickKind();
      const t = performance.now();
      try {
        await timed(ops[kind](), timeoutMs, `client ${index}: ${kind}`);
        report.ops[kind]++;
        report.latencyMs[kind].push(performance.now() - t);
        ctx.bucket(kind);
      } catch (error) {
        ctx.fail(`client ${index}: ${kind}`, error);
      }
    }
    ctx.done();
    // Leave nothing behind: delete every key this client may have stored.
    for (let w = 0; w < workers.length; w++) {
      const keys = [...stored[w].keys(), ...unsure[w]];
      if (keys.length === 0) continue;
      try {
        await timed(peers[w].delete_data({ keys }), timeoutMs, `client ${index}: cleanup`);
      } catch (error) {
        ctx.fail(`client ${index}: cleanup on ${workers[w]}`, error);
      }
    }
  } finally {
    for (const p of peers) {
      try {
        await p.close();
      } catch (error) {
        ctx.fail(`client ${index}: closing rpc`, error);
      }
    }
    try {
      await client.close();
    } catch (error) {
      ctx.fail(`client ${index}: closing client`, error);
    }
  }
}

// ---- probes: connections and memory, from outside (Deno needs --allow-all for /proc) ----

/** One TCP socket as `ss -tanp` lists it. */
export interface TcpSocket {
  /** ESTAB, CLOSE-WAIT, FIN-WAIT-2, ... (LISTEN sockets are left out). */
  state: string;
  /** This end's port. */
  localPort: number;
  /** The other end's port. */
  peerPort: number;
  /** The processes that hold it. */
  pids: number[];
}

/** Every non-listening TCP socket that some process holds (sockets in TIME-WAIT have none). */
export async function tcpSockets(): Promise<TcpSocket[]> {
  const out = await new Deno.Command("ss", { args: ["-tanpH"], stdout: "piped", stderr: "piped" }).output();
  if (!out.success) throw new Error(`ss -tanpH failed: ${new TextDecoder().decode(out.stderr).trim()}`);
  const port = (endpoint: string) => Number(endpoint.slice(endpoint.lastIndexOf(":") + 1));
  const sockets: TcpSocket[] = [];
  for (const line of new TextDecoder().decode(out.stdout).split("\n")) {
    const f = line.trim().split(/\s+/);
    if (f.length < 6 || f[0] === "LISTEN") continue;
    const pids = [...line.matchAll(/pid=(\d+)/g)].map((m) => Number(m[1]));
    sockets.push({ state: f[0], localPort: port(f[3]), peerPort: port(f[4]), pids });
  }
  return sockets;
}

/** Resident set size in KiB of each process, by `ps`. */
export async function rssKiB(pids: number[]): Promise<Map<number, number>> {
  const out = await new Deno.Command("ps", {
    args: ["-o", "pid=,rss=", "-p", pids.join(",")],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const rss = new Map<number, number>();
  for (const line of new TextDecoder().decode(out.stdout).split("\n")) {
    const [pid, kib] = line.trim().split(/\s+/).map(Number);
    if (Number.isFinite(pid) && Number.isFinite(kib)) rss.set(pid, kib);
  }
  return rss;
}

/** The p-th percentile (0-100) of `xs`, nearest rank. */
export function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

function median(xs: number[]): number {
  return percentile(xs, 50);
}

/** Rows of cells as an aligned table; numbers right-aligned. */
export function table(rows: string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) =>
    r.map((
      cell,
      c,
    ) => (c > 0 && /^[-\d.,]+( \w+)?$/.test(cell) ? cell.padStart(widths[c]) : cell.padEnd(widths[c])))
      .join("  ").trimEnd()
  ).join("\n");
}

/**
 * The per-kind rows of the summary: ops, ops/s (the mean, and the worst whole second
 * after the first, when every process is still compiling), latencies.
 */
export function opsTable(r: LoadReport): string {
  const fmt = (v: number, d = 0) =>
    Number.isFinite(v)
      ? v.toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d })
      : "-";
  const whole = Math.floor(r.loopS);
  // Whole seconds only (the last is cut short by the deadline), from the second on.
  const worst = (counts: number[]) => {
    const full = Array.from({ length: whole - 1 }, (_, i) => counts[i + 1] ?? 0);
    return full.length === 0 ? NaN : Math.min(...full);
  };
  const rows = [["kind", "ops", "ops/s", "worst s (2nd on)", "p50 ms", "p99 ms", "max ms"]];
  for (const k of KINDS) {
    const lat = r.latencyMs[k];
    rows.push([
      k,
      fmt(r.ops[k]),
      fmt(r.ops[k] / r.loopS),
      fmt(worst(r.perSecond[k])),
      fmt(percentile(lat, 50), 2),
      fmt(percentile(lat, 99), 2),
      fmt(lat.length ? Math.max(...lat) : NaN, 1),
    ]);
  }
  const all = KINDS.flatMap((k) => r.latencyMs[k]);
  const total = KINDS.reduce((s, k) => s + r.ops[k], 0);
  const perSecond = Array.from(
    { length: whole },
    (_, i) => KINDS.reduce((s, k) => s + (r.perSecond[k][i] ?? 0), 0),
  );
  rows.push([
    "total",
    fmt(total),
    fmt(total / r.loopS),
    fmt(worst(perSecond)),
    fmt(percentile(all, 50), 2),
    fmt(percentile(all, 99), 2),
    fmt(all.length ? Math.max(...all) : NaN, 1),
  ]);
  return table(rows);
}

// ---- the script ----

interface Node {
  name: string;
  process: NodeProcess;
  pid: number;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Non-listening TCP sockets per pid. */
async function connectionsByPid(pids: number[]): Promise<Map<number, TcpSocket[]>> {
  const all = await tcpSockets();
  return new Map(pids.map((pid) => [pid, all.filter((s) => s.pids.includes(pid))]));
}

/**
 * Makes each worker fetch from the other once, so that their pooled peer connections
 * (kept for the node's life) belong to the baseline, not to the load; leaves no data.
 */
export async function warmUp(scheduler: string, workers: string[]): Promise<void> {
  const peers = workers.map((w) => rpc<WorkerOps>(w));
  try {
    for (let i = 0; i < peers.length; i++) await peers[i].update_data({ data: { [`warm-${i}`]: i } });
    for (let i = 0; i < peers.length; i++) {
      await peers[i].compute({
        key: `warmsum-${i}`,
        function: (x: number) => x + 1,
        keys: [`warm-${(i + 1) % peers.length}`],
      });
    }
    await using client = await Client.connect(scheduler);
    const f = client.map(loadInc, [1, 2, 3]);
    await client.gather(f);
    for (const x of f) x.release();
    await using s = rpc<SchedulerOps>(scheduler);
    await s.delete_data({ keys: peers.flatMap((_, i) => [`warm-${i}`, `warmsum-${i}`]) });
  } finally {
    for (const p of peers) await p.close();
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      clients: { type: "string", default: "64" },
      seconds: { type: "string", default: "30" },
      seed: { type: "string", default: "1" },
      settle: { type: "string", default: "5" },
      big: { type: "string", default: String(BIG_PROBABILITY) },
    },
  });
  const clients = Number(values.clients);
  const seconds = Number(values.seconds);
  const seed = Number(values.seed);
  const settleS = Number(values.settle);
  const bigProbability = Number(values.big);
  for (const [name, v] of Object.entries({ clients, seconds, seed, settle: settleS, big: bigProbability })) {
    if (!Number.isFinite(v) || v < 0) throw new RangeError(`Invalid --${name}: expected a number from 0 up`);
  }

  const nodes: Node[] = [];
  const nodeLogs: string[] = [];
  const spawn = async (name: string, args: string[]) => {
    const p = await spawnNode([...args, "--log-level", "warn"], {
      onLog: (line) => nodeLogs.push(`${name}: ${line}`),
    });
    nodes.push({ name, process: p, pid: p.child.pid });
    return p;
  };
  let failed = false;
  const problems: string[] = [];
  try {
    const scheduler = await spawn("scheduler", ["scheduler", "--port", "0"]);
    for (let i = 0; i < 2; i++) {
      await spawn(`worker ${i}`, ["worker", scheduler.address, "--nthreads", "1", "--name", `w${i}`]);
    }
    const workers = nodes.slice(1).map((n) => n.process.address);
    const pids = [...nodes.map((n) => n.pid), Deno.pid];
    const names = new Map<number, string>([...nodes.map((n) => [n.pid, n.name] as const), [
      Deno.pid,
      "load (this)",
    ]]);

    await warmUp(scheduler.address, workers);
    await sleep(500);
    const baseline = await connectionsByPid(pids);
    const rssStart = await rssKiB(pids);

    // Sample RSS and connections every second, through the load and the settle period.
    const samples: { t: number; rss: Map<number, number>; conns: Map<number, number> }[] = [];
    const t0 = performance.now();
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        const [rss, conns] = await Promise.all([rssKiB(pids), connectionsByPid(pids)]);
        samples.push({
          t: (performance.now() - t0) / 1000,
          rss,
          conns: new Map([...conns].map(([pid, s]) => [pid, s.length])),
        });
        await sleep(1000);
      }
    })();

    console.error(
      `load: ${clients} clients for ${seconds} s against ${scheduler.address} (workers ${
        workers.join(", ")
      }), seed ${seed}`,
    );
    let lastTick = 0;
    const report = await runLoad({
      scheduler: scheduler.address,
      workers,
      clients,
      seconds,
      seed,
      bigProbability,
      onTick: (s, r) => {
        if (s - lastTick < 5) return;
        lastTick = s;
        const total = KINDS.reduce((n, k) => n + r.ops[k], 0);
        console.error(`  ${s.toFixed(0).padStart(3)} s: ${total} ops, ${r.errors} errors`);
      },
    });
    const loadEnded = (performance.now() - t0) / 1000;

    // Connections must come back to the baseline within a short grace period.
    const graceMs = 5_000;
    const graceStart = performance.now();
    let after = await connectionsByPid(pids);
    const same = () => pids.every((pid) => after.get(pid)!.length === baseline.get(pid)!.length);
    while (!same() && performance.now() - graceStart < graceMs) {
      await sleep(100);
      after = await connectionsByPid(pids);
    }
    const backInMs = performance.now() - graceStart;

    // What the cluster still holds of the clients' keys and tasks.
    await using s = rpc<SchedulerOps>(scheduler.address);
    const leftoverWorkerKeys: string[] = [];
    for (const w of workers) {
      await using peer = rpc<WorkerOps>(w);
      leftoverWorkerKeys.push(...(await peer.keys()).map((k) => `${w} ${k}`));
    }
    const whoHas = await s.who_has({});
    const progress = await s.progress();
    const leftoverTasks = Object.entries(progress).filter(([prefix]) =>
      prefix === KEY_PREFIX || TASK_PREFIXES.includes(prefix)
    );
    const workerInfo = await s.workers();
    await s.close();

    await sleep(settleS * 1000);
    sampling = false;
    await sampler;
    const rssEnd = await rssKiB(pids);
    const finalConns = await connectionsByPid(pids);

    // ---- summary ----
    const mib = (kib: number | undefined) => kib === undefined ? "-" : (kib / 1024).toFixed(1);
    console.log(
      `\nLoad: ${report.clients} clients x ${seconds} s (loop ${report.loopS.toFixed(1)} s, all in ${
        report.elapsedS.toFixed(1)
      } s) against a scheduler and 2 workers x 1 thread, separate processes on 127.0.0.1; ` +
        `${navigator.hardwareConcurrency} cores; deno ${Deno.version.deno}; seed ${seed}; ` +
        `1 MiB values p=${bigProbability}\n`,
    );
    console.log(opsTable(report));
    console.log(
      `\nvalues checked: ${
        report.checks.toLocaleString("en-US")
      }; 1 MiB values: ${report.bigValues}; errors: ${report.errors}`,
    );
    for (const e of report.errorSamples) console.log(`  error: ${e}`);
    const perSecond = Array.from(
      { length: Math.floor(report.loopS) },
      (_, i) => KINDS.reduce((n, k) => n + (report.perSecond[k][i] ?? 0), 0),
    );
    console.log(`ops in each second of the loop: ${perSecond.join(" ")}`);

    const loadSamples = samples.filter((x) => x.t <= loadEnded);
    const half = loadSamples.filter((x) => x.t >= loadEnded / 2);
    const rows = [[
      "process",
      "conns before",
      "peak",
      "after",
      "final",
      "RSS start MiB",
      "steady",
      "peak",
      "end",
      "end/steady",
    ]];
    for (const pid of pids) {
      const steady = median(half.map((x) => x.rss.get(pid) ?? NaN).filter(Number.isFinite));
      const peakRss = Math.max(...samples.map((x) => x.rss.get(pid) ?? 0), rssEnd.get(pid) ?? 0);
      const peakConns = Math.max(...samples.map((x) => x.conns.get(pid) ?? 0));
      const end = rssEnd.get(pid) ?? NaN;
      const ratio = end / steady;
      rows.push([
        `${names.get(pid)} (${pid})`,
        String(baseline.get(pid)!.length),
        String(peakConns),
        String(after.get(pid)!.length),
        String(finalConns.get(pid)!.length),
        mib(rssStart.get(pid)),
        mib(steady),
        mib(peakRss),
        mib(end),
        Number.isFinite(ratio) ? ratio.toFixed(2) : "-",
      ]);
      if (after.get(pid)!.length !== baseline.get(pid)!.length) {
        const extra = after.get(pid)!.filter((x) =>
          !baseline.get(pid)!.some((b) => b.localPort === x.localPort && b.peerPort === x.peerPort)
        );
        problems.push(
          `${names.get(pid)}: ${after.get(pid)!.length} TCP connections ${
            graceMs / 1000
          } s after the clients closed, ` +
            `${baseline.get(pid)!.length} before; new: ${
              extra.slice(0, 10).map((x) => `${x.state} :${x.localPort}->:${x.peerPort}`).join(", ")
            }`,
        );
      }
      // Generous: V8 keeps heap it grew, but twice the steady state means it keeps growing.
      if (pid !== Deno.pid && Number.isFinite(ratio) && ratio > 2) {
        problems.push(
          `${names.get(pid)}: RSS ended at ${mib(end)} MiB, ${ratio.toFixed(2)}x the steady ${
            mib(steady)
          } MiB`,
        );
      }
    }
    // Growth during the run: the last quarter against the second quarter.
    for (const n of nodes) {
      const q = (a: number, b: number) =>
        median(
          loadSamples.filter((x) => x.t >= loadEnded * a && x.t < loadEnded * b).map((x) =>
            x.rss.get(n.pid)!
          ),
        );
      const [q2, q4] = [q(0.25, 0.5), q(0.75, 1.01)];
      const growth = q4 / q2;
      console.error(
        `${n.name}: RSS median ${mib(q2)} MiB in the 2nd quarter, ${mib(q4)} MiB in the 4th (x${
          growth.toFixed(2)
        })`,
      );
      if (growth > 1.5 && q4 - q2 > 64 * 1024) {
        problems.push(
          `${n.name}: RSS grew from ${mib(q2)} to ${mib(q4)} MiB between the 2nd and 4th quarter of the run`,
        );
      }
    }
    console.log(
      `\nconnections back to the baseline in ${
        backInMs.toFixed(0)
      } ms (grace ${graceMs} ms); settle ${settleS} s\n`,
    );
    console.log(table(rows));
    console.log(
      `\nworkers after: ${
        workerInfo.map((w) => `${w.name} ${w.nkeys} keys ${w.nbytes} bytes`).join("; ")
      }; ` +
        `worker keys left: ${leftoverWorkerKeys.length}; scheduler who_has: ${
          Object.keys(whoHas).length
        } keys; ` +
        `tasks left: ${leftoverTasks.length ? JSON.stringify(Object.fromEntries(leftoverTasks)) : "none"}`,
    );
    // The nodes log at warn: every line they wrote is a warning or an error.
    const warnings = nodeLogs;
    console.log(`node log lines (warn and error): ${warnings.length}`);
    for (const l of warnings.slice(0, 10)) console.log(`  ${l}`);

    if (report.errors > 0) problems.push(`${report.errors} errors`);
    if (leftoverWorkerKeys.length > 0) {
      problems.push(
        `workers still hold ${leftoverWorkerKeys.length} keys: ${leftoverWorkerKeys.slice(0, 10).join(", ")}`,
      );
    }
    if (Object.keys(whoHas).length > 0) {
      problems.push(
        `the scheduler still knows ${Object.keys(whoHas).length} keys: ${
          Object.keys(whoHas).slice(0, 10).join(", ")
        }`,
      );
    }
    if (leftoverTasks.length > 0) {
      problems.push(`the scheduler still has tasks: ${JSON.stringify(leftoverTasks)}`);
    }
    for (const k of KINDS) {
      if (report.ops[k] === 0 && seconds > 0) problems.push(`no ${k} operation completed`);
    }
  } catch (error) {
    problems.push(`the run failed: ${(error as Error).stack ?? error}`);
  } finally {
    for (const n of [...nodes].reverse()) await n.process.stop();
  }
  failed = problems.length > 0;
  console.log(
    failed ? `\nFAIL\n${problems.map((p) => `  - ${p}`).join("\n")}` : "\nPASS: no errors, no leaks",
  );
  if (failed) Deno.exitCode = 1;
}

if (import.meta.main) await main();
