/**
 * A worker's data: values by key, each with its size in bytes.
 *
 * @module
 */

import { Decoder, Encoder, Ref } from "../protocol/codec.ts";
import { frameHeader, SMALL_FRAME_BYTES } from "../protocol/framing.ts";

// Every binary value goes out of band here, so measuring never copies one.
const measurer = new Encoder({ inlineBytesMax: 0 });

/**
 * The memory `value` holds, in bytes: a typed array's whole buffer (a small view of a
 * large buffer keeps all of it alive); for anything else, what it takes on the wire,
 * with each buffer its binary parts view counted whole, once. Throws TypeError naming
 * `root` and the path of any part that cannot travel.
 */
export function nbytesOf(value: unknown, root = "value"): number {
  if (ArrayBuffer.isView(value) && !(value instanceof DataView)) return value.buffer.byteLength;
  const { head, buffers } = measurer.encode(value, root);
  let n = head.byteLength;
  if (buffers.length === 0) return n;
  const seen = new Set<ArrayBufferLike>();
  for (const b of buffers) {
    if (seen.has(b.buffer)) continue;
    seen.add(b.buffer);
    n += b.buffer.byteLength;
  }
  return n;
}

/**
 * Buffer memory freed since the last collection past which V8 is asked for one. V8 does
 * not count a SharedArrayBuffer toward its next collection, and an idle process makes
 * none: a worker receives large values into shared memory, and freed ones stayed until
 * something else caused a collection (GiBs held while idle).
 */
export const FREED_GC_BYTES = 64 * 1024 * 1024;
/**
 * The external memory reported to V8 to have it collect at once: past its hard limit, half
 * its largest old generation (at most 4 GiB by default). Allocated in parts of
 * GC_NUDGE_PART_BYTES, never touched, so no RAM is behind them.
 */
const GC_NUDGE_BYTES = 3 * 1024 * 1024 * 1024;
const GC_NUDGE_PART_BYTES = 1024 * 1024 * 1024;
/**
 * Least time between two collections asked for, as a multiple of what the last one took:
 * collections asked for take at most a twentieth of the time, and a burst of frees costs
 * one. Soon matters: memory given back at once is what the kernel hands out next, pages
 * already backed by RAM (on a VM, a page the host reclaimed costs ~10 us to touch again:
 * receiving 256 MiB into shared memory freed late ran at ~400 MB/s, freed at once ~2 GB/s).
 */
const GC_INTERVAL_COST_TIMES = 20;
/** The least time between two collections asked for, however cheap they are. */
const GC_INTERVAL_MS_MIN = 10;
/** After a collection that other isolates were asked to join, the pause before this one collects again. */
const COLLECT_AGAIN_MS = 100;
/**
 * After the last collection of a burst, the pause before a last one here and in the other
 * isolates: memory an isolate still held (a task's arguments, a message under way) when
 * the burst's collections ran is garbage by then, and nothing else would collect it in an
 * idle process (a worker once held 700 MiB for good after its values were released).
 */
const COLLECT_SETTLE_MS = 1_000;
/**
 * How many settle collections follow a burst: 1, 4 and 13 s after it (each pause three
 * times the one before). On a loaded machine an isolate may still hold the memory after
 * a second: a fresh-clone CI run saw a worker stay over its idle RSS + 64 MiB for the
 * 10 s its test waited.
 */
const COLLECT_SETTLES = 3;
/** Most objects searched for buffers in one value. */
const BUFFER_SEARCH_NODES_MAX = 10_000;

/** Calls `visit` once with each buffer `value` refers to (its top levels searched). */
export function eachBuffer(value: unknown, visit: (buffer: ArrayBufferLike) => void): void {
  const seen = new Set<ArrayBufferLike>();
  let budget = BUFFER_SEARCH_NODES_MAX;
  const stack: unknown[] = [value];
  while (stack.length > 0 && budget-- > 0) {
    const v = stack.pop();
    if (typeof v !== "object" || v === null) continue;
    const buffer = ArrayBuffer.isView(v)
      ? v.buffer
      : v instanceof ArrayBuffer || v instanceof SharedArrayBuffer
      ? v
      : null;
    if (buffer !== null) {
      if (!seen.has(buffer)) visit(buffer);
      seen.add(buffer);
    } else if (Array.isArray(v)) stack.push(...v.slice(0, budget));
    else if (v instanceof Map) { for (const [k, item] of v) stack.push(k, item); }
    else if (v instanceof Set) { for (const item of v) stack.push(item); }
    else if (Object.getPrototypeOf(v) === Object.prototype || Object.getPrototypeOf(v) === null) {
      for (const key in v) stack.push((v as Record<string, unknown>)[key]);
    }
  }
}

/** The bytes of the buffers (ArrayBuffer or shared) `value` refers to. */
function bufferBytesOf(value: unknown): number {
  let bytes = 0;
  eachBuffer(value, (b) => bytes += b.byteLength);
  return bytes;
}

/** The bytes of the SharedArrayBuffers `value` refers to. */
export function sharedBytesOf(value: unknown): number {
  let bytes = 0;
  eachBuffer(value, (b) => {
    if (b instanceof SharedArrayBuffer) bytes += b.byteLength;
  });
  return bytes;
}

/**
 * The shared memory a value received into shared frames dropped on arrival: an
 * ArrayBuffer past SMALL_FRAME_BYTES came in a shared frame and was copied out of it.
 */
export function droppedFrameBytesOf(value: unknown): number {
  let bytes = 0;
  eachBuffer(value, (b) => {
    if (b instanceof ArrayBuffer && b.byteLength > SMALL_FRAME_BYTES) bytes += b.byteLength;
  });
  return bytes;
}

/**
 * Counts buffer memory let go of and, past FREED_GC_BYTES, has V8 collect it (at a later
 * turn, once the caller has dropped its references too).
 */
export class MemoryReclaimer {
  #freed = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #lastMs = -Infinity;
  /** What the last collection took, in ms. */
  #costMs = 0;
  #again: ReturnType<typeof setTimeout> | undefined;
  #settle: ReturnType<typeof setTimeout> | undefined;
  /** Collections asked for so far. */
  collections = 0;
  /**
   * The process is short of memory (its owner says): freed buffers are collected at the
   * next turn instead of at most once a second.
   */
  pressure = false;
  /**
   * Called at each collection this reclaimer starts, for the other isolates that share the
   * memory (a worker's executor threads) to collect theirs: shared memory returns only
   * once every isolate holding it has collected, so this one collects again shortly after.
   */
  onCollect: (() => void) | null = null;

  /** `bytes` of buffers are no longer referred to from here. */
  freed(bytes: number): void {
    this.#freed += bytes;
    if (this.#freed < FREED_GC_BYTES || this.#timer !== undefined) return;
    const gapMs = Math.max(GC_INTERVAL_MS_MIN, this.#costMs * GC_INTERVAL_COST_TIMES);
    const waitMs = this.pressure ? 0 : Math.max(0, this.#lastMs + gapMs - performance.now());
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#collect();
    }, waitMs);
  }

  #collect(): void {
    this.#freed = 0;
    this.collections++;
    const t = performance.now();
    collect();
    this.#lastMs = performance.now();
    this.#costMs = this.#lastMs - t;
    if (this.onCollect !== null) {
      this.onCollect();
      clearTimeout(this.#again);
      this.#again = setTimeout(() => {
        this.#again = undefined;
        this.collections++;
        collect();
      }, COLLECT_AGAIN_MS);
    }
    this.#settleAfter(COLLECT_SETTLE_MS, COLLECT_SETTLES);
  }

  /** A last collection here and in the other isolates `ms` from now, and `more` after it, each later. */
  #settleAfter(ms: number, more: number): void {
    clearTimeout(this.#settle);
    this.#settle = setTimeout(() => {
      this.#settle = undefined;
      this.collections++;
      this.onCollect?.();
      collect();
      if (more > 1) this.#settleAfter(ms * 3, more - 1);
    }, ms);
  }

  /**
   * Collects now if buffers were let go of since the last collection (or, with `always`,
   * anyway), whatever the time since: the process is short of memory. Returns the bytes
   * it expects back.
   */
  collectNow(always = false): number {
    const freed = this.#freed;
    if (freed === 0 && !always) return 0;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#collect();
    return freed;
  }

  /** Cancels a pending collection (the owner is closing). */
  close(): void {
    clearTimeout(this.#timer);
    clearTimeout(this.#again);
    clearTimeout(this.#settle);
    this.#timer = undefined;
    this.#again = undefined;
    this.#settle = undefined;
  }
}

/**
 * Has V8 collect garbage without --expose-gc: a large ArrayBuffer counts as external
 * memory past V8's hard limit, which makes it collect at once. Its pages are never touched,
 * so the kernel backs none of them.
 */
function collect(): void {
  try {
    for (let n = 0; n < GC_NUDGE_BYTES; n += GC_NUDGE_PART_BYTES) new ArrayBuffer(GC_NUDGE_PART_BYTES);
  } catch {
    // No address space for it: the memory comes back at a later collection instead.
  }
}

/** Options of a `DataStore`. */
export interface DataStoreOptions {
  /**
   * Bytes of values kept in memory: past it, the least recently used go to disk, and a
   * value larger than it goes there at once. Infinity (the default) never spills.
   */
  targetBytes?: number;
  /** Where the spill folder is made (a fresh one, removed by `close()`); default the system's temp folder. */
  directory?: string;
  /** Told when a value cannot be spilled (it stays in memory). */
  onSpillError?: (message: string) => void;
  /**
   * Called when the store has V8 collect what it let go of: the other isolates that may
   * hold the same shared memory (the worker's executor threads) should collect too.
   */
  onCollect?: () => void;
  /**
   * Told when a large value (SMALL_FRAME_BYTES or more) comes into memory here and when
   * it leaves (deleted, replaced or spilled): a pool of received frames reuses a buffer
   * only once nothing holds it.
   */
  holds?: ValueHolds;
}

/** What a `DataStore` tells of the large values it keeps in memory (a `FramePool` listens). */
export interface ValueHolds {
  /** `value` came into memory. */
  hold(value: unknown): void;
  /** `value` left memory: deleted or replaced, or (`reuse` false) spilled to free memory. */
  release(value: unknown, reuse?: boolean): void;
}

/** After a failed spill, how long before the store tries the disk again. */
export const SPILL_RETRY_MS = 5_000;

/**
 * Values by key, with their sizes. With a `targetBytes`, values past it are spilled to
 * disk, least recently used first, each in a file of its own in the wire's encoding
 * (frame header and msgpack head, then the out-of-band buffers, each from a page
 * boundary), and read back when asked for. A value
 * that cannot be spilled (a full disk, no write permission) stays in memory: nothing is lost.
 */
export class DataStore {
  /** Values in memory, least recently used first. */
  #values = new Map<string, unknown>();
  #nbytes = new Map<string, number>();
  /** Spilled values: key to file. */
  #spilled = new Map<string, string>();
  #memoryBytes = 0;
  #spilledBytes = 0;
  readonly #target: number;
  /** What values in memory may take now: the target, less what the process needs besides (see `budget`). */
  #budget: number;
  readonly #parent: string | undefined;
  readonly #onSpillError: (message: string) => void;
  #dir: string | null = null;
  #files = 0;
  #spillBlockedUntil = -Infinity;
  /** The last spill failure, for the dashboard and /metrics; null once a spill succeeds again. */
  spillError: string | null = null;
  /** Bytes written to disk by spilling so far. */
  spillWrittenBytes = 0;
  /** Bytes read back from disk so far. */
  spillReadBytes = 0;
  /** Asks V8 to collect once enough buffer memory has been let go of (see FREED_GC_BYTES). */
  #reclaimer = new MemoryReclaimer();
  readonly #holds: ValueHolds | null;

  /** A store; with `targetBytes`, one that spills (see `DataStoreOptions`). */
  constructor(options: DataStoreOptions = {}) {
    this.#target = options.targetBytes ?? Infinity;
    this.#budget = this.#target;
    this.#parent = options.directory;
    this.#onSpillError = options.onSpillError ?? (() => {});
    this.#reclaimer.onCollect = options.onCollect ?? null;
    this.#holds = options.holds ?? null;
  }

  /** `bytes` of buffer memory let go of outside the store (a pool's free buffers): counted toward a collection. */
  freed(bytes: number): void {
    this.#reclaimer.freed(bytes);
  }

  /** How many keys it holds, in memory and on disk. */
  get size(): number {
    return this.#values.size + this.#spilled.size;
  }

  /** Bytes of the values held in memory (managed memory). */
  get memoryBytes(): number {
    return this.#memoryBytes;
  }

  /** Bytes of the values spilled to disk (as counted in memory). */
  get spilledBytes(): number {
    return this.#spilledBytes;
  }

  /** Keys on disk. */
  get spilledKeys(): number {
    return this.#spilled.size;
  }

  /** The spill folder, once one was made. */
  get directory(): string | null {
    return this.#dir;
  }

  /** Whether it holds `key` in memory (not only on disk). */
  inMemory(key: string): boolean {
    return this.#values.has(key);
  }

  /** Whether it holds `key`. */
  has(key: string): boolean {
    return this.#values.has(key) || this.#spilled.has(key);
  }

  /**
   * The value of `key` (undefined when absent). A spilled value is read back, and kept in
   * memory again if it fits the budget (others may be spilled for it); one that does not
   * fit (the process is short of memory) is only returned. Throws if its file cannot be read.
   */
  get(key: string): unknown {
    if (this.#values.has(key)) {
      const value = this.#values.get(key);
      if (this.#target !== Infinity) {
        // Most recently used goes last.
        this.#values.delete(key);
        this.#values.set(key, value);
      }
      return value;
    }
    const file = this.#spilled.get(key);
    if (file === undefined) return undefined;
    const value = this.#readSpilled(key, file);
    const nbytes = this.#nbytes.get(key)!;
    // A plain ArrayBuffer was copied out of its shared frame, which is garbage now.
    if (nbytes > SMALL_FRAME_BYTES) this.#reclaimer.freed(droppedFrameBytesOf(value));
    if (nbytes <= this.#budget) {
      this.#spilled.delete(key);
      this.#spilledBytes -= nbytes;
      this.#removeFile(file);
      this.#values.set(key, value);
      this.#memoryBytes += nbytes;
      if (nbytes >= SMALL_FRAME_BYTES) this.#holds?.hold(value);
      this.#evict(key);
    } else if (nbytes >= SMALL_FRAME_BYTES) {
      // Read for the caller alone: its memory is let go of once the caller is done.
      this.#reclaimer.freed(bufferBytesOf(value));
    }
    return value;
  }

  /** Stores `value` under `key` (undefined as null: it must travel); returns its size. */
  set(key: string, value: unknown, nbytes = nbytesOf(value, key)): number {
    this.#let(key, value);
    this.#forget(key);
    const v = value === undefined ? null : value;
    this.#nbytes.set(key, nbytes);
    if (nbytes > this.#target && this.#spill(key, v, nbytes)) {
      // Its buffers are no longer held here: their memory returns at the next collection.
      if (nbytes >= SMALL_FRAME_BYTES) this.#reclaimer.freed(bufferBytesOf(v));
      return nbytes;
    }
    this.#values.set(key, v);
    this.#memoryBytes += nbytes;
    if (nbytes >= SMALL_FRAME_BYTES) this.#holds?.hold(v);
    this.#evict(key);
    return nbytes;
  }

  /**
   * Stores `value`, which arrived in a message read into shared frames: the frames it was
   * copied out of are freed memory too. Returns its size.
   */
  setReceived(key: string, value: unknown, nbytes = nbytesOf(value, key)): number {
    this.set(key, value, nbytes);
    if (nbytes > SMALL_FRAME_BYTES) this.#reclaimer.freed(droppedFrameBytesOf(value));
    return nbytes;
  }

  /** Deletes `key`; true if it was there. */
  delete(key: string): boolean {
    const had = this.has(key);
    this.#let(key);
    this.#forget(key);
    this.#nbytes.delete(key);
    return had;
  }

  /** Drops `key` from memory or disk, leaving its size entry to the caller. */
  #forget(key: string): void {
    const nbytes = this.#nbytes.get(key) ?? 0;
    if (nbytes >= SMALL_FRAME_BYTES && this.#holds !== null) {
      // Values are never undefined here (set() keeps undefined as null).
      const value = this.#values.get(key);
      if (value !== undefined) this.#holds.release(value);
    }
    if (this.#values.delete(key)) this.#memoryBytes -= nbytes;
    const file = this.#spilled.get(key);
    if (file !== undefined) {
      this.#spilled.delete(key);
      this.#spilledBytes -= nbytes;
      this.#removeFile(file);
    }
  }

  /**
   * Spills the least recently used values until those in memory fit the budget (the
   * worker's memory monitor, when the process holds more than its values). Returns the
   * bytes spilled; fewer when the disk refuses.
   */
  spillToBudget(): number {
    const before = this.#memoryBytes;
    this.#evict(null);
    return before - this.#memoryBytes;
  }

  /** Spills the least recently used values (never `keep`) until memory is back under `target`. */
  #evict(keep: string | null, target = this.#budget): void {
    if (this.#memoryBytes <= target) return;
    for (const [key, value] of this.#values) {
      if (this.#memoryBytes <= target) return;
      if (key === keep) continue;
      const nbytes = this.#nbytes.get(key)!;
      if (!this.#spill(key, value, nbytes)) return;
      this.#let(key);
      this.#values.delete(key);
      this.#memoryBytes -= nbytes;
      if (nbytes >= SMALL_FRAME_BYTES) this.#holds?.release(value, false);
    }
  }

  /** Writes `value` to a file of its own; false (the error told) when it cannot. */
  #spill(key: string, value: unknown, nbytes: number): boolean {
    if (performance.now() < this.#spillBlockedUntil) return false;
    let file: string | null = null;
    try {
      this.#dir ??= Deno.makeTempDirSync({ dir: this.#parent, prefix: "dist-worker-" });
      file = `${this.#dir}/${++this.#files}`;
      const { head, buffers } = spillEncoder.encode(value, key);
      // The frame header and the head, then each buffer at a page boundary: a large
      // write that starts mid-page took 2.5x as long as an aligned one.
      const header = frameHeader([head, ...buffers]);
      const first = new Uint8Array(alignUp(header.byteLength + head.byteLength));
      first.set(header);
      first.set(head, header.byteLength);
      using f = Deno.openSync(file, { write: true, createNew: true });
      writeAllSync(f, first);
      for (let i = 0; i < buffers.length; i++) {
        writeAllSync(f, buffers[i]);
        const pad = alignUp(buffers[i].byteLength) - buffers[i].byteLength;
        if (pad > 0 && i < buffers.length - 1) writeAllSync(f, new Uint8Array(pad));
      }
    } catch (error) {
      if (file !== null) this.#removeFile(file);
      const message =
        `Cannot spill ${key} (${nbytes} bytes) to ${this.#dir ?? this.#parent ?? "the temp folder"}: ${
          (error as Error).message
        }; it stays in memory` + (error instanceof Deno.errors.NotCapable
          ? " (spilling needs --allow-write for the worker's --local-directory)"
          : "");
      this.spillError = message;
      this.#spillBlockedUntil = performance.now() + SPILL_RETRY_MS;
      this.#onSpillError(message);
      return false;
    }
    this.spillError = null;
    this.#spilled.set(key, file);
    this.#spilledBytes += nbytes;
    this.spillWrittenBytes += nbytes;
    return true;
  }

  /** Reads a spilled value back: each frame into a buffer of its own (aligned, no copy). */
  #readSpilled(key: string, file: string): unknown {
    try {
      using f = Deno.openSync(file, { read: true });
      const count = new Uint8Array(4);
      readExactSync(f, count);
      const n = new DataView(count.buffer).getUint32(0, true);
      const sizes = new Uint8Array(8 * n);
      readExactSync(f, sizes);
      const view = new DataView(sizes.buffer);
      const frames: Uint8Array[] = [];
      let at = 4 + 8 * n;
      for (let i = 0; i < n; i++) {
        const length = view.getUint32(8 * i, true) + view.getUint32(8 * i + 4, true) * 0x100000000;
        // Buffers land in shared memory, as values from the network do: an executor
        // thread then reads them in place, with no copy on the way in.
        const frame = new Uint8Array(
          i > 0 && length > SMALL_FRAME_BYTES ? new SharedArrayBuffer(length) : new ArrayBuffer(length),
        );
        readExactSync(f, frame);
        frames.push(frame);
        this.spillReadBytes += length;
        // The head ends its first page, each buffer but the last its own: the next starts aligned.
        at = alignUp(at + length);
        if (i < n - 1) f.seekSync(at, Deno.SeekMode.Start);
      }
      return spillDecoder.decode(frames[0], frames.slice(1));
    } catch (error) {
      throw new Error(`Cannot read spilled ${key} back from ${file}: ${(error as Error).message}`);
    }
  }

  #removeFile(file: string): void {
    try {
      Deno.removeSync(file);
    } catch {
      // Gone already, or never made: nothing to free.
    }
  }

  /** The value of `key` is let go (for `next`, if given): the memory of its buffers counts as freed. */
  #let(key: string, next?: unknown): void {
    if ((this.#nbytes.get(key) ?? 0) < SMALL_FRAME_BYTES) return;
    const old = this.#values.get(key);
    if (old === undefined || old === next) return;
    // An ArrayBuffer's memory counts toward V8's next collection, but an idle worker makes
    // none: freed large buffers of either kind ask for one.
    let bytes = bufferBytesOf(old);
    // A value moved to shared memory for an executor replaces its own copy, which it may share.
    if (bytes > 0 && next !== undefined) bytes = Math.max(0, bytes - bufferBytesOf(next));
    if (bytes > 0) this.#reclaimer.freed(bytes);
  }

  /**
   * Has V8 collect now the buffers let go of (spilled, deleted) since its last collection,
   * instead of within a second (with `always`, even if none were counted): the worker's
   * memory monitor found the process past its spill share. Returns the bytes expected back.
   */
  reclaimNow(always = false): number {
    return this.#reclaimer.collectNow(always);
  }

  /**
   * Whether the process is short of memory (the worker's monitor says): buffers let go
   * of are then collected at the next turn, not within a second.
   */
  set pressure(on: boolean) {
    this.#reclaimer.pressure = on;
  }

  /**
   * Bytes values in memory may take from now on, at most the target: the worker's monitor
   * gives the target share of its process less what is not values (executors' working
   * memory, buffers, the runtime), so that values stored while tasks run leave them room.
   * Applied as values are stored and read back; nothing is spilled when it is set.
   */
  set budget(bytes: number) {
    // Never below an eighth of the target: small values stay, whatever the process holds
    // (a worker in a larger program sees that program's memory as its own).
    this.#budget = Math.min(this.#target, Math.max(this.#target / 8, bytes));
  }

  /** Stops its pending work and removes its spill folder: the worker is closing. */
  close(): void {
    this.#reclaimer.close();
    if (this.#dir !== null) {
      try {
        Deno.removeSync(this.#dir, { recursive: true });
      } catch {
        // Removed already, or not ours to remove any more.
      }
      this.#dir = null;
      this.#spilled.clear();
      this.#spilledBytes = 0;
    }
  }

  /** Every key held. */
  keys(): string[] {
    return [...this.#values.keys(), ...this.#spilled.keys()];
  }

  /** The size of `key`'s value, or undefined when it holds none. */
  sizeOf(key: string): number | undefined {
    return this.#nbytes.get(key);
  }

  /** `{ key: nbytes }` for `keys` (all when omitted). */
  nbytes(keys?: readonly string[]): Record<string, number> {
    const out: Record<string, number> = {};
    for (const key of keys ?? this.#nbytes.keys()) {
      const n = this.#nbytes.get(key);
      if (n !== undefined) out[key] = n;
    }
    return out;
  }

  /** Total bytes held, in memory and on disk. */
  totalBytes(): number {
    return this.#memoryBytes + this.#spilledBytes;
  }
}

const spillEncoder = new Encoder();
const spillDecoder = new Decoder();

/** Where a spill file's parts start: page boundaries. */
const SPILL_ALIGN = 4096;

function alignUp(n: number): number {
  return Math.ceil(n / SPILL_ALIGN) * SPILL_ALIGN;
}

function writeAllSync(f: Deno.FsFile, bytes: Uint8Array): void {
  for (let at = 0; at < bytes.byteLength;) at += f.writeSync(bytes.subarray(at));
}

function readExactSync(f: Deno.FsFile, into: Uint8Array): void {
  for (let at = 0; at < into.byteLength;) {
    const n = f.readSync(into.subarray(at));
    if (n === null) throw new Error(`the file ends ${into.byteLength - at} bytes early`);
    at += n;
  }
}

/** The keys that `ref()`s inside `value` refer to (arrays and plain objects searched). */
export function refsIn(value: unknown, out: Set<string> = new Set()): Set<string> {
  if (value instanceof Ref) out.add(value.key);
  else if (Array.isArray(value)) { for (const item of value) refsIn(item, out); }
  else if (isPlainObject(value)) { for (const key in value) refsIn(value[key], out); }
  return out;
}

/** `value` with every `ref()` replaced by what `lookup` gives for its key. */
export function resolveRefs(value: unknown, lookup: (key: string) => unknown): unknown {
  if (value instanceof Ref) return lookup(value.key);
  if (Array.isArray(value)) return value.map((item) => resolveRefs(item, lookup));
  if (isPlainObject(value)) {
    const out: Record<string, unknown> = {};
    for (const key in value) out[key] = resolveRefs(value[key], lookup);
    return out;
  }
  return value;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (typeof v !== "object" || v === null) return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}
