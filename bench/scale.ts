/**
 * Flat as it grows: how the cost per task changes with the size of the graph and with
 * the number of workers. A scheduler and workers as separate processes on 127.0.0.1,
 * the client here; a fresh cluster for every row, warmed up with a small graph first.
 *
 * The graph: `map(inc, range(n))` and a sum over it, a tree of fan-in 100 (n leaves,
 * n/100 sums, ..., one root), all submitted in one turn (one update_graph, or a few: the
 * client sends a large graph in parts), each
 * level's futures released as soon as the next level is submitted; only the root's
 * value is fetched.
 *
 *   1. n = 1,000 ... 1,000,000 leaves on 2 workers x 1 thread: tasks/s; CPU time per
 *      task of the scheduler and of the client; the scheduler's memory per task (its
 *      RSS from before submission to the peak while the graph is in it) and the
 *      client's (Deno.memoryUsage(), same way).
 *      Then the same graph again on that cluster, once the first is forgotten: tasks/s
 *      and scheduler CPU of a cluster that has run one graph (its code compiled, its
 *      heaps grown), which is what a long-running cluster sees. The first graph's
 *      figures are a fresh cluster's.
 *   2. one graph on 2, 8 and 32 worker processes of 1 thread (sharing this machine's
 *      cores): the scheduler's CPU time per task, which is what a bigger cluster would
 *      see, and wall tasks/s.
 *   3. what the dashboard costs with the graphs of part 1 held: the scheduler's state
 *      and its Dashboard in this process (no network, no other work), the time to build
 *      /api/snapshot's JSON and /metrics' text, median of `DASHBOARD_REPS`. Both read
 *      counts the state keeps as tasks move, so they should not grow with the graph.
 *
 * CPU (user + system) and memory of the node processes come from /proc/PID/stat and
 * /proc/PID/status, read through `cat` (Deno reads /proc itself only with --allow-all).
 * "left" counts the tasks the scheduler still holds once every future is released: it
 * should be 0. A graph that makes no progress for `STALL_MS` (every process idle), or
 * takes longer than --timeout, is reported as failed, with the scheduler's task counts
 * and the nodes' first warnings, and the run goes on.
 *
 * Run: deno task bench:scale [--quick] [--sizes 1000,10000] [--workers 2,8]
 *      [--fixed-leaves 50000] [--timeout SECONDS]
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type NodeProcess, spawnNode } from "../client/spawn.ts";
import { Client, type Future, ref, rpc } from "../mod.ts";
import { SchedulerTasks, type TaskSpec } from "../scheduler/tasks.ts";
import { Dashboard } from "../scheduler/dashboard.ts";
import { prometheus } from "../util/http.ts";

const flags = parseArgs({
  args: Deno.args,
  options: {
    quick: { type: "boolean", default: false },
    sizes: { type: "string" },
    workers: { type: "string" },
    "fixed-leaves": { type: "string" },
    timeout: { type: "string" },
  },
}).values;

const quick = flags.quick;
/** Leaves of the graph in part 1. */
const SIZES = counts(flags.sizes) ?? (quick ? [1_000, 10_000] : [1_000, 10_000, 100_000, 1_000_000]);
/** Worker processes in part 2. */
const WORKER_COUNTS = counts(flags.workers) ?? (quick ? [2, 8] : [2, 8, 32]);
/** Leaves of the graph in part 2. */
const FIXED_LEAVES = counts(flags["fixed-leaves"])?.[0] ?? (quick ? 10_000 : 50_000);
/** Longest one graph may take before its row is reported unfinished. */
const GRAPH_TIMEOUT_MS = (counts(flags.timeout)?.[0] ?? 600) * 1000;
/** Leaves of the warm-up graph each cluster runs first (the processes' JIT). */
const WARMUP_LEAVES = 2_000;
/** Renderings of the dashboard timed per graph size in part 3. */
const DASHBOARD_REPS = 21;
/** Fan-in of the sum tree. */
const FAN_IN = 100;
/** How often the scheduler is pinged, from a process of its own. */
const PING_MS = 100;
/** How often the node processes and this one are sampled. */
const SAMPLE_MS = 100;
/** A graph is stalled when the cluster used less than `STALL_CPU_FRACTION` of a core for this long. */
const STALL_MS = 30_000;
const STALL_CPU_FRACTION = 0.05;
/** A gap between samples longer than this means this process was busy (submitting): no stall verdict across it. */
const SAMPLE_GAP_MAX_MS = 2_000;

function counts(text: string | undefined): number[] | undefined {
  if (text === undefined) return undefined;
  const out = text.split(",").map(Number);
  if (out.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new RangeError(`Expected positive whole numbers separated by commas, got ${JSON.stringify(text)}`);
  }
  return out;
}

const inc = (x: number) => x + 1;
const sum = (...xs: number[]) => {
  let s = 0;
  for (const x of xs) s += x;
  return s;
};

// ---- processes ----

/** Every node started and not yet stopped: stopped on exit, however the run ends. */
const live = new Set<NodeProcess>();

async function start(args: string[]): Promise<NodeProcess> {
  const node = await spawnNode([...args, "--log-level", "warn"]);
  live.add(node);
  return node;
}

async function stop(nodes: NodeProcess[]): Promise<void> {
  await Promise.all(nodes.map(async (n) => {
    await n.stop();
    live.delete(n);
  }));
}

let interrupted = false;
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  Deno.addSignalListener(signal, async () => {
    if (interrupted) return;
    interrupted = true;
    console.error(`\n${signal}: stopping ${live.size} node processes`);
    await stop([...live]);
    // A benchmark is an executable: with the signal handled here, nothing else ends it.
    Deno.exit(130);
  });
}

interface Cluster {
  scheduler: NodeProcess;
  workers: NodeProcess[];
}

/** A scheduler and `workers` worker processes of one thread each, started in parallel. */
async function startCluster(workers: number): Promise<Cluster> {
  const scheduler = await start(["scheduler", "--port", "0"]);
  const started = await Promise.allSettled(
    Array.from(
      { length: workers },
      (_, i) => start(["worker", scheduler.address, "--nthreads", "1", "--name", `w${i}`, "--no-nanny"]),
    ),
  );
  const ok = started.flatMap((s) => s.status === "fulfilled" ? [s.value] : []);
  const failed = started.find((s) => s.status === "rejected");
  if (failed) {
    await stop([...ok, scheduler]);
    throw (failed as PromiseRejectedResult).reason;
  }
  return { scheduler, workers: ok };
}

/** What /proc says of a process: CPU time (user + system) in seconds, RSS and peak RSS in bytes. */
interface ProcSample {
  cpuS: number;
  rssBytes: number;
  hwmBytes: number;
}

let clockTicks = 0;

async function output(cmd: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "null" }).output();
  if (!out.success) throw new Error(`${cmd} ${args.join(" ")} failed`);
  return new TextDecoder().decode(out.stdout);
}

/** Samples `pids` with one `cat` of their stat and status files. */
async function procs(pids: number[]): Promise<ProcSample[]> {
  if (clockTicks === 0) clockTicks = Number((await output("getconf", ["CLK_TCK"])).trim());
  const text = await output("cat", pids.flatMap((pid) => [`/proc/${pid}/stat`, `/proc/${pid}/status`]));
  const starts = pids.map((pid) => text.indexOf(`${pid} (`));
  return pids.map((_, i) => {
    const own = text.slice(starts[i], i + 1 < starts.length ? starts[i + 1] : undefined);
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    const fields = own.slice(own.indexOf(")") + 2).split(" ");
    const kb = (name: string) =>
      Number(new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(own)?.[1] ?? NaN) * 1024;
    return {
      cpuS: (Number(fields[11]) + Number(fields[12])) / clockTicks, // fields 14 (utime) and 15 (stime)
      rssBytes: kb("VmRSS"),
      hwmBytes: kb("VmHWM"),
    };
  });
}

/**
 * Samples the scheduler's RSS, the cluster's CPU and this process's memory until
 * stopped; keeps the peaks, and resolves `stalled` once the cluster has been idle for
 * `STALL_MS` while this process was free to look.
 */
function sampler(cluster: Cluster) {
  const pids = [cluster.scheduler, ...cluster.workers].map((n) => n.child.pid);
  const peak = { schedulerRss: 0, clientRss: 0, clientHeap: 0 };
  const client = () => {
    const m = Deno.memoryUsage();
    peak.clientRss = Math.max(peak.clientRss, m.rss);
    peak.clientHeap = Math.max(peak.clientHeap, m.heapUsed);
  };
  let resolveStalled!: (verdict: "stalled") => void;
  const stalled = new Promise<"stalled">((resolve) => resolveStalled = resolve);
  let running = true;
  const loop = (async () => {
    const history: { t: number; cpuS: number }[] = [];
    while (running) {
      client();
      try {
        const samples = await procs(pids);
        peak.schedulerRss = Math.max(peak.schedulerRss, samples[0].rssBytes);
        const now = performance.now();
        if (history.length > 0 && now - history.at(-1)!.t > SAMPLE_GAP_MAX_MS) history.length = 0;
        history.push({ t: now, cpuS: samples.reduce((s, p) => s + p.cpuS, 0) });
        while (history.length > 1 && now - history[1].t >= STALL_MS) history.shift();
        const first = history[0];
        const spanMs = now - first.t;
        if (spanMs >= STALL_MS && history.at(-1)!.cpuS - first.cpuS < STALL_CPU_FRACTION * spanMs / 1000) {
          resolveStalled("stalled");
        }
      } catch { /* a node exited */ }
      await new Promise((resolve) => setTimeout(resolve, SAMPLE_MS));
    }
  })();
  return {
    peak,
    stalled,
    /** Samples this process now (from synchronous code, where the timer cannot run). */
    client,
    async stop() {
      running = false;
      await loop;
      return peak;
    },
  };
}

/**
 * A process of its own that pings the scheduler every `PING_MS` until its stdin closes,
 * then prints the longest round trip: the longest the scheduler went deaf (a turn that
 * long also holds up heartbeats and every other client). This process cannot measure
 * it: it is busy itself while it builds a graph.
 */
async function startPinger(address: string) {
  const code = `import { rpc } from ${JSON.stringify(new URL("../mod.ts", import.meta.url).href)};
    const node = rpc(Deno.args[0]);
    let max = 0, stop = false;
    await node.call("ping", {});
    console.log("ready");
    (async () => { for await (const _ of Deno.stdin.readable); stop = true; })();
    while (!stop) {
      const t = performance.now();
      await node.call("ping", {});
      max = Math.max(max, performance.now() - t);
      await new Promise((resolve) => setTimeout(resolve, ${PING_MS}));
    }
    console.log(max);
    await node.close();`;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", code, address],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("ready\n")) {
    const { value, done } = await lines.read();
    if (done) throw new Error("The pinger did not start");
    text += value;
  }
  return {
    /** Stops it; the longest round trip in ms. */
    async stop(): Promise<number> {
      await child.stdin.close();
      text = "";
      for (;;) {
        const { value, done } = await lines.read();
        if (done) break;
        text += value;
      }
      await child.status;
      return Number(text.trim());
    },
  };
}

// ---- the graph ----

/** Submits the map and its sum tree in one turn; the root's future and the number of tasks. */
function submitGraph(client: Client, leaves: number, base: number): { root: Future<number>; tasks: number } {
  let level: Future<number>[] = client.map(inc, Array.from({ length: leaves }, (_, i) => base + i));
  let tasks = level.length;
  while (level.length > 1) {
    const next: Future<number>[] = [];
    for (let i = 0; i < level.length; i += FAN_IN) {
      next.push(client.submit(sum, ...level.slice(i, i + FAN_IN)));
    }
    for (const f of level) f.release();
    tasks += next.length;
    level = next;
  }
  return { root: level[0], tasks };
}

function expected(leaves: number, base: number): number {
  return leaves * (base + 1) + (leaves * (leaves - 1)) / 2;
}

/** Tasks the scheduler holds, by state. */
async function schedulerTasks(address: string): Promise<Record<string, number>> {
  await using scheduler = rpc(address);
  const progress = await scheduler.call("progress", {}, { timeoutMs: 60_000 }) as Record<
    string,
    Record<string, number>
  >;
  const out: Record<string, number> = {};
  for (const states of Object.values(progress)) {
    for (const [state, n] of Object.entries(states)) out[state] = (out[state] ?? 0) + n;
  }
  return out;
}

function total(counts: Record<string, number>): number {
  return Object.values(counts).reduce((a, b) => a + b, 0);
}

/** Waits until the scheduler holds no task (or `ms` passed); what it still holds. */
async function settle(address: string, ms = 30_000): Promise<Record<string, number>> {
  const deadline = Date.now() + ms;
  for (;;) {
    const counts = await schedulerTasks(address);
    if (total(counts) === 0 || Date.now() >= deadline) return counts;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** The nodes' first distinct warnings (timestamps and addresses aside), to say why a graph stopped. */
function firstWarnings(cluster: Cluster, max = 3): string[] {
  const seen = new Map<string, string>();
  const nodes = [cluster.scheduler, ...cluster.workers];
  for (const line of nodes.flatMap((n) => n.log)) {
    const text = line.replace(/^\S+Z\s+/, "");
    const shape = text.replace(/tcp:\/\/[\d.:]+/g, "ADDR").replace(/\b[\w]+-[0-9a-f]{16}\b/g, "KEY");
    if (!seen.has(shape)) seen.set(shape, text);
  }
  return [...seen.values()].slice(0, max).map((t) => t.length > 200 ? `${t.slice(0, 200)}...` : t);
}

interface Run {
  leaves: number;
  tasks: number;
  workers: number;
  /** Wall time from the first submit to the root's value. */
  wallS: number;
  /** The client's synchronous work to build and submit the graph. */
  submitS: number;
  schedulerCpuS: number;
  workersCpuS: number;
  clientCpuS: number;
  schedulerBaseRss: number;
  schedulerPeakRss: number;
  clientBaseRss: number;
  clientPeakRss: number;
  clientBaseHeap: number;
  clientPeakHeap: number;
  /** Tasks left in the scheduler after every future was released. */
  left: Record<string, number>;
  /** The longest the scheduler took to answer a ping while the graph ran, in ms. */
  deafMs: number;
  /** From the root's release until the scheduler holds no task (or gave up waiting). */
  releaseS: number;
  /** The longest ping round trip to the scheduler meanwhile. */
  releaseDeafMs: number;
  /** Warnings the nodes logged while the graph ran. */
  warnings: number;
  /** Why the graph did not finish, if it did not. */
  failure?: string;
  /** Part 1: the same graph again on the same cluster, once the first is forgotten. */
  again?: Again;
}

/** A second graph of the same size: what a cluster that has run one costs. */
interface Again {
  wallS: number;
  schedulerCpuS: number;
  clientCpuS: number;
  failure?: string;
}

let nextBase = 1e7;

/**
 * One graph of `leaves` on a fresh cluster of `workers` workers; with `again`, once it is
 * forgotten, the same graph a second time (CPU and wall time only).
 */
async function measure(leaves: number, workers: number, again = false): Promise<Run> {
  const cluster = await startCluster(workers);
  const pids = [cluster.scheduler, ...cluster.workers].map((n) => n.child.pid);
  try {
    await using client = await Client.connect(cluster.scheduler.address);
    // Warm-up: every process compiles its hot paths (and every worker gets the functions).
    const warm = submitGraph(client, WARMUP_LEAVES, nextBase);
    if (await warm.root.result() !== expected(WARMUP_LEAVES, nextBase)) throw new Error("Warm-up: wrong sum");
    warm.root.release();
    nextBase += 1e7;
    await settle(cluster.scheduler.address);

    const pinger = await startPinger(cluster.scheduler.address);
    const logged = () => [cluster.scheduler, ...cluster.workers].reduce((n, node) => n + node.log.length, 0);
    const loggedBefore = logged();
    const [before, ...workersBefore] = await procs(pids);
    const [clientBefore] = await procs([Deno.pid]);
    const clientBase = Deno.memoryUsage();
    const sampling = sampler(cluster);
    const base = nextBase;
    nextBase += 1e7;
    const t0 = performance.now();
    const { root, tasks } = submitGraph(client, leaves, base);
    const submitS = (performance.now() - t0) / 1000;
    sampling.client();
    let { failure, stuck } = await waitForRoot(root, leaves, base, sampling.stalled);
    if (stuck) {
      const held = await schedulerTasks(cluster.scheduler.address).catch((e) => (e as Error).message);
      failure = `${failure}; the scheduler holds ${JSON.stringify(held)}; first warnings: ${
        firstWarnings(cluster).join(" | ") || "none"
      }`;
    }
    const wallS = (performance.now() - t0) / 1000;
    const peak = await sampling.stop();
    const [after, ...workersAfter] = await procs(pids);
    const [clientAfter] = await procs([Deno.pid]);
    const deafMs = await pinger.stop();
    const warnings = logged() - loggedBefore;
    // Forgetting the graph is work too: how deaf is the scheduler while it does that?
    const releasePinger = await startPinger(cluster.scheduler.address);
    const releaseStarted = performance.now();
    root.release();
    // VmHWM catches a peak between samples, once it passes the warm-up's.
    const schedulerPeakRss = Math.max(
      peak.schedulerRss,
      after.hwmBytes > before.hwmBytes ? after.hwmBytes : 0,
    );
    const left = failure ? {} : await settle(cluster.scheduler.address);
    const releaseS = (performance.now() - releaseStarted) / 1000;
    const releaseDeafMs = await releasePinger.stop();
    const second = again && !failure && total(left) === 0
      ? await graphAgain(client, leaves, pids[0])
      : undefined;
    return {
      leaves,
      tasks,
      workers,
      wallS,
      submitS,
      schedulerCpuS: after.cpuS - before.cpuS,
      workersCpuS: workersAfter.reduce((s, w, i) => s + w.cpuS - workersBefore[i].cpuS, 0),
      clientCpuS: clientAfter.cpuS - clientBefore.cpuS,
      schedulerBaseRss: before.rssBytes,
      schedulerPeakRss,
      clientBaseRss: clientBase.rss,
      clientPeakRss: peak.clientRss,
      clientBaseHeap: clientBase.heapUsed,
      clientPeakHeap: peak.clientHeap,
      left,
      deafMs,
      releaseS,
      releaseDeafMs,
      warnings,
      failure,
      again: second,
    };
  } finally {
    await stop([...cluster.workers, cluster.scheduler]);
  }
}

/**
 * Waits for the root of a graph of `leaves` from `base`, at most `GRAPH_TIMEOUT_MS` (or
 * until `stalled` fires): no failure if it gave the right sum; `stuck` if it never came.
 */
async function waitForRoot(
  root: Future<number>,
  leaves: number,
  base: number,
  stalled?: Promise<"stalled">,
): Promise<{ failure?: string; stuck: boolean }> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((resolve) =>
    timer = setTimeout(() => resolve("timeout"), GRAPH_TIMEOUT_MS)
  );
  try {
    const value = await Promise.race([root.result(), timeout, ...(stalled ? [stalled] : [])]);
    if (value === "timeout") return { failure: `not done after ${GRAPH_TIMEOUT_MS / 1000} s`, stuck: true };
    if (value === "stalled") {
      return { failure: `stalled: every process idle for ${STALL_MS / 1000} s`, stuck: true };
    }
    if (value !== expected(leaves, base)) {
      return { failure: `wrong sum ${value}, expected ${expected(leaves, base)}`, stuck: false };
    }
    return { stuck: false };
  } catch (error) {
    return { failure: `${(error as Error).name}: ${(error as Error).message}`, stuck: false };
  } finally {
    clearTimeout(timer);
  }
}

/** The graph of `leaves` once more on a cluster that has run it: wall time and CPU. */
async function graphAgain(client: Client, leaves: number, schedulerPid: number): Promise<Again> {
  const [before, clientBefore] = await procs([schedulerPid, Deno.pid]);
  const base = nextBase;
  nextBase += 1e7;
  const t0 = performance.now();
  const { root } = submitGraph(client, leaves, base);
  const { failure } = await waitForRoot(root, leaves, base);
  const wallS = (performance.now() - t0) / 1000;
  const [after, clientAfter] = await procs([schedulerPid, Deno.pid]);
  root.release();
  return {
    wallS,
    schedulerCpuS: after.cpuS - before.cpuS,
    clientCpuS: clientAfter.cpuS - clientBefore.cpuS,
    failure,
  };
}

// ---- report ----

function fmt(v: number, digits = 0): string {
  if (!Number.isFinite(v)) return "-";
  return v.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

const MB = 1024 * 1024;

function perTask(bytes: number, tasks: number): string {
  return fmt(Math.max(0, bytes) / tasks);
}

function leftText(left: Record<string, number>): string {
  const n = total(left);
  if (n === 0) return "0";
  return `${fmt(n)} (${Object.entries(left).map(([s, k]) => `${s} ${fmt(k)}`).join(", ")})`;
}

function table(rows: string[][]): string {
  const full = rows.filter((r) => r.length === rows[0].length);
  const widths = rows[0].map((_, c) => Math.max(...full.map((r) => r[c].length)));
  return rows.map((r) =>
    r.length < rows[0].length
      ? r.join("  ")
      : r.map((cell, c) => c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c])).join("  ")
  ).join("\n");
}

function failedText(r: Run): string {
  return `FAILED after ${fmt(r.wallS, 1)} s (sched deaf ${fmt(r.deafMs)} ms, ${
    fmt(r.warnings)
  } warnings): ${r.failure}`;
}

/** Part 1's second graph: tasks/s and scheduler CPU us/task. */
function againText(r: Run): string {
  const a = r.again;
  if (a === undefined) return "-";
  if (a.failure) return `FAILED: ${a.failure}`;
  return `${fmt(r.tasks / a.wallS)} / ${fmt(a.schedulerCpuS * 1e6 / r.tasks, 1)}`;
}

function sizeRow(r: Run): string[] {
  if (r.failure) return [fmt(r.leaves), fmt(r.tasks), failedText(r)];
  return [
    fmt(r.leaves),
    fmt(r.tasks),
    fmt(r.wallS, 2),
    fmt(r.tasks / r.wallS),
    fmt(r.submitS * 1e6 / r.tasks, 1),
    fmt(r.schedulerCpuS * 1e6 / r.tasks, 1),
    fmt(r.clientCpuS * 1e6 / r.tasks, 1),
    againText(r),
    `${fmt(r.schedulerBaseRss / MB)} -> ${fmt(r.schedulerPeakRss / MB)}`,
    perTask(r.schedulerPeakRss - r.schedulerBaseRss, r.tasks),
    perTask(r.clientPeakHeap - r.clientBaseHeap, r.tasks),
    perTask(r.clientPeakRss - r.clientBaseRss, r.tasks),
    fmt(r.deafMs),
    `${fmt(r.releaseS, 2)} / ${fmt(r.releaseDeafMs)}`,
    fmt(r.warnings),
    leftText(r.left),
  ];
}

function workersRow(r: Run): string[] {
  if (r.failure) return [fmt(r.workers), fmt(r.tasks), failedText(r)];
  return [
    fmt(r.workers),
    fmt(r.tasks),
    fmt(r.wallS, 2),
    fmt(r.tasks / r.wallS),
    fmt(r.schedulerCpuS * 1e6 / r.tasks, 1),
    fmt(100 * r.schedulerCpuS / r.wallS),
    fmt(r.workersCpuS * 1e6 / r.tasks, 1),
    fmt(r.clientCpuS * 1e6 / r.tasks, 1),
    fmt(r.deafMs),
    fmt(r.warnings),
    leftText(r.left),
  ];
}

/** Scheduler CPU per task at 100,000 tasks (on a cluster that has run the graph once). */
const CPU_TARGET_US = 25;
/** The scheduler's memory per task at 1M tasks. */
const MEMORY_TARGET_B = 1000;

/** The targets of the sizes this run had: scheduler CPU at 100,000 leaves, memory at 1M. */
function targets(runs: Run[]): string[] {
  const out: string[] = [];
  const verdict = (ok: boolean) => ok ? "PASS" : "MISS";
  const at = (leaves: number) => runs.find((r) => r.leaves === leaves && !r.failure);
  const cpu = at(100_000);
  if (cpu?.again && !cpu.again.failure) {
    const warm = cpu.again.schedulerCpuS * 1e6 / cpu.tasks;
    out.push(
      `target: scheduler CPU per task at 100,000 leaves <= ${CPU_TARGET_US} us: ${
        fmt(warm, 1)
      } us the second ` +
        `time, ${verdict(warm <= CPU_TARGET_US)} (a fresh cluster's first graph: ` +
        `${fmt(cpu.schedulerCpuS * 1e6 / cpu.tasks, 1)} us)`,
    );
  }
  const memory = at(1_000_000);
  if (memory) {
    const b = Math.max(0, memory.schedulerPeakRss - memory.schedulerBaseRss) / memory.tasks;
    out.push(
      `target: scheduler memory per task at 1,000,000 leaves <= ${fmt(MEMORY_TARGET_B)} B: ${fmt(b)} B, ` +
        verdict(b <= MEMORY_TARGET_B),
    );
  }
  return out.length ? out : ["targets: none of this run's sizes has one (100,000 and 1,000,000 leaves do)"];
}

/** Largest over smallest of a per-task figure among the rows that finished. */
function growth(runs: Run[], f: (r: Run) => number): string {
  const ok = runs.filter((r) => !r.failure);
  return ok.length < 2 ? "-" : `${fmt(f(ok.at(-1)!) / f(ok[0]), 2)}x`;
}

/** Part 3: the state holds the graph of `leaves` (2 workers, the first tasks sent); ms to build each view. */
async function dashboardCost(
  leaves: number,
): Promise<{ tasks: number; snapshotMs: number; metricsMs: number }> {
  const state = new SchedulerTasks();
  for (const i of [1, 2]) state.addWorker({ address: `tcp://127.0.0.1:${i}`, nthreads: 1 });
  const incSpec = { source: inc.toString() };
  const sumSpec = { source: sum.toString() };
  let level: string[] = [];
  let specs: TaskSpec[] = [];
  let tasks = 0;
  const flush = (wanted: string[]) => {
    state.updateGraph("bench", specs, wanted);
    state.drain();
    specs = [];
  };
  for (let i = 0; i < leaves; i++) {
    const key = `inc-${i}`;
    level.push(key);
    specs.push({ key, run: { function: incSpec, args: [i] }, deps: [] });
    if (specs.length === 10_000) flush([]);
  }
  tasks += leaves;
  while (level.length > 1) {
    const next: string[] = [];
    for (let i = 0; i < level.length; i += FAN_IN) {
      const deps = level.slice(i, i + FAN_IN);
      const key = `sum-${tasks + next.length}`;
      specs.push({ key, run: { function: sumSpec, args: deps.map((d) => ref(d)) }, deps });
      next.push(key);
    }
    tasks += next.length;
    level = next;
  }
  flush(level);
  const dashboard = new Dashboard(
    state,
    () => ({ address: "tcp://127.0.0.1:0", id: "bench", clients: 1, started: 0 }),
  );
  try {
    const snapshots: number[] = [];
    const metrics: number[] = [];
    for (let r = 0; r < DASHBOARD_REPS; r++) {
      let t = performance.now();
      JSON.stringify(dashboard.snapshot());
      snapshots.push(performance.now() - t);
      t = performance.now();
      await prometheus(dashboard.metrics()).text();
      metrics.push(performance.now() - t);
    }
    const median = (xs: number[]) => xs.sort((a, b) => a - b)[xs.length >> 1];
    if (state.tasks.size !== tasks) {
      throw new Error(`The state holds ${state.tasks.size} tasks, expected ${tasks}`);
    }
    return { tasks, snapshotMs: median(snapshots), metricsMs: median(metrics) };
  } finally {
    dashboard.close();
  }
}

const started = performance.now();
const sizeRuns: Run[] = [];
for (const leaves of SIZES) {
  const run = await measure(leaves, 2, true);
  sizeRuns.push(run);
  console.error(`  ${fmt(leaves)} leaves: ${sizeRow(run).slice(2, 9).join("  ")}`);
}
const workerRuns: Run[] = [];
for (const workers of WORKER_COUNTS) {
  const run = await measure(FIXED_LEAVES, workers);
  workerRuns.push(run);
  console.error(`  ${workers} workers: ${workersRow(run).slice(2, 5).join("  ")}`);
}

console.log(
  `\nScaling: a scheduler and worker processes of 1 thread on 127.0.0.1, the client here; ` +
    `${navigator.hardwareConcurrency} cores; deno ${Deno.version.deno}; graph = map(inc, range(n)) + ` +
    `a sum tree of fan-in ${FAN_IN}, submitted in one turn${quick ? " (--quick: smoke test)" : ""}\n`,
);
console.log("1. Graph size, 2 workers x 1 thread\n");
console.log(table([
  [
    "leaves",
    "tasks",
    "wall s",
    "tasks/s",
    "submit us/task",
    "sched CPU us/task",
    "client CPU us/task",
    "again: tasks/s / sched CPU us/task",
    "sched RSS MB",
    "sched B/task",
    "client heap B/task",
    "client RSS B/task",
    "sched deaf ms",
    "release s / deaf ms",
    "warnings",
    "left",
  ],
  ...sizeRuns.map(sizeRow),
]));
console.log(
  `\n2. Workers, ${fmt(FIXED_LEAVES)} leaves (the workers share ${navigator.hardwareConcurrency} cores)\n`,
);
console.log(table([
  [
    "workers",
    "tasks",
    "wall s",
    "tasks/s",
    "sched CPU us/task",
    "sched CPU %",
    "workers CPU us/task",
    "client CPU us/task",
    "sched deaf ms",
    "warnings",
    "left",
  ],
  ...workerRuns.map(workersRow),
]));
const dashboardRows: string[][] = [];
for (const leaves of SIZES) {
  const d = await dashboardCost(leaves);
  dashboardRows.push([fmt(leaves), fmt(d.tasks), fmt(d.snapshotMs, 3), fmt(d.metricsMs, 3)]);
}
console.log(
  `\n3. The dashboard with the graph held (the state and Dashboard in this process, median of ${DASHBOARD_REPS})\n`,
);
console.log(table([["leaves", "tasks held", "/api/snapshot ms", "/metrics ms"], ...dashboardRows]));
const perTaskCpu = (r: Run) => r.schedulerCpuS / r.tasks;
console.log(`\n${targets(sizeRuns).join("\n")}`);
console.log(
  `\nScheduler CPU per task, largest over smallest: graph size ${growth(sizeRuns, perTaskCpu)}, ` +
    `workers ${growth(workerRuns, perTaskCpu)} (flat: 1.00x)`,
);
console.log(
  `\nsubmit: the client's synchronous work to build the graph. sched: the scheduler process (CPU user+sys ` +
    `from /proc/PID/stat; RSS before submission -> peak while the graph runs). again: the same graph a ` +
    `second time on that cluster, once the first is forgotten. client: this process ` +
    `(Deno.memoryUsage()). sched deaf: the longest ping round trip to the scheduler (from a process of its ` +
    `own) while the graph ran. release: from releasing the root until the scheduler holds no task, and the ` +
    `longest ping meanwhile. warnings: lines the nodes logged meanwhile. left: tasks the scheduler still ` +
    `holds once every future is released.\n` +
    `(whole run: ${fmt((performance.now() - started) / 1000, 1)} s)`,
);
