/**
 * Fetching values from a worker (get_data) the way every peer and client does it: a
 * worker that answers BusyError is asked again after a growing, jittered pause, and
 * values that do not fit in one message come in parts.
 *
 * @module
 */

import type { Comm } from "./comm.ts";
import { BusyError, ProtocolError } from "./errors.ts";
import { FRAME_BYTES_MAX } from "./framing.ts";
import type { DataPart } from "./ops.ts";

/** First pause after a busy reply; each next one doubles, up to `BUSY_BACKOFF_MAX_MS`. */
export const BUSY_BACKOFF_FIRST_MS = 20;
/** Longest pause between two asks of a busy worker. */
export const BUSY_BACKOFF_MAX_MS = 1_000;
/** How long a fetch keeps asking a busy worker before it fails with the busy error. */
export const BUSY_WAIT_MAX_MS = 120_000;

/** True for a worker's "busy, ask again later" reply. */
export function isBusy(error: unknown): boolean {
  return error instanceof BusyError;
}

/** Options of `fetchData`. */
export interface FetchOptions {
  /** Per-call timeout (each ask), in ms. */
  timeoutMs?: number;
  /** Called once per busy reply (for counters). */
  onBusy?: () => void;
  /** Asked after each busy reply: true stops waiting, and the busy error is thrown (another holder has it). */
  elsewhere?: () => boolean;
  /**
   * The largest message this end accepts (its frameBytesMax; default FRAME_BYTES_MAX): the
   * worker sends values in parts that each fit.
   */
  bytesMax?: number;
  /** Called with each part as it arrives: what came before a failure is not lost. */
  onPart?: (values: Record<string, unknown>) => void;
}

/**
 * Asks `comm`'s worker for `keys`; resolves what it holds of them (missing keys are
 * absent). Values that do not fit in one message come in several replies, each asked
 * for the keys the last one left. Busy replies are retried with backoff for up to
 * `BUSY_WAIT_MAX_MS`, unless `elsewhere` says to ask another holder instead.
 */
export async function fetchData(
  comm: Comm,
  keys: string[],
  options: FetchOptions = {},
): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  const bytesMax = options.bytesMax ?? FRAME_BYTES_MAX;
  let rest = keys;
  // Each reply carries at least one value (or ends it), so this many asks always suffice.
  for (let asks = 0; rest.length > 0; asks++) {
    if (asks > keys.length) throw new ProtocolError(`Worker ${comm.conn.remoteAddress} sent no part`);
    const part = await askPart(comm, rest, bytesMax, options);
    const got = Object.keys(part.data).length;
    if (got === 0 && part.rest.length > 0) {
      throw new ProtocolError(`Worker ${comm.conn.remoteAddress} sent an empty part and kept keys back`);
    }
    Object.assign(out, part.data);
    options.onPart?.(part.data);
    rest = part.rest;
  }
  return out;
}

/** One get_data call, busy replies waited out. */
async function askPart(
  comm: Comm,
  keys: string[],
  bytesMax: number,
  options: FetchOptions,
): Promise<DataPart> {
  const started = Date.now();
  let pauseMs = BUSY_BACKOFF_FIRST_MS;
  for (;;) {
    try {
      const reply = await comm.call("get_data", { keys, bytes_max: bytesMax }, {
        timeoutMs: options.timeoutMs,
      }) as Partial<DataPart>;
      if (typeof reply?.data !== "object" || reply.data === null || !Array.isArray(reply.rest)) {
        throw new ProtocolError(
          `Worker ${comm.conn.remoteAddress} sent a get_data reply without data and rest`,
        );
      }
      return reply as DataPart;
    } catch (error) {
      if (!isBusy(error) || Date.now() - started >= BUSY_WAIT_MAX_MS) throw error;
      options.onBusy?.();
      if (options.elsewhere?.()) throw error;
      // Full jitter: fetchers turned away together do not all come back together.
      await new Promise((resolve) => setTimeout(resolve, Math.random() * pauseMs));
      pauseMs = Math.min(BUSY_BACKOFF_MAX_MS, pauseMs * 2);
    }
  }
}
