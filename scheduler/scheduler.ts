/**
 * The scheduler node: a thin shell around SchedulerTasks. It turns ops into state
 * changes and sends what the state decided: tasks to workers, results' whereabouts to
 * clients. Each registration (worker or client) is tied to the connection it came on,
 * and the scheduler talks back to it on that same long-lived connection.
 *
 * @module
 */

import { createLogger, type Logger } from "../util/log.ts";
import { parseAddress } from "../protocol/address.ts";
import type { Comm } from "../protocol/comm.ts";
import { RemoteError, toRemoteErrorInfo } from "../protocol/errors.ts";
import {
  clientOps,
  type FunctionSpec,
  type GraphTask,
  notice,
  SCHEDULER_ONLY_WORKER_OPS,
  schedulerOps,
  workerOps,
} from "../protocol/ops.ts";
import { dispatchTo, type Handlers, serve, type Server } from "../protocol/server.ts";
import { type SecurityOptions, tokenFromEnv } from "../protocol/handshake.ts";
import {
  keyPrefix,
  NO_WORKERS_TIMEOUT_MS,
  SchedulerTasks,
  type TaskSpec,
  UNCLAIMED_GRACE_MS,
} from "./tasks.ts";
import { Dashboard } from "./dashboard.ts";
import { type HttpServer, startHttp } from "../util/http.ts";
import { ALLOWED_FAILURES, DASHBOARD_PORT, SCHEDULER_PORT, WORKER_TTL_MS } from "../util/defaults.ts";

export {
  ALLOWED_FAILURES,
  DASHBOARD_PORT,
  NO_WORKERS_TIMEOUT_MS,
  SCHEDULER_PORT,
  UNCLAIMED_GRACE_MS,
  WORKER_TTL_MS,
};

/** Longest wait between two looks at the clock (grace periods, tasks with no worker). */
const TICK_MS_MAX = 1_000;
/** Worker reports about a task: one that fails its checks fails the task, never leaves it waiting. */
const TASK_REPORTS = new Set(["task_finished", "task_erred", "missing_data"]);

/** How long the scheduler waits for one worker's reply to a broadcast or delete. */
export const WORKER_CALL_TIMEOUT_MS = 30_000;

/** How often workers heartbeat: less often as the cluster grows, so the scheduler is not flooded. */
export function heartbeatIntervalMs(workers: number): number {
  return workers <= 10 ? 500 : workers <= 50 ? 1_000 : workers <= 200 ? 2_000 : workers * 10;
}

/** Options of `startScheduler`. */
export interface SchedulerOptions extends SecurityOptions {
  /**
   * Whether the scheduler keeps its process alive (true, the default). False for one
   * embedded in a script (Client.local): the script ends when its own work is done.
   */
  keepsAlive?: boolean;
  /** Interface to listen on; default 127.0.0.1. */
  host?: string;
  /** Port; default 8786, 0 for any free port. */
  port?: number;
  /** Largest frame accepted, in bytes. */
  frameBytesMax?: number;
  /** Most open connections; more are closed on arrival. */
  connectionsMax?: number;
  /** Remove a worker that sent no heartbeat for this long (a hung process, a cut network); default 30 s. */
  workerTtlMs?: number;
  /** Deaths (workers or executors lost while running it) a task may cause before it fails; default 3. */
  allowedFailures?: number;
  /**
   * How long tasks wait with no worker to run them (none connected, or none their
   * restrictions allow) before they fail with NoWorkersError; default 60 s.
   */
  noWorkersTimeoutMs?: number;
  /**
   * How long keys that a registering worker brings back (after a restart of the
   * scheduler, or of a worker it had given up on) are kept for a client to claim; keys
   * nobody claims are then freed. Default 10 s.
   */
  unclaimedGraceMs?: number;
  /**
   * Port of the dashboard (HTTP: the pages, /metrics, /health); 0 for any free port,
   * undefined for none. A taken port falls back to any free one.
   */
  dashboardPort?: number;
  /** Where it logs; default stderr at info. */
  log?: Logger;
}

/** A running scheduler. */
export interface SchedulerNode {
  /** Where it listens, `tcp://host:port`. */
  readonly address: string;
  /** A fresh id per start. */
  readonly id: string;
  /** The dashboard's address (`http://host:port`), or null without one. */
  readonly dashboard: string | null;
  /** Resolves once it has closed, by `close()` or the `terminate` op. */
  readonly closed: Promise<void>;
  /** Closes every connection and stops listening. */
  close(): Promise<void>;
  /** `await using` closes it. */
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * Who registered on one connection: the workers (a worker process registers once, but a
 * proxy may carry several) and the client. The scheduler talks back on that connection.
 */
interface Registration {
  workers: Set<string>;
  client: string | null;
}

/**
 * Starts a scheduler.
 *
 * @example
 * ```ts
 * import { startScheduler } from "@dist/dist/node";
 * const scheduler = await startScheduler({ port: 0 });
 * console.log(scheduler.address); // tcp://127.0.0.1:PORT
 * await scheduler.close();
 * ```
 */
export async function startScheduler(options: SchedulerOptions = {}): Promise<SchedulerNode> {
  const scheduler = new SchedulerServer(options);
  await scheduler.start();
  return scheduler;
}

/**
 * The scheduler's I/O shell: ops in, `SchedulerTasks` decides, its messages out. Like
 * the worker's `WorkerServer`, it owns the connections and timers and nothing else.
 */
class SchedulerServer implements SchedulerNode {
  readonly id = crypto.randomUUID();
  readonly closed: Promise<void>;
  readonly #options: SchedulerOptions;
  readonly #host: string;
  readonly #port: number;
  readonly #log: Logger;
  readonly #state = new SchedulerTasks();
  readonly #ttlMs: number;
  readonly #started = Date.now();
  /** The connection each worker registered on. */
  readonly #workerComms = new Map<string, Comm>();
  /** The connection each client registered on. */
  readonly #clients = new Map<string, Comm>();
  readonly #registrations = new WeakMap<Comm, Registration>();
  #server: Server | null = null;
  #dashboard: Dashboard | null = null;
  #http: HttpServer | null = null;
  #ttlTimer: ReturnType<typeof setInterval> | undefined;
  /** A release too large for one turn goes on in the next ones, between other messages. */
  #releasing: ReturnType<typeof setTimeout> | null = null;
  #flushQueued = false;
  #closing: Promise<void> | null = null;
  #resolveClosed!: () => void;

  constructor(options: SchedulerOptions) {
    this.#options = options;
    this.#host = options.host ?? "127.0.0.1";
    this.#port = options.port ?? SCHEDULER_PORT;
    parseAddress({ host: this.#host, port: this.#port });
    this.#log = options.log ?? createLogger("scheduler");
    const state = this.#state;
    state.allowedFailures = options.allowedFailures ?? ALLOWED_FAILURES;
    state.noWorkersTimeoutMs = options.noWorkersTimeoutMs ?? NO_WORKERS_TIMEOUT_MS;
    state.unclaimedGraceMs = options.unclaimedGraceMs ?? UNCLAIMED_GRACE_MS;
    // Clients of a scheduler that restarted hold keys it never saw: wait for their workers.
    state.recoveringUntil = Date.now() + state.unclaimedGraceMs;
    this.#ttlMs = options.workerTtlMs ?? WORKER_TTL_MS;
    this.closed = new Promise<void>((resolve) => this.#resolveClosed = resolve);
  }

  /** Where it listens, `tcp://host:port`. */
  get address(): string {
    if (this.#server === null) throw new Error("The scheduler has not started: call start() first");
    return this.#server.url;
  }

  /** The dashboard's address, or null without one. */
  get dashboard(): string | null {
    return this.#http?.url ?? null;
  }

  /** Listens, starts the timers and the dashboard. */
  async start(): Promise<void> {
    const options = this.#options;
    const dispatch = dispatchTo("scheduler", schedulerOps, this.#handlers());
    this.#server = await serve(
      { host: this.#host, port: this.#port, tls: Boolean(options.tls?.cert) },
      (op, args, comm) => {
        this.#state.at(Date.now());
        // What the state decides is sent once the messages already read have all been
        // handled (frees to one worker join in one message). Most ops answer at once: no
        // promise per message for them.
        this.#flushSoon();
        let result: unknown;
        try {
          result = dispatch(op, args, comm);
        } catch (error) {
          this.#refuseReport(op, args, comm, error);
          throw error;
        }
        if (!(result instanceof Promise)) return result;
        return result.then(
          (value) => {
            this.#flushSoon();
            return value;
          },
          (error) => {
            this.#refuseReport(op, args, comm, error);
            this.#flushSoon();
            throw error;
          },
        );
      },
      {
        authToken: options.authToken ?? tokenFromEnv(),
        tls: options.tls,
        handshakeTimeoutMs: options.handshakeTimeoutMs,
        frameBytesMax: options.frameBytesMax,
        connectionsMax: options.connectionsMax,
        log: this.#log,
        onClose: (comm) => this.#connectionClosed(comm),
        keepsAlive: options.keepsAlive,
      },
    );
    const state = this.#state;
    // Workers that stop answering (a hung process, a cut network) keep their connection
    // open: only the silence tells. Check a few times per TTL, and per grace period.
    this.#ttlTimer = setInterval(
      () => this.#tick(),
      Math.max(
        50,
        Math.min(TICK_MS_MAX, this.#ttlMs / 4, state.unclaimedGraceMs / 4, state.noWorkersTimeoutMs / 4),
      ),
    );
    if (options.keepsAlive === false) Deno.unrefTimer(this.#ttlTimer);
    if (options.dashboardPort !== undefined) {
      const dashboard = new Dashboard(state, () => ({
        address: this.address,
        id: this.id,
        clients: this.#clients.size,
        started: this.#started,
      }));
      this.#dashboard = dashboard;
      try {
        this.#http = await startHttp({
          host: this.#host,
          port: options.dashboardPort,
          authToken: options.authToken ?? tokenFromEnv(),
          routes: dashboard.routes(),
          log: this.#log,
        });
        if (options.keepsAlive === false) {
          this.#http.unref();
          dashboard.unref();
        }
        this.#log.info(`Dashboard at ${this.#http.url}`);
      } catch (error) {
        dashboard.close();
        this.#dashboard = null;
        clearInterval(this.#ttlTimer);
        await this.#server.close();
        throw error;
      }
    }
    this.#log.info(`Scheduler at ${this.address}`);
  }

  /** Closes every connection and stops listening. */
  close(): Promise<void> {
    clearInterval(this.#ttlTimer);
    if (this.#releasing !== null) clearTimeout(this.#releasing);
    this.#dashboard?.close();
    const httpClosed = this.#http?.close();
    this.#closing ??= Promise.all([this.#server?.close(), httpClosed]).then(() => {
      this.#log.info("Scheduler closed");
      this.#resolveClosed();
    });
    return this.#closing;
  }

  /** `await using` closes it. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  // ---- sending what the state decided ----

  /** Flushes at the end of this turn (once, however many messages ask). */
  #flushSoon(): void {
    if (this.#flushQueued) return;
    this.#flushQueued = true;
    queueMicrotask(() => {
      this.#flushQueued = false;
      this.#flush();
    });
  }

  /** Sends what the state decided. A peer whose connection is gone is dropped by its close handler. */
  #flush(): void {
    const state = this.#state;
    if (state.releasesPending && this.#releasing === null && this.#closing === null) {
      this.#releasing = setTimeout(() => {
        this.#releasing = null;
        state.continueReleases();
        this.#flush();
      }, 0);
    }
    // A compute_task that cannot be sent fails its task, which may make more messages.
    for (let out = state.drain(); out.length > 0; out = state.drain()) {
      // Workers a compute_task of this batch did not reach: their function ids are out of
      // step until the batch ends (the state starts them over), so every later task of
      // the batch carries its function.
      const unreached = new Set<string>();
      for (const m of out) {
        const comm = m.to === "worker" ? this.#workerComms.get(m.address) : this.#clients.get(m.client);
        if (comm === undefined || comm.isClosed) continue;
        if (m.to === "worker" && m.op === "compute_task" && unreached.has(m.address)) {
          m.args.function ??= state.tasks.get(m.args.key)?.run?.function;
        }
        try {
          if (m.to === "worker") notice(comm, workerOps, m.op, m.args);
          else notice(comm, clientOps, m.op, m.args);
        } catch (error) {
          const to = m.to === "worker" ? m.address : m.client;
          this.#log.warn(`Could not send ${m.op} to ${to}: ${(error as Error).message}`);
          if (m.to === "worker" && m.op === "compute_task") {
            unreached.add(m.address);
            const info = toRemoteErrorInfo(error);
            state.computeTaskUnsent(m.address, m.args.key, {
              name: info.name,
              message: `Task ${m.args.key} cannot be sent to a worker: ${info.message}`,
            });
          }
        }
      }
    }
  }

  #tick(): void {
    const now = Date.now();
    this.#state.at(now);
    for (const address of this.#state.expiredWorkers(now, this.#ttlMs)) {
      const comm = this.#workerComms.get(address);
      this.#forget(address, `no heartbeat for over ${this.#ttlMs} ms`, true);
      comm?.close();
    }
    this.#state.tick(now);
    for (const line of this.#state.drainNotices()) this.#log.warn(line);
    this.#flush();
  }

  // ---- registrations ----

  #registration(comm: Comm): Registration {
    let r = this.#registrations.get(comm);
    if (r === undefined) this.#registrations.set(comm, r = { workers: new Set(), client: null });
    return r;
  }

  #clientOf(comm: Comm): string {
    const client = this.#registrations.get(comm)?.client;
    if (typeof client !== "string") {
      throw new RangeError("This connection has not registered as a client (register_client)");
    }
    return client;
  }

  #workersOf(comm: Comm): ReadonlySet<string> {
    return this.#registrations.get(comm)?.workers ?? NO_WORKERS;
  }

  #forget(address: string, why: string, died: boolean): void {
    if (!this.#state.workers.has(address)) return;
    const lost = this.#state.removeWorker(address, died);
    this.#workerComms.delete(address);
    this.#flush();
    this.#log.info(
      `Worker ${address} left (${why})` +
        (lost.length ? `; ${lost.length} keys lost their last copy: ${lost.slice(0, 10).join(", ")}` : ""),
    );
  }

  #connectionClosed(comm: Comm): void {
    const r = this.#registrations.get(comm);
    if (r === undefined) return;
    for (const address of r.workers) {
      if (this.#workerComms.get(address) === comm) this.#forget(address, "connection closed", true);
    }
    const client = r.client;
    if (client !== null && this.#clients.get(client) === comm) {
      this.#clients.delete(client);
      this.#state.removeClient(client);
      this.#flush();
      this.#log.info(`Client ${client} left`);
    }
  }

  #callWorker(address: string, op: string, args: unknown): Promise<unknown> {
    const comm = this.#workerComms.get(address);
    if (comm === undefined) return Promise.reject(new RangeError(`Unknown worker ${address}`));
    return comm.call(op, args, { timeoutMs: WORKER_CALL_TIMEOUT_MS });
  }

  /** Several heartbeats fit in a TTL whatever the cluster's size. */
  #interval(): number {
    return Math.min(heartbeatIntervalMs(this.#state.workers.size), this.#ttlMs / 4);
  }

  /**
   * A worker's report on a task that fails the op's checks (say, an error whose name is
   * not a string) would be logged and dropped, and the task would wait for good: it
   * fails the task instead, saying why.
   */
  #refuseReport(op: string, args: unknown, comm: Comm, error: unknown): void {
    const key = (args as { key?: unknown } | null)?.key;
    if (!TASK_REPORTS.has(op) || typeof key !== "string") return;
    for (const address of this.#workersOf(comm)) {
      this.#state.reportRefused(address, key, {
        name: "ProtocolError",
        message: `Task ${key} ended, but ${address}'s ${op} report cannot be accepted: ${
          (error as Error).message
        }`,
      });
    }
  }

  // ---- ops ----

  #handlers(): Handlers<typeof schedulerOps> {
    const state = this.#state;
    const log = this.#log;
    return {
      register: (args, comm) => {
        const previous = this.#workerComms.get(args.address);
        if (previous && previous !== comm) {
          // The same worker on a new connection: the old one is dead (e.g. a cut network healed).
          this.#forget(args.address, "registered again on a new connection", true);
          previous.close();
        }
        state.addWorker(args, Date.now());
        this.#workerComms.set(args.address, comm);
        this.#registration(comm).workers.add(args.address);
        log.info(
          `Worker ${args.address} registered (${args.nthreads ?? 1} threads, ${args.keys?.length ?? 0} keys)`,
        );
        return { status: "OK", heartbeat_interval_ms: this.#interval(), worker_ttl_ms: this.#ttlMs };
      },
      unregister: ({ address }) => {
        this.#forget(address, "unregistered", false);
        return { status: "OK" };
      },
      heartbeat: ({ address, metrics, transfers, problems }, comm) => {
        const known = this.#workerComms.get(address) === comm &&
          state.heartbeat(address, Date.now(), metrics, problems);
        if (known && transfers) this.#dashboard?.onTransfers(address, transfers);
        return { status: known ? "OK" : "unknown", heartbeat_interval_ms: this.#interval() };
      },
      retire_workers: async ({ workers, close }) => {
        const plan = state.retirePlan(workers);
        let moved = 0;
        await Promise.all([...plan].map(async ([target, whoHas]) => {
          const reply = await this.#callWorker(target, "gather_keys", { who_has: whoHas }).catch((e) => e) as
            | {
              missing?: unknown;
            }
            | null;
          // A worker's reply is checked like any input: a bad one counts as nothing copied.
          const missing = Array.isArray(reply?.missing) ? reply.missing as string[] : Object.keys(whoHas);
          moved += Object.keys(whoHas).length - missing.length;
          if (missing.length) log.warn(`Retiring: ${target} could not copy ${missing.join(", ")}`);
        }));
        log.info(`Retiring ${workers.join(", ")}: ${moved} keys copied to other workers first`);
        const retired = workers.filter((a) => state.workers.has(a));
        if (close !== false) {
          await Promise.all(retired.map((a) => this.#callWorker(a, "terminate", {}).catch(() => {})));
        }
        return { retired, moved };
      },
      missing_data: ({ key, missing }, comm) => {
        for (const address of this.#workersOf(comm)) state.missingData(address, key, missing);
      },
      add_keys: ({ address, keys, nbytes, replicas }) => {
        state.addKeys(address, keys, nbytes, replicas);
        log.debug(`${address} has ${keys.join(", ")}`);
        return { status: "OK" };
      },
      remove_keys: ({ address, keys }) => {
        state.removeKeys(address, keys);
        return { status: "OK" };
      },
      who_has: ({ keys }) => {
        const reply = state.whoHasOf(keys);
        if (keys) log.debug(`who_has ${keys.join(", ")}: ${JSON.stringify(reply)}`);
        return reply;
      },
      has_what: ({ workers }) => state.hasWhatOf(workers),
      ncores: () => state.ncores(),
      workers: () => state.workerList(),
      delete_data: async ({ keys }) => {
        const orders = state.deleteKeys(keys);
        this.#flush();
        await Promise.all(
          [...orders].map(([address, list]) =>
            this.#callWorker(address, "delete_data", { keys: list, report: false }).catch((error) =>
              log.warn(`Worker ${address} did not delete ${list.join(", ")}: ${(error as Error).message}`)
            )
          ),
        );
        return { status: "OK" };
      },
      broadcast: async ({ msg, workers }) => {
        if (SCHEDULER_ONLY_WORKER_OPS.has(msg.op)) {
          // Relayed on the scheduler's own connection, it would pass for the scheduler's and
          // put the worker out of step with it (a task id bound to another function, say).
          throw new RangeError(
            `Cannot broadcast ${msg.op}: only the scheduler sends it to its workers, as its tasks require`,
          );
        }
        const targets = workers ?? [...state.workers.keys()];
        const replies = await Promise.all(targets.map(async (address) => {
          try {
            return [address, await this.#callWorker(address, msg.op, msg.args ?? {})] as const;
          } catch (error) {
            const info = toRemoteErrorInfo(error);
            throw new RemoteError(msg.op, { ...info, message: `Worker ${address}: ${info.message}` });
          }
        }));
        return Object.fromEntries(replies);
      },
      identity: () => ({
        type: "scheduler",
        id: this.id,
        address: this.address,
        workers: state.workers.size,
        dashboard: this.dashboard,
      }),
      register_client: ({ id: client }, comm) => {
        const previous = this.#clients.get(client);
        if (previous && previous !== comm) {
          // The same client on a new connection: the old one is half-open (a cut network).
          this.#registration(previous).client = null;
          previous.close();
        }
        this.#clients.set(client, comm);
        this.#registration(comm).client = client;
        log.info(`Client ${client} connected`);
        return { status: "OK", dashboard: this.dashboard };
      },
      update_graph: ({ functions, tasks, wanted }, comm) => {
        const client = this.#clientOf(comm);
        const specs = tasks.map((t) => toSpec(t, functions));
        state.updateGraph(client, specs, wanted, Date.now());
        return { status: "OK" };
      },
      release_keys: ({ keys }, comm) => {
        state.releaseKeys(this.#clientOf(comm), keys);
        return { status: "OK" };
      },
      cancel_keys: ({ keys }) => {
        state.cancelKeys(keys);
        return { status: "OK" };
      },
      scatter: ({ who_has, nbytes }, comm) => {
        const client = this.#clientOf(comm);
        for (const [key, holders] of Object.entries(who_has)) {
          for (const address of holders) state.addKeys(address, [key], nbytes);
        }
        state.updateGraph(client, [], Object.keys(who_has), Date.now());
        // Scattered data belongs to the client's futures, not pinned like update_data.
        for (const key of Object.keys(who_has)) {
          const ts = state.tasks.get(key);
          if (ts) ts.external = false;
        }
        return { status: "OK" };
      },
      progress: () => state.progress() as Record<string, Record<string, number>>,
      task_finished: ({ key, nbytes, duration, start, stop, thread }, comm) => {
        for (const address of this.#workersOf(comm)) {
          // The prefix the state keeps (one string for all its tasks), read before the
          // state may forget the key.
          const prefix = this.#dashboard ? state.tasks.get(key)?.prefix ?? keyPrefix(key) : "";
          state.taskFinished(address, key, nbytes, duration);
          if (this.#dashboard && start !== undefined && stop !== undefined) {
            this.#dashboard.onTask(key, prefix, address, thread ?? 0, start, stop, "done");
          }
        }
      },
      task_erred: ({ key, error, killed, start, stop, thread }, comm) => {
        for (const address of this.#workersOf(comm)) {
          state.taskErred(address, key, error, killed);
          const now = Date.now();
          this.#dashboard?.onTask(
            key,
            keyPrefix(key),
            address,
            thread ?? 0,
            start ?? now,
            stop ?? now,
            "erred",
          );
        }
      },
      ping: () => "pong",
      story: ({ key }) => ({
        key,
        state: state.tasks.get(key)?.state ?? "released",
        story: state.story(key),
        why: state.why(key, Date.now()),
      }),
      problems: () => state.problems,
      adaptive_target: () => ({ workers: state.desiredWorkers() }),
      terminate: (_args, comm) => {
        // Reply first, then close: the caller learns the order was taken.
        setTimeout(() => comm.flushed().then(() => this.close()), 0);
        return { status: "OK" };
      },
    };
  }
}

const NO_WORKERS: ReadonlySet<string> = new Set();

/** A task from the wire, with its function resolved against the message's table. */
function toSpec(t: GraphTask, functions: FunctionSpec[]): TaskSpec {
  if (t.fn >= functions.length) {
    throw new RangeError(`Task ${t.key}: fn ${t.fn} is past the ${functions.length} functions sent`);
  }
  return {
    key: t.key,
    run: { function: functions[t.fn], args: t.args },
    deps: t.deps,
    priority: t.priority,
    retries: t.retries,
    workers: t.workers,
  };
}
