/**
 * What a cluster shows over HTTP and on the terminal: the scheduler's dashboard data
 * (/api/snapshot, the /events stream), /metrics as Prometheus text checked line by line
 * against what really ran, /health, the dashboard's token login, a worker's own
 * /metrics, `progress()`, `dist info` and JSON logs of real CLI processes.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  Client,
  type Future,
  type Logger,
  progress,
  rpc,
  type SchedulerNode,
  taskOptions,
  wait,
  type WorkerNode,
  type WorkerOps,
} from "../mod.ts";
import { startScheduler, startWorker } from "../node.ts";
import { prometheus } from "../util/http.ts";
import { Ring } from "../scheduler/dashboard.ts";
import { LOG_LEVELS } from "../util/log.ts";
import { NODE_PERMISSIONS, spawnNode } from "../client/spawn.ts";
import { eventually, Processes, startCluster, testLogger } from "./_helpers.ts";

const MAIN = new URL("../main.ts", import.meta.url);
/** Longest wait for an SSE event: the stream sends one every 500 ms. */
const EVENT_TIMEOUT_MS = 3_000;
/** Longest wait for a heartbeat-borne figure (heartbeats come every 500 ms). */
const HEARTBEAT_TIMEOUT_MS = 5_000;

// ---- task functions (sent as source: no closures) ----

function inc(x: number): number {
  return x + 1;
}

async function slow(x: number): Promise<number> {
  // The pause is the behaviour under test: tasks that take a while, so the dashboard shows them running.
  await new Promise((resolve) => setTimeout(resolve, 10));
  return x;
}

function fail(x: number): number {
  throw new Error(`fail ${x}`);
}

function ones(n: number): Float64Array {
  return new Float64Array(n).fill(1);
}

function total(a: Float64Array): number {
  return a.reduce((p, q) => p + q, 0);
}

// ---- a cluster with a dashboard ----

interface DashCluster extends AsyncDisposable {
  scheduler: SchedulerNode;
  workers: WorkerNode[];
  /** The dashboard's base URL. */
  url: string;
}

async function startDashCluster(
  options: { threads?: number[]; authToken?: string; httpPort?: number } = {},
): Promise<DashCluster> {
  const threads = options.threads ?? [1, 1];
  const scheduler = await startScheduler({
    port: 0,
    dashboardPort: 0,
    authToken: options.authToken,
    log: testLogger("scheduler"),
  });
  const workers: WorkerNode[] = [];
  const names = ["alice", "bob", "carol"];
  try {
    for (const [i, nthreads] of threads.entries()) {
      workers.push(
        await startWorker({
          scheduler: scheduler.address,
          name: names[i],
          nthreads,
          authToken: options.authToken,
          log: testLogger(names[i]),
        }),
      );
    }
  } catch (error) {
    await Promise.all(workers.map((w) => w.close()));
    await scheduler.close();
    throw error;
  }
  assert.ok(scheduler.dashboard, "a scheduler started with dashboardPort has a dashboard");
  return {
    scheduler,
    workers,
    url: scheduler.dashboard,
    async [Symbol.asyncDispose]() {
      await Promise.all(workers.map((w) => w.close()));
      await scheduler.close();
    },
  };
}

/** GETs `url` and returns the body as text (so no body is left open). */
async function getText(
  url: string,
  init: RequestInit = {},
): Promise<{ status: number; type: string; text: string }> {
  const response = await fetch(url, init);
  return {
    status: response.status,
    type: response.headers.get("content-type") ?? "",
    text: await response.text(),
  };
}

// deno-lint-ignore no-explicit-any
type Snapshot = any;

async function snapshotOf(base: string, init: RequestInit = {}): Promise<Snapshot> {
  const { status, text } = await getText(`${base}/api/snapshot`, init);
  assert.equal(status, 200, text);
  return JSON.parse(text);
}

// ---- Prometheus text exposition (0.0.4), parsed strictly ----

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

interface MetricFamily {
  name: string;
  type: string;
  help?: string;
  samples: Sample[];
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const VALUE = /^(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]Inf|NaN)$/;
const TYPES = ["counter", "gauge", "histogram", "summary", "untyped"];
const SUFFIXES: Record<string, string[]> = {
  histogram: ["_bucket", "_sum", "_count"],
  summary: ["", "_sum", "_count"],
};

function parseValue(text: string, where: string): number {
  if (!VALUE.test(text)) throw new Error(`${where}: value ${JSON.stringify(text)} is not a number`);
  return text === "+Inf" ? Infinity : text === "-Inf" ? -Infinity : Number(text);
}

/** `{a="x",b="y"}` (the braces' inside) as a record; throws on any syntax error. */
function parseLabels(text: string, where: string): Record<string, string> {
  const labels: Record<string, string> = {};
  let i = 0;
  while (i < text.length) {
    const eq = text.indexOf("=", i);
    if (eq < 0) throw new Error(`${where}: label without "=" in {${text}}`);
    const name = text.slice(i, eq);
    if (!LABEL_NAME.test(name)) throw new Error(`${where}: bad label name ${JSON.stringify(name)}`);
    if (Object.hasOwn(labels, name)) throw new Error(`${where}: label ${name} twice`);
    if (text[eq + 1] !== '"') throw new Error(`${where}: label ${name}'s value is not quoted`);
    let value = "";
    let j = eq + 2;
    for (;; j++) {
      if (j >= text.length) throw new Error(`${where}: label ${name}'s value is not closed`);
      const c = text[j];
      if (c === '"') break;
      if (c === "\n") throw new Error(`${where}: raw newline in label ${name}`);
      if (c === "\\") {
        const next = text[++j];
        if (next === "\\") value += "\\";
        else if (next === '"') value += '"';
        else if (next === "n") value += "\n";
        else throw new Error(`${where}: bad escape \\${next} in label ${name}`);
      } else value += c;
    }
    labels[name] = value;
    i = j + 1;
    if (i < text.length) {
      if (text[i] !== ",") throw new Error(`${where}: expected "," after label ${name}`);
      i++;
    }
  }
  return labels;
}

/**
 * Parses Prometheus text and checks what a scraper relies on: every sample belongs to
 * the family of the `# TYPE` line above it (families are contiguous, typed once, before
 * their samples), names and labels are well formed, values are numbers, no series
 * twice, counters are not negative, and each histogram's buckets are cumulative up to
 * `+Inf`, which equals its `_count`.
 */
function parsePrometheus(text: string): Map<string, MetricFamily> {
  if (!text.endsWith("\n")) throw new Error("The exposition does not end with a newline");
  const families = new Map<string, MetricFamily>();
  const helps = new Map<string, string>();
  const series = new Set<string>();
  let current: MetricFamily | null = null;
  const lines = text.slice(0, -1).split("\n");
  for (const [n, line] of lines.entries()) {
    const where = `line ${n + 1} (${JSON.stringify(line)})`;
    if (line === "") continue;
    if (line.startsWith("#")) {
      const m = /^# (HELP|TYPE) (\S+)(?: (.*))?$/.exec(line);
      if (!m) continue; // another comment
      const [, kind, name, rest = ""] = m;
      if (!METRIC_NAME.test(name)) throw new Error(`${where}: bad metric name`);
      if (kind === "HELP") {
        if (helps.has(name)) throw new Error(`${where}: a second HELP for ${name}`);
        helps.set(name, rest);
        continue;
      }
      if (!TYPES.includes(rest)) throw new Error(`${where}: unknown type ${rest}`);
      if (families.has(name)) throw new Error(`${where}: a second TYPE for ${name}`);
      current = { name, type: rest, help: helps.get(name), samples: [] };
      families.set(name, current);
      continue;
    }
    const m = /^([^\s{]+)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+(-?\d+))?$/.exec(line);
    if (!m) throw new Error(`${where}: not a sample line`);
    const [, name, labelText, valueText] = m;
    if (!METRIC_NAME.test(name)) throw new Error(`${where}: bad metric name ${name}`);
    if (current === null) throw new Error(`${where}: sample ${name} before any TYPE line`);
    const suffixes = SUFFIXES[current.type] ?? [""];
    if (!suffixes.some((s) => name === current!.name + s)) {
      throw new Error(`${where}: sample ${name} is not of the family ${current.name} typed above it`);
    }
    const labels = labelText === undefined ? {} : parseLabels(labelText, where);
    const value = parseValue(valueText, where);
    const id = `${name}${JSON.stringify(Object.entries(labels).sort())}`;
    if (series.has(id)) throw new Error(`${where}: series ${id} twice`);
    series.add(id);
    if (current.type === "counter" && !(value >= 0)) throw new Error(`${where}: counter ${value} < 0`);
    if ("le" in labels !== name.endsWith("_bucket") && current.type === "histogram") {
      throw new Error(`${where}: le belongs on _bucket samples, and only there`);
    }
    current.samples.push({ name, labels, value });
  }
  for (const f of families.values()) if (f.type === "histogram") checkHistogram(f);
  return families;
}

function checkHistogram(f: MetricFamily): void {
  const groups = new Map<string, { buckets: [number, number][]; sum?: number; count?: number }>();
  for (const s of f.samples) {
    const { le, ...rest } = s.labels;
    const key = JSON.stringify(Object.entries(rest).sort());
    const g = groups.get(key) ?? groups.set(key, { buckets: [] }).get(key)!;
    if (s.name.endsWith("_bucket")) g.buckets.push([parseValue(le, `${f.name} le`), s.value]);
    else if (s.name.endsWith("_sum")) g.sum = s.value;
    else g.count = s.value;
  }
  for (const [key, g] of groups) {
    const what = `histogram ${f.name}${key}`;
    if (g.buckets.length === 0 || g.sum === undefined || g.count === undefined) {
      throw new Error(`${what}: needs buckets, _sum and _count`);
    }
    for (let i = 1; i < g.buckets.length; i++) {
      if (!(g.buckets[i][0] > g.buckets[i - 1][0])) throw new Error(`${what}: le bounds not increasing`);
      if (g.buckets[i][1] < g.buckets[i - 1][1]) {
        throw new Error(`${what}: buckets not cumulative (le=${g.buckets[i][0]})`);
      }
    }
    const last = g.buckets.at(-1)!;
    if (last[0] !== Infinity) throw new Error(`${what}: no le="+Inf" bucket`);
    if (last[1] !== g.count) throw new Error(`${what}: _count ${g.count} != +Inf bucket ${last[1]}`);
  }
}

/** The one value of `name` whose labels include `labels`. */
function valueOf(
  families: Map<string, MetricFamily>,
  name: string,
  labels: Record<string, string> = {},
): number {
  const family = families.get(name) ??
    [...families.values()].find((f) => f.samples.some((s) => s.name === name));
  assert.ok(family, `no metric ${name}`);
  const found = family.samples.filter((s) =>
    s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)
  );
  assert.equal(found.length, 1, `${name}${JSON.stringify(labels)}: ${found.length} samples`);
  return found[0].value;
}

async function scrape(url: string, init: RequestInit = {}): Promise<Map<string, MetricFamily>> {
  const { status, type, text } = await getText(url, init);
  assert.equal(status, 200, text);
  assert.match(type, /^text\/plain; version=0\.0\.4/);
  return parsePrometheus(text);
}

// ---- Server-Sent Events ----

interface SseEvent {
  event: string;
  data: string;
}

/** Reads SSE events from a response body, each within a deadline. */
class SseReader {
  #reader: ReadableStreamDefaultReader<Uint8Array>;
  #decoder = new TextDecoder();
  #buffer = "";

  constructor(body: ReadableStream<Uint8Array>) {
    this.#reader = body.getReader();
  }

  async next(timeoutMs = EVENT_TIMEOUT_MS): Promise<SseEvent> {
    for (;;) {
      const end = this.#buffer.indexOf("\n\n");
      if (end >= 0) {
        const block = this.#buffer.slice(0, end);
        this.#buffer = this.#buffer.slice(end + 2);
        const event: SseEvent = { event: "message", data: "" };
        const data: string[] = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event.event = value;
          else if (field === "data") data.push(value);
        }
        event.data = data.join("\n");
        return event;
      }
      let timer: ReturnType<typeof setTimeout> | undefined;
      const chunk = await Promise.race([
        this.#reader.read(),
        new Promise<"timeout">((resolve) => timer = setTimeout(() => resolve("timeout"), timeoutMs)),
      ]).finally(() => clearTimeout(timer));
      if (chunk === "timeout") throw new Error(`No SSE event within ${timeoutMs} ms`);
      if (chunk.done) throw new Error("The event stream ended");
      this.#buffer += this.#decoder.decode(chunk.value, { stream: true });
    }
  }

  /** Reads events until `ok` holds for one, and returns it. */
  async until(ok: (snapshot: Snapshot) => boolean, timeoutMs = HEARTBEAT_TIMEOUT_MS): Promise<Snapshot[]> {
    const deadline = Date.now() + timeoutMs;
    const seen: Snapshot[] = [];
    for (;;) {
      const e = await this.next();
      assert.equal(e.event, "snapshot");
      const s = JSON.parse(e.data);
      seen.push(s);
      if (ok(s)) return seen;
      if (Date.now() > deadline) throw new Error(`No matching event within ${timeoutMs} ms`);
    }
  }

  /** Reads to the end of the stream (each event within the deadline). */
  async drain(): Promise<void> {
    for (;;) {
      try {
        await this.next();
      } catch (error) {
        if (/The event stream ended/.test(String(error))) return;
        throw error;
      }
    }
  }

  cancel(): Promise<void> {
    return this.#reader.cancel();
  }
}

/** A logger that keeps every line (and drops nothing a test could look for). */
function capturingLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  const at = (level: string) => (message: string) => void lines.push(`${level} ${message}`);
  return { lines, debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") };
}

// ---- the tests ----

Deno.test("metrics checker: rejects what a Prometheus scraper would", () => {
  const good = [
    "# HELP a_total Things.",
    "# TYPE a_total counter",
    'a_total{x="1"} 3',
    "# TYPE h histogram",
    'h_bucket{le="0.5"} 1',
    'h_bucket{le="+Inf"} 2',
    "h_sum 0.7",
    "h_count 2",
    "",
  ].join("\n");
  const families = parsePrometheus(good);
  assert.equal(valueOf(families, "a_total", { x: "1" }), 3);
  assert.equal(valueOf(families, "h_count"), 2);
  const bad: [string, RegExp][] = [
    ["a 1\n", /before any TYPE/],
    ["# TYPE a gauge\nb 1\n", /not of the family a/],
    ['# TYPE a gauge\na{x="1} 1\n', /not closed/],
    ["# TYPE a gauge\na{x=1} 1\n", /not quoted/],
    ['# TYPE a gauge\na{1x="1"} 1\n', /bad label name/],
    ['# TYPE a gauge\na{x="\\t"} 1\n', /bad escape/],
    ["# TYPE a gauge\na one\n", /not a number/],
    ["# TYPE a gauge\na 1\na 2\n", /twice/],
    ["# TYPE a counter\na -1\n", /< 0/],
    ["# TYPE a gauge\na 1", /newline/],
    ['# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n', /cumulative/],
    ['# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 3\n', /_count 3/],
    ['# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n', /\+Inf/],
  ];
  for (const [text, error] of bad) assert.throws(() => parsePrometheus(text), error, text);
});

Deno.test("metrics: prometheus() escapes label values and writes infinities", async () => {
  const text = await prometheus([
    {
      name: "x",
      help: "X.",
      type: "gauge",
      samples: [
        { labels: { worker: 'a"b\\c\nd' }, value: 1.5 },
        { labels: { worker: "inf" }, value: Infinity },
        { labels: { worker: "nan" }, value: NaN },
      ],
    },
  ]).text();
  const families = parsePrometheus(text);
  assert.equal(valueOf(families, "x", { worker: 'a"b\\c\nd' }), 1.5);
  assert.equal(valueOf(families, "x", { worker: "inf" }), Infinity);
  assert.ok(Number.isNaN(valueOf(families, "x", { worker: "nan" })));
});

Deno.test("dashboard: /health and /metrics (valid Prometheus text) match what ran", async () => {
  await using cluster = await startDashCluster();
  const [alice, bob] = cluster.workers;
  const health = await getText(`${cluster.url}/health`);
  assert.equal(health.status, 200);
  assert.match(health.type, /application\/json/);
  assert.deepEqual(JSON.parse(health.text), { status: "ok" });

  const before = await scrape(`${cluster.url}/metrics`);
  assert.equal(valueOf(before, "dist_workers"), 2);
  assert.equal(valueOf(before, "dist_tasks_completed_total"), 0);
  assert.equal(valueOf(before, "dist_task_duration_seconds_count"), 0);
  assert.equal(valueOf(before, "dist_transferred_bytes_total"), 0);
  for (const name of ["dist_workers", "dist_tasks_completed_total", "dist_task_duration_seconds"]) {
    assert.ok(before.get(name)?.help, `${name} has a HELP line`);
  }

  await using client = await Client.connect(cluster.scheduler.address);
  const incs = client.map(inc, [...Array(20).keys()]);
  // 80 kB made on alice, summed on bob: bob fetches it from alice.
  const big = client.submit(ones, 10_000, taskOptions({ workers: ["alice"] }));
  const sum = client.submit(total, big, taskOptions({ workers: ["bob"] }));
  assert.equal(await sum.result(), 10_000);
  await wait(incs);
  const ran = incs.length + 2;

  // Transfers reach the scheduler with heartbeats: poll.
  let after = await scrape(`${cluster.url}/metrics`);
  await eventually(async () => {
    after = await scrape(`${cluster.url}/metrics`);
    return valueOf(after, "dist_transferred_bytes_total") >= 80_000;
  }, HEARTBEAT_TIMEOUT_MS);
  assert.equal(valueOf(after, "dist_workers"), 2);
  assert.equal(valueOf(after, "dist_clients"), 1);
  assert.equal(valueOf(after, "dist_tasks_completed_total"), ran);
  assert.equal(valueOf(after, "dist_tasks_failed_total"), 0);
  assert.equal(valueOf(after, "dist_tasks", { state: "memory" }), ran);
  assert.equal(valueOf(after, "dist_tasks", { state: "erred" }), 0);
  assert.ok(valueOf(after, "dist_task_duration_seconds_count") >= ran);
  assert.ok(valueOf(after, "dist_task_duration_seconds_sum") > 0);
  // What each worker really holds (bob holds a replica of alice's array too).
  for (const w of [alice, bob]) {
    assert.equal(valueOf(after, "dist_worker_keys", { worker: w.address }), w.data.size, w.address);
    assert.equal(valueOf(after, "dist_worker_bytes", { worker: w.address }), w.data.totalBytes(), w.address);
    assert.equal(valueOf(after, "dist_worker_tasks_processing", { worker: w.address }), 0);
  }
  assert.ok(bob.data.has(big.key), "bob fetched the array from alice");
  assert.ok(valueOf(after, "dist_worker_bytes", { worker: alice.address }) >= 80_000);
  assert.ok(valueOf(after, "dist_event_loop_lag_seconds") >= 0);
});

Deno.test("dashboard: /api/snapshot has workers, progress with errors, the task stream and memory", async () => {
  await using cluster = await startDashCluster({ threads: [2, 1] });
  const [alice, bob] = cluster.workers;
  await using client = await Client.connect(cluster.scheduler.address);
  const incs = client.map(inc, [...Array(12).keys()]);
  const fails = client.map(fail, [1, 2]);
  const big = client.submit(ones, 1_000, taskOptions({ workers: ["alice"] }));
  const sum = client.submit(total, big, taskOptions({ workers: ["bob"] }));
  await wait([...incs, ...fails, sum]);
  assert.equal(fails[0].status, "error");

  let s = await snapshotOf(cluster.url);
  await eventually(async () => {
    s = await snapshotOf(cluster.url);
    return s.transfers.length > 0 && s.memory.length > 0;
  }, HEARTBEAT_TIMEOUT_MS);

  assert.equal(s.scheduler.address, cluster.scheduler.address);
  assert.equal(s.scheduler.clients, 1);
  assert.ok(s.scheduler.uptime > 0);
  assert.deepEqual(
    s.workers.map((w: Snapshot) => [w.address, w.name, w.nthreads]).sort(),
    [[alice.address, "alice", 2], [bob.address, "bob", 1]].sort(),
  );
  for (const w of s.workers) {
    const node = w.address === alice.address ? alice : bob;
    assert.equal(w.nkeys, node.data.size);
    assert.equal(w.nbytes, node.data.totalBytes());
    assert.equal(w.processing, 0);
    assert.ok(w.lastSeen >= 0 && w.lastSeen < 5, `last heartbeat ${w.lastSeen} s ago`);
  }
  assert.deepEqual(s.progress.inc, { done: 12, erred: 0, processing: 0, waiting: 0 });
  assert.deepEqual(s.progress.fail, { done: 0, erred: 2, processing: 0, waiting: 0 });
  assert.deepEqual(s.progress.total, { done: 1, erred: 0, processing: 0, waiting: 0 });
  assert.equal(s.totals.completed, 14);
  assert.equal(s.totals.failed, 2);
  assert.equal(s.totals.byState.memory, 14);
  assert.equal(s.totals.byState.erred, 2);

  const done = s.tasks.filter((t: Snapshot) => t.status === "done");
  assert.equal(done.length, 14);
  assert.deepEqual(new Set(done.map((t: Snapshot) => t.key)), new Set([...incs, big, sum].map((f) => f.key)));
  for (const t of s.tasks) {
    const node = t.worker === alice.address ? alice : t.worker === bob.address ? bob : null;
    assert.ok(node, `task ${t.key} ran on ${t.worker}, a known worker`);
    assert.ok(
      Number.isInteger(t.thread) && t.thread >= 0 && t.thread < node.identity.nthreads,
      String(t.thread),
    );
    assert.ok(t.start <= t.stop && t.stop <= s.now, `${t.start} <= ${t.stop} <= ${s.now}`);
    assert.equal(t.prefix, t.key.slice(0, t.key.lastIndexOf("-")));
  }
  assert.equal(s.tasks.find((t: Snapshot) => t.key === big.key).worker, alice.address);
  assert.equal(s.tasks.find((t: Snapshot) => t.key === sum.key).worker, bob.address);

  const transfer = s.transfers.find((t: Snapshot) => t.to === bob.address);
  assert.ok(transfer, JSON.stringify(s.transfers));
  assert.equal(transfer.from, alice.address);
  assert.equal(transfer.keys, 1);
  assert.ok(transfer.nbytes >= 8_000 && transfer.start <= transfer.stop);

  const sample = s.memory.at(-1);
  assert.ok(sample.t <= s.now);
  assert.deepEqual(Object.keys(sample.workers).sort(), [alice.address, bob.address].sort());
  assert.equal(s.counts.tasks, s.tasks.length);
  assert.equal(s.counts.memory, s.memory.length);
});

// The page draws erred tasks in red in the task stream (status "erred"), but the
// scheduler only adds task_finished runs to the stream: task_erred carries no start,
// stop or thread, and no TaskEvent is made for it.
Deno.test("dashboard: erred tasks appear in the task stream with status erred", async () => {
  await using cluster = await startDashCluster();
  await using client = await Client.connect(cluster.scheduler.address);
  const fails = client.map(fail, [1, 2]);
  await wait(fails);
  const s = await snapshotOf(cluster.url);
  assert.equal(s.progress.fail.erred, 2);
  assert.deepEqual(
    s.tasks.filter((t: Snapshot) => t.status === "erred").map((t: Snapshot) => t.key).sort(),
    fails.map((f) => f.key).sort(),
    "the task stream has no entry for the tasks that failed",
  );
});

Deno.test("dashboard: /events streams snapshots, each with only the new task runs", async () => {
  await using cluster = await startDashCluster();
  await using client = await Client.connect(cluster.scheduler.address);
  const response = await fetch(`${cluster.url}/events`);
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("content-type"), "text/event-stream");
  const events = new SseReader(response.body!);
  try {
    // The first event is sent as the stream opens.
    const first = await events.next(1_000);
    assert.equal(first.event, "snapshot");
    const s0 = JSON.parse(first.data);
    assert.equal(s0.workers.length, 2);
    assert.deepEqual(s0.tasks, []);

    const futures = client.map(slow, [...Array(20).keys()]);
    const keys = new Set(futures.map((f) => f.key));
    const seen: string[] = [];
    const snapshots = await events.until((s) => {
      seen.push(...s.tasks.map((t: Snapshot) => t.key));
      return seen.length >= keys.size;
    });
    assert.ok(snapshots.length >= 1);
    // No run is sent twice, and every one of ours came.
    assert.equal(seen.length, new Set(seen).size, "a task event was sent twice");
    assert.deepEqual(new Set(seen), keys);
    const last = snapshots.at(-1);
    assert.equal(last.counts.tasks, keys.size);
    assert.equal(last.progress.slow.done, keys.size);
    // Later snapshots carry nothing new once the work is done.
    const next = JSON.parse((await events.next()).data);
    assert.deepEqual(next.tasks, []);
    assert.ok(next.now > last.now);
    await wait(futures);
  } finally {
    await events.cancel();
  }
});

Deno.test("dashboard: an open /events stream ends when the scheduler closes", async () => {
  const cluster = await startDashCluster({ threads: [] });
  const response = await fetch(`${cluster.url}/events`);
  const events = new SseReader(response.body!);
  try {
    assert.equal((await events.next()).event, "snapshot");
    await cluster[Symbol.asyncDispose]();
    // The viewer sees the stream end cleanly, not cut with the connection, nor go silent.
    const error = await events.drain().then(() => null, (e: Error) => e);
    assert.equal(error, null);
  } finally {
    await events.cancel().catch(() => {});

    await cluster[Symbol.asyncDispose]();
  }
});

Deno.test("dashboard: with an auth token, a login page, Bearer and cookie access; /health stays open", async () => {
  const TOKEN = "dashboard-secret-token";
  await using cluster = await startDashCluster({ authToken: TOKEN, threads: [1] });
  const url = cluster.url;

  const login = await getText(`${url}/`);
  assert.equal(login.status, 401);
  assert.match(login.type, /text\/html/);
  assert.match(login.text, /needs its auth token/);
  assert.match(login.text, /<form method="post" action="\/login">/);
  assert.match(login.text, /name="token"/);
  assert.doesNotMatch(login.text, /id="workers"/);

  for (const path of ["/metrics", "/api/snapshot", "/events"]) {
    const denied = await getText(`${url}${path}`);
    assert.equal(denied.status, 401, path);
    assert.match(denied.text, /Unauthorized/);
    const wrong = await getText(`${url}${path}`, { headers: { authorization: "Bearer wrong-token" } });
    assert.equal(wrong.status, 401, path);
  }
  const bearer = { headers: { authorization: `Bearer ${TOKEN}` } };
  const metrics = await scrape(`${url}/metrics`, bearer);
  assert.equal(valueOf(metrics, "dist_workers"), 1);
  assert.equal((await snapshotOf(url, bearer)).workers.length, 1);

  const health = await getText(`${url}/health`);
  assert.equal(health.status, 200);
  assert.deepEqual(JSON.parse(health.text), { status: "ok" });

  // The wrong token stays on the login page, says so, and sets no cookie.
  const wrongLogin = await fetch(`${url}/login`, {
    method: "POST",
    body: new URLSearchParams({ token: "not-the-token" }),
    redirect: "manual",
  });
  assert.equal(wrongLogin.status, 401);
  assert.equal(wrongLogin.headers.get("set-cookie"), null);
  assert.match(await wrongLogin.text(), /Wrong token/);

  const right = await fetch(`${url}/login`, {
    method: "POST",
    body: new URLSearchParams({ token: TOKEN }),
    redirect: "manual",
  });
  await right.body?.cancel();
  assert.equal(right.status, 303);
  assert.equal(right.headers.get("location"), "/");
  const setCookie = right.headers.get("set-cookie") ?? "";
  assert.match(setCookie, /HttpOnly/);
  assert.match(setCookie, /SameSite=Strict/);
  assert.doesNotMatch(setCookie, new RegExp(TOKEN), "the cookie is not the token itself");
  const cookie = { headers: { cookie: setCookie.split(";")[0] } };

  const page = await getText(`${url}/`, cookie);
  assert.equal(page.status, 200);
  assert.match(page.text, /<title>dist dashboard<\/title>/);
  assert.match(page.text, /id="workers"/);
  assert.equal((await getText(`${url}/metrics`, cookie)).status, 200);
  const stream = await fetch(`${url}/events`, cookie);
  assert.equal(stream.status, 200);
  const events = new SseReader(stream.body!);
  try {
    const first = await events.next();
    assert.equal(first.event, "snapshot");
    assert.equal(JSON.parse(first.data).workers.length, 1);
  } finally {
    await events.cancel();
  }
  // A forged cookie does not open it.
  assert.equal((await getText(`${url}/`, { headers: { cookie: "dist_auth=forged" } })).status, 401);
});

Deno.test("worker: httpPort serves the worker's own /metrics and /health", async () => {
  const scheduler = await startScheduler({ port: 0, log: testLogger("scheduler") });
  const logs = [capturingLogger(), capturingLogger()];
  const workers: WorkerNode[] = [];
  try {
    for (const [i, name] of ["alice", "bob"].entries()) {
      workers.push(
        await startWorker({ scheduler: scheduler.address, name, nthreads: 2, httpPort: 0, log: logs[i] }),
      );
    }
    // The worker logs where its metrics are, and says so as httpUrl.
    const urls = logs.map((log, i) => {
      const line = log.lines.find((l) => /Metrics at /.test(l));
      assert.ok(line, log.lines.join("\n"));
      const url = /Metrics at (http:\/\/\S+)\/metrics$/.exec(line)![1];
      assert.equal(workers[i].httpUrl, url);
      return url;
    });
    for (const url of urls) {
      const health = await getText(`${url}/health`);
      assert.equal(health.status, 200);
      assert.deepEqual(JSON.parse(health.text), { status: "ok" });
      assert.equal((await getText(`${url}/`)).status, 404);
      const empty = await scrape(`${url}/metrics`);
      assert.equal(valueOf(empty, "dist_worker_keys"), 0);
      assert.equal(valueOf(empty, "dist_worker_threads"), 2);
      // Executors start when a task first needs them: an idle worker has none.
      assert.equal(valueOf(empty, "dist_worker_executors_started"), 0);
    }

    await using client = await Client.connect(scheduler.address);
    const big = client.submit(ones, 10_000, taskOptions({ workers: ["alice"] }));
    const sum = client.submit(total, big, taskOptions({ workers: ["bob"] }));
    const incs = client.map(inc, [1, 2, 3], taskOptions({ workers: ["alice"] }));
    assert.equal(await sum.result(), 10_000);
    await wait(incs);

    const [a, b] = await Promise.all(urls.map((url) => scrape(`${url}/metrics`)));
    assert.equal(valueOf(a, "dist_worker_keys"), workers[0].data.size);
    assert.equal(valueOf(a, "dist_worker_keys"), 4);
    assert.equal(valueOf(b, "dist_worker_keys"), workers[1].data.size);
    assert.equal(valueOf(a, "dist_worker_bytes"), workers[0].data.totalBytes());
    assert.equal(valueOf(a, "dist_worker_tasks_running"), 0);
    assert.equal(valueOf(a, "dist_worker_tasks_queued"), 0);
    assert.ok(valueOf(a, "dist_worker_executors_started") >= 1);
    assert.ok(valueOf(a, "dist_worker_transferred_bytes_total", { direction: "out" }) >= 80_000);
    assert.ok(valueOf(b, "dist_worker_transferred_bytes_total", { direction: "in" }) >= 80_000);
    // Bob served only the client its small result.
    const bobOut = valueOf(b, "dist_worker_transferred_bytes_total", { direction: "out" });
    assert.ok(bobOut > 0 && bobOut < 1_000, String(bobOut));
  } finally {
    await Promise.all(workers.map((w) => w.close()));
    await scheduler.close();
  }
});

Deno.test("client: dashboardLink is the scheduler's dashboard, or null without one", async () => {
  {
    await using cluster = await startDashCluster({ threads: [1] });
    await using client = await Client.connect(cluster.scheduler.address);
    assert.match(cluster.url, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.equal(client.dashboardLink, cluster.scheduler.dashboard);
    assert.equal((await getText(`${client.dashboardLink}/health`)).status, 200);
  }
  await using plain = await startScheduler({ port: 0, log: testLogger("scheduler") });
  assert.equal(plain.dashboard, null);
  await using client = await Client.connect(plain.address);
  assert.equal(client.dashboardLink, null);
});

/** An output that collects what `progress` writes. */
function fakeOutput(terminal: boolean) {
  const chunks: Uint8Array[] = [];
  return {
    writeSync(p: Uint8Array): number {
      chunks.push(p.slice());
      return p.length;
    },
    isTerminal: () => terminal,
    text: () => new TextDecoder().decode(new Uint8Array(chunks.flatMap((c) => [...c]))),
  };
}

Deno.test("progress: plain lines without a terminal, a redrawn bar on one", async () => {
  await using cluster = await startDashCluster({ threads: [1, 1] });
  await using client = await Client.connect(cluster.scheduler.address);

  const plain = fakeOutput(false);
  const futures: Future[] = [...client.map(slow, [...Array(19).keys()]), client.submit(fail, 0)];
  const counts = await progress(futures, { output: plain, intervalMs: 5 });
  assert.deepEqual(counts, { finished: 19, error: 1 });
  const text = plain.text();
  assert.ok(!text.includes("\r"), "no carriage return without a terminal");
  assert.ok(text.endsWith("\n"));
  const lines = text.slice(0, -1).split("\n");
  assert.ok(lines.length >= 2 && lines.length <= 12, `one line a tenth: ${lines.length}\n${text}`);
  let last = -1;
  for (const line of lines) {
    const m = /^tasks: (\d+)% (\d+)\/20(?:, (\d+) failed)? in \d+\.\d s$/.exec(line);
    assert.ok(m, `plain line: ${JSON.stringify(line)}`);
    assert.ok(Number(m[1]) >= last, "the percentage never goes back");
    last = Number(m[1]);
  }
  assert.match(lines.at(-1)!, /^tasks: 100% 20\/20, 1 failed in \d+\.\d s$/);

  const tty = fakeOutput(true);
  const more = client.map(slow, [...Array(10).keys()].map((i) => i + 100));
  assert.deepEqual(await progress(more, { output: tty, intervalMs: 5, label: "work" }), { finished: 10 });
  const drawn = tty.text();
  assert.ok(drawn.startsWith("\rwork ["), JSON.stringify(drawn.slice(0, 20)));
  assert.ok(drawn.endsWith("\n"));
  const frames = drawn.slice(1, -1).split("\r");
  for (const frame of frames) assert.match(frame, /^work \[[#.]{40}\] \d+% \d+\/10 in \d+\.\d s$/);
  assert.match(frames.at(-1)!, /^work \[#{40}\] 100% 10\/10 in \d+\.\d s$/);
  assert.match(frames[0], /^work \[\.{40}\] 0% 0\/10/);
});

async function dist(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...NODE_PERMISSIONS, MAIN.href, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

Deno.test("cli: dist info lists the workers and tasks by state; --json parses", async () => {
  await using nodes = new Processes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0", "--dashboard-port", "0");
  const w1 = await nodes.spawn("worker", scheduler.address, "--name", "w1", "--nthreads", "1");
  const w2 = await nodes.spawn("worker", scheduler.address, "--name", "w2", "--nthreads", "1");
  await using client = await Client.connect(scheduler.address);
  const futures = [...client.map(inc, [...Array(6).keys()]), client.submit(fail, 7)];
  await wait(futures);

  const table = await dist("info", scheduler.address);
  assert.equal(table.code, 0, table.stderr);
  const lines = table.stdout.split("\n");
  assert.match(
    lines[0],
    new RegExp(
      `^Scheduler ${scheduler.address} {2}\\(2 workers, 6 keys held, dashboard http://127\\.0\\.0\\.1:\\d+\\)$`,
    ),
  );
  for (const [w, name] of [[w1, "w1"], [w2, "w2"]] as const) {
    const row = lines.find((l) => l.startsWith(w.address));
    assert.ok(row, `a row for ${w.address}:\n${table.stdout}`);
    assert.match(row, new RegExp(`^${w.address}\\s+${name}\\s+1\\s+\\d+\\s`));
  }
  const header = lines.findIndex((l) => /^tasks\s/.test(l));
  assert.ok(header > 0, table.stdout);
  assert.deepEqual(lines[header].trim().split(/\s+/), [
    "tasks",
    "released",
    "waiting",
    "queued",
    "processing",
    "memory",
    "erred",
  ]);
  assert.deepEqual(lines[header + 1].trim().split(/\s+/).map(Number), [0, 0, 0, 0, 6, 1]);

  const json = await dist("info", scheduler.address, "--json");
  assert.equal(json.code, 0, json.stderr);
  const info = JSON.parse(json.stdout);
  assert.deepEqual(info.workers.map((w: Snapshot) => w.address).sort(), [w1.address, w2.address].sort());
  assert.deepEqual(info.workers.map((w: Snapshot) => w.name).sort(), ["w1", "w2"]);
  assert.equal(info.tasks.memory, 6);
  assert.equal(info.tasks.erred, 1);
  assert.equal(info.keys, 6);
  assert.equal(info.scheduler.address, scheduler.address);
  assert.equal(info.scheduler.dashboard, client.dashboardLink);
  assert.equal(info.progress.inc.memory, 6);
});

Deno.test("cli: dist info ADDRESS --story KEY tells a key's moves on the scheduler and on a worker", async () => {
  await using nodes = new Processes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0", "--no-dashboard");
  const worker = await nodes.spawn("worker", scheduler.address, "--name", "w1", "--nthreads", "1");
  await using client = await Client.connect(scheduler.address);
  const future = client.submit(inc, 41);
  assert.equal(await future.result(), 42);

  const onScheduler = await dist("info", scheduler.address, "--story", future.key);
  assert.equal(onScheduler.code, 0, onScheduler.stderr);
  const lines = onScheduler.stdout.trimEnd().split("\n");
  assert.equal(lines[0], `${future.key} on scheduler ${scheduler.address}: memory`);
  assert.equal(lines[1], "  done: in memory on w1", "the scheduler says why it is where it is");
  const moves = lines.slice(2).map((l) =>
    l.match(/^ {2}\S+Z {2}(\w+) -> (\w+) {2}\((.*)\)$/)?.slice(1, 3).join(">")
  );
  assert.deepEqual(
    moves,
    ["released>waiting", "waiting>processing", "processing>memory"],
    onScheduler.stdout,
  );
  assert.match(lines[3], new RegExp(`sent to ${worker.address.replace(/[.:/]/g, "\\$&")}`));

  const onWorker = await dist("info", worker.address, "--story", future.key, "--json");
  assert.equal(onWorker.code, 0, onWorker.stderr);
  const story = JSON.parse(onWorker.stdout);
  assert.equal(story.node, "worker");
  assert.equal(story.state, "memory");
  assert.deepEqual(story.story.map((e: { to: string }) => e.to), ["ready", "executing", "memory"]);

  const unknown = await dist("info", scheduler.address, "--story", "nobody-knows");
  assert.equal(unknown.code, 0, unknown.stderr);
  assert.match(
    unknown.stdout,
    /^nobody-knows on scheduler .*: released\n {2}unknown to the scheduler: never submitted, or released\n {2}no moves remembered/,
  );
  const empty = await dist("info", scheduler.address, "--story=");
  assert.equal(empty.code, 2);
  assert.match(empty.stderr, /--story needs a key/);
});

/** Every line of `lines` is one JSON log object from `node`. */
function assertJsonLogs(lines: string[], node: RegExp): Snapshot[] {
  assert.ok(lines.length > 0, "no log lines");
  return lines.map((line) => {
    let entry: Snapshot;
    try {
      entry = JSON.parse(line);
    } catch {
      throw new assert.AssertionError({ message: `not a JSON line: ${JSON.stringify(line)}` });
    }
    assert.deepEqual(Object.keys(entry).sort(), ["level", "msg", "node", "time"], line);
    assert.equal(new Date(entry.time).toISOString(), entry.time, line);
    assert.ok((LOG_LEVELS as readonly string[]).includes(entry.level), line);
    assert.match(entry.node, node, line);
    assert.equal(typeof entry.msg, "string");
    return entry;
  });
}

Deno.test("cli: --log-format json makes every stderr line of a scheduler a JSON object", async () => {
  const scheduler = await spawnNode([
    "scheduler",
    "--port",
    "0",
    "--dashboard-port",
    "0",
    "--log-format",
    "json",
  ]);
  try {
    const worker = await spawnNode(["worker", scheduler.address, "--nthreads", "1", "--log-format", "json"]);
    await scheduler.waitForLog(/registered/);
    await worker.stop();
    await scheduler.waitForLog(/unregistered|left|removed/i);
    assertJsonLogs(worker.log, /^worker$/);
  } finally {
    await scheduler.stop();
  }
  const entries = assertJsonLogs(scheduler.log, /^scheduler$/);
  const messages = entries.map((e) => e.msg);
  assert.ok(messages.some((m) => m === `Scheduler at ${scheduler.address}`), messages.join("\n"));
  assert.ok(messages.some((m) => /^Dashboard at http:\/\/127\.0\.0\.1:\d+$/.test(m)), messages.join("\n"));
  assert.ok(messages.some((m) => /^Worker tcp:\S+ registered/.test(m)), messages.join("\n"));
  assert.equal(messages.at(-1), "Scheduler closed");
});

// Deno.serve prints a deprecation warning (plain text, on stderr) the first time a
// request's signal aborts: the dashboard listens to it on /events, so the first viewer
// who leaves puts a non-JSON line into the scheduler's JSON log.
Deno.test("cli: --log-format json stays JSON after a dashboard viewer leaves", async () => {
  const scheduler = await spawnNode([
    "scheduler",
    "--port",
    "0",
    "--dashboard-port",
    "0",
    "--log-format",
    "json",
  ]);
  try {
    const line = await scheduler.waitForLog(/Dashboard at/);
    const url = /Dashboard at (http:\/\/[^"]+)/.exec(line)![1];
    const response = await fetch(`${url}/events`);
    const events = new SseReader(response.body!);
    try {
      await events.next();
    } finally {
      await events.cancel();
    }
    // Wait past the stream's next tick (500 ms), whose failed write is how the scheduler
    // notices the viewer left. Nothing outside the scheduler shows that moment, so this is
    // a pause: one cut short would only let this guard miss the bug, never fail wrongly.
    await new Promise((resolve) => setTimeout(resolve, 700));
  } finally {
    await scheduler.stop();
  }
  assertJsonLogs(scheduler.log, /^scheduler$/);
});

// `dist local` checks --log-format but does not pass it on: LocalCluster takes a
// level only, so its scheduler and worker processes log text.
Deno.test("cli: dist local --log-format json logs JSON lines", async () => {
  const local = await spawnNode([
    "local",
    "--workers",
    "1",
    "--port",
    "0",
    "--no-dashboard",
    "--log-level",
    "info",
    "--log-format",
    "json",
  ]);
  try {
    await local.waitForLog(/registered/);
  } finally {
    await local.stop();
  }
  assertJsonLogs(local.log, /^(scheduler|worker worker-0)$/);
});

Deno.test("worker metrics: busy replies a worker served and the ones its peers waited out add up", async () => {
  await using cluster = await startCluster(2, { transfersOutMax: 1, httpPort: 0 });
  const [alice, bob] = cluster.workers;
  const [aliceUrl, bobUrl] = [alice.httpUrl!, bob.httpUrl!];
  await using client = await Client.connect(cluster.scheduler.address);
  const [big] = await client.scatter([new Uint8Array(32 * 1024 * 1024).fill(3)], {
    workers: [alice.address],
  });
  await using a = rpc<WorkerOps>(alice.address);
  // Three fetches of alice's large value at once, and she sends one at a time: two raw
  // calls (which do not retry) and bob's for a task, which waits out any busy reply.
  const [first, second, length] = await Promise.allSettled([
    a.get_data({ keys: [big.key] }),
    a.get_data({ keys: [big.key] }),
    client.submit((x: Uint8Array) => x.length, big, taskOptions({ workers: ["bob"] })).result(),
  ]);
  assert.deepEqual(length, { status: "fulfilled", value: 32 * 1024 * 1024 });
  assert.equal(bob.data.has(big.key), true);
  const rawBusy = [first, second].filter((r) => r.status === "rejected").length;
  const [am, bm] = await Promise.all([scrape(`${aliceUrl}/metrics`), scrape(`${bobUrl}/metrics`)]);
  const served = valueOf(am, "dist_worker_busy_total", { side: "served" });
  assert.ok(served >= 1, "three large fetches at once from a worker that sends one");
  assert.equal(served, rawBusy + valueOf(bm, "dist_worker_busy_total", { side: "waited" }));
  assert.equal(valueOf(am, "dist_worker_busy_total", { side: "waited" }), 0);
  await eventually(async () =>
    valueOf(await scrape(`${aliceUrl}/metrics`), "dist_worker_transfers_out") === 0
  );
});

Deno.test("dashboard: its rings keep the last items in order, full or not", () => {
  const ring = new Ring<number>(5);
  for (let i = 0; i < 3; i++) ring.push(i);
  assert.deepEqual(ring.since(0), [0, 1, 2]);
  assert.deepEqual(ring.since(1), [1, 2]);
  for (let i = 3; i < 12; i++) ring.push(i);
  assert.equal(ring.total, 12);
  assert.deepEqual(ring.since(0), [7, 8, 9, 10, 11], "only the last 5 are kept");
  assert.deepEqual(ring.since(10), [10, 11]);
  assert.deepEqual(ring.since(12), []);
  ring.push(12);
  assert.deepEqual(ring.since(9), [9, 10, 11, 12]);
});

Deno.test("dashboard: a record ring hands out its oldest record once full, and keeps the order when it comes back", () => {
  const ring = new Ring<{ n: number }>(3);
  for (let n = 0; n < 3; n++) {
    assert.equal(ring.spare(), undefined, "nothing to write over before it is full");
    ring.push({ n });
  }
  for (let n = 3; n < 8; n++) {
    const spare = ring.spare()!;
    assert.equal(spare.n, n - 3, "the oldest");
    spare.n = n;
    ring.push(spare);
    assert.deepEqual(ring.since(0).map((r) => r.n), [n - 2, n - 1, n]);
  }
  assert.equal(ring.total, 8);
});
