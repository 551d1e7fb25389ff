/**
 * Runs `dist` nodes as real processes (`deno run main.ts ...`, what the compiled binary
 * runs), for the demo, the CLI tests and the benchmarks.
 *
 * @module
 */

const MAIN = new URL("../main.ts", import.meta.url);
/** The permissions a node process runs with. */
export const NODE_PERMISSIONS = [
  "--allow-net",
  "--allow-read",
  "--allow-write",
  "--allow-env",
  "--allow-sys",
  "--unstable-worker-options",
];
/**
 * V8's setting for a node process: its heap grows by 30% past what the last full
 * collection kept, where V8 alone lets it grow up to 4x while a program allocates fast. A
 * scheduler taking a 300k-task graph peaked at 752 MB of RSS with V8's choice and at 470 MB
 * with this one, for the same CPU time (DEVELOPERS.md). Every way dist starts a node passes
 * it: `distArgs`, `deno task install`, the image's entrypoint, `deno task compile`.
 */
export const NODE_V8_FLAGS = "--v8-flags=--heap-growing-percent=30";
/** How long a node may take to print its `listening at` line. */
const START_TIMEOUT_MS = 30_000;

/** A node running as a child process. */
export interface NodeProcess {
  /** The address it printed in `listening at ADDRESS`. */
  readonly address: string;
  /** The process. */
  readonly child: Deno.ChildProcess;
  /** Every stderr line so far. */
  readonly log: string[];
  /** Resolves with the exit status. */
  readonly status: Promise<Deno.CommandStatus>;
  /** Sends SIGTERM (if still running) and waits for the exit. */
  stop(): Promise<Deno.CommandStatus>;
  /** Resolves when a stderr line matches `pattern`; rejects after `timeoutMs`. */
  waitForLog(pattern: RegExp, timeoutMs?: number): Promise<string>;
}

/** Options of `spawnNode`. */
export interface SpawnOptions {
  /** Called with each stderr line as it arrives. */
  onLog?: (line: string) => void;
  /** Extra environment variables (secrets go here, never in argv). */
  env?: Record<string, string>;
  /**
   * A worker that stops when this process ends, however it ends (even by SIGKILL): it
   * gets `--supervised` and a stdin pipe that only this process holds.
   */
  supervised?: boolean;
  /**
   * The program that is `dist` (an installed command, say): run with ARGS as they are,
   * instead of this Deno running main.ts with a node's permissions.
   */
  command?: string;
}

/** The lines of a byte stream, as they arrive. */
export async function* lines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let rest = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    rest += chunk;
    let nl: number;
    while ((nl = rest.indexOf("\n")) >= 0) {
      yield rest.slice(0, nl);
      rest = rest.slice(nl + 1);
    }
  }
  if (rest) yield rest;
}

/**
 * The arguments before a subcommand that run dist with `flags` (`--allow-*` and the
 * like): `deno run ... main.ts`, or none from a compiled `dist` binary, which is its own
 * main.ts and has its permissions built in.
 */
export function distArgs(flags: readonly string[]): string[] {
  // --no-config: a node runs with dist's settings, not with whatever deno.json, import map
  // or lockfile the caller's directory has (and skips reading them: ~2 MiB per process).
  // --no-code-cache: V8's code cache is a file Deno maps into every process; a node compiles
  // its little code at start instead (~1.2 MiB less idle RSS, ~30 ms more to register).
  return Deno.build.standalone
    ? []
    : ["run", "--no-config", "--no-code-cache", NODE_V8_FLAGS, ...flags, MAIN.href];
}

/**
 * What a node process's environment gets besides its parent's: glibc's tunable that puts
 * large buffers on transparent huge pages (on VMs where every 4 KiB page fault is slow,
 * receiving 256 MiB went 2-4x faster with it: bench:compare's diagnostics), unless the
 * parent's environment sets GLIBC_TUNABLES itself. Asks for no permission: a caller that
 * may not read its environment gets the default.
 */
export function nodeEnvironment(): Record<string, string> {
  let own: string | undefined;
  if (Deno.permissions.querySync({ name: "env", variable: "GLIBC_TUNABLES" }).state === "granted") {
    own = Deno.env.get("GLIBC_TUNABLES");
  }
  return { GLIBC_TUNABLES: own ?? "glibc.malloc.hugetlb=1" };
}

/**
 * Starts `dist ARGS...` and resolves once it prints `listening at ADDRESS`. Rejects
 * (after killing it) if it exits or stays silent first.
 */
export async function spawnNode(args: string[], options: SpawnOptions = {}): Promise<NodeProcess> {
  // `dist local` starts worker processes of its own, `dist ssh` ssh, `dist worker` its
  // worker under a nanny, and a worker with --isolation process executor processes.
  const spawns = args[0] === "local" || args[0] === "ssh" ||
    (args[0] === "worker" && !args.includes("--no-nanny")) ||
    args.some((a, i) => a === "--isolation=process" || (a === "--isolation" && args[i + 1] === "process"));
  const permissions = spawns ? [...NODE_PERMISSIONS, "--allow-run"] : NODE_PERMISSIONS;
  const all = [...args, ...(options.supervised ? ["--supervised"] : [])];
  const child = new Deno.Command(options.command ?? Deno.execPath(), {
    args: options.command ? all : [...distArgs(permissions), ...all],
    stdin: options.supervised ? "piped" : "null",
    env: { ...nodeEnvironment(), ...options.env },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const log: string[] = [];
  const waiters = new Set<{ pattern: RegExp; resolve: (line: string) => void }>();
  const stderrDone = (async () => {
    for await (const line of lines(child.stderr)) {
      log.push(line);
      options.onLog?.(line);
      for (const w of waiters) {
        if (w.pattern.test(line)) {
          waiters.delete(w);
          w.resolve(line);
        }
      }
    }
  })();
  const stdout = lines(child.stdout);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const first = await Promise.race([
    stdout.next(),
    new Promise<"timeout">((resolve) => timer = setTimeout(() => resolve("timeout"), START_TIMEOUT_MS)),
  ]);
  clearTimeout(timer);
  const drainStdout = (async () => {
    for await (const _ of stdout) { /* keep the pipe flowing */ }
  })();
  const status = Promise.all([child.status, stderrDone, drainStdout]).then(async ([s]) => {
    if (options.supervised) await child.stdin.close().catch(() => {});
    return s;
  });
  const match = first !== "timeout" && !first.done ? /^listening at (\S+)$/.exec(first.value) : null;
  if (!match) {
    try {
      child.kill("SIGKILL");
    } catch { /* exited already */ }
    await status;
    throw new Error(
      `dist ${args.join(" ")} did not start: ${
        first === "timeout" ? "no output in time" : "it printed no address"
      }\n` +
        log.join("\n"),
    );
  }
  return {
    address: match[1],
    child,
    log,
    status,
    async stop() {
      try {
        child.kill("SIGTERM");
      } catch { /* exited already */ }
      return await status;
    },
    waitForLog(pattern, timeoutMs = 10_000) {
      const seen = log.find((line) => pattern.test(line));
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const waiter = {
          pattern,
          resolve: (line: string) => {
            clearTimeout(t);
            resolve(line);
          },
        };
        const t = setTimeout(() => {
          waiters.delete(waiter);
          reject(new Error(`No log line matched ${pattern} within ${timeoutMs} ms`));
        }, timeoutMs);
        waiters.add(waiter);
      });
    },
  };
}
