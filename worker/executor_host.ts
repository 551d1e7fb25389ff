/**
 * The far side of a process executor (`--isolation process`): a process of its own that
 * holds one executor, the same sandboxed Web Worker a thread executor is, and relays
 * its jobs and results over stdin and stdout in dist's frames. Whatever a task does to
 * this process (run its heap out, crash V8, stop it) ends here, not in the worker that
 * holds the data. It exits when its stdin closes: a worker that dies takes its
 * executors with it.
 *
 * @module
 */

import { Decoder, Encoder } from "../protocol/codec.ts";
import { MessageReader, MessageWriter } from "../protocol/framing.ts";
import type { ExecutorMessage, Job, JobResult } from "./executor.ts";

/** The parent is this process's own worker: what it sends was in its memory already. */
const IPC_FRAME_BYTES_MAX = Number.MAX_SAFE_INTEGER;
/** How often this process tells its worker its resident memory (when it changed by a MiB or more). */
const MEMORY_REPORT_INTERVAL_MS = 100;

const EXECUTOR_URL = new URL("./executor.ts", import.meta.url).href;

/** Encodes `value` as one message of frames. */
export function frames(encoder: Encoder, value: unknown, root: string): Uint8Array[] {
  const { head, buffers } = encoder.encode(value, root);
  return [head, ...buffers];
}

/** Runs the executor with `permissions` until stdin closes; resolves the exit code. */
export async function runExecutorHost(permissions: Deno.PermissionOptions): Promise<number> {
  const worker = new Worker(
    EXECUTOR_URL,
    permissions === "inherit"
      ? { type: "module" }
      : { type: "module", deno: { permissions } } as WorkerOptions,
  );
  const encoder = new Encoder();
  const decoder = new Decoder();
  const writer = new MessageWriter(Deno.stdout);
  const send = (message: ExecutorMessage | { kind: "error"; message: string }) => {
    writer.write(frames(encoder, message, "executor message")).catch(() => {});
  };
  worker.onmessage = (event: MessageEvent<ExecutorMessage>) => {
    const m = event.data;
    // A task can post messages of its own: only the executor's kinds go on, and "error"
    // comes from this process alone.
    if (m?.kind === "exit") return send(m);
    if (m?.kind !== "results" || !Array.isArray(m.results)) return;
    // A result that cannot be framed fails alone, as one that cannot leave a thread executor does.
    for (const r of m.results) {
      try {
        writer.write(frames(encoder, { kind: "results", results: [r] }, "result")).catch(() => {});
      } catch (error) {
        const failed: JobResult = {
          id: r.id,
          ok: false,
          error: {
            name: "TypeError",
            message: `The result cannot leave the executor: ${(error as Error).message}`,
          },
        };
        send({ kind: "results", results: [failed] });
      }
    }
  };
  worker.onerror = (event: ErrorEvent) => {
    event.preventDefault();
    send({ kind: "error", message: event.message });
  };
  // The worker's memory monitor counts this process too: it cannot read /proc without
  // --allow-all, so this process says what it holds (Deno.memoryUsage needs no permission).
  let reported = 0;
  const report = setInterval(() => {
    const rss = Deno.memoryUsage().rss;
    if (Math.abs(rss - reported) < 2 ** 20) return;
    reported = rss;
    writer.write(frames(encoder, { kind: "memory", rss }, "memory")).catch(() => {});
  }, MEMORY_REPORT_INTERVAL_MS);
  const reader = new MessageReader(Deno.stdin, { frameBytesMax: IPC_FRAME_BYTES_MAX });
  try {
    for (;;) {
      const message = await reader.next();
      if (message === null) break;
      const jobs = decoder.decode(message[0], message.slice(1)) as Job[];
      // The frames are this process's own copies: hand them over instead of cloning them again.
      worker.postMessage(jobs, message.slice(1).map((f) => f.buffer as ArrayBuffer));
    }
  } finally {
    clearInterval(report);
    worker.terminate();
    await writer.flushed();
  }
  return 0;
}
