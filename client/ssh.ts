/**
 * `dist ssh`: a scheduler and workers on other machines, started through the system's
 * `ssh` (its keys, agent and config), as Dask's SSHCluster does. The first host runs the
 * scheduler, every other host (or the first, when it is the only one) runs workers. The
 * token goes to each node on its standard input, never on a command line; the rest of
 * that input stays open, and a node stops when it closes (the nodes run `--supervised`),
 * so stopping here, or losing this machine, stops them all. Their output comes back here,
 * each line prefixed with its host and role.
 *
 * @module
 */

import { lines } from "./spawn.ts";
import { formatAddress } from "../protocol/address.ts";

/** What `startSsh` needs. */
export interface SshOptions {
  /** Hosts as ssh takes them (`host`, `user@host`); the first runs the scheduler. */
  hosts: string[];
  /** The scheduler's port (default 8786). */
  port?: number;
  /** Worker processes per worker host (default 1). */
  workersPerHost?: number;
  /** Flags every worker gets (`--nthreads 4`, `--memory-limit 8GiB`, ...). */
  workerArgs?: string[];
  /** Flags the scheduler gets. */
  schedulerArgs?: string[];
  /** How to run dist on the hosts: a command line (default `dist`). */
  remoteDist?: string;
  /** Options for ssh itself (`-i key`, `-o StrictHostKeyChecking=accept-new`, ...). */
  sshOptions?: string[];
  /** The cluster's token, sent on each node's standard input. */
  authToken?: string;
  /** Each line a node prints, with its host and role. */
  onLine?: (line: string) => void;
}

/** One node started over ssh. */
interface Remote {
  label: string;
  scheduler: boolean;
  child: Deno.ChildProcess;
  stdin: WritableStreamDefaultWriter<Uint8Array>;
  listening: Promise<string>;
}

/** How long a node may take to say where it listens. */
const START_TIMEOUT_MS = 60_000;
/** How long nodes get to stop after their input closed, before their ssh is killed. */
const STOP_TIMEOUT_MS = 30_000;

/** Quotes `s` for a POSIX shell. */
function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replaceAll("'", `'\\''`)}'`;
}

/** Starts `dist ARGS...` on `host` over ssh; its output goes to `options.onLine`, prefixed. */
function launch(options: SshOptions, host: string, role: string, args: string[]): Remote {
  const label = `${host} ${role}`;
  // The token is the first line of the node's input; the rest stays open until we close it.
  const command = "IFS= read -r DIST_AUTH_TOKEN; export DIST_AUTH_TOKEN; " +
    `[ -n "$DIST_AUTH_TOKEN" ] || unset DIST_AUTH_TOKEN; exec ${options.remoteDist ?? "dist"} ` +
    [...args, "--supervised"].map(shellQuote).join(" ");
  const child = new Deno.Command("ssh", {
    args: [...(options.sshOptions ?? []), "-T", "-o", "BatchMode=yes", host, command],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stdin = child.stdin.getWriter();
  stdin.write(new TextEncoder().encode(`${options.authToken ?? ""}\n`)).catch(() => {});
  const onLine = options.onLine ?? ((line: string) => console.error(line));
  const listening = new Promise<string>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`${label} did not start within ${START_TIMEOUT_MS / 1000} s`)),
      START_TIMEOUT_MS,
    );
    // Once it has resolved, a later exit rejects nothing.
    child.status.then((status) => {
      clearTimeout(timer);
      reject(new Error(`${label} exited (code ${status.code}) before it was listening; its output is above`));
    });
    (async () => {
      for await (const line of lines(child.stdout)) {
        const m = /^listening at (\S+)/.exec(line);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
        onLine(`[${label}] ${line}`);
      }
    })();
  });
  listening.catch(() => {});
  (async () => {
    for await (const line of lines(child.stderr)) onLine(`[${label}] ${line}`);
  })();
  return { label, scheduler: role === "scheduler", child, stdin, listening };
}

/**
 * Stops `remotes`: their input closes, so each stops as on SIGTERM (workers hand their
 * keys over first), workers before the scheduler; an ssh still running after
 * STOP_TIMEOUT_MS is killed.
 */
async function stopAll(remotes: readonly Remote[]): Promise<void> {
  for (const group of [remotes.filter((r) => !r.scheduler), remotes.filter((r) => r.scheduler)]) {
    await Promise.all(group.map(async (r) => {
      await r.stdin.close().catch(() => {});
      const timer = setTimeout(() => {
        try {
          r.child.kill("SIGKILL");
        } catch { /* gone */ }
      }, STOP_TIMEOUT_MS);
      await r.child.status;
      clearTimeout(timer);
    }));
  }
}

/** A running SSH cluster: its scheduler's address, and `close()`. */
export class SshCluster {
  /** Where clients connect: `tcp://SCHEDULER_HOST:PORT`. */
  readonly address: string;
  #remotes: Remote[];
  #closing: Promise<void> | null = null;

  private constructor(address: string, remotes: Remote[]) {
    this.address = address;
    this.#remotes = remotes;
  }

  /** Starts the scheduler, then the workers; resolves once every worker has registered. */
  static async start(options: SshOptions): Promise<SshCluster> {
    if (options.hosts.length === 0) throw new TypeError("dist ssh needs at least one host");
    const port = options.port ?? 8786;
    const perHost = options.workersPerHost ?? 1;
    const [first, ...rest] = options.hosts;
    const remotes: Remote[] = [];
    try {
      const scheduler = launch(options, first, "scheduler", [
        "scheduler",
        "--host=0.0.0.0",
        `--port=${port}`,
        ...(options.schedulerArgs ?? []),
      ]);
      remotes.push(scheduler);
      await scheduler.listening;
      // Workers reach the scheduler at the name ssh reached it by.
      const address = formatAddress({ host: first.replace(/^.*@/, ""), port });
      for (const host of rest.length > 0 ? rest : [first]) {
        for (let i = 0; i < perHost; i++) {
          remotes.push(launch(options, host, `worker-${i}`, [
            "worker",
            address,
            "--host=0.0.0.0",
            ...(options.workerArgs ?? []),
          ]));
        }
      }
      await Promise.all(remotes.map((r) => r.listening));
      return new SshCluster(address, remotes);
    } catch (error) {
      await stopAll(remotes);
      throw error;
    }
  }

  /** Stops every node (see `stopAll`). */
  close(): Promise<void> {
    this.#closing ??= stopAll(this.#remotes);
    return this.#closing;
  }
}
