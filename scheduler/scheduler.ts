/**
 * The scheduler node: a thin shell around SchedulerState. It turns ops into state
 * changes, ties each registration to the connection it came on (a worker whose
 * connection drops is gone), and calls workers back on those same connections.
 *
 * @module
 */

import { createLogger, type Logger } from "../_log.ts";
import { parseAddress } from "../protocol/address.ts";
import type { Comm } from "../protocol/comm.ts";
import { RemoteError, toRemoteErrorInfo } from "../protocol/errors.ts";
import { schedulerOps } from "../protocol/ops.ts";
import { dispatchTo, type Handlers, serve } from "../protocol/server.ts";
import { SchedulerState } from "./state.ts";

/** Default scheduler port, as Dask's. */
export const SCHEDULER_PORT = 8786;
/** How long the scheduler waits for one worker's reply to a broadcast or delete. */
export const WORKER_CALL_TIMEOUT_MS = 30_000;

/** Options of `startScheduler`. */
export interface SchedulerOptions {
  /** Interface to listen on; default 127.0.0.1. */
  host?: string;
  /** Port; default 8786, 0 for any free port. */
  port?: number;
  /** Largest frame accepted, in bytes. */
  frameBytesMax?: number;
  /** Where it logs; default stderr at info. */
  log?: Logger;
}

/** A running scheduler. */
export interface SchedulerNode {
  /** Where it listens, `tcp://host:port`. */
  readonly address: string;
  /** A fresh id per start. */
  readonly id: string;
  /** What it knows (read it; do not change it). */
  readonly state: SchedulerState;
  /** Resolves once it has closed, by `close()` or the `terminate` op. */
  readonly closed: Promise<void>;
  /** Closes every connection and stops listening. */
  close(): Promise<void>;
  /** `await using` closes it. */
  [Symbol.asyncDispose](): Promise<void>;
}

const WORKER_TAG = "worker";

/**
 * Starts a scheduler.
 *
 * @example
 * ```ts
 * import { startScheduler } from "./mod.ts";
 * const scheduler = await startScheduler({ port: 0 });
 * console.log(scheduler.address); // tcp://127.0.0.1:PORT
 * await scheduler.close();
 * ```
 */
// deno-lint-ignore require-await
export async function startScheduler(options: SchedulerOptions = {}): Promise<SchedulerNode> {
  const host = options.host ?? "127.0.0.1";
  const port = options.port ?? SCHEDULER_PORT;
  parseAddress({ host, port });
  const log = options.log ?? createLogger("scheduler");
  const state = new SchedulerState();
  const id = crypto.randomUUID();
  // The connection each worker registered on: the scheduler calls it back there.
  const commOf = new Map<string, Comm>();
  let closing: Promise<void> | null = null;
  let resolveClosed!: () => void;
  const closed = new Promise<void>((resolve) => resolveClosed = resolve);

  const forget = (address: string, why: string) => {
    if (!state.workers.has(address)) return;
    const lost = state.removeWorker(address);
    commOf.delete(address);
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
      state.addWorker(args);
      commOf.set(args.address, comm);
      let registered = comm.tags.get(WORKER_TAG) as Set<string> | undefined;
      if (registered === undefined) comm.tags.set(WORKER_TAG, registered = new Set());
      registered.add(args.address);
      log.info(
        `Worker ${args.address} registered (${args.nthreads ?? 1} threads, ${args.keys?.length ?? 0} keys)`,
      );
      return { status: "OK" };
    },
    unregister({ address }) {
      forget(address, "unregistered");
      return { status: "OK" };
    },
    add_keys({ address, keys, nbytes }) {
      state.addKeys(address, keys, nbytes);
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
    identity: () => ({ type: "scheduler", id, address: server.url, workers: state.workers.size }),
    ping: () => "pong",
    terminate(_args, comm) {
      // Reply first, then close: the caller learns the order was taken.
      setTimeout(() => comm.flushed().then(() => node.close()), 0);
      return { status: "OK" };
    },
  };

  const server = serve({ host, port }, dispatchTo("scheduler", schedulerOps, handlers), {
    frameBytesMax: options.frameBytesMax,
    log,
    onClose(comm) {
      const registered = comm.tags.get(WORKER_TAG) as Set<string> | undefined;
      for (const address of registered ?? []) {
        if (commOf.get(address) === comm) forget(address, "connection closed");
      }
    },
  });

  const node: SchedulerNode = {
    address: server.url,
    id,
    state,
    closed,
    close() {
      closing ??= server.close().then(() => {
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
