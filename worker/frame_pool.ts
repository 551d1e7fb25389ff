/**
 * The memory of large received values, reused for the next frame of the same size once
 * nothing refers to it any more.
 *
 * A worker receives each large frame straight into shared memory of its own, which
 * becomes the value. Memory the process has not touched yet costs a page fault per page
 * on its first write (on a VM whose host takes back freed memory, ~10 us per 4 KiB, and
 * a 256 MiB transfer ran at 500-700 MB/s instead of ~3,000 when it got such pages). A
 * worker that keeps the memory of values it let go of, and receives the next frame of the
 * same size into it, touches no new page.
 *
 * Reuse is only safe once nothing can read the old value: the pool counts holds on each
 * buffer it handed out (the store keeping the value, a reply being written from it, each
 * executor thread it was lent to until that thread says its references are gone) and
 * takes a buffer back only when the count returns to zero. A buffer an executor's task
 * returned as (part of) its result is shared with that result, and is never reused.
 *
 * @module
 */

import { eachBuffer } from "./store.ts";

/** Frames smaller than this are allocated as they come: their first touch costs little. */
export const POOL_FRAME_BYTES_MIN = 1024 * 1024;
/** A free buffer not reused within this long is let go of (an idle worker gives its memory back). */
export const POOL_IDLE_MS = 2_000;

const NOTHING_LENT: { ids: number[]; buffers: SharedArrayBuffer[] } = Object.freeze({
  ids: Object.freeze([]) as unknown as number[],
  buffers: Object.freeze([]) as unknown as SharedArrayBuffer[],
});

interface Entry {
  id: number;
  buffer: SharedArrayBuffer;
  holds: number;
  /** Of the holds, lends to executors. */
  lends: number;
  /**
   * Never reused: shared with a value the pool does not see (a task's result), or let go
   * of to free memory (spilled). Its holds still count, so its entry goes when they end.
   */
  noReuse: boolean;
}

interface Free {
  buffer: SharedArrayBuffer;
  since: number;
}

/** Options of a `FramePool`. */
export interface FramePoolOptions {
  /** Most bytes kept free for reuse (default 1 GiB). */
  maxBytes?: number;
  /** Told of the bytes of free buffers let go of: they return at the next collection. */
  onDrop?: (bytes: number) => void;
  /**
   * Told when only executors still hold a buffer: they report their references gone after
   * their collections, which they make on their own only once much memory was let go of.
   */
  onLentOnly?: () => void;
}

/** Reusable shared memory for received frames. See the module's comment. */
export class FramePool {
  /** Every buffer handed out by take(), until it is garbage. */
  #known = new WeakMap<SharedArrayBuffer, Entry>();
  /** Buffers something holds, by id (executors name them by id). */
  #held = new Map<number, Entry>();
  #free = new Map<number, Free[]>();
  #freeBytes = 0;
  #nextId = 1;
  readonly #maxBytes: number;
  #onDrop: (bytes: number) => void;
  #onLentOnly: () => void;
  /** Frames received into reused memory so far. */
  reused = 0;
  /** Bytes of those frames. */
  reusedBytes = 0;

  constructor(options: FramePoolOptions = {}) {
    this.#maxBytes = options.maxBytes ?? 1024 ** 3;
    this.#onDrop = options.onDrop ?? (() => {});
    this.#onLentOnly = options.onLentOnly ?? (() => {});
  }

  /** Bytes kept free for reuse. */
  get freeBytes(): number {
    return this.#freeBytes;
  }

  /** Buffers held now (by the store, writes or executors). */
  get heldCount(): number {
    return this.#held.size;
  }

  /**
   * Memory for a frame of `n` bytes: a free buffer of exactly that size when there is
   * one (its old bytes are all overwritten by the frame's), else a new one.
   */
  take(n: number): SharedArrayBuffer {
    if (n < POOL_FRAME_BYTES_MIN) return new SharedArrayBuffer(n);
    const free = this.#free.get(n)?.pop();
    let buffer: SharedArrayBuffer;
    if (free !== undefined) {
      buffer = free.buffer;
      this.#freeBytes -= n;
      this.reused++;
      this.reusedBytes += n;
    } else buffer = new SharedArrayBuffer(n);
    this.#known.set(buffer, { id: this.#nextId++, buffer, holds: 0, lends: 0, noReuse: false });
    return buffer;
  }

  /** Something keeps `value` (the store, a write in flight): its buffers are not reused meanwhile. */
  hold(value: unknown): void {
    this.#each(value, (e) => {
      e.holds++;
      this.#held.set(e.id, e);
    });
  }

  /**
   * What hold() counted for `value` is over. With `reuse` false (a value spilled to free
   * memory), its buffers are let go of once free instead of kept.
   */
  release(value: unknown, reuse = true, now = performance.now()): void {
    let lentOnly = false;
    this.#each(value, (e) => {
      if (!reuse) e.noReuse = true;
      this.#drop(e, now);
      if (e.holds > 0 && e.holds === e.lends && !e.noReuse) lentOnly = true;
    });
    if (lentOnly) this.#onLentOnly();
  }

  /**
   * `value` goes to an executor thread: the ids of its buffers from this pool, each held
   * until the executor reports it let go of it (`returned`), or empty.
   */
  lend(value: unknown): { ids: number[]; buffers: SharedArrayBuffer[] } {
    // Only a held buffer can be in a task's arguments: most tasks need no search.
    if (this.#held.size === 0) return NOTHING_LENT;
    const ids: number[] = [];
    const buffers: SharedArrayBuffer[] = [];
    this.#each(value, (e) => {
      e.holds++;
      e.lends++;
      this.#held.set(e.id, e);
      ids.push(e.id);
      buffers.push(e.buffer);
    });
    return { ids, buffers };
  }

  /** An executor let go of the buffers `ids` it was lent (one lend each; an id may repeat). */
  returned(ids: readonly number[], now = performance.now()): void {
    for (const id of ids) {
      const e = this.#held.get(id);
      if (e === undefined || e.lends === 0) continue;
      e.lends--;
      this.#drop(e, now);
    }
  }

  /** The buffers `ids` are part of a value kept elsewhere (a task returned them): never reused. */
  shared(ids: readonly number[]): void {
    for (const id of ids) {
      const e = this.#held.get(id);
      if (e !== undefined) e.noReuse = true;
    }
  }

  /** Lets go of free buffers unused for POOL_IDLE_MS (all of them with `all`); returns the bytes. */
  trim(now = performance.now(), all = false): number {
    let bytes = 0;
    for (const [size, list] of this.#free) {
      const keep = all ? [] : list.filter((f) => now - f.since < POOL_IDLE_MS);
      bytes += (list.length - keep.length) * size;
      if (keep.length === 0) this.#free.delete(size);
      else this.#free.set(size, keep);
    }
    this.#freeBytes -= bytes;
    if (bytes > 0) this.#onDrop(bytes);
    return bytes;
  }

  #each(value: unknown, visit: (e: Entry) => void): void {
    if (typeof value !== "object" || value === null) return;
    // The common case, a typed array, without a search.
    if (ArrayBuffer.isView(value)) {
      const e = value.buffer instanceof SharedArrayBuffer ? this.#known.get(value.buffer) : undefined;
      if (e !== undefined) visit(e);
      return;
    }
    eachBuffer(value, (b) => {
      const e = b instanceof SharedArrayBuffer ? this.#known.get(b) : undefined;
      if (e !== undefined) visit(e);
    });
  }

  #drop(e: Entry, now: number): void {
    if (--e.holds > 0) return;
    this.#held.delete(e.id);
    // Its entry goes: a buffer handed out again gets a new id, so a late report of an old
    // lend cannot count against its next value.
    this.#known.delete(e.buffer);
    if (e.noReuse) return;
    const size = e.buffer.byteLength;
    if (size > this.#maxBytes) return;
    this.#shrinkTo(this.#maxBytes - size);
    const list = this.#free.get(size);
    const free = { buffer: e.buffer, since: now };
    if (list === undefined) this.#free.set(size, [free]);
    else list.push(free);
    this.#freeBytes += size;
  }

  /** Lets go of the oldest free buffers until at most `bytes` are kept. */
  #shrinkTo(bytes: number): void {
    let dropped = 0;
    while (this.#freeBytes > bytes) {
      let oldest: [number, Free[]] | null = null;
      for (const entry of this.#free) {
        if (oldest === null || entry[1][0].since < oldest[1][0].since) oldest = entry;
      }
      if (oldest === null) break;
      const [size, list] = oldest;
      list.shift();
      if (list.length === 0) this.#free.delete(size);
      this.#freeBytes -= size;
      dropped += size;
    }
    if (dropped > 0) this.#onDrop(dropped);
  }
}
