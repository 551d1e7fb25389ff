/**
 * The client: hand the cluster functions and graphs, get futures back. The scheduler
 * decides where each task runs; results stay on workers until asked for, and then come
 * straight from the worker that holds them.
 *
 * @module
 */

import { type Address, formatAddress, parseAddress } from "../protocol/address.ts";
import { formatPath, Ref, VALUE_DEPTH_MAX } from "../protocol/codec.ts";
import { checkKey } from "../protocol/_validate.ts";
import type { Comm, Dispatch } from "../protocol/comm.ts";
import {
  BusyError,
  CancelledError,
  ConnectionClosedError,
  MissingDataError,
  reviveError,
  toRemoteErrorInfo,
} from "../protocol/errors.ts";
import { type Sendable, toFunctionSpec } from "../protocol/functions.ts";
import {
  clientOps,
  type FunctionSpec,
  type GraphTask,
  notice,
  schedulerOps,
  type WorkerInfo,
} from "../protocol/ops.ts";
import { ConnectionPool } from "../protocol/pool.ts";
import { fetchData, Holders } from "../protocol/fetch.ts";
import { dispatchTo } from "../protocol/server.ts";
import { openComm, type SecurityOptions, tokenFromEnv } from "../protocol/handshake.ts";
import { randomToken, tokenize } from "./_tokenize.ts";
import { LocalCluster, type LocalClusterOptions } from "./local.ts";
import { Backoff, deadline, delay, keepingAlive } from "../util/time.ts";

/** Per-task options; pass `taskOptions({...})` as the last argument of `submit` or `map`. */
export interface SubmitOptions {
  /** The result's key; by default derived from the function and arguments (pure) or random. */
  key?: string;
  /** Worker addresses or names the task may run on. */
  workers?: string[];
  /** Higher runs first (default 0). */
  priority?: number;
  /** Times to run again after the function throws (default 0). */
  retries?: number;
  /** Same function and arguments give the same key, so repeated submits share one result (default true). */
  pure?: boolean;
}

/** Marks the last argument of `submit`/`map` as options, not an argument of the function. */
export class TaskOptions {
  /** The options. */
  readonly options: SubmitOptions;
  /** Wraps `options`. */
  constructor(options: SubmitOptions) {
    this.options = options;
  }
}

/**
 * Options for one `submit` or `map` call, given as its last argument.
 *
 * @example
 * ```ts
 * import { Client, taskOptions } from "@dist/dist";
 * const client = await Client.connect("tcp://127.0.0.1:8786");
 * const x = client.submit((a: number) => a + 1, 1, taskOptions({ key: "x", priority: 10, retries: 2 }));
 * console.log(await x.result()); // 2
 * await client.close();
 * ```
 */
export function taskOptions(options: SubmitOptions): TaskOptions {
  return new TaskOptions(options);
}

/** Where a future's key stands, as far as this client knows. */
export type FutureStatus = "pending" | "finished" | "error" | "cancelled" | "lost";

/** What the client remembers of a task it submitted, to submit it again to a restarted scheduler. */
type TaskRecord = Omit<GraphTask, "key" | "fn"> & {
  /** Submission order: a task's dependencies always come before it. */
  seq: number;
  /** The function (the wire's `fn` indexes a message's table of them). */
  spec: FunctionSpec;
};

interface KeyRecord {
  task?: TaskRecord;
  /** Whether the scheduler was asked for it on this client's behalf: only then does a release follow. */
  told: boolean;
  refs: number;
  status: FutureStatus;
  workers: string[];
  nbytes: number;
  error: Error | null;
  waiters: (() => void)[];
  /** A pending task: its dependencies' tasks are kept (as lineage) until it is done. */
  active: boolean;
}

/** A result that lives (or will live) on a worker of the cluster. */
export class Future<T = unknown> {
  /** The key of the result. */
  readonly key: string;
  /** The client that holds it. */
  readonly client: Client;
  #released = false;

  /** Futures are made by `Client`; one more reference to `key`. */
  constructor(key: string, client: Client) {
    this.key = key;
    this.client = client;
  }

  /** pending, finished, error, cancelled or lost. */
  get status(): FutureStatus {
    return this.client._status(this.key);
  }

  /** True once finished, failed, cancelled or lost. */
  done(): boolean {
    return this.status !== "pending";
  }

  /**
   * The value, fetched from the worker that holds it. Rejects with the task's own error
   * (class, message, stack; `error.task` names the task that failed first),
   * CancelledError, or MissingDataError for data that was lost.
   */
  async result(): Promise<T> {
    const [value] = await this.client.gather([this]);
    return value as T;
  }

  /** Cancels the task (and what depends on it); `result()` then rejects with CancelledError. */
  cancel(): Promise<void> {
    return this.client.cancel([this]);
  }

  /** Drops this reference; once no future holds the key, the cluster deletes the result. */
  release(): void {
    if (this.#released) return;
    this.#released = true;
    this.client._decref(this.key, this);
  }

  /** Resolves once the future is done (whatever the outcome). */
  wait(): Promise<void> {
    return this.client._settled(this.key);
  }

  /**
   * Why the task is where it is, in the scheduler's words: what it waits for (its inputs,
   * a free thread, a worker its `workers` restriction allows), where it runs, or why it
   * failed. E.g. `queued: it may run only on worker-9, and no connected worker is one; it
   * fails in 41 s (--no-workers-timeout) unless one connects`.
   */
  why(): Promise<string> {
    return this.client._why(this.key);
  }
}

/** Options of `Client.connect`. */
export interface ClientOptions extends SecurityOptions {
  /** Largest frame accepted from a node. */
  frameBytesMax?: number;
  /** Called by `close()` after the client has closed (LocalCluster uses it). */
  onClose?: () => Promise<void>;
  /**
   * How long to keep trying to reach a scheduler that went away (a restart), in ms;
   * futures wait meanwhile and their tasks are submitted again. Default 60 s; 0 gives up at once.
   */
  reconnectTimeoutMs?: number;
}

/** First and largest wait between attempts to reach a lost scheduler. */
const RECONNECT_FIRST_MS = 100;
const RECONNECT_MAX_MS = 2_000;
/**
 * How long a gather whose holders died waits for the key to be in memory again (the
 * scheduler recomputes it from its task), unless the scheduler says it is lost first.
 */
const LOST_HOLDER_WAIT_MS = 120_000;
/** First and largest pause between two asks of where such a key is now. */
const LOST_HOLDER_PAUSE_FIRST_MS = 50;
const LOST_HOLDER_PAUSE_MAX_MS = 1_000;

/** Any function a task may run. */
// deno-lint-ignore no-explicit-any
export type TaskFunction = (...args: any[]) => unknown;
/** What a future of `F` resolves to: its awaited return type. */
export type ResultOf<F> = F extends (...args: never[]) => infer R ? Awaited<R> : unknown;
/** What `gather` makes of a structure of futures: the same shape, with values. */
export type Gathered<T> = T extends Future<infer V> ? V
  : T extends readonly unknown[] ? { [K in keyof T]: Gathered<T[K]> }
  : T extends Record<string, unknown> ? { [K in keyof T]: Gathered<T[K]> }
  : T;

/**
 * What a task may be given where its function takes a `T`: the value, or a future of it,
 * also inside arrays and plain objects (the task gets the value).
 */
export type Arg<T> =
  | T
  | Future<T>
  | (T extends readonly unknown[] ? { [K in keyof T]: Arg<T[K]> }
    : T extends Record<string, unknown> ? { [K in keyof T]: Arg<T[K]> }
    : never);
/** The arguments for parameters `P`, each an `Arg`. */
export type TaskArgs<P extends readonly unknown[]> = { [K in keyof P]: Arg<P[K]> };
/**
 * What `submit(fn, ...args)` takes after `fn`: its parameters' `Arg`s, then optionally
 * `taskOptions(...)`. A plain options object in that place (Dask's habit) is a type error,
 * unless `fn` takes one.
 */
export type SubmitArgs<P extends readonly unknown[]> = [...TaskArgs<P>] | [...TaskArgs<P>, TaskOptions];
/** What `map(fn, ...iterables)` takes after `fn`: one iterable of `Arg`s per parameter, then optionally `taskOptions(...)`. */
export type MapArgs<P extends readonly unknown[]> =
  | [...{ [K in keyof P]: Iterable<Arg<P[K]>> }]
  | [...{ [K in keyof P]: Iterable<Arg<P[K]>> }, TaskOptions];

/** A Dask-style graph: `{ key: value | [fn, ...args] }`; an argument naming a key is that key's value. */
export type Graph = Record<string, unknown>;

function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (typeof v !== "object" || v === null) return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

/**
 * The codec's own error for a value nested too deep (a circular one, most likely): the
 * walks below meet such a value before the codec does, and must not overflow the stack.
 */
function tooDeep(root: string, path: (string | number)[]): TypeError {
  return new TypeError(
    `Cannot send ${formatPath(root, path)}: nested deeper than ${VALUE_DEPTH_MAX} levels; ` +
      "is it a circular reference?",
  );
}

/** `value` with futures replaced by references; their keys collected in `deps`. */
function refsForFutures(value: unknown, deps: Set<string>, path: (string | number)[] = []): unknown {
  if (value instanceof Future) {
    deps.add(value.key);
    return new Ref(value.key);
  }
  if (Array.isArray(value)) {
    if (path.length >= VALUE_DEPTH_MAX) throw tooDeep("args", path);
    return value.map((v, i) => {
      path.push(i);
      const out = refsForFutures(v, deps, path);
      path.pop();
      return out;
    });
  }
  if (isPlainObject(value)) {
    if (path.length >= VALUE_DEPTH_MAX) throw tooDeep("args", path);
    const out: Record<string, unknown> = {};
    for (const key in value) {
      path.push(key);
      out[key] = refsForFutures(value[key], deps, path);
      path.pop();
    }
    return out;
  }
  return value;
}

function collectFutures(value: unknown, out: Future[], path: (string | number)[] = []): Future[] {
  if (value instanceof Future) out.push(value);
  else if (Array.isArray(value) || isPlainObject(value)) {
    if (path.length >= VALUE_DEPTH_MAX) throw tooDeep("value", path);
    const array = Array.isArray(value);
    for (const key in value) {
      path.push(array ? Number(key) : key);
      collectFutures((value as Record<string, unknown>)[key], out, path);
      path.pop();
    }
  }
  return out;
}

function fill(value: unknown, values: Map<string, unknown>): unknown {
  if (value instanceof Future) return values.get(value.key);
  if (Array.isArray(value)) return value.map((v) => fill(v, values));
  if (isPlainObject(value)) {
    const out: Record<string, unknown> = {};
    for (const key in value) out[key] = fill(value[key], values);
    return out;
  }
  return value;
}

function functionName(fn: unknown): string {
  const name = typeof fn === "function" && fn.name
    ? fn.name
    : typeof fn === "object" && fn
    ? (fn as { name?: string }).name
    : "";
  // Keys are prefix-token: a dash inside the name would split the prefix.
  // Keys must be well-formed: a name with a lone surrogate must not make one.
  return (name || "lambda").replace(/^bound /, "").replaceAll("-", "_").toWellFormed();
}

const identity = { source: "(value) => value" };

/**
 * Most items (tasks, their dependencies and arguments) in one update_graph message, and
 * most keys in one release_keys. The scheduler takes a message in one turn, so a larger
 * graph goes in parts: between them it hears heartbeats and other clients. Small parts
 * also die young in the scheduler's heap: with 100,000 items a part lived through two
 * young collections and went to the old generation as garbage (a 300k-task graph peaked
 * at 752 MB of scheduler RSS; 645 MB with parts of 10,000).
 */
export const GRAPH_ITEMS_PER_MESSAGE = 10_000;

/** A connection to a dist cluster's scheduler. */
export class Client implements AsyncDisposable {
  /** This client's id. */
  readonly id: string;
  /** The scheduler's address. */
  readonly scheduler: string;
  #comm: Comm;
  /** Waits for results under way, and the hold they keep on the connection (see #keepAlive). */
  #waiting = 0;
  #commHold: (() => void) | null = null;
  #dashboardLink: string | null = null;
  #target: Address;
  #options: ClientOptions;
  #dispatch: Dispatch;
  #peers: ConnectionPool;
  #keys = new Map<string, KeyRecord>();
  /**
   * Tasks of keys no future holds any more that a pending task still needs (the lineage
   * of what this client holds): a restarted scheduler gets them again with the held
   * tasks. Each goes when no pending task needs it, so it holds no more than the graph
   * still running.
   */
  #lineage = new Map<string, TaskRecord>();
  /** Per key, the pending tasks (held, or lineage) that need it. */
  #neededBy = new Map<string, number>();
  #seq = 0;
  #graph:
    | { functions: FunctionSpec[]; fnIndex: Map<string, number>; tasks: GraphTask[]; wanted: string[] }
    | null = null;
  #releases: string[] = [];
  #flushScheduled = false;
  #closed = false;
  #onClose?: () => Promise<void>;
  #registry = new FinalizationRegistry<string>((key) => this._decref(key));

  private constructor(id: string, target: Address, comm: Comm, dispatch: Dispatch, options: ClientOptions) {
    this.id = id;
    this.scheduler = formatAddress(target);
    this.#target = target;
    this.#comm = comm;
    this.#dispatch = dispatch;
    this.#options = options;
    this.#onClose = options.onClose;
    this.#peers = new ConnectionPool({
      authToken: options.authToken ?? tokenFromEnv(),
      tls: options.tls,
      handshakeTimeoutMs: options.handshakeTimeoutMs,
      frameBytesMax: options.frameBytesMax,
      keepsAlive: "busy",
    });
    comm.closed.then(() => this.#disconnected(comm));
  }

  /**
   * Connects to the scheduler at `address`, or at the address in a scheduler file
   * (`{ schedulerFile: PATH }`, written by `dist scheduler --scheduler-file PATH`; waited
   * for up to 60 s, as a batch job may start the client before the scheduler).
   *
   * @example
   * ```ts
   * import { Client } from "@dist/dist";
   * const client = await Client.connect("tcp://127.0.0.1:8786");
   * const x = client.submit((a: number) => a + 1, 1);
   * console.log(await x.result()); // 2
   * await client.close();
   * ```
   */
  static async connect(
    address: string | Address | { schedulerFile: string },
    options: ClientOptions = {},
  ): Promise<Client> {
    if (typeof address === "object" && address !== null && "schedulerFile" in address) {
      const { readSchedulerFile } = await import("../util/scheduler_file.ts");
      address = await readSchedulerFile(address.schedulerFile);
    }
    const target = parseAddress(address);
    const id = `client-${randomToken()}`;
    let client: Client | null = null;
    const dispatch = dispatchTo("client", clientOps, {
      key_done: (args) => client!.#onDone(args.key, args.workers, args.nbytes),
      key_erred: (args) => client!.#onError(args.key, reviveError(args.error, args.task)),
      key_cancelled: (args) =>
        client!.#onError(args.key, new CancelledError(args.key, args.reason), "cancelled"),
      key_lost: (args) =>
        client!.#onError(args.key, new MissingDataError([args.key], { cause: args.reason }), "lost"),
    });
    // The connection keeps the script alive only while it waits for something (see #keepAlive).
    const comm = await openComm(target, { ...options, dispatch, keepsAlive: "busy" });
    let reply: { dashboard?: string | null };
    try {
      reply = await comm.call("register_client", { id }) as { dashboard?: string | null };
    } catch (error) {
      await comm.close();
      throw error;
    }
    client = new Client(id, target, comm, dispatch, options);
    client.#dashboardLink = typeof reply?.dashboard === "string" ? reply.dashboard : null;
    return client;
  }

  /** The scheduler's dashboard, `http://host:port`, or null when it serves none. */
  get dashboardLink(): string | null {
    return this.#dashboardLink;
  }

  /**
   * Starts a LocalCluster (a scheduler here, worker processes on 127.0.0.1) and
   * connects to it; `close()` stops the cluster too.
   *
   * @example
   * ```ts
   * import { Client } from "@dist/dist";
   * await using client = await Client.local({ workers: 2, threads: 1 });
   * console.log(await client.gather(client.map((x: number) => x + 1, [1, 2, 3]))); // [2, 3, 4]
   * ```
   */
  static async local(options: LocalClusterOptions = {}): Promise<Client> {
    const cluster = await LocalCluster.start(options);
    try {
      return await Client.connect(cluster.address, {
        authToken: options.authToken,
        onClose: () => cluster.close(),
      });
    } catch (error) {
      await cluster.close();
      throw error;
    }
  }

  // ---- submitting ----

  /**
   * Runs `fn(...args)` somewhere in the cluster and returns its Future at once. Futures
   * among the arguments (also inside arrays and plain objects) are dependencies: the
   * task runs once they are done, with their values. A last argument made by
   * `taskOptions()` sets key, workers, priority, retries or pure.
   */
  submit<F extends TaskFunction>(fn: F, ...args: SubmitArgs<Parameters<F>>): Future<ResultOf<F>>;
  /** A function named by module: its arguments and result are not known to the type checker. */
  submit<T = unknown>(fn: FunctionSpec, ...args: unknown[]): Future<T>;
  submit(fn: Sendable, ...args: unknown[]): Future {
    let options: SubmitOptions = {};
    if (args.at(-1) instanceof TaskOptions) options = (args.pop() as TaskOptions).options;
    return this.#submit(fn, toFunctionSpec(fn), args, options);
  }

  /**
   * `fn` over each item of the iterables (zipped, like Dask's map); one future per item.
   */
  map<F extends TaskFunction>(fn: F, ...iterables: MapArgs<Parameters<F>>): Future<ResultOf<F>>[];
  /** A function named by module: its arguments and result are not known to the type checker. */
  map<T = unknown>(fn: FunctionSpec, ...iterables: unknown[]): Future<T>[];
  map(fn: Sendable, ...iterables: unknown[]): Future[] {
    this.#checkOpen();
    let options: SubmitOptions = {};
    if (iterables.at(-1) instanceof TaskOptions) options = (iterables.pop() as TaskOptions).options;
    if (options.key !== undefined) throw new TypeError("map takes no key option: each task gets its own key");
    const lists = iterables.map((it, i) => {
      if (it === null || typeof (it as Iterable<unknown>)[Symbol.iterator] !== "function") {
        throw new TypeError(`map: argument ${i + 2} is not iterable`);
      }
      return [...(it as Iterable<unknown>)];
    });
    const n = lists.length === 0 ? 0 : Math.min(...lists.map((l) => l.length));
    const spec = toFunctionSpec(fn);
    const out: Future[] = new Array(n);
    for (let i = 0; i < n; i++) out[i] = this.#submit(fn, spec, lists.map((l) => l[i]), options);
    return out;
  }

  #submit(fn: unknown, spec: FunctionSpec, args: unknown[], options: SubmitOptions): Future {
    this.#checkOpen();
    if (options.key !== undefined) checkKey(options.key, "submit: key option");
    const deps = new Set<string>();
    const wireArgs = refsForFutures(args, deps) as unknown[];
    const token = options.pure === false
      ? randomToken()
      : tokenize("source" in spec ? spec.source : [spec.module, spec.name], wireArgs);
    const key = options.key ?? `${functionName(fn)}-${token}`;
    const known = this.#keys.has(key);
    const future = this.#ref(key);
    if (!known) {
      this.#hold(key, {
        seq: this.#seq++,
        spec,
        args: wireArgs,
        deps: [...deps],
        priority: options.priority,
        retries: options.retries,
        workers: options.workers,
      });
    }
    return future;
  }

  /**
   * Computes a Dask-style graph and returns the values of `keys` (a key, or a nested
   * array of keys). `{ a: 1, b: [inc, "a"], c: [add, "a", "b"] }`: a task is an array
   * whose first item is a function; an argument that names a graph key is that key's
   * value. Only what `keys` need is run.
   */
  async get(graph: Graph, keys: string | unknown[]): Promise<unknown> {
    this.#checkOpen();
    const wanted = new Set<string>();
    const want = (k: unknown): void => {
      if (Array.isArray(k)) return k.forEach(want);
      if (typeof k !== "string" || !Object.hasOwn(graph, k)) {
        throw new RangeError(`get: key ${JSON.stringify(k)} is not in the graph`);
      }
      wanted.add(k);
    };
    want(keys);
    // Only the tasks the wanted keys need, dependencies first.
    const order: string[] = [];
    const state = new Map<string, "visiting" | "done">();
    const convert = (arg: unknown, found: Set<string>): unknown => {
      if (typeof arg === "string" && Object.hasOwn(graph, arg)) {
        checkKey(arg, "get: graph key");
        found.add(arg);
        return new Ref(arg);
      }
      if (Array.isArray(arg)) {
        if (typeof arg[0] === "function") {
          throw new TypeError("get: a task nested inside an argument needs a key of its own");
        }
        return arg.map((a) => convert(a, found));
      }
      return arg;
    };
    // Depth first with a stack of its own: a chain of 20,000 keys is 20,000 levels deep.
    const stack: { key: string; deps: string[]; next: number }[] = [];
    const enter = (key: string): void => {
      checkKey(key, "get: graph key");
      state.set(key, "visiting");
      const found = new Set<string>();
      const value = graph[key];
      if (Array.isArray(value) && typeof value[0] === "function") {
        value.slice(1).forEach((a) => convert(a, found));
      }
      stack.push({ key, deps: [...found], next: 0 });
    };
    for (const k of wanted) {
      if (state.has(k)) continue;
      enter(k);
      while (stack.length > 0) {
        const top = stack[stack.length - 1];
        if (top.next < top.deps.length) {
          const d = top.deps[top.next++];
          if (state.get(d) === "visiting") {
            throw new RangeError(`get: the graph has a cycle through ${JSON.stringify(d)}`);
          }
          if (!state.has(d)) enter(d);
        } else {
          state.set(top.key, "done");
          order.push(top.key);
          stack.pop();
        }
      }
    }
    const futures = new Map<string, Future>();
    try {
      for (const key of order) {
        const value = graph[key];
        const isTask = Array.isArray(value) && typeof value[0] === "function";
        const found = new Set<string>();
        const args = isTask ? (value.slice(1).map((a) => convert(a, found)) as unknown[]) : [value];
        const fn = isTask ? value[0] : identity;
        const spec = toFunctionSpec(fn);
        // Keys stay the user's; dependencies ride as references. Only the wanted keys
        // get futures: the rest are released as soon as their dependents have run.
        this.#checkOpen();
        const task: TaskRecord = { seq: this.#seq++, spec, args, deps: [...found] };
        if (wanted.has(key)) {
          const known = this.#keys.has(key);
          const f = this.#ref(key);
          futures.set(key, f);
          if (!known) this.#hold(key, task);
        } else {
          // Not held: kept as lineage while the wanted keys it leads to are pending.
          if (!this.#keys.has(key) && !this.#lineage.has(key)) {
            this.#lineage.set(key, task);
            this.#need(task);
          }
          this.#queueTask(key, task, false);
        }
      }
      const values = await this.gather(
        [...wanted].map((k) => futures.get(k)!),
      ) as unknown[];
      const byKey = new Map([...wanted].map((k, i) => [k, values[i]]));
      const shape = (k: unknown): unknown => Array.isArray(k) ? k.map(shape) : byKey.get(k as string);
      return shape(keys);
    } finally {
      for (const f of futures.values()) f.release();
    }
  }

  // ---- results ----

  /**
   * The values of the futures in `value` (a future, or arrays and plain objects holding
   * futures), in the same shape. Values are fetched from the workers that hold them,
   * one request per worker. Rejects with the first error among them.
   */
  async gather<T>(value: T): Promise<Gathered<T>> {
    this.#checkOpen();
    const futures = collectFutures(value, []);
    await Promise.all(futures.map((f) => this._settled(f.key)));
    for (const f of futures) {
      const rec = this.#keys.get(f.key);
      if (rec === undefined) throw new CancelledError(f.key, "released");
      if (rec.error) throw rec.error;
    }
    const values = await this.#fetch([...new Set(futures.map((f) => f.key))]);
    return fill(value, values) as Gathered<T>;
  }

  /**
   * Asks the scheduler who holds `keys` and remembers it. With `keepKnown`, a key the
   * scheduler names no holder for keeps the ones known (a lookup made only to find more).
   */
  async #lookUpHolders(keys: string[], keepKnown: boolean): Promise<void> {
    const whoHas = await this.#comm.call("who_has", { keys }) as Record<string, string[]>;
    for (const key of keys) {
      const rec = this.#keys.get(key);
      const holders = whoHas[key] ?? [];
      if (rec && !(keepKnown && holders.length === 0)) rec.workers = holders;
    }
  }

  /**
   * Fetches `keys` from their holders, choosing and moving on as `Holders` (the policy the
   * workers use too) says. A key whose holder closed is being recomputed by the
   * scheduler: it is waited for (news of the key, then a lookup) until
   * LOST_HOLDER_WAIT_MS. A key that holders answered without (stale copies) fails once
   * the lookups find no other.
   */
  async #fetch(keys: string[]): Promise<Map<string, unknown>> {
    const values = new Map<string, unknown>();
    const holders = new Holders();
    const gone = new Set<string>();
    for (const key of keys) holders.learn(key, this.#keys.get(key)?.workers ?? []);
    const until = deadline(LOST_HOLDER_WAIT_MS);
    const pause = new Backoff({ firstMs: LOST_HOLDER_PAUSE_FIRST_MS, maxMs: LOST_HOLDER_PAUSE_MAX_MS });
    const missing = (list: string[]) => {
      const error = new MissingDataError(list);
      for (const key of list) error.holders[key] = holders.named(key);
      return error;
    };
    for (;;) {
      const remaining = keys.filter((key) => !values.has(key));
      if (remaining.length === 0) return values;
      for (const key of remaining) {
        const rec = this.#keys.get(key);
        if (rec === undefined) throw new CancelledError(key, "released");
        if (rec.error) throw rec.error;
      }
      const now = performance.now();
      const toLookUp: string[] = [];
      const recomputed: string[] = [];
      for (const key of remaining) {
        const status = holders.status(key, now);
        if (status !== "lookup" && status !== "lost") continue;
        if (gone.has(key)) {
          if (until.expired()) throw missing([key]);
          recomputed.push(key);
        } else if (status === "lost") throw missing([key]);
        else toLookUp.push(key);
      }
      if (recomputed.length > 0) {
        // The scheduler says key_done again when it has recomputed the key, or key_lost
        // or key_erred: until then (or the deadline), look where the copies are now.
        await this.#keyNews(recomputed, Math.min(pause.next(), until.remaining()));
        toLookUp.push(...recomputed);
      }
      if (toLookUp.length > 0) {
        for (const key of toLookUp) holders.lookedUp(key);
        await this.#lookUpHolders(toLookUp, false);
        for (const key of toLookUp) holders.learn(key, this.#keys.get(key)?.workers ?? []);
        continue;
      }
      const plan = holders.choose(remaining, now);
      if (plan.size === 0) {
        // Only busy holders: wait for the first to come out of its pause.
        const at = holders.wakeAt(now);
        await delay(at === null ? LOST_HOLDER_PAUSE_FIRST_MS : at - now);
        continue;
      }
      let failure: unknown = null;
      await Promise.all([...plan].map(async ([worker, list]) => {
        try {
          const comm = await this.#peers.get(worker);
          await fetchData(comm, list, {
            bytesMax: this.#options.frameBytesMax,
            // Kept part by part: what arrived stays if a later part fails.
            onPart: (part) => {
              for (const key of list) if (Object.hasOwn(part, key)) values.set(key, part[key]);
            },
          });
          holders.answered(worker);
          // Answered without it: a stale copy.
          for (const key of list) if (!values.has(key)) holders.failed(worker, key);
        } catch (error) {
          const left = list.filter((key) => !values.has(key));
          if (error instanceof BusyError) holders.busy(worker, left, performance.now());
          else if (error instanceof ConnectionClosedError) {
            for (const key of left) {
              holders.failed(worker, key);
              gone.add(key);
            }
          } // Any other failure (say, a value over a limit) is the answer, and says why.
          else failure = error;
        }
      }));
      if (failure) throw failure;
    }
  }

  /** Resolves after `ms`, or sooner when the scheduler says something of one of `keys`. */
  #keyNews(keys: string[], ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(done, ms);
      for (const key of keys) this.#keys.get(key)?.waiters.push(done);
    });
  }

  /**
   * Puts `values` on workers and returns futures for them: an array gives an array of
   * futures, an object gives an object of futures under the same keys. `workers`
   * restricts where they go; `broadcast` puts every value on every (allowed) worker.
   */
  async scatter<T extends readonly unknown[] | Record<string, unknown>>(
    values: T,
    options: { workers?: string[]; broadcast?: boolean } = {},
  ): Promise<{ -readonly [K in keyof T]: Future<T[K]> }> {
    this.#checkOpen();
    const all = await this.#comm.call("workers", {}) as WorkerInfo[];
    const allowed = options.workers
      ? all.filter((w) => options.workers!.includes(w.address) || options.workers!.includes(w.name))
      : all;
    if (allowed.length === 0) {
      throw new RangeError(
        options.workers
          ? `scatter: none of the workers ${options.workers.join(", ")} is connected`
          : "scatter: no workers",
      );
    }
    const entries: [string, unknown][] = Array.isArray(values)
      ? values.map((v) => [`${typeName(v)}-${randomToken()}`, v])
      : Object.entries(values);
    for (const [key] of entries) checkKey(key, "scatter: key");
    const load = new Map(allowed.map((w) => [w.address, w.nbytes]));
    const perWorker = new Map<string, Record<string, unknown>>();
    const whoHas: Record<string, string[]> = {};
    for (const [key, value] of entries) {
      const targets = options.broadcast
        ? allowed.map((w) => w.address)
        : [[...load].reduce((a, b) => (b[1] < a[1] ? b : a))[0]];
      for (const t of targets) {
        let data = perWorker.get(t);
        if (data === undefined) perWorker.set(t, data = {});
        data[key] = value;
        load.set(t, load.get(t)! + sizeHint(value));
      }
      whoHas[key] = targets;
    }
    const nbytes: Record<string, number> = {};
    const outcomes = await Promise.allSettled([...perWorker].map(async ([worker, data]) => {
      Object.assign(nbytes, await updateData(await this.#peers.get(worker), data));
    }));
    // Workers that took their share hold values the scheduler never heard of and no
    // future will own when the scatter fails: they are taken back first.
    const takeBack = () =>
      // A worker whose share failed may still hold part of it: past the frame limit it goes in parts.
      Promise.all([...perWorker].map(async ([worker, data]) => {
        try {
          const comm = await this.#peers.get(worker);
          await comm.call("delete_data", { keys: Object.keys(data), report: false });
        } catch { /* a worker that is gone took them along */ }
      }));
    const failed = outcomes.find((o) => o.status === "rejected");
    if (failed) {
      await takeBack();
      throw failed.reason;
    }
    const futures = entries.map(([key]) => this.#ref(key));
    for (const [key] of entries) {
      const rec = this.#keys.get(key)!;
      rec.status = "finished";
      rec.workers = whoHas[key];
      rec.nbytes = nbytes[key] ?? 0;
      rec.told = true; // the scatter op below makes this client want it
    }
    try {
      await this.#comm.call("scatter", { who_has: whoHas, nbytes });
    } catch (error) {
      for (const f of futures) f.release();
      await takeBack();
      throw error;
    }
    if (Array.isArray(values)) return futures as never;
    return Object.fromEntries(entries.map(([key], i) => [key, futures[i]])) as never;
  }

  /** @internal What `Future.why()` says: the scheduler's account of `key`. */
  async _why(key: string): Promise<string> {
    this.#flush(); // a task just submitted is known to the scheduler before it is asked about
    const story = await this.#comm.call("story", { key }) as { state: string; why?: string };
    return story.why ?? story.state;
  }

  /** Cancels the futures' tasks, and what depends on them. */
  async cancel(futures: Future[]): Promise<void> {
    const keys = futures.map((f) => f.key);
    for (const key of keys) this.#onError(key, new CancelledError(key), "cancelled");
    this.#flush();
    if (!this.#comm.isClosed) await this.#comm.call("cancel_keys", { keys });
  }

  /** Closes the connection; the cluster forgets this client's futures and frees their data. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#flush();
    // Its connections do not keep the process alive by themselves (see #keepAlive).
    await keepingAlive(this.#closeAll());
  }

  async #closeAll(): Promise<void> {
    await this.#comm.close();
    await this.#peers.close();
    this.#lostScheduler();
    await this.#onClose?.();
  }

  /** `await using client = ...` closes it. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  // ---- internals shared with Future ----

  /** @internal Where `key` stands ("cancelled" once released). */
  _status(key: string): FutureStatus {
    return this.#keys.get(key)?.status ?? "cancelled";
  }

  /** @internal Resolves when `key` is no longer pending. */
  _settled(key: string): Promise<void> {
    const rec = this.#keys.get(key);
    if (rec === undefined || rec.status !== "pending") return Promise.resolve();
    return this.#keepAlive(new Promise((resolve) => rec.waiters.push(resolve)));
  }

  /**
   * Keeps the process alive while `waiting` is: the connection to the scheduler holds it
   * only while someone waits for a result, so a script that forgot `close()` still ends
   * once its own work is done (Dask's client is closed at interpreter exit).
   */
  #keepAlive<T>(waiting: Promise<T>): Promise<T> {
    if (this.#waiting++ === 0) this.#commHold = this.#comm.hold();
    return waiting.finally(() => {
      if (--this.#waiting > 0) return;
      this.#commHold?.();
      this.#commHold = null;
    });
  }

  /** @internal One reference to `key` fewer. */
  _decref(key: string, future?: Future): void {
    if (future) this.#registry.unregister(future);
    const rec = this.#keys.get(key);
    if (rec === undefined || --rec.refs > 0) return;
    this.#keys.delete(key);
    for (const w of rec.waiters.splice(0)) w();
    if (rec.task && (this.#neededBy.get(key) ?? 0) > 0 && !this.#closed) {
      // A pending task needs it: its task stays, as lineage.
      this.#lineage.set(key, rec.task);
      if (!rec.active) this.#need(rec.task);
    } else if (rec.active) this.#unneed(rec.task!);
    // A key the scheduler was never asked for (released in the turn it was submitted) needs no release.
    if (this.#closed || !rec.told) return;
    this.#releases.push(key);
    this.#scheduleFlush();
  }

  #ref(key: string): Future {
    let rec = this.#keys.get(key);
    if (rec === undefined) {
      rec = {
        refs: 0,
        status: "pending",
        workers: [],
        nbytes: 0,
        error: null,
        waiters: [],
        told: false,
        active: false,
      };
      this.#keys.set(key, rec);
    }
    rec.refs++;
    const future = new Future(key, this);
    this.#registry.register(future, key, future);
    return future;
  }

  #checkOpen(): void {
    if (this.#closed) {
      throw new ConnectionClosedError(`This client's connection to ${this.scheduler} is closed`);
    }
  }

  /** `key`, just given its first future, runs `task` (or the task its lineage kept). */
  #hold(key: string, task: TaskRecord): void {
    const rec = this.#keys.get(key)!;
    const kept = this.#lineage.get(key);
    if (kept !== undefined) {
      // Needed already as lineage: the same task, already counted for its dependencies.
      this.#lineage.delete(key);
      task = kept;
    } else this.#need(task);
    rec.task = task;
    rec.active = true;
    this.#queueTask(key, task);
  }

  /** One more pending task needs `task`'s dependencies. */
  #need(task: TaskRecord): void {
    for (const dep of task.deps) this.#neededBy.set(dep, (this.#neededBy.get(dep) ?? 0) + 1);
  }

  /** `task` is no longer pending: lineage that nothing pending needs now goes. */
  #unneed(task: TaskRecord): void {
    const stack = [task];
    while (stack.length > 0) {
      for (const dep of stack.pop()!.deps) {
        const n = (this.#neededBy.get(dep) ?? 0) - 1;
        if (n > 0) {
          this.#neededBy.set(dep, n);
          continue;
        }
        this.#neededBy.delete(dep);
        const kept = this.#lineage.get(dep);
        if (kept === undefined) continue;
        this.#lineage.delete(dep);
        stack.push(kept);
      }
    }
  }

  /** `key`'s future is done, one way or another: its task no longer needs its inputs. */
  #settle(rec: KeyRecord): void {
    if (!rec.active) return;
    rec.active = false;
    this.#unneed(rec.task!);
  }

  #queueTask(key: string, task: TaskRecord, wanted = true): void {
    const graph = this.#pendingGraph();
    graph.tasks.push({
      key,
      fn: this.#fnIndex(task.spec),
      args: task.args,
      deps: task.deps,
      priority: task.priority,
      retries: task.retries,
      workers: task.workers,
    });
    if (wanted) graph.wanted.push(key);
  }

  /**
   * The scheduler connection closed. Unless the client is closing, reconnect with
   * backoff and submit again every task a future still holds (a restarted scheduler
   * knows the data workers bring back when they register again; the rest it computes).
   */
  async #disconnected(comm: Comm): Promise<void> {
    if (this.#closed || comm !== this.#comm) return this.#lostScheduler();
    const until = deadline(this.#options.reconnectTimeoutMs ?? 60_000);
    const backoff = new Backoff({ firstMs: RECONNECT_FIRST_MS, maxMs: RECONNECT_MAX_MS });
    while (!this.#closed && !until.expired()) {
      await backoff.pause(until);
      if (this.#closed) break;
      let next: Comm;
      try {
        next = await openComm(this.#target, {
          ...this.#options,
          dispatch: this.#dispatch,
          keepsAlive: "busy",
        });
      } catch {
        continue;
      }
      try {
        await next.call("register_client", { id: this.id });
      } catch {
        await next.close();
        continue;
      }
      if (this.#closed) {
        await next.close();
        break;
      }
      this.#comm = next;
      if (this.#waiting > 0) {
        this.#commHold?.();
        this.#commHold = next.hold();
      }
      next.closed.then(() => this.#disconnected(next));
      this.#graph = null;
      this.#releases = [];
      // The held tasks and the lineage they still need, dependencies first (a large
      // graph goes in parts, and a part may only need keys of earlier ones).
      const tasks: [string, TaskRecord, boolean][] = [];
      for (const [key, rec] of this.#keys) {
        if (rec.task) tasks.push([key, rec.task, true]);
        else this.#pendingGraph().wanted.push(key);
      }
      for (const [key, task] of this.#lineage) tasks.push([key, task, false]);
      tasks.sort((a, b) => a[1].seq - b[1].seq);
      for (const [key, task, wanted] of tasks) this.#queueTask(key, task, wanted);
      this.#flush();
      return;
    }
    this.#lostScheduler();
  }

  #pendingGraph() {
    if (this.#graph === null) {
      this.#graph = { functions: [], fnIndex: new Map(), tasks: [], wanted: [] };
      this.#scheduleFlush();
    }
    return this.#graph;
  }

  #fnIndex(spec: FunctionSpec): number {
    const graph = this.#pendingGraph();
    const k = "source" in spec ? spec.source : `${spec.module}\0${spec.name}`;
    let i = graph.fnIndex.get(k);
    if (i === undefined) {
      graph.fnIndex.set(k, i = graph.functions.length);
      graph.functions.push(spec);
    }
    return i;
  }

  #scheduleFlush(): void {
    if (this.#flushScheduled) return;
    this.#flushScheduled = true;
    // Everything submitted in this turn travels in one message.
    queueMicrotask(() => this.#flush());
  }

  #flush(): void {
    this.#flushScheduled = false;
    const graph = this.#graph;
    this.#graph = null;
    // While reconnecting, nothing is sent: every live key is submitted again on reconnect.
    if (this.#comm.isClosed) return;
    const releases = this.#releases;
    this.#releases = [];
    if (graph && (graph.tasks.length > 0 || graph.wanted.length > 0)) {
      const { functions, tasks } = graph;
      // A key released in the turn it was submitted has no future left: asking for it
      // would pin it (and its value) in the cluster until this client leaves.
      const wanted = [...new Set(graph.wanted)].filter((key) => this.#keys.has(key));
      for (const key of wanted) this.#keys.get(key)!.told = true;
      const send = (part: GraphTask[], partWanted: string[]) =>
        this.#comm.call("update_graph", { functions, tasks: part, wanted: partWanted }).catch((error) => {
          // Lost with the connection: the reconnect submits again what futures hold (and
          // fails them if the scheduler stays away).
          if (error instanceof ConnectionClosedError && !this.#closed) return;
          for (const t of part) this.#onError(t.key, reviveError(toRemoteErrorInfo(error), t.key));
        });
      // A large graph goes in parts. Every part but the last asks for all its keys, so that
      // none is let go before the tasks of later parts that need it arrive; the release
      // below lets go of those that no future holds.
      let start = 0;
      let items = 0;
      for (let i = 0; i < tasks.length; i++) {
        const weight = 1 + tasks[i].deps.length + tasks[i].args.length;
        if (items + weight > GRAPH_ITEMS_PER_MESSAGE && i > start) {
          const part = tasks.slice(start, i);
          const keys = part.map((t) => t.key);
          for (const key of keys) releases.push(key);
          send(part, keys);
          start = i;
          items = 0;
        }
        items += weight;
      }
      send(start === 0 ? tasks : tasks.slice(start), wanted);
    }
    // Releases go after the graph, whose tasks may need a released key as an input (sent
    // first, the release could forget it: "Unknown key"). A key released and referenced
    // again in this turn has a future again and stays wanted.
    const keys = releases.filter((key) => !this.#keys.has(key));
    for (let i = 0; i < keys.length; i += GRAPH_ITEMS_PER_MESSAGE) {
      this.#release(keys.slice(i, i + GRAPH_ITEMS_PER_MESSAGE));
    }
  }

  /**
   * Sends release_keys; a list over the scheduler's message limit goes in halves. It
   * runs in a microtask, where a throw would be uncaught: a closed connection is left to
   * the reconnect, which asks only for what futures still hold.
   */
  #release(keys: string[]): void {
    try {
      notice(this.#comm, schedulerOps, "release_keys", { keys });
    } catch (error) {
      if (!(error instanceof RangeError) || keys.length < 2) return;
      const half = keys.length >> 1;
      this.#release(keys.slice(0, half));
      this.#release(keys.slice(half));
    }
  }

  #onDone(key: string, workers: string[], nbytes: number): void {
    const rec = this.#keys.get(key);
    if (rec === undefined) return;
    rec.status = "finished";
    rec.workers = workers;
    rec.nbytes = nbytes;
    rec.error = null;
    this.#settle(rec);
    for (const w of rec.waiters.splice(0)) w();
  }

  #onError(key: string, error: Error, status: FutureStatus = "error"): void {
    const rec = this.#keys.get(key);
    if (rec === undefined || rec.status === "cancelled") return;
    rec.status = status;
    rec.error = error;
    this.#settle(rec);
    for (const w of rec.waiters.splice(0)) w();
  }

  #lostScheduler(): void {
    this.#lineage.clear();
    this.#neededBy.clear();
    for (const [key, rec] of this.#keys) {
      if (rec.status !== "pending") continue;
      const why = this.#closed ? "This client was closed" : `Lost the scheduler ${this.scheduler}`;
      this.#onError(key, new ConnectionClosedError(`${why} before ${key} finished`));
    }
  }
}

function typeName(value: unknown): string {
  if (value === null) return "null";
  if (typeof value === "object") {
    return (Object.getPrototypeOf(value)?.constructor?.name ?? "object").toLowerCase();
  }
  return typeof value;
}

/**
 * Puts `data` on `comm`'s worker; resolves the sizes it reports. Values that pass the
 * message limit together (the send refuses with RangeError) go in halves, down to one
 * value, whose refusal is then the answer.
 */
async function updateData(comm: Comm, data: Record<string, unknown>): Promise<Record<string, number>> {
  try {
    const reply = await comm.call("update_data", { data, report: false }) as {
      nbytes: Record<string, number>;
    };
    return reply.nbytes;
  } catch (error) {
    const keys = Object.keys(data);
    if (!(error instanceof RangeError) || keys.length < 2) throw error;
    const half = (part: string[]) => updateData(comm, Object.fromEntries(part.map((k) => [k, data[k]])));
    const mid = keys.length >> 1;
    return { ...await half(keys.slice(0, mid)), ...await half(keys.slice(mid)) };
  }
}

function sizeHint(value: unknown): number {
  return ArrayBuffer.isView(value) ? value.byteLength : 64;
}

/**
 * Waits until every future is done (finished, failed, cancelled or lost), or until
 * `timeoutMs`; resolves which are done and which are not.
 */
export async function wait(
  futures: Future[],
  options: { timeoutMs?: number } = {},
): Promise<{ done: Future[]; notDone: Future[] }> {
  const all = Promise.all(futures.map((f) => f.wait()));
  if (options.timeoutMs === undefined) await all;
  else {
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([all, new Promise((resolve) => timer = setTimeout(resolve, options.timeoutMs))]);
    clearTimeout(timer);
  }
  return { done: futures.filter((f) => f.done()), notDone: futures.filter((f) => !f.done()) };
}

/** Yields the futures in the order they finish (or fail). */
export async function* asCompleted<T>(futures: Iterable<Future<T>>): AsyncGenerator<Future<T>> {
  const pending = new Set(futures);
  const ready: Future<T>[] = [];
  let wake: (() => void) | null = null;
  for (const f of pending) {
    f.wait().then(() => {
      ready.push(f);
      wake?.();
    });
  }
  while (pending.size > 0) {
    if (ready.length === 0) await new Promise<void>((resolve) => wake = resolve);
    wake = null;
    while (ready.length > 0) {
      const f = ready.shift()!;
      pending.delete(f);
      yield f;
    }
  }
}
