/**
 * What the tests share: in-process clusters on 127.0.0.1 with port 0, a bounded poll for
 * things that happen asynchronously, and a bound on every test's time. A test file that
 * imports this module (for its side effect, if it needs nothing else) has each of its
 * tests failed past TEST_TIMEOUT_MS.
 *
 * @module
 */

import { createLogger, type Logger, type LogLevel } from "../util/log.ts";
import { deadline } from "../util/time.ts";
import { type SchedulerNode, type WorkerNode, type WorkerOptions } from "../mod.ts";
import { startScheduler, startWorker } from "../node.ts";
import { type NodeProcess, spawnNode } from "../client/spawn.ts";

/** Test logs are silent unless DIST_TEST_LOG names a level. */
export function testLogger(name: string): Logger {
  return createLogger(name, (Deno.env.get("DIST_TEST_LOG") as LogLevel | undefined) ?? "silent");
}

/** A scheduler and workers in this process. */
export interface Cluster extends AsyncDisposable {
  scheduler: SchedulerNode;
  workers: WorkerNode[];
  close(): Promise<void>;
}

/** Starts a scheduler and `n` workers (named alice, bob, carol, ...). */
export async function startCluster(
  n = 2,
  options: Partial<Omit<WorkerOptions, "scheduler">> & { frameBytesMax?: number } = {},
): Promise<Cluster> {
  const names = ["alice", "bob", "carol", "dave", "erin", "frank"];
  const scheduler = await startScheduler({
    port: 0,
    log: testLogger("scheduler"),
    frameBytesMax: options.frameBytesMax,
  });
  const workers: WorkerNode[] = [];
  for (let i = 0; i < n; i++) {
    const name = names[i] ?? `worker${i}`;
    workers.push(
      await startWorker({
        scheduler: scheduler.address,
        name,
        log: testLogger(name),
        nthreads: 1,
        ...options,
      }),
    );
  }
  const close = async () => {
    await Promise.all(workers.map((w) => w.close()));
    await scheduler.close();
  };
  return { scheduler, workers, close, [Symbol.asyncDispose]: close };
}

/** The value of the unlabelled gauge or counter `name` on the Prometheus page at `url` (NaN when absent). */
export async function metricAt(url: string, name: string): Promise<number> {
  const response = await fetch(url);
  const text = await response.text();
  if (!response.ok) throw new Error(`GET ${url}: ${response.status} ${text}`);
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line === undefined ? NaN : Number(line.slice(name.length + 1));
}

/** Pause between two looks of `eventually`. */
const POLL_STEP_MS = 20;

/** Polls `check` until it returns true; throws after `timeoutMs`. */
export async function eventually(check: () => boolean | Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const until = deadline(timeoutMs);
  while (!(await check())) {
    if (until.expired()) throw new Error(`Condition not met within ${timeoutMs} ms: ${check}`);
    await new Promise((resolve) => setTimeout(resolve, POLL_STEP_MS));
  }
}

/**
 * Longest any one test may run: one that waits on something that never comes (a promise
 * that never settles, a poll with no bound) fails its file with this, instead of hanging
 * the suite. The slowest tests (real node processes, a browser) take well under a minute.
 */
export const TEST_TIMEOUT_MS = 180_000;

let watchdog: ReturnType<typeof setTimeout> | undefined;
Deno.test.beforeEach(() => {
  watchdog = setTimeout(() => {
    // Thrown from a timer, it fails the running test's file: Deno names that test "cancelled".
    throw new Error(
      `A test ran past TEST_TIMEOUT_MS (${TEST_TIMEOUT_MS} ms): it waits on something that never comes`,
    );
  }, TEST_TIMEOUT_MS);
});
Deno.test.afterEach(() => clearTimeout(watchdog));

/**
 * Reads a file of /proc (Deno reads /proc only with --allow-all, which tests do not have:
 * `cat` reads it); null when it is absent.
 */
export async function readProc(path: string): Promise<string | null> {
  const out = await new Deno.Command("sh", { args: ["-c", `cat ${path}`], stdout: "piped", stderr: "null" })
    .output();
  return out.success ? new TextDecoder().decode(out.stdout) : null;
}

/** Whether process `pid` exists and is not a zombie. */
export async function processAlive(pid: number): Promise<boolean> {
  const status = await readProc(`/proc/${pid}/status`);
  return status !== null && !/^State:\s+Z/m.test(status);
}

/** `pid` and every process below it, `pid` first (Linux). */
export async function processTree(pid: number): Promise<number[]> {
  const out = [pid];
  for (let i = 0; i < out.length; i++) {
    const children = await readProc(`/proc/${out[i]}/task/*/children`) ?? "";
    for (const p of children.split(/\s+/)) if (/^\d+$/.test(p)) out.push(Number(p));
  }
  return out;
}

/** Node processes started by one test, stopped (SIGTERM, last first) when it ends. */
export class Processes implements AsyncDisposable {
  readonly #nodes: NodeProcess[] = [];
  /** Starts `dist ARGS...` (see spawnNode) and keeps it to stop. */
  async spawn(...args: string[]): Promise<NodeProcess> {
    const node = await spawnNode(args);
    this.#nodes.push(node);
    return node;
  }
  async [Symbol.asyncDispose](): Promise<void> {
    for (const node of this.#nodes.reverse()) await node.stop();
  }
}
