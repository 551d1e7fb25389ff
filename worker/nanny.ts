/**
 * The nanny: the small process `dist worker` runs by default (`--no-nanny` runs the
 * worker alone). It starts the worker as a child process and starts a new one when it
 * dies (a crash, a kill, the kernel's OOM killer) or exits past the terminate share of
 * its memory limit; it passes SIGINT and SIGTERM on (the worker hands over the keys only
 * it holds, then exits) and stops with it. A worker that stops on purpose (closed, told
 * to by the scheduler, or given up on its scheduler) is not started again.
 *
 * The worker watches its own memory (its process and its executor processes): Deno lets
 * no process read another's in /proc without --allow-all, and the worker's main thread
 * is never the one running tasks, so it sees a task's allocation as it happens. Under a
 * nanny it closes at once past the terminate share (`EXIT_MEMORY`), and the nanny starts
 * a new one.
 *
 * It loads no worker code, so its own memory stays small. The worker reads its stdin
 * (a pipe the nanny never writes) and stops when it closes: a nanny that is killed takes
 * its worker with it.
 *
 * @module
 */

import type { Logger } from "../util/log.ts";
import { EXIT_MEMORY, EXIT_SCHEDULER_LOST, EXIT_USAGE } from "../util/defaults.ts";
import { distArgs, lines, nodeEnvironment } from "../client/spawn.ts";

const PERMISSION_NAMES = ["read", "write", "net", "env", "run", "sys", "ffi", "import"] as const;
/** A worker that lived this long before dying is started again at once; one that died sooner, after a pause. */
const HEALTHY_LIFETIME_MS = 10_000;
/** First and longest pause before starting a worker that keeps dying young. */
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;
/** Longest a stopping worker gets to hand its data over before it is killed. */
const STOP_TIMEOUT_MS = 75_000;

/** What a nanny is started with. */
export interface NannyOptions {
  /** The worker's command line after `dist`: `["worker", SCHEDULER, ...flags]`. */
  args: string[];
  /** Where it logs. */
  log: Logger;
  /** Called with the first worker's address, once it listens. */
  onListening?: (address: string) => void;
}

/** Whether this process may start a worker process of its own. */
export function canSupervise(): boolean {
  return Deno.permissions.querySync({ name: "run", command: Deno.execPath() }).state === "granted";
}

/** The `--allow-*` flags this process has in full, for its worker. */
function permissionFlags(): string[] {
  const flags: string[] = [];
  for (const name of PERMISSION_NAMES) {
    try {
      if (Deno.permissions.querySync({ name } as Deno.PermissionDescriptor).state === "granted") {
        flags.push(`--allow-${name}`);
      }
    } catch { /* a permission this Deno does not know */ }
  }
  return flags;
}

/** How a process ended, in words. */
function how(status: Deno.CommandStatus): string {
  return status.signal !== null ? `was killed by ${status.signal}` : `exited with code ${status.code}`;
}

/** Supervises one worker process at a time; see the module's doc. */
export class Nanny {
  #options: NannyOptions;
  #log: Logger;
  #child: Deno.ChildProcess | null = null;
  #stopping = false;
  #wake: (() => void) | null = null;

  constructor(options: NannyOptions) {
    this.#options = options;
    this.#log = options.log;
  }

  /**
   * Runs workers until one stops on purpose or `stop()` is called; resolves the exit code
   * to leave with (the worker's, when it stopped for a reason a new one would share).
   */
  async run(): Promise<number> {
    let backoff = 0;
    let everListened = false;
    for (;;) {
      const started = performance.now();
      const child = this.#spawn();
      this.#child = child;
      const address = await this.#listening(child);
      if (address !== null) {
        if (!everListened) this.#options.onListening?.(address);
        else this.#log.info(`Worker process ${child.pid} started again, listening at ${address}`);
        everListened = true;
      }
      const status = await child.status;
      this.#child = null;
      if (this.#stopping) return status.code === EXIT_USAGE ? EXIT_USAGE : 0;
      const memory = status.signal === null && status.code === EXIT_MEMORY;
      if (!memory && status.signal === null) {
        if (status.code === 0) return 0; // closed on purpose: told to by the scheduler
        if (status.code === EXIT_USAGE || status.code === EXIT_SCHEDULER_LOST) return status.code;
        // Never came up at all: a new one would fail the same way.
        if (!everListened) return status.code;
      }
      const lived = performance.now() - started;
      backoff = lived >= HEALTHY_LIFETIME_MS
        ? 0
        : Math.min(BACKOFF_MAX_MS, Math.max(BACKOFF_MIN_MS, backoff * 2));
      this.#log.warn(
        `Worker process ${child.pid} ${
          memory ? "closed past its memory's terminate share" : how(status)
        } after ${(lived / 1000).toFixed(1)} s; starting a new one` +
          (backoff > 0 ? ` in ${(backoff / 1000).toFixed(1)} s` : ""),
      );
      if (backoff > 0) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, backoff);
          this.#wake = () => (clearTimeout(timer), resolve());
        });
        this.#wake = null;
        if (this.#stopping) return 0;
      }
    }
  }

  /**
   * Stops: the worker is sent SIGTERM (it hands over its data, then exits) and no new one
   * starts. Called again, or after the stop timeout, the worker is killed.
   */
  stop(): void {
    const child = this.#child;
    if (this.#stopping) {
      if (child) this.#kill(child);
      return;
    }
    this.#stopping = true;
    this.#wake?.();
    if (child === null) return;
    try {
      child.kill("SIGTERM");
    } catch { /* exited already */ }
    const timer = setTimeout(() => {
      this.#log.warn(
        `Worker process ${child.pid} did not stop within ${STOP_TIMEOUT_MS / 1000} s; killing it`,
      );
      this.#kill(child);
    }, STOP_TIMEOUT_MS);
    child.status.finally(() => clearTimeout(timer));
  }

  #spawn(): Deno.ChildProcess {
    return new Deno.Command(Deno.execPath(), {
      args: [
        ...distArgs(["--unstable-worker-options", ...permissionFlags()]),
        ...this.#options.args,
        "--no-nanny",
        "--supervised",
        "--nannied",
      ],
      env: nodeEnvironment(),
      // A pipe never written: when this process ends, the worker reads its end and stops.
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
  }

  /** The address the worker prints first; null if it exits before. Later output (tasks' console.log) is passed on. */
  async #listening(child: Deno.ChildProcess): Promise<string | null> {
    const stdout = lines(child.stdout);
    const first = await stdout.next();
    (async () => {
      const encoder = new TextEncoder();
      for await (const line of stdout) {
        try {
          await Deno.stdout.write(encoder.encode(line + "\n"));
        } catch { /* our stdout is gone: keep draining */ }
      }
    })();
    if (first.done) return null;
    const m = /^listening at (\S+)$/.exec(first.value);
    return m ? m[1] : null;
  }

  /** SIGKILL to the worker (its executor processes end when their stdin closes). */
  #kill(child: Deno.ChildProcess): void {
    try {
      child.kill("SIGKILL");
    } catch { /* gone already */ }
  }
}
