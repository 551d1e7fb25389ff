/**
 * A whole cluster on this machine in one call: a scheduler in this process and worker
 * processes on 127.0.0.1 (or workers in this process, for tests and embedding).
 *
 * @module
 */

import { keepingAlive } from "../util/time.ts";
import { type Rpc, rpc } from "../protocol/rpc.ts";
import type { SchedulerOps } from "../protocol/ops.ts";
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
  /** The dashboard's address, or null. */
  readonly dashboard: string | null;
  #scheduler: SchedulerNode;
  #processes: NodeProcess[];
  #inProcess: WorkerNode[];
  #closing: Promise<void> | null = null;
  /** Starts worker process number `i` (null with workers in this process). */
  #spawn: ((i: number) => Promise<NodeProcess>) | null;
  /** The next worker's number (names are never reused). */
  #next: number;
  /** Scaling in progress: one `scale` at a time. */
  #scaling: Promise<void> = Promise.resolve();
  #adaptive: Adaptive | null = null;
  /** The cluster's token, for the rpcs that scale it. */
  readonly #authToken: string | undefined;

  private constructor(
    scheduler: SchedulerNode,
    processes: NodeProcess[],
    inProcess: WorkerNode[],
    spawn: ((i: number) => Promise<NodeProcess>) | null,
    authToken: string | undefined,
  ) {
    this.#authToken = authToken;
    this.#scheduler = scheduler;
    this.#processes = processes;
    this.#inProcess = inProcess;
    this.#spawn = spawn;
    this.#next = processes.length + inProcess.length;
    this.address = scheduler.address;
    this.dashboard = scheduler.dashboard;
  }

  /** The workers' addresses, oldest first. */
  get workers(): string[] {
    return [...this.#processes.map((p) => p.address), ...this.#inProcess.map((w) => w.address)];
  }

  /**
   * Starts or stops worker processes until there are `n`: new ones get the cluster's
   * options; the newest go first, each handing the keys only it holds to the others before
   * it exits (as on SIGTERM). Resolves once they have registered or left.
   */
  scale(n: number): Promise<void> {
    if (!Number.isInteger(n) || n < 0) {
      throw new RangeError(`Invalid scale(${n}): expected a whole number from 0 up`);
    }
    const spawn = this.#spawn;
    if (spawn === null) {
      throw new TypeError("scale needs worker processes: this cluster was started with processes: false");
    }
    if (this.#closing !== null) return Promise.reject(new Error("This local cluster is closed"));
    this.#scaling = this.#scaling.catch(() => {}).then(async () => {
      if (this.#processes.length < n) {
        const started = await Promise.all(
          Array.from({ length: n - this.#processes.length }, () => spawn(this.#next++)),
        );
        this.#processes.push(...started);
      } else if (this.#processes.length > n) {
        const leaving = this.#processes.splice(n);
        // All at once, so none of them is chosen to keep another's data; then each is
        // stopped (and finds nothing left to hand over).
        await using scheduler = rpc<SchedulerOps>(this.address, {
          authToken: this.#authToken,
          timeoutMs: 60_000,
        });
        await scheduler.retire_workers({ workers: leaving.map((p) => p.address), close: false }).catch(
          () => {},
        );
        await Promise.all(leaving.map((p) => p.stop()));
      }
    });
    return this.#scaling;
  }

  /**
   * Follows the work: every `intervalMs` (default 1 s) asks the scheduler how many workers
   * its work would like (`dist_scheduler_desired_workers`: the expected seconds of the tasks
   * queued and running over 5 s per thread, and enough to hold the values in memory) and
   * scales to it within `minimum` and `maximum`; up at once, down only after `waitCount`
   * asks in a row (default 3) said fewer, so a pause between two bursts keeps the workers.
   * One adaptive policy per cluster: a new call replaces the last. `stop()` ends it.
   */
  adapt(
    options: { minimum?: number; maximum?: number; intervalMs?: number; waitCount?: number } = {},
  ): Adaptive {
    const minimum = options.minimum ?? 0;
    const maximum = options.maximum ?? Infinity;
    if (!(minimum >= 0 && maximum >= minimum)) {
      throw new RangeError(`Invalid adapt bounds: minimum ${minimum}, maximum ${maximum}`);
    }
    this.#adaptive?.stop();
    const adaptive = new Adaptive(this, this.address, this.#authToken, {
      minimum,
      maximum,
      intervalMs: options.intervalMs ?? 1_000,
      waitCount: options.waitCount ?? 3,
    });
    this.#adaptive = adaptive;
    return adaptive;
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
    const forward = (line: string) => console.error(line);
    const spawn = (i: number) =>
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
      ).then((node) => {
        // Supervised, they end with this process however it ends: they need not hold it open.
        if (!keepsAlive) node.child.unref();
        return node;
      });
    try {
      if (processes) {
        spawned.push(...await Promise.all(Array.from({ length: n }, (_, i) => spawn(i))));
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
    return new LocalCluster(scheduler, spawned, inProcess, processes ? spawn : null, authToken);
  }

  /** Stops the workers (they unregister first), then the scheduler. */
  close(): Promise<void> {
    this.#adaptive?.stop();
    this.#closing ??= keepingAlive((async () => {
      await this.#scaling.catch(() => {});
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

/** Options of `LocalCluster.adapt`, with their defaults filled in. */
interface AdaptiveOptions {
  minimum: number;
  maximum: number;
  intervalMs: number;
  waitCount: number;
}

/** A cluster following its work (`LocalCluster.adapt`); `stop()` ends it. */
export class Adaptive {
  #cluster: LocalCluster;
  #scheduler: Rpc<SchedulerOps>;
  #options: AdaptiveOptions;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #lower = 0;
  #stopped = false;
  /** The last target it scaled to, or null before its first decision. */
  target: number | null = null;

  /** @internal Made by `LocalCluster.adapt`. */
  constructor(
    cluster: LocalCluster,
    address: string,
    authToken: string | undefined,
    options: AdaptiveOptions,
  ) {
    this.#cluster = cluster;
    this.#options = options;
    this.#scheduler = rpc<SchedulerOps>(address, { authToken, timeoutMs: 10_000 });
    this.#schedule(0);
  }

  #schedule(ms: number): void {
    if (this.#stopped) return;
    this.#timer = setTimeout(() => this.#step().finally(() => this.#schedule(this.#options.intervalMs)), ms);
    // It follows the work; it does not keep a script alive by itself.
    Deno.unrefTimer(this.#timer);
  }

  async #step(): Promise<void> {
    let wanted: number;
    try {
      wanted = (await this.#scheduler.adaptive_target()).workers;
    } catch {
      return; // the scheduler is closing or busy: ask again next time
    }
    const { minimum, maximum, waitCount } = this.#options;
    const target = Math.min(maximum, Math.max(minimum, wanted));
    const now = this.#cluster.workers.length;
    if (target < now && ++this.#lower < waitCount) return;
    this.#lower = 0;
    this.target = target;
    if (target !== now && !this.#stopped) await this.#cluster.scale(target).catch(() => {});
  }

  /** Stops following the work; the workers stay as they are. */
  stop(): void {
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#scheduler.close();
  }
}
