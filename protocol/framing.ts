/**
 * Bytes <-> messages of frames. A message on the wire is
 *
 *     u32 LE  n              number of frames, 1..MESSAGE_FRAMES_MAX
 *     u64 LE  length[n]      byte length of each frame
 *     bytes   frame[0..n-1]  frame 0 is msgpack; the rest are out-of-band buffers
 *
 * Every length is checked against the limits before anything is allocated.
 *
 * @module
 */

import { BUFFERS_MAX } from "./codec.ts";
import { ConnectionClosedError, ProtocolError } from "./errors.ts";
import { FRAME_BYTES_MAX } from "../util/defaults.ts";

/** Most frames one message may have: the msgpack head and its out-of-band buffers. */
export const MESSAGE_FRAMES_MAX = BUFFERS_MAX + 1;
export { FRAME_BYTES_MAX } from "../util/defaults.ts";
/** How much a reader asks the socket for at once. */
const READ_CHUNK_BYTES = 256 * 1024;
/**
 * The read buffer of a connection still in its handshake: the handshake's messages are
 * tiny, and a stranger who has proved nothing gets no 256 KiB buffer. It grows when the
 * connection is configured for its real limits (or for one larger message).
 */
export const HANDSHAKE_READ_BYTES = 1024;
/**
 * Frames at most this long are copied out of the read buffer; longer ones get their own
 * (shared memory, with `sharedFrames`).
 */
export const SMALL_FRAME_BYTES = 64 * 1024;
/** Frames at most this long are copied into the writer's arena when queued. */
const COPIED_FRAME_BYTES = 16 * 1024;
/** The writer's arena for headers and small frames. */
const ARENA_BYTES = 64 * 1024;
/** The writer's buffer that coalesces small pieces into one write. */
const OUT_BYTES = 256 * 1024;
const NO_BYTES = new Uint8Array(0);

/** The part of a connection that framing reads from. */
export interface ByteReader {
  /** Reads into `p`; resolves the count, or null at end of stream. */
  read(p: Uint8Array): Promise<number | null>;
}

/** The part of a connection that framing writes to. */
export interface ByteWriter {
  /** Writes some prefix of `p`; resolves how many bytes were written. */
  write(p: Uint8Array): Promise<number>;
}

/** The header that precedes `frames` on the wire. */
export function frameHeader(frames: readonly Uint8Array[]): Uint8Array {
  const header = new Uint8Array(4 + 8 * frames.length);
  putFrameHeader(new DataView(header.buffer), 0, frames);
  return header;
}

/** Writes the header of `frames` into `view` at `at` (it takes 4 + 8 * frames.length bytes). */
function putFrameHeader(view: DataView, at: number, frames: readonly Uint8Array[]): void {
  view.setUint32(at, frames.length, true);
  for (let i = 0; i < frames.length; i++) {
    const n = frames[i].byteLength;
    view.setUint32(at + 4 + 8 * i, n >>> 0, true);
    view.setUint32(at + 8 + 8 * i, Math.floor(n / 0x100000000), true);
  }
}

/**
 * Where large frames land: their own ArrayBuffer (false), their own SharedArrayBuffer
 * (true), or shared memory a function gives for a frame of that many bytes (a worker's
 * pool of reused memory; the frame overwrites all of it).
 */
export type SharedFrames = boolean | ((bytes: number) => SharedArrayBuffer);

/** Reads whole messages (arrays of frames) from a byte stream. */
export class MessageReader {
  #source: ByteReader;
  #frameBytesMax: number;
  #sharedFrames: SharedFrames;
  #buf: Uint8Array;
  // A view of #buf, made again only when #buf is replaced: not one per message.
  #view: DataView;
  #start = 0;
  #end = 0;
  /** The bytes the message `readSmall` reads for takes (for the error if the stream ends). */
  #wanted = 0;

  /**
   * Reads from `source`; frames (and messages) over `frameBytesMax` are refused. With
   * `sharedFrames`, large frames land in SharedArrayBuffers, which executors read
   * without a copy. `readBytes` is the read buffer's first size (default 256 KiB).
   */
  constructor(
    source: ByteReader,
    options: { frameBytesMax?: number; sharedFrames?: SharedFrames; readBytes?: number } = {},
  ) {
    this.#source = source;
    this.#frameBytesMax = options.frameBytesMax ?? FRAME_BYTES_MAX;
    this.#sharedFrames = options.sharedFrames ?? false;
    this.#buf = new Uint8Array(options.readBytes ?? READ_CHUNK_BYTES);
    this.#view = new DataView(this.#buf.buffer);
  }

  #setBuffer(next: Uint8Array): void {
    this.#buf = next;
    this.#view = new DataView(next.buffer);
  }

  /** The read buffer's size, in bytes: what this reader holds while it waits. */
  get bufferBytes(): number {
    return this.#buf.length;
  }

  /**
   * Changes the limits for the messages still to come: a connection reads its
   * handshake under a tight limit and a small buffer, then the node's own.
   */
  configure(options: { frameBytesMax?: number; sharedFrames?: SharedFrames }): void {
    this.#frameBytesMax = options.frameBytesMax ?? FRAME_BYTES_MAX;
    this.#sharedFrames = options.sharedFrames ?? false;
    if (this.#buf.length < READ_CHUNK_BYTES) {
      const next = new Uint8Array(READ_CHUNK_BYTES);
      next.set(this.#buf.subarray(this.#start, this.#end));
      this.#end -= this.#start;
      this.#start = 0;
      this.#setBuffer(next);
    }
  }

  /**
   * The next message if it is already whole in the buffer (and needs no large frame),
   * without waiting: a reader drains a burst of small messages in one turn, so the
   * replies to all of them leave in one write. Null when more bytes are needed; throws
   * like `next()` on a bad header. With `borrowHead`, see `next()`.
   */
  tryNext(borrowHead = false): Uint8Array[] | null {
    const need = this.#smallNeeds();
    return need !== 0 && this.#end - this.#start >= need ? this.#take(borrowHead) : null;
  }

  /** Takes the next message, small and whole in the buffer (`#smallNeeds` said so). */
  #take(borrowHead: boolean): Uint8Array[] {
    const view = this.#view;
    const count = view.getUint32(this.#start, true);
    let at = this.#start + 4 + 8 * count;
    const frames: Uint8Array[] = new Array(count);
    for (let i = 0; i < count; i++) {
      const n = view.getUint32(this.#start + 4 + 8 * i, true);
      frames[i] = i === 0 && borrowHead ? this.#buf.subarray(at, at + n) : this.#buf.slice(at, at + n);
      at += n;
    }
    this.#start = at;
    return frames;
  }

  /**
   * For a read loop that awaits the socket itself (one await a read, the least a tiny
   * call's path can take): when the next message is small and not yet whole, starts the
   * read that brings more of it and returns its promise. Give what it resolves to
   * `received`, then try `tryNext` again. Null when the message is whole already or must
   * go through `next()` (a large frame, a bad header, one past the limits).
   */
  readSmall(): Promise<number | null> | null {
    const need = this.#smallNeeds();
    const available = this.#end - this.#start;
    if (need === 0 || need > this.#buf.length || available >= need) return null;
    this.#wanted = need;
    if (available === 0) {
      // All taken: the read lands at the start, into the buffer itself (no view to make).
      this.#start = this.#end = 0;
      return this.#source.read(this.#buf);
    }
    this.#makeRoom(need);
    return this.#source.read(this.#buf.subarray(this.#end));
  }

  /**
   * Takes in what the read `readSmall` started gave. False when the stream ended
   * between messages; throws ConnectionClosedError when it ended inside one.
   */
  received(got: number | null): boolean {
    if (got !== null) {
      this.#end += got;
      return true;
    }
    if (this.#end === this.#start) return false;
    throw new ConnectionClosedError(
      `Connection closed inside a message (${this.#end - this.#start} of ${this.#wanted} bytes)`,
    );
  }

  /**
   * The next message's frames, or null when the stream ends between messages.
   * Throws ProtocolError on a bad header and ConnectionClosedError when the stream
   * ends inside a message.
   *
   * With `borrowHead`, frame 0 of a message may be a view of the read buffer instead of
   * a copy: the caller must be done with it (decode it) before it reads again. That
   * spares an allocation per message, most of what a tiny call costs past the syscalls.
   */
  async next(borrowHead = false): Promise<Uint8Array[] | null> {
    // A small message is read whole, then taken as tryNext takes it: one wait per read,
    // not one per header and frame (a tiny call's reply waited through four).
    for (;;) {
      const frames = this.tryNext(borrowHead);
      if (frames !== null) return frames;
      const reading = this.readSmall();
      if (reading === null) break;
      if (!this.received(await reading)) return null;
    }
    if (!(await this.#fill(4, true))) return null;
    const count = this.#view.getUint32(this.#start, true);
    if (count < 1 || count > MESSAGE_FRAMES_MAX) {
      throw new ProtocolError(`Bad frame header: ${count} frames (1 to ${MESSAGE_FRAMES_MAX} allowed)`);
    }
    await this.#fill(4 + 8 * count, false);
    const view = this.#view;
    const lengths: number[] = new Array(count);
    let total = 0;
    for (let i = 0; i < count; i++) {
      const at = this.#start + 4 + 8 * i;
      const lo = view.getUint32(at, true);
      const hi = view.getUint32(at + 4, true);
      const n = hi * 0x100000000 + lo;
      if (hi >= 0x200000 || n > this.#frameBytesMax) {
        throw new ProtocolError(
          `Frame too large: frame ${i} declares ${
            hi >= 0x200000 ? "over 2^53" : n
          } bytes (the limit is ${this.#frameBytesMax})`,
        );
      }
      total += n;
      lengths[i] = n;
    }
    if (total > this.#frameBytesMax) {
      throw new ProtocolError(
        `Message too large: ${total} bytes in frames (the limit is ${this.#frameBytesMax})`,
      );
    }
    this.#start += 4 + 8 * count;
    const frames: Uint8Array[] = new Array(count);
    // A later frame's read may move the buffer's bytes: only a lone frame is lent.
    const borrow = borrowHead && count === 1;
    for (let i = 0; i < count; i++) frames[i] = await this.#frame(lengths[i], borrow);
    return frames;
  }

  /**
   * The bytes the next message takes, header and frames, when its frames are all small
   * and within the limits (or what its header needs, while that is not whole); 0 when it
   * goes the general way: a large frame, one past the limits, a bad header (which next()
   * reports).
   */
  #smallNeeds(): number {
    const available = this.#end - this.#start;
    if (available < 4) return 4;
    const view = this.#view;
    const count = view.getUint32(this.#start, true);
    if (count < 1 || count > MESSAGE_FRAMES_MAX) return 0;
    const headerBytes = 4 + 8 * count;
    if (available < headerBytes) return headerBytes;
    let total = 0;
    for (let i = 0; i < count; i++) {
      const at = this.#start + 4 + 8 * i;
      const n = view.getUint32(at + 4, true) * 0x100000000 + view.getUint32(at, true);
      if (n > SMALL_FRAME_BYTES || n > this.#frameBytesMax) return 0;
      total += n;
    }
    return total > this.#frameBytesMax ? 0 : headerBytes + total;
  }

  async #frame(n: number, borrow: boolean): Promise<Uint8Array> {
    if (n <= SMALL_FRAME_BYTES) {
      await this.#fill(n, false);
      const out = borrow
        ? this.#buf.subarray(this.#start, this.#start + n)
        : this.#buf.slice(this.#start, this.#start + n);
      this.#start += n;
      return out;
    }
    // A large frame is read straight into memory of its own: one copy, kernel to frame.
    const shared = this.#sharedFrames;
    const out = new Uint8Array(
      typeof shared === "function" ? shared(n) : shared ? new SharedArrayBuffer(n) : new ArrayBuffer(n),
    );
    const buffered = Math.min(n, this.#end - this.#start);
    out.set(this.#buf.subarray(this.#start, this.#start + buffered));
    this.#start += buffered;
    let filled = buffered;
    while (filled < n) {
      const got = await this.#source.read(out.subarray(filled));
      if (got === null) {
        throw new ConnectionClosedError(`Connection closed inside a frame (${filled} of ${n} bytes)`);
      }
      filled += got;
    }
    return out;
  }

  /** Moves what is buffered to the start (or to a larger buffer) if `n` bytes from #start would not fit. */
  #makeRoom(n: number): void {
    if (this.#start + n <= this.#buf.length) return;
    if (n <= this.#buf.length) this.#buf.copyWithin(0, this.#start, this.#end);
    else {
      const next = new Uint8Array(n);
      next.set(this.#buf.subarray(this.#start, this.#end));
      this.#setBuffer(next);
    }
    this.#end -= this.#start;
    this.#start = 0;
  }

  /** Makes `n` bytes available at #start; false only if `eofOk` and the stream ended clean. */
  async #fill(n: number, eofOk: boolean): Promise<boolean> {
    if (this.#end - this.#start >= n) return true;
    this.#makeRoom(n);
    while (this.#end - this.#start < n) {
      const got = await this.#source.read(this.#buf.subarray(this.#end));
      if (got === null) {
        if (eofOk && this.#end === this.#start) return false;
        throw new ConnectionClosedError(
          `Connection closed inside a message (${this.#end - this.#start} of ${n} bytes)`,
        );
      }
      this.#end += got;
    }
    return true;
  }
}

/**
 * Writes messages, coalescing small pieces into one write and passing large ones
 * through untouched, so a 256 MiB buffer is never copied on the way out.
 */
export class MessageWriter {
  #sink: ByteWriter;
  #queue: Uint8Array[] = [];
  #queuedBytes = 0;
  #writtenBytes = 0;
  #writing: Promise<void> | null = null;
  #error: unknown = null;
  // Allocated when first needed: a connection that never coalesces (or never writes)
  // holds neither.
  #out: Uint8Array | null = null;
  // Headers and small frames are copied here when queued, and written from here: no
  // allocation per message. Reused from the start once everything queued is written.
  #arena = NO_BYTES;
  #arenaView = new DataView(NO_BYTES.buffer);
  #arenaUsed = 0;
  #below: { bytes: number; resolve: () => void } | null = null;
  #onError: ((error: unknown) => void) | undefined;

  /**
   * Writes to `sink`. `onError` hears of a failed write once (a connection closes on
   * it), whoever else waits: then `send` needs no promise per message.
   */
  constructor(sink: ByteWriter, options: { onError?: (error: unknown) => void } = {}) {
    this.#sink = sink;
    this.#onError = options.onError;
  }

  /** Bytes queued and not yet written. */
  get queuedBytes(): number {
    return this.#queuedBytes;
  }

  /** True while messages are queued or being written. */
  get busy(): boolean {
    return this.#writing !== null;
  }

  /** Bytes written so far: whether a slow reader still takes anything. */
  get writtenBytes(): number {
    return this.#writtenBytes;
  }

  /**
   * Resolves once at most `bytes` are queued, or the writer failed or was aborted. One
   * waiter at a time (a connection's read loop).
   */
  whenBelow(bytes: number): Promise<void> {
    if (this.#queuedBytes <= bytes || this.#error) return Promise.resolve();
    return new Promise((resolve) => this.#below = { bytes, resolve });
  }

  /**
   * Drops everything queued and refuses further writes: the connection is closing, and
   * what waited for its reader is released now, not when a stuck write returns.
   */
  abort(reason: unknown): void {
    if (this.#error === null) this.#error = reason ?? new Error("The writer was aborted");
    this.#queue = [];
    this.#queuedBytes = 0;
    this.#arena = NO_BYTES;
    this.#arenaView = new DataView(NO_BYTES.buffer);
    this.#arenaUsed = 0;
    this.#out = null;
    this.#wake();
  }

  #wake(): void {
    const below = this.#below;
    if (below !== null && (this.#queuedBytes <= below.bytes || this.#error)) {
      this.#below = null;
      below.resolve();
    }
  }

  /**
   * Queues a message; resolves when it is written (callers may ignore that). Rejects if
   * the stream fails. Frames up to 16 KiB are copied at once, larger ones are written
   * later from where they are, so their memory must stay as it is until then. With
   * `headIsScratch`, frame 0 is memory its caller will reuse (an encoder's): it is copied
   * whatever its size.
   */
  write(frames: readonly Uint8Array[], headIsScratch = false): Promise<void> {
    if (this.#error) return Promise.reject(this.#error);
    this.#enqueue(frames, headIsScratch);
    const written = this.#writing!.then(() => {
      if (this.#error) throw this.#error;
    });
    // Callers may ignore the promise; the failure still reaches whoever awaits it.
    written.catch(() => {});
    return written;
  }

  /**
   * Queues a message as `write` does, with no promise for it: a failure goes to the
   * `onError` given at construction (a writer that failed already drops it).
   */
  send(frames: readonly Uint8Array[], headIsScratch = false): void {
    if (!this.#error) this.#enqueue(frames, headIsScratch);
  }

  #enqueue(frames: readonly Uint8Array[], headIsScratch: boolean): void {
    const headerBytes = 4 + 8 * frames.length;
    let copied = headerBytes;
    for (const f of frames) if (f.byteLength <= COPIED_FRAME_BYTES) copied += f.byteLength;
    if (this.#arenaUsed + copied > this.#arena.length) {
      // Pieces queued so far keep the old arena alive until they are written.
      this.#newArena(Math.max(ARENA_BYTES, copied));
    }
    const arena = this.#arena;
    let run = this.#arenaUsed;
    let at = run;
    putFrameHeader(this.#arenaView, at, frames);
    at += headerBytes;
    for (let i = 0; i < frames.length; i++) {
      const f = frames[i];
      if (f.byteLength <= COPIED_FRAME_BYTES) {
        arena.set(f, at);
        at += f.byteLength;
        continue;
      }
      if (at > run) this.#queue.push(arena.subarray(run, at));
      this.#queue.push(i === 0 && headIsScratch ? f.slice() : f);
      this.#queuedBytes += f.byteLength;
      run = at;
    }
    if (at > run) this.#queue.push(arena.subarray(run, at));
    this.#queuedBytes += copied;
    this.#arenaUsed = at;
    // The drain never rejects: a failure is kept in #error and told to onError.
    this.#writing ??= this.#drain();
  }

  /** Resolves when the queue is empty, whether the writes succeeded or not. */
  flushed(): Promise<void> {
    return this.#writing ?? Promise.resolve();
  }

  async #drain(): Promise<void> {
    // Let the rest of this turn queue its messages too: one write for all of them.
    await Promise.resolve();
    try {
      while (this.#queue.length > 0) {
        // Take the whole queue and walk it by index: shift() on a long array copies the
        // rest each time, quadratic when a turn queues many messages (a release of 1M keys).
        // Messages queued meanwhile wait in the fresh queue, in order.
        const batch = this.#queue;
        this.#queue = [];
        let i = 0;
        while (i < batch.length) {
          if (this.#error) throw this.#error; // aborted while a write was under way
          const first = batch[i];
          // A large piece, or the last one alone, is written from where it is.
          if (first.byteLength > OUT_BYTES / 2 || i === batch.length - 1) {
            i++;
            // Written here, not through a helper: one await per write, no view of all of it.
            let done = await this.#sink.write(first);
            while (done < first.byteLength) done += await this.#sink.write(first.subarray(done));
            this.#wrote(first.byteLength);
            continue;
          }
          const out = this.#out ??= new Uint8Array(OUT_BYTES);
          let n = 0;
          while (i < batch.length && n + batch[i].byteLength <= out.length) {
            const piece = batch[i++];
            out.set(piece, n);
            n += piece.byteLength;
          }
          let done = 0;
          while (done < n) done += await this.#sink.write(out.subarray(done, n));
          this.#wrote(n);
        }
      }
      if (this.#error) throw this.#error;
      // Everything queued has left: the arena starts over (at its usual size).
      if (this.#arena.length > ARENA_BYTES) this.#newArena(ARENA_BYTES);
      this.#arenaUsed = 0;
    } catch (error) {
      const first = this.#error === null;
      this.abort(error);
      if (first) this.#onError?.(error);
    } finally {
      this.#writing = null;
    }
  }

  #wrote(n: number): void {
    if (this.#error !== null) return; // aborted meanwhile: the queue is gone already
    this.#queuedBytes -= n;
    this.#writtenBytes += n;
    if (this.#below !== null) this.#wake();
  }

  #newArena(bytes: number): void {
    this.#arena = new Uint8Array(bytes);
    this.#arenaView = new DataView(this.#arena.buffer);
    this.#arenaUsed = 0;
  }
}
