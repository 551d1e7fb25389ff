/**
 * Fetching values from workers the way every peer and client does it: `fetchData` asks
 * one worker for keys (values that do not fit in one message come in parts), and
 * `Holders` decides whom to ask, when to leave a busy worker for another holder, when
 * to wait one out, and when to ask the scheduler where a key is.
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
/** How long a holder may stay busy without a break before it counts as failed for the keys asked of it. */
export const BUSY_WAIT_MAX_MS = 120_000;

/** True for a worker's "busy, ask again later" reply. */
export function isBusy(error: unknown): boolean {
  return error instanceof BusyError;
}

/** Options of `fetchData`. */
export interface FetchOptions {
  /** Per-call timeout (each ask), in ms. */
  timeoutMs?: number;
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
 * for the keys the last one left. A busy reply rejects with BusyError (parts that
 * came before it were passed to `onPart`): the caller's `Holders` says what next.
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

/** One get_data call; a busy reply is thrown to the caller, whose `Holders` decides what next. */
async function askPart(
  comm: Comm,
  keys: string[],
  bytesMax: number,
  options: FetchOptions,
): Promise<DataPart> {
  const reply = await comm.call("get_data", { keys, bytes_max: bytesMax }, {
    timeoutMs: options.timeoutMs,
  }) as Partial<DataPart>;
  if (typeof reply?.data !== "object" || reply.data === null || !Array.isArray(reply.rest)) {
    throw new ProtocolError(`Worker ${comm.conn.remoteAddress} sent a get_data reply without data and rest`);
  }
  return reply as DataPart;
}

/** What a key needs next, as `Holders.status` sees it. */
export type HolderStatus =
  /** A holder can be asked now. */
  | "ask"
  /** Every holder left is busy: ask again at `Holders.wakeAt()`. */
  | "wait"
  /** No holder is known to be worth asking: ask the scheduler where the key is now. */
  | "lookup"
  /** Looked up as often as allowed, and no holder is left: the key is lost to this end. */
  | "lost";

/** Options of `Holders`. */
export interface HoldersOptions {
  /** This end's own address: never a holder to ask. */
  self?: string;
  /** How often a key may be looked up (who_has) before it counts as lost; default 2. */
  lookupsMax?: number;
  /** Random source in [0, 1) for the choice of a holder and the busy jitter (tests pass a seeded one). */
  random?: () => number;
}

/**
 * Where to fetch each key from: the one policy of the worker's fetches and the client's
 * gather. Pure (no I/O, time passed in). A key is asked of one of its holders at a
 * time, keys that share a holder go in one request, a holder that failed a key is not
 * asked for it again, a busy holder is left for another holder of the key if there is
 * one (Dask's way) and otherwise asked again after a jittered, doubling pause, and a
 * key with no holder left is looked up (who_has) up to `lookupsMax` times.
 */
export class Holders {
  readonly #keys = new Map<string, { holders: string[]; failed: Set<string>; lookups: number }>();
  /** Peers that answered busy: when they may be asked again, the next pause, and since when. */
  readonly #busy = new Map<string, { until: number; pauseMs: number; since: number }>();
  #self: string | null;
  readonly #lookupsMax: number;
  readonly #random: () => number;

  constructor(options: HoldersOptions = {}) {
    this.#self = options.self ?? null;
    this.#lookupsMax = options.lookupsMax ?? 2;
    this.#random = options.random ?? Math.random;
  }

  /** This end's own address, never asked. */
  set self(address: string) {
    this.#self = address;
  }

  /** Takes `holders` as where `key` is now (a who_has answer); holders that failed it stay left out. */
  learn(key: string, holders: readonly string[]): void {
    let entry = this.#keys.get(key);
    if (entry === undefined) this.#keys.set(key, entry = { holders: [], failed: new Set(), lookups: 0 });
    // This end named as a holder lacks the key (else it would not ask): a failed holder.
    if (this.#self !== null && holders.includes(this.#self)) entry.failed.add(this.#self);
    entry.holders = holders.filter((h) => h !== this.#self && !entry!.failed.has(h));
  }

  /** Counts a lookup of `key` sent to the scheduler. */
  lookedUp(key: string): void {
    const entry = this.#keys.get(key);
    if (entry === undefined) this.#keys.set(key, { holders: [], failed: new Set(), lookups: 1 });
    else entry.lookups++;
  }

  /** Forgets `key` (fetched, or nobody wants it any more). */
  forget(key: string): void {
    this.#keys.delete(key);
  }

  /** The holders of `key` still worth asking. */
  holders(key: string): readonly string[] {
    return this.#keys.get(key)?.holders ?? [];
  }

  /** Every holder named for `key` so far, failed ones included (for a MissingDataError). */
  named(key: string): string[] {
    const entry = this.#keys.get(key);
    return entry ? [...new Set([...entry.holders, ...entry.failed])] : [];
  }

  /** `peer` did not give `key` (it is gone, or lacks it): it is not asked for it again. */
  failed(peer: string, key: string): void {
    const entry = this.#keys.get(key);
    if (entry === undefined) return;
    entry.failed.add(peer);
    entry.holders = entry.holders.filter((h) => h !== peer);
  }

  /**
   * `peer` answered busy at `now`: it is not asked again for a jittered, doubling pause.
   * A peer busy without a break for `BUSY_WAIT_MAX_MS` counts as failed for `keys`.
   */
  busy(peer: string, keys: Iterable<string>, now: number): void {
    let entry = this.#busy.get(peer);
    if (entry === undefined) {
      this.#busy.set(peer, entry = { until: now, pauseMs: BUSY_BACKOFF_FIRST_MS, since: now });
    }
    entry.until = now + entry.pauseMs * (0.5 + this.#random() / 2);
    entry.pauseMs = Math.min(BUSY_BACKOFF_MAX_MS, entry.pauseMs * 2);
    if (now - entry.since >= BUSY_WAIT_MAX_MS) { for (const key of keys) this.failed(peer, key); }
  }

  /** `peer` answered (not busy): its pauses start over. */
  answered(peer: string): void {
    this.#busy.delete(peer);
  }

  /** True while `peer` is in a busy pause at `now`. */
  isBusy(peer: string, now: number): boolean {
    const entry = this.#busy.get(peer);
    return entry !== undefined && entry.until > now;
  }

  /** What `key` needs at `now`. */
  status(key: string, now: number): HolderStatus {
    const entry = this.#keys.get(key);
    const lookups = entry?.lookups ?? 0;
    if (entry === undefined || entry.holders.length === 0) {
      return lookups < this.#lookupsMax ? "lookup" : "lost";
    }
    if (entry.holders.some((h) => !this.isBusy(h, now))) return "ask";
    // Only busy holders left: a copy made since the key was named may be free, so look
    // once (a client hears of a key's first holder only).
    return lookups === 0 ? "lookup" : "wait";
  }

  /** The earliest moment a busy peer may be asked again, or null when none is in a pause. */
  wakeAt(now: number): number | null {
    let at: number | null = null;
    for (const entry of this.#busy.values()) {
      if (entry.until <= now) continue;
      if (at === null || entry.until < at) at = entry.until;
    }
    return at;
  }

  /**
   * For each of `keys` that can be asked at `now`, a holder: one already chosen for
   * another key if it has this one (fewer, larger requests), else one at random, among
   * those not in a busy pause and that `room(peer, key)` accepts (the caller's limits on
   * requests in flight). Returns the requests by peer; keys left out wait.
   */
  choose(
    keys: Iterable<string>,
    now: number,
    room: (peer: string, key: string) => boolean = () => true,
  ): Map<string, string[]> {
    const plan = new Map<string, string[]>();
    for (const key of keys) {
      const holders = this.#keys.get(key)?.holders ?? [];
      const free = holders.filter((h) => !this.isBusy(h, now));
      let peer = free.find((h) => plan.has(h) && room(h, key));
      if (peer === undefined) {
        const open = free.filter((h) => !plan.has(h) && room(h, key));
        if (open.length === 0) continue;
        peer = open[Math.floor(this.#random() * open.length)];
      }
      let batch = plan.get(peer);
      if (batch === undefined) plan.set(peer, batch = []);
      batch.push(key);
    }
    return plan;
  }
}
