/**
 * A whole cluster on this machine in one call: a scheduler in this process and worker
 * processes on 127.0.0.1 (or workers in this process, for tests and embedding).
 *
 * @module
 */

import { keepingAlive } from "../util/time.ts";
import { createLogger, type LogFormat, type LogLevel } from "../util/log.ts";
import { type NodeProcess, spawnNode } from "./spawn.ts";
import type { SchedulerNode } from "../scheduler/scheduler.ts";
import type { WorkerNode } from "../worker/worker.ts";
import { DASHBOARD_PORT } from "../util/defaults.ts";
import { tokenFromEnv } from "../protocol/handshake.ts";
import { memoryLimit as memoryLimitOf } from "../util/memory.ts";

/** Task permissions as the --task-permissions flag writes them. */
function permissionsFlag(p: Deno.PermissionOptions): string {
  if (typeof p === "string") return p;
  const parts = Object.entries(p).flatMap(([name, v]) =>
    v === true || v === "inherit"
      ? [name]
      : Array.isArray(v) && v.length > 0
      ? [`${name}=${v.join(";")}`]
      : []
  );
  return parts.length === 0 ? "none" : parts.join(",");
}

/** Options of a local cluster. */
export interface LocalClusterOptions {
  /** How many workers (default 2). */
  workers?: number;
  /** Threads (executors) per worker (default 1). */
  threads?: number;
  /** Workers as separate processes (default true; needs --allow-run), or in this process. */
  processes?: boolean;
  /** Interface for every node (default 127.0.0.1). */
  host?: string;
  /** The scheduler's port (default 0: any free port). */
  port?: number;
  /** Log level of every node (default warn); logs go to stderr. */
  logLevel?: LogLevel;
  /** Log format of every node (default text). */
  logFormat?: LogFormat;
  /** A shared secret for every connection (default: DIST_AUTH_TOKEN, if set). */
  authToken?: string;
  /** The scheduler's dashboard port (default 8787, any free port when taken); null for none. */
  dashboardPort?: number | null;
  /** What tasks may touch (see WorkerOptions.taskPermissions; default "none"). */
  taskPermissions?: Deno.PermissionOptions;
  /**
   * Each worker's memory limit in bytes (see WorkerOptions.memoryLimit), 0 for none, or
   * "auto" (the default): this machine's memory divided among the workers.
   */
  memoryLimit?: number | "auto";
  /**
   * With worker processes: each under a nanny that starts it again when it dies or
   * passes 95% of its memory limit (default true; see `dist worker --help`).
   */
  nanny?: boolean;
  /**
   * Whether the cluster keeps this process alive (default false): a script that forgot
   * `close()` ends when its own work is done, and its worker processes (supervised) end
   * with it. `dist local` passes true. Workers in this process (`processes: false`) keep
   * it alive regardless: their executor threads do.
   */
  keepsAlive?: boolean;
}

/** A scheduler and workers on this machine. */
export class LocalCluster implements AsyncDisposable {
  /** The scheduler's address. */
  readonly address: string;
  /** The workers' addresses. */
  readonly workers: string[];
  /** The dashboard's address, or null. */
  readonly dashboard: string | null;
  #scheduler: SchedulerNode;
  #processes: NodeProcess[];
  #inProcess: WorkerNode[];
  #closing: Promise<void> | null = null;

  private constructor(scheduler: SchedulerNode, processes: NodeProcess[], inProcess: WorkerNode[]) {
    this.#scheduler = scheduler;
    this.#processes = processes;
    this.#inProcess = inProcess;
    this.address = scheduler.address;
    this.dashboard = scheduler.dashboard;
    this.workers = [...processes.map((p) => p.address), ...inProcess.map((w) => w.address)];
  }

  /**
   * Starts a scheduler and `workers` workers; resolves once every worker has
   * registered.
   *
   * @example
   * ```ts
   * import { Client, LocalCluster } from "@dist/dist";
   * await using cluster = await LocalCluster.start({ workers: 2, threads: 1 });
   * await using client = await Client.connect(cluster.address);
   * console.log(await client.submit((x: number) => x * 2, 21).result()); // 42
   * ```
   */
  static async start(options: LocalClusterOptions = {}): Promise<LocalCluster> {
    const n = options.workers ?? 2;
    const threads = options.threads ?? 1;
    for (const [name, v] of [["workers", n], ["threads", threads]] as const) {
      if (!Number.isInteger(v) || v < (name === "workers" ? 0 : 1)) {
        throw new RangeError(
          `Invalid ${name} ${v}: expected a whole number from ${name === "workers" ? 0 : 1} up`,
        );
      }
    }
    const processes = options.processes ?? true;
    if (processes && n > 0 && Deno.permissions.querySync({ name: "run" }).state !== "granted") {
      throw new Error("A local cluster with worker processes needs --allow-run (or pass processes: false)");
    }
    const host = options.host ?? "127.0.0.1";
    const level = options.logLevel ?? "warn";
    const memoryLimit = options.memoryLimit === undefined || options.memoryLimit === "auto"
      ? memoryLimitOf("auto", 1 / Math.max(1, n))
      : options.memoryLimit;
    if (!Number.isSafeInteger(memoryLimit) || memoryLimit < 0) {
      throw new RangeError(
        `Invalid memoryLimit ${memoryLimit}: expected bytes, a whole number (0 for none), or "auto"`,
      );
    }
    const authToken = options.authToken ?? tokenFromEnv();
    // Loaded here, not at the top: a program that imports the client loads no node code.
    const { startScheduler } = await import("../scheduler/scheduler.ts");
    const { startWorker } = await import("../worker/worker.ts");
    const keepsAlive = options.keepsAlive ?? false;
    const scheduler = await startScheduler({
      keepsAlive,
      host,
      authToken,
      port: options.port ?? 0,
      dashboardPort: options.dashboardPort === null ? undefined : options.dashboardPort ?? DASHBOARD_PORT,
      log: createLogger("scheduler", level, options.logFormat),
    });
    const spawned: NodeProcess[] = [];
    const inProcess: WorkerNode[] = [];
    try {
      if (processes) {
        const forward = (line: string) => console.error(line);
        spawned.push(
          ...await Promise.all(
            Array.from({ length: n }, (_, i) =>
              spawnNode(
                [
                  "worker",
                  scheduler.address,
                  "--host",
                  host,
                  "--name",
                  `worker-${i}`,
                  "--nthreads",
                  String(threads),
                  "--log-level",
                  level,
                  "--log-format",
                  options.logFormat ?? "text",
                  "--task-permissions",
                  permissionsFlag(options.taskPermissions ?? "none"),
                  "--memory-limit",
                  String(memoryLimit),
                  ...(options.nanny === false ? ["--no-nanny"] : []),
                ],
                // Supervised: the workers stop when this process ends, even killed.
                {
                  onLog: forward,
                  env: authToken ? { DIST_AUTH_TOKEN: authToken } : undefined,
                  supervised: true,
                },
              )),
          ),
        );
      } else {
        for (let i = 0; i < n; i++) {
          inProcess.push(
            await startWorker({
              scheduler: scheduler.address,
              host,
              name: `worker-${i}`,
              nthreads: threads,
              authToken,
              taskPermissions: options.taskPermissions,
              memoryLimit,
              log: createLogger(`worker-${i}`, level, options.logFormat),
            }),
          );
        }
      }
    } catch (error) {
      await Promise.all(spawned.map((p) => p.stop()));
      await Promise.all(inProcess.map((w) => w.close()));
      await scheduler.close();
      throw error;
    }
    // Supervised, they end with this process however it ends: they need not hold it open.
    if (!keepsAlive) { for (const p of spawned) p.child.unref(); }
    return new LocalCluster(scheduler, spawned, inProcess);
  }

  /** Stops the workers (they unregister first), then the scheduler. */
  close(): Promise<void> {
    this.#closing ??= keepingAlive((async () => {
      await Promise.all([...this.#processes.map((p) => p.stop()), ...this.#inProcess.map((w) => w.close())]);
      await this.#scheduler.close();
    })());
    return this.#closing;
  }

  /** `await using cluster = ...` closes it. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
