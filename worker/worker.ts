/**
 * The worker node: holds data, serves it, and computes on it, fetching missing inputs
 * straight from the peers that hold them. It keeps one long-lived connection to the
 * scheduler, registers on it (with the keys it holds), and serves the scheduler's
 * calls on it too.
 *
 * @module
 */

import { createLogger, type Logger } from "../util/log.ts";
import { type Address, formatAddress, parseAddress } from "../protocol/address.ts";
import type { Comm, Dispatch } from "../protocol/comm.ts";
import {
  BusyError,
  ConnectionClosedError,
  MissingDataError,
  ProtocolError,
  TimeoutError,
  toRemoteErrorInfo,
} from "../protocol/errors.ts";
import {
  type ArgsOf,
  type DataPart,
  type FunctionSpec,
  KNOWN_FUNCTIONS_MAX,
  notice,
  schedulerOps,
  type Transfer,
  type WorkerIdentity,
  type WorkerOps,
  workerOps,
} from "../protocol/ops.ts";
import { Lru } from "../util/lru.ts";
import { formatBytes } from "../util/memory.ts";
import { type Family, type HttpServer, LoopLag, prometheus, startHttp } from "../util/http.ts";
import { dispatchTo, type Handlers, serve, type Server } from "../protocol/server.ts";
import { AuthenticationError, openComm, type SecurityOptions, tokenFromEnv } from "../protocol/handshake.ts";
import { ConnectionPool } from "../protocol/pool.ts";
import { fetchData } from "../protocol/fetch.ts";
import { FETCH_BYTES_IN_FLIGHT_MAX, type Instruction, type WorkerEvent, WorkerState } from "./state.ts";
import { FRAME_BYTES_MAX, SMALL_FRAME_BYTES } from "../protocol/framing.ts";
import { ExecutorDiedError, ExecutorPool, type Isolation, shared } from "./executors.ts";
import { DataStore, nbytesOf, refsIn, resolveRefs } from "./store.ts";
import { FramePool } from "./frame_pool.ts";
import {
  DEATH_TIMEOUT_MS,
  MEMORY_PAUSE_FRACTION,
  MEMORY_SPILL_FRACTION,
  MEMORY_TARGET_FRACTION,
  MEMORY_TERMINATE_FRACTION,
  TRANSFERS_OUT_MAX,
} from "../util/defaults.ts";

/**
 * How often a worker with a memory limit looks at its process's memory (Deno.memoryUsage
 * costs microseconds): a task making values at GB/s adds 100 MB in 50 ms.
 */
const MEMORY_MONITOR_MS = 20;
/**
 * Least time between two spills the monitor makes: what a spill frees returns at the
 * collection it asks for, and until then the process still looks full.
 */
const MONITOR_SPILL_INTERVAL_MS = 100;
/** The wait before executors collect for lent frames only they still refer to (one collection for a burst). */
const LENT_COLLECT_MS = 50;
/** Bytes of received frames' memory kept for reuse by a worker without a memory limit. */
const FRAME_POOL_BYTES_UNLIMITED = 1024 ** 3;
/** Share of the memory limit that values being fetched may take at once. */
const FETCH_MEMORY_SHARE = 0.1;

export { DEATH_TIMEOUT_MS, TRANSFERS_OUT_MAX };

/** The first and the largest wait between attempts to reach the scheduler. */
const BACKOFF_FIRST_MS = 50;
const BACKOFF_MAX_MS = 2_000;
/** Longest a leaving worker waits for its unique keys to be copied elsewhere. */
const RETIRE_TIMEOUT_MS = 60_000;
/** Most transfers a worker remembers between two heartbeats. */
const TRANSFER_LOG_MAX = 1_000;
/** Replies this large count against `transfersOutMax`; smaller ones are always served. */
export const TRANSFER_LARGE_BYTES = 1024 * 1024;
/** How long a call to a peer or the scheduler may take. */
const CALL_TIMEOUT_MS = 60_000;
/** What a get_data reply takes besides its keys and values: its id, op and field names. */
const REPLY_ENVELOPE_BYTES = 1024;
/** What each key takes in a get_data reply besides its UTF-8 bytes (and its value's header). */
const KEY_OVERHEAD_BYTES = 16;

/** A scheduler's task as the shell keeps it in the state: what to run. */
interface TaskRun {
  spec: FunctionSpec;
  args: unknown[];
}

type ToSchedulerMessage = Extract<Instruction, { type: "send" }>["message"];

/** The bytes `value` takes in a message (`nbytes` for all but binary values, which it may exceed). */
function wireBytesOf(value: unknown, nbytes: number): number {
  if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) return value.byteLength;
  return nbytes;
}

/** Options of `startWorker`. */
export interface WorkerOptions extends SecurityOptions {
  /** The scheduler, `tcp://host:port` or `{ host, port }`. */
  scheduler: string | Address;
  /** Interface to listen on; default 127.0.0.1. */
  host?: string;
  /** Port; default 0, any free port. */
  port?: number;
  /** A name for logs and listings; default its address. */
  name?: string;
  /** How many tasks it runs at once; default the machine's cores. */
  nthreads?: number;
  /** Give up reaching the scheduler after this long; default 60 s. */
  deathTimeoutMs?: number;
  /** Largest frame accepted, in bytes. */
  frameBytesMax?: number;
  /** Most open connections; more are closed on arrival. */
  connectionsMax?: number;
  /**
   * Most large replies to get_data (1 MiB or more) it sends at once; more are answered
   * BusyError, and the fetcher asks again after a pause. Default 8.
   */
  transfersOutMax?: number;
  /**
   * What tasks may touch (Deno permissions of the executors): default "none", no
   * file, network, env, subprocess or FFI access; "inherit" gives them the worker's own.
   */
  taskPermissions?: Deno.PermissionOptions;
  /**
   * Where tasks run: "thread" (default), a Web Worker in this process; "process", one in
   * a child process of its own, so a task that exhausts its heap, crashes or stops its
   * process fails as KilledWorker instead of taking the worker and its data down. Values
   * are copied to and from such an executor, and the worker needs --allow-run.
   */
  isolation?: Isolation;
  /** With isolation "process": each executor's JS heap limit in MiB (default: V8's). */
  taskHeapMib?: number;
  /** Serve /metrics and /health over HTTP on this port (0: any); undefined for none. */
  httpPort?: number;
  /**
   * Bytes of memory this worker may use; 0 or undefined for no limit. Past
   * `memoryTargetFraction` of it in values held, the least recently used values are
   * spilled to disk (the worker needs --allow-write for `localDirectory`).
   */
  memoryLimit?: number;
  /** Share of `memoryLimit` that values held in memory may take before they spill; default 0.6, as Dask's. */
  memoryTargetFraction?: number;
  /**
   * Share of `memoryLimit` the process may take (its RSS: values, executors, everything)
   * before values spill to bring it down to `memoryTargetFraction`; default 0.7, as Dask's.
   */
  memorySpillFraction?: number;
  /** Share of `memoryLimit` past which the worker pauses: it starts no task and no fetch; default 0.8. */
  memoryPauseFraction?: number;
  /**
   * Share of `memoryLimit` past which the executor process holding the most memory is
   * stopped (its task fails as if its worker had died running it), or, with none to stop
   * and under a `nanny`, the worker closes at once; default 0.95, as Dask's.
   */
  memoryTerminateFraction?: number;
  /**
   * Runs under a nanny, which starts a new worker when this one exits: past the terminate
   * share, with no executor process to stop, it closes at once without handing its data
   * over and sets `error` to a `MemoryLimitError`. Alone (the default) it carries on.
   */
  nanny?: boolean;
  /** Where the worker's spill folder is made (a fresh one per worker, removed when it closes); default the temp folder. */
  localDirectory?: string;
  /** Where it logs; default stderr at info. */
  log?: Logger;
}

/** A running worker. */
export interface WorkerNode {
  /** Where it listens, `tcp://host:port`. */
  readonly address: string;
  /** What it says of itself. */
  readonly identity: WorkerIdentity;
  /** Its data. */
  readonly data: DataStore;
  /** Where its `/metrics` and `/health` are served (`http://host:port`); null without `httpPort`. */
  readonly httpUrl: string | null;
  /** Resolves once closed: by `close()`, `terminate`, or losing the scheduler for good. */
  readonly closed: Promise<void>;
  /** Why it closed on its own (the scheduler lost for good, a MemoryLimitError); null otherwise. */
  readonly error: Error | null;
  /** Unregisters from the scheduler and closes every connection. */
  close(): Promise<void>;
  /** `await using` closes it. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** A worker under a nanny closed because its process passed the terminate share of its memory limit. */
export class MemoryLimitError extends Error {
  /** Builds the error. */
  constructor(message: string) {
    super(message);
    this.name = "MemoryLimitError";
  }
}

/**
 * Starts a worker and registers it with the scheduler, retrying with backoff until
 * `deathTimeoutMs`. Resolves once registered.
 *
 * @example
 * ```ts
 * import { startScheduler, startWorker } from "@dist/dist/node";
 * const scheduler = await startScheduler({ port: 0 });
 * const worker = await startWorker({ scheduler: scheduler.address, name: "alice" });
 * await worker.close();
 * await scheduler.close();
 * ```
 */
export async function startWorker(options: WorkerOptions): Promise<WorkerNode> {
  const worker = new WorkerServer(options);
  await worker.start();
  return worker;
}

/** The worker node: the shell that serves its ops and carries out what it decides (not the Web `Worker`). */
class WorkerServer implements WorkerNode {
  readonly data: DataStore;
  readonly closed: Promise<void>;
  error: Error | null = null;
  #options: WorkerOptions;
  #log: Logger;
  #scheduler: Address;
  #schedulerUrl: string;
  #server: Server | null = null;
  #http: HttpServer | null = null;
  #lag: LoopLag | null = null;
  #nthreads: number;
  #security: SecurityOptions;
  #dispatch: Dispatch;
  #executors: ExecutorPool;
  /** The memory of received values let go of, for the next frames of the same sizes. */
  #frames: FramePool;
  #lentCollect: ReturnType<typeof setTimeout> | undefined;
  /** Receives a large frame into reused memory when the pool has some of its size. */
  #frameMemory = (bytes: number) => this.#frames.take(bytes);
  /** Functions the scheduler sent, by its ids: an LRU mirroring the scheduler's (KNOWN_FUNCTIONS_MAX). */
  #schedulerFunctions = new Lru<number, FunctionSpec>(KNOWN_FUNCTIONS_MAX);
  /**
   * The worker's decisions (worker/state.ts): this shell feeds it events and carries out
   * its instructions. Made once the address is known.
   */
  #state!: WorkerState;
  /** Requests (gather_keys, a client's compute) waiting for their keys, by id. */
  #requests = new Map<number, (answer: { missing: Record<string, string[]>; error?: unknown }) => void>();
  #requestIds = 0;
  #wakeTimer: ReturnType<typeof setTimeout> | undefined;
  #memoryTimer: ReturnType<typeof setInterval> | undefined;
  #lastMonitorSpill = -Infinity;
  #schedulerComm: Comm | null = null;
  /** The connection a registration is under way on. */
  #registering: Comm | null = null;
  #heartbeatTimer: ReturnType<typeof setTimeout> | undefined;
  /** Fetches since the last heartbeat, for the scheduler's dashboard. */
  #transfers: Transfer[] = [];
  #bytesIn = 0;
  #bytesOut = 0;
  /** Large get_data replies being sent now. */
  #transfersOut = 0;
  /** get_data calls turned away busy, and busy replies this worker waited out. */
  #busyReplies = 0;
  #busyWaits = 0;
  #reconnecting: Promise<void> | null = null;
  #peers: ConnectionPool;
  #closing: Promise<void> | null = null;
  #resolveClosed!: () => void;
  #identity!: WorkerIdentity;

  constructor(options: WorkerOptions) {
    this.#options = options;
    this.#scheduler = parseAddress(options.scheduler);
    this.#schedulerUrl = formatAddress(this.#scheduler);
    this.closed = new Promise((resolve) => this.#resolveClosed = resolve);
    const nthreads = options.nthreads ?? navigator.hardwareConcurrency;
    if (!Number.isInteger(nthreads) || nthreads < 1) {
      throw new RangeError(`Invalid nthreads ${nthreads}: expected a whole number from 1 up`);
    }
    this.#log = options.log ?? createLogger(options.name ? `worker ${options.name}` : "worker");
    this.#nthreads = nthreads;
    const limit = options.memoryLimit ?? 0;
    const fraction = options.memoryTargetFraction ?? MEMORY_TARGET_FRACTION;
    if (!(Number.isSafeInteger(limit) && limit >= 0)) {
      throw new RangeError(`Invalid memoryLimit ${limit}: expected bytes, a whole number (0 for none)`);
    }
    for (
      const [name, value] of [
        ["memoryTargetFraction", fraction],
        ["memorySpillFraction", options.memorySpillFraction],
        ["memoryPauseFraction", options.memoryPauseFraction],
      ] as const
    ) {
      if (value !== undefined && !(value > 0 && value <= 1)) {
        throw new RangeError(`Invalid ${name} ${value}: expected a share above 0, at most 1`);
      }
    }
    // An eighth of the memory limit (a GiB without one) stays ready for the next frames.
    this.#frames = new FramePool({
      maxBytes: limit > 0 ? Math.floor(limit / 8) : FRAME_POOL_BYTES_UNLIMITED,
      onDrop: (bytes) => this.data.freed(bytes),
      // Values let go of that only executors still refer to: have them collect soon (and
      // say what they let go of), not once 64 MiB have piled up.
      onLentOnly: () => {
        this.#lentCollect ??= setTimeout(() => {
          this.#lentCollect = undefined;
          this.#executors.collect();
        }, LENT_COLLECT_MS);
      },
    });
    this.data = new DataStore({
      holds: this.#frames,
      targetBytes: limit > 0 ? Math.floor(limit * fraction) : Infinity,
      directory: options.localDirectory,
      onSpillError: (message) => this.#log.error(message),
      // Executor threads hold references to the same shared memory: they collect too.
      onCollect: () => this.#executors?.collect(),
    });
    this.#security = {
      authToken: options.authToken ?? tokenFromEnv(),
      tls: options.tls,
      handshakeTimeoutMs: options.handshakeTimeoutMs,
    };
    this.#dispatch = dispatchTo("worker", workerOps, this.#handlers());
    this.#executors = new ExecutorPool(nthreads, options.taskPermissions ?? "none", {
      isolation: options.isolation,
      heapMib: options.taskHeapMib,
      frames: this.#frames,
    });
    this.#peers = new ConnectionPool({
      ...this.#security,
      frameBytesMax: options.frameBytesMax,
      sharedFrames: this.#frameMemory,
      log: this.#log,
    });
  }

  get address(): string {
    return this.#identity.address;
  }

  get identity(): WorkerIdentity {
    return this.#identity;
  }

  get httpUrl(): string | null {
    return this.#http?.url ?? null;
  }

  async start(): Promise<void> {
    try {
      const options = this.#options;
      this.#server = await serve(
        { host: options.host ?? "127.0.0.1", port: options.port ?? 0, tls: Boolean(options.tls?.cert) },
        this.#dispatch,
        {
          ...this.#security,
          frameBytesMax: options.frameBytesMax,
          connectionsMax: options.connectionsMax,
          sharedFrames: this.#frameMemory,
          log: this.#log,
        },
      );
      this.#identity = {
        type: "worker",
        id: crypto.randomUUID(),
        address: this.#server.url,
        name: options.name ?? this.#server.url,
        nthreads: this.#nthreads,
        scheduler: this.#schedulerUrl,
      };
      const limit = options.memoryLimit ?? 0;
      this.#state = new WorkerState({
        address: this.#server.url,
        nthreads: this.#nthreads,
        // With a memory limit, values arriving at once take at most a tenth of it (as
        // Dask's `transfer` share); one fetch always starts, however large.
        fetchBytesInFlightMax: limit > 0
          ? Math.min(FETCH_BYTES_IN_FLIGHT_MAX, Math.floor(limit * FETCH_MEMORY_SHARE))
          : undefined,
      });
      if (options.httpPort !== undefined) {
        this.#lag = new LoopLag();
        this.#http = await startHttp({
          host: options.host ?? "127.0.0.1",
          port: options.httpPort,
          authToken: this.#security.authToken,
          routes: [(_req, url) => url.pathname === "/metrics" ? prometheus(this.#metrics()) : null],
          log: this.#log,
        });
        this.#log.info(`Metrics at ${this.#http.url}/metrics`);
      }
      if ((options.memoryLimit ?? 0) > 0) {
        this.#memoryTimer = setInterval(() => this.#watchMemory(), MEMORY_MONITOR_MS);
      }
      await this.#register(Date.now() + (this.#options.deathTimeoutMs ?? DEATH_TIMEOUT_MS));
    } catch (error) {
      await this.#shutdown(false);
      throw error;
    }
  }

  close(): Promise<void> {
    return this.#shutdown(true);
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  // ---- the scheduler connection ----

  /** Connects and registers, retrying with backoff until `deadline`. */
  async #register(deadline: number): Promise<void> {
    let wait = BACKOFF_FIRST_MS;
    for (let attempt = 1;; attempt++) {
      let comm: Comm | null = null;
      try {
        comm = await openComm(this.#scheduler, {
          ...this.#security,
          dispatch: this.#dispatch,
          frameBytesMax: this.#options.frameBytesMax,
          sharedFrames: this.#frameMemory,
          log: this.#log,
        });
        if (this.#closing) {
          await comm.close();
          return;
        }
        const listening = this.#server!.address;
        if (listening.host === "0.0.0.0" || listening.host === "::") {
          // Listening on every interface: advertise the one that reaches the scheduler.
          this.#identity.address = formatAddress({ ...listening, host: comm.conn.local.host });
          if (this.#options.name === undefined) this.#identity.name = this.#identity.address;
          this.#state.address = this.#identity.address;
        }
        const keys = this.data.keys();
        // The scheduler may send tasks before its reply to register arrives, and what this
        // worker says of them then follows the register call on the same connection.
        this.#registering = comm;
        this.#apply({ type: "scheduler-found" });
        let reply: { heartbeat_interval_ms: number; worker_ttl_ms: number };
        try {
          reply = await comm.call("register", {
            address: this.address,
            name: this.#identity.name,
            nthreads: this.#identity.nthreads,
            keys,
            nbytes: this.data.nbytes(keys),
            external: this.#state.ownKeys(),
          }, { timeoutMs: CALL_TIMEOUT_MS }) as { heartbeat_interval_ms: number; worker_ttl_ms: number };
        } catch (error) {
          this.#registering = null;
          this.#apply({ type: "scheduler-lost" });
          throw error;
        }
        this.#schedulerComm = comm;
        const registered = comm;
        comm.closed.then(() => this.#onSchedulerLost(registered));
        this.#heartbeat(comm, reply.heartbeat_interval_ms, reply.worker_ttl_ms);
        this.#log.info(`Registered with ${this.#schedulerUrl} as ${this.address}`);
        return;
      } catch (error) {
        await comm?.close();
        // A wrong or missing token will not get better by waiting.
        if (error instanceof AuthenticationError) throw error;
        const now = Date.now();
        if (now >= deadline || this.#closing) {
          throw new ConnectionClosedError(
            `Cannot register with scheduler ${this.#schedulerUrl} after ${attempt} attempts: ${
              (error as Error).message
            }`,
            { cause: error },
          );
        }
        if (attempt === 1) {
          this.#log.info(`Waiting for scheduler ${this.#schedulerUrl}: ${(error as Error).message}`);
        }
        await new Promise((resolve) => setTimeout(resolve, Math.min(wait, deadline - now)));
        wait = Math.min(wait * 2, BACKOFF_MAX_MS);
      }
    }
  }

  /**
   * Tells the scheduler it is alive every `intervalMs`. A heartbeat unanswered within
   * the scheduler's TTL means the link is dead even if the socket looks open (a cut
   * network): the connection is dropped and the worker reconnects and registers again.
   */
  #heartbeat(comm: Comm, intervalMs: number, ttlMs: number): void {
    clearTimeout(this.#heartbeatTimer);
    let lastBeat = performance.now();
    const beat = async () => {
      if (this.#closing || this.#schedulerComm !== comm) return;
      const now = performance.now();
      // Reused memory not asked for lately goes back (an idle worker keeps none).
      this.#frames.trim(now);
      const metrics = {
        nkeys: this.data.size,
        nbytes: this.data.totalBytes(),
        managed: this.data.memoryBytes,
        spilled: this.data.spilledBytes,
        memory_limit: this.#options.memoryLimit ?? 0,
        paused: this.#state.paused ? 1 : 0,
        spill_failing: this.data.spillError ? 1 : 0,
        executing: this.#executors.running,
        queued: this.#executors.queued,
        rss: this.#rss(),
        // Share of the executors' time spent in tasks since the last heartbeat, 0 to 1.
        cpu: Math.min(1, this.#executors.takeBusyMs() / Math.max(1, (now - lastBeat) * this.#nthreads)),
        bytes_in: this.#bytesIn,
        bytes_out: this.#bytesOut,
      };
      lastBeat = now;
      const transfers = this.#transfers.splice(0);
      try {
        const problems = this.data.spillError ? [this.data.spillError] : undefined;
        const reply = await comm.call("heartbeat", { address: this.address, metrics, transfers, problems }, {
          timeoutMs: ttlMs,
        }) as {
          status: string;
          heartbeat_interval_ms: number;
        };
        if (reply.status !== "OK") throw new Error("the scheduler no longer knows this worker");
        intervalMs = reply.heartbeat_interval_ms;
      } catch (error) {
        if (this.#closing || this.#schedulerComm !== comm) return;
        this.#log.warn(
          `Heartbeat failed (${(error as Error).message}); reconnecting to ${this.#schedulerUrl}`,
        );
        comm.close();
        return;
      }
      this.#heartbeatTimer = setTimeout(beat, intervalMs);
    };
    this.#heartbeatTimer = setTimeout(beat, intervalMs);
  }

  #onSchedulerLost(comm: Comm): void {
    if (this.#closing || this.#schedulerComm !== comm) return;
    this.#schedulerComm = null;
    this.#apply({ type: "scheduler-lost" });
    this.#log.warn(`Lost the scheduler ${this.#schedulerUrl}; reconnecting`);
    const deadline = Date.now() + (this.#options.deathTimeoutMs ?? DEATH_TIMEOUT_MS);
    this.#reconnecting = this.#register(deadline).catch((error) => {
      if (this.#closing) return;
      this.error = error as Error;
      this.#log.error(`${this.error.message}; closing`);
      this.#shutdown(false);
    }).finally(() => this.#reconnecting = null);
  }

  async #schedulerCall(op: string, args: unknown): Promise<unknown> {
    const comm = this.#schedulerComm ?? this.#registering;
    if (comm === null) throw new ConnectionClosedError(`Not connected to scheduler ${this.#schedulerUrl}`);
    return await comm.call(op, args, { timeoutMs: CALL_TIMEOUT_MS });
  }

  /** Tells the scheduler what changed and waits for its ack; a scheduler that is away learns it at re-registration. */
  async #report(op: "add_keys" | "remove_keys", keys: string[]): Promise<void> {
    if (keys.length === 0 || this.#schedulerComm === null) return;
    const args = op === "add_keys"
      ? { address: this.address, keys, nbytes: this.data.nbytes(keys) }
      : { address: this.address, keys };
    try {
      await this.#schedulerCall(op, args);
    } catch (error) {
      this.#log.warn(`Could not tell the scheduler ${op} ${keys.join(", ")}: ${(error as Error).message}`);
    }
  }

  // ---- the state machine's shell ----

  /**
   * Feeds `event` to the state and carries out what it says, in order. `values` are
   * the values in hand (fetched or computed) that `store` instructions keep.
   */
  #apply(event: WorkerEvent, values?: Record<string, unknown>): void {
    if (this.#closing && event.type !== "scheduler-lost") return;
    const now = performance.timeOrigin + performance.now();
    for (const i of this.#state.handle(event, now)) this.#carryOut(i, values, now);
  }

  #carryOut(i: Instruction, values: Record<string, unknown> | undefined, now: number): void {
    switch (i.type) {
      case "store":
        for (const key of i.keys) this.data.setReceived(key, values![key]);
        return;
      case "discard":
        return;
      case "drop":
        for (const key of i.keys) this.data.delete(key);
        return;
      case "fetch":
        this.#fetch(i.peer, i.keys);
        return;
      case "execute":
        this.#execute(i.key, i.run as TaskRun);
        return;
      case "abort":
        this.#executors.cancel(i.key);
        return;
      case "lookup":
        this.#lookup(i.keys);
        return;
      case "send":
        this.#sendToScheduler(i.message);
        return;
      case "acquired": {
        const resolve = this.#requests.get(i.id);
        this.#requests.delete(i.id);
        resolve?.({ missing: i.missing, error: i.error });
        return;
      }
      case "wake":
        clearTimeout(this.#wakeTimer);
        // Rounded up: a timer set for a fraction of a millisecond less fires before `at`.
        this.#wakeTimer = setTimeout(() => this.#apply({ type: "tick" }), Math.max(0, Math.ceil(i.at - now)));
        return;
    }
  }

  /** Asks `peer` for `keys`; reports each part, then how it ended. */
  async #fetch(peer: string, keys: string[]): Promise<void> {
    this.#log.debug(`Fetching ${keys.join(", ")} from ${peer}`);
    let start = Date.now();
    try {
      const comm = await this.#peers.get(peer);
      await fetchData(comm, keys, {
        timeoutMs: CALL_TIMEOUT_MS,
        bytesMax: this.#options.frameBytesMax,
        onPart: (part) => {
          const nbytes: Record<string, number> = {};
          let bytes = 0;
          for (const key of Object.keys(part)) bytes += nbytes[key] = nbytesOf(part[key], key);
          this.#bytesIn += bytes;
          if (this.#transfers.length < TRANSFER_LOG_MAX) {
            this.#transfers.push({ from: peer, keys: keys.length, nbytes: bytes, start, stop: Date.now() });
          }
          start = Date.now();
          this.#apply({ type: "fetched", peer, nbytes }, part);
        },
      });
      this.#apply({ type: "fetch-done", peer });
    } catch (error) {
      if (error instanceof BusyError) this.#busyWaits++;
      else this.#log.warn(`Fetching ${keys.join(", ")} from ${peer} failed: ${(error as Error).message}`);
      // A holder that is gone is a missing copy; any other refusal (a value over a
      // limit, say) is the task's error, and the copy is still there.
      const reason = error instanceof BusyError
        ? "busy"
        : error instanceof ConnectionClosedError || error instanceof TimeoutError
        ? "gone"
        : "refused";
      this.#apply({ type: "fetch-failed", peer, reason, error });
    }
  }

  async #lookup(keys: string[]): Promise<void> {
    this.#log.debug(`Asking the scheduler who has ${keys.join(", ")}`);
    try {
      const whoHas = await this.#schedulerCall("who_has", { keys }) as Record<string, string[]>;
      const answer: Record<string, string[]> = {};
      for (const key of keys) answer[key] = whoHas[key] ?? [];
      this.#apply({ type: "who-has", who_has: answer });
    } catch {
      this.#apply({ type: "lookup-failed", keys });
    }
  }

  /** Runs a scheduler's task: its inputs are read now, as the state said they are here. */
  async #execute(key: string, task: TaskRun): Promise<void> {
    let args: unknown[];
    try {
      args = resolveRefs(task.args, this.#forExecutor) as unknown[];
    } catch (error) {
      queueMicrotask(() => this.#apply({ type: "execute-failed", key, error, killed: false, report: {} }));
      return;
    }
    try {
      const run = await this.#executors.run(task.spec, args, key);
      const report = {
        // The function's run alone: the scheduler's load estimate averages it, and time
        // spent waiting here behind other tasks would grow with every task it sends ahead.
        duration: Math.max(0, run.stop - run.start) / 1000,
        start: run.start,
        stop: run.stop,
        thread: run.thread,
      };
      this.#apply({ type: "executed", key, nbytes: run.nbytes, report }, { [key]: run.result });
    } catch (error) {
      const timing = (error as { timing?: { start: number; stop: number; thread: number } }).timing;
      this.#apply({
        type: "execute-failed",
        key,
        error,
        killed: error instanceof ExecutorDiedError,
        report: { ...timing },
      });
    }
  }

  #sendToScheduler(message: ToSchedulerMessage): void {
    const comm = this.#schedulerComm ?? this.#registering;
    if (comm === null || comm.isClosed) return;
    try {
      switch (message.op) {
        case "task_finished":
          notice(comm, schedulerOps, "task_finished", { duration: 0, ...message.args });
          return;
        case "missing_data":
          notice(comm, schedulerOps, "missing_data", message.args);
          return;
        case "add_keys":
          notice(comm, schedulerOps, "add_keys", { address: this.address, ...message.args });
          return;
        case "task_erred":
          this.#sendErred(comm, message.key, message.error, message.killed, message.report);
          return;
      }
    } catch (error) {
      this.#log.warn(`Could not tell the scheduler ${message.op}: ${(error as Error).message}`);
    }
  }

  #sendErred(comm: Comm, key: string, error: unknown, killed: boolean, report: Record<string, number>): void {
    try {
      notice(comm, schedulerOps, "task_erred", { key, error: toRemoteErrorInfo(error), killed, ...report });
    } catch (sendError) {
      // Too large for the scheduler's limit: a report that fits, so the task settles.
      const info = toRemoteErrorInfo(error);
      notice(comm, schedulerOps, "task_erred", {
        key,
        error: {
          name: info.name.slice(0, 100),
          message: `The error of ${key} cannot be reported: ${(sendError as Error).message}`,
        },
        killed,
      });
    }
  }

  /** Fetches `keys` that are not here, as the state decides; resolves what could not be had. */
  #acquire(
    keys: string[],
    whoHas?: Record<string, string[]>,
  ): Promise<{ missing: Record<string, string[]>; error?: unknown }> {
    const id = ++this.#requestIds;
    const answer = new Promise<{ missing: Record<string, string[]>; error?: unknown }>((resolve) =>
      this.#requests.set(id, resolve)
    );
    this.#apply({ type: "acquire", id, keys, who_has: whoHas, replica: false });
    return answer;
  }

  // ---- ops ----

  #handlers(): Handlers<WorkerOps> {
    return {
      get_data: ({ keys, bytes_max }, comm) => {
        const out: Record<string, unknown> = {};
        const rest: string[] = [];
        // A part never passes what the fetcher reads nor what this end may send; the keys
        // (in the reply's data or rest) and its envelope take their share first.
        let budget = Infinity;
        if (bytes_max !== undefined) {
          budget = Math.min(bytes_max, this.#options.frameBytesMax ?? FRAME_BYTES_MAX) - REPLY_ENVELOPE_BYTES;
          for (const key of keys) budget -= key.length * 3 + KEY_OVERHEAD_BYTES;
        }
        let bytes = 0;
        let count = 0;
        // Values whose buffers the reply is written from: not reused before it has left.
        const large: unknown[] = [];
        for (const key of keys) {
          if (!this.data.has(key)) continue;
          const value = this.data.get(key);
          const size = wireBytesOf(value, this.data.sizeOf(key) ?? 0);
          // The first value goes whatever its size (alone past the limit, its send fails and says so).
          if (count > 0 && bytes + size > budget) {
            rest.push(key);
            continue;
          }
          out[key] = value;
          bytes += size;
          count++;
          if (size > SMALL_FRAME_BYTES) large.push(value);
        }
        if (bytes >= TRANSFER_LARGE_BYTES) {
          const max = this.#options.transfersOutMax ?? TRANSFERS_OUT_MAX;
          if (this.#transfersOut >= max) {
            this.#busyReplies++;
            throw new BusyError(`Busy: ${this.address} sends ${max} large values already; ask again later`);
          }
          this.#transfersOut++;
        }
        // The transfer is counted, and the values' memory held, until the reply has left:
        // it is queued once this returns, and the timer runs after that.
        const counted = bytes >= TRANSFER_LARGE_BYTES;
        if (counted || large.length > 0) {
          for (const value of large) this.#frames.hold(value);
          setTimeout(() =>
            comm.flushed().then(() => {
              if (counted) this.#transfersOut--;
              for (const value of large) this.#frames.release(value);
            }), 0);
        }
        this.#bytesOut += bytes;
        return bytes_max === undefined ? out : { data: out, rest } satisfies DataPart;
      },
      update_data: async ({ data, report }) => {
        // All or nothing: every value is measured (which fails for one that cannot be
        // kept) before any is stored, so a failure leaves no value behind that the
        // scheduler and the caller do not know of.
        const nbytes: Record<string, number> = {};
        for (const key in data) nbytes[key] = nbytesOf(data[key], key);
        for (const key in data) {
          this.data.setReceived(key, data[key], nbytes[key]);
          this.#apply({ type: "put", key, nbytes: nbytes[key], own: report !== false });
        }
        if (report !== false) await this.#report("add_keys", Object.keys(data));
        return { status: "OK", nbytes };
      },
      delete_data: async ({ keys, report }) => {
        const deleted = keys.filter((key) => this.data.has(key));
        this.#apply({ type: "delete", keys: deleted });
        // Held by no record of the state (cannot happen, but deleting is what was asked).
        for (const key of deleted) this.data.delete(key);
        if (report !== false) await this.#report("remove_keys", deleted);
        return { status: "OK" };
      },
      keys: () => this.data.keys(),
      identity: () => this.#identity,
      ping: () => "pong",
      terminate: (_args, comm) => {
        setTimeout(() => comm.flushed().then(() => this.close()), 0);
        return { status: "OK" };
      },
      compute: (args) => this.#compute(args),
      compute_task: (args, comm) => {
        this.#fromScheduler(comm, "compute_task");
        // A notice: the reply is task_finished or task_erred, later.
        this.#computeTask(args, comm);
      },
      gather_keys: async ({ who_has }, comm) => {
        this.#fromScheduler(comm, "gather_keys");
        const { missing, error } = await this.#acquire(Object.keys(who_has), who_has);
        if (error !== undefined) throw error;
        return { status: "OK", missing: Object.keys(missing) };
      },
      free_keys: ({ keys }, comm) => {
        this.#fromScheduler(comm, "free_keys");
        this.#apply({ type: "free", keys });
        return { status: "OK" };
      },
      cancel_task: ({ keys }, comm) => {
        this.#fromScheduler(comm, "cancel_task");
        this.#apply({ type: "cancel", keys });
        return { status: "OK" };
      },
      story: ({ key }) => ({ key, state: this.#state.stateOf(key), story: this.#state.story(key) }),
    };
  }

  /** The worker's own Prometheus metrics. */
  #metrics(): Family[] {
    const gauge = (name: string, help: string, value: number): Family => ({
      name,
      help,
      type: "gauge",
      samples: [{ value }],
    });
    return [
      gauge("dist_worker_keys", "Keys this worker holds.", this.data.size),
      gauge("dist_worker_bytes", "Bytes this worker holds, in memory and spilled.", this.data.totalBytes()),
      gauge("dist_worker_managed_bytes", "Bytes of values held in memory.", this.data.memoryBytes),
      gauge("dist_worker_spilled_bytes", "Bytes of values spilled to disk.", this.data.spilledBytes),
      gauge("dist_worker_spilled_keys", "Values spilled to disk.", this.data.spilledKeys),
      gauge(
        "dist_worker_memory_limit_bytes",
        "The memory limit; 0 for none.",
        this.#options.memoryLimit ?? 0,
      ),
      gauge(
        "dist_worker_paused",
        "1 while paused by memory (no task or fetch starts).",
        this.#state.paused ? 1 : 0,
      ),
      gauge(
        "dist_worker_spill_failing",
        "1 while the last try to spill failed (see the log).",
        this.data.spillError ? 1 : 0,
      ),
      {
        name: "dist_worker_spill_bytes_total",
        help: "Bytes written to disk (out) and read back (in) by spilling.",
        type: "counter",
        samples: [
          { labels: { direction: "out" }, value: this.data.spillWrittenBytes },
          { labels: { direction: "in" }, value: this.data.spillReadBytes },
        ],
      },
      gauge(
        "dist_worker_frame_pool_bytes",
        "Memory of values let go of, kept to receive the next large frames of the same sizes into.",
        this.#frames.freeBytes,
      ),
      {
        name: "dist_worker_frame_pool_reused_bytes_total",
        help: "Bytes of large frames received into reused memory (no new page touched).",
        type: "counter",
        samples: [{ value: this.#frames.reusedBytes }],
      },
      gauge("dist_worker_tasks_running", "Tasks on its executors.", this.#executors.running),
      gauge("dist_worker_tasks_queued", "Tasks waiting for an executor.", this.#executors.queued),
      gauge("dist_worker_threads", "Executors.", this.#nthreads),
      {
        name: "dist_worker_keys_by_state",
        help:
          "Keys this worker knows, by their state (waiting, ready, executing, fetch, flight, memory, ...).",
        type: "gauge",
        samples: Object.entries(this.#state.counts()).map(([state, value]) => ({ labels: { state }, value })),
      },
      gauge("dist_worker_fetches_in_flight", "Fetches from peers under way.", this.#state.inFlight().fetches),
      gauge(
        "dist_worker_transfers_out",
        "Large values being sent now (see transfersOutMax).",
        this.#transfersOut,
      ),
      {
        name: "dist_worker_busy_total",
        help:
          "Fetches of large values turned away because too many were being sent (served), and busy replies this worker got and waited out (waited).",
        type: "counter",
        samples: [
          { labels: { side: "served" }, value: this.#busyReplies },
          { labels: { side: "waited" }, value: this.#busyWaits },
        ],
      },
      gauge(
        "dist_worker_executors_started",
        "Executors started (each starts when a task first needs it).",
        this.#executors.started,
      ),
      {
        name: "dist_worker_transferred_bytes_total",
        help: "Bytes fetched from peers (in), and served to peers and clients (out).",
        type: "counter",
        samples: [
          { labels: { direction: "in" }, value: this.#bytesIn },
          { labels: { direction: "out" }, value: this.#bytesOut },
        ],
      },
      gauge("dist_event_loop_lag_seconds", "How late this worker's timers fire.", this.#lag?.seconds ?? 0),
    ];
  }

  /** The scheduler's own ops are refused on any other connection. */
  #fromScheduler(comm: Comm, op: string): void {
    if (comm !== this.#schedulerComm && comm !== this.#registering) {
      throw new ProtocolError(
        `Op ${op} is for the scheduler only, on the connection this worker registered on`,
      );
    }
  }

  /** The value of `key` for an executor: large typed arrays move to shared memory once. */
  #forExecutor = (key: string): unknown => {
    const value = this.data.get(key);
    const s = shared(value);
    // The shared copy replaces a value held in memory; one served from disk stays there
    // (its file already holds it: storing the copy would write it again).
    if (s !== value && this.data.inMemory(key)) this.data.set(key, s, this.data.sizeOf(key));
    return s;
  };

  #computeTask(args: ArgsOf<WorkerOps, "compute_task">, comm: Comm): void {
    const { key, fn_id: fnId, who_has } = args;
    // Touched on every task, in the scheduler's order: the LRUs stay in step.
    const spec = args.function ?? this.#schedulerFunctions.get(fnId);
    if (args.function) this.#schedulerFunctions.set(fnId, args.function);
    if (spec === undefined) {
      const error = new RangeError(`Task ${key} names function ${fnId}, which this worker was never sent`);
      this.#sendErred(comm, key, error, false, {});
      return;
    }
    const run: TaskRun = { spec, args: args.args };
    this.#apply({ type: "compute", key, task: { who_has, nbytes: args.nbytes, run } });
  }

  async #compute(args: ArgsOf<WorkerOps, "compute">) {
    const { key, keys = [], args: extra = [] } = args;
    const needed = refsIn(extra, new Set(keys));
    const missing = [...needed].filter((k) => !this.data.has(k));
    if (missing.length > 0) {
      // Copies arrive as this worker's data, reported as a notice that the result's
      // report below, awaited, follows on the same connection.
      const answer = await this.#acquire(missing);
      if (answer.error !== undefined) throw answer.error;
      const lost = Object.keys(answer.missing);
      if (lost.length > 0) {
        const error = new MissingDataError(lost);
        for (const k of lost) error.holders[k] = answer.missing[k];
        throw error;
      }
    }
    const lookup = this.#forExecutor;
    const { result, nbytes } = await this.#executors.run(
      args.function,
      [...keys.map(lookup), ...(resolveRefs(extra, lookup) as unknown[])],
      key,
    );
    this.data.set(key, result, nbytes);
    this.#apply({ type: "put", key, nbytes, own: true });
    this.#log.debug(`Computed ${key} (${nbytes} bytes)`);
    await this.#report("add_keys", [key]);
    return { status: "OK" as const, key, nbytes };
  }

  // ---- memory ----

  /** This process's resident memory and that of its executor processes, in bytes. */
  #rss(): number {
    return Deno.memoryUsage().rss + this.#executors.processBytes;
  }

  /**
   * The memory monitor: past the spill share of the limit, values go to disk until the
   * process would be back under it (what is not values, executors and buffers, stays);
   * past the pause share, the worker starts no task and no fetch until it is back under.
   */
  #watchMemory(): void {
    const limit = this.#options.memoryLimit ?? 0;
    if (limit <= 0 || this.#closing) return;
    let rss = this.#rss();
    const terminateAt = limit * (this.#options.memoryTerminateFraction ?? MEMORY_TERMINATE_FRACTION);
    if (rss > terminateAt) {
      // An executor process that holds the excess is stopped instead: the worker and its
      // data stay, and its task counts the death, as if its worker had died running it.
      const inProcesses = rss - Deno.memoryUsage().rss;
      const stopped = this.#executors.stopLargestProcess(
        Math.max(1, rss - terminateAt),
        `its executor process was stopped: the worker held ${formatBytes(rss)}, over ${
          formatBytes(terminateAt)
        } (memory terminate share of ${formatBytes(limit)}), ${
          formatBytes(inProcesses)
        } of it in executor processes`,
      );
      if (stopped > 0) {
        this.#log.warn(
          `Stopped an executor process holding ${formatBytes(stopped)}: the worker held ${
            formatBytes(rss)
          }, over its memory terminate share`,
        );
        return;
      }
      if (this.#options.nanny) {
        this.error = new MemoryLimitError(
          `The process holds ${formatBytes(rss)}, over ${formatBytes(terminateAt)} (memory terminate ` +
            `share of ${formatBytes(limit)}): closing at once for its nanny to start a new one`,
        );
        this.#log.error(this.error.message);
        this.#shutdown(false);
        return;
      }
    }
    const spillAt = limit * (this.#options.memorySpillFraction ?? MEMORY_SPILL_FRACTION);
    const now = performance.now();
    // Past the target share, memory let go of is worth a collection at once.
    const targetAt = limit * (this.#options.memoryTargetFraction ?? MEMORY_TARGET_FRACTION);
    const pressure = rss > targetAt;
    this.data.pressure = pressure;
    // Short of memory: what is kept for reuse goes first.
    if (pressure) this.#frames.trim(now, true);
    this.#executors.pressure = pressure;
    // Values take the target share of the process, less what it holds besides them
    // (the store keeps an eighth of its target whatever the rest holds).
    const setBudget = () => {
      this.data.budget = targetAt - Math.max(0, rss - this.data.memoryBytes);
    };
    setBudget();
    if (rss > spillAt && now - this.#lastMonitorSpill >= MONITOR_SPILL_INTERVAL_MS) {
      this.#lastMonitorSpill = now;
      // First what is garbage already: buffers let go of here, and the executor threads'
      // references to shared memory (they collect on their own turn).
      this.data.reclaimNow(true);
      this.#executors.collect();
      rss = this.#rss();
      if (rss > spillAt) {
        // Down to the target share, as Dask does: room for what tasks make meanwhile.
        setBudget();
        const spilled = this.data.spillToBudget();
        if (spilled > 0) {
          this.data.reclaimNow(true);
          this.#log.debug(
            `Memory ${formatBytes(rss)} of ${formatBytes(limit)}: spilled ${formatBytes(spilled)}`,
          );
          rss = this.#rss();
        }
      }
    }
    const pauseAt = limit * (this.#options.memoryPauseFraction ?? MEMORY_PAUSE_FRACTION);
    const paused = rss > pauseAt;
    if (paused !== this.#state.paused) {
      this.#log.info(
        paused
          ? `Paused: the process holds ${formatBytes(rss)}, over ${
            formatBytes(pauseAt)
          } (memory pause share of ${formatBytes(limit)}); no task or fetch starts until it is back under`
          : `Resumed: the process holds ${formatBytes(rss)}, under ${formatBytes(pauseAt)}`,
      );
      this.#apply({ type: "memory", paused });
    }
  }

  // ---- shutdown ----

  #shutdown(unregister: boolean): Promise<void> {
    this.#closing ??= (async () => {
      clearTimeout(this.#heartbeatTimer);
      clearTimeout(this.#wakeTimer);
      clearInterval(this.#memoryTimer);
      const comm = this.#schedulerComm;
      if (unregister && comm && !comm.isClosed) {
        try {
          // Keys that exist nowhere else move to other workers before this one goes.
          await comm.call("retire_workers", { workers: [this.address], close: false }, {
            timeoutMs: RETIRE_TIMEOUT_MS,
          });
        } catch (error) {
          this.#log.warn(`Could not hand over its data before leaving: ${(error as Error).message}`);
        }
        try {
          await comm.call("unregister", { address: this.address }, { timeoutMs: 5_000 });
        } catch (error) {
          this.#log.warn(`Could not unregister: ${(error as Error).message}`);
        }
      }
      await this.#reconnecting?.catch(() => {});
      await this.#executors.close();
      clearTimeout(this.#lentCollect);
      this.#frames.trim(performance.now(), true);
      this.data.close();
      await comm?.close();
      await this.#server?.close();
      this.#lag?.stop();
      await this.#http?.close();
      await this.#peers.close();
      this.#log.info("Worker closed");
      this.#resolveClosed();
    })();
    return this.#closing;
  }
}
