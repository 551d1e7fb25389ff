/**
 * A pool of executors (Web Workers), one task at a time each. Large typed arrays reach
 * an executor through shared memory, so neither side copies them; results come back
 * by transfer.
 *
 * @module
 */

import { CancelledError, RemoteError } from "../protocol/errors.ts";
import type { FunctionSpec } from "../protocol/ops.ts";
import { functionKey } from "../protocol/functions.ts";
import { Lru } from "../util/lru.ts";
import type { ExecutorMessage, Job as WireJob, PoolMessage, ReturnedMessage } from "./executor.ts";
import { EXECUTOR_FUNCTIONS_MAX } from "./functions.ts";
import { checkCanSpawn, ProcessExecutor } from "./executor_process.ts";

/** A task took its executor down (it called Deno.exit): the task killed its worker, in effect. */
export class ExecutorDiedError extends Error {
  /** Builds the error for task `key`. */
  constructor(key: string, reason: string) {
    super(`Task ${key} killed its executor: ${reason}`);
    this.name = "KilledWorker";
  }
}

/** A finished run: the result, its size, when it ran (epoch ms) and on which executor. */
export interface RunResult {
  result: unknown;
  nbytes: number;
  start: number;
  stop: number;
  thread: number;
}

/** Typed arrays at least this large are moved to shared memory before a task reads them. */
export const SHARE_BYTES_MIN = 64 * 1024;
/** Most tasks waiting for an executor on one worker. */
export const EXECUTOR_QUEUE_MAX = 100_000;
/** Distinct functions the pool keeps ids for. */
const FUNCTIONS_MAX = 10_000;
/** Most tasks handed to one executor at once; it runs them in turn. */
const EXECUTOR_JOBS_MAX = 256;

const EXECUTOR_URL = new URL("./executor.ts", import.meta.url).href;

interface Job {
  id: number;
  key: string;
  spec: FunctionSpec;
  args: unknown[];
  resolve: (done: RunResult) => void;
  reject: (error: Error) => void;
  /** Cancelled while next in an executor's line: it runs there, and its end is ignored. */
  dropped?: boolean;
}

/**
 * Where tasks run: `thread`, a Web Worker in the worker's process (shared memory, no
 * copies, ~14 MiB each); `process`, that same Web Worker inside a child process of its
 * own (values are copied through a pipe, a Deno process more each), so that a task that
 * exhausts its heap or crashes V8 ends its executor, never the worker and its data.
 */
export type Isolation = "thread" | "process";

/** Options of an `ExecutorPool`. */
export interface ExecutorPoolOptions {
  /** Threads or processes (default "thread"). */
  isolation?: Isolation;
  /** With `process`: each executor's JS heap limit in MiB (default: V8's). */
  heapMib?: number;
  /**
   * The worker's pool of received frames: buffers of it that arguments lend to a thread
   * are held until that thread reports its references gone (see worker/frame_pool.ts).
   */
  frames?: FrameLender;
}

/** The part of a `FramePool` that executors use. */
export interface FrameLender {
  lend(value: unknown): { ids: number[]; buffers: SharedArrayBuffer[] };
  returned(ids: readonly number[]): void;
  shared(ids: readonly number[]): void;
}

interface Executor {
  worker: Worker | ProcessExecutor;
  /** Jobs handed over and not yet answered, in order. */
  jobs: Map<number, Job>;
  /** Function ids this executor has, mirroring its own LRU (touched per job, in order). */
  known: Lru<number, true>;
  /** Pool buffers lent to it and not yet reported returned: id to count. */
  lent: Map<number, number>;
  /** Its private port for those reports (threads only). */
  port: MessagePort | null;
}

/**
 * `value` with large typed arrays (at its top level) in shared memory: a copy made
 * once, after which every executor reads the same bytes. Returns `value` itself when
 * nothing needed moving.
 */
export function shared(value: unknown): unknown {
  if (
    ArrayBuffer.isView(value) && !(value instanceof DataView) && !(value.buffer instanceof SharedArrayBuffer)
  ) {
    if (value.byteLength < SHARE_BYTES_MIN) return value;
    const ctor = value.constructor as new (b: SharedArrayBuffer) => ArrayBufferView;
    const sab = new SharedArrayBuffer(value.byteLength);
    new Uint8Array(sab).set(new Uint8Array(value.buffer, value.byteOffset, value.byteLength));
    return new ctor(sab);
  }
  return value;
}

/**
 * Checks, without starting an executor, that executors can be started with
 * `permissions`: throws when they ask for more than this process has. (Without Deno's
 * --unstable-worker-options flag, Deno ends the process here with its own message.)
 *
 * The probe hands Deno a URL that can never load: Deno checks the flag and the
 * permissions before it parses the URL, so nothing is started either way.
 */
function checkPermissions(permissions: Deno.PermissionOptions): void {
  const executor = new URL(EXECUTOR_URL);
  if (executor.protocol === "file:") {
    const path = decodeURIComponent(executor.pathname);
    if (Deno.permissions.querySync({ name: "read", path }).state !== "granted") {
      // Refused now rather than by every task later: the worker would look healthy and fail them all.
      throw new Deno.errors.NotCapable(
        `This worker cannot start its executors: it needs read access to ${path}. ` +
          "Run it with --allow-read (the dist command has it; see the README's Install)",
      );
    }
  }
  if (permissions === "inherit") return;
  let probe: Worker;
  try {
    probe = new Worker("http://[", { type: "module", deno: { permissions } } as WorkerOptions);
  } catch (error) {
    if (error instanceof URIError) return;
    throw startError(permissions, error);
  }
  probe.terminate();
}

/**
 * Says what to do when an executor could not start. Deno tells "more permissions than
 * this process has" by class (NotCapable). A missing --unstable-worker-options flag
 * cannot be told here: Deno ends the process itself, with its own message.
 */
function startError(permissions: Deno.PermissionOptions, error: unknown): Error {
  if (error instanceof Deno.errors.NotCapable) {
    return new Error(
      `The task permissions ${JSON.stringify(permissions)} ask for more than this worker process has: ` +
        "start it with the matching --allow-* flags, or grant tasks less",
      { cause: error },
    );
  }
  return error as Error;
}

/**
 * Runs functions on up to `size` executors. An executor starts when a task first needs
 * it (as a thread pool does), so a worker that only holds data, or has not been given
 * work yet, does not pay the ~14 MiB each one costs.
 */
export class ExecutorPool {
  /** One slot per thread: null until a task needs it, and again after it was stopped. */
  #executors: (Executor | null)[];
  #queue: Job[] = [];
  #nextId = 1;
  #fnIds = new Lru<string, number>(FUNCTIONS_MAX);
  #nextFnId = 1;
  #closed = false;
  #pumpScheduled = false;
  #busyMs = 0;
  #pressure = false;

  #permissions: Deno.PermissionOptions;
  #options: ExecutorPoolOptions;
  /** Executor processes ended and not yet reaped. */
  #ending = new Set<Promise<void>>();

  /**
   * A pool of `size` executors with `permissions` (default "none": no file, network,
   * env, subprocess or FFI access for tasks). Anything but "inherit" needs Deno's
   * --unstable-worker-options flag. Throws at once when the permissions cannot be
   * granted, though no executor starts before the first task.
   */
  constructor(size: number, permissions: Deno.PermissionOptions = "none", options: ExecutorPoolOptions = {}) {
    checkPermissions(permissions);
    if (
      options.isolation !== undefined && options.isolation !== "thread" && options.isolation !== "process"
    ) {
      throw new RangeError(
        `Invalid isolation ${JSON.stringify(options.isolation)}: expected "thread" or "process"`,
      );
    }
    if (options.heapMib !== undefined) {
      if (options.isolation !== "process") {
        throw new RangeError(
          "A heap limit per executor needs isolation: process (a thread shares its process's)",
        );
      }
      if (!Number.isInteger(options.heapMib) || options.heapMib < 16) {
        throw new RangeError(`Invalid heap limit ${options.heapMib} MiB: expected a whole number from 16 up`);
      }
    }
    if (options.isolation === "process") checkCanSpawn();
    this.#permissions = permissions;
    this.#options = options;
    this.#executors = Array.from({ length: size }, () => null);
  }

  /** Tasks running now. */
  get running(): number {
    return this.#executors.reduce((n, e) => n + (e?.jobs.size ?? 0), 0);
  }

  /** Resident memory of the executors in processes of their own, in bytes (0 for threads: theirs is the worker's). */
  get processBytes(): number {
    let total = 0;
    for (const e of this.#executors) if (e?.worker instanceof ProcessExecutor) total += e.worker.rss;
    return total;
  }

  /**
   * Whether the worker is short of memory: thread executors then collect the shared
   * memory they let go of at once (they hold references to the worker's values until they do).
   */
  set pressure(on: boolean) {
    if (on === this.#pressure) return;
    this.#pressure = on;
    this.#toThreads({ pressure: on });
  }

  /**
   * Stops the executor process holding the most memory, if one holds `atLeast` bytes: its
   * running task fails as its executor's death (`reason` says why), the others run
   * elsewhere. Returns the bytes it held, or 0 when none was stopped.
   */
  stopLargestProcess(atLeast: number, reason: string): number {
    let largest: Executor | null = null;
    for (const e of this.#executors) {
      if (e?.worker instanceof ProcessExecutor && e.worker.rss >= atLeast) {
        if (largest === null || e.worker.rss > (largest.worker as ProcessExecutor).rss) largest = e;
      }
    }
    if (largest === null) return 0;
    const rss = (largest.worker as ProcessExecutor).rss;
    this.#lost(largest, reason);
    // Idle, it was only let go of: its process must end all the same.
    this.#stop(largest);
    return rss;
  }

  /** Has the thread executors collect garbage now: they may hold the last references to shared memory. */
  collect(): void {
    this.#toThreads({ collect: true });
  }

  /** Tells every thread executor started (a process executor's memory is its own). */
  #toThreads(message: PoolMessage): void {
    for (const e of this.#executors) {
      if (e !== null && !(e.worker instanceof ProcessExecutor)) e.worker.postMessage(message);
    }
  }

  /** Executors started (and not stopped since). */
  get started(): number {
    return this.#executors.filter((e) => e !== null).length;
  }

  /** Milliseconds executors spent running tasks since the last call (for a CPU figure). */
  takeBusyMs(): number {
    const ms = this.#busyMs;
    this.#busyMs = 0;
    return ms;
  }

  /** Tasks waiting for an executor. */
  get queued(): number {
    return this.#queue.length;
  }

  /** Runs `spec` on `args` for `key`; resolves the result and its size. */
  run(spec: FunctionSpec, args: unknown[], key: string): Promise<RunResult> {
    if (this.#closed) return Promise.reject(new CancelledError(key, "not run: the worker is closing"));
    if (this.#queue.length >= EXECUTOR_QUEUE_MAX) {
      return Promise.reject(new RangeError(`Cannot run ${key}: ${EXECUTOR_QUEUE_MAX} tasks wait already`));
    }
    return new Promise((resolve, reject) => {
      this.#queue.push({ id: this.#nextId++, key, spec, args, resolve, reject });
      // Jobs queued in this turn go to the executors as one batch.
      if (!this.#pumpScheduled) {
        this.#pumpScheduled = true;
        queueMicrotask(() => this.#pump());
      }
    });
  }

  /**
   * Cancels `key`: a waiting run is dropped; one next in an executor's line runs there
   * and its end is ignored; a running one stops with its executor, which is replaced by
   * a fresh one. True if there was something to cancel.
   */
  cancel(key: string): boolean {
    const waiting = this.#queue.findIndex((j) => j.key === key);
    if (waiting >= 0) {
      this.#queue.splice(waiting, 1)[0].reject(new CancelledError(key));
      return true;
    }
    const i = this.#executors.findIndex((e) => e !== null && [...e.jobs.values()].some((j) => j.key === key));
    if (i < 0) return false;
    const executor = this.#executors[i]!;
    // An executor runs its jobs in order: one behind the first has not started, and is
    // short (the worker hands tasks ahead only when they are), so it is let run and its
    // end ignored rather than the executor stopped.
    const [running, ...next] = executor.jobs.values();
    const queued = next.find((j) => j.key === key && !j.dropped);
    if (running.key !== key && queued !== undefined) {
      queued.dropped = true;
      const reject = queued.reject;
      queued.resolve = queued.reject = () => {};
      reject(new CancelledError(key));
      return true;
    }
    this.#stop(executor);
    // The executor's other jobs never ran to the end: they go back to the front of the queue.
    const others: Job[] = [];
    for (const job of executor.jobs.values()) {
      if (job.key === key) job.reject(new CancelledError(key));
      else if (!job.dropped) others.push(job);
    }
    this.#queue.unshift(...others);
    this.#executors[i] = null;
    this.#pump();
    return true;
  }

  /** Stops every executor; waiting and running tasks reject. Resolves when executor processes are gone. */
  close(): Promise<void> {
    this.#closed = true;
    for (const job of this.#queue.splice(0)) {
      job.reject(new CancelledError(job.key, "not run: the worker closed"));
    }
    for (const e of this.#executors) {
      if (e === null) continue;
      this.#stop(e);
      for (const job of e.jobs.values()) {
        job.reject(new CancelledError(job.key, "stopped: the worker closed"));
      }
      e.jobs.clear();
    }
    return Promise.all(this.#ending).then(() => {});
  }

  /** Ends an executor; a process is reaped in the background (close() waits for it). */
  #stop(executor: Executor): void {
    executor.worker.terminate();
    // A thread ended holds nothing: what was lent to it is returned.
    executor.port?.close();
    executor.port = null;
    for (const [id, n] of executor.lent) this.#options.frames?.returned(Array(n).fill(id));
    executor.lent.clear();
    if (executor.worker instanceof ProcessExecutor) {
      const ending = executor.worker.closed;
      this.#ending.add(ending);
      ending.finally(() => this.#ending.delete(ending));
    }
  }

  #spawn(): Executor {
    let worker: Worker | ProcessExecutor;
    try {
      worker = this.#options.isolation === "process"
        ? new ProcessExecutor({ permissions: this.#permissions, heapMib: this.#options.heapMib })
        : new Worker(
          EXECUTOR_URL,
          this.#permissions === "inherit"
            ? { type: "module" }
            : { type: "module", deno: { permissions: this.#permissions } } as WorkerOptions,
        );
    } catch (error) {
      throw startError(this.#permissions, error);
    }
    const executor: Executor = {
      worker,
      jobs: new Map(),
      known: new Lru(EXECUTOR_FUNCTIONS_MAX),
      lent: new Map(),
      port: null,
    };
    if (!(worker instanceof ProcessExecutor) && this.#options.frames !== undefined) {
      const frames = this.#options.frames;
      const channel = new MessageChannel();
      worker.postMessage({ port: channel.port2 } satisfies PoolMessage, [channel.port2]);
      executor.port = channel.port1;
      channel.port1.onmessage = (event: MessageEvent<ReturnedMessage>) => {
        const ids = event.data?.returned;
        if (!Array.isArray(ids)) return;
        // Only what was lent to this executor, as often as it was.
        const returned = ids.filter((id) => this.#unlend(executor, id));
        if (returned.length > 0) frames.returned(returned);
      };
    }
    if (this.#pressure && !(worker instanceof ProcessExecutor)) {
      worker.postMessage({ pressure: true } satisfies PoolMessage);
    }
    if (worker instanceof ProcessExecutor) {
      worker.onexit = (reason) => this.#lost(executor, reason);
    }
    worker.onmessage = (event: { data: ExecutorMessage | { kind: "error"; message: string } }) => {
      const m = event.data;
      // An executor process relays its thread's own failure (a thread's comes as an error
      // event; a task there can post messages of its own, so it is not believed).
      if (m?.kind === "error" && typeof m.message === "string" && worker instanceof ProcessExecutor) {
        return this.#failed(executor, m.message);
      }
      // A task can post messages of its own: only the executor's two kinds count.
      if (m?.kind === "exit" && typeof m.id === "number") return this.#died(executor, m);
      if (m?.kind !== "results" || !Array.isArray(m.results)) return;
      for (const done of m.results) {
        // Even for a job let go of: the executor watches no buffer its result shares.
        if (done.ok && Array.isArray(done.shared) && done.shared.length > 0) {
          this.#sharedBy(executor, done.shared);
        }
        const job = executor.jobs.get(done.id);
        if (job === undefined) continue;
        executor.jobs.delete(done.id);
        if (done.ok) {
          this.#busyMs += done.stop - done.start;
          job.resolve({
            result: done.result,
            nbytes: done.nbytes,
            start: done.start,
            stop: done.stop,
            thread: this.#executors.indexOf(executor),
          });
        } else {
          // When it ran, for the dashboard's task stream (failed tasks show in red).
          const timing = done.start === undefined
            ? undefined
            : { start: done.start, stop: done.stop ?? done.start, thread: this.#executors.indexOf(executor) };
          job.reject(Object.assign(new RemoteError("task", done.error), { timing }));
        }
      }
      this.#pump();
    };
    if (worker instanceof Worker) {
      worker.onerror = (event: ErrorEvent) => {
        event.preventDefault();
        this.#failed(executor, event.message);
      };
    }
    return executor;
  }

  /**
   * Lent buffers a result refers to: never reused, and the executor's lends of them end
   * here (it watches them no longer). A forged report can only keep memory from reuse.
   */
  #sharedBy(executor: Executor, ids: readonly unknown[]): void {
    const frames = this.#options.frames;
    if (frames === undefined) return;
    const mine = ids.filter((id): id is number => typeof id === "number" && this.#unlend(executor, id));
    frames.shared(mine);
    frames.returned(mine);
  }

  /** Counts one lend of `id` to `executor` as returned; false if it had none. */
  #unlend(executor: Executor, id: number): boolean {
    const n = executor.lent.get(id);
    if (n === undefined) return false;
    if (n > 1) executor.lent.set(id, n - 1);
    else executor.lent.delete(id);
    return true;
  }

  /** The executor itself broke (not the task's function): its jobs fail, and it is replaced. */
  #failed(executor: Executor, message: string): void {
    const i = this.#executors.indexOf(executor);
    this.#stop(executor);
    for (const job of executor.jobs.values()) {
      job.reject(new Error(`The executor failed: ${message}`));
    }
    executor.jobs.clear();
    if (i >= 0 && !this.#closed) {
      this.#executors[i] = null;
      this.#pump();
    }
  }

  /**
   * An executor process died by itself (out of memory, a signal): the job it was running,
   * its first (it runs them in order), killed it; the others run elsewhere.
   */
  #lost(executor: Executor, reason: string): void {
    const [running] = executor.jobs.values();
    if (running === undefined) {
      // Idle when it died: nothing to blame; the slot starts afresh when needed.
      const i = this.#executors.indexOf(executor);
      if (i >= 0) this.#executors[i] = null;
      return;
    }
    this.#died(executor, { exited: -1, id: running.id }, reason);
  }

  /** An executor's task called Deno.exit, or killed its process: that task fails, the others run elsewhere. */
  #died(executor: Executor, exit: { exited: number; id: number }, reason?: string): void {
    const i = this.#executors.indexOf(executor);
    this.#stop(executor);
    const others: Job[] = [];
    for (const job of executor.jobs.values()) {
      if (job.id === exit.id) {
        job.reject(
          new ExecutorDiedError(
            job.key,
            reason ?? `it ended its executor (Deno.exit or close, code ${exit.exited})`,
          ),
        );
      } else if (!job.dropped) others.push(job);
    }
    executor.jobs.clear();
    this.#queue.unshift(...others);
    if (i >= 0 && !this.#closed) {
      this.#executors[i] = null;
      this.#pump();
    }
  }

  /** Starts an executor; when that fails, every waiting task fails with the reason. */
  #spawnOrFail(): Executor | null {
    try {
      return this.#spawn();
    } catch (error) {
      for (const job of this.#queue.splice(0)) job.reject(error as Error);
      return null;
    }
  }

  /** Hands waiting jobs to executors with room, least busy first, one message each. */
  #pump(): void {
    this.#pumpScheduled = false;
    if (this.#closed) return;
    while (this.#queue.length > 0) {
      // The least busy slot with room; an idle executor before one not started yet.
      let slot = -1;
      let best = Infinity;
      for (let i = 0; i < this.#executors.length; i++) {
        const e = this.#executors[i];
        const load = e === null ? 1 : 2 * e.jobs.size;
        if (load < best && (e === null || e.jobs.size < EXECUTOR_JOBS_MAX)) [slot, best] = [i, load];
      }
      if (slot < 0) return;
      const target = this.#executors[slot] ?? (this.#executors[slot] = this.#spawnOrFail());
      if (target === null) return;
      // Fill the least busy executor up to its share, then look again.
      const share = Math.max(
        1,
        Math.min(
          EXECUTOR_JOBS_MAX - target.jobs.size,
          Math.ceil(this.#queue.length / this.#executors.length),
        ),
      );
      const batch = this.#queue.splice(0, share);
      const frames = target.port === null ? undefined : this.#options.frames;
      const lentNow: number[] = [];
      const wire: WireJob[] = batch.map((job) => {
        const k = functionKey(job.spec);
        let fn = this.#fnIds.get(k);
        if (fn === undefined) this.#fnIds.set(k, fn = this.#nextFnId++);
        const message: WireJob = { id: job.id, fn, args: job.args, key: job.key };
        if (target.known.get(fn) === undefined) {
          target.known.set(fn, true);
          message.spec = job.spec;
        }
        if (frames !== undefined) {
          const { ids, buffers } = frames.lend(job.args);
          if (ids.length > 0) {
            message.lent = ids;
            message.lentBuffers = buffers;
            for (const id of ids) target.lent.set(id, (target.lent.get(id) ?? 0) + 1);
            lentNow.push(...ids);
          }
        }
        return message;
      });
      try {
        target.worker.postMessage(wire);
        for (const job of batch) target.jobs.set(job.id, job);
      } catch (error) {
        // Not sent: nothing was lent.
        const returned = lentNow.filter((id) => this.#unlend(target, id));
        if (returned.length > 0) frames?.returned(returned);
        // Values in a worker's store came from the wire or an executor, so they clone;
        // should one not, the batch fails and the executor (whose function LRU no longer
        // matches ours) is replaced.
        for (const job of batch) {
          job.reject(
            new TypeError(
              `Cannot pass the arguments of ${job.key} to an executor: ${(error as Error).message}`,
            ),
          );
        }
        this.#stop(target);
        for (const job of target.jobs.values()) this.#queue.unshift(job);
        target.jobs.clear();
        this.#executors[slot] = null;
      }
    }
  }
}
