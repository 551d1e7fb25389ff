/**
 * An executor: a Web Worker that runs a worker's tasks off its main thread, so CPU-bound
 * tasks run in parallel while the main thread keeps serving data and the scheduler.
 * Functions are compiled once per executor and kept by the id the pool gives them.
 *
 * Jobs arrive in batches and their results go back in batches: a burst of tiny tasks
 * costs one message each way, not one per task. A batch's results are not held back
 * long: whatever is done is sent every RESULT_HOLD_MS.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { toRemoteErrorInfo } from "../protocol/errors.ts";
import type { FunctionSpec } from "../protocol/ops.ts";
import { callFunction, EXECUTOR_FUNCTIONS_MAX, type Fn, loadFunction } from "./functions.ts";
import { eachBuffer, MemoryReclaimer, nbytesOf, sharedBytesOf } from "./store.ts";
import { Lru } from "../util/lru.ts";

/** One job: run function `fn` (with its spec the first time) on `args`. */
export interface Job {
  id: number;
  fn: number;
  spec?: FunctionSpec;
  args: unknown[];
  key: string;
  /**
   * Buffers of `args` from the worker's pool of received frames, by pool id: this thread
   * says when its last reference to each is gone (`returned`), or that the result kept
   * one (`shared`), so the worker reuses the memory only once nothing here can read it.
   */
  lent?: number[];
  lentBuffers?: SharedArrayBuffer[];
}

/** One job's outcome. */
export type JobResult =
  | {
    id: number;
    ok: true;
    result: unknown;
    nbytes: number;
    start: number;
    stop: number;
    /** Ids of lent buffers the result refers to: shared with it for good. */
    shared?: number[];
  }
  | {
    id: number;
    ok: false;
    error: { name: string; message: string; stack?: string };
    start?: number;
    stop?: number;
  };

/**
 * What the pool sends besides jobs: whether its worker is short of memory, to collect now,
 * or (first of all, before any task runs) the port this thread reports returned buffers on.
 */
export type PoolMessage = { pressure: boolean } | { collect: true } | { port: MessagePort };

/** What an executor thread says on its private port: its references to these lent buffers are gone. */
export type ReturnedMessage = { returned: number[] };

/** Longest a finished result waits for the rest of its batch. */
const RESULT_HOLD_MS = 2;

/** What an executor sends the pool: results, or news that a task took it down. */
export type ExecutorMessage =
  | { kind: "results"; results: JobResult[] }
  | { kind: "exit"; exited: number; id: number };

// Captured before any task runs: a task may overwrite the globals, never these.
const post = self.postMessage.bind(self);
const closeSelf = self.close.bind(self);

// Compiled functions by the pool's id. The pool mirrors this LRU: same size, touched
// once per job, in the order the jobs arrive (touched on arrival, not when they run).
const functions = new Lru<number, Promise<Fn>>(EXECUTOR_FUNCTIONS_MAX);

/** The ArrayBuffers in `value` that can be handed back without a copy. */
function transferables(value: unknown, out: Set<ArrayBuffer>, depth = 0): Set<ArrayBuffer> {
  if (depth > 64 || typeof value !== "object" || value === null) return out;
  if (ArrayBuffer.isView(value)) {
    if (value.buffer instanceof ArrayBuffer) out.add(value.buffer);
  } else if (value instanceof ArrayBuffer) out.add(value);
  else if (Array.isArray(value)) { for (const item of value) transferables(item, out, depth + 1); }
  else if (value instanceof Map) {
    for (const [k, v] of value) transferables(k, out, depth + 1), transferables(v, out, depth + 1);
  } else if (value instanceof Set) { for (const item of value) transferables(item, out, depth + 1); }
  else if (Object.getPrototypeOf(value) === Object.prototype) {
    for (const key in value) transferables((value as Record<string, unknown>)[key], out, depth + 1);
  }
  return out;
}

/**
 * The port to the pool, given before any task runs and kept where no task can reach it:
 * a task can post messages of its own, and a forged report of a returned buffer would
 * have the worker reuse memory a value still uses.
 */
let poolPort: MessagePort | null = null;
/** Lent buffers this thread may still refer to, by pool id, each watched until collected. */
let lentRefs: { id: number; ref: WeakRef<SharedArrayBuffer> }[] = [];

/** After a collection: the lent buffers no longer referred to here go back to the pool. */
function reportReturned(): void {
  if (poolPort === null || lentRefs.length === 0) return;
  const returned: number[] = [];
  lentRefs = lentRefs.filter((l) => {
    if (l.ref.deref() !== undefined) return true;
    returned.push(l.id);
    return false;
  });
  if (returned.length > 0) poolPort.postMessage({ returned } satisfies ReturnedMessage);
}

/** Watches `job`'s lent buffers; the ids of those its result refers to (shared with it for good). */
function watchLent(job: Job, result: unknown): number[] | undefined {
  const { lent, lentBuffers } = job;
  job.lentBuffers = undefined;
  if (lent === undefined || lentBuffers === undefined || lent.length !== lentBuffers.length) return undefined;
  const inResult = new Set<ArrayBufferLike>();
  if (typeof result === "object" && result !== null) eachBuffer(result, (b) => inResult.add(b));
  let shared: number[] | undefined;
  for (let i = 0; i < lent.length; i++) {
    if (inResult.has(lentBuffers[i])) (shared ??= []).push(lent[i]);
    else lentRefs.push({ id: lent[i], ref: new WeakRef(lentBuffers[i]) });
  }
  return shared;
}

async function run(job: Job, fn: Promise<Fn> | undefined): Promise<JobResult> {
  const { id, args, key } = job;
  let start: number | undefined;
  try {
    if (fn === undefined) throw new RangeError(`Executor has no function ${job.fn}`);
    const f = await fn;
    start = performance.timeOrigin + performance.now();
    const result = await callFunction(f, args);
    const stop = performance.timeOrigin + performance.now();
    // Checked here, off the main thread: what cannot travel is refused with its path.
    let nbytes: number;
    try {
      nbytes = nbytesOf(result, key);
    } catch (error) {
      throw new TypeError(`The result of ${key} cannot be kept: ${(error as Error).message}`);
    }
    const shared = watchLent(job, result);
    const done: JobResult = {
      id,
      ok: true,
      result: result === undefined ? null : result,
      nbytes,
      start,
      stop,
    };
    if (shared !== undefined) done.shared = shared;
    return done;
  } catch (error) {
    watchLent(job, undefined);
    const stop = performance.timeOrigin + performance.now();
    return {
      id,
      ok: false,
      error: toRemoteErrorInfo(error),
      start,
      stop: start === undefined ? undefined : stop,
    };
  }
}

/** Sends results; one that cannot be passed back fails alone, not its batch. */
function send(results: JobResult[], keys: Map<number, string>): void {
  const transfer = new Set<ArrayBuffer>();
  for (const r of results) if (r.ok) transferables(r.result, transfer);
  try {
    post({ kind: "results", results } satisfies ExecutorMessage, [...transfer]);
    return;
  } catch {
    // Some result does not clone (a Proxy, say): find it by sending them one by one.
  }
  for (const r of results) {
    try {
      post({ kind: "results", results: [r] } satisfies ExecutorMessage);
    } catch (error) {
      const failed: JobResult = {
        id: r.id,
        ok: false,
        error: {
          name: "DataCloneError",
          message: `The result of ${keys.get(r.id)} cannot be kept: it cannot leave the executor (${
            (error as Error).message
          })`,
        },
      };
      post({ kind: "results", results: [failed] } satisfies ExecutorMessage);
    }
  }
}

let current = 0;
/** A task that exits (Deno.exit or close) takes only its executor down, never the worker. */
function exit(code = 0): never {
  post({ kind: "exit", exited: code, id: current } satisfies ExecutorMessage);
  closeSelf();
  throw new Error(`The task ended its executor (exit code ${code})`);
}
for (const [target, name] of [[Deno, "exit"], [globalThis, "close"]] as const) {
  Object.defineProperty(target, name, { value: exit, configurable: true, writable: true });
}

// An executor is a thread of the worker's process, so whatever a task does to "its own
// process" it does to the worker and every key it holds. Deno asks no permission to
// signal the process's own pid (SIGKILL, SIGSTOP...), and `Deno[Deno.internal]` reaches
// the runtime's ops, the permission checks' bypass: both go before any task runs.
const denoKill = Deno.kill.bind(Deno);
function kill(pid: number, signal?: Deno.Signal): void {
  if (!Number.isSafeInteger(pid) || pid <= 0 || pid === Deno.pid) {
    throw new Deno.errors.NotCapable(
      `Cannot send ${signal ?? "SIGTERM"} to ${pid <= 0 ? "a process group" : `process ${pid}`}: ` +
        "tasks run inside their worker's process and may not signal it",
    );
  }
  denoKill(pid, signal);
}
/** The process's working directory is the worker's too: a task may not move it. */
function chdir(directory: string | URL): void {
  throw new Deno.errors.NotCapable(
    `Cannot change the working directory to ${directory}: tasks share it with their worker; use absolute paths`,
  );
}
for (const [name, value] of [["kill", kill], ["chdir", chdir]] as const) {
  Object.defineProperty(Deno, name, { value, configurable: false, writable: false });
}
// The worker's command line can hold its --auth-token: tasks see none of it.
Object.defineProperty(Deno, "args", { value: Object.freeze([]), configurable: false, writable: false });
delete (Deno as unknown as Record<symbol, unknown>)[(Deno as unknown as { internal: symbol }).internal];

const reclaimer = new MemoryReclaimer();
// Every collection here may end references to lent buffers: look once it is done.
reclaimer.onCollect = () => setTimeout(reportReturned, 0);
let chain = Promise.resolve();
self.addEventListener("message", (event: MessageEvent<Job[] | PoolMessage>) => {
  if (!Array.isArray(event.data)) {
    // The worker is short of memory: shared memory let go of here is collected at once.
    const m = event.data as Partial<{ pressure: boolean; collect: true; port: MessagePort }>;
    if (m?.port instanceof MessagePort && poolPort === null) {
      poolPort = m.port;
      return;
    }
    if (typeof m?.pressure === "boolean") {
      reclaimer.pressure = m.pressure;
      if (m.pressure) reclaimer.collectNow();
    }
    if (m?.collect === true) reclaimer.collectNow(true);
    return;
  }
  const jobs = event.data;
  const fns = jobs.map((job) => {
    if (job.spec) functions.set(job.fn, loadFunction(job.spec));
    return functions.get(job.fn);
  });
  // One job at a time, in arrival order, however long each awaits.
  const keys = new Map(jobs.map((job) => [job.id, job.key]));
  chain = chain.then(async () => {
    let results: JobResult[] = [];
    let since = performance.now();
    for (let i = 0; i < jobs.length; i++) {
      current = jobs[i].id;
      results.push(await run(jobs[i], fns[i]));
      if (performance.now() - since >= RESULT_HOLD_MS) {
        send(results, keys);
        results = [];
        since = performance.now();
      }
    }
    if (results.length > 0) send(results, keys);
    // The worker's shared memory these jobs read is let go here too: this isolate must
    // collect its references before the worker's frees can return the memory.
    let shared = 0;
    for (const job of jobs) shared += sharedBytesOf(job.args);
    if (shared > 0) reclaimer.freed(shared);
  });
});
