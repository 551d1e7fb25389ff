/**
 * The worker's side of a process executor (`--isolation process`): a child process
 * (`dist _executor`, see executor_host.ts) spoken to in dist's frames over its stdin and
 * stdout. To the pool it looks like the Web Worker it replaces: `postMessage` jobs,
 * `onmessage` results, `terminate()`; and `onexit` when the process died by itself, with
 * the reason (out of memory, a signal, an exit code).
 *
 * @module
 */

import { Decoder, Encoder } from "../protocol/codec.ts";
import { type ByteReader, type ByteWriter, MessageReader, MessageWriter } from "../protocol/framing.ts";
import type { ExecutorMessage, Job } from "./executor.ts";
import { frames } from "./executor_host.ts";
import { distArgs } from "../client/spawn.ts";

const MAIN = new URL("../main.ts", import.meta.url);
/** The child is this worker's own executor: what it sends back, the worker keeps anyway. */
const IPC_FRAME_BYTES_MAX = Number.MAX_SAFE_INTEGER;
/** stderr lines kept to say why a process died. */
const STDERR_LINES_MAX = 20;
const PERMISSION_NAMES = ["read", "write", "net", "env", "run", "sys", "ffi", "import"] as const;

/** What a process executor is started with. */
export interface ProcessExecutorOptions {
  /** The tasks' permissions (the sandbox inside the process). */
  permissions: Deno.PermissionOptions;
  /** The executor's JS heap limit in MiB: a task past it ends the process, not the worker. */
  heapMib?: number;
}

/** The `--allow-*` flags the child needs: this process's own grants, at most, and what the tasks get. */
function permissionFlags(permissions: Deno.PermissionOptions): string[] {
  const flags: string[] = [];
  for (const name of PERMISSION_NAMES) {
    let state: Deno.PermissionState;
    try {
      state = Deno.permissions.querySync({ name } as Deno.PermissionDescriptor).state;
    } catch {
      continue; // a permission this Deno does not know
    }
    const asked = typeof permissions === "object"
      ? permissions[name as keyof Deno.PermissionOptionsObject]
      : undefined;
    if (state === "granted") flags.push(`--allow-${name}`);
    else if (Array.isArray(asked) && asked.length > 0) flags.push(`--allow-${name}=${asked.join(",")}`);
  }
  // The child loads dist's own modules.
  if (!flags.includes("--allow-read")) flags.push(`--allow-read=${new URL(".", MAIN).pathname}`);
  return flags;
}

/** Throws a clear error when this process may not start executor processes. */
export function checkCanSpawn(): void {
  if (Deno.permissions.querySync({ name: "run", command: Deno.execPath() }).state !== "granted") {
    throw new Error(
      "Process executors (isolation: process) start processes: run the worker with --allow-run " +
        "(the dist binary has it), or use isolation: thread",
    );
  }
}

/** Bytes from a stream, as framing reads them. */
function streamReader(stream: ReadableStream<Uint8Array>): ByteReader {
  const reader = stream.getReader();
  let rest: Uint8Array | null = null;
  return {
    async read(p: Uint8Array): Promise<number | null> {
      if (rest === null) {
        const { value, done } = await reader.read();
        if (done) return null;
        rest = value;
      }
      const n = Math.min(p.byteLength, rest.byteLength);
      p.set(rest.subarray(0, n));
      rest = n === rest.byteLength ? null : rest.subarray(n);
      return n;
    },
  };
}

/** Bytes into a stream, as framing writes them (each chunk written before the next). */
function streamWriter(stream: WritableStream<Uint8Array>): ByteWriter & { close(): Promise<void> } {
  const writer = stream.getWriter();
  return {
    async write(p: Uint8Array): Promise<number> {
      // Awaited whole: framing reuses `p`'s memory once this resolves.
      await writer.write(p);
      return p.byteLength;
    },
    close: () => writer.close().catch(() => {}),
  };
}

/** One executor in a child process. */
export class ProcessExecutor {
  /** Called with each message of the executor. */
  onmessage: ((event: { data: ExecutorMessage }) => void) | null = null;
  /** Called once if the process ended by itself (not by `terminate`), with why. */
  onexit: ((reason: string) => void) | null = null;
  /** Resolves when the process and its pipes are done. */
  readonly closed: Promise<void>;
  /** The process's resident memory in bytes, as it last said (0 until it does). */
  rss = 0;

  #child: Deno.ChildProcess;
  #encoder = new Encoder();
  #writer: MessageWriter;
  #stdin: ReturnType<typeof streamWriter>;
  #terminated = false;
  #stderr: string[] = [];

  /** Starts the process; it loads its executor while the first jobs are on their way. */
  constructor(options: ProcessExecutorOptions) {
    const hostArgs = ["_executor", "--permissions", JSON.stringify(options.permissions)];
    const prefix = distArgs(["--unstable-worker-options", ...permissionFlags(options.permissions)]);
    const env: Record<string, string> = {};
    if (options.heapMib !== undefined) {
      // DENO_V8_FLAGS reaches a compiled binary too, where --v8-flags cannot.
      env.DENO_V8_FLAGS = `--max-old-space-size=${options.heapMib}`;
    }
    this.#child = new Deno.Command(Deno.execPath(), {
      args: [...prefix, ...hostArgs],
      env,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#stdin = streamWriter(this.#child.stdin);
    this.#writer = new MessageWriter(this.#stdin);
    const reading = this.#read();
    const stderr = this.#readStderr();
    this.closed = Promise.all([this.#child.status, reading, stderr]).then(([status]) => {
      if (this.#terminated) return;
      this.#terminated = true;
      this.onexit?.(this.#why(status));
    });
  }

  /** Sends jobs; throws at once (as postMessage does) when an argument cannot be framed. */
  postMessage(jobs: Job[]): void {
    const message = frames(this.#encoder, jobs, "task arguments");
    this.#writer.write(message).catch(() => {
      // A broken pipe: the process is gone, and `closed` says why.
    });
  }

  /** Ends the process at once; no onexit follows. */
  terminate(): void {
    if (this.#terminated) return;
    this.#terminated = true;
    try {
      this.#child.kill("SIGKILL");
    } catch { /* exited already */ }
  }

  async #read(): Promise<void> {
    const reader = new MessageReader(streamReader(this.#child.stdout), {
      frameBytesMax: IPC_FRAME_BYTES_MAX,
    });
    const decoder = new Decoder();
    try {
      for (;;) {
        const message = await reader.next();
        if (message === null) break;
        const data = decoder.decode(message[0], message.slice(1)) as ExecutorMessage | {
          kind: "memory";
          rss: number;
        };
        if (data?.kind === "memory") {
          if (typeof data.rss === "number") this.rss = data.rss;
          continue;
        }
        if (!this.#terminated) this.onmessage?.({ data });
      }
    } catch {
      // Cut off mid-message: the process died, and its status says how.
    } finally {
      await this.#child.stdout.cancel().catch(() => {});
      await this.#stdin.close();
    }
  }

  async #readStderr(): Promise<void> {
    let rest = "";
    const decoder = new TextDecoder();
    for await (const chunk of this.#child.stderr) {
      rest += decoder.decode(chunk, { stream: true });
      const lines = rest.split("\n");
      rest = lines.pop() ?? "";
      for (const line of lines) if (line.trim() !== "") this.#stderr.push(line);
      if (rest.length > 4096) rest = rest.slice(-4096);
      this.#stderr.splice(0, Math.max(0, this.#stderr.length - STDERR_LINES_MAX));
    }
  }

  #why(status: Deno.CommandStatus): string {
    const said = this.#stderr.join("\n");
    if (/out of memory|heap limit|Allocation failed/i.test(said)) {
      return "its executor process ran out of memory" +
        (/heap limit/i.test(said) ? " (it reached its JS heap limit)" : "");
    }
    if (status.signal !== null) return `its executor process was killed by ${status.signal}`;
    return `its executor process exited with code ${status.code}` +
      (said ? `: ${said.split("\n").slice(-3).join(" / ")}` : "");
  }
}
