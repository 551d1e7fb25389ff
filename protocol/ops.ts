/**
 * Every op of both node kinds, in one place: the argument schemas checked when a call
 * arrives, and the reply types. PROTOCOL.md documents the same table for other
 * languages.
 *
 * @module
 */

import * as v from "./_validate.ts";

/**
 * Functions a worker keeps by the scheduler's id, and the scheduler remembers a worker
 * has: both sides keep this many, least recently used first, touched on every
 * compute_task, so they always agree (PROTOCOL.md, "Function ids").
 */
export const KNOWN_FUNCTIONS_MAX = 1024;

/** How a function travels: as source, or named by module. */
export type FunctionSpec = { source: string } | { module: string; name: string };

const functionSpec: v.Schema<FunctionSpec> = v.oneOf<FunctionSpec>(
  "{ source } or { module, name }",
  v.object({ source: v.name }),
  v.object({ module: v.moduleSpecifier, name: v.name }),
);

/** One op: its argument schema, and its reply type as a phantom. */
export interface OpSpec<A, R> {
  /** Checks the arguments at the boundary. */
  readonly args: v.Schema<A>;
  /** Never set: it carries the reply type. */
  readonly reply?: R;
}

function op<R>() {
  return <A>(args: v.Schema<A>): OpSpec<A, R> => ({ args });
}

/** `{ status: "OK" }`, the reply of ops that only act. */
export interface OkReply {
  /** Always "OK". */
  status: "OK";
}

/** What a worker says of itself. */
export interface WorkerIdentity {
  /** "worker". */
  type: "worker";
  /** A unique id, fresh at every start. */
  id: string;
  /** Where it listens, `tcp://host:port`. */
  address: string;
  /** Its name (its address unless given one). */
  name: string;
  /** How many tasks it runs at once. */
  nthreads: number;
  /** The scheduler it registers with. */
  scheduler: string;
}

/** What a scheduler says of itself. */
export interface SchedulerIdentity {
  /** "scheduler". */
  type: "scheduler";
  /** A unique id, fresh at every start. */
  id: string;
  /** Where it listens, `tcp://host:port`. */
  address: string;
  /** How many workers are registered. */
  workers: number;
  /** The dashboard's address, `http://host:port`, or null without one. */
  dashboard: string | null;
}

/** A registered worker as the scheduler knows it. */
export interface WorkerInfo {
  /** Where it listens. */
  address: string;
  /** Its name. */
  name: string;
  /** How many tasks it runs at once. */
  nthreads: number;
  /** How many keys it holds. */
  nkeys: number;
  /** Bytes it holds, by the nbytes it reported. */
  nbytes: number;
  /** Tasks sent to it and not finished. */
  processing: number;
  /** Seconds since it was last heard from. */
  last_seen: number;
  /** Its latest heartbeat's figures (executing, queued, cpu, rss, bytes_in, bytes_out, ...). */
  metrics: Record<string, number>;
  /** What its latest heartbeat said is wrong on it (a spill that fails, and why); empty when nothing. */
  problems: string[];
}

const keys = v.arrayOf(v.key);
/** Values (or holders, sizes) by key: the field names are keys too. */
const byKey = <T>(item: v.Schema<T>) => v.recordOf(item, { keys: v.key });
const address = v.address;
const errorInfo = v.object({ name: v.string, message: v.string, stack: v.optional(v.string) });

/** A transfer a worker made: `nbytes` of `keys` keys fetched from `from`, between `start` and `stop` (epoch ms). */
export interface Transfer {
  /** The peer it fetched from. */
  from: string;
  /** How many keys. */
  keys: number;
  /** How many bytes. */
  nbytes: number;
  /** When it started, epoch ms. */
  start: number;
  /** When it ended, epoch ms. */
  stop: number;
}

const transfer: v.Schema<Transfer> = v.object({
  from: v.string,
  keys: v.count,
  nbytes: v.count,
  start: v.number,
  stop: v.number,
});

/** A task as a client submits it in `update_graph`. */
export interface GraphTask {
  /** The key its result is stored under. */
  key: string;
  /** Index into the message's `functions`. */
  fn: number;
  /** Positional arguments; `Ref`s stand for the values of `deps`. */
  args: unknown[];
  /** Keys whose values it needs. */
  deps: string[];
  /** Higher runs first. */
  priority?: number;
  /** Times to run again after it throws. */
  retries?: number;
  /** Worker addresses or names it may run on. */
  workers?: string[];
}

const graphTask: v.Schema<GraphTask> = v.object({
  key: v.key,
  fn: v.count,
  args: v.arrayOf(v.unknown),
  deps: keys,
  priority: v.optional(v.number),
  retries: v.optional(v.count),
  workers: v.optional(v.arrayOf(v.name)),
});

/**
 * The reply of `get_data` with `bytes_max`: what fits (values held, by key), and the keys
 * held that did not fit, to be asked for again. Keys the worker lacks are in neither.
 */
export interface DataPart {
  /** Values by key. */
  data: Record<string, unknown>;
  /** Keys it holds that were left for a later get_data. */
  rest: string[];
}

/**
 * A worker's ops that only its scheduler may send, on the connection the worker
 * registered on: they change what the scheduler believes of the worker (its tasks, its
 * function ids, its keys), so `broadcast` may not relay them either.
 */
export const SCHEDULER_ONLY_WORKER_OPS: ReadonlySet<string> = new Set([
  "compute_task",
  "gather_keys",
  "free_keys",
  "cancel_task",
]);

/** The ops a worker serves. */
export const workerOps = {
  // With bytes_max the reply is a DataPart; without it, `{ key: value }`.
  get_data: op<Record<string, unknown>>()(v.object({ keys, bytes_max: v.optional(v.positive) })),
  update_data: op<OkReply & { nbytes: Record<string, number> }>()(
    v.object({ data: byKey(v.unknown), report: v.optional(v.boolean) }),
  ),
  delete_data: op<OkReply>()(v.object({ keys, report: v.optional(v.boolean) })),
  keys: op<string[]>()(v.object({})),
  identity: op<WorkerIdentity>()(v.object({})),
  ping: op<"pong">()(v.object({})),
  terminate: op<OkReply>()(v.object({})),
  compute: op<OkReply & { key: string; nbytes: number }>()(
    v.object({
      key: v.key,
      function: functionSpec,
      keys: v.optional(keys),
      args: v.optional(v.arrayOf(v.unknown)),
    }),
  ),
  // From the scheduler, as notices on the worker's registration connection:
  compute_task: op<void>()(
    v.object({
      key: v.key,
      fn_id: v.count,
      function: v.optional(functionSpec),
      args: v.arrayOf(v.unknown),
      who_has: byKey(v.arrayOf(address)),
      // Sizes of the inputs, where the scheduler knows them: the worker's fetch limits count them.
      nbytes: v.optional(byKey(v.count)),
    }),
  ),
  free_keys: op<OkReply>()(v.object({ keys })),
  gather_keys: op<OkReply & { missing: string[] }>()(v.object({ who_has: byKey(v.arrayOf(address)) })),
  cancel_task: op<OkReply>()(v.object({ keys })),
  // What this worker knows of a key: its state here and its recent moves.
  story: op<KeyStory>()(v.object({ key: v.key })),
};

/** The reply of `story`: a key's state on that node ("released" when it knows none) and its recent moves. */
export interface KeyStory {
  key: string;
  state: string;
  /** Oldest first; `time` in ms since the epoch. */
  story: { time: number; key: string; from: string; to: string; reason: string }[];
  /** The scheduler's: why the key is where it is, in words (what it waits for, if it waits). */
  why?: string;
}

/** The ops a scheduler serves. */
export const schedulerOps = {
  // What the scheduler knows of a key: its task's state and its recent moves.
  story: op<KeyStory>()(v.object({ key: v.key })),
  register: op<OkReply & { heartbeat_interval_ms: number; worker_ttl_ms: number }>()(
    v.object({
      address,
      name: v.optional(v.string),
      nthreads: v.optional(v.positive),
      keys: v.optional(keys),
      nbytes: v.optional(byKey(v.count)),
      // Of keys, the worker's own data (update_data, compute): kept until deleted. The
      // others are kept after a scheduler restart only while a client claims them.
      external: v.optional(keys),
    }),
  ),
  unregister: op<OkReply>()(v.object({ address })),
  add_keys: op<OkReply>()(
    v.object({ address, keys, nbytes: v.optional(byKey(v.count)), replicas: v.optional(v.boolean) }),
  ),
  remove_keys: op<OkReply>()(v.object({ address, keys })),
  who_has: op<Record<string, string[]>>()(v.object({ keys: v.optional(keys) })),
  has_what: op<Record<string, string[]>>()(v.object({ workers: v.optional(v.arrayOf(address)) })),
  ncores: op<Record<string, number>>()(v.object({})),
  workers: op<WorkerInfo[]>()(v.object({})),
  // What is wrong with the queue, in words: tasks no worker may run, tasks with no worker at all.
  problems: op<string[]>()(v.object({})),
  // How many workers the work would like (an autoscaler's target; LocalCluster.adapt asks it).
  adaptive_target: op<{ workers: number }>()(v.object({})),
  delete_data: op<OkReply>()(v.object({ keys })),
  broadcast: op<Record<string, unknown>>()(
    v.object({
      msg: v.object({ op: v.name, args: v.optional(v.unknown) }),
      workers: v.optional(v.arrayOf(address)),
    }),
  ),
  identity: op<SchedulerIdentity>()(v.object({})),
  ping: op<"pong">()(v.object({})),
  terminate: op<OkReply>()(v.object({})),
  // Clients: the connection that registers is the client's for its lifetime.
  register_client: op<OkReply & { dashboard: string | null }>()(v.object({ id: v.name })),
  update_graph: op<OkReply>()(
    v.object({ functions: v.arrayOf(functionSpec), tasks: v.arrayOf(graphTask), wanted: keys }),
  ),
  release_keys: op<OkReply>()(v.object({ keys })),
  cancel_keys: op<OkReply>()(v.object({ keys })),
  scatter: op<OkReply>()(v.object({ who_has: byKey(v.arrayOf(address)), nbytes: byKey(v.count) })),
  progress: op<Record<string, Record<string, number>>>()(v.object({})),
  // Workers, as notices on their registration connection:
  task_finished: op<void>()(
    v.object({
      key: v.key,
      nbytes: v.count,
      duration: v.number,
      start: v.optional(v.number),
      stop: v.optional(v.number),
      thread: v.optional(v.count),
    }),
  ),
  task_erred: op<void>()(
    v.object({
      key: v.key,
      error: errorInfo,
      killed: v.optional(v.boolean),
      start: v.optional(v.number),
      stop: v.optional(v.number),
      thread: v.optional(v.count),
    }),
  ),
  missing_data: op<void>()(v.object({ key: v.key, missing: byKey(v.arrayOf(address)) })),
  heartbeat: op<{ status: "OK" | "unknown"; heartbeat_interval_ms: number }>()(
    v.object({
      address,
      metrics: v.optional(v.recordOf(v.number)),
      transfers: v.optional(v.arrayOf(transfer)),
      // Said in words for the operator: a spill that fails, and why.
      problems: v.optional(v.arrayOf(v.string)),
    }),
  ),
  retire_workers: op<{ retired: string[]; moved: number }>()(
    v.object({ workers: v.arrayOf(address), close: v.optional(v.boolean) }),
  ),
};

/** The notices a scheduler sends a client about the keys it wants. */
export const clientOps = {
  key_done: op<void>()(v.object({ key: v.key, nbytes: v.count, workers: v.arrayOf(address) })),
  key_erred: op<void>()(v.object({ key: v.key, error: errorInfo, task: v.key })),
  key_cancelled: op<void>()(v.object({ key: v.key, reason: v.string })),
  key_lost: op<void>()(v.object({ key: v.key, reason: v.string })),
};

/** A table of ops. */
export type OpTable = Record<string, OpSpec<unknown, unknown>>;
/** The worker's op table type. */
export type WorkerOps = typeof workerOps;
/** The scheduler's op table type. */
export type SchedulerOps = typeof schedulerOps;
/** The client's op table type. */
export type ClientOps = typeof clientOps;
/** The checked arguments of op `K`. */
export type ArgsOf<T extends OpTable, K extends keyof T> = T[K] extends OpSpec<infer A, unknown> ? A : never;
/** The reply of op `K`. */
export type ReplyOf<T extends OpTable, K extends keyof T> = T[K] extends OpSpec<unknown, infer R> ? R : never;

/**
 * Sends notice `op` of `table` on `comm`: the op's name and its arguments' shape are
 * checked when the sender is compiled (the receiver checks them again at run time).
 */
export function notice<T extends OpTable, K extends keyof T & string>(
  comm: { notify(op: string, args: unknown): void },
  _table: T,
  op: K,
  args: ArgsOf<T, K>,
): void {
  comm.notify(op, args);
}
