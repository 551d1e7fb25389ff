/**
 * The scheduler's state: every key as a task in a state machine, every worker with
 * what it holds and runs. It does no I/O and reads no clock: events come in as method
 * calls (with `now` where time matters), and what must be said to workers and clients
 * comes out as messages for the server shell to send.
 *
 *     released -> waiting -> queued -> processing -> memory -> released -> forgotten
 *                     \________________/     \-> erred
 *
 * @module
 */

import type { RemoteErrorInfo } from "../protocol/errors.ts";
import {
  type ArgsOf,
  type ClientOps,
  type FunctionSpec,
  type GraphTask,
  KNOWN_FUNCTIONS_MAX,
  type WorkerInfo,
  type WorkerOps,
} from "../protocol/ops.ts";
import { Lru } from "../util/lru.ts";
import { type Move, NONE, Story, withItem } from "../util/story.ts";
import { functionKey } from "../protocol/functions.ts";
import { MEMORY_TARGET_FRACTION, NO_WORKERS_TIMEOUT_MS, UNCLAIMED_GRACE_MS } from "../util/defaults.ts";

export { NO_WORKERS_TIMEOUT_MS, UNCLAIMED_GRACE_MS };

/** Most task kinds (prefixes) whose progress the scheduler counts. */
export const PREFIXES_MAX = 1_000;
/** Most distinct functions the scheduler keeps ids for; the least recently used go first. */
export const FUNCTIONS_MAX = 10_000;

/** The states a task moves through. */
export type TaskStateName =
  | "released"
  | "waiting"
  | "queued"
  | "processing"
  | "memory"
  | "erred"
  | "forgotten";

/**
 * The moves a task may make, from each state. A move to the state a task is in already
 * is no move (nothing happens). Anything else goes through `#to`, which throws on a move
 * not listed here: a bug in the scheduler, caught where it happens.
 */
export const TASK_TRANSITIONS: Readonly<Record<TaskStateName, readonly TaskStateName[]>> = {
  released: ["waiting", "queued", "processing", "memory", "erred", "forgotten"],
  waiting: ["queued", "processing", "memory", "released", "erred", "forgotten"],
  queued: ["processing", "waiting", "memory", "released", "erred", "forgotten"],
  processing: ["memory", "waiting", "released", "erred", "forgotten"],
  memory: ["released", "forgotten"],
  // A task that errs again is a new task (the old one is forgotten); a worker may still
  // report the key in memory.
  erred: ["memory", "forgotten"],
  forgotten: [],
};

const KEYS_OF_STATES = Object.keys(TASK_TRANSITIONS) as TaskStateName[];

/** Moves the scheduler's story keeps, for all keys together (a ring: the oldest go first). */
export const SCHEDULER_STORY_MAX = 50_000;
/** Problems kept per worker, and characters of each: a worker says them, the scheduler only shows them. */
const PROBLEMS_MAX = 5;
const PROBLEM_CHARS_MAX = 500;

/** One move in a task's story (`time`: the latest time the scheduler was given, `at`). */
export type TaskStoryEvent = Move<TaskStateName>;

/** What a worker is asked to run. */
export interface TaskRun {
  /** The function to call. */
  function: FunctionSpec;
  /** Positional arguments; `Ref`s stand for dependencies' values. */
  args: unknown[];
}

/**
 * A task as a client submits it: `GraphTask` (the wire's, whose fields it shares) with
 * its function resolved; no `run` for a key that is data only.
 */
export type TaskSpec = Omit<GraphTask, "fn" | "args"> & { run?: TaskRun };

/** One key and everything the scheduler knows of it. */
export interface TaskState {
  readonly key: string;
  /** The key's prefix (the function name), for progress per kind of task. */
  readonly prefix: string;
  state: TaskStateName;
  run: TaskRun | null;
  dependencies: Set<TaskState>;
  dependents: Set<TaskState>;
  /** Dependencies not yet in memory, while waiting. */
  waitingOn: Set<TaskState>;
  /** Dependents that still need this task's value. */
  waiters: Set<TaskState>;
  whoHas: Set<WorkerState>;
  processingOn: WorkerState | null;
  /** Clients holding a future for it. */
  whoWants: Set<string>;
  /** Data put on a worker outside any graph (update_data): kept until deleted. */
  external: boolean;
  /** Lower runs first: minus the user's priority, then `order`. */
  rank: number;
  /** Submission order: among equal ranks, earlier runs first. */
  order: number;
  retries: number;
  restrictions: Set<string> | null;
  nbytes: number;
  error: RemoteErrorInfo | null;
  /** Workers that died (or whose executor died) while running it. */
  suspicious: number;
  /** The key whose failure this task inherited. */
  erredOn: string | null;
}

/** A worker as the scheduler knows it. */
export interface WorkerState {
  readonly address: string;
  readonly name: string;
  readonly nthreads: number;
  /** Tasks sent to it and not finished, each with the microseconds of work it was counted as when sent. */
  readonly processing: Map<TaskState, number>;
  /** The work of `processing`, in microseconds: the sum of its values. */
  occupancyUs: number;
  readonly hasWhat: Set<TaskState>;
  nbytes: number;
  /**
   * Function ids this worker has been sent in full, as an LRU the worker mirrors: both
   * touch an id on every compute_task, in the same order, so both forget the same ids.
   */
  knownFunctions: Lru<number, true>;
  /** When it was last heard from (registration or heartbeat), in ms. */
  lastSeen: number;
  /** Its latest heartbeat's figures. */
  metrics: Record<string, number>;
  /** What its latest heartbeat said is wrong on it, at most PROBLEMS_MAX of PROBLEM_CHARS_MAX each. */
  problems: string[];
  /** Paused by memory (its heartbeat says `paused: 1`): it is sent no new task until it resumes. */
  paused: boolean;
}

/** A message the shell must send: a notice of `workerOps` to a worker or of `clientOps` to a client. */
export type Outgoing =
  | {
    [K in WorkerNotice]: { to: "worker"; address: string; op: K; args: ArgsOf<WorkerOps, K> };
  }[WorkerNotice]
  | {
    [K in keyof ClientOps]: { to: "client"; client: string; op: K; args: ArgsOf<ClientOps, K> };
  }[keyof ClientOps];

/** The notices the scheduler sends workers about their tasks. */
type WorkerNotice = "compute_task" | "free_keys" | "cancel_task";

/** What a worker gets to run one task: the `compute_task` notice, as `workerOps` declares it. */
export type ComputeTaskArgs = ArgsOf<WorkerOps, "compute_task">;

/** The holders of a task with no dependencies: one object for all (it is only encoded). */
const NO_HOLDERS: Record<string, string[]> = Object.freeze({});

/**
 * Tasks a worker always may hold beyond its threads, whatever they take: it never waits
 * on a round trip for its next task, and it has work of its own to go on with while its
 * memory is full (a job of 4 GiB on two workers of 512 MiB ran in 6.3-7.1 s with these
 * and in 10.7-11.6 s when tasks of ~30 ms went one at a time).
 */
export const WORKER_EXTRA_TASKS = 32;
/**
 * Work (ms, by the average run of each task's kind) a worker may hold per thread beyond
 * what its threads run, past `WORKER_EXTRA_TASKS`: a burst of tiny tasks travels and runs
 * in batches (one message, one read, one executor post for hundreds), ~500 a thread.
 */
export const WORKER_AHEAD_MS = 25;
/**
 * What a task is counted as at least (us): what a worker spends on one besides running
 * its function (receiving it, handing it to an executor, reporting it), ~40-50 us here.
 * So tiny tasks fill a thread's `WORKER_AHEAD_MS` with ~500, not with thousands.
 */
export const TASK_OVERHEAD_US = 50;
/** Most tasks a worker holds per thread, however short they are. */
export const WORKER_TASKS_PER_THREAD_MAX = 1_000;

/**
 * How many tasks of `workUs` each (as counted: at least TASK_OVERHEAD_US) a worker of
 * `nthreads` holds at most: `WORKER_EXTRA_TASKS` beyond its threads, or as many as fit in
 * `WORKER_AHEAD_MS` per thread beyond one each, whichever is more. Tasks of different
 * kinds share the same budget.
 */
export function tasksPerWorker(nthreads: number, workUs: number): number {
  const us = Math.max(TASK_OVERHEAD_US, workUs);
  const fit = Math.floor((nthreads * (WORKER_AHEAD_MS * 1000 + us)) / us);
  return Math.max(nthreads + WORKER_EXTRA_TASKS, Math.min(nthreads * WORKER_TASKS_PER_THREAD_MAX, fit));
}
/**
 * Most tasks one turn checks for release and forgetting; the rest of a large release
 * waits for `continueReleases()`. Forgetting a 1M-task graph at once kept the scheduler
 * from everything else for ~2.5 s.
 */
export const RELEASE_STEPS_PER_TURN = 50_000;
/** Assumed bytes per second between workers when weighing a transfer against load. */
const BANDWIDTH_BYTES_PER_S = 500e6;
/** Assumed duration of a task whose kind has not finished once yet. */
export const DEFAULT_DURATION_S = 0.001;
/** Seconds of work per thread that `desiredWorkers` aims at (Dask's adaptive target duration). */
const ADAPTIVE_TARGET_S = 5;
/** What `desiredWorkers` assumes a kind of task takes before one has finished (as Dask does). */
const UNKNOWN_DURATION_S = 0.5;

/** The prefix of a key: its text before the last "-", as Dask names task kinds. */
export function keyPrefix(key: string): string {
  const dash = key.lastIndexOf("-");
  return dash > 0 ? key.slice(0, dash) : key;
}

/**
 * A task's rank for a user's priority: never -0, which is not a small integer to V8: one
 * such value would make every task's rank a boxed number (16 bytes more each).
 */
function rankOf(priority: number | undefined): number {
  return priority ? -priority : 0;
}

function less(a: TaskState, b: TaskState): boolean {
  return a.rank < b.rank || (a.rank === b.rank && a.order < b.order);
}

/** Min-heap of tasks by priority. */
class TaskHeap {
  #items: TaskState[] = [];
  get size(): number {
    return this.#items.length;
  }
  static #less(a: TaskState, b: TaskState): boolean {
    return a.rank < b.rank || (a.rank === b.rank && a.order < b.order);
  }
  push(t: TaskState): void {
    const items = this.#items;
    items.push(t);
    let i = items.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!TaskHeap.#less(items[i], items[parent])) break;
      [items[i], items[parent]] = [items[parent], items[i]];
      i = parent;
    }
  }
  peek(): TaskState | undefined {
    return this.#items[0];
  }
  /** Every entry, stale ones too (a task popped later, or queued twice), in no order. */
  entries(): readonly TaskState[] {
    return this.#items;
  }
  pop(): TaskState | undefined {
    const items = this.#items;
    const top = items[0];
    const last = items.pop();
    if (items.length > 0 && last !== undefined) {
      items[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1, r = l + 1;
        let m = i;
        if (l < items.length && TaskHeap.#less(items[l], items[m])) m = l;
        if (r < items.length && TaskHeap.#less(items[r], items[m])) m = r;
        if (m === i) break;
        [items[i], items[m]] = [items[m], items[i]];
        i = m;
      }
    }
    return top;
  }
}

/** Counts of tasks per prefix and state, for progress. */
export type Progress = Record<string, Partial<Record<TaskStateName, number>>>;

/** A prefix's tasks per state, and all of them: one shape for every prefix (never a dictionary). */
type PrefixCounts = Record<TaskStateName, number> & {
  total: number;
  /** The prefix itself: its tasks share this one string rather than a copy each. */
  name: string;
};

/** No task in any state. */
function noTasks(): Record<TaskStateName, number> {
  return { released: 0, waiting: 0, queued: 0, processing: 0, memory: 0, erred: 0, forgotten: 0 };
}

function newPrefixCounts(name: string): PrefixCounts {
  return { ...noTasks(), total: 0, name };
}

/** Problem lines shown at most (the dashboard, dist info): more are counted. */
const PROBLEMS_SHOWN_MAX = 10;

/** "1 task", "3 tasks". */
function plural(n: number, noun: string): string {
  return `${n.toLocaleString("en-US")} ${noun}${n === 1 ? "" : "s"}`;
}

/** The scheduler's tasks and workers. */
export class SchedulerTasks {
  readonly tasks = new Map<string, TaskState>();
  readonly workers = new Map<string, WorkerState>();
  /** Average seconds per task kind, from tasks that finished. */
  readonly durations = new Map<string, number>();
  /** Deaths a task may cause (workers or executors lost while running it) before it fails. */
  allowedFailures = 3;
  /** How long (ms) tasks may wait with no worker to run them before they fail. */
  noWorkersTimeoutMs = NO_WORKERS_TIMEOUT_MS;
  /** How long (ms) keys a registering worker brings back are kept for a client to claim them. */
  unclaimedGraceMs = UNCLAIMED_GRACE_MS;
  /**
   * Until when (ms) a key a client asks for, and nobody has, is waited for rather than
   * failed: a scheduler that just started may not have heard yet from the worker that
   * holds it. The shell sets it to its start plus the grace; 0 (no wait) by default.
   */
  recoveringUntil = 0;
  /** Tasks that reached memory or erred, in all. */
  completed = 0;
  failed = 0;
  /**
   * Queued tasks without restrictions. Entries go stale instead of being removed: a task
   * is in the queue while it is queued and has no restrictions (no Set of them: ~40 bytes
   * a task), and the heap skips the others when they come to its top.
   */
  #queue = new TaskHeap();
  /** Queued tasks that may run only on some workers. */
  #restricted = new Set<TaskState>();
  #order = 0;
  /** Tasks finished and failed per prefix while the prefix has tasks (bounded: the least recent kinds go). */
  #finished = new Lru<string, { done: number; erred: number }>(PREFIXES_MAX);
  #out: Outgoing[] = [];
  /** The latest message in `#out` for each worker: frees that follow it join it. */
  #lastToWorker = new Map<string, Outgoing>();
  #roundRobin = 0;
  #functions = new Lru<string, number>(FUNCTIONS_MAX);
  #nextFunctionId = 1;
  /** Tasks still to check for release or forgetting, and the checks made this turn. */
  #releases: TaskState[] = [];
  #releaseSteps = 0;
  /** Keys workers brought back that nobody had claimed, and when they stop being kept for a claim (ms). */
  #unclaimed = new Map<TaskState, number>();
  /** Keys asked for while recovering that no worker has brought back yet. */
  #awaited = new Set<TaskState>();
  /** Since when (ms) queued tasks have had no worker at all; null while there are workers. */
  #noWorkersSince: number | null = null;
  /** Since when (ms) each restricted queued task has had no worker it may run on. */
  #unrunnableSince = new Map<TaskState, number>();
  /** Restricted tasks queued since the last tick, to look at then (all of them after a worker left). */
  #restrictedToCheck = new Set<TaskState>();
  #workerLeft = false;
  /**
   * What is wrong with the queue, in words, as of the last tick: tasks no worker may run
   * (grouped by restriction), or tasks queued with no worker at all. The dashboard and
   * `dist info` show it; new lines go to `notices` for the log.
   */
  problems: string[] = [];
  /** Problem groups already told of: each is logged once while it lasts. */
  #toldProblems = new Set<string>();
  /** Lines for the shell to log as warnings (drained by `drainNotices`). */
  #notices: string[] = [];
  /** Workers that asked to retire and have not left yet: retirePlan moves nothing to them. */
  #retiring = new Set<string>();
  /** Tasks per state, kept by the gate. */
  readonly #byState: Record<TaskStateName, number> = noTasks();
  /** Tasks per prefix and state, kept by the gate (a prefix with none goes). */
  readonly #byPrefix = new Map<string, PrefixCounts>();
  readonly #story = new Story<TaskStateName>(SCHEDULER_STORY_MAX);
  #now = 0;

  /**
   * The messages produced since the last call, to be sent by the shell. It also ends the
   * turn: the next one may check another `RELEASE_STEPS_PER_TURN` tasks for release.
   */
  drain(): Outgoing[] {
    const out = this.#out;
    this.#out = [];
    this.#lastToWorker.clear();
    this.#releaseSteps = 0;
    return out;
  }

  /** True while a large release has work left: the shell calls `continueReleases()` in a later turn. */
  get releasesPending(): boolean {
    return this.#releases.length > 0;
  }

  /**
   * Goes on with a large release, for up to a turn's worth of tasks; true while some is
   * left. Every task is checked again when its turn comes: a key wanted meanwhile stays.
   */
  continueReleases(): boolean {
    this.#releaseSteps = 0;
    this.#runReleases();
    return this.#releases.length > 0;
  }

  /**
   * The id of a function in the function table. The table keeps a digest of each
   * function, not its text: a client sending thousands of large functions does not
   * fill the scheduler's memory (each task's spec goes with the task).
   */
  functionId(spec: FunctionSpec): number {
    const k = functionKey(spec);
    let id = this.#functions.get(k);
    // Ids are never reused: a function forgotten and seen again gets a new one.
    if (id === undefined) this.#functions.set(k, id = this.#nextFunctionId++);
    return id;
  }

  // ---- workers ----

  /** Adds a worker holding `keys`; queued tasks may go to it at once. */
  addWorker(
    w: {
      address: string;
      name?: string;
      nthreads?: number;
      keys?: string[];
      nbytes?: Record<string, number>;
      /** Of `keys`, those that are the worker's own data (update_data, compute): kept until deleted. */
      external?: string[];
    },
    now = 0,
  ): void {
    if (this.workers.has(w.address)) this.removeWorker(w.address, false);
    const ws: WorkerState = {
      address: w.address,
      name: w.name || w.address,
      nthreads: w.nthreads ?? 1,
      processing: new Map(),
      occupancyUs: 0,
      hasWhat: new Set(),
      nbytes: 0,
      knownFunctions: new Lru(KNOWN_FUNCTIONS_MAX),
      lastSeen: now,
      metrics: {},
      problems: [],
      paused: false,
    };
    this.workers.set(w.address, ws);
    // Tasks that can run here waited for a worker that came: their wait starts over.
    this.#noWorkersSince = null;
    for (const [ts] of this.#unrunnableSince) if (this.#allowed(ts, ws)) this.#unrunnableSince.delete(ts);
    const keys = w.keys ?? [];
    // Keys the scheduler does not know came from an earlier life (a restart, a worker
    // that was given up on): the worker's own data stays; the rest is kept only for a
    // client to claim within the grace, then freed.
    const external = new Set(w.external ?? []);
    const unclaimed = keys.filter((key) => !this.tasks.has(key) && !external.has(key));
    this.addKeys(w.address, keys, w.nbytes);
    for (const key of unclaimed) {
      const ts = this.tasks.get(key);
      if (ts === undefined || !ts.external) continue;
      ts.external = false;
      this.#unclaimed.set(ts, now + this.unclaimedGraceMs);
    }
    this.#fill(ws);
  }

  /**
   * Removes a worker: its running tasks run elsewhere, keys it held alone are
   * recomputed where wanted (or reported lost when they have no lineage). When it
   * `died` (its connection dropped, it stopped answering), each task it was running
   * counts a death; a task that has seen more than `allowedFailures` deaths fails
   * with KilledWorker instead of killing another worker. Returns the keys that lost
   * their last copy.
   */
  removeWorker(address: string, died = true): string[] {
    const ws = this.workers.get(address);
    if (ws === undefined) return [];
    this.workers.delete(address);
    this.#retiring.delete(address);
    this.#workerLeft = true;
    const lost: string[] = [];
    const killed: TaskState[] = [];
    for (const ts of ws.processing.keys()) {
      ts.processingOn = null;
      this.#to(ts, "released", "its worker left");
      if (died && ++ts.suspicious > this.allowedFailures) killed.push(ts);
    }
    for (const ts of killed) {
      this.#unassign(ws, ts);
      this.failed++;
      this.#err(ts, killedWorker(ts, this.allowedFailures), ts.key);
    }
    const rerun = [...ws.processing.keys()];
    ws.processing.clear();
    ws.occupancyUs = 0;
    for (const ts of ws.hasWhat) {
      ts.whoHas.delete(ws);
      if (ts.whoHas.size === 0 && ts.state === "memory") {
        lost.push(ts.key);
        this.#lose(ts, `its last copy was on ${address}, which left`);
      }
    }
    ws.hasWhat.clear();
    for (const ts of rerun) {
      if (ts.state !== "released") continue;
      if (ts.whoWants.size === 0 && ts.waiters.size === 0) this.#maybeRelease(ts);
      else this.#ready(ts);
    }
    return lost;
  }

  // ---- keys reported by workers (the rpc path) ----

  /**
   * Records that `address` holds `keys`; unknown keys become external data, except
   * `replicas` (copies a worker fetched for a task): one the scheduler has forgotten
   * meanwhile is freed on that worker instead.
   */
  addKeys(
    address: string,
    keys: readonly string[],
    nbytes: Record<string, number> = {},
    replicas = false,
  ): void {
    const ws = this.#worker(address);
    for (const key of keys) {
      let ts = this.tasks.get(key);
      if (ts === undefined && replicas) {
        this.#freeOn(address, key);
        continue;
      }
      if (ts === undefined) {
        ts = this.#newTask(key);
        ts.external = true;
      }
      const size = nbytes[key] ?? ts.nbytes;
      for (const h of ts.whoHas) h.nbytes += size - ts.nbytes;
      ts.nbytes = size;
      if (!ws.hasWhat.has(ts)) ws.nbytes += size;
      ws.hasWhat.add(ts);
      ts.whoHas = withItem(ts.whoHas, ws);
      if (ts.state !== "memory" && ts.state !== "processing") {
        this.#unqueue(ts);
        this.#toMemory(ts);
      }
    }
  }

  /** Records that `address` no longer holds `keys`. */
  removeKeys(address: string, keys: readonly string[]): void {
    const ws = this.#worker(address);
    for (const key of keys) {
      const ts = this.tasks.get(key);
      if (ts === undefined || !ws.hasWhat.delete(ts)) continue;
      ws.nbytes -= ts.nbytes;
      ts.whoHas.delete(ws);
      if (ts.whoHas.size === 0 && ts.state === "memory") {
        if (ts.external && ts.run === null && ts.whoWants.size === 0) this.#forget(ts);
        else this.#lose(ts, `${address} deleted it`);
      }
    }
  }

  /**
   * Forgets `keys` everywhere (the delete_data op), cancelling what depends on them.
   * Returns, per worker, the keys it must delete: the shell tells each holder and
   * waits for it, so the data is gone when the op replies.
   */
  deleteKeys(keys: readonly string[]): Map<string, string[]> {
    const orders = new Map<string, string[]>();
    for (const key of keys) {
      const ts = this.tasks.get(key);
      if (ts === undefined) continue;
      for (const ws of ts.whoHas) {
        let list = orders.get(ws.address);
        if (list === undefined) orders.set(ws.address, list = []);
        list.push(key);
        ws.hasWhat.delete(ts);
        ws.nbytes -= ts.nbytes;
      }
      ts.whoHas.clear();
      this.#cancel(ts, "deleted");
    }
    return orders;
  }

  // ---- graphs from clients ----

  /**
   * Adds tasks from `client` and marks `wanted` as wanted by it. A key that exists
   * already (and has not failed) is shared, not run again: `pure` submits land here.
   */
  updateGraph(client: string, specs: readonly TaskSpec[], wanted: readonly string[], now = 0): void {
    const recovering = now < this.recoveringUntil;
    const fresh: TaskState[] = [];
    /** Tasks whose dependencies this graph names: the fresh ones, and data given lineage. */
    const linked: TaskState[] = [];
    /** Each key's last place in `specs` (a key sent twice counts as its last). */
    const at = new Map<string, number>();
    for (let i = 0; i < specs.length; i++) at.set(specs[i].key, i);
    refuseCycles(specs, at, this.tasks);
    for (const spec of specs) {
      let ts = this.tasks.get(spec.key);
      if (ts !== undefined && ts.state !== "erred" && ts.state !== "forgotten") {
        if (ts.run === null && spec.run && ts.dependencies.size === 0) {
          // Data a worker brought back (after a scheduler restart) that a client's task
          // defines: it has lineage and an owner again, so reference counts apply, and
          // it can be recomputed if lost.
          ts.run = spec.run;
          ts.external = false;
          ts.rank = rankOf(spec.priority);
          ts.retries = spec.retries ?? 0;
          ts.restrictions = spec.workers?.length ? new Set(spec.workers) : null;
          linked.push(ts);
        }
        continue;
      }
      // A failed (or forgotten) key submitted again runs again, for everyone who wanted it.
      const wants = ts?.whoWants ?? [];
      if (ts !== undefined) this.#forget(ts, true);
      ts = this.#newTask(spec.key);
      for (const c of wants) ts.whoWants = withItem(ts.whoWants, c);
      ts.run = spec.run ?? null;
      ts.rank = rankOf(spec.priority);
      ts.order = this.#order++;
      ts.retries = spec.retries ?? 0;
      ts.restrictions = spec.workers?.length ? new Set(spec.workers) : null;
      fresh.push(ts);
      linked.push(ts);
    }
    for (const ts of linked) {
      for (const dep of specs[at.get(ts.key)!].deps) {
        let d = this.tasks.get(dep);
        if (d === undefined && recovering) {
          // Just restarted: a worker may still bring it back.
          d = this.#newTask(dep);
          this.#awaited.add(d);
        } else if (d === undefined) {
          // A dependency nobody can produce: the task fails at once, saying which.
          d = this.#newTask(dep);
          this.#to(d, "erred", "an input nobody can produce");
          d.error = {
            name: "MissingDataError",
            message: `Unknown key ${JSON.stringify(dep)}: no task or data has it`,
          };
          d.erredOn = dep;
        }
        ts.dependencies = withItem(ts.dependencies, d);
        d.dependents = withItem(d.dependents, ts);
      }
    }
    for (const key of wanted) {
      let ts = this.tasks.get(key);
      if (ts === undefined && recovering) {
        // Data the client holds (scattered) whose worker has not registered again yet.
        ts = this.#newTask(key);
        this.#awaited.add(ts);
      }
      if (ts === undefined) continue;
      ts.whoWants = withItem(ts.whoWants, client);
      if (ts.state === "memory") this.#tellDone(ts, client);
      else if (ts.state === "erred") this.#tellErred(ts, client);
    }
    // A task of this graph that is an input of another runs when something needs it, not
    // on its own: a restarted client's lineage is not run again when what it leads to
    // is back in memory. Other tasks run even unwanted (fire and forget). A fresh task's
    // dependents are all of this graph: it is an input here exactly when it has some.
    for (const ts of fresh) {
      if (ts.state === "released" && (ts.whoWants.size > 0 || ts.dependents.size === 0)) this.#want(ts);
    }
    // A key waited for as an unknown input (just after a start) that this graph defines:
    // what waits for it needs it computed now.
    for (const ts of linked) if (ts.state === "released" && ts.waiters.size > 0) this.#want(ts);
    for (const key of wanted) {
      const ts = this.tasks.get(key);
      if (ts !== undefined && ts.state === "released") this.#want(ts);
    }
    for (const ts of fresh) if (ts.state === "released") this.#maybeRelease(ts);
  }

  /** `client` drops its futures for `keys`; keys nobody needs are released. */
  releaseKeys(client: string, keys: readonly string[]): void {
    for (const key of keys) {
      const ts = this.tasks.get(key);
      if (ts === undefined || !ts.whoWants.delete(client)) continue;
      this.#maybeRelease(ts);
    }
  }

  /** Cancels `keys` (and what depends on them) for every client. */
  cancelKeys(keys: readonly string[]): void {
    for (const key of keys) {
      const ts = this.tasks.get(key);
      if (ts !== undefined) this.#cancel(ts, "cancelled");
    }
  }

  /** Forgets every want of a client that disconnected. */
  removeClient(client: string): void {
    for (const ts of [...this.tasks.values()]) {
      if (ts.whoWants.delete(client)) this.#maybeRelease(ts);
    }
  }

  // ---- events from workers ----

  /** A worker finished `key`, holding `nbytes`; `durationS` feeds the load estimate. */
  taskFinished(address: string, key: string, nbytes: number, durationS: number): void {
    const ws = this.workers.get(address);
    const ts = this.tasks.get(key);
    if (ws === undefined) return;
    if (ts === undefined || ts.processingOn !== ws) {
      // A result no one waits for from this worker (the task was released or moved
      // meanwhile, or a restarted scheduler never knew it): the worker lets it go, or it
      // would hold it for good.
      if (ts === undefined || !ws.hasWhat.has(ts)) this.#freeOn(address, key);
      return;
    }
    this.#unassign(ws, ts);
    const avg = this.durations.get(ts.prefix);
    this.durations.set(ts.prefix, avg === undefined ? durationS : avg * 0.8 + durationS * 0.2);
    for (const h of ts.whoHas) if (h !== ws) h.nbytes += nbytes - ts.nbytes;
    if (ws.hasWhat.has(ts)) ws.nbytes += nbytes - ts.nbytes;
    else ws.nbytes += nbytes;
    ts.nbytes = nbytes;
    ws.hasWhat.add(ts);
    ts.whoHas = withItem(ts.whoHas, ws);
    this.completed++;
    this.#count(ts.prefix, "done");
    this.#toMemory(ts);
    this.#fill(ws);
  }

  /**
   * A worker's run of `key` threw `error`; `killed` when the task took its executor
   * down with it (Deno.exit): that counts as a death, like a worker that died running it.
   */
  taskErred(address: string, key: string, error: RemoteErrorInfo, killed = false): void {
    const ws = this.workers.get(address);
    const ts = this.tasks.get(key);
    if (ws === undefined || ts === undefined || ts.processingOn !== ws) return;
    this.#unassign(ws, ts);
    if (killed) {
      if (++ts.suspicious > this.allowedFailures) {
        this.failed++;
        this.#err(ts, killedWorker(ts, this.allowedFailures, error.message), ts.key);
      } else {
        this.#to(ts, "released", "its worker died running it; run again");
        this.#ready(ts);
      }
    } else if (ts.retries > 0) {
      ts.retries--;
      this.#to(ts, "released", "its worker died running it; run again");
      this.#ready(ts);
    } else {
      this.failed++;
      this.#err(ts, error, ts.key);
    }
    this.#fill(ws);
  }

  /**
   * A worker could not fetch `missing` inputs of `key` from the holders it was given:
   * those copies are gone. They are dropped from `who_has` (recomputed if that was the
   * last copy) and the task runs again once its inputs are back, up to
   * `allowedFailures` times.
   */
  missingData(address: string, key: string, missing: Record<string, string[]>): void {
    const ws = this.workers.get(address);
    const ts = this.tasks.get(key);
    if (ws === undefined || ts === undefined || ts.processingOn !== ws) return;
    this.#unassign(ws, ts);
    this.#to(ts, "released", "an input was missing; run again");
    for (const [dep, holders] of Object.entries(missing)) {
      for (const holder of holders) {
        if (!this.workers.has(holder)) continue;
        // The holder may still have it (only the way to it failed): no longer counted,
        // the copy must go, or it would stay there for good. Told before anything the
        // removal leads to (a recompute of it on that very holder, say).
        if (this.tasks.get(dep)?.whoHas.has(this.workers.get(holder)!)) this.#freeOn(holder, dep);
        this.removeKeys(holder, [dep]);
      }
    }
    if (++ts.suspicious > this.allowedFailures) {
      this.failed++;
      this.#err(ts, {
        name: "MissingDataError",
        message: `Task ${key} could not fetch ${
          Object.keys(missing).join(", ")
        } after ${ts.suspicious} tries`,
      }, key);
    } else if (ts.state === "released") this.#want(ts);
    this.#fill(ws);
  }

  /** A worker said it is alive, with its figures. */
  heartbeat(
    address: string,
    now: number,
    metrics: Record<string, number> = {},
    problems: string[] = [],
  ): boolean {
    const ws = this.workers.get(address);
    if (ws === undefined) return false;
    ws.lastSeen = now;
    ws.metrics = metrics;
    ws.problems = problems.slice(0, PROBLEMS_MAX).map((p) => p.slice(0, PROBLEM_CHARS_MAX));
    const paused = metrics.paused === 1;
    if (paused !== ws.paused) {
      ws.paused = paused;
      // Back under its memory limit: it takes queued tasks again.
      if (!paused) this.#fill(ws);
    }
    return true;
  }

  /**
   * Time passed (the shell calls this a few times a second): keys brought back and left
   * unclaimed past the grace are freed; keys waited for since the start that no worker
   * brought back fail; tasks with no worker to run them for `noWorkersTimeoutMs` fail.
   */
  tick(now: number): void {
    for (const [ts, until] of this.#unclaimed) {
      if (now < until) continue;
      this.#unclaimed.delete(ts);
      this.#maybeRelease(ts);
    }
    if (this.#awaited.size > 0 && now >= this.recoveringUntil) {
      for (const ts of [...this.#awaited]) {
        this.#awaited.delete(ts);
        if (ts.state !== "released" || ts.run !== null) continue;
        this.#err(ts, {
          name: "MissingDataError",
          message: `Unknown key ${JSON.stringify(ts.key)}: no task or data has it ` +
            `(no worker brought it back after the scheduler started)`,
        }, ts.key);
      }
    }
    this.#failUnrunnable(now);
  }

  /** Queued tasks that no worker can run fail once they have waited `noWorkersTimeoutMs`. */
  #failUnrunnable(now: number): void {
    const limit = this.noWorkersTimeoutMs;
    const stuck: TaskState[] = [];
    if (this.workers.size > 0 || this.#queuedUnrestricted === 0) this.#noWorkersSince = null;
    else if (this.#noWorkersSince === null) this.#noWorkersSince = now;
    else if (now - this.#noWorkersSince >= limit) {
      this.#noWorkersSince = null;
      for (const ts of new Set(this.#queue.entries())) if (this.#inQueue(ts)) stuck.push(ts);
    }
    // Whether a restricted task has a worker changes only when it is queued or a worker
    // leaves (one that comes clears the waits it ends): a million queued tasks are not
    // looked at every tick.
    const toCheck = this.#workerLeft ? this.#restricted : this.#restrictedToCheck;
    for (const ts of toCheck) {
      if (!this.#restricted.has(ts)) continue;
      let runnable = false;
      for (const ws of this.workers.values()) {
        if (this.#allowed(ts, ws)) {
          runnable = true;
          break;
        }
      }
      if (runnable) this.#unrunnableSince.delete(ts);
      else if (!this.#unrunnableSince.has(ts)) this.#unrunnableSince.set(ts, now);
    }
    this.#restrictedToCheck.clear();
    this.#workerLeft = false;
    // Grouped by restriction for the problems list, in the same pass.
    const groups = new Map<string, { count: number; example: string; since: number }>();
    for (const [ts, since] of this.#unrunnableSince) {
      if (!this.#restricted.has(ts)) {
        this.#unrunnableSince.delete(ts);
        continue;
      }
      if (now - since >= limit) stuck.push(ts);
      const where = [...ts.restrictions ?? []].join(", ");
      const g = groups.get(where);
      if (g === undefined) groups.set(where, { count: 1, example: ts.key, since });
      else {
        g.count++;
        g.since = Math.min(g.since, since);
      }
    }
    this.#tellProblems(now, groups);
    for (const ts of stuck) {
      if (ts.state !== "queued") continue;
      const where = ts.restrictions
        ? `no worker it may run on (${[...ts.restrictions].join(", ")})`
        : "no worker";
      this.failed++;
      this.#err(ts, {
        name: "NoWorkersError",
        message: `Task ${ts.key} could not run: ${where} was connected for ${limit} ms (no-workers-timeout)`,
      }, ts.key);
    }
  }

  /** Updates `problems` and queues a notice for each problem not told of before. */
  #tellProblems(now: number, groups: Map<string, { count: number; example: string; since: number }>): void {
    const limit = this.noWorkersTimeoutMs;
    const after = `they fail after ${limit / 1000} s (--no-workers-timeout) unless one connects`;
    const lines: [string, string][] = [];
    if (this.#noWorkersSince !== null) {
      const n = this.#queuedUnrestricted;
      lines.push([
        "",
        `${plural(n, "task")} queued and no worker connected (for ${
          Math.round((now - this.#noWorkersSince) / 1000)
        } s); ${after}`,
      ]);
    }
    for (const [where, g] of groups) {
      lines.push([
        where,
        `${plural(g.count, "task")} (e.g. ${
          JSON.stringify(g.example)
        }) may run only on ${where}, and no connected ` +
        `worker is one (for ${Math.round((now - g.since) / 1000)} s); ${after}`,
      ]);
    }
    const seen = new Set<string>();
    // With no worker at all, the line above says it for the restricted tasks too.
    if (this.workers.size === 0) lines.length = Math.min(lines.length, 1);
    for (const [group, line] of lines) {
      seen.add(group);
      if (!this.#toldProblems.has(group)) this.#notices.push(line);
    }
    this.#toldProblems = seen;
    this.problems = lines.slice(0, PROBLEMS_SHOWN_MAX).map(([, line]) => line);
    if (lines.length > PROBLEMS_SHOWN_MAX) {
      this.problems.push(`and ${lines.length - PROBLEMS_SHOWN_MAX} more`);
    }
  }

  /** Problems that appeared since the last call, in words, for the log. */
  drainNotices(): string[] {
    const out = this.#notices;
    this.#notices = [];
    return out;
  }

  /**
   * Why `key` is where it is, in words: what a future's `why()` and `dist info --story`
   * show (a task that waits says for what).
   */
  why(key: string, now: number): string {
    const ts = this.tasks.get(key);
    if (ts === undefined) return "unknown to the scheduler: never submitted, or released";
    switch (ts.state) {
      case "released":
        return "released: nobody holds a future for it and no task needs it";
      case "waiting": {
        const inputs = [...ts.waitingOn].slice(0, 3).map((d) => `${JSON.stringify(d.key)} (${d.state})`);
        const more = ts.waitingOn.size > 3 ? ` and ${ts.waitingOn.size - 3} more` : "";
        return `waiting for ${plural(ts.waitingOn.size, "input")}: ${inputs.join(", ")}${more}`;
      }
      case "queued": {
        const left = (from: number) =>
          `it fails in ${Math.max(0, Math.round((from + this.noWorkersTimeoutMs - now) / 1000))} s ` +
          "(--no-workers-timeout) unless one connects";
        if (this.workers.size === 0) {
          return `queued: no worker is connected; ${left(this.#noWorkersSince ?? now)}`;
        }
        const allowed = [...this.workers.values()].filter((ws) => this.#allowed(ts, ws));
        if (allowed.length === 0) {
          // The wait counts from the tick that saw it (from now, before one has).
          const where = [...ts.restrictions ?? []].join(", ");
          return `queued: it may run only on ${where}, and no connected worker is one; ${
            left(this.#unrunnableSince.get(ts) ?? now)
          }`;
        }
        if (allowed.every((ws) => ws.paused)) {
          return "queued: every worker it may run on is paused (short of memory) until it frees some";
        }
        return `queued: every worker it may run on is busy; ${
          plural(this.#queuedUnrestricted, "task")
        } queued in all`;
      }
      case "processing": {
        const ws = ts.processingOn;
        return `processing: sent to ${
          ws ? `${ws.name} (${ws.address})` : "a worker"
        }, running or queued there`;
      }
      case "memory":
        return `done: in memory on ${
          [...ts.whoHas].map((ws) => ws.name).join(", ") || "no worker (being recomputed)"
        }`;
      case "erred":
        return `failed: ${ts.error ? `${ts.error.name}: ${ts.error.message}` : "an input failed"}${
          ts.erredOn && ts.erredOn !== ts.key ? ` (from ${JSON.stringify(ts.erredOn)})` : ""
        }`;
      default:
        return ts.state;
    }
  }

  /**
   * The shell could not send `key`'s compute_task to `address` (its arguments cannot
   * travel, or the message is over the worker's size limit): the task fails with `error`
   * rather than stay processing for good. The worker never saw the message, so the
   * function ids it was told of are no longer in step: they start over.
   */
  computeTaskUnsent(address: string, key: string, error: RemoteErrorInfo): void {
    const ws = this.workers.get(address);
    if (ws === undefined) return;
    ws.knownFunctions = new Lru(KNOWN_FUNCTIONS_MAX);
    this.#refuse(ws, key, error);
  }

  /**
   * A worker reported on `key` (task_finished, task_erred, missing_data) in a message
   * that failed the op's checks: the task fails with `error` instead of the report being
   * dropped and the task waiting for good. A copy the worker may hold is freed.
   */
  reportRefused(address: string, key: string, error: RemoteErrorInfo): void {
    const ws = this.workers.get(address);
    const ts = this.tasks.get(key);
    if (ws === undefined || ts === undefined || ts.processingOn !== ws) return;
    if (!ws.hasWhat.has(ts)) this.#freeOn(address, key);
    this.#refuse(ws, key, error);
  }

  #refuse(ws: WorkerState, key: string, error: RemoteErrorInfo): void {
    const ts = this.tasks.get(key);
    if (ts === undefined || ts.processingOn !== ws) return;
    this.#unassign(ws, ts);
    this.failed++;
    this.#err(ts, error, key);
    this.#fill(ws);
  }

  /** Workers not heard from for longer than `ttlMs`. */
  expiredWorkers(now: number, ttlMs: number): string[] {
    return [...this.workers.values()].filter((w) => now - w.lastSeen > ttlMs).map((w) => w.address);
  }

  /**
   * Where each key held only by `leaving` workers should be copied before they go:
   * `{ target: { key: [holders] } }`, spreading keys over the staying workers by bytes held.
   */
  retirePlan(leaving: readonly string[]): Map<string, Record<string, string[]>> {
    // Workers retiring at once (a scale-down stops several) are no place to move data to.
    for (const address of leaving) if (this.workers.has(address)) this.#retiring.add(address);
    const gone = new Set([...leaving, ...this.#retiring]);
    const staying = [...this.workers.values()].filter((w) => !gone.has(w.address));
    const plan = new Map<string, Record<string, string[]>>();
    if (staying.length === 0) return plan;
    const load = new Map(staying.map((w) => [w, w.nbytes]));
    for (const address of leaving) {
      const ws = this.workers.get(address);
      if (ws === undefined) continue;
      for (const ts of ws.hasWhat) {
        if ([...ts.whoHas].some((h) => !gone.has(h.address))) continue;
        if (ts.whoWants.size === 0 && ts.waiters.size === 0 && !ts.external) continue;
        let target = staying[0];
        for (const w of staying) if (load.get(w)! < load.get(target)!) target = w;
        load.set(target, load.get(target)! + ts.nbytes);
        let orders = plan.get(target.address);
        if (orders === undefined) plan.set(target.address, orders = {});
        orders[ts.key] = [...ts.whoHas].map((h) => h.address);
      }
    }
    return plan;
  }

  // ---- reading ----

  /** `{ key: [address, ...] }` for `keys` (all keys in memory when omitted). */
  whoHasOf(keys?: readonly string[]): Record<string, string[]> {
    const out: Record<string, string[]> = {};
    if (keys === undefined) {
      for (const ts of this.tasks.values()) {
        if (ts.whoHas.size > 0) out[ts.key] = [...ts.whoHas].map((w) => w.address);
      }
    } else {
      for (const key of keys) out[key] = [...(this.tasks.get(key)?.whoHas ?? [])].map((w) => w.address);
    }
    return out;
  }

  /** `{ address: [key, ...] }` for `workers` (all when omitted). */
  hasWhatOf(workers?: readonly string[]): Record<string, string[]> {
    const out: Record<string, string[]> = {};
    for (const address of workers ?? this.workers.keys()) {
      out[address] = [...(this.workers.get(address)?.hasWhat ?? [])].map((t) => t.key);
    }
    return out;
  }

  /** `{ address: nthreads }`. */
  ncores(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [address, w] of this.workers) out[address] = w.nthreads;
    return out;
  }

  /** Every worker, as the `workers` op replies; `now` (ms) dates the last heartbeat. */
  workerList(now = Date.now()): WorkerInfo[] {
    return [...this.workers.values()].map((w) => ({
      address: w.address,
      name: w.name,
      nthreads: w.nthreads,
      nkeys: w.hasWhat.size,
      nbytes: w.nbytes,
      processing: w.processing.size,
      last_seen: Math.max(0, now - w.lastSeen) / 1000,
      metrics: w.metrics,
      problems: w.problems,
    }));
  }

  /**
   * Progress per task kind (prefix): `done` and `erred` count every task that ever
   * finished or failed (released results included), `processing` and `waiting` the
   * tasks pending now.
   */
  progressTotals(): Record<string, { done: number; erred: number; processing: number; waiting: number }> {
    const out: Record<string, { done: number; erred: number; processing: number; waiting: number }> = {};
    const entry = (prefix: string) => out[prefix] ??= { done: 0, erred: 0, processing: 0, waiting: 0 };
    for (const [prefix, c] of this.#finished.entries()) Object.assign(entry(prefix), c);
    for (const [prefix, p] of this.#byPrefix) {
      if (p.processing) entry(prefix).processing += p.processing;
      if (p.waiting || p.queued) entry(prefix).waiting += (p.waiting ?? 0) + (p.queued ?? 0);
    }
    return out;
  }

  /**
   * How many workers the work would like, as Dask's `adaptive_target`: the expected seconds
   * of the tasks queued and processing (each kind at its average duration so far, or
   * UNKNOWN_DURATION_S), spread so that each thread has about ADAPTIVE_TARGET_S of it, in
   * workers of the average thread count, never more than one thread per task; and enough
   * workers to hold the values in memory under their limits' target share. 0 with no work
   * and nothing held. O(kinds of task + workers): /metrics asks it on every scrape.
   */
  desiredWorkers(): number {
    let seconds = 0;
    let tasks = 0;
    for (const [prefix, p] of this.#byPrefix) {
      const n = p.queued + p.processing;
      if (n === 0) continue;
      tasks += n;
      seconds += n * (this.durations.get(prefix) ?? UNKNOWN_DURATION_S);
    }
    let threads = 0;
    let held = 0;
    let limits = 0;
    for (const ws of this.workers.values()) {
      threads += ws.nthreads;
      held += ws.metrics.managed ?? ws.nbytes;
      limits += ws.metrics.memory_limit ?? 0;
    }
    const perWorker = this.workers.size > 0 ? threads / this.workers.size : 1;
    const forWork = tasks === 0
      ? 0
      : Math.ceil(Math.min(Math.ceil(seconds / ADAPTIVE_TARGET_S), tasks) / perWorker);
    // Workers with limits: as many as keep what is held under the target share of each.
    const limitPerWorker = limits > 0 ? limits / this.workers.size : 0;
    const forMemory = limitPerWorker > 0 ? Math.ceil(held / (limitPerWorker * MEMORY_TARGET_FRACTION)) : 0;
    return Math.max(forWork, forMemory, tasks > 0 ? 1 : 0);
  }

  /** Task counts per prefix and state. */
  progress(): Progress {
    const out: Progress = {};
    for (const [prefix, p] of this.#byPrefix) {
      const counts: Partial<Record<TaskStateName, number>> = {};
      for (const state of KEYS_OF_STATES) if (p[state] > 0) counts[state] = p[state];
      out[prefix] = counts;
    }
    return out;
  }

  /** Tasks per state (forgotten ones are gone), kept as they move: no scan. */
  counts(): Record<TaskStateName, number> {
    return { ...this.#byState };
  }

  /** The moves of `key` still in the story ring, oldest first. */
  story(key: string): TaskStoryEvent[] {
    return this.#story.of(key);
  }

  /**
   * Checks that the state agrees with itself; throws naming the first broken invariant.
   * O(tasks + edges + workers): the tests and the simulation call it after every event.
   */
  validate(): void {
    const fail = (what: string): never => {
      throw new Error(`internal: invalid scheduler state: ${what}`);
    };
    const byState: Record<string, number> = {};
    const byPrefix = new Map<string, Record<string, number>>();
    const inHeap = new Set(this.#queue.entries());
    for (const [key, ts] of this.tasks) {
      const k = JSON.stringify(key);
      if (ts.key !== key) fail(`task ${k} is stored under another key`);
      if (ts.state === "forgotten") fail(`task ${k} is forgotten but still known`);
      byState[ts.state] = (byState[ts.state] ?? 0) + 1;
      let p = byPrefix.get(ts.prefix);
      if (p === undefined) byPrefix.set(ts.prefix, p = {});
      p[ts.state] = (p[ts.state] ?? 0) + 1;
      if (ts.state === "memory" && ts.whoHas.size === 0) fail(`task ${k} is in memory with no holder`);
      for (const ws of ts.whoHas) {
        if (this.workers.get(ws.address) !== ws) fail(`task ${k} is held by ${ws.address}, which is gone`);
        if (!ws.hasWhat.has(ts)) fail(`task ${k} is held by ${ws.address}, which does not list it`);
      }
      if ((ts.state === "processing") !== (ts.processingOn !== null)) {
        fail(`task ${k} is ${ts.state} with processingOn ${ts.processingOn?.address ?? null}`);
      }
      if (ts.processingOn !== null) {
        if (this.workers.get(ts.processingOn.address) !== ts.processingOn) {
          fail(`task ${k} is processing on ${ts.processingOn.address}, which is gone`);
        }
        if (!ts.processingOn.processing.has(ts)) {
          fail(`task ${k} is processing on ${ts.processingOn.address}, which does not list it`);
        }
      }
      const queued = (this.#inQueue(ts) && inHeap.has(ts)) || this.#restricted.has(ts);
      if ((ts.state === "queued") !== queued) {
        fail(`task ${k} is ${ts.state}, and ${queued ? "" : "not "}queued`);
      }
      for (const d of ts.dependencies) {
        if (!d.dependents.has(ts)) {
          fail(`task ${k} depends on ${d.key}, which does not list it as a dependent`);
        }
      }
      for (const d of ts.dependents) {
        if (!d.dependencies.has(ts)) fail(`task ${k} lists dependent ${d.key}, which does not depend on it`);
      }
      for (const d of ts.waiters) {
        if (!ts.dependents.has(d)) fail(`task ${k} is waited on by ${d.key}, which is not a dependent`);
      }
      for (const d of ts.waitingOn) {
        if (!ts.dependencies.has(d)) fail(`task ${k} waits on ${d.key}, which is not a dependency`);
      }
    }
    for (const [address, ws] of this.workers) {
      if (ws.address !== address) fail(`worker ${address} is stored under another address`);
      let occupancyUs = 0;
      for (const [ts, us] of ws.processing) {
        occupancyUs += us;
        if (ts.processingOn !== ws) {
          fail(`worker ${address} lists ${ts.key} as processing, which is not on it`);
        }
        if (this.tasks.get(ts.key) !== ts) fail(`worker ${address} processes ${ts.key}, which is not known`);
      }
      if (occupancyUs !== ws.occupancyUs) {
        fail(`worker ${address} is counted ${ws.occupancyUs} us of work, its tasks add up to ${occupancyUs}`);
      }
      if (ws.processing.size > ws.nthreads * WORKER_TASKS_PER_THREAD_MAX) {
        fail(
          `worker ${address} holds ${ws.processing.size} tasks, over ${WORKER_TASKS_PER_THREAD_MAX} per thread`,
        );
      }
      for (const ts of ws.hasWhat) {
        if (!ts.whoHas.has(ws)) fail(`worker ${address} lists ${ts.key}, which does not name it as a holder`);
      }
    }
    for (const state of KEYS_OF_STATES) {
      if ((byState[state] ?? 0) !== this.#byState[state]) {
        fail(`${this.#byState[state]} tasks counted ${state}, ${byState[state] ?? 0} found`);
      }
    }
    if (byPrefix.size !== this.#byPrefix.size) {
      fail(`${this.#byPrefix.size} prefixes counted, ${byPrefix.size} found`);
    }
    for (const [prefix, p] of byPrefix) {
      const kept: Partial<Record<TaskStateName, number>> = this.#byPrefix.get(prefix) ?? {};
      for (const state of KEYS_OF_STATES) {
        if ((p[state] ?? 0) !== (kept[state] ?? 0)) {
          fail(`${kept[state] ?? 0} tasks of ${prefix} counted ${state}, ${p[state] ?? 0} found`);
        }
      }
    }
  }

  /** Gives the scheduler the time (ms) for the story of the moves that follow. */
  at(now: number): void {
    this.#now = now;
  }

  /** Tasks waiting on the scheduler for a free worker. */
  get queued(): number {
    return this.#byState.queued;
  }

  /** Queued tasks in the heap (not restricted). */
  get #queuedUnrestricted(): number {
    return this.#byState.queued - this.#restricted.size;
  }

  /** Whether an entry of the heap stands for a task to run (the others are stale). */
  #inQueue(ts: TaskState): boolean {
    return ts.state === "queued" && ts.restrictions === null;
  }

  // ---- transitions ----

  /** The one place a task's state changes: the move must be in `TASK_TRANSITIONS`. */
  #to(ts: TaskState, to: TaskStateName, reason: string): void {
    const from = ts.state;
    if (from === to) return;
    if (!TASK_TRANSITIONS[from].includes(to)) {
      throw new Error(
        `internal: task ${JSON.stringify(ts.key)} cannot move from ${from} to ${to} (${reason})`,
      );
    }
    ts.state = to;
    this.#byState[from]--;
    const p = this.#byPrefix.get(ts.prefix)!;
    p[from]--;
    if (to !== "forgotten") {
      this.#byState[to]++;
      p[to]++;
    } else if (--p.total === 0) {
      // A prefix with no task left goes (keys are all kinds; the map must not keep them all),
      // and so do its counts of finished tasks: progress shows the work the scheduler
      // holds now (as Dask's task groups do), not everything since it started.
      this.#byPrefix.delete(ts.prefix);
      this.#finished.delete(ts.prefix);
    }
    this.#story.record(this.#now, ts.key, from, to, reason);
  }

  #count(prefix: string, what: "done" | "erred"): void {
    let c = this.#finished.get(prefix);
    if (c === undefined) this.#finished.set(prefix, c = { done: 0, erred: 0 });
    c[what]++;
  }

  #newTask(key: string): TaskState {
    const prefix = keyPrefix(key);
    let p = this.#byPrefix.get(prefix);
    if (p === undefined) this.#byPrefix.set(prefix, p = newPrefixCounts(prefix));
    const ts: TaskState = {
      key,
      prefix: p.name,
      state: "released",
      run: null,
      dependencies: NONE,
      dependents: NONE,
      waitingOn: NONE,
      waiters: NONE,
      whoHas: NONE,
      processingOn: null,
      whoWants: NONE,
      external: false,
      rank: 0,
      order: this.#order++,
      retries: 0,
      restrictions: null,
      nbytes: 0,
      error: null,
      erredOn: null,
      suspicious: 0,
    };
    this.tasks.set(key, ts);
    this.#byState.released++;
    p.released++;
    p.total++;
    return ts;
  }

  #worker(address: string): WorkerState {
    const ws = this.workers.get(address);
    if (ws === undefined) throw new RangeError(`Unknown worker ${address}: it must register first`);
    return ws;
  }

  /** A released task is needed: wait for its dependencies, or run it. */
  #want(root: TaskState): void {
    const stack = [root];
    while (stack.length > 0) {
      const ts = stack.pop()!;
      if (ts.state !== "released") continue;
      if (ts !== root && ts.whoWants.size === 0 && ts.waiters.size === 0) continue;
      if (ts.run === null && this.#awaited.has(ts)) continue; // its worker may still come back
      if (ts.run === null) {
        // Data with no lineage that is gone cannot come back.
        this.#err(ts, {
          name: "MissingDataError",
          message: `Key ${ts.key} was lost and has no task to recompute it`,
        }, ts.key);
        continue;
      }
      this.#to(ts, "waiting", "wanted");
      ts.waitingOn.clear();
      const wanted: TaskState[] = [];
      let failed = false;
      for (const dep of ts.dependencies) {
        if (dep.state === "erred" || dep.state === "forgotten") {
          const error = dep.state === "erred" ? dep.error! : {
            name: "MissingDataError",
            message: `Key ${dep.key}, an input of ${ts.key}, was cancelled or deleted`,
          };
          this.#err(ts, error, dep.erredOn ?? dep.key);
          failed = true;
          break;
        }
        dep.waiters = withItem(dep.waiters, ts);
        if (dep.state !== "memory") {
          ts.waitingOn = withItem(ts.waitingOn, dep);
          if (dep.state === "released") wanted.push(dep);
        }
      }
      if (failed) continue;
      if (ts.waitingOn.size === 0) this.#ready(ts);
      else stack.push(...wanted.reverse());
    }
  }

  /** All dependencies are in memory: run it now, or queue it. */
  #ready(ts: TaskState): void {
    if (ts.state === "released") {
      // Coming back from a lost worker: check its dependencies again.
      for (const dep of ts.dependencies) {
        if (dep.state !== "memory") {
          this.#want(ts);
          return;
        }
      }
    }
    const ws = this.#pickWorker(ts);
    if (ws === null) {
      this.#to(ts, "queued", "no worker free");
      if (ts.restrictions) {
        this.#restricted.add(ts);
        this.#restrictedToCheck.add(ts);
      } else {
        this.#queue.push(ts);
      }
      return;
    }
    this.#send(ts, ws);
  }

  #send(ts: TaskState, ws: WorkerState): void {
    this.#to(ts, "processing", `sent to ${ws.address}`);
    ts.processingOn = ws;
    const us = this.#workUs(ts);
    ws.processing.set(ts, us);
    ws.occupancyUs += us;
    const run = ts.run!;
    const fnId = this.functionId(run.function);
    const args: ComputeTaskArgs = { key: ts.key, fn_id: fnId, args: run.args, who_has: NO_HOLDERS };
    if (ts.dependencies.size > 0) {
      const whoHas: Record<string, string[]> = {};
      const nbytes: Record<string, number> = {};
      for (const dep of ts.dependencies) {
        whoHas[dep.key] = [...dep.whoHas].map((w) => w.address);
        nbytes[dep.key] = dep.nbytes;
      }
      args.who_has = whoHas;
      args.nbytes = nbytes;
    }
    if (ws.knownFunctions.get(fnId) === undefined) {
      ws.knownFunctions.set(fnId, true);
      args.function = run.function;
    }
    this.#toWorker({ to: "worker", address: ws.address, op: "compute_task", args });
  }

  #allowed(ts: TaskState, ws: WorkerState): boolean {
    return ts.restrictions === null || ts.restrictions.has(ws.address) || ts.restrictions.has(ws.name);
  }

  /** The task is no longer on `ws` (finished, failed, released, or lost). */
  #unassign(ws: WorkerState, ts: TaskState): void {
    ws.occupancyUs -= ws.processing.get(ts) ?? 0;
    ws.processing.delete(ts);
    ts.processingOn = null;
  }

  /** How much work `ts` is counted as (us): its kind's average duration so far, at least the overhead of a task. */
  #workUs(ts: TaskState): number {
    const seconds = this.durations.get(ts.prefix) ?? DEFAULT_DURATION_S;
    return Math.max(TASK_OVERHEAD_US, Math.ceil(seconds * 1e6));
  }

  /**
   * Whether `ws` takes one more task of `us` of work: always up to `WORKER_EXTRA_TASKS`
   * beyond its threads, then while what it holds stays within `WORKER_AHEAD_MS` per thread.
   */
  #hasRoom(ws: WorkerState, us: number): boolean {
    // A worker paused by memory gets no new task: what it was sent waits there.
    if (ws.paused) return false;
    const n = ws.processing.size;
    if (n < ws.nthreads + WORKER_EXTRA_TASKS) return true;
    return n < ws.nthreads * WORKER_TASKS_PER_THREAD_MAX &&
      ws.occupancyUs + us <= ws.nthreads * (WORKER_AHEAD_MS * 1000 + us);
  }

  /**
   * The worker where `ts` would finish soonest: the bytes it must fetch weighed
   * against the work already there. Null when every allowed worker is full.
   */
  #pickWorker(ts: TaskState): WorkerState | null {
    let best: WorkerState | null = null;
    let bestCost = Infinity;
    const us = this.#workUs(ts);
    const n = this.workers.size;
    if (n === 0) return null;
    const all = [...this.workers.values()];
    const start = this.#roundRobin++ % n;
    for (let i = 0; i < n; i++) {
      const ws = all[(start + i) % n];
      if (!this.#hasRoom(ws, us) || !this.#allowed(ts, ws)) continue;
      let missing = 0;
      for (const dep of ts.dependencies) if (!dep.whoHas.has(ws)) missing += dep.nbytes;
      const cost = missing / BANDWIDTH_BYTES_PER_S + ws.occupancyUs / 1e6 / ws.nthreads;
      if (cost < bestCost) {
        best = ws;
        bestCost = cost;
      }
    }
    return best;
  }

  /** A worker has room: give it queued tasks, first come first, while the next one fits. */
  #fill(ws: WorkerState): void {
    // Nothing fits a paused worker, nor one at its count: no search of the queue for it.
    while (!ws.paused && ws.processing.size < ws.nthreads * WORKER_TASKS_PER_THREAD_MAX) {
      let best: TaskState | null = null;
      for (const ts of this.#restricted) {
        if (this.#allowed(ts, ws) && (best === null || less(ts, best))) best = ts;
      }
      let top = this.#queue.peek();
      while (top !== undefined && !this.#inQueue(top)) {
        this.#queue.pop();
        top = this.#queue.peek();
      }
      const fromQueue = top !== undefined && (best === null || less(top, best));
      const next = fromQueue ? top! : best;
      if (next === null || !this.#hasRoom(ws, this.#workUs(next))) return;
      if (fromQueue) {
        this.#queue.pop();
        this.#send(next, this.#pickWorker(next) ?? ws);
      } else {
        this.#restricted.delete(next);
        this.#send(next, ws);
      }
    }
  }

  #toMemory(ts: TaskState): void {
    this.#to(ts, "memory", "in memory");
    ts.error = null;
    for (const client of ts.whoWants) this.#tellDone(ts, client);
    for (const dependent of ts.dependents) {
      if (dependent.state === "waiting" && dependent.waitingOn.delete(ts) && dependent.waitingOn.size === 0) {
        this.#ready(dependent);
      }
    }
    for (const dep of ts.dependencies) {
      if (dep.waiters.delete(ts)) this.#maybeRelease(dep);
    }
    this.#maybeRelease(ts);
  }

  #tellDone(ts: TaskState, client: string): void {
    this.#out.push({
      to: "client",
      client,
      op: "key_done",
      args: { key: ts.key, nbytes: ts.nbytes, workers: [...ts.whoHas].map((w) => w.address) },
    });
  }

  #tellErred(ts: TaskState, client: string): void {
    this.#out.push({
      to: "client",
      client,
      op: "key_erred",
      args: { key: ts.key, error: ts.error!, task: ts.erredOn ?? ts.key },
    });
  }

  /** `ts` failed (or inherited `origin`'s failure); so does everything waiting on it. */
  #err(ts: TaskState, error: RemoteErrorInfo, origin: string): void {
    const stack = [ts];
    while (stack.length > 0) {
      const t = stack.pop()!;
      if (t.state === "erred" && t !== ts) continue;
      this.#unqueue(t);
      this.#to(t, "erred", `erred on ${origin}`);
      t.error = error;
      t.erredOn = origin;
      this.#count(t.prefix, "erred");
      for (const client of t.whoWants) this.#tellErred(t, client);
      for (const dep of t.dependencies) {
        if (dep.waiters.delete(t)) this.#maybeRelease(dep);
      }
      t.waitingOn.clear();
      for (const dependent of t.dependents) {
        if (dependent.state === "waiting" || dependent.state === "queued") stack.push(dependent);
      }
    }
  }

  /** A key in memory lost its last copy: recompute it if needed, or report it lost. */
  #lose(ts: TaskState, reason: string): void {
    if (ts.run === null && ts.whoWants.size === 0 && ts.waiters.size === 0) {
      this.#forget(ts);
      return;
    }
    this.#to(ts, "released", "lost its last copy");
    if (ts.run === null) {
      for (const client of ts.whoWants) {
        this.#out.push({ to: "client", client, op: "key_lost", args: { key: ts.key, reason } });
      }
      const dependents = [...ts.waiters];
      this.#err(ts, { name: "MissingDataError", message: `Key ${ts.key} was lost: ${reason}` }, ts.key);
      for (const d of dependents) if (d.state !== "erred") this.#err(d, ts.error!, ts.key);
      return;
    }
    // Dependents that were ready must wait for it again.
    for (const dependent of ts.dependents) {
      if (dependent.state === "queued" || dependent.state === "processing") {
        this.#unqueue(dependent);
        this.#to(dependent, "waiting", "an input was lost");
      }
      if (dependent.state === "waiting") dependent.waitingOn = withItem(dependent.waitingOn, ts);
    }
    if (ts.whoWants.size > 0 || ts.waiters.size > 0) this.#want(ts);
  }

  #unqueue(ts: TaskState): void {
    if (ts.state === "queued") {
      this.#restricted.delete(ts);
      // The heap skips it lazily.
    }
    if (ts.state === "processing" && ts.processingOn) {
      const ws = ts.processingOn;
      this.#unassign(ws, ts);
      this.#toWorker({ to: "worker", address: ws.address, op: "cancel_task", args: { keys: [ts.key] } });
      this.#fill(ws);
    }
  }

  #maybeRelease(root: TaskState): void {
    this.#releases.push(root);
    this.#runReleases();
  }

  #runReleases(): void {
    const stack = this.#releases;
    while (stack.length > 0 && this.#releaseSteps < RELEASE_STEPS_PER_TURN) {
      this.#releaseSteps++;
      const ts = stack.pop()!;
      if (ts.whoWants.size > 0 || ts.waiters.size > 0 || ts.external || this.#unclaimed.has(ts)) continue;
      if (ts.state === "memory") {
        this.#free(ts);
        this.#to(ts, "released", "nobody wants it");
      } else if (ts.state === "waiting" || ts.state === "queued" || ts.state === "processing") {
        this.#unqueue(ts);
        this.#to(ts, "released", "nobody wants it");
        for (const dep of ts.dependencies) if (dep.waiters.delete(ts)) stack.push(dep);
      }
      if (this.#canForget(ts)) { for (const dep of this.#forgetOne(ts, false)) stack.push(dep); }
    }
  }

  #toWorker(m: Outgoing & { to: "worker" }): void {
    this.#out.push(m);
    this.#lastToWorker.set(m.address, m);
  }

  /**
   * Tells `address` to free `key`: with the free_keys message just before, if the worker
   * has been sent nothing since (its messages keep their order), so releasing many keys
   * makes one message per worker, not one per key.
   */
  #freeOn(address: string, key: string): void {
    const last = this.#lastToWorker.get(address);
    if (last?.op === "free_keys") last.args.keys.push(key);
    else this.#toWorker({ to: "worker", address, op: "free_keys", args: { keys: [key] } });
  }

  /** Tells the holders of `ts` to free it. */
  #free(ts: TaskState): void {
    for (const ws of ts.whoHas) {
      ws.hasWhat.delete(ts);
      ws.nbytes -= ts.nbytes;
      this.#freeOn(ws.address, ts.key);
    }
    ts.whoHas.clear();
  }

  /** Drops a released or erred task nobody refers to any more. */
  #canForget(ts: TaskState): boolean {
    if (ts.state !== "released" && ts.state !== "erred") return false;
    if (ts.whoWants.size > 0 || ts.waiters.size > 0) return false;
    for (const d of ts.dependents) if (d.state !== "forgotten") return false;
    return true;
  }

  /** Forgets `ts`; returns the dependencies that may now be released. */
  #forgetOne(ts: TaskState, replaced: boolean): TaskState[] {
    this.#unqueue(ts);
    if (ts.whoHas.size > 0) this.#free(ts);
    this.#to(ts, "forgotten", "forgotten");
    this.#unclaimed.delete(ts);
    this.#awaited.delete(ts);
    this.#unrunnableSince.delete(ts);
    this.#restrictedToCheck.delete(ts);
    if (this.tasks.get(ts.key) === ts) this.tasks.delete(ts.key);
    const deps: TaskState[] = [];
    for (const dep of ts.dependencies) {
      dep.dependents.delete(ts);
      dep.waiters.delete(ts);
      if (!replaced) deps.push(dep);
    }
    return deps;
  }

  #forget(ts: TaskState, replaced = false): void {
    for (const dep of this.#forgetOne(ts, replaced)) this.#maybeRelease(dep);
  }

  /** Cancels `ts` and everything that depends on it, for every client. */
  #cancel(ts: TaskState, reason: string): void {
    const stack = [ts];
    const seen = new Set<TaskState>();
    while (stack.length > 0) {
      const t = stack.pop()!;
      if (seen.has(t)) continue;
      seen.add(t);
      for (const client of t.whoWants) {
        this.#out.push({ to: "client", client, op: "key_cancelled", args: { key: t.key, reason } });
      }
      t.whoWants.clear();
      t.external = false;
      for (const d of t.dependents) if (d.state !== "memory" && d.state !== "forgotten") stack.push(d);
    }
    for (const t of [...seen].reverse()) {
      t.waiters.clear();
      this.#forget(t);
    }
  }
}

/**
 * Throws when the new tasks depend on each other in a cycle. `at` gives each key's (last)
 * place in `specs`.
 */
function refuseCycles(
  specs: readonly TaskSpec[],
  at: Map<string, number>,
  tasks: Map<string, TaskState>,
): void {
  const isNew = (k: string) => {
    const ts = tasks.get(k);
    return at.has(k) && (ts === undefined || ts.state === "erred" || ts.state === "forgotten");
  };
  // Clients send a graph in order, each task after the new tasks it needs: then there is
  // no cycle, and one pass over the places tells.
  let ordered = true;
  for (let i = 0; i < specs.length && ordered; i++) {
    for (const d of specs[i].deps) {
      const j = at.get(d);
      if (j !== undefined && j >= i && isNew(d)) {
        ordered = false;
        break;
      }
    }
  }
  if (ordered) return;
  const done = new Set<string>();
  const onPath = new Set<string>();
  for (const start of at.keys()) {
    if (done.has(start) || !isNew(start)) continue;
    const stack: [string, number][] = [[start, 0]];
    onPath.add(start);
    while (stack.length > 0) {
      const top = stack[stack.length - 1];
      const deps = specs[at.get(top[0])!].deps;
      if (top[1] < deps.length) {
        const d = deps[top[1]++];
        if (onPath.has(d)) throw new RangeError(`Task ${d} depends on itself`);
        if (!done.has(d) && isNew(d)) {
          onPath.add(d);
          stack.push([d, 0]);
        }
      } else {
        onPath.delete(top[0]);
        done.add(top[0]);
        stack.pop();
      }
    }
  }
}

/** `last`: what the executor that died last said, when it was the task's own executor. */
function killedWorker(ts: TaskState, allowed: number, last?: string): RemoteErrorInfo {
  return {
    name: "KilledWorker",
    message: `Task ${ts.key} was running when ${ts.suspicious} workers (or their executors) died; ` +
      `it is not retried past allowed_failures=${allowed}` + (last ? `. The last time: ${last}` : ""),
  };
}
