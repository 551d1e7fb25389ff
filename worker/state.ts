/**
 * The worker's decisions, apart from its I/O: which keys to fetch from which peer and
 * when, which task to run next, what to tell the scheduler. Built like the scheduler's
 * `SchedulerTasks`: no sockets, no timers, time passed in; events in (`handle`),
 * instructions out, and every change of a key's state through one gate that checks
 * `TRANSITIONS` and writes the key's story. `worker/worker.ts` is the shell that turns
 * instructions into calls and executor runs and turns what comes back into events.
 *
 * @module
 */

import { Holders } from "../protocol/fetch.ts";
import { type Move, NONE, Story, withItem } from "../util/story.ts";

/**
 * What a key is on this worker (Dask's worker states):
 * - `waiting`: a task whose inputs are not all here yet;
 * - `ready`: a task whose inputs are here, waiting for an executor;
 * - `executing`: a task handed to an executor: running, or next in its line (short tasks
 *   are handed ahead, see `EXECUTE_AHEAD_MS`);
 * - `cancelled`: a task on an executor that nobody wants any more (freed, cancelled, or
 *   the scheduler was lost): its result is dropped unless the task is asked for again;
 * - `fetch`: a value to fetch from a peer, waiting for a holder to ask and room to ask;
 * - `flight`: a value being fetched;
 * - `missing`: a value no holder is known for, while the scheduler is asked where it is;
 * - `memory`: a value held here;
 * - `released`: gone (the record is dropped once it is here).
 */
export type KeyState =
  | "waiting"
  | "ready"
  | "executing"
  | "cancelled"
  | "fetch"
  | "flight"
  | "missing"
  | "memory"
  | "released";

/** Every key state, for tests and the story. */
export const KEY_STATES: readonly KeyState[] = [
  "waiting",
  "ready",
  "executing",
  "cancelled",
  "fetch",
  "flight",
  "missing",
  "memory",
  "released",
];

/** The allowed moves, from -> to. "released" as a source is a key seen for the first time. */
export const TRANSITIONS: Readonly<Record<KeyState, readonly KeyState[]>> = {
  released: ["waiting", "ready", "fetch", "missing", "memory"],
  waiting: ["ready", "memory", "released"],
  // Back to waiting when an input was deleted before a thread was free.
  ready: ["executing", "waiting", "memory", "released"],
  executing: ["memory", "cancelled", "released"],
  // Asked for again while still running: it runs on, as the new task; or, if its
  // executor was stopped, it runs again once the stopped run has ended.
  cancelled: ["executing", "memory", "waiting", "released"],
  fetch: ["flight", "missing", "memory", "waiting", "released"],
  // To waiting: asked to compute it after all (a fetch under way may never end).
  flight: ["memory", "fetch", "missing", "waiting", "released"],
  missing: ["fetch", "memory", "waiting", "released"],
  memory: ["released"],
};

/** Fetches in flight at once, in all. */
export const FETCHES_MAX = 8;
/** Bytes of values in flight at once, in all: a fetch starts only below it (the first always starts). */
export const FETCH_BYTES_IN_FLIGHT_MAX = 512 * 1024 * 1024;
/**
 * Bytes asked of one peer in one fetch, unless one value is larger. A peer is asked one
 * fetch at a time (as Dask does): keys for it wait and go together in the next.
 */
export const FETCH_BATCH_BYTES_MAX = 64 * 1024 * 1024;
/**
 * Tasks handed to each thread beyond the one it runs, at most: an executor that gets
 * its next tasks before it finishes one never waits for the worker between short tasks
 * (the pool's executors take up to 256 jobs at once). Tiny tasks go by the hundred: one
 * post to the executor and one back for many (with these and 256-job posts the workers spent
 * 60-71 us a task of the 100k map and sum tree, against 83-89 with 15 and 16).
 */
export const EXECUTE_AHEAD_MAX = 255;
/**
 * How much compute time a thread's line of tasks may hold, as measured: tasks are handed
 * ahead only while that line stays under it, so a long task never holds short ones back
 * and a free thread never waits behind a busy one for more than about this long.
 */
export const EXECUTE_AHEAD_MS = 20;
/** Transitions the story keeps, for all keys together (a ring: the oldest go first). */
export const STORY_EVENTS_MAX = 10_000;

/** A task from the scheduler, as the state sees it: the rest (function, arguments) is the shell's. */
export interface TaskRun {
  /** Inputs and where each is held. */
  who_has: Record<string, string[]>;
  /** Sizes of inputs, where the scheduler knows them (for the fetch limits). */
  nbytes?: Record<string, number>;
  /** Whatever the shell needs to run it; handed back in the `execute` instruction. */
  run: unknown;
}

/** What happens to the worker: the shell turns each I/O outcome into one of these. */
export type WorkerEvent =
  /** compute_task from the scheduler. */
  | { type: "compute"; key: string; task: TaskRun }
  /**
   * Keys wanted here for a request (gather_keys from the scheduler, inputs of a client's
   * `compute`): fetched like a task's inputs, answered by an `acquired` instruction.
   * `who_has` may be missing (the scheduler is asked); `replica` says whether the copies
   * are replicas of a scheduler's task result (reported so) or data of this worker's own.
   */
  | { type: "acquire"; id: number; keys: string[]; who_has?: Record<string, string[]>; replica: boolean }
  /** free_keys from the scheduler: it no longer counts on these copies or tasks. */
  | { type: "free"; keys: string[] }
  /** cancel_task: as free, and an executing task's executor is stopped. */
  | { type: "cancel"; keys: string[] }
  /** The shell stored a value (update_data, a client's compute); `own`: this worker's own data. */
  | { type: "put"; key: string; nbytes: number; own: boolean }
  /** delete_data: the values go. */
  | { type: "delete"; keys: string[] }
  /** Part of a fetch from `peer` arrived: the values (in the shell's hands) and their sizes. */
  | { type: "fetched"; peer: string; nbytes: Record<string, number> }
  /** The fetch from `peer` ended; keys it asked that never came, `peer` lacks. */
  | { type: "fetch-done"; peer: string }
  /**
   * The fetch from `peer` failed: `gone` (closed, timed out), `busy` (BusyError), or
   * `refused` (any other error, e.g. a value over a limit: the error is the tasks').
   */
  | { type: "fetch-failed"; peer: string; reason: "gone" | "busy" | "refused"; error?: unknown }
  /** The scheduler's who_has answer to a `lookup`. */
  | { type: "who-has"; who_has: Record<string, string[]> }
  /** A lookup could not be made or answered. */
  | { type: "lookup-failed"; keys: string[] }
  /** A task's executor finished it. `report`: timing fields for task_finished. */
  | { type: "executed"; key: string; nbytes: number; report: Record<string, number> }
  /** A task failed, or its executor died (`killed`). `report`: timing fields for task_erred. */
  | { type: "execute-failed"; key: string; error: unknown; killed: boolean; report: Record<string, number> }
  /** The connection to the scheduler is gone. */
  | { type: "scheduler-lost" }
  /** Registered with a scheduler again. */
  | { type: "scheduler-found" }
  /**
   * The worker's memory crossed its pause threshold (`paused`) or came back under it: a
   * paused worker starts no task and no fetch; it keeps serving its data, so peers can
   * take it away.
   */
  | { type: "memory"; paused: boolean }
  /** Time passed (a `wake` came due). */
  | { type: "tick" };

/** A message for the scheduler, as a notice on the worker's connection. */
export type ToScheduler =
  | { op: "task_finished"; args: { key: string; nbytes: number } & Record<string, unknown> }
  | { op: "task_erred"; key: string; error: unknown; killed: boolean; report: Record<string, number> }
  | { op: "missing_data"; args: { key: string; missing: Record<string, string[]> } }
  | { op: "add_keys"; args: { keys: string[]; nbytes: Record<string, number>; replicas: boolean } };

/** What the shell must do. */
export type Instruction =
  /** get_data `keys` from `peer`, then report `fetched` per part and `fetch-done` or `fetch-failed`. */
  | { type: "fetch"; peer: string; keys: string[] }
  /** Keep the values in hand (just fetched or computed) under `keys` in the store. */
  | { type: "store"; keys: string[] }
  /** Let go of values in hand under `keys` (nobody wants them any more, or a copy is here). */
  | { type: "discard"; keys: string[] }
  /** Delete `keys` from the store. */
  | { type: "drop"; keys: string[] }
  /** Run task `key` on an executor; report `executed` or `execute-failed`. */
  | { type: "execute"; key: string; run: unknown }
  /** Stop the executor running `key` (cancel). */
  | { type: "abort"; key: string }
  /** Ask the scheduler who_has `keys`; report `who-has` or `lookup-failed`. */
  | { type: "lookup"; keys: string[] }
  /** Tell the scheduler. */
  | { type: "send"; message: ToScheduler }
  /** Answer request `id`: `missing` keys could not be fetched, or `error` (a refusal). */
  | { type: "acquired"; id: number; missing: Record<string, string[]>; error?: unknown }
  /** Send a `tick` at `at` (ms, the same clock as `now`). */
  | { type: "wake"; at: number };

/** One move in a key's story (`time` in ms, the clock given to `handle`). */
export type StoryEvent = Move<KeyState>;

/** Options of a WorkerState. */
export interface WorkerStateOptions {
  /** This worker's address: never a holder to fetch from. */
  address: string;
  /** Tasks that run at once. */
  nthreads: number;
  /** Fetch limits (see the constants of the same names). */
  fetchesMax?: number;
  fetchBytesInFlightMax?: number;
  fetchBatchBytesMax?: number;
  /** Random source in [0, 1) for holder choice and jitter. */
  random?: () => number;
}

interface KeyRecord {
  key: string;
  state: KeyState;
  /** Set for a task this worker was asked to compute. */
  task: TaskRun | null;
  /** Of the task's inputs, those not here yet. */
  waitingFor: Set<string>;
  /** Tasks here that need this key. */
  dependents: Set<string>;
  /** Requests that need this key. */
  requests: Set<number>;
  /** Bytes held, or expected while fetched (0 when unknown). */
  nbytes: number;
  /** The peer a flight is from. */
  peer: string | null;
  /** This worker's own data (update_data, compute): named `external` when registering. */
  own: boolean;
  /** Fetched only for tasks: a replica of a scheduler's result. */
  replica: boolean;
  /** The scheduler freed this copy while a task here still needs it: dropped once none does. */
  freed: boolean;
  /** A cancelled task whose executor was told to stop: it cannot be resumed, only run again. */
  aborted: boolean;
  /** A cancelled, aborted task asked for again: it runs again once the stopped run has ended. */
  rerun: boolean;
}

interface Request {
  id: number;
  pending: Set<string>;
  replica: boolean;
  missing: Record<string, string[]>;
  error: unknown;
  hasError: boolean;
}

/** The state of one worker: keys, tasks, fetches. See the module doc. */
export class WorkerState {
  #address: string;
  readonly nthreads: number;
  readonly #records = new Map<string, KeyRecord>();
  readonly #holders: Holders;
  readonly #requests = new Map<number, Request>();
  /** Tasks ready to run, in arrival order. */
  readonly #ready = new Set<string>();
  /** Keys in `fetch`, in arrival order. */
  readonly #toFetch = new Set<string>();
  /** Requests in flight, by peer, with the keys they asked that have not landed yet. */
  readonly #flights = new Map<string, Set<string>>();
  #flightBytes = 0;
  /** Tasks on an executor (executing or cancelled). */
  #running = 0;
  /** Past the memory pause threshold: no task or fetch starts. */
  #paused = false;
  /** A task's compute time lately (ms, a moving mean of the reports), null before the first. */
  #taskMs: number | null = null;
  #connected = true;
  #now = 0;
  #out: Instruction[] = [];
  /** Values in hand this event (fetched or computed) and their fate, gathered into store/discard. */
  #store: string[] = [];
  #discard: string[] = [];
  readonly #story = new Story<KeyState>(STORY_EVENTS_MAX);
  #wakeAt: number | null = null;
  readonly #limits: { fetches: number; bytes: number; batch: number };

  constructor(options: WorkerStateOptions) {
    if (!Number.isInteger(options.nthreads) || options.nthreads < 1) {
      throw new RangeError(`Invalid nthreads ${options.nthreads}: expected a whole number from 1 up`);
    }
    this.#address = options.address;
    this.nthreads = options.nthreads;
    this.#holders = new Holders({ self: options.address, random: options.random });
    this.#limits = {
      fetches: options.fetchesMax ?? FETCHES_MAX,
      bytes: options.fetchBytesInFlightMax ?? FETCH_BYTES_IN_FLIGHT_MAX,
      batch: options.fetchBatchBytesMax ?? FETCH_BATCH_BYTES_MAX,
    };
  }

  /** This worker's address (it may change once, when the worker learns which interface reaches the scheduler). */
  get address(): string {
    return this.#address;
  }

  set address(address: string) {
    this.#address = address;
    this.#holders.self = address;
  }

  // ---- reading ----

  /** The state of `key`, or "released" for a key not held or wanted here. */
  stateOf(key: string): KeyState {
    return this.#records.get(key)?.state ?? "released";
  }

  /** Keys held here (state memory). */
  memoryKeys(): string[] {
    return [...this.#records.values()].filter((r) => r.state === "memory").map((r) => r.key);
  }

  /** Of the keys held, this worker's own data (named `external` when it registers). */
  ownKeys(): string[] {
    return [...this.#records.values()].filter((r) => r.state === "memory" && r.own).map((r) => r.key);
  }

  /** How many keys are in each state (states with none are absent). */
  counts(): Partial<Record<KeyState, number>> {
    const out: Partial<Record<KeyState, number>> = {};
    for (const r of this.#records.values()) out[r.state] = (out[r.state] ?? 0) + 1;
    return out;
  }

  /** Fetches in flight and their expected bytes. */
  inFlight(): { fetches: number; bytes: number } {
    return { fetches: this.#flights.size, bytes: this.#flightBytes };
  }

  /** Whether the memory monitor paused this worker (no task or fetch starts). */
  get paused(): boolean {
    return this.#paused;
  }

  /** Tasks on executors: running, next in an executor's line, or cancelled and not ended yet. */
  get executing(): number {
    return this.#running;
  }

  /** The moves of `key` still in the story ring, oldest first. */
  story(key: string): StoryEvent[] {
    return this.#story.of(key);
  }

  // ---- events ----

  /** Applies `event` at `now` (ms) and returns what the shell must do, in order. */
  handle(event: WorkerEvent, now: number): Instruction[] {
    this.#now = now;
    switch (event.type) {
      case "compute":
        this.#compute(event.key, event.task);
        break;
      case "acquire":
        this.#acquire(event.id, event.keys, event.who_has, event.replica);
        break;
      case "free":
        for (const key of event.keys) this.#free(key, false, "free");
        break;
      case "cancel":
        for (const key of event.keys) this.#free(key, true, "cancel");
        break;
      case "put":
        this.#put(event.key, event.nbytes, event.own);
        break;
      case "delete":
        for (const key of event.keys) this.#delete(key);
        break;
      case "fetched":
        this.#fetched(event.peer, event.nbytes);
        break;
      case "fetch-done":
        this.#fetchEnded(event.peer, "done");
        break;
      case "fetch-failed":
        this.#fetchEnded(event.peer, event.reason, event.error);
        break;
      case "who-has":
        this.#whoHas(event.who_has);
        break;
      case "lookup-failed":
        for (const key of event.keys) {
          const r = this.#records.get(key);
          if (r?.state === "missing") this.#lost(r);
        }
        break;
      case "executed":
        this.#executed(event.key, event.nbytes, event.report);
        break;
      case "execute-failed":
        this.#executeFailed(event.key, event.error, event.killed, event.report);
        break;
      case "scheduler-lost":
        this.#schedulerLost();
        break;
      case "scheduler-found":
        this.#connected = true;
        break;
      case "memory":
        this.#paused = event.paused;
        break;
      case "tick":
        // The shell's timer fired: no wake is pending now, so the next one is asked for
        // even when it is the same moment (a timer may fire a little early).
        this.#wakeAt = null;
        break;
    }
    this.#schedule();
    const out = this.#out;
    this.#out = [];
    if (this.#discard.length > 0) out.unshift({ type: "discard", keys: this.#discard });
    if (this.#store.length > 0) out.unshift({ type: "store", keys: this.#store });
    this.#store = [];
    this.#discard = [];
    return out;
  }

  // ---- the gate ----

  /** The one place a key's state changes: the move must be in `TRANSITIONS`. */
  #transition(r: KeyRecord, to: KeyState, reason: string): void {
    const from = r.state;
    if (!TRANSITIONS[from].includes(to)) {
      throw new Error(
        `internal: worker key ${JSON.stringify(r.key)} cannot move from ${from} to ${to} (${reason})`,
      );
    }
    if (from === "fetch") this.#toFetch.delete(r.key);
    if (from === "ready") this.#ready.delete(r.key);
    if (from === "flight") {
      this.#flights.get(r.peer!)?.delete(r.key);
      this.#flightBytes -= r.nbytes;
      r.peer = null;
    }
    if ((from === "executing" || from === "cancelled") && to !== "executing" && to !== "cancelled") {
      this.#running--;
    }
    r.state = to;
    if (to === "fetch") this.#toFetch.add(r.key);
    if (to === "ready") this.#ready.add(r.key);
    if (to === "executing" && from !== "cancelled") this.#running++;
    if (to === "released") {
      this.#records.delete(r.key);
      this.#holders.forget(r.key);
    }
    this.#story.record(this.#now, r.key, from, to, reason);
  }

  #record(key: string): KeyRecord {
    let r = this.#records.get(key);
    if (r === undefined) {
      r = {
        key,
        state: "released",
        task: null,
        waitingFor: NONE,
        dependents: NONE,
        requests: NONE,
        nbytes: 0,
        peer: null,
        own: false,
        replica: true,
        freed: false,
        aborted: false,
        rerun: false,
      };
      this.#records.set(key, r);
    }
    return r;
  }

  /** Whether anything here still wants `r` (held data, a task, a task or request needing it). */
  #wanted(r: KeyRecord): boolean {
    if (r.dependents.size > 0 || r.requests.size > 0) return true;
    if (r.state === "memory") return !r.freed;
    return r.task !== null && r.state !== "cancelled";
  }

  /** Releases `r` if nothing wants it (a flight is let go when it lands). */
  #releaseIfUnwanted(r: KeyRecord, reason: string): void {
    if (this.#wanted(r) || r.state === "released") return;
    if (r.state === "flight" || r.state === "executing" || r.state === "cancelled") return;
    if (r.state === "memory") this.#out.push({ type: "drop", keys: [r.key] });
    this.#transition(r, "released", reason);
  }

  // ---- tasks ----

  #compute(key: string, task: TaskRun): void {
    const r = this.#record(key);
    switch (r.state) {
      case "memory":
        // A copy is here already (fetched, or computed before a reconnect): done.
        r.freed = false;
        r.replica = false;
        this.#send({ op: "task_finished", args: { key, nbytes: r.nbytes } });
        return;
      case "waiting":
      case "ready":
      case "executing":
        return; // Asked twice: the first is under way.
      case "cancelled":
        r.task = task;
        if (r.aborted) r.rerun = true;
        else this.#transition(r, "executing", "compute: asked again while it ran");
        return;
      case "fetch":
      case "flight":
      case "missing":
        // Fetched as another task's input, and now the scheduler asks for it to be
        // computed (it knows no copy): compute it; a copy that still lands is let go.
        r.task = task;
        this.#giveUp(r, "compute: asked to compute what it was fetching");
        return;
      case "released":
        r.task = task;
        this.#wait(r, "compute");
    }
  }

  /** Puts task `r` in waiting or ready, fetching inputs that are not here. */
  #wait(r: KeyRecord, reason: string): void {
    const task = r.task!;
    for (const dep of Object.keys(task.who_has)) {
      if (dep === r.key) continue;
      const d = this.#need(dep, task.who_has[dep], task.nbytes?.[dep], reason);
      d.dependents = withItem(d.dependents, r.key);
      if (d.state !== "memory") r.waitingFor = withItem(r.waitingFor, dep);
    }
    this.#transition(r, r.waitingFor.size > 0 ? "waiting" : "ready", reason);
  }

  /** The record of an input `key`, fetched from `holders` if not here. */
  #need(key: string, holders: string[] | undefined, nbytes: number | undefined, reason: string): KeyRecord {
    const d = this.#record(key);
    if (d.state === "released") {
      if (nbytes !== undefined) d.nbytes = nbytes;
      if (holders !== undefined) this.#holders.learn(key, holders);
      this.#transition(d, "fetch", reason);
    } else if (d.state === "fetch" || d.state === "missing") {
      if (holders !== undefined && this.#holders.holders(key).length === 0) this.#holders.learn(key, holders);
      if (d.state === "missing" && this.#holders.holders(key).length > 0) {
        this.#transition(d, "fetch", reason);
      }
    }
    return d;
  }

  #start(r: KeyRecord): void {
    this.#transition(r, "executing", "a thread is free");
    this.#out.push({ type: "execute", key: r.key, run: r.task!.run });
    // The shell reads the inputs as it runs the instruction: from here on they are only
    // kept if something else wants them.
    this.#unlinkInputs(r);
  }

  #executed(key: string, nbytes: number, report: Record<string, number>): void {
    this.#measured(report);
    const r = this.#records.get(key);
    if (r === undefined || (r.state !== "executing" && r.state !== "cancelled")) {
      this.#discard.push(key);
      return;
    }
    // A stopped run that finished all the same is as good as the run asked for again.
    const wanted = r.state === "executing" || r.rerun;
    r.aborted = r.rerun = false;
    if (!wanted && r.dependents.size === 0 && r.requests.size === 0) {
      this.#discard.push(key);
      r.task = null;
      this.#transition(r, "released", "executed, but nobody wants it");
      return;
    }
    r.nbytes = nbytes;
    r.replica = false;
    // A cancelled task's result kept for what here still needs it goes once that is done.
    r.freed = !wanted;
    this.#store.push(key);
    this.#transition(r, "memory", wanted ? "executed" : "executed, kept for tasks here");
    if (wanted) this.#send({ op: "task_finished", args: { key, nbytes, ...report } });
    r.task = null;
    this.#landed(r);
  }

  #executeFailed(key: string, error: unknown, killed: boolean, report: Record<string, number>): void {
    this.#measured(report);
    const r = this.#records.get(key);
    if (r === undefined || (r.state !== "executing" && r.state !== "cancelled")) return;
    if (r.state === "cancelled" && r.rerun) {
      // The stopped run ended as it was told to: the task asked for again runs now.
      r.aborted = r.rerun = false;
      this.#giveUp(r, "run again after a stopped run");
      return;
    }
    const wanted = r.state === "executing";
    const dependents = [...r.dependents];
    const requests = [...r.requests];
    r.task = null;
    this.#transition(r, "released", wanted ? "execute failed" : "execute failed, nobody wants it");
    if (wanted && this.#connected) this.#send({ op: "task_erred", key, error, killed, report });
    this.#orphaned(key, dependents, requests, "its task here failed");
  }

  /**
   * Task `r` (waiting or ready) will not run here: it goes, and what here still needs its
   * value fetches it from where the scheduler said it is.
   */
  #abort(r: KeyRecord): void {
    r.aborted = true;
    this.#out.push({ type: "abort", key: r.key });
  }

  #dropTask(r: KeyRecord, reason: string): void {
    const dependents = [...r.dependents];
    const requests = [...r.requests];
    this.#unlinkInputs(r);
    r.task = null;
    this.#transition(r, "released", reason);
    this.#orphaned(r.key, dependents, requests, reason);
  }

  /**
   * `key` was released while tasks or requests here still needed it: they fetch it
   * again from the holders the scheduler named to them (requests ask it).
   */
  #orphaned(key: string, dependents: string[], requests: number[], reason: string): void {
    for (const dep of dependents) {
      const t = this.#records.get(dep);
      if (t === undefined || t.task === null || (t.state !== "waiting" && t.state !== "ready")) continue;
      const d = this.#need(key, t.task.who_has[key], t.task.nbytes?.[key], reason);
      d.dependents = withItem(d.dependents, dep);
      if (d.state !== "memory") {
        t.waitingFor = withItem(t.waitingFor, key);
        if (t.state === "ready") this.#transition(t, "waiting", reason);
      }
    }
    for (const id of requests) {
      const q = this.#requests.get(id);
      if (q === undefined) continue;
      const d = this.#need(key, undefined, undefined, reason);
      if (d.state === "memory") this.#settle(q, key, null);
      else d.requests = withItem(d.requests, id);
    }
  }

  /** Task `r` no longer needs its inputs: inputs nothing else wants go. */
  #unlinkInputs(r: KeyRecord): void {
    if (r.task === null) return;
    for (const dep of Object.keys(r.task.who_has)) {
      const d = this.#records.get(dep);
      if (d === undefined || dep === r.key) continue;
      d.dependents.delete(r.key);
      this.#releaseIfUnwanted(d, `not needed by ${r.key}`);
    }
    r.waitingFor.clear();
  }

  /** Forgets a task, or lets go of a copy (free_keys, cancel_task). */
  #free(key: string, cancel: boolean, reason: string): void {
    const r = this.#records.get(key);
    if (r === undefined) return;
    switch (r.state) {
      case "memory":
        r.own = false;
        r.freed = true;
        this.#releaseIfUnwanted(r, reason);
        return;
      case "waiting":
      case "ready":
        this.#dropTask(r, reason);
        return;
      case "executing":
        this.#transition(r, "cancelled", reason);
        if (cancel) this.#abort(r);
        return;
      case "cancelled":
        r.rerun = false;
        if (cancel && !r.aborted) this.#abort(r);
        return;
      default:
        // A key being fetched: only its task part goes (inputs of tasks here stay wanted).
        r.task = null;
        this.#releaseIfUnwanted(r, reason);
    }
  }

  #put(key: string, nbytes: number, own: boolean): void {
    const r = this.#record(key);
    r.own = own;
    r.freed = false;
    r.replica = false;
    if (r.state === "memory") {
      r.nbytes = nbytes;
      return;
    }
    // A task of this key, waiting or running, is done: the value is here. A running one's
    // result will be let go (its executor finishes it, the state moved on).
    const task = r.state === "cancelled" && !r.rerun ? null : r.task;
    r.aborted = r.rerun = false;
    if (r.state === "waiting" || r.state === "ready") this.#unlinkInputs(r);
    this.#transition(r, "memory", "put");
    r.nbytes = nbytes;
    if (task !== null && this.#connected) this.#send({ op: "task_finished", args: { key, nbytes } });
    r.task = null;
    this.#landed(r);
  }

  #delete(key: string): void {
    const r = this.#records.get(key);
    if (r === undefined || r.state !== "memory") return;
    this.#out.push({ type: "drop", keys: [key] });
    const dependents = [...r.dependents];
    const requests = [...r.requests];
    this.#transition(r, "released", "deleted");
    // Tasks here that needed it fetch it again, if a copy is left elsewhere.
    this.#orphaned(key, dependents, requests, "input deleted");
  }

  /** `r` reached memory: tasks waiting on it may be ready, requests may be answered. */
  #landed(r: KeyRecord): void {
    for (const dep of r.dependents) {
      const t = this.#records.get(dep);
      if (t === undefined || t.state !== "waiting") continue;
      t.waitingFor.delete(r.key);
      if (t.waitingFor.size === 0) this.#transition(t, "ready", `input ${r.key} here`);
    }
    for (const id of [...r.requests]) {
      const q = this.#requests.get(id);
      if (q !== undefined) this.#settle(q, r.key, null);
    }
    r.requests.clear();
  }

  // ---- requests ----

  #acquire(id: number, keys: string[], whoHas: Record<string, string[]> | undefined, replica: boolean): void {
    const q: Request = { id, pending: new Set(), replica, missing: {}, error: null, hasError: false };
    this.#requests.set(id, q);
    for (const key of new Set(keys)) {
      const r = this.#records.get(key);
      if (r?.state === "memory") continue;
      const d = this.#need(key, whoHas?.[key], undefined, `request ${id}`);
      if (!replica) d.replica = false;
      if (
        d.state === "waiting" || d.state === "ready" || d.state === "executing" || d.state === "cancelled"
      ) {
        // A task here computes it: the request waits for the task.
      }
      d.requests = withItem(d.requests, id);
      q.pending.add(key);
    }
    this.#finishRequest(q);
  }

  /** `key` of request `q` is settled: here, or lost (`missing` holders), or refused. */
  #settle(q: Request, key: string, missing: string[] | null, error?: unknown): void {
    if (!q.pending.delete(key)) return;
    this.#records.get(key)?.requests.delete(q.id);
    if (missing !== null) q.missing[key] = missing;
    if (error !== undefined && !q.hasError) {
      q.error = error;
      q.hasError = true;
    }
    this.#finishRequest(q);
  }

  #finishRequest(q: Request): void {
    if (q.pending.size > 0) return;
    this.#requests.delete(q.id);
    this.#out.push(
      q.hasError
        ? { type: "acquired", id: q.id, missing: q.missing, error: q.error }
        : { type: "acquired", id: q.id, missing: q.missing },
    );
  }

  // ---- fetches ----

  #fetched(peer: string, nbytes: Record<string, number>): void {
    this.#holders.answered(peer);
    const stored: KeyRecord[] = [];
    const sizes: Record<string, number> = {};
    let replica = true;
    for (const key of Object.keys(nbytes)) {
      const r = this.#records.get(key);
      if (r === undefined || r.state !== "flight" || r.peer !== peer) {
        this.#discard.push(key);
        continue;
      }
      if (!this.#wanted(r)) {
        this.#discard.push(key);
        this.#transition(r, "released", "fetched, but nobody wants it");
        continue;
      }
      this.#transition(r, "memory", `fetched from ${peer}`);
      r.nbytes = nbytes[key];
      this.#store.push(key);
      stored.push(r);
      sizes[key] = r.nbytes;
      replica &&= r.replica;
    }
    // Told before any request is answered: gather_keys' reply must find the keys known.
    if (stored.length > 0 && this.#connected) {
      this.#send({ op: "add_keys", args: { keys: Object.keys(sizes), nbytes: sizes, replicas: replica } });
    }
    for (const r of stored) {
      if (r.task !== null) {
        // Fetched as an input, and asked for as a task too: the task is done.
        if (this.#connected) this.#send({ op: "task_finished", args: { key: r.key, nbytes: r.nbytes } });
        r.task = null;
      }
      this.#landed(r);
    }
  }

  /** The flight from `peer` ended: what it did not bring goes back to fetch (or is settled). */
  #fetchEnded(peer: string, how: "done" | "gone" | "busy" | "refused", error?: unknown): void {
    const keys = [...(this.#flights.get(peer) ?? [])];
    this.#flights.delete(peer);
    if (how === "busy") this.#holders.busy(peer, keys, this.#now);
    else this.#holders.answered(peer);
    for (const key of keys) {
      const r = this.#records.get(key)!;
      if (how === "done" || how === "gone") this.#holders.failed(peer, key);
      if (!this.#wanted(r)) {
        this.#transition(r, "released", `fetch from ${peer} ${how}, nobody wants it`);
        continue;
      }
      if (how === "refused") {
        this.#refused(r, error);
        continue;
      }
      this.#transition(r, "fetch", `fetch from ${peer}: ${how === "done" ? "it lacks the key" : how}`);
    }
  }

  /** A holder refused `r` for a reason that asking elsewhere will not fix: its tasks fail with it. */
  #refused(r: KeyRecord, error: unknown): void {
    for (const dep of [...r.dependents]) {
      const t = this.#records.get(dep);
      if (t === undefined || t.task === null) continue;
      if (t.state !== "waiting" && t.state !== "ready") continue;
      this.#dropTask(t, `input ${r.key} refused`);
      if (this.#connected) this.#send({ op: "task_erred", key: dep, error, killed: false, report: {} });
    }
    for (const id of [...r.requests]) {
      const q = this.#requests.get(id);
      if (q !== undefined) this.#settle(q, r.key, null, error);
    }
    r.dependents.clear();
    r.requests.clear();
    if (r.state === "flight") this.#transition(r, "fetch", "refused");
    this.#giveUp(r, "refused");
  }

  #whoHas(whoHas: Record<string, string[]>): void {
    for (const key of Object.keys(whoHas)) {
      const r = this.#records.get(key);
      if (r?.state !== "missing") continue;
      this.#holders.learn(key, whoHas[key]);
      this.#transition(r, "fetch", "who_has answered");
    }
  }

  /** No holder is left for `r`: tasks needing it report missing data, requests are answered. */
  #lost(r: KeyRecord): void {
    const named = this.#holders.named(r.key);
    for (const dep of [...r.dependents]) {
      const t = this.#records.get(dep);
      if (t === undefined || t.task === null || (t.state !== "waiting" && t.state !== "ready")) continue;
      const missing: Record<string, string[]> = {};
      for (const input of t.waitingFor) {
        const d = this.#records.get(input);
        if (d !== undefined && (d === r || d.state === "missing")) {
          missing[input] = this.#holders.named(input);
        }
      }
      missing[r.key] = named;
      this.#dropTask(t, `input ${r.key} lost`);
      if (this.#connected) this.#send({ op: "missing_data", args: { key: dep, missing } });
    }
    for (const id of [...r.requests]) {
      const q = this.#requests.get(id);
      if (q !== undefined) this.#settle(q, r.key, named);
    }
    r.dependents.clear();
    r.requests.clear();
    this.#giveUp(r, "no holder left");
  }

  /** `r` is no longer fetched: a task of its own computes it, else it goes. */
  #giveUp(r: KeyRecord, reason: string): void {
    if (r.state === "released") return;
    if (r.task !== null) {
      this.#holders.forget(r.key);
      this.#transition(r, "waiting", reason);
      // #wait moves it on to ready if its inputs are here.
      const task = r.task;
      r.waitingFor.clear();
      for (const dep of Object.keys(task.who_has)) {
        if (dep === r.key) continue;
        const d = this.#need(dep, task.who_has[dep], task.nbytes?.[dep], reason);
        d.dependents = withItem(d.dependents, r.key);
        if (d.state !== "memory") r.waitingFor = withItem(r.waitingFor, dep);
      }
      if (r.waitingFor.size === 0) this.#transition(r, "ready", reason);
      return;
    }
    this.#transition(r, "released", reason);
  }

  // ---- the scheduler ----

  #schedulerLost(): void {
    this.#connected = false;
    // Tasks not started are the scheduler's to send again; running ones finish, and
    // their results are named when the worker registers again.
    for (const r of [...this.#records.values()]) {
      if (r.task === null || this.#records.get(r.key) !== r) continue;
      if (r.state === "cancelled") r.rerun = false;
      else if (r.state === "waiting" || r.state === "ready") {
        this.#dropTask(r, "scheduler lost");
      } else if (r.state === "fetch" || r.state === "flight" || r.state === "missing") {
        r.task = null;
        this.#releaseIfUnwanted(r, "scheduler lost");
      }
    }
    // Lookups cannot be answered now.
    for (const r of [...this.#records.values()]) {
      if (r.state === "missing" && this.#records.get(r.key) === r) this.#lost(r);
    }
  }

  // ---- deciding ----

  #send(message: ToScheduler): void {
    this.#out.push({ type: "send", message });
  }

  /** Starts what can start: lookups, fetches within the limits, tasks on free threads. */
  #schedule(): void {
    const now = this.#now;
    const lookups: string[] = [];
    // Giving up on a key drops tasks, which may let go of other keys of this list.
    for (const key of this.#toFetch.size > 0 ? [...this.#toFetch] : []) {
      const r = this.#records.get(key);
      if (r?.state !== "fetch") continue;
      switch (this.#holders.status(key, now)) {
        case "lookup":
          if (!this.#connected) {
            this.#transition(r, "missing", "no holder, no scheduler to ask");
            this.#lost(r);
          } else {
            this.#holders.lookedUp(key);
            this.#transition(r, "missing", "no holder left to ask");
            lookups.push(key);
          }
          break;
        case "lost":
          this.#transition(r, "missing", "no holder left");
          this.#lost(r);
          break;
      }
    }
    if (lookups.length > 0) this.#out.push({ type: "lookup", keys: lookups });
    if (this.#paused) return;
    if (this.#toFetch.size > 0) {
      const askable = [...this.#toFetch].filter((key) => this.#holders.status(key, now) === "ask");
      if (askable.length > 0) this.#startFetches(askable, now);
    }
    const onExecutors = this.nthreads * (1 + this.#ahead());
    while (this.#running < onExecutors && this.#ready.size > 0) {
      const key = this.#ready.values().next().value!;
      this.#start(this.#records.get(key)!);
    }
    const wake = this.#toFetch.size > 0 ? this.#holders.wakeAt(now) : null;
    if (wake !== null && wake !== this.#wakeAt) this.#out.push({ type: "wake", at: wake });
    this.#wakeAt = wake;
  }

  /** Tasks handed to each thread beyond the one it runs: short tasks go ahead, long ones not. */
  #ahead(): number {
    if (this.#taskMs === null) return 0;
    return Math.min(EXECUTE_AHEAD_MAX, Math.floor(EXECUTE_AHEAD_MS / Math.max(this.#taskMs, 0.001)));
  }

  /** Takes the compute time of a run that ended (report `start` and `stop`, ms) into the mean. */
  #measured(report: Record<string, number>): void {
    const ms = report.stop - report.start;
    if (!Number.isFinite(ms) || ms < 0) return;
    this.#taskMs = this.#taskMs === null ? ms : 0.8 * this.#taskMs + 0.2 * ms;
  }

  #startFetches(keys: string[], now: number): void {
    const limits = this.#limits;
    let fetches = this.inFlight().fetches;
    let bytes = this.#flightBytes;
    const batchBytes = new Map<string, number>();
    const plan = this.#holders.choose(keys, now, (peer, key) => {
      const size = this.#records.get(key)!.nbytes;
      const inBatch = batchBytes.get(peer);
      if (inBatch === undefined) {
        // A new request: room for one more in flight, in all and from this peer.
        if (fetches >= limits.fetches || this.#flights.has(peer)) return false;
        if (bytes > 0 && bytes + size > limits.bytes) return false;
        fetches++;
        bytes += size;
        batchBytes.set(peer, size);
        return true;
      }
      if (inBatch + size > limits.batch || bytes + size > limits.bytes) return false;
      batchBytes.set(peer, inBatch + size);
      bytes += size;
      return true;
    });
    for (const [peer, batch] of plan) {
      let flight = this.#flights.get(peer);
      if (flight === undefined) this.#flights.set(peer, flight = new Set());
      for (const key of batch) {
        const r = this.#records.get(key)!;
        this.#transition(r, "flight", `asked of ${peer}`);
        r.peer = peer;
        flight.add(key);
        this.#flightBytes += r.nbytes;
      }
      this.#out.push({ type: "fetch", peer, keys: batch });
    }
  }

  // ---- invariants ----

  /**
   * Checks that the state agrees with itself; throws naming the first broken invariant.
   * O(keys + edges): the tests and the simulation call it after every event.
   */
  validate(): void {
    const fail = (what: string): never => {
      throw new Error(`internal: invalid worker state on ${this.address}: ${what}`);
    };
    let running = 0;
    let flightBytes = 0;
    const isTask = (s: KeyState) => s === "waiting" || s === "ready" || s === "executing";
    for (const [key, r] of this.#records) {
      const k = JSON.stringify(key);
      if (r.key !== key) fail(`key ${k} is stored under another key`);
      if (r.state === "released") fail(`key ${k} is released but still known`);
      if (isTask(r.state) && r.task === null) fail(`key ${k} is ${r.state} with no task`);
      if (r.state === "waiting" && r.waitingFor.size === 0) fail(`task ${k} is waiting on nothing`);
      if (r.state !== "waiting" && r.waitingFor.size > 0) fail(`key ${k} is ${r.state} but waits on inputs`);
      if ((r.state === "ready") !== this.#ready.has(key)) {
        fail(`key ${k} is ${r.state}, ready list disagrees`);
      }
      if ((r.state === "fetch") !== this.#toFetch.has(key)) {
        fail(`key ${k} is ${r.state}, fetch list disagrees`);
      }
      if (r.state === "executing" || r.state === "cancelled") running++;
      if (r.state === "flight") {
        if (r.peer === null || !this.#flights.get(r.peer)?.has(key)) {
          fail(`key ${k} is in flight from no peer`);
        }
        flightBytes += r.nbytes;
      } else if (r.peer !== null) fail(`key ${k} is ${r.state} with a peer`);
      if ((r.state === "fetch" || r.state === "missing") && !this.#wanted(r)) {
        fail(`key ${k} is ${r.state} but nothing wants it`);
      }
      for (const dep of r.waitingFor) {
        const d = this.#records.get(dep);
        if (d === undefined) fail(`task ${k} waits on ${dep}, which is not known`);
        if (d!.state === "memory") fail(`task ${k} waits on ${dep}, which is here`);
        if (!d!.dependents.has(key)) fail(`task ${k} waits on ${dep}, which does not list it`);
      }
      for (const dep of r.dependents) {
        const t = this.#records.get(dep);
        if (t === undefined || t.task === null || !Object.hasOwn(t.task.who_has, key)) {
          fail(`key ${k} lists dependent ${dep}, which is no task needing it`);
        }
        if (t!.state !== "waiting" && t!.state !== "ready") {
          fail(`key ${k} lists dependent ${dep}, which is ${t!.state}`);
        }
      }
      for (const id of r.requests) {
        if (!this.#requests.get(id)?.pending.has(key)) {
          fail(`key ${k} lists request ${id}, which does not wait on it`);
        }
      }
    }
    for (const [id, q] of this.#requests) {
      if (q.pending.size === 0) fail(`request ${id} waits on nothing`);
      for (const key of q.pending) {
        if (!this.#records.get(key)?.requests.has(id)) {
          fail(`request ${id} waits on ${key}, which does not list it`);
        }
      }
    }
    for (const [peer, keys] of this.#flights) {
      for (const key of keys) {
        const r = this.#records.get(key);
        if (r?.state !== "flight" || r.peer !== peer) {
          fail(`flight from ${peer} lists ${key}, which is ${r?.state}`);
        }
      }
    }
    if (running !== this.#running) fail(`${this.#running} tasks counted on executors, ${running} found`);
    const most = this.nthreads * (1 + EXECUTE_AHEAD_MAX);
    if (running > most) fail(`${running} tasks on executors, more than ${most} for ${this.nthreads} threads`);
    if (flightBytes !== this.#flightBytes) {
      fail(`${this.#flightBytes} bytes counted in flight, ${flightBytes} found`);
    }
  }
}
