/**
 * An executor: a Web Worker that runs a worker's tasks off its main thread, so CPU-bound
 * tasks run in parallel while the main thread keeps serving data and the scheduler.
 * Functions are compiled once per executor and kept by the id the pool gives them.
 *
 * Jobs arrive in batches and their results go back in batches: a burst of tiny tasks
 * costs one message each way, not one per task. A batch's results are not held back
 * long: whatever is done is sent every RESULT_HOLD_MS.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { toRemoteErrorInfo } from "../protocol/errors.ts";
import type { FunctionSpec } from "../protocol/ops.ts";
import { callFunction, EXECUTOR_FUNCTIONS_MAX, FunctionCache } from "./functions.ts";
import { nbytesOf } from "./store.ts";
import { Lru } from "../_lru.ts";

/** One job: run function `fn` (with its spec the first time) on `args`. */
export interface Job {
  id: number;
  fn: number;
  spec?: FunctionSpec;
  args: unknown[];
  key: string;
}

/** One job's outcome. */
export type JobResult =
  | { id: number; ok: true; result: unknown; nbytes: number }
  | { id: number; ok: false; error: { name: string; message: string; stack?: string } };

/** Longest a finished result waits for the rest of its batch. */
const RESULT_HOLD_MS = 2;

const functions = new FunctionCache();
// The pool mirrors this LRU: same size, touched once per job in the order jobs arrive.
const specs = new Lru<number, FunctionSpec>(EXECUTOR_FUNCTIONS_MAX);

/** The ArrayBuffers in `value` that can be handed back without a copy. */
function transferables(value: unknown, out: Set<ArrayBuffer>, depth = 0): Set<ArrayBuffer> {
  if (depth > 64 || typeof value !== "object" || value === null) return out;
  if (ArrayBuffer.isView(value)) {
    if (value.buffer instanceof ArrayBuffer) out.add(value.buffer);
  } else if (value instanceof ArrayBuffer) out.add(value);
  else if (Array.isArray(value)) { for (const item of value) transferables(item, out, depth + 1); }
  else if (value instanceof Map) {
    for (const [k, v] of value) transferables(k, out, depth + 1), transferables(v, out, depth + 1);
  } else if (value instanceof Set) { for (const item of value) transferables(item, out, depth + 1); }
  else if (Object.getPrototypeOf(value) === Object.prototype) {
    for (const key in value) transferables((value as Record<string, unknown>)[key], out, depth + 1);
  }
  return out;
}

async function run(job: Job, transfer: Set<ArrayBuffer>): Promise<JobResult> {
  const { id, fn, spec, args, key } = job;
  try {
    const known = spec ?? specs.get(fn);
    if (spec) specs.set(fn, spec);
    if (known === undefined) throw new RangeError(`Executor has no function ${fn}`);
    const result = await callFunction(await functions.get(known), args);
    // Checked here, off the main thread: what cannot travel is refused with its path.
    let nbytes: number;
    try {
      nbytes = nbytesOf(result, key);
    } catch (error) {
      throw new TypeError(`The result of ${key} cannot be kept: ${(error as Error).message}`);
    }
    transferables(result, transfer);
    return { id, ok: true, result: result === undefined ? null : result, nbytes };
  } catch (error) {
    return { id, ok: false, error: toRemoteErrorInfo(error) };
  }
}

/** What an executor says when a task calls Deno.exit: it goes down with the task. */
export interface ExitMessage {
  exited: number;
  id: number;
}

let current = 0;
// A task that calls Deno.exit takes only its executor down, never the worker: the pool
// hears which task did it, replaces the executor, and the scheduler counts a death.
Object.defineProperty(Deno, "exit", {
  value: (code = 0) => {
    self.postMessage({ exited: code, id: current } satisfies ExitMessage);
    self.close();
    throw new Error(`The task called Deno.exit(${code})`);
  },
  configurable: true,
  writable: true,
});

self.onmessage = async (event: MessageEvent<Job[]>) => {
  let results: JobResult[] = [];
  let transfer = new Set<ArrayBuffer>();
  let since = performance.now();
  for (const job of event.data) {
    current = job.id;
    results.push(await run(job, transfer));
    if (performance.now() - since >= RESULT_HOLD_MS) {
      self.postMessage(results, [...transfer]);
      results = [];
      transfer = new Set();
      since = performance.now();
    }
  }
  if (results.length > 0) self.postMessage(results, [...transfer]);
};
