/**
 * The `dist` program: `dist scheduler` and `dist worker SCHEDULER` start a node. The
 * only file that prints usage or calls Deno.exit.
 *
 * @module
 */

import config from "./deno.json" with { type: "json" };
import { createLogger, LOG_LEVELS, type LogFormat, type LogLevel } from "./util/log.ts";
import { parseAddress, parsePort } from "./protocol/address.ts";
import {
  ALLOWED_FAILURES,
  CONNECTIONS_MAX,
  DASHBOARD_PORT,
  DEATH_TIMEOUT_MS,
  EXIT_MEMORY,
  EXIT_SCHEDULER_LOST,
  EXIT_USAGE,
  FRAME_BYTES_MAX,
  HANDSHAKE_TIMEOUT_MS,
  MEMORY_PAUSE_FRACTION,
  MEMORY_SPILL_FRACTION,
  MEMORY_TARGET_FRACTION,
  MEMORY_TERMINATE_FRACTION,
  NO_WORKERS_TIMEOUT_MS,
  SCHEDULER_PORT,
  tokenFromEnv,
  TRANSFERS_OUT_MAX,
  UNCLAIMED_GRACE_MS,
  WORKER_TTL_MS,
} from "./util/defaults.ts";
import type { SecurityOptions } from "./protocol/handshake.ts";
import { memoryLimit } from "./util/memory.ts";

const PERMISSION_NAMES = ["env", "ffi", "import", "net", "read", "run", "sys", "write"] as const;

/** Reads --task-permissions: "none", "inherit", or "name[=a;b],...". */
function taskPermissions(text: string): Deno.PermissionOptions {
  if (text === "none" || text === "inherit") return text;
  const out: Record<string, boolean | string[]> = Object.fromEntries(PERMISSION_NAMES.map((n) => [n, false]));
  for (const part of text.split(",")) {
    const [name, list] = part.split("=", 2);
    if (!(PERMISSION_NAMES as readonly string[]).includes(name)) {
      throw new UsageError(
        `Invalid --task-permissions ${JSON.stringify(text)}: unknown permission ${JSON.stringify(name)} ` +
          `(known: ${PERMISSION_NAMES.join(", ")})`,
      );
    }
    out[name] = list === undefined ? true : list.split(";").filter((x) => x !== "");
  }
  return out as Deno.PermissionOptionsObject;
}

/** Reads --isolation. */
function isolation(text: string): "thread" | "process" {
  if (text !== "thread" && text !== "process") {
    throw new UsageError(`Invalid --isolation ${JSON.stringify(text)}: expected thread or process`);
  }
  return text;
}

/** Reads --task-heap-mib, which only a process executor can honour. */
function taskHeapMib(text: string | undefined, isolation: string): number | undefined {
  if (text === undefined) return undefined;
  if (isolation !== "process") {
    throw new UsageError(
      "--task-heap-mib needs --isolation process: a thread executor shares its worker's heap",
    );
  }
  const mib = Number(text);
  if (!/^\d+$/.test(text) || mib < 16) {
    throw new UsageError(
      `Invalid --task-heap-mib ${JSON.stringify(text)}: expected a whole number of MiB, 16 or more`,
    );
  }
  return mib;
}

/** The shared secret (flag, file, or environment) and TLS files, read now. */
async function security(flags: Record<string, string | undefined>): Promise<SecurityOptions> {
  let authToken = flags["auth-token"];
  if (authToken === undefined && flags["auth-token-file"] !== undefined) {
    try {
      authToken = (await Deno.readTextFile(flags["auth-token-file"])).trim();
    } catch (error) {
      throw new UsageError(
        `Cannot read --auth-token-file ${flags["auth-token-file"]}: ${(error as Error).message}`,
      );
    }
  }
  authToken ??= tokenFromEnv();
  if (authToken !== undefined && authToken.length < 16) {
    throw new UsageError(
      "The auth token is too short: use at least 16 characters (e.g. openssl rand -hex 32)",
    );
  }
  const read = async (flag: string) => {
    const path = flags[flag];
    if (path === undefined) return undefined;
    try {
      return await Deno.readTextFile(path);
    } catch (error) {
      throw new UsageError(`Cannot read --${flag} ${path}: ${(error as Error).message}`);
    }
  };
  const [cert, key, ca] = [await read("tls-cert"), await read("tls-key"), await read("tls-ca")];
  if ((cert === undefined) !== (key === undefined)) {
    throw new UsageError("--tls-cert and --tls-key go together");
  }
  const out: SecurityOptions = { authToken };
  if (cert || ca) out.tls = { cert, key, ca };
  if (flags["handshake-timeout"] !== undefined) {
    out.handshakeTimeoutMs = positiveNumber("handshake-timeout", flags["handshake-timeout"], false) * 1000;
  }
  return out;
}

/** A flag: its parseArgs type, default, and help text. */
interface Flag {
  type: "string" | "boolean";
  default?: string;
  help: string;
  value?: string;
  /** Not shown by --help: set by dist itself on the processes it starts. */
  hidden?: boolean;
}

const common: Record<string, Flag> = {
  "log-level": { type: "string", default: "info", value: "LEVEL", help: `one of ${LOG_LEVELS.join(", ")}` },
  "log-format": {
    type: "string",
    default: "text",
    value: "FORMAT",
    help: "text, or json (one object a line)",
  },
  help: { type: "boolean", help: "show this help" },
};

const dashboardFlags: Record<string, Flag> = {
  "dashboard-port": {
    type: "string",
    default: String(DASHBOARD_PORT),
    value: "PORT",
    help: "the dashboard, /metrics and /health over HTTP (0: any port)",
  },
  "no-dashboard": { type: "boolean", help: "serve no dashboard" },
};

const auth: Record<string, Flag> = {
  "auth-token": {
    type: "string",
    value: "TOKEN",
    help:
      "shared secret every connection must prove it knows (prefer DIST_AUTH_TOKEN or a file: argv is visible)",
  },
  "auth-token-file": { type: "string", value: "PATH", help: "read the shared secret from this file" },
};

const tls: Record<string, Flag> = {
  "tls-cert": { type: "string", value: "PATH", help: "this node's certificate (PEM): listen on tls://" },
  "tls-key": { type: "string", value: "PATH", help: "the key of --tls-cert (PEM)" },
  "tls-ca": {
    type: "string",
    value: "PATH",
    help: "CA (PEM) that signs every node's and client's certificate: mutual TLS",
  },
};

const limits: Record<string, Flag> = {
  "frame-bytes-max": {
    type: "string",
    default: String(FRAME_BYTES_MAX),
    value: "BYTES",
    help: "largest message accepted",
  },
  "connections-max": {
    type: "string",
    default: String(CONNECTIONS_MAX),
    value: "N",
    help: "most open connections",
  },
  "handshake-timeout": {
    type: "string",
    default: String(HANDSHAKE_TIMEOUT_MS / 1000),
    value: "SECONDS",
    help: "time a new connection has to prove itself",
  },
};

const commands: Record<string, { usage: string; summary: string; flags: Record<string, Flag> }> = {
  scheduler: {
    usage: "dist scheduler [flags]",
    summary: "Start a scheduler: it keeps which worker holds which key.",
    flags: {
      host: { type: "string", default: "127.0.0.1", value: "HOST", help: "interface to listen on" },
      port: {
        type: "string",
        default: String(SCHEDULER_PORT),
        value: "PORT",
        help: "port to listen on (0: any)",
      },
      "worker-ttl": {
        type: "string",
        default: String(WORKER_TTL_MS / 1000),
        value: "SECONDS",
        help: "remove a worker not heard from for this long (a hung process, a cut network)",
      },
      "allowed-failures": {
        type: "string",
        default: String(ALLOWED_FAILURES),
        value: "N",
        help: "workers a task may kill (by dying while running it) before it fails with KilledWorker",
      },
      "no-workers-timeout": {
        type: "string",
        default: String(NO_WORKERS_TIMEOUT_MS / 1000),
        value: "SECONDS",
        help:
          "fail tasks that have had no worker to run them (none connected, or none allowed) for this long",
      },
      "scheduler-file": {
        type: "string",
        value: "PATH",
        help:
          "write where it listens to this file (JSON), for workers and clients given the same (HPC batch jobs)",
      },
      supervised: {
        type: "boolean",
        hidden: true,
        help: "stop when stdin closes (set by the process that started this one: dist ssh)",
      },
      "unclaimed-grace": {
        type: "string",
        default: String(UNCLAIMED_GRACE_MS / 1000),
        value: "SECONDS",
        help:
          "keep keys that workers bring back (after a restart) this long for a client to claim, then free them",
      },
      ...dashboardFlags,
      ...auth,
      ...tls,
      ...limits,
      ...common,
    },
  },
  worker: {
    usage: "dist worker SCHEDULER_ADDRESS [flags]",
    summary:
      "Start a worker that registers with the scheduler at SCHEDULER_ADDRESS (host:port, tcp://host:port or tls://host:port).",
    flags: {
      host: { type: "string", default: "127.0.0.1", value: "HOST", help: "interface to listen on" },
      port: { type: "string", default: "0", value: "PORT", help: "port to listen on (0: any)" },
      name: { type: "string", value: "NAME", help: "name in logs and listings (default: its address)" },
      nthreads: {
        type: "string",
        default: String(navigator.hardwareConcurrency),
        value: "N",
        help: "tasks run at once; the default is this machine's cores",
      },
      "death-timeout": {
        type: "string",
        default: String(DEATH_TIMEOUT_MS / 1000),
        value: "SECONDS",
        help: "give up reaching the scheduler after this long",
      },
      "scheduler-file": {
        type: "string",
        value: "PATH",
        help: "read the scheduler's address from this file (written by dist scheduler --scheduler-file), " +
          "waiting up to --death-timeout for it, instead of SCHEDULER_ADDRESS",
      },
      "task-permissions": {
        type: "string",
        default: "none",
        value: "LIST",
        help: 'what tasks may touch: "none", "inherit", or e.g. "read=/data;/tmp,net=example.com,env"',
      },
      isolation: {
        type: "string",
        default: "thread",
        value: "KIND",
        help: "where tasks run: thread (in this process, no copies) or process (one that a task " +
          "exhausting memory or crashing takes down instead of the worker)",
      },
      "task-heap-mib": {
        type: "string",
        value: "MIB",
        help: "with --isolation process: each executor's JS heap limit; a task past it fails as KilledWorker",
      },
      "http-port": {
        type: "string",
        value: "PORT",
        help: "serve /metrics and /health over HTTP on this port (0: any)",
      },
      "transfers-out-max": {
        type: "string",
        default: String(TRANSFERS_OUT_MAX),
        value: "N",
        help: "large values (1 MiB or more) sent to peers and clients at once; more wait (busy, retried)",
      },
      "memory-limit": {
        type: "string",
        default: "auto",
        value: "BYTES",
        help: "memory this worker may use, e.g. 4GiB or 512MiB; auto: this machine's (or container's) " +
          "memory times nthreads / cores; 0: no limit",
      },
      "memory-target": {
        type: "string",
        default: String(MEMORY_TARGET_FRACTION),
        value: "FRACTION",
        help:
          "share of --memory-limit that values held may take before the least recently used spill to disk",
      },
      "memory-spill": {
        type: "string",
        default: String(MEMORY_SPILL_FRACTION),
        value: "FRACTION",
        help:
          "share of --memory-limit the process may take before values spill to bring it down to --memory-target",
      },
      "memory-pause": {
        type: "string",
        default: String(MEMORY_PAUSE_FRACTION),
        value: "FRACTION",
        help: "share of --memory-limit past which the worker starts no task and no fetch until back under",
      },
      "memory-terminate": {
        type: "string",
        default: String(MEMORY_TERMINATE_FRACTION),
        value: "FRACTION",
        help:
          "share of --memory-limit past which the worker stops its largest executor process, or, with none " +
          "and under a nanny, closes at once for the nanny to start a new one",
      },
      "local-directory": {
        type: "string",
        value: "DIR",
        help: "where the worker's spill folder is made (removed when it exits); default the temp folder",
      },
      "no-nanny": {
        type: "boolean",
        help: "run the worker alone, without the small process that restarts it when it dies " +
          "or passes --memory-terminate",
      },
      supervised: {
        type: "boolean",
        hidden: true,
        help: "stop when stdin closes (set by the process that started this one)",
      },
      nannied: {
        type: "boolean",
        hidden: true,
        help: "a nanny started this worker and starts a new one when it exits (set by the nanny)",
      },
      ...auth,
      ...tls,
      ...limits,
      ...common,
    },
  },
};

commands.local = {
  usage: "dist local [flags]",
  summary: "Start a scheduler here and worker processes on this machine; print the scheduler's address.",
  flags: {
    workers: {
      type: "string",
      default: String(navigator.hardwareConcurrency),
      value: "N",
      help: "worker processes",
    },
    nthreads: { type: "string", default: "1", value: "N", help: "threads (executors) per worker" },
    host: { type: "string", default: "127.0.0.1", value: "HOST", help: "interface every node listens on" },
    "memory-limit": {
      type: "string",
      default: "auto",
      value: "BYTES",
      help:
        "each worker's memory limit, e.g. 4GiB; auto: this machine's memory divided among the workers; 0: none",
    },
    port: {
      type: "string",
      default: String(SCHEDULER_PORT),
      value: "PORT",
      help: "the scheduler's port (0: any)",
    },
    "task-permissions": commands.worker.flags["task-permissions"],
    "no-nanny": { type: "boolean", help: "run each worker alone, without a nanny (see dist worker --help)" },
    ...dashboardFlags,
    ...auth,
    ...common,
  },
};

commands.ssh = {
  usage: "dist ssh HOST [HOST...] [flags]",
  summary: "Start a scheduler on the first host and workers on the others (or on the first, if it is " +
    "alone) through the system's ssh; print the scheduler's address, stream every node's output here, " +
    "and stop them all on Ctrl-C. The token (DIST_AUTH_TOKEN or --auth-token-file) goes to each node " +
    "on its standard input, never on a command line.",
  flags: {
    "hosts-file": { type: "string", value: "PATH", help: "more hosts, one per line (# starts a comment)" },
    port: { type: "string", default: String(SCHEDULER_PORT), value: "PORT", help: "the scheduler's port" },
    "workers-per-host": {
      type: "string",
      default: "1",
      value: "N",
      help: "worker processes on each worker host",
    },
    nthreads: { type: "string", value: "N", help: "each worker's threads (default: its host's cores)" },
    "memory-limit": { type: "string", value: "BYTES", help: "each worker's memory limit (default: auto)" },
    "remote-dist": {
      type: "string",
      default: "dist",
      value: "COMMAND",
      help: "how to run dist on the hosts (a command line, e.g. ~/.deno/bin/dist)",
    },
    "ssh-options": {
      type: "string",
      value: "OPTIONS",
      help: 'options for ssh, e.g. "-i ~/.ssh/cluster -p 2222"',
    },
    "auth-token-file": auth["auth-token-file"],
    ...common,
  },
};

commands.info = {
  usage: "dist info ADDRESS [flags]",
  summary: "Show a cluster (ADDRESS a scheduler): its workers, the keys they hold, and its tasks by state; " +
    "or, with --story, why a key is where it is on a scheduler or a worker.",
  flags: {
    json: { type: "boolean", help: "print JSON instead of tables" },
    story: {
      type: "string",
      value: "KEY",
      help: "the key's state on that node and its recent moves (ADDRESS a scheduler or a worker)",
    },
    ...auth,
    help: { type: "boolean", help: "show this help" },
  },
};

const mainHelp = `dist ${config.version}: a distributed computing runtime for TypeScript on Deno

Usage:
  dist scheduler [flags]                   start a scheduler
  dist worker SCHEDULER_ADDRESS [flags]    start a worker
  dist local [flags]                       start a scheduler and worker processes on this machine
  dist ssh HOST [HOST...] [flags]          start a scheduler and workers on other machines over ssh
  dist info SCHEDULER_ADDRESS [--json]     show a cluster's workers, keys and tasks
  dist info ADDRESS --story KEY            why a key is where it is on a scheduler or worker
  dist COMMAND --help                      flags of a command
  dist --version                           print the version
`;

function helpOf(name: string): string {
  const command = commands[name];
  const rows = Object.entries(command.flags).filter(([, f]) => !f.hidden).map(([flag, f]) => {
    const left = `  --${flag}${f.value ? ` ${f.value}` : ""}`;
    return `${left.padEnd(30)}${f.help}${f.default !== undefined ? ` (default: ${f.default})` : ""}`;
  });
  return `${command.summary}\n\nUsage:\n  ${command.usage}\n\nFlags:\n${rows.join("\n")}\n`;
}

/** A usage error: printed as one line, exit code 2. */
class UsageError extends Error {}

/**
 * Reads `argv` against the command's flags: `--flag value`, `--flag=value`, booleans
 * bare, positionals anywhere, `--` ends the flags. (Our own, not node:util's parseArgs:
 * any node: import starts Deno's Node layer, several MiB in every worker process.)
 */
function parse(name: string, argv: string[]) {
  const flags = commands[name].flags;
  const values: Record<string, string | boolean | undefined> = {};
  for (const [flag, f] of Object.entries(flags)) values[flag] = f.default;
  const positionals: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--") {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (!arg.startsWith("-") || arg === "-") {
      positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf("=");
    const flag = arg.startsWith("--") ? arg.slice(2, eq < 0 ? undefined : eq) : "";
    const f = Object.hasOwn(flags, flag) ? flags[flag] : undefined;
    if (f === undefined) {
      throw new UsageError(`unknown flag ${eq < 0 ? arg : arg.slice(0, eq)} (see dist ${name} --help)`);
    }
    if (f.type === "boolean") {
      if (eq >= 0) throw new UsageError(`flag --${flag} takes no value`);
      values[flag] = true;
    } else if (eq >= 0) {
      values[flag] = arg.slice(eq + 1);
    } else if (i + 1 >= argv.length) {
      throw new UsageError(`flag --${flag} needs a value`);
    } else {
      const value = argv[++i];
      if (value.startsWith("-") && value !== "-") {
        throw new UsageError(
          `flag --${flag} got ${
            JSON.stringify(value)
          }, which looks like a flag; write --${flag}=${value} if you mean it`,
        );
      }
      values[flag] = value;
    }
  }
  return { values, positionals };
}

function logFormat(text: string): LogFormat {
  if (text !== "text" && text !== "json") {
    throw new UsageError(`Invalid --log-format ${JSON.stringify(text)}: expected text or json`);
  }
  return text;
}

/** `dist info`: the cluster as tables, or JSON. */
async function showInfo(positionals: string[], flags: Record<string, string>): Promise<number> {
  if (positionals.length !== 1) {
    throw new UsageError(
      positionals.length === 0
        ? "missing ADDRESS, e.g. dist info tcp://127.0.0.1:8786"
        : `unexpected argument ${JSON.stringify(positionals[1])}`,
    );
  }
  const address = checked(() => parseAddress(positionals[0]));
  const { authToken } = await security(flags);
  if (flags.story !== undefined) {
    if (flags.story === "") throw new UsageError("--story needs a key, e.g. --story inc-4f2a");
    const { keyStory, formatStory } = await import("./client/info.ts");
    const story = await keyStory(address, flags.story, { authToken });
    console.log(flags.json ? JSON.stringify(story, null, 2) : formatStory(story));
    return 0;
  }
  const { clusterInfo, formatInfo } = await import("./client/info.ts");
  const report = await clusterInfo(address, { authToken });
  console.log(flags.json ? JSON.stringify(report, null, 2) : formatInfo(report));
  return 0;
}

function logLevel(text: string): LogLevel {
  if (!(LOG_LEVELS as readonly string[]).includes(text)) {
    throw new UsageError(
      `Invalid --log-level ${JSON.stringify(text)}: expected one of ${LOG_LEVELS.join(", ")}`,
    );
  }
  return text as LogLevel;
}

function positiveNumber(flag: string, text: string, integer: boolean): number {
  const n = Number(text);
  if (text.trim() === "" || !Number.isFinite(n) || n <= 0 || (integer && !Number.isInteger(n))) {
    throw new UsageError(
      `Invalid --${flag} ${JSON.stringify(text)}: expected a ${integer ? "whole " : ""}number above 0`,
    );
  }
  return n;
}

function wholeNumber(flag: string, text: string): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n)) {
    throw new UsageError(`Invalid --${flag} ${JSON.stringify(text)}: expected a whole number from 0 up`);
  }
  return n;
}

function fraction(flag: string, text: string): number {
  const n = Number(text);
  if (text.trim() === "" || !(n > 0 && n <= 1)) {
    throw new UsageError(
      `Invalid --${flag} ${JSON.stringify(text)}: expected a share above 0, at most 1 (e.g. 0.6)`,
    );
  }
  return n;
}

function checked<T>(fn: () => T): T {
  try {
    return fn();
  } catch (error) {
    if (error instanceof TypeError || error instanceof RangeError) throw new UsageError(error.message);
    throw error;
  }
}

/**
 * Closes `node` on SIGINT or SIGTERM, then exits; with `supervised`, also when stdin
 * closes (the process that started this one ended).
 */
function exitOnSignal(node: { close(): Promise<void> }, supervised = false): void {
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await node.close();
    Deno.exit(0);
  };
  for (const signal of ["SIGINT", "SIGTERM"] as const) Deno.addSignalListener(signal, stop);
  if (supervised) untilStdinCloses().then(stop);
}

/** `dist ssh`: a cluster on other machines until Ctrl-C. */
async function ssh(positionals: string[], flags: Record<string, string>): Promise<number> {
  const hosts = [...positionals];
  if (flags["hosts-file"] !== undefined) {
    let text: string;
    try {
      text = await Deno.readTextFile(flags["hosts-file"]);
    } catch (error) {
      throw new UsageError(`Cannot read --hosts-file ${flags["hosts-file"]}: ${(error as Error).message}`);
    }
    hosts.push(...text.split("\n").map((l) => l.replace(/#.*/, "").trim()).filter(Boolean));
  }
  if (hosts.length === 0) {
    throw new UsageError("missing HOST: dist ssh HOST [HOST...] (or --hosts-file PATH)");
  }
  const port = checked(() => parsePort(flags.port, "--port"));
  const perHost = positiveNumber("workers-per-host", flags["workers-per-host"], true);
  const logs = [
    `--log-level=${logLevel(flags["log-level"])}`,
    `--log-format=${logFormat(flags["log-format"])}`,
  ];
  const workerArgs = [
    ...(flags.nthreads !== undefined
      ? [`--nthreads=${positiveNumber("nthreads", flags.nthreads, true)}`]
      : []),
    ...(flags["memory-limit"] !== undefined ? [`--memory-limit=${flags["memory-limit"]}`] : []),
    ...logs,
  ];
  const { authToken } = await security(flags);
  const { SshCluster } = await import("./client/ssh.ts");
  const cluster = await SshCluster.start({
    hosts,
    port,
    workersPerHost: perHost,
    workerArgs,
    schedulerArgs: logs,
    remoteDist: flags["remote-dist"],
    sshOptions: flags["ssh-options"]?.split(/\s+/).filter(Boolean),
    authToken,
    onLine: (line) => console.error(line),
  });
  console.log(`listening at ${cluster.address}`);
  let signals = 0;
  await new Promise<void>((resolve) => {
    const stop = () => {
      // A second Ctrl-C does not wait for the nodes.
      if (++signals > 1) Deno.exit(130);
      cluster.close().then(resolve);
    };
    for (const signal of ["SIGINT", "SIGTERM"] as const) Deno.addSignalListener(signal, stop);
  });
  return 0;
}

/** Resolves when stdin reaches its end (or fails). */
async function untilStdinCloses(): Promise<void> {
  const buffer = new Uint8Array(256);
  try {
    while (await Deno.stdin.read(buffer) !== null) { /* nothing is ever written */ }
  } catch { /* closed */ }
}

/** Not a user's command: the process a worker started with --isolation process runs this. */
const EXECUTOR_COMMAND = "_executor";

async function executorHost(argv: string[]): Promise<number> {
  const at = argv.indexOf("--permissions");
  let permissions: Deno.PermissionOptions;
  try {
    permissions = JSON.parse(argv[at + 1]);
  } catch {
    throw new UsageError(`${EXECUTOR_COMMAND} is started by a worker (--isolation process), not by hand`);
  }
  const { runExecutorHost } = await import("./worker/executor_host.ts");
  return await runExecutorHost(permissions);
}

/**
 * Refuses to start a worker that could not keep its memory limit: `auto` with no way to
 * read the machine's memory (it would run with no limit, silently), or a limit with no
 * permission to write the spill folder (it would fail to spill when it matters).
 */
function needsForMemory(flag: string, limit: number, directory: string | undefined, spills = true): void {
  if (flag.trim().toLowerCase() === "auto" && limit === 0) {
    throw new UsageError(
      "--memory-limit auto cannot read this machine's memory: run with --allow-sys (the dist command has " +
        "it), or give --memory-limit BYTES (0 for none)",
    );
  }
  const write = directory === undefined
    ? { name: "write" as const }
    : { name: "write" as const, path: directory };
  if (spills && limit > 0 && Deno.permissions.querySync(write).state !== "granted") {
    throw new UsageError(
      `a worker with a memory limit spills values to disk and needs write access to ${
        directory ?? "the temp folder"
      } (--local-directory): run it with --allow-write (the dist command has it), or --memory-limit 0 to never spill`,
    );
  }
}

async function run(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined) {
    throw new UsageError("missing command: scheduler, worker, local, ssh or info (see dist --help)");
  }
  if (name === "--help" || name === "-h" || name === "help") {
    console.log(mainHelp);
    return 0;
  }
  if (name === "--version" || name === "-V") {
    console.log(`dist ${config.version}`);
    return 0;
  }
  if (name === EXECUTOR_COMMAND) return await executorHost(rest);
  if (!Object.hasOwn(commands, name)) {
    throw new UsageError(`unknown command ${JSON.stringify(name)} (see dist --help)`);
  }
  const { values, positionals } = parse(name, rest);
  if (values.help) {
    console.log(helpOf(name));
    return 0;
  }
  const flags = values as Record<string, string>;
  if (name === "info") return await showInfo(positionals, flags);
  const level = logLevel(flags["log-level"]);
  const format = logFormat(flags["log-format"]);
  const port = checked(() => parsePort(flags.port, "--port"));
  const dashboardPort = values["no-dashboard"] || flags["dashboard-port"] === undefined
    ? undefined
    : checked(() => parsePort(flags["dashboard-port"], "--dashboard-port"));

  if (name === "scheduler") {
    if (positionals.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[0])}`);
    const { startScheduler } = await import("./scheduler/scheduler.ts");
    const node = await startScheduler({
      host: flags.host,
      port,
      ...await security(flags),
      frameBytesMax: positiveNumber("frame-bytes-max", flags["frame-bytes-max"], true),
      connectionsMax: positiveNumber("connections-max", flags["connections-max"], true),
      workerTtlMs: positiveNumber("worker-ttl", flags["worker-ttl"], false) * 1000,
      allowedFailures: wholeNumber("allowed-failures", flags["allowed-failures"]),
      noWorkersTimeoutMs: positiveNumber("no-workers-timeout", flags["no-workers-timeout"], false) * 1000,
      unclaimedGraceMs: positiveNumber("unclaimed-grace", flags["unclaimed-grace"], false) * 1000,
      dashboardPort,
      log: createLogger("scheduler", level, format),
    });
    exitOnSignal(node, values.supervised === true);
    if (flags["scheduler-file"] !== undefined) {
      const { writeSchedulerFile } = await import("./util/scheduler_file.ts");
      await writeSchedulerFile(flags["scheduler-file"], {
        address: node.address,
        dashboard: node.dashboard,
        id: node.id,
        started: Date.now(),
      });
    }
    console.log(`listening at ${node.address}`);
    await node.closed;
    return 0;
  }

  if (name === "ssh") return await ssh(positionals, flags);

  if (name === "local") {
    if (positionals.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[0])}`);
    const workers = positiveNumber("workers", flags.workers, true);
    const threads = positiveNumber("nthreads", flags.nthreads, true);
    const { authToken } = await security(flags);
    const localMemory = checked(() => memoryLimit(flags["memory-limit"], 1 / workers));
    // Its workers are processes of their own, with write access: only `auto` needs this one.
    needsForMemory(flags["memory-limit"], localMemory, undefined, false);
    const { LocalCluster } = await import("./client/local.ts");
    const cluster = await LocalCluster.start({
      workers,
      threads,
      memoryLimit: localMemory,
      host: flags.host,
      port,
      logLevel: level,
      logFormat: format,
      authToken,
      dashboardPort: dashboardPort ?? null,
      nanny: !values["no-nanny"],
      taskPermissions: taskPermissions(flags["task-permissions"]),
      keepsAlive: true,
    });
    exitOnSignal(cluster);
    console.log(`listening at ${cluster.address}`);
    await new Promise(() => {}); // until a signal
  }

  const schedulerFile = flags["scheduler-file"];
  const expected = schedulerFile === undefined ? 1 : 0;
  if (positionals.length !== expected) {
    throw new UsageError(
      positionals.length === 0
        ? "missing SCHEDULER_ADDRESS, e.g. dist worker tcp://127.0.0.1:8786 (or --scheduler-file PATH)"
        : schedulerFile !== undefined
        ? `unexpected argument ${
          JSON.stringify(positionals[0])
        }: give SCHEDULER_ADDRESS or --scheduler-file, not both`
        : `unexpected argument ${JSON.stringify(positionals[1])}`,
    );
  }
  const nthreads = positiveNumber("nthreads", flags.nthreads, true);
  const deathTimeoutMs = positiveNumber("death-timeout", flags["death-timeout"], false) * 1000;
  let schedulerText = positionals[0];
  if (schedulerFile !== undefined) {
    // The nanny reads it (to fail early), and so does each worker it starts: a scheduler
    // started again may have written a new address.
    const { readSchedulerFile } = await import("./util/scheduler_file.ts");
    try {
      schedulerText = await readSchedulerFile(schedulerFile, deathTimeoutMs);
    } catch (error) {
      console.error(`dist: error: ${(error as Error).message}`);
      return EXIT_SCHEDULER_LOST;
    }
  }
  const scheduler = checked(() => parseAddress(schedulerText));
  const secure = await security(flags);
  const memory = checked(() =>
    memoryLimit(flags["memory-limit"], nthreads / Math.max(1, navigator.hardwareConcurrency))
  );
  needsForMemory(flags["memory-limit"], memory, flags["local-directory"]);
  const terminateFraction = fraction("memory-terminate", flags["memory-terminate"]);
  const workerOptions = {
    scheduler,
    host: flags.host,
    port,
    name: flags.name,
    nthreads,
    deathTimeoutMs,
    taskPermissions: taskPermissions(flags["task-permissions"]),
    isolation: isolation(flags.isolation),
    taskHeapMib: taskHeapMib(flags["task-heap-mib"], flags.isolation),
    ...secure,
    frameBytesMax: positiveNumber("frame-bytes-max", flags["frame-bytes-max"], true),
    connectionsMax: positiveNumber("connections-max", flags["connections-max"], true),
    transfersOutMax: positiveNumber("transfers-out-max", flags["transfers-out-max"], true),
    httpPort: flags["http-port"] === undefined
      ? undefined
      : checked(() => parsePort(flags["http-port"], "--http-port")),
    memoryLimit: memory,
    memoryTargetFraction: fraction("memory-target", flags["memory-target"]),
    memorySpillFraction: fraction("memory-spill", flags["memory-spill"]),
    memoryPauseFraction: fraction("memory-pause", flags["memory-pause"]),
    localDirectory: flags["local-directory"],
    memoryTerminateFraction: terminateFraction,
    // Under a nanny, which starts a new worker when this one closes past the terminate share.
    nanny: values.nannied === true,
  };
  const logName = flags.name ? `worker ${flags.name}` : "worker";
  if (!values["no-nanny"]) {
    const { Nanny, canSupervise } = await import("./worker/nanny.ts");
    const log = createLogger(flags.name ? `nanny ${flags.name}` : "nanny", level, format);
    if (canSupervise()) {
      const nanny = new Nanny({
        args: argv,
        log,
        onListening: (address) => console.log(`listening at ${address}`),
      });
      for (const signal of ["SIGINT", "SIGTERM"] as const) Deno.addSignalListener(signal, () => nanny.stop());
      if (values.supervised) untilStdinCloses().then(() => nanny.stop());
      return await nanny.run();
    }
    log.warn(
      "Running the worker without a nanny (nothing restarts it if it dies): this process may not start " +
        "processes. Give it --allow-run (the dist binary has it), or pass --no-nanny to say so.",
    );
  }
  // Read once: tasks granted `env` (or `inherit`) must not find the cluster's secret there.
  if (Deno.permissions.querySync({ name: "env", variable: "DIST_AUTH_TOKEN" }).state === "granted") {
    Deno.env.delete("DIST_AUTH_TOKEN");
  }
  const { startWorker } = await import("./worker/worker.ts");
  let node;
  try {
    node = await startWorker({ ...workerOptions, log: createLogger(logName, level, format) });
  } catch (error) {
    // It lacks a permission it needs (exit as for bad flags), or could not reach its
    // scheduler in time, or was refused: either way a nanny does not start it again.
    console.error(`dist: error: ${(error as Error).message}`);
    return error instanceof Deno.errors.NotCapable ? EXIT_USAGE : EXIT_SCHEDULER_LOST;
  }
  exitOnSignal(node, values.supervised === true);
  console.log(`listening at ${node.address}`);
  await node.closed;
  if (node.error?.name === "MemoryLimitError") return EXIT_MEMORY; // logged already
  if (node.error) {
    console.error(`dist: error: ${node.error.message}`);
    return EXIT_SCHEDULER_LOST;
  }
  return 0;
}

if (import.meta.main) {
  try {
    Deno.exit(await run(Deno.args));
  } catch (error) {
    const usage = error instanceof UsageError;
    console.error(`dist: ${usage ? "" : "error: "}${(error as Error).message}`);
    Deno.exit(usage ? EXIT_USAGE : 1);
  }
}
