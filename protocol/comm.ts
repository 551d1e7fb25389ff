/**
 * A Comm is one connection that carries calls both ways: requests it sends and the
 * replies to them, and requests it receives, dispatched to handlers. Envelopes:
 *
 *     request   { op, id, args }        a reply is owed to `id`
 *     notice    { op, args }            one-way, no reply
 *     reply     { reply: id, result }   or { reply: id, error: { name, message, stack } }
 *
 * @module
 */

import { type Logger, silentLogger } from "../util/log.ts";
import { Decoder, Encoder } from "./codec.ts";
import {
  BusyError,
  callError,
  ConnectionClosedError,
  ProtocolError,
  type RemoteErrorInfo,
  TimeoutError,
  toRemoteErrorInfo,
} from "./errors.ts";
import { FRAME_BYTES_MAX, MessageReader, MessageWriter, type SharedFrames } from "./framing.ts";
import type { Conn } from "./transport.ts";

/** Most calls one Comm may have waiting for replies. */
export const PENDING_CALLS_MAX = 100_000;
/** Most incoming requests one connection may have running at once. */
export const REQUESTS_IN_FLIGHT_MAX = 10_000;
/**
 * Longest one connection handles messages that are already buffered before it lets the
 * other connections and the timers run: a burst (a large graph in parts) must not keep
 * heartbeats waiting.
 */
export const READ_TURN_MS = 50;
/**
 * A wait for the network this long let the event loop go round (timers and other
 * connections ran). The read loop's clock is Date.now (half performance.now's cost, read
 * at least once a message): a wait it measures at 2 ms took over 1 ms.
 */
const WAITED_MS = 2;
/**
 * Microtasks the read loop waits, after a reply settled a call, for the caller to make
 * its next call before it starts the next read (it stops waiting once one is queued).
 */
const CALLER_TICKS = 4;
/**
 * Bytes one connection may have queued for its peer before it stops reading that
 * peer's requests: a peer that asks and never reads the answers (or reads slowly)
 * holds at most this much of the node's memory, plus one message.
 */
export const WRITE_QUEUE_BYTES_MAX = 32 * 1024 * 1024;
/**
 * Longest a connection over WRITE_QUEUE_BYTES_MAX may go without its peer taking a
 * single byte before it is dropped (nginx's send_timeout): a reader that is slow but
 * reads keeps its connection, one that stopped loses it and its queue.
 */
export const WRITE_STALL_MS = 30_000;

/** Handles a request that arrived: the op name, its raw arguments, the Comm it came on. */
export type Dispatch = (op: string, args: unknown, comm: Comm) => unknown;

/** Options of a Comm. */
export interface CommOptions {
  /** Handles incoming requests; without it, requests get an error reply. */
  dispatch?: Dispatch;
  /** Largest frame (and message) accepted, in bytes. */
  frameBytesMax?: number;
  /** Most calls waiting for replies. */
  pendingCallsMax?: number;
  /** Receive large frames into shared memory (workers do, for their executors), or into what a function gives. */
  sharedFrames?: SharedFrames;
  /** The reader the handshake used: bytes it buffered belong to this connection. */
  reader?: MessageReader;
  /** The largest message the peer accepts (it says so in its hello): larger ones are refused here. */
  peerFrameBytesMax?: number;
  /** Where protocol errors are reported. */
  log?: Logger;
  /** Bytes queued for the peer past which its requests wait (default WRITE_QUEUE_BYTES_MAX). */
  writeQueueBytesMax?: number;
  /** How long the peer may take nothing while the queue is over the limit (default WRITE_STALL_MS). */
  writeStallMs?: number;
  /**
   * What keeps the process alive: "always" (a node's connections), or "busy": only while
   * calls wait for replies or someone `hold()`s it (a client's: a script that forgot
   * `close()` ends when its own work is done).
   */
  keepsAlive?: "always" | "busy";
}

/** Per-call options. */
export interface CallOptions {
  /** Reject with TimeoutError after this long. */
  timeoutMs?: number;
  /** Reject when this aborts. */
  signal?: AbortSignal;
}

interface Pending {
  op: string;
  resolve: (value: unknown) => void;
  reject: (error: unknown) => void;
  cleanup?: () => void;
}

/** The out-of-band buffers of a message that has none. */
const NO_FRAMES: readonly Uint8Array[] = Object.freeze([]);

// One encoder for the whole process: encoding is synchronous, so it is never shared.
const encoder = new Encoder();

/** One connection carrying calls both ways. */
export class Comm {
  /** The underlying connection. */
  readonly conn: Conn;
  /** Resolves once the connection has closed and its read loop has ended. */
  readonly closed: Promise<void>;
  /** Why it closed: null while open or after a clean close. */
  closeReason: Error | null = null;

  #pending = new Map<number, Pending>();
  #nextId = 1;
  #isClosed = false;
  #inFlight = 0;
  #writer: MessageWriter;
  #options: CommOptions;
  #log: Logger;
  #queueBytesMax: number;
  #stallTimer: ReturnType<typeof setTimeout> | undefined;
  /** Holds taken with `hold()` and not yet let go of. */
  #holds = 0;
  /** Whether the connection keeps the process alive now. */
  #refed = true;
  /** A call was settled since the read loop last started a read. */
  #settled = false;

  /** Starts reading `conn` at once. */
  constructor(conn: Conn, options: CommOptions = {}) {
    this.conn = conn;
    this.#options = options;
    this.#log = options.log ?? silentLogger;
    this.#writer = new MessageWriter(conn, { onError: (error) => this.close(error) });
    this.#queueBytesMax = options.writeQueueBytesMax ?? WRITE_QUEUE_BYTES_MAX;
    this.closed = this.#readLoop();
    this.#updateRef();
  }

  /**
   * Keeps the process alive until the returned function is called (once), whatever
   * `keepsAlive` says: a client holds its connection while someone waits for a result.
   */
  hold(): () => void {
    this.#holds++;
    this.#updateRef();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#holds--;
      this.#updateRef();
    };
  }

  #updateRef(): void {
    const ref = this.#options.keepsAlive !== "busy" || this.#holds > 0 || this.#pending.size > 0;
    if (ref === this.#refed || this.#isClosed) return;
    this.#refed = ref;
    this.conn.setRef(ref);
  }

  /** True once closed. */
  get isClosed(): boolean {
    return this.#isClosed;
  }

  /** How many calls wait for replies. */
  get pendingCalls(): number {
    return this.#pending.size;
  }

  /**
   * Sends a request and resolves its reply; rejects with RemoteError if it failed there
   * (BusyError when the peer was too busy to take it).
   */
  call(op: string, args: unknown = {}, options: CallOptions = {}): Promise<unknown> {
    if (this.#isClosed) {
      return Promise.reject(
        new ConnectionClosedError(
          `Cannot call ${op} on ${this.conn.remoteAddress}: the connection is closed`,
          {
            cause: this.closeReason ?? undefined,
          },
        ),
      );
    }
    const max = this.#options.pendingCallsMax ?? PENDING_CALLS_MAX;
    if (this.#pending.size >= max) {
      return Promise.reject(
        new RangeError(`Cannot call ${op}: ${max} calls already wait for replies (the limit)`),
      );
    }
    if (options.signal?.aborted) return Promise.reject(options.signal.reason);
    const id = this.#nextId++;
    let frames: Uint8Array[];
    try {
      frames = this.#encode({ op, id, args }, "args");
    } catch (error) {
      return Promise.reject(error);
    }
    return new Promise((resolve, reject) => {
      const pending: Pending = { op, resolve, reject };
      this.#pending.set(id, pending);
      this.#updateRef();
      const { timeoutMs, signal } = options;
      if (timeoutMs !== undefined || signal) {
        const timer = timeoutMs === undefined ? undefined : setTimeout(() => {
          this.#settle(id)?.reject(
            new TimeoutError(`Call ${op} to ${this.conn.remoteAddress} timed out after ${timeoutMs} ms`),
          );
        }, timeoutMs);
        const onAbort = () => this.#settle(id)?.reject(signal!.reason);
        signal?.addEventListener("abort", onAbort, { once: true });
        pending.cleanup = () => {
          clearTimeout(timer);
          signal?.removeEventListener("abort", onAbort);
        };
      }
      this.#send(frames);
    });
  }

  /** Bytes queued for the peer and not yet written. */
  get queuedBytes(): number {
    return this.#writer.queuedBytes;
  }

  /** Resolves when everything queued so far has been written (or the write failed). */
  flushed(): Promise<void> {
    return this.#writer.flushed();
  }

  /** Sends a one-way message; no reply comes. */
  notify(op: string, args: unknown = {}): void {
    if (this.#isClosed) throw new ConnectionClosedError(`Cannot send ${op}: the connection is closed`);
    this.#send(this.#encode({ op, args }, "args"));
  }

  #send(frames: Uint8Array[]): void {
    this.#writer.send(frames, true);
    if (this.#writer.queuedBytes > this.#queueBytesMax && this.#stallTimer === undefined) this.#watchStall();
  }

  // Starts when the queue goes over its limit and runs until it drains to half of it (where
  // the read loop resumes: stopping sooner would leave a paused peer unwatched for good).
  // A peer that takes nothing for writeStallMs is dropped, with its queue. It looks every
  // half of that and drops on the second look in a row without progress, so a node whose
  // event loop was busy (no write could finish either) does not mistake its own delay for
  // the peer's.
  #watchStall(): void {
    const ms = this.#options.writeStallMs ?? WRITE_STALL_MS;
    let written = this.#writer.writtenBytes;
    let idle = 0;
    const check = () => {
      this.#stallTimer = undefined;
      if (this.#isClosed || this.#writer.queuedBytes <= this.#queueBytesMax / 2) return;
      idle = this.#writer.writtenBytes === written ? idle + 1 : 0;
      written = this.#writer.writtenBytes;
      if (idle >= 2) {
        const message =
          `${this.conn.remoteAddress} took nothing for ${ms} ms while ${this.#writer.queuedBytes} ` +
          `bytes waited for it (the limit is ${this.#queueBytesMax})`;
        this.#log.warn(`Closing connection: ${message}`);
        this.#shutdown(new TimeoutError(`Peer stopped reading: ${message}`));
        return;
      }
      this.#stallTimer = setTimeout(check, ms / 2);
    };
    this.#stallTimer = setTimeout(check, ms / 2);
  }

  /**
   * Closes the connection; every waiting call rejects with ConnectionClosedError.
   * Resolves when the read loop has ended.
   */
  close(reason?: unknown): Promise<void> {
    this.#shutdown(reason);
    return this.closed;
  }

  #shutdown(reason: unknown): void {
    if (this.#isClosed) return;
    this.#isClosed = true;
    if (reason !== undefined) this.closeReason = reason instanceof Error ? reason : new Error(String(reason));
    const error = new ConnectionClosedError(
      `Connection to ${this.conn.remoteAddress} closed${
        this.closeReason ? `: ${this.closeReason.message}` : ""
      }`,
      { cause: this.closeReason ?? undefined },
    );
    for (const id of [...this.#pending.keys()]) this.#settle(id)?.reject(error);
    clearTimeout(this.#stallTimer);
    this.#stallTimer = undefined;
    // What waited for the peer goes now, not when a stuck write returns.
    this.#writer.abort(error);
    this.conn.close();
  }

  // Frame 0 is the encoder's scratch memory: #send hands it to the writer, which copies it.
  #encode(message: Record<string, unknown>, root: string): Uint8Array[] {
    const { head, buffers } = encoder.encode(message, root, true);
    // The peer would close the connection over a message past the limit: refuse it here.
    const max = this.#options.peerFrameBytesMax ?? this.#options.frameBytesMax ?? FRAME_BYTES_MAX;
    let total = head.byteLength;
    for (const b of buffers) total += b.byteLength;
    if (total > max) {
      throw new RangeError(`Cannot send ${root}: the message takes ${total} bytes, over the limit of ${max}`);
    }
    return buffers.length === 0 ? [head] : [head, ...buffers];
  }

  #settle(id: number): Pending | undefined {
    const pending = this.#pending.get(id);
    if (pending === undefined) return undefined;
    this.#settled = true;
    this.#pending.delete(id);
    pending.cleanup?.();
    this.#updateRef();
    return pending;
  }

  async #readLoop(): Promise<void> {
    // Let the constructor finish (and `closed` be assigned) before the first await.
    await Promise.resolve();
    const limits = { frameBytesMax: this.#options.frameBytesMax, sharedFrames: this.#options.sharedFrames };
    const reader = this.#options.reader ?? new MessageReader(this.conn, limits);
    reader.configure(limits);
    const decoder = new Decoder();
    let reason: unknown = undefined;
    try {
      // The turn: how long this loop has held the event loop since it last let it go
      // round (a yield to a timer, or a wait of WAITED_MS or more for the network). A
      // read of bytes the kernel holds already resolves without going round: a client
      // sending a 1M-task graph kept the scheduler deaf for 10 s while reads counted as
      // turns. Shorter waits do not count toward it either, so a connection in steady use
      // yields (setTimeout(0) waits ~2 ms in Deno) only after READ_TURN_MS of handling
      // its messages, not of wall time.
      let turn = Date.now();
      while (!this.#isClosed) {
        // One clock read per message, and one more after a wait (a tiny call's loop runs
        // once per message at each end).
        let now = Date.now();
        // The wall clock stepped back: the turn starts over rather than last that long.
        if (now < turn) turn = now;
        if (now - turn > READ_TURN_MS) {
          await new Promise((resolve) => setTimeout(resolve, 0));
          now = turn = Date.now();
        }
        // Backpressure: a peer whose answers pile up unread is not read until they drain
        // to half the limit (or the stall watch drops it).
        if (this.#writer.queuedBytes > this.#queueBytesMax) {
          await this.#writer.whenBelow(this.#queueBytesMax / 2);
          if (this.#isClosed) break;
          now = turn = Date.now();
        }
        // The head is lent from the reader's buffer: decoded before the next read.
        let frames: Uint8Array[] | null = reader.tryNext(true);
        while (frames === null) {
          // What is queued meanwhile is written before the read starts: starting a read
          // costs the runtime ~1 us, which the peer waiting for that message would wait out
          // too. The writer's drain waits one microtask, queued before this one. After a
          // reply settled a call, the caller's continuation gets a few microtasks to make
          // its next call (its await resumes, its function returns, it calls), which then
          // leaves first as well: ~1 us less per call of a caller that calls in turn.
          if (this.#settled) {
            this.#settled = false;
            for (let tick = 0; tick < CALLER_TICKS && !this.#writer.busy; tick++) await undefined;
          }
          if (this.#writer.busy) await undefined;
          // A small message's bytes are awaited here, straight from the socket; others
          // through next().
          const reading = reader.readSmall();
          let got: number | null = null;
          if (reading === null) frames = await reader.next(true);
          else got = await reading;
          const after = Date.now();
          const waited = after - now;
          turn = waited >= WAITED_MS ? now + waited : turn + waited;
          now = after;
          if (reading === null || !reader.received(got)) break;
          frames = reader.tryNext(true);
        }
        if (frames === null) break;
        let message: unknown = decoder.decode(frames[0], frames.length === 1 ? NO_FRAMES : frames.slice(1));
        // Both dropped before the next read waits: the suspended loop would otherwise keep
        // the last message, and the large values in it, alive while the connection idles.
        frames = null;
        this.#receive(message);
        message = null;
      }
    } catch (error) {
      if (!this.#isClosed) {
        reason = error;
        if (error instanceof ProtocolError) {
          this.#log.warn(`Closing connection from ${this.conn.remoteAddress}: ${error.message}`);
        }
      }
    }
    this.#shutdown(reason);
  }

  #receive(message: unknown): void {
    if (typeof message !== "object" || message === null || Array.isArray(message)) {
      this.#log.warn(`Ignoring a message from ${this.conn.remoteAddress}: not an envelope object`);
      return;
    }
    const m = message as Record<string, unknown>;
    if (typeof m.reply === "number") {
      const pending = this.#settle(m.reply);
      if (pending === undefined) return; // Timed out or aborted already.
      if ("error" in m) pending.reject(callError(pending.op, toInfo(m.error)));
      else pending.resolve(m.result);
      return;
    }
    const id = m.id;
    const hasId = typeof id === "number" && Number.isSafeInteger(id);
    if (typeof m.op !== "string") {
      const problem = `Bad envelope: field "op" must be a string, got ${typeof m.op}`;
      if (hasId) this.#reply(id, undefined, new ProtocolError(problem));
      else this.#log.warn(`Ignoring a message from ${this.conn.remoteAddress}: ${problem}`);
      return;
    }
    if (id !== undefined && !hasId) {
      this.#log.warn(`Ignoring ${m.op} from ${this.conn.remoteAddress}: field "id" must be an integer`);
      return;
    }
    this.#handle(m.op, m.args, hasId ? id : undefined);
  }

  #handle(op: string, args: unknown, id: number | undefined): void {
    const max = REQUESTS_IN_FLIGHT_MAX;
    if (this.#inFlight >= max) {
      if (id !== undefined) {
        this.#reply(id, undefined, new BusyError(`Busy: ${max} calls already run on this connection`));
      }
      return;
    }
    let result: unknown;
    try {
      const dispatch = this.#options.dispatch;
      if (!dispatch) throw new ProtocolError(`Unknown op ${JSON.stringify(op)}: this end serves no ops`);
      result = dispatch(op, args, this);
    } catch (error) {
      this.#failed(op, id, error);
      return;
    }
    // A handler that answers at once is replied to at once: no promise, no extra turn.
    if (!isThenable(result)) {
      if (id !== undefined) this.#reply(id, result);
      return;
    }
    this.#inFlight++;
    Promise.resolve(result).then(
      (value) => {
        this.#inFlight--;
        if (id !== undefined) this.#reply(id, value);
      },
      (error) => {
        this.#inFlight--;
        this.#failed(op, id, error);
      },
    );
  }

  #failed(op: string, id: number | undefined, error: unknown): void {
    if (id !== undefined) this.#reply(id, undefined, error);
    else this.#log.warn(`Notice ${op} from ${this.conn.remoteAddress} failed: ${(error as Error).message}`);
  }

  #reply(id: number, result: unknown, error?: unknown): void {
    if (this.#isClosed) return;
    let frames: Uint8Array[];
    if (error === undefined) {
      try {
        frames = this.#encode({ reply: id, result }, "result");
      } catch (encodeError) {
        frames = this.#encode({ reply: id, error: toRemoteErrorInfo(encodeError) }, "error");
      }
    } else {
      frames = this.#encode({ reply: id, error: toRemoteErrorInfo(error) }, "error");
    }
    this.#send(frames);
  }
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return typeof value === "object" && value !== null &&
    typeof (value as PromiseLike<unknown>).then === "function";
}

function toInfo(error: unknown): RemoteErrorInfo {
  if (typeof error === "object" && error !== null) {
    const e = error as Record<string, unknown>;
    return {
      name: typeof e.name === "string" ? e.name : "Error",
      message: typeof e.message === "string" ? e.message : String(e.message),
      stack: typeof e.stack === "string" ? e.stack : "",
    };
  }
  return { name: "Error", message: String(error), stack: "" };
}
