/**
 * An executor: a Web Worker that runs a worker's tasks off its main thread, so CPU-bound
 * tasks run in parallel while the main thread keeps serving data and the scheduler.
 * Functions are compiled once per executor and kept by the id the pool gives them.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { toRemoteErrorInfo } from "../protocol/errors.ts";
import type { FunctionSpec } from "../protocol/ops.ts";
import { callFunction, FunctionCache } from "./functions.ts";
import { nbytesOf } from "./store.ts";

/** What the pool sends: run function `fn` (with its spec the first time) on `args`. */
export interface RunMessage {
  id: number;
  fn: number;
  spec?: FunctionSpec;
  args: unknown[];
  key: string;
}

/** What an executor answers. */
export type DoneMessage =
  | { id: number; ok: true; result: unknown; nbytes: number }
  | { id: number; ok: false; error: { name: string; message: string; stack?: string } };

const functions = new FunctionCache();
const specs = new Map<number, FunctionSpec>();

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

self.onmessage = async (event: MessageEvent<RunMessage>) => {
  const { id, fn, spec, args, key } = event.data;
  let reply: DoneMessage;
  let transfer: ArrayBuffer[] = [];
  try {
    if (spec) specs.set(fn, spec);
    const known = specs.get(fn);
    if (known === undefined) throw new RangeError(`Executor has no function ${fn}`);
    const result = await callFunction(await functions.get(known), args);
    // Checked here, off the main thread: what cannot travel is refused with its path.
    let nbytes: number;
    try {
      nbytes = nbytesOf(result, key);
    } catch (error) {
      throw new TypeError(`The result of ${key} cannot be kept: ${(error as Error).message}`);
    }
    reply = { id, ok: true, result: result === undefined ? null : result, nbytes };
    transfer = [...transferables(result, new Set())];
  } catch (error) {
    reply = { id, ok: false, error: toRemoteErrorInfo(error) };
  }
  self.postMessage(reply, transfer);
};
