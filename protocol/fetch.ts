/**
 * Fetching values from a worker (get_data) the way every peer and client does it: a
 * worker that answers BusyError is asked again after a growing, jittered pause.
 *
 * @module
 */

import type { Comm } from "./comm.ts";
import { RemoteError } from "./errors.ts";

/** First pause after a busy reply; each next one doubles, up to `BUSY_BACKOFF_MAX_MS`. */
export const BUSY_BACKOFF_FIRST_MS = 20;
/** Longest pause between two asks of a busy worker. */
export const BUSY_BACKOFF_MAX_MS = 1_000;
/** How long a fetch keeps asking a busy worker before it fails with the busy error. */
export const BUSY_WAIT_MAX_MS = 120_000;

/** True for a worker's "busy, ask again later" reply. */
export function isBusy(error: unknown): boolean {
  return error instanceof RemoteError && error.remoteName === "BusyError";
}

/** Options of `fetchData`. */
export interface FetchOptions {
  /** Per-call timeout (each ask), in ms. */
  timeoutMs?: number;
  /** Called once per busy reply (for counters). */
  onBusy?: () => void;
  /** Asked after each busy reply: true stops waiting, and the busy error is thrown (another holder has it). */
  elsewhere?: () => boolean;
}

/**
 * Asks `comm`'s worker for `keys`; resolves what it holds of them (missing keys are
 * absent). Busy replies are retried with backoff for up to `BUSY_WAIT_MAX_MS`, unless
 * `elsewhere` says to ask another holder instead.
 */
export async function fetchData(
  comm: Comm,
  keys: string[],
  options: FetchOptions = {},
): Promise<Record<string, unknown>> {
  const started = Date.now();
  let pauseMs = BUSY_BACKOFF_FIRST_MS;
  for (;;) {
    try {
      return await comm.call("get_data", { keys }, { timeoutMs: options.timeoutMs }) as Record<
        string,
        unknown
      >;
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
