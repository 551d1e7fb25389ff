/**
 * dist against Dask distributed, side by side in one run on this machine: the same
 * layout for both (a scheduler and two worker processes with one thread each on
 * 127.0.0.1, the client here), the same operations, each runtime's raw TCP limits
 * measured in the same run, and a table of both figures, the ratio and the targets.
 *
 *   raw TCP round trip and bulk throughput (Deno for dist; Python asyncio, Dask's event
 *     loop, for Dask), bulk both into a reused buffer and into fresh memory
 *   the round trip of a tiny `get_data` to a worker
 *   10,000 independent tasks; a 4,096-leaf tree reduction; a 1,000-task chain
 *   the seed exchange through the client
 *   256 MiB (a Float64Array / numpy float64 array, and raw bytes) scattered to a worker,
 *     gathered back, and fetched by the other worker for a task that needs it
 *   idle RSS of a scheduler and a worker process; seconds from starting a worker
 *     process until the scheduler lists it
 *
 * dist runs first (its own processes, `deno run main.ts ...`), then Dask (`python3 -m
 * distributed.cli.dask_scheduler` / `dask_worker --no-nanny`, and bench/dask_bench.py
 * as its client). Dask is looked for as a python3 that can `import distributed, numpy`,
 * /usr/bin/python3 first ($DIST_COMPARE_PYTHON names another); without one, Dask's
 * column is n/a and the run says how to install it. Repeated figures: full-size
 * warm-up rounds (for task figures, for `taskWarmupS`, the same time for both sides),
 * then up to `rounds` rounds (fewer once a figure's time budget has run out, at least
 * one), median reported. Throughput is in MB/s, 1 MB = 1e6 bytes.
 * Every child process and the temp directory are removed at the end, on failure, on
 * SIGINT/SIGTERM/SIGHUP and when the watchdog fires.
 *
 * Run: deno task bench:compare [--quick] [--json PATH]
 * (GLIBC_TUNABLES=glibc.malloc.hugetlb=1 deno run --v8-flags=--expose-gc --allow-net
 * --allow-read --allow-write --allow-run --allow-env --allow-sys --unstable-worker-options
 * bench/compare.ts; write is for --json and the temp directory of Dask's workers, run for
 * deno, python3, ps and cat. The tunable gives this process's large buffers transparent
 * huge pages, as dist's nodes take for themselves and numpy for Dask's client; every
 * process of both sides inherits it. --expose-gc lets it drop a gathered 256 MiB at once,
 * as Python's reference counting does.)
 *
 * @module
 */

import {
  median,
  minorFaults,
  output,
  randomF64,
  RAW_HELPER_SOURCE,
  rawBulk,
  readFull,
  writeAll,
} from "./_raw.ts";
import { benchArgs } from "./_args.ts";
import { type NodeProcess, spawnNode } from "../client/spawn.ts";
import {
  Client,
  type Future,
  type Rpc,
  rpc,
  type SchedulerOps,
  taskOptions,
  type WorkerOps,
} from "../mod.ts";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const MB = 1e6;
/** Everything is closed and the run fails if it takes longer than this. */
const WATCHDOG_MS = 480_000;
/** How long a helper or node may take to say it is ready. */
const START_TIMEOUT_MS = 60_000;
/** A process that ignores SIGTERM this long gets SIGKILL. */
const KILL_AFTER_MS = 5_000;
/** How often the registration probe asks the scheduler for its workers (both sides). */
const REGISTRATION_POLL_MS = 2;
/** Lines of each child's output kept for the failure report. */
const LOG_LINES_MAX = 400;
/** The Dask client script may take this long. */
const DASK_BENCH_TIMEOUT_MS = 360_000;
const INSTALL_HINT = "apt-get update && apt-get install -y python3-distributed python3-numpy";
const DASK_SCRIPT = new URL("./dask_bench.py", import.meta.url);

/** The 10,000-task map's target on the bench layout (scheduler and 2 workers x 1 thread). */
const MAP_TASKS_PER_S_TARGET = 25_000;

/** How much each figure does; the Dask script gets the same plan. */
interface Plan {
  mode: "full" | "quick";
  roundTrips: number;
  roundTripWarmup: number;
  roundTripBlocks: number;
  bulkBytes: number;
  bulkRuns: number;
  /** Rounds per task figure after the warm-up (fewer if `roundBudgetS` runs out). */
  rounds: number;
  roundBudgetS: number;
  /**
   * Full-size warm-up rounds of a task figure repeat until this long has passed (at
   * least one): the same time for both sides (more for a side whose one round takes
   * longer), so each runtime's compiled code and heaps reach their working state however
   * many tasks that takes it.
   */
  taskWarmupS: number;
  mapTasks: number;
  treeLeaves: number;
  chain: number;
  seeds: number;
  transferBytes: number;
  transferRuns: number;
  transferBudgetS: number;
  registrationSamples: number;
  /** Idle time before RSS is read. */
  settleMs: number;
}

const FULL: Plan = {
  mode: "full",
  roundTrips: 5_000,
  roundTripWarmup: 2_000,
  roundTripBlocks: 10,
  bulkBytes: 256 * MiB,
  bulkRuns: 5,
  rounds: 3,
  roundBudgetS: 10,
  taskWarmupS: 3,
  mapTasks: 10_000,
  treeLeaves: 4_096,
  chain: 1_000,
  seeds: 200,
  transferBytes: 256 * MiB,
  transferRuns: 5,
  transferBudgetS: 12,
  registrationSamples: 3,
  settleMs: 1_000,
};

const QUICK: Plan = {
  mode: "quick",
  roundTrips: 500,
  roundTripWarmup: 200,
  roundTripBlocks: 5,
  bulkBytes: 32 * MiB,
  bulkRuns: 2,
  rounds: 1,
  roundBudgetS: 5,
  taskWarmupS: 0,
  mapTasks: 1_000,
  treeLeaves: 256,
  chain: 100,
  seeds: 20,
  transferBytes: 32 * MiB,
  transferRuns: 1,
  transferBudgetS: 5,
  registrationSamples: 1,
  settleMs: 300,
};

// ---- child processes ----

/** A child process of this run, with its output kept and a stop that always ends it. */
interface Proc {
  readonly name: string;
  readonly pid: number;
  readonly log: string[];
  stop(): Promise<void>;
}

/** SIGTERM, then SIGKILL if it is still there after KILL_AFTER_MS; resolves once it exited. */
async function terminate(child: Deno.ChildProcess, exited: Promise<unknown>): Promise<void> {
  try {
    child.kill("SIGTERM");
  } catch { /* exited already */ }
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<"late">((resolve) => timer = setTimeout(() => resolve("late"), KILL_AFTER_MS));
  const how = await Promise.race([exited.then(() => "exited" as const, () => "exited" as const), late]);
  clearTimeout(timer);
  if (how === "late") {
    try {
      child.kill("SIGKILL");
    } catch { /* exited meanwhile */ }
    await exited.catch(() => {});
  }
}

function fromNode(name: string, node: NodeProcess): Proc {
  return { name, pid: node.child.pid, log: node.log, stop: () => terminate(node.child, node.status) };
}

async function* lines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let rest = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    rest += chunk;
    let nl: number;
    while ((nl = rest.indexOf("\n")) >= 0) {
      yield rest.slice(0, nl);
      rest = rest.slice(nl + 1);
    }
  }
  if (rest) yield rest;
}

/** A spawned program whose stdout and stderr are read line by line as they come. */
interface Spawned extends Proc {
  readonly stdout: string[];
  readonly status: Promise<Deno.CommandStatus>;
  /** Resolves with the first line (stdout or stderr, past or future) matching `pattern`. */
  waitFor(pattern: RegExp, timeoutMs: number): Promise<RegExpExecArray>;
}

function spawn(
  name: string,
  command: string,
  args: string[],
  options: { env?: Record<string, string>; onStderr?: (line: string) => void } = {},
): Spawned {
  const child = new Deno.Command(command, {
    args,
    env: options.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const log: string[] = [];
  const stdout: string[] = [];
  const waiters = new Set<{ pattern: RegExp; resolve: (m: RegExpExecArray) => void }>();
  const seen = (line: string) => {
    log.push(line);
    if (log.length > LOG_LINES_MAX) log.shift();
    for (const w of waiters) {
      const m = w.pattern.exec(line);
      if (m) {
        waiters.delete(w);
        w.resolve(m);
      }
    }
  };
  const read = async (stream: ReadableStream<Uint8Array>, onLine: (line: string) => void) => {
    try {
      for await (const line of lines(stream)) onLine(line);
    } catch { /* killed */ }
  };
  const readers = Promise.all([
    read(child.stdout, (line) => {
      stdout.push(line);
      seen(line);
    }),
    read(child.stderr, (line) => {
      options.onStderr?.(line);
      seen(line);
    }),
  ]);
  const status = Promise.all([child.status, readers]).then(([s]) => s);
  let exited = false;
  const onExit = new Set<() => void>();
  status.then(() => {
    exited = true;
    for (const f of onExit) f();
  });
  return {
    name,
    pid: child.pid,
    log,
    stdout,
    status,
    stop: () => terminate(child, status),
    waitFor(pattern, timeoutMs) {
      for (const line of log) {
        const m = pattern.exec(line);
        if (m) return Promise.resolve(m);
      }
      return new Promise((resolve, reject) => {
        const waiter = {
          pattern,
          resolve: (m: RegExpExecArray) => {
            clearTimeout(timer);
            onExit.delete(onExited);
            resolve(m);
          },
        };
        const fail = (why: string) => {
          waiters.delete(waiter);
          onExit.delete(onExited);
          clearTimeout(timer);
          reject(new Error(`${name} ${why} before printing ${pattern}:\n${log.slice(-30).join("\n")}`));
        };
        const onExited = () => {
          if (waiters.has(waiter)) fail("exited");
        };
        const timer = setTimeout(() => fail(`stayed silent for ${timeoutMs} ms`), timeoutMs);
        waiters.add(waiter);
        if (exited) onExited();
        else onExit.add(onExited);
      });
    },
  };
}

/** What the run opened, so that `finally`, a signal and the watchdog can close it all. */
class Resources {
  readonly conns = new Set<Deno.Conn>();
  readonly closers: { close(): Promise<void> }[] = [];
  readonly procs: Proc[] = [];
  readonly tempDirs: string[] = [];

  track<P extends Proc>(proc: P): P {
    this.procs.push(proc);
    return proc;
  }

  async stop(proc: Proc): Promise<void> {
    const i = this.procs.indexOf(proc);
    if (i >= 0) this.procs.splice(i, 1);
    await proc.stop();
  }

  async connect(port: number): Promise<Deno.TcpConn> {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    conn.setNoDelay(true);
    this.conns.add(conn);
    return conn;
  }

  /** Closes everything opened so far; safe to call again for what was opened since. */
  async closeAll(): Promise<void> {
    for (const conn of this.conns) {
      try {
        conn.close();
      } catch { /* closed already */ }
    }
    this.conns.clear();
    const closers = this.closers.splice(0);
    await Promise.allSettled(closers.reverse().map((c) => withTimeout(c.close(), KILL_AFTER_MS)));
    const procs = this.procs.splice(0);
    await Promise.allSettled(procs.reverse().map((p) => p.stop()));
    for (const dir of this.tempDirs.splice(0)) {
      try {
        await Deno.remove(dir, { recursive: true });
      } catch { /* gone already */ }
    }
  }
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), ms)),
  ]);
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A process's resident memory in bytes: all of it, and its private (anonymous) and file-backed parts. */
interface Memory {
  rss: number;
  anon: number | null;
  file: number | null;
}

/**
 * RSS from `ps` (Deno reads /proc only with --allow-all, so /proc goes through a child
 * process); the split into anonymous and file-backed pages from /proc/PID/status.
 */
async function memoryOf(pid: number): Promise<Memory> {
  const kib = Number((await output("ps", ["-o", "rss=", "-p", String(pid)]))?.trim());
  if (!Number.isFinite(kib) || kib <= 0) throw new Error(`ps found no RSS for pid ${pid}`);
  const status = await output("cat", [`/proc/${pid}/status`]) ?? "";
  const field = (name: string) => {
    const m = new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(status);
    return m ? Number(m[1]) * 1024 : null;
  };
  return { rss: kib * 1024, anon: field("RssAnon"), file: field("RssFile") };
}

// ---- raw TCP on Deno: a helper process, Deno.listen + conn.read/conn.write only ----

/** Ports printed as `{"echo": P, "sink": P}` by either raw helper. */
async function helperPorts(proc: Spawned): Promise<{ echo: number; sink: number }> {
  const m = await proc.waitFor(/^(\{"echo".*\})$/, START_TIMEOUT_MS);
  return JSON.parse(m[1]) as { echo: number; sink: number };
}

/** One round trip of 8 bytes through the echo helper; microseconds. */
async function rawRoundTrip(conn: Deno.Conn, out: Uint8Array, back: Uint8Array, i: number): Promise<number> {
  new DataView(out.buffer).setUint32(0, i, true);
  const t0 = performance.now();
  await writeAll(conn, out);
  await readFull(conn, back);
  const t1 = performance.now();
  if (back[0] !== out[0] || back[1] !== out[1]) throw new Error("The echo came back wrong");
  return (t1 - t0) * 1000;
}

// ---- repeated figures ----

/**
 * Warm-up rounds until `plan.taskWarmupS` has passed (at least one; each pushed to
 * `warmup` if given, rounds -1, -2, ... so that no two share keys), then up to
 * `plan.rounds` rounds; after the first, another round starts only while the figure is
 * within its budget. The Dask script does the same.
 */
async function rounds(
  plan: Plan,
  once: (round: number) => Promise<number>,
  budgetS = plan.roundBudgetS,
  warmup: number[] = [],
): Promise<number[]> {
  const w0 = performance.now();
  do {
    warmup.push(await once(-1 - warmup.length));
  } while ((performance.now() - w0) / 1000 < plan.taskWarmupS);
  const out: number[] = [];
  const t0 = performance.now();
  while (out.length < plan.rounds && (out.length === 0 || (performance.now() - t0) / 1000 < budgetS)) {
    out.push(await once(out.length));
  }
  return out;
}

const inc = (x: number) => x + 1;
const add = (a: number, b: number) => a + b;

async function mapRate(client: Client, n: number, round: number): Promise<number> {
  const base = (round + 2) * 1e7;
  const t = performance.now();
  const futures = client.map(inc, Array.from({ length: n }, (_, i) => base + i));
  const results = await client.gather(futures);
  const s = (performance.now() - t) / 1000;
  if (results[n - 1] !== base + n) throw new Error("map gave a wrong result");
  for (const f of futures) f.release();
  return n / s;
}

async function treeRate(client: Client, leaves: number, round: number): Promise<number> {
  const base = (round + 2) * 1e7;
  const t = performance.now();
  let level: Future<number>[] = client.map(inc, Array.from({ length: leaves }, (_, i) => base + i));
  let tasks = level.length;
  while (level.length > 1) {
    const next: Future<number>[] = [];
    for (let i = 0; i < level.length; i += 2) next.push(client.submit(add, level[i], level[i + 1]));
    for (const f of level) f.release();
    tasks += next.length;
    level = next;
  }
  const total = await level[0].result();
  const s = (performance.now() - t) / 1000;
  const expected = leaves * (base + 1) + (leaves * (leaves - 1)) / 2;
  if (total !== expected) throw new Error(`tree gave ${total}, expected ${expected}`);
  level[0].release();
  return tasks / s;
}

async function chainMs(client: Client, n: number, round: number): Promise<number> {
  const base = (round + 2) * 1e7;
  const t = performance.now();
  let f = client.submit(inc, base);
  for (let i = 1; i < n; i++) {
    const next = client.submit(inc, f);
    f.release();
    f = next;
  }
  const value = await f.result();
  const ms = (performance.now() - t) / n;
  if (value !== base + n) throw new Error("chain gave a wrong result");
  f.release();
  return ms;
}

/** x on one worker, a fresh `a` on the other each time; z <- add(x, a) through the client; median ms. */
async function seedMs(client: Client, workers: string[], seeds: number, round: number): Promise<number> {
  const [x] = await client.scatter([new Float64Array(1000).fill(1)], { workers: [workers[0]] });
  const samples: number[] = [];
  for (let i = 0; i < seeds; i++) {
    const value = (round + 1) * seeds + i;
    const [a] = await client.scatter([new Float64Array([value])], { workers: [workers[1]] });
    const t = performance.now();
    const z = client.submit((u: Float64Array, v: Float64Array) => u[0] + v[0], x, a);
    const got = await z.result();
    samples.push(performance.now() - t);
    if (got !== 1 + value) throw new Error(`seed exchange gave ${got}, expected ${1 + value}`);
    z.release();
    a.release();
  }
  x.release();
  return median(samples);
}

interface TransferRates {
  scatter: number[];
  gather: number[];
  w2w: number[];
  /** Minor page faults Alice took during each worker-to-worker run. */
  w2wFaults: number[];
}

/**
 * Per run: scatter `make()` to Bob, gather it back, then Alice runs a task that needs it
 * (its length), so she fetches it from Bob. The warm-up run moves the same value: every
 * buffer on the way (each side's pools, the kernel's, this process's heap) reaches the
 * size the measured runs need, for Dask as for dist.
 */
async function transfers(
  client: Client,
  center: Rpc<SchedulerOps>,
  plan: Plan,
  make: (bytes: number) => Float64Array | Uint8Array,
  alice: { address: string; pid: number },
  bob: string,
): Promise<TransferRates> {
  const out: TransferRates = { scatter: [], gather: [], w2w: [], w2wFaults: [] };
  const value = make(plan.transferBytes);
  const t0 = performance.now();
  for (let run = -1; run < plan.transferRuns; run++) {
    if (run > 0 && (performance.now() - t0) / 1000 > plan.transferBudgetS) break;
    let t = performance.now();
    const [f] = await client.scatter([value], { workers: [bob] });
    const scatterS = (performance.now() - t) / 1000;
    const holders = (await center.who_has({ keys: [f.key] }))[f.key] ?? [];
    if (holders.length !== 1 || holders[0] !== bob) throw new Error(`scatter put ${f.key} on ${holders}`);

    t = performance.now();
    let got: unknown = await f.result();
    const gatherS = (performance.now() - t) / 1000;
    verifySame(got, value);
    got = null;
    // Let go of the gathered copy now, as Python's reference counting does on Dask's side:
    // garbage this process kept would take the memory Alice is about to receive into.
    collectGarbage();

    const faults0 = await minorFaults(alice.pid);
    t = performance.now();
    const len = client.submit(
      (a: Float64Array | Uint8Array) => a.length,
      f,
      taskOptions({ workers: [alice.address], pure: false }),
    );
    const n = await len.result();
    const w2wS = (performance.now() - t) / 1000;
    const faults1 = await minorFaults(alice.pid);
    if (n !== value.length) throw new Error(`Alice computed length ${n}, expected ${value.length}`);
    const after = (await center.who_has({ keys: [f.key] }))[f.key] ?? [];
    if (!after.includes(alice.address)) throw new Error("Alice did not keep a replica: she never fetched it");
    len.release();
    f.release();
    await sleep(200); // the workers free it before the next run
    if (run >= 0) {
      out.scatter.push(value.byteLength / MB / scatterS);
      out.gather.push(value.byteLength / MB / gatherS);
      out.w2w.push(value.byteLength / MB / w2wS);
      if (faults0 !== null && faults1 !== null) out.w2wFaults.push(faults1 - faults0);
    }
  }
  return out;
}

/** A collection now, when this process runs with --expose-gc (the task gives it). */
function collectGarbage(): void {
  (globalThis as { gc?: () => void }).gc?.();
}

const CHECK_AT = (n: number) => [0, 1, 12345 % n, n >> 1, n - 1];

/** Random bytes: incompressible. */
function randomU8(bytes: number): Uint8Array {
  const a = new Uint8Array(bytes);
  for (let at = 0; at < bytes; at += 65536) {
    crypto.getRandomValues(a.subarray(at, Math.min(bytes, at + 65536)));
  }
  return a;
}

/** 0, 1, 2, ... as float64: highly compressible (what earlier runs sent; Dask lz4-compresses it). */
function arangeF64(bytes: number): Float64Array {
  const a = new Float64Array(bytes / 8);
  for (let i = 0; i < a.length; i++) a[i] = i;
  return a;
}

/** Throws unless `got` is an array of `sent`'s kind and length with the same elements where sampled. */
function verifySame(got: unknown, sent: Float64Array | Uint8Array): void {
  if (got?.constructor !== sent.constructor || (got as typeof sent).length !== sent.length) {
    throw new Error(
      `expected a ${sent.constructor.name} of ${sent.byteLength} bytes, got ${
        Object.prototype.toString.call(got)
      }`,
    );
  }
  const g = got as typeof sent;
  for (const i of CHECK_AT(g.length)) {
    if (g[i] !== sent[i]) throw new Error(`element ${i} is ${g[i]}, sent ${sent[i]}`);
  }
}

// ---- the two sides ----

/** The samples of one side; the Dask script prints the same fields. */
interface Side {
  versions: Record<string, string>;
  rawRoundTripUs: number[];
  rpcRoundTripUs: number[];
  rawBulkMBps: number[];
  /** Into fresh memory with transparent huge pages: glibc's tunable for Deno (as dist's nodes run), numpy's own madvise for Python. */
  rawBulkFreshMBps: number[];
  /** dist only: minor page faults the huge-page sink took per fresh run (one per 4 KiB page if it got no huge pages). */
  rawBulkFreshFaults?: number[];
  /** dist only: Deno's default, fresh memory without glibc's THP tunable (4 KiB pages). */
  rawBulkFreshSmallMBps?: number[];
  /** The map's warm-up rounds, in order. */
  mapWarmupTasksPerS: number[];
  mapTasksPerS: number[];
  treeTasksPerS: number[];
  chainMsPerTask: number[];
  seedMs: number[];
  /** Random (incompressible) data. */
  transfer_f64: TransferRates;
  transfer_bytes: TransferRates;
  /** 0, 1, 2, ...: compressible; Dask lz4-compresses it. */
  transfer_f64_arange: TransferRates;
  registrationS: number[];
  schedulerMemory: Memory;
  workerMemory: Memory[];
}

type Step = (what: string) => void;

/**
 * Starts Deno's raw helper from a file with a short command line. Debian 12's glibc
 * (2.36) decides whether to honour its THP tunable by comparing the THP mode it read
 * against a string it never ends, so the outcome depends on a stale byte on the stack,
 * which shifts with the size of the command line: a script run as a data: URL lost the
 * huge pages in 8 of 20 starts, the same script from a file in none of 20. The report's
 * fault counts show which way it went.
 */
async function startDenoHelper(res: Resources, env?: Record<string, string>) {
  const dir = await Deno.makeTempDir({ prefix: "dist-compare-raw-" });
  res.tempDirs.push(dir);
  const file = `${dir}/raw.js`;
  await Deno.writeTextFile(file, RAW_HELPER_SOURCE);
  const proc = res.track(
    spawn("raw TCP helper (Deno)", Deno.execPath(), ["run", "--allow-net", "--v8-flags=--expose-gc", file], {
      env,
    }),
  );
  return { proc, ports: await helperPorts(proc) };
}

/** Seconds from starting a worker process until the scheduler lists it, `samples` times. */
async function distRegistration(
  res: Resources,
  center: Rpc<SchedulerOps>,
  address: string,
  samples: number,
  step: Step,
): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < samples; i++) {
    const deadline = performance.now() + START_TIMEOUT_MS;
    while ((await center.workers()).length > 0) {
      if (performance.now() > deadline) throw new Error("The previous probe worker never left the scheduler");
      await sleep(10);
    }
    const t0 = performance.now();
    let failed: unknown = null;
    const starting = spawnNode(["worker", address, "--nthreads", "1", "--log-level", "warn", "--no-nanny"]);
    starting.catch((error) => failed = error);
    while ((await center.workers()).length < 1) {
      if (failed) throw failed;
      if (performance.now() - t0 > START_TIMEOUT_MS) throw new Error("The probe worker did not register");
      await sleep(REGISTRATION_POLL_MS);
    }
    out.push((performance.now() - t0) / 1000);
    step(`dist worker ${i + 1}/${samples} registered in ${out[i].toFixed(3)} s`);
    const node = res.track(fromNode("probe worker", await starting));
    await res.stop(node);
  }
  return out;
}

async function runDist(plan: Plan, res: Resources, step: Step): Promise<Side> {
  step("dist: starting the raw TCP helpers and a scheduler");
  const helper = await startDenoHelper(res, { GLIBC_TUNABLES: "glibc.malloc.hugetlb=1" });
  const smallHelper = await startDenoHelper(res, { GLIBC_TUNABLES: "" });
  const schedulerNode = await spawnNode(["scheduler", "--port", "0", "--log-level", "warn"]);
  const scheduler = res.track(fromNode("dist scheduler", schedulerNode));
  const center = rpc<SchedulerOps>(schedulerNode.address);
  res.closers.push(center);

  step(`dist: worker registration x ${plan.registrationSamples}`);
  const registrationS = await distRegistration(
    res,
    center,
    schedulerNode.address,
    plan.registrationSamples,
    step,
  );

  step("dist: starting alice and bob");
  const workerNodes: NodeProcess[] = [];
  for (const name of ["alice", "bob"]) {
    const node = await spawnNode([
      "worker",
      schedulerNode.address,
      "--name",
      name,
      "--nthreads",
      "1",
      "--log-level",
      "warn",
      // One process per worker, as Dask's side (--no-nanny): its figures are the worker's own.
      "--no-nanny",
    ]);
    workerNodes.push(node);
    res.track(fromNode(`dist ${name}`, node));
  }
  const [aliceAddress, bobAddress] = workerNodes.map((n) => n.address);
  const aliceWorker = { address: aliceAddress, pid: workerNodes[0].child.pid };
  if ((await center.workers()).length !== 2) throw new Error("The dist scheduler does not list 2 workers");
  await sleep(plan.settleMs);
  const schedulerMemory = await memoryOf(scheduler.pid);
  const workerMemory = [await memoryOf(workerNodes[0].child.pid), await memoryOf(workerNodes[1].child.pid)];

  step(`dist: raw and rpc round trips (${plan.roundTrips} each, alternating)`);
  const alice = rpc<WorkerOps>(aliceAddress);
  res.closers.push(alice);
  await alice.update_data({ data: { tiny: 1 } });
  const echo = await res.connect(helper.ports.echo);
  const out = new Uint8Array(8);
  const back = new Uint8Array(8);
  let i = 0;
  const rpcRoundTrip = async () => {
    const t0 = performance.now();
    const reply = await alice.get_data({ keys: ["tiny"] });
    const t1 = performance.now();
    if (reply.tiny !== 1) throw new Error(`get_data tiny: expected 1, got ${JSON.stringify(reply)}`);
    return (t1 - t0) * 1000;
  };
  for (let w = 0; w < plan.roundTripWarmup; w++) {
    await rawRoundTrip(echo, out, back, i++);
    await rpcRoundTrip();
  }
  const rawRoundTripUs: number[] = [];
  const rpcRoundTripUs: number[] = [];
  const perBlock = Math.ceil(plan.roundTrips / plan.roundTripBlocks);
  for (let block = 0; block < plan.roundTripBlocks; block++) {
    for (let k = 0; k < perBlock; k++) rawRoundTripUs.push(await rawRoundTrip(echo, out, back, i++));
    for (let k = 0; k < perBlock; k++) rpcRoundTripUs.push(await rpcRoundTrip());
  }
  await alice.delete_data({ keys: ["tiny"] });

  step(`dist: raw bulk, ${plan.bulkBytes / MiB} MiB x ${plan.bulkRuns}, reused and fresh memory`);
  const data = randomU8(plan.bulkBytes);
  const sink = await res.connect(helper.ports.sink);
  const smallSink = await res.connect(smallHelper.ports.sink);
  await rawBulk(sink, data, false); // warm-up: the kernel's socket buffers
  await rawBulk(sink, data, false);
  await rawBulk(sink, data, true);
  const rawBulkMBps: number[] = [];
  const rawBulkFreshMBps: number[] = [];
  const rawBulkFreshSmallMBps: number[] = [];
  const rawBulkFreshFaults: number[] = [];
  for (let run = 0; run < plan.bulkRuns; run++) {
    rawBulkMBps.push(await rawBulk(sink, data, false));
    const faults0 = await minorFaults(helper.proc.pid);
    rawBulkFreshMBps.push(await rawBulk(sink, data, true));
    const faults1 = await minorFaults(helper.proc.pid);
    if (faults0 !== null && faults1 !== null) rawBulkFreshFaults.push(faults1 - faults0);
  }
  // The 4 KiB-page sink after the huge-page rounds, which run back to back as Python's do.
  await rawBulk(smallSink, data, true);
  for (let run = 0; run < Math.min(3, plan.bulkRuns); run++) {
    rawBulkFreshSmallMBps.push(await rawBulk(smallSink, data, true));
  }
  await res.stop(helper.proc);
  await res.stop(smallHelper.proc);

  const client = await Client.connect(schedulerNode.address);
  res.closers.push(client);
  step(`dist: map(inc, ${plan.mapTasks}) + gather`);
  const mapWarmupTasksPerS: number[] = [];
  const mapTasksPerS = await rounds(
    plan,
    (r) => mapRate(client, plan.mapTasks, r),
    plan.roundBudgetS,
    mapWarmupTasksPerS,
  );
  step(`dist: tree reduction of ${plan.treeLeaves} leaves`);
  const treeTasksPerS = await rounds(
    plan,
    (r) => treeRate(client, plan.treeLeaves, r),
  );
  step(`dist: chain of ${plan.chain}`);
  const chainMsPerTask = await rounds(plan, (r) => chainMs(client, plan.chain, r));
  step(`dist: seed exchange (${plan.seeds} per round)`);
  const seedMsRounds = await rounds(
    plan,
    (r) => seedMs(client, [aliceAddress, bobAddress], plan.seeds, r),
  );

  step(`dist: ${plan.transferBytes / MiB} MiB random Float64Array: scatter, gather, worker to worker`);
  const transfer_f64 = await transfers(client, center, plan, randomF64, aliceWorker, bobAddress);
  step(`dist: ${plan.transferBytes / MiB} MiB random Uint8Array: scatter, gather, worker to worker`);
  const transfer_bytes = await transfers(client, center, plan, randomU8, aliceWorker, bobAddress);
  step(`dist: ${plan.transferBytes / MiB} MiB arange Float64Array: scatter, gather, worker to worker`);
  const transfer_f64_arange = await transfers(client, center, plan, arangeF64, aliceWorker, bobAddress);

  return {
    versions: { deno: Deno.version.deno, v8: Deno.version.v8 },
    rawRoundTripUs,
    rpcRoundTripUs,
    rawBulkMBps,
    rawBulkFreshMBps,
    rawBulkFreshFaults,
    rawBulkFreshSmallMBps,
    mapWarmupTasksPerS,
    mapTasksPerS,
    treeTasksPerS,
    chainMsPerTask,
    seedMs: seedMsRounds,
    transfer_f64,
    transfer_bytes,
    transfer_f64_arange,
    registrationS,
    schedulerMemory,
    workerMemory,
  };
}

/**
 * A python3 that can import distributed and numpy: $DIST_COMPARE_PYTHON if set (only
 * that one), else /usr/bin/python3 (Debian's, where apt installs Dask), python3, python.
 */
async function findPython(): Promise<{ python: string; versions: string } | { missing: string[] }> {
  const tried: string[] = [];
  const chosen = Deno.env.get("DIST_COMPARE_PYTHON");
  for (const python of chosen ? [chosen] : ["/usr/bin/python3", "python3", "python"]) {
    try {
      const out = await new Deno.Command(python, {
        args: [
          "-c",
          "import distributed, numpy, sys; print(distributed.__version__, numpy.__version__, sys.version.split()[0])",
        ],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).output();
      if (out.success) return { python, versions: new TextDecoder().decode(out.stdout).trim() };
      const why = new TextDecoder().decode(out.stderr).trim().split("\n").at(-1);
      tried.push(`${python}: ${why}`);
    } catch (error) {
      tried.push(`${python}: ${(error as Error).message.split("\n")[0]}`);
    }
  }
  return { missing: tried };
}

/** Runs dask_bench.py in `mode`; stderr lines go to `step`; resolves with its JSON. */
async function runScript(
  res: Resources,
  python: string,
  env: Record<string, string>,
  args: string[],
  step: Step,
  timeoutMs: number,
): Promise<unknown> {
  const script = spawn(`dask_bench.py ${args[0]}`, python, [DASK_SCRIPT.pathname, ...args], {
    env,
    onStderr: (line) => {
      if (/^dask[: ]/.test(line)) step(line);
    },
  });
  res.track(script);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const status = await Promise.race([
    script.status,
    new Promise<"timeout">((resolve) => timer = setTimeout(() => resolve("timeout"), timeoutMs)),
  ]);
  clearTimeout(timer);
  await res.stop(script);
  if (status === "timeout" || !status.success) {
    throw new Error(
      `dask_bench.py ${args[0]} ${status === "timeout" ? "timed out" : `exited with ${status.code}`}:\n` +
        script.log.slice(-40).join("\n"),
    );
  }
  const last = script.stdout.filter((l) => l.startsWith("{")).at(-1);
  if (last === undefined) throw new Error(`dask_bench.py ${args[0]} printed no JSON`);
  return JSON.parse(last);
}

async function runDask(plan: Plan, res: Resources, step: Step, python: string): Promise<Side> {
  const tmp = await Deno.makeTempDir({ prefix: "dist-compare-dask-" });
  res.tempDirs.push(tmp);
  const env = { PYTHONDONTWRITEBYTECODE: "1" };
  step("dask: starting the raw TCP helper and a scheduler");
  const helper = res.track(
    spawn("raw TCP helper (Python)", python, [DASK_SCRIPT.pathname, "raw-server"], { env }),
  );
  const helperPortsPromise = helperPorts(helper);
  const scheduler = res.track(spawn("dask scheduler", python, [
    "-m",
    "distributed.cli.dask_scheduler",
    "--host",
    "127.0.0.1",
    "--port",
    "0",
    "--no-dashboard",
    "--dashboard-address",
    "127.0.0.1:0",
  ], { env }));
  const schedulerAddress = (await scheduler.waitFor(/Scheduler at:\s+(tcp:\/\/\S+)/, START_TIMEOUT_MS))[1];
  const ports = await helperPortsPromise;
  // dask-worker's own defaults otherwise; no nanny: one process per worker, as dist's.
  const workerArgv = [
    python,
    "-m",
    "distributed.cli.dask_worker",
    "--nworkers",
    "1",
    "--nthreads",
    "1",
    "--no-nanny",
    "--no-dashboard",
    "--dashboard-address",
    "127.0.0.1:0",
    "--host",
    "127.0.0.1",
    "--local-directory",
    tmp,
  ];

  step(`dask: worker registration x ${plan.registrationSamples}`);
  const startup = await runScript(
    res,
    python,
    env,
    [
      "startup",
      "--scheduler",
      schedulerAddress,
      "--samples",
      String(plan.registrationSamples),
      "--worker-argv",
      JSON.stringify(workerArgv),
    ],
    step,
    START_TIMEOUT_MS * (plan.registrationSamples + 1),
  ) as { seconds: number[] };

  step("dask: starting alice and bob");
  const workers: Spawned[] = [];
  for (const name of ["alice", "bob"]) {
    const w = res.track(
      spawn(`dask ${name}`, workerArgv[0], [...workerArgv.slice(1), "--name", name, schedulerAddress], {
        env,
      }),
    );
    workers.push(w);
  }
  const addresses: string[] = [];
  for (const w of workers) {
    addresses.push((await w.waitFor(/Start worker at:\s+(tcp:\/\/\S+)/, START_TIMEOUT_MS))[1]);
    await w.waitFor(/Registered to:/, START_TIMEOUT_MS);
  }
  await sleep(plan.settleMs);
  const schedulerMemory = await memoryOf(scheduler.pid);
  const workerMemory = [await memoryOf(workers[0].pid), await memoryOf(workers[1].pid)];

  const side = await runScript(
    res,
    python,
    env,
    [
      "bench",
      "--scheduler",
      schedulerAddress,
      "--alice",
      addresses[0],
      "--alice-pid",
      String(workers[0].pid),
      "--bob",
      addresses[1],
      "--echo",
      String(ports.echo),
      "--sink",
      String(ports.sink),
      "--plan",
      JSON.stringify(plan),
    ],
    step,
    DASK_BENCH_TIMEOUT_MS,
  ) as Side;
  return { ...side, registrationS: startup.seconds, schedulerMemory, workerMemory };
}

// ---- warming the memory ----

/** Touches `bytes` of fresh memory a page at a time in a process of its own; prints µs per page. */
const TOUCH_SOURCE = `
const total = Number(Deno.args[0]), chunk = 256 * 2 ** 20, held = [];
let pages = 0;
const t0 = performance.now();
for (let done = 0; done < total; done += chunk) {
  const a = new Uint8Array(chunk);
  for (let i = 0; i < chunk; i += 4096) a[i] = 1;
  held.push(a);
  pages += chunk / 4096;
}
console.log(((performance.now() - t0) * 1000 / pages).toFixed(2));
`;

/**
 * Warms the machine's memory before anything is measured: on a VM the first touch of a
 * guest page costs the host's work (measured here: 8.5-11 us a page on a first pass), and
 * both sides would pay it unevenly. Touches `bytes` in a fresh process, up to `passes`
 * times until the cost per page stops falling; resolves the cost of each pass, in us.
 */
async function warmMemory(bytes: number, passes: number): Promise<number[]> {
  const costs: number[] = [];
  for (let pass = 0; pass < passes; pass++) {
    const out = await output(Deno.execPath(), ["eval", TOUCH_SOURCE, String(bytes)]);
    const us = Number(out?.trim());
    if (!Number.isFinite(us)) break;
    costs.push(us);
    if (pass > 0 && us > 0.8 * costs[pass - 1]) break;
  }
  return costs;
}

// ---- bigger than memory: the same job and limits on both sides ----

/** The bigger-than-memory job: workers, their limit, and the chunks made and summed on them. */
interface BiggerPlan {
  memoryLimit: string;
  chunks: number;
  chunkBytes: number;
  timeoutS: number;
}

/** Two workers of 512 MiB each hold 4 GiB of chunks at once (issue 13's job). */
const BIGGER_FULL: BiggerPlan = { memoryLimit: "512MiB", chunks: 128, chunkBytes: 32 * MiB, timeoutS: 300 };
const BIGGER_QUICK: BiggerPlan = { memoryLimit: "256MiB", chunks: 24, chunkBytes: 32 * MiB, timeoutS: 120 };

/** How one side did: finished (and exactly), in how long, with how many restarts, at what peak. */
interface BiggerResult {
  finished: boolean;
  seconds: number;
  error: string | null;
  /** Worker processes started again by their nannies. */
  restarts: number;
  /** Per worker, the most its worker process (under its nanny) held, sampled every 100 ms. */
  peakRss: number[];
  /** Per worker, its nanny's own RSS before the job. */
  nannyRss: number[];
}

/** The exact total: chunk i holds (i + j) % 7 at j. */
function biggerExpected(bp: BiggerPlan): number {
  const n = bp.chunkBytes / 8;
  let total = 0;
  for (let i = 0; i < bp.chunks; i++) {
    for (let r = 0; r < 7; r++) total += ((i + r) % 7) * Math.ceil((n - r) / 7);
  }
  return total;
}

/**
 * Samples, every 100 ms, the RSS of the largest child of each of `pids` (a nanny's
 * worker process; Dask's nanny has a resource tracker besides) and keeps each one's peak.
 */
function samplePeaks(pids: number[]): { stop(): Promise<number[]> } {
  const peaks = pids.map(() => 0);
  let running = true;
  const loop = (async () => {
    while (running) {
      await Promise.all(pids.map(async (pid, i) => {
        const children = (await output("sh", ["-c", `cat /proc/${pid}/task/*/children`]) ?? "").split(/\s+/)
          .filter((p) => /^\d+$/.test(p));
        for (const child of children) {
          const status = await output("cat", [`/proc/${child}/status`]) ?? "";
          const kb = Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1] ?? 0);
          peaks[i] = Math.max(peaks[i], kb * 1024);
        }
      }));
      await sleep(100);
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return peaks;
    },
  };
}

async function biggerDist(bp: BiggerPlan, res: Resources, step: Step): Promise<BiggerResult> {
  const tmp = await Deno.makeTempDir({ prefix: "dist-compare-bigger-" });
  res.tempDirs.push(tmp);
  step(
    `dist: bigger than memory: 2 workers of ${bp.memoryLimit}, ${bp.chunks} chunks of ${mib(bp.chunkBytes)}`,
  );
  const scheduler = await spawnNode(["scheduler", "--port", "0", "--no-dashboard", "--log-level", "warn"]);
  res.track(fromNode("dist scheduler (bigger)", scheduler));
  let restarts = 0;
  const workers: NodeProcess[] = [];
  for (const name of ["a", "b"]) {
    // Each under its nanny, as `dist worker` runs by default (Dask's side too).
    const node = await spawnNode([
      ...["worker", scheduler.address, "--name", name, "--nthreads", "1"],
      ...["--memory-limit", bp.memoryLimit, "--local-directory", tmp, "--log-level", "warn"],
    ], { onLog: (line) => /starting a new one/.test(line) && restarts++ });
    workers.push(node);
    res.track(fromNode(`dist worker ${name} (bigger)`, node));
  }
  const nannyRss = await Promise.all(workers.map(async (w) => (await memoryOf(w.child.pid)).rss));
  const sampler = samplePeaks(workers.map((w) => w.child.pid));
  const client = await Client.connect(scheduler.address);
  res.closers.push(client);
  const started = performance.now();
  const n = bp.chunkBytes / 8;
  const chunks = client.map(
    (i: number, n: number) => {
      const a = new Float64Array(n);
      for (let j = 0; j < n; j++) a[j] = (i + j) % 7;
      return a;
    },
    Array.from({ length: bp.chunks }, (_, i) => i),
    Array(bp.chunks).fill(n),
  );
  const sums = client.map((a: Float64Array) => {
    let s = 0;
    for (let j = 0; j < a.length; j++) s += a[j];
    return s;
  }, chunks);
  const total = client.submit((xs: number[]) => xs.reduce((s, x) => s + x, 0), sums);
  let error: string | null = null;
  let result: number | undefined;
  try {
    result = await withTimeout(total.result(), bp.timeoutS * 1000);
    if (result === undefined) error = `not finished after ${bp.timeoutS} s`;
  } catch (e) {
    error = `${(e as Error).name}: ${(e as Error).message}`.slice(0, 300);
  }
  const seconds = (performance.now() - started) / 1000;
  const peakRss = await sampler.stop();
  if (error === null && result !== biggerExpected(bp)) {
    error = `wrong total ${result}, expected ${biggerExpected(bp)}`;
  }
  return { finished: error === null, seconds, error, restarts, peakRss, nannyRss };
}

async function biggerDask(bp: BiggerPlan, res: Resources, step: Step, python: string): Promise<BiggerResult> {
  const tmp = await Deno.makeTempDir({ prefix: "dist-compare-bigger-dask-" });
  res.tempDirs.push(tmp);
  const env = { PYTHONDONTWRITEBYTECODE: "1" };
  step(
    `dask: bigger than memory: 2 workers of ${bp.memoryLimit}, ${bp.chunks} chunks of ${mib(bp.chunkBytes)}`,
  );
  const scheduler = res.track(spawn("dask scheduler (bigger)", python, [
    ...["-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"],
    ...["--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
  ], { env }));
  const address = (await scheduler.waitFor(/Scheduler at:\s+(tcp:\/\/\S+)/, START_TIMEOUT_MS))[1];
  let restarts = 0;
  const workers: Spawned[] = [];
  for (const name of ["a", "b"]) {
    // dask worker's defaults (a nanny, spilling at its fractions) with the same limit.
    const w = res.track(spawn(`dask worker ${name} (bigger)`, python, [
      ...["-m", "distributed.cli.dask_worker", "--nthreads", "1", "--memory-limit", bp.memoryLimit],
      ...["--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--host", "127.0.0.1"],
      ...["--local-directory", tmp, "--name", name, address],
    ], { env, onStderr: (line) => /memory budget|Restarting worker/.test(line) && restarts++ }));
    workers.push(w);
    await w.waitFor(/Registered to:/, START_TIMEOUT_MS);
  }
  const nannyRss = await Promise.all(workers.map(async (w) => (await memoryOf(w.pid)).rss));
  const sampler = samplePeaks(workers.map((w) => w.pid));
  const out = await runScript(
    res,
    python,
    env,
    [
      ...["bigger", "--scheduler", address, "--chunks", String(bp.chunks)],
      ...["--chunk-bytes", String(bp.chunkBytes), "--timeout", String(bp.timeoutS)],
    ],
    step,
    (bp.timeoutS + 60) * 1000,
  ) as { seconds: number; result: number | null; error: string | null };
  const peakRss = await sampler.stop();
  let error = out.error;
  if (error === null && out.result !== biggerExpected(bp)) {
    error = `wrong total ${out.result}, expected ${biggerExpected(bp)}`;
  }
  return { finished: error === null, seconds: out.seconds, error, restarts, peakRss, nannyRss };
}

function biggerReport(bp: BiggerPlan, dist: BiggerResult | null, dask: BiggerResult | null): string {
  const cells = (r: BiggerResult | null) =>
    r === null ? ["n/a", "", "", "", ""] : [
      r.finished ? "yes, exact" : `no: ${r.error}`,
      `${fmt(r.seconds, 1)} s`,
      String(r.restarts),
      r.peakRss.map((b) => mib(b)).join(" / "),
      r.nannyRss.map((b) => mib(b)).join(" / "),
    ];
  return `bigger than memory: 2 workers x 1 thread, --memory-limit ${bp.memoryLimit} each, ${bp.chunks} ` +
    `float64 chunks of ${mib(bp.chunkBytes)} (${
      mib(bp.chunks * bp.chunkBytes)
    } in all) made on the workers, ` +
    `summed, then totalled; both sides with their nanny and default memory fractions\n\n` +
    table([
      ["side", "finished", "wall time", "restarts", "peak worker RSS", "nanny RSS (idle)"],
      ["dist", ...cells(dist)],
      ["Dask", ...cells(dask)],
    ]);
}

// ---- statistics and the table ----

function percentile(samples: readonly number[], p: number): number {
  const sorted = [...samples].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[Math.min(rank, sorted.length) - 1];
}

const fmt = (x: number, digits = 0) =>
  x.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
const times = (x: number) => `${x >= 10 ? fmt(x, 0) : fmt(x, 2)}x`;
const mib = (bytes: number) => `${fmt(bytes / MiB, 0)} MiB`;

interface Row {
  figure: string;
  dist: string;
  dask: string;
  /** How many times better dist is (higher is better for dist); null when n/a. */
  advantage: number | null;
  target: string;
}

interface Check {
  name: string;
  pass: boolean | null;
  detail: string;
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  const line = (r: string[]) => r.map((cell, c) => cell.padEnd(widths[c])).join("  ").trimEnd();
  return [line(rows[0]), widths.map((w) => "-".repeat(w)).join("  "), ...rows.slice(1).map(line)].join("\n");
}

const verdict = (pass: boolean | null) => pass === null ? "n/a" : pass ? "PASS" : "MISS";

function report(plan: Plan, dist: Side, dask: Side | null) {
  const rows: Row[] = [];
  const checks: Check[] = [];
  const check = (name: string, pass: boolean | null, detail: string) => {
    checks.push({ name, pass, detail });
    return `${name}: ${verdict(pass)}`;
  };
  const lat = (xs: number[] | undefined, unit: string, digits: number) =>
    xs ? `${fmt(median(xs), digits)} / ${fmt(percentile(xs, 99), digits)} ${unit}` : "n/a";
  const rate = (xs: number[] | undefined, unit: string, digits = 0) =>
    xs && xs.length ? `${fmt(median(xs), digits)} ${unit}` : "n/a";
  /** dist's advantage: lower-is-better figures divide Dask by dist, higher-is-better the reverse. */
  const adv = (d: number, k: number | null | undefined, lowerIsBetter: boolean) =>
    k === undefined || k === null ? null : lowerIsBetter ? k / d : d / k;

  const rawRtt = median(dist.rawRoundTripUs);
  const rawFresh = median(dist.rawBulkFreshMBps);
  const rawReused = median(dist.rawBulkMBps);
  /** Issue 14's bulk target: 70% of Deno's raw TCP throughput into a reused buffer (and, said, the share of fresh). */
  const rawTarget = (mbps: number, detail: string) =>
    check(
      `>= 70% raw reused (${fmt((100 * mbps) / rawReused)}%; ${fmt((100 * mbps) / rawFresh)}% of raw fresh)`,
      mbps >= 0.7 * rawReused,
      `${detail} over raw bulk into a reused buffer`,
    );
  rows.push({
    figure: "raw TCP round trip, 8 B (median / p99)",
    dist: lat(dist.rawRoundTripUs, "us", 1),
    dask: lat(dask?.rawRoundTripUs, "us", 1),
    advantage: adv(rawRtt, dask && median(dask.rawRoundTripUs), true),
    target: "the latency limit (Deno | asyncio)",
  });
  rows.push({
    figure: `raw TCP bulk ${mib(plan.bulkBytes)}, reused 1 MiB buffer`,
    dist: rate(dist.rawBulkMBps, "MB/s"),
    dask: rate(dask?.rawBulkMBps, "MB/s"),
    advantage: adv(rawReused, dask && median(dask.rawBulkMBps), false),
    target: "the throughput limit",
  });
  rows.push({
    figure: `raw TCP bulk ${mib(plan.bulkBytes)}, into fresh memory (huge pages)`,
    dist: rate(dist.rawBulkFreshMBps, "MB/s"),
    dask: rate(dask?.rawBulkFreshMBps, "MB/s"),
    advantage: adv(rawFresh, dask && median(dask.rawBulkFreshMBps), false),
    target: "the limit for a receiver that keeps it",
  });
  if (dist.rawBulkFreshFaults?.length) {
    rows.push({
      figure: "  (diagnostic) Deno's raw sink's page faults per fresh run",
      dist: `${fmt(median(dist.rawBulkFreshFaults))} faults`,
      dask: "n/a",
      advantage: null,
      target: `${fmt(plan.bulkBytes / 4096)} would be one per 4 KiB page (no huge pages)`,
    });
  }
  if (dist.rawBulkFreshSmallMBps) {
    rows.push({
      figure: "  (diagnostic) same, Deno without glibc's THP tunable",
      dist: rate(dist.rawBulkFreshSmallMBps, "MB/s"),
      dask: "n/a",
      advantage: null,
      target: "4 KiB pages: what dist's nodes avoid",
    });
  }
  const rpcMed = median(dist.rpcRoundTripUs);
  const rpcP99 = percentile(dist.rpcRoundTripUs, 99);
  const rawP99 = percentile(dist.rawRoundTripUs, 99);
  const daskRpc = dask && median(dask.rpcRoundTripUs);
  rows.push({
    figure: "tiny get_data round trip (median / p99)",
    dist: lat(dist.rpcRoundTripUs, "us", 1),
    dask: lat(dask?.rpcRoundTripUs, "us", 1),
    advantage: adv(rpcMed, daskRpc, true),
    target: [
      check("<= 1/10 Dask", daskRpc ? rpcMed * 10 <= daskRpc : null, "tiny round trip, medians"),
      check(
        `median <= 1.25x raw (${times(rpcMed / rawRtt)})`,
        rpcMed <= 1.25 * rawRtt,
        "tiny round trip median over dist's raw median",
      ),
      check(
        `p99 <= 2x raw p99 (${times(rpcP99 / rawP99)})`,
        rpcP99 <= 2 * rawP99,
        "tiny round trip p99 over dist's raw p99",
      ),
    ].join("; "),
  });
  const taskRow = (
    figure: string,
    d: number[],
    k: number[] | undefined,
    unit: string,
    lower: boolean,
    atLeast?: number,
  ) => {
    const dm = median(d);
    const km = k && median(k);
    const a = adv(dm, km, lower);
    const targets = [check(">= 5x Dask", a === null ? null : a >= 5, figure)];
    if (atLeast !== undefined) targets.push(check(`>= ${fmt(atLeast)} ${unit}`, dm >= atLeast, figure));
    rows.push({
      figure,
      dist: rate(d, unit, lower ? 3 : 0),
      dask: rate(k, unit, lower ? 3 : 0),
      advantage: a,
      target: targets.join("; "),
    });
  };
  // The issue's target for the 10,000-task map on this layout; the quick plan's 1,000 are
  // too few for it.
  taskRow(
    `${fmt(plan.mapTasks)} independent tasks`,
    dist.mapTasksPerS,
    dask?.mapTasksPerS,
    "tasks/s",
    false,
    plan.mode === "full" ? MAP_TASKS_PER_S_TARGET : undefined,
  );
  taskRow(
    `tree reduction, ${fmt(plan.treeLeaves)} leaves (${fmt(2 * plan.treeLeaves - 1)} tasks)`,
    dist.treeTasksPerS,
    dask?.treeTasksPerS,
    "tasks/s",
    false,
  );
  taskRow(`chain of ${fmt(plan.chain)} tasks`, dist.chainMsPerTask, dask?.chainMsPerTask, "ms/task", true);
  rows.push({
    figure: "seed exchange via the client (median)",
    dist: rate(dist.seedMs, "ms", 2),
    dask: rate(dask?.seedMs, "ms", 2),
    advantage: adv(median(dist.seedMs), dask && median(dask.seedMs), true),
    target: "",
  });
  const kinds = [
    ["transfer_f64", "random Float64Array/float64", true],
    ["transfer_bytes", "random bytes", true],
    ["transfer_f64_arange", "arange Float64Array/float64, compressible (Dask: lz4)", false],
  ] as const;
  for (const [kind, label, headline] of kinds) {
    const d = dist[kind];
    const k = dask?.[kind];
    if (d === undefined) continue;
    const w2w = median(d.w2w);
    const kw = k && median(k.w2w);
    rows.push({
      figure: `${mib(plan.transferBytes)} ${label}, worker -> worker`,
      dist: rate(d.w2w, "MB/s"),
      dask: rate(k?.w2w, "MB/s"),
      advantage: adv(w2w, kw, false),
      // The targets hold for data as it usually is; compressible data is a row to compare, not a target.
      target: headline
        ? [
          check(">= Dask", kw ? w2w >= kw : null, `${label} worker to worker`),
          rawTarget(w2w, `${label} worker to worker`),
        ].join("; ")
        : "",
    });
    const faults = (xs: number[] | undefined) => xs && xs.length ? median(xs) : null;
    const df = faults(d.w2wFaults);
    const kf = faults(k?.w2wFaults);
    rows.push({
      figure: "  (diagnostic) receiver's page faults per run",
      dist: df === null ? "n/a" : `${fmt(df)} faults`,
      dask: kf === null ? "n/a" : `${fmt(kf)} faults`,
      advantage: null,
      target: df === null ? "" : `${fmt(plan.transferBytes / 4096)} would be one per 4 KiB page`,
    });
    for (const what of ["scatter", "gather"] as const) {
      rows.push({
        figure: `${mib(plan.transferBytes)} ${label}, ${
          what === "scatter" ? "scatter to" : "gather from"
        } a worker`,
        dist: rate(d[what], "MB/s"),
        dask: rate(k?.[what], "MB/s"),
        advantage: adv(median(d[what]), k && median(k[what]), false),
        target: headline
          ? [
            check(">= Dask", k ? median(d[what]) >= median(k[what]) : null, `${label} ${what}`),
            rawTarget(median(d[what]), `${label} ${what}`),
          ].join("; ")
          : "",
      });
    }
  }
  const memory = (m: Memory | undefined) =>
    m === undefined
      ? "n/a"
      : `${mib(m.rss)}${
        m.anon === null || m.file === null ? "" : ` (${mib(m.anon)} anon + ${mib(m.file)} file)`
      }`;
  const middle = (ms: Memory[]) => [...ms].sort((a, b) => a.rss - b.rss)[(ms.length - 1) >> 1];
  rows.push({
    figure: "idle RSS, scheduler process",
    dist: memory(dist.schedulerMemory),
    dask: memory(dask?.schedulerMemory),
    advantage: adv(dist.schedulerMemory.rss, dask?.schedulerMemory.rss, true),
    target: "",
  });
  const wMem = middle(dist.workerMemory);
  const kMem = dask ? middle(dask.workerMemory) : undefined;
  rows.push({
    figure: "idle RSS, worker process",
    dist: memory(wMem),
    dask: memory(kMem),
    advantage: adv(wMem.rss, kMem?.rss, true),
    target: check("<= 1/2 Dask", kMem ? wMem.rss * 2 <= kMem.rss : null, "idle worker RSS"),
  });
  if (wMem.anon !== null) {
    rows.push({
      figure: "  (diagnostic) idle worker, private (anon) only",
      dist: mib(wMem.anon),
      dask: kMem?.anon == null ? "n/a" : mib(kMem.anon),
      advantage: adv(wMem.anon, kMem?.anon, true),
      target: "file pages: the runtime's code, shared",
    });
  }
  const reg = median(dist.registrationS);
  const kReg = dask && median(dask.registrationS);
  rows.push({
    figure: "worker process start -> registered (median)",
    dist: `${fmt(reg, 3)} s`,
    dask: kReg ? `${fmt(kReg, 3)} s` : "n/a",
    advantage: adv(reg, kReg, true),
    target: check("<= 1/5 Dask", kReg ? reg * 5 <= kReg : null, "worker registration"),
  });
  const printed = table([
    ["figure", "dist", "Dask", "dist better by", "target"],
    ...rows.map((r) => [r.figure, r.dist, r.dask, r.advantage === null ? "" : times(r.advantage), r.target]),
  ]);
  return { rows, checks, printed };
}

function runsLine(name: string, side: Side | null): string {
  if (side === null) return `${name}: n/a`;
  const r = (xs: number[], d = 0) => xs.map((x) => fmt(x, d)).join(" / ");
  const w = side.mapWarmupTasksPerS;
  return `${name}: map ${r(side.mapTasksPerS)} tasks/s after ${w.length} warm-up rounds (first ${
    fmt(w[0])
  }, last ${fmt(w[w.length - 1])}); tree ${r(side.treeTasksPerS)} tasks/s; chain ${
    r(side.chainMsPerTask, 3)
  } ms/task; seed ${r(side.seedMs, 2)} ms; w2w f64 ${r(side.transfer_f64.w2w)}, bytes ${
    r(side.transfer_bytes.w2w)
  } MB/s; raw bulk ${r(side.rawBulkMBps)}, fresh ${r(side.rawBulkFreshMBps)} MB/s; registration ${
    r(side.registrationS, 3)
  } s; worker RSS ${side.workerMemory.map((m) => mib(m.rss)).join(" / ")}`;
}

// ---- main ----

/** What failed, with the last lines each child process printed. */
function reportFailure(side: string, error: unknown, res: Resources): void {
  console.error(`${side}'s side failed: ${(error as Error).stack ?? error}`);
  for (const p of res.procs) {
    if (p.log.length) console.error(`--- ${p.name} log:\n${p.log.slice(-30).join("\n")}`);
  }
}

async function main(): Promise<number> {
  const usage = "Usage: deno task bench:compare [--quick] [--bigger-only] [--json PATH]";
  const values = benchArgs(usage, {
    quick: { type: "boolean" },
    json: { type: "string" },
    "bigger-only": { type: "boolean" },
  });
  if (typeof values === "number") return values;
  const plan = values.quick ? QUICK : FULL;
  const started = performance.now();
  const step: Step = (what) =>
    console.error(`  [${((performance.now() - started) / 1000).toFixed(1).padStart(5)} s] ${what}`);
  const loadBefore = Deno.loadavg();
  console.log(
    `dist vs Dask distributed (${plan.mode}): a scheduler and 2 worker processes x 1 thread each on ` +
      `127.0.0.1, client here; ${navigator.hardwareConcurrency} cores, ` +
      `${Math.round(Deno.systemMemoryInfo().total / 1024 ** 3)} GiB, ${Deno.build.os} ${Deno.osRelease()}; ` +
      `load average at start ${loadBefore.map((x) => x.toFixed(2)).join(" ")}`,
  );

  const found = await findPython();
  let python: string | null = null;
  if ("missing" in found) {
    console.log(
      `Dask distributed not found (${found.missing.join("; ")}).\n` +
        `Install it with: ${INSTALL_HINT}\nDask's column is n/a.`,
    );
  } else {
    python = found.python;
    const [distributed, numpy, py] = found.versions.split(" ");
    console.log(`Dask: ${python} (distributed ${distributed}, numpy ${numpy}, Python ${py})`);
  }

  const res = new Resources();
  let aborted: string | null = null;
  const abort = (why: string) => {
    if (aborted) return;
    aborted = why;
    console.error(`${why}: stopping every process`);
    res.closeAll();
  };
  const watchdog = setTimeout(
    () => abort(`Watchdog: the run took over ${WATCHDOG_MS / 1000} s`),
    WATCHDOG_MS,
  );
  const onSignal = () => {
    abort("Interrupted");
    // If the measuring code does not notice, still leave once everything is stopped.
    const t = setTimeout(() => res.closeAll().finally(() => Deno.exit(130)), KILL_AFTER_MS);
    Deno.unrefTimer(t);
  };
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM", "SIGHUP"];
  for (const s of signals) Deno.addSignalListener(s, onSignal);

  // The memory both sides will use, touched first: the first touch of a page on a VM
  // costs far more than any later one.
  const warmBytes = values.quick ? GiB : 4 * GiB;
  step(`warming ${warmBytes / GiB} GiB of memory (each page touched, in a process of its own)`);
  const touchUs = await warmMemory(warmBytes, 3);
  console.log(
    `memory: a fresh page's first touch cost ${touchUs.map((us) => `${fmt(us, 2)} us`).join(", then ")} ` +
      `(${warmBytes / GiB} GiB a pass); the figures below are measured after that`,
  );
  let dist: Side | null = null;
  let dask: Side | null = null;
  const biggerPlan = values.quick ? BIGGER_QUICK : BIGGER_FULL;
  let biggerOfDist: BiggerResult | null = null;
  let biggerOfDask: BiggerResult | null = null;
  let failed = false;
  const bigger = values["bigger-only"] === true;
  /** Runs one side's part, alone on the machine; a failure is reported and ends the run. */
  const phase = async <T>(label: string, run: () => Promise<T>): Promise<T | null> => {
    try {
      return await run();
    } catch (error) {
      failed = true;
      if (!aborted) reportFailure(label, error, res);
      return null;
    } finally {
      await res.closeAll();
    }
  };
  try {
    if (!bigger) dist = await phase("dist", () => runDist(plan, res, step));
    if (python !== null && !aborted && !failed && !bigger) {
      dask = await phase("Dask", () => runDask(plan, res, step, python));
    }
    // The bigger-than-memory job, each side alone on the machine.
    if (!aborted && !failed) {
      biggerOfDist = await phase("dist (bigger than memory)", () => biggerDist(biggerPlan, res, step));
    }
    if (python !== null && !aborted && !failed) {
      biggerOfDask = await phase(
        "Dask (bigger than memory)",
        () => biggerDask(biggerPlan, res, step, python),
      );
    }
  } finally {
    clearTimeout(watchdog);
    await res.closeAll();
    for (const s of signals) Deno.removeSignalListener(s, onSignal);
  }
  if (bigger && !aborted && biggerOfDist !== null) {
    console.log(`\n${biggerReport(biggerPlan, biggerOfDist, biggerOfDask)}`);
    const loadAfter = Deno.loadavg();
    console.log(
      `\nload average at end ${loadAfter.map((x) => x.toFixed(2)).join(" ")}; whole run ${
        ((performance.now() - started) / 1000).toFixed(1)
      } s`,
    );
    return failed ? 1 : 0;
  }
  if (aborted || dist === null) {
    console.error(aborted ?? "No figures: dist's side failed");
    return aborted === "Interrupted" ? 130 : 1;
  }
  const elapsedS = (performance.now() - started) / 1000;
  const loadAfter = Deno.loadavg();
  const { checks, printed, rows } = report(plan, dist, dask);
  console.log(
    `\nmedians over rounds (round trips: median / p99 of ${plan.roundTrips} sequential calls); ` +
      `MB/s with 1 MB = 1e6 B; "dist better by": Dask / dist for times and memory, dist / Dask for rates\n`,
  );
  console.log(printed);
  console.log(`\nruns, in order:\n  ${runsLine("dist", dist)}\n  ${runsLine("Dask", dask)}`);
  if (biggerOfDist !== null) console.log(`\n${biggerReport(biggerPlan, biggerOfDist, biggerOfDask)}`);
  if (python === null) {
    console.log(`\nDask's column is n/a: Dask distributed is not installed (${INSTALL_HINT}).`);
  }
  const passed = checks.filter((c) => c.pass === true).length;
  const missed = checks.filter((c) => c.pass === false).map((c) => c.detail);
  console.log(
    `\ntargets: ${passed} PASS, ${missed.length} MISS, ${checks.filter((c) => c.pass === null).length} n/a` +
      (missed.length ? `; missed: ${missed.join(", ")}` : ""),
  );
  console.log(
    "\nNotes:\n" +
      "  - Data is random (incompressible) unless a row says otherwise: the arange rows send 0, 1, 2, ...,\n" +
      "    which Dask lz4-compresses by default (distributed.comm.compression: auto) and dist sends as is.\n" +
      "  - Memory was warmed first (see the line at the top): on this VM a page's first touch is slow once.\n" +
      "  - Each side's raw limits are its own runtime's (Deno conn.read/write; Python asyncio sock_recv_into),\n" +
      '    measured in the same run. The "raw" targets use dist\'s (Deno) limits.\n' +
      "  - A receiver that keeps what it received reads into memory it has not used: the client of a\n" +
      '    gather into fresh memory ("raw bulk into fresh memory" is its limit), a worker into buffers its\n' +
      "    frame pool kept from earlier transfers (the reused buffer is its limit). Fresh memory gets\n" +
      "    transparent huge pages on both sides: Python's raw sink receives into numpy.empty, as Dask's TCP\n" +
      "    comm does, and numpy asks for them (madvise); V8's ArrayBuffers do not by themselves, so dist's\n" +
      "    nodes set glibc's tunable (GLIBC_TUNABLES=glibc.malloc.hugetlb=1), the task sets it for this\n" +
      "    process (the client of both sides) and every process inherits it. The diagnostic row is Deno's\n" +
      "    sink without it: one 4 KiB page fault after another. Receivers let go of what they received at\n" +
      "    once (dist's workers ask V8 to; this process and the raw sinks collect, as Python frees by\n" +
      "    reference count). The page fault rows count the faults the receiving worker (Alice) took during\n" +
      "    each worker-to-worker run.\n" +
      "  - Dask: dask_worker --no-nanny --nthreads 1, no dashboard; its client is asynchronous, scatter and\n" +
      "    gather go direct to workers; its get_data round trip is distributed.comm connect + send_recv\n" +
      '    (what get_data_from_worker does), the clock stopping before the "OK" acknowledgement.\n' +
      "  - dist ran first, then Dask; other load on the machine shows in the load averages.",
  );
  console.log(
    `\nload average at end ${loadAfter.map((x) => x.toFixed(2)).join(" ")}; whole run ${
      elapsedS.toFixed(1)
    } s` +
      (plan.mode === "quick" ? " (--quick: a smoke test, not a measurement)" : ""),
  );
  if (values.json !== undefined) {
    const out = {
      mode: plan.mode,
      date: new Date().toISOString(),
      plan,
      machine: {
        cores: navigator.hardwareConcurrency,
        memoryBytes: Deno.systemMemoryInfo().total,
        os: `${Deno.build.os} ${Deno.osRelease()}`,
        loadavgStart: loadBefore,
        loadavgEnd: loadAfter,
      },
      python,
      units: {
        latency: "us",
        throughput: "MB/s (1e6 B/s)",
        tasks: "tasks/s",
        chain: "ms/task",
        rss: "bytes",
      },
      memoryTouchUsPerPage: touchUs,
      dist,
      dask,
      bigger: { plan: biggerPlan, dist: biggerOfDist, dask: biggerOfDask },
      rows,
      checks,
      elapsedS,
    };
    await Deno.writeTextFile(values.json, JSON.stringify(out, null, 2) + "\n");
    console.log(`wrote ${values.json}`);
  }
  return failed ? 1 : 0;
}

Deno.exitCode = await main();
