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
  type FunctionSpec,
  type GraphTask,
  SCHEDULER_ONLY_WORKER_OPS,
  schedulerOps,
} from "../protocol/ops.ts";
import { dispatchTo, type Handlers, serve } from "../protocol/server.ts";
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

const WORKER_TAG = "worker";
const CLIENT_TAG = "client";

/**
 * Starts a scheduler.
 *
 * @example
 * ```ts
 * import { startScheduler } from "@dist/dist";
 * const scheduler = await startScheduler({ port: 0 });
 * console.log(scheduler.address); // tcp://127.0.0.1:PORT
 * await scheduler.close();
 * ```
 */
export async function startScheduler(options: SchedulerOptions = {}): Promise<SchedulerNode> {
  const host = options.host ?? "127.0.0.1";
  const port = options.port ?? SCHEDULER_PORT;
  parseAddress({ host, port });
  const log = options.log ?? createLogger("scheduler");
  const state = new SchedulerTasks();
  state.allowedFailures = options.allowedFailures ?? ALLOWED_FAILURES;
  state.noWorkersTimeoutMs = options.noWorkersTimeoutMs ?? NO_WORKERS_TIMEOUT_MS;
  state.unclaimedGraceMs = options.unclaimedGraceMs ?? UNCLAIMED_GRACE_MS;
  // Clients of a scheduler that restarted hold keys it never saw: wait for their workers.
  state.recoveringUntil = Date.now() + state.unclaimedGraceMs;
  const ttlMs = options.workerTtlMs ?? WORKER_TTL_MS;
  // Several heartbeats fit in a TTL whatever the cluster's size.
  const interval = () => Math.min(heartbeatIntervalMs(state.workers.size), ttlMs / 4);
  const id = crypto.randomUUID();
  // The connection each worker and client registered on: the scheduler talks back there.
  const commOf = new Map<string, Comm>();
  const clients = new Map<string, Comm>();
  const started = Date.now();
  // Declared before the server starts: a handler may run as soon as it listens.
  let dashboard: Dashboard | null = null;
  let http: HttpServer | null = null;

  // A release too large for one turn goes on in the next ones, between other messages.
  let releasing: ReturnType<typeof setTimeout> | null = null;
  const continueReleases = () => {
    releasing = null;
    state.continueReleases();
    flush();
  };

  /** Sends what the state decided. A peer whose connection is gone is dropped by its close handler. */
  const flush = () => {
    if (state.releasesPending && releasing === null && closing === null) {
      releasing = setTimeout(continueReleases, 0);
    }
    // A compute_task that cannot be sent fails its task, which may make more messages.
    for (let out = state.drain(); out.length > 0; out = state.drain()) {
      // Workers a compute_task of this batch did not reach: their function ids are out of
      // step until the batch ends (the state starts them over), so every later task of
      // the batch carries its function.
      const unreached = new Set<string>();
      for (const m of out) {
        const comm = m.to === "worker" ? commOf.get(m.address) : clients.get(m.client);
        if (comm === undefined || comm.isClosed) continue;
        if (m.to === "worker" && m.op === "compute_task" && unreached.has(m.address)) {
          m.args.function ??= state.tasks.get(m.args.key)?.run?.function;
        }
        try {
          comm.notify(m.op, m.args);
        } catch (error) {
          const to = m.to === "worker" ? m.address : m.client;
          log.warn(`Could not send ${m.op} to ${to}: ${(error as Error).message}`);
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
  };
  let closing: Promise<void> | null = null;
  let resolveClosed!: () => void;
  const closed = new Promise<void>((resolve) => resolveClosed = resolve);

  const forget = (address: string, why: string, died: boolean) => {
    if (!state.workers.has(address)) return;
    const lost = state.removeWorker(address, died);
    commOf.delete(address);
    flush();
    log.info(
      `Worker ${address} left (${why})` +
        (lost.length ? `; ${lost.length} keys lost their last copy: ${lost.slice(0, 10).join(", ")}` : ""),
    );
  };

  const callWorker = (address: string, op: string, args: unknown) => {
    const comm = commOf.get(address);
    if (comm === undefined) return Promise.reject(new RangeError(`Unknown worker ${address}`));
    return comm.call(op, args, { timeoutMs: WORKER_CALL_TIMEOUT_MS });
  };

  const handlers: Handlers<typeof schedulerOps> = {
    register(args, comm) {
      const previous = commOf.get(args.address);
      if (previous && previous !== comm) {
        // The same worker on a new connection: the old one is dead (e.g. a cut network healed).
        forget(args.address, "registered again on a new connection", true);
        previous.close();
      }
      state.addWorker(args, Date.now());
      commOf.set(args.address, comm);
      let registered = comm.tags.get(WORKER_TAG) as Set<string> | undefined;
      if (registered === undefined) comm.tags.set(WORKER_TAG, registered = new Set());
      registered.add(args.address);
      log.info(
        `Worker ${args.address} registered (${args.nthreads ?? 1} threads, ${args.keys?.length ?? 0} keys)`,
      );
      return {
        status: "OK",
        heartbeat_interval_ms: interval(),
        worker_ttl_ms: ttlMs,
      };
    },
    unregister({ address }) {
      forget(address, "unregistered", false);
      return { status: "OK" };
    },
    heartbeat({ address, metrics, transfers }, comm) {
      const known = commOf.get(address) === comm && state.heartbeat(address, Date.now(), metrics);
      if (known && transfers) dashboard?.onTransfers(address, transfers);
      return {
        status: known ? "OK" : "unknown",
        heartbeat_interval_ms: interval(),
      };
    },
    async retire_workers({ workers, close }) {
      const plan = state.retirePlan(workers);
      let moved = 0;
      await Promise.all([...plan].map(async ([target, whoHas]) => {
        const reply = await callWorker(target, "gather_keys", { who_has: whoHas }).catch((e) => e) as {
          missing?: unknown;
        } | null;
        // A worker's reply is checked like any input: a bad one counts as nothing copied.
        const missing = Array.isArray(reply?.missing) ? reply.missing as string[] : Object.keys(whoHas);
        moved += Object.keys(whoHas).length - missing.length;
        if (missing.length) log.warn(`Retiring: ${target} could not copy ${missing.join(", ")}`);
      }));
      log.info(`Retiring ${workers.join(", ")}: ${moved} keys copied to other workers first`);
      const retired = workers.filter((a) => state.workers.has(a));
      if (close !== false) {
        await Promise.all(retired.map((a) => callWorker(a, "terminate", {}).catch(() => {})));
      }
      return { retired, moved };
    },
    missing_data({ key, missing }, comm) {
      for (const address of workersOf(comm)) state.missingData(address, key, missing);
    },
    add_keys({ address, keys, nbytes, replicas }) {
      state.addKeys(address, keys, nbytes, replicas);
      log.debug(`${address} has ${keys.join(", ")}`);
      return { status: "OK" };
    },
    remove_keys({ address, keys }) {
      state.removeKeys(address, keys);
      return { status: "OK" };
    },
    who_has({ keys }) {
      const reply = state.whoHasOf(keys);
      if (keys) log.debug(`who_has ${keys.join(", ")}: ${JSON.stringify(reply)}`);
      return reply;
    },
    has_what: ({ workers }) => state.hasWhatOf(workers),
    ncores: () => state.ncores(),
    workers: () => state.workerList(),
    async delete_data({ keys }) {
      const orders = state.deleteKeys(keys);
      flush();
      await Promise.all(
        [...orders].map(([address, list]) =>
          callWorker(address, "delete_data", { keys: list, report: false }).catch((error) =>
            log.warn(`Worker ${address} did not delete ${list.join(", ")}: ${(error as Error).message}`)
          )
        ),
      );
      return { status: "OK" };
    },
    async broadcast({ msg, workers }) {
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
          return [address, await callWorker(address, msg.op, msg.args ?? {})] as const;
        } catch (error) {
          const info = toRemoteErrorInfo(error);
          throw new RemoteError(msg.op, { ...info, message: `Worker ${address}: ${info.message}` });
        }
      }));
      return Object.fromEntries(replies);
    },
    identity: () => ({
      type: "scheduler",
      id,
      address: server.url,
      workers: state.workers.size,
      dashboard: http?.url ?? null,
    }),
    register_client({ id: client }, comm) {
      const previous = clients.get(client);
      if (previous && previous !== comm) {
        // The same client on a new connection: the old one is half-open (a cut network).
        previous.tags.delete(CLIENT_TAG);
        previous.close();
      }
      clients.set(client, comm);
      comm.tags.set(CLIENT_TAG, client);
      log.info(`Client ${client} connected`);
      return { status: "OK", dashboard: http?.url ?? null };
    },
    update_graph({ functions, tasks, wanted }, comm) {
      const client = clientOf(comm);
      const specs = tasks.map((t) => toSpec(t, functions));
      state.updateGraph(client, specs, wanted, Date.now());
      return { status: "OK" };
    },
    release_keys({ keys }, comm) {
      state.releaseKeys(clientOf(comm), keys);
      return { status: "OK" };
    },
    cancel_keys({ keys }) {
      state.cancelKeys(keys);
      return { status: "OK" };
    },
    scatter({ who_has, nbytes }, comm) {
      const client = clientOf(comm);
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
    task_finished({ key, nbytes, duration, start, stop, thread }, comm) {
      for (const address of workersOf(comm)) {
        state.taskFinished(address, key, nbytes, duration);
        if (dashboard && start !== undefined && stop !== undefined) {
          dashboard.onTask({
            key,
            prefix: keyPrefix(key),
            worker: address,
            thread: thread ?? 0,
            start,
            stop,
            status: "done",
          });
        }
      }
    },
    task_erred({ key, error, killed, start, stop, thread }, comm) {
      for (const address of workersOf(comm)) {
        state.taskErred(address, key, error, killed);
        const now = Date.now();
        dashboard?.onTask({
          key,
          prefix: keyPrefix(key),
          worker: address,
          thread: thread ?? 0,
          start: start ?? now,
          stop: stop ?? now,
          status: "erred",
        });
      }
    },
    ping: () => "pong",
    terminate(_args, comm) {
      // Reply first, then close: the caller learns the order was taken.
      setTimeout(() => comm.flushed().then(() => node.close()), 0);
      return { status: "OK" };
    },
  };

  const clientOf = (comm: Comm): string => {
    const client = comm.tags.get(CLIENT_TAG);
    if (typeof client !== "string") {
      throw new RangeError("This connection has not registered as a client (register_client)");
    }
    return client;
  };
  const workersOf = (comm: Comm): Set<string> =>
    (comm.tags.get(WORKER_TAG) as Set<string> | undefined) ?? new Set();

  const dispatch = dispatchTo("scheduler", schedulerOps, handlers);
  /**
   * A worker's report on a task that fails the op's checks (say, an error whose name is
   * not a string) would be logged and dropped, and the task would wait for good: it
   * fails the task instead, saying why.
   */
  const refuseReport = (op: string, args: unknown, comm: Comm, error: unknown) => {
    const key = (args as { key?: unknown } | null)?.key;
    if (!TASK_REPORTS.has(op) || typeof key !== "string") return;
    for (const address of workersOf(comm)) {
      state.reportRefused(address, key, {
        name: "ProtocolError",
        message: `Task ${key} ended, but ${address}'s ${op} report cannot be accepted: ${
          (error as Error).message
        }`,
      });
    }
  };

  const server = await serve({ host, port, tls: Boolean(options.tls?.cert) }, async (op, args, comm) => {
    try {
      return await dispatch(op, args, comm);
    } catch (error) {
      refuseReport(op, args, comm, error);
      throw error;
    } finally {
      flush();
    }
  }, {
    authToken: options.authToken ?? tokenFromEnv(),
    tls: options.tls,
    handshakeTimeoutMs: options.handshakeTimeoutMs,
    frameBytesMax: options.frameBytesMax,
    connectionsMax: options.connectionsMax,
    log,
    onClose(comm) {
      for (const address of workersOf(comm)) {
        if (commOf.get(address) === comm) forget(address, "connection closed", true);
      }
      const client = comm.tags.get(CLIENT_TAG);
      if (typeof client === "string" && clients.get(client) === comm) {
        clients.delete(client);
        state.removeClient(client);
        flush();
        log.info(`Client ${client} left`);
      }
    },
  });

  // Workers that stop answering (a hung process, a cut network) keep their connection
  // open: only the silence tells. Check a few times per TTL, and per grace period.
  const ttlTimer = setInterval(
    () => {
      const now = Date.now();
      for (const address of state.expiredWorkers(now, ttlMs)) {
        const comm = commOf.get(address);
        forget(address, `no heartbeat for over ${ttlMs} ms`, true);
        comm?.close();
      }
      state.tick(now);
      flush();
    },
    Math.max(50, Math.min(TICK_MS_MAX, ttlMs / 4, state.unclaimedGraceMs / 4, state.noWorkersTimeoutMs / 4)),
  );

  if (options.dashboardPort !== undefined) {
    dashboard = new Dashboard(state, () => ({ address: server.url, id, clients: clients.size, started }));
    try {
      http = await startHttp({
        host,
        port: options.dashboardPort!,
        authToken: options.authToken ?? tokenFromEnv(),
        routes: dashboard.routes(),
        log,
      });
      log.info(`Dashboard at ${http.url}`);
    } catch (error) {
      dashboard.close();
      clearInterval(ttlTimer);
      await server.close();
      throw error;
    }
  }

  const node: SchedulerNode = {
    address: server.url,
    id,
    dashboard: http?.url ?? null,
    closed,
    close() {
      clearInterval(ttlTimer);
      if (releasing !== null) clearTimeout(releasing);
      dashboard?.close();
      const httpClosed = http?.close();
      closing ??= Promise.all([server.close(), httpClosed]).then(() => {
        log.info("Scheduler closed");
        resolveClosed();
      });
      return closing;
    },
    [Symbol.asyncDispose]() {
      return node.close();
    },
  };
  log.info(`Scheduler at ${server.url}`);
  return node;
}

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
