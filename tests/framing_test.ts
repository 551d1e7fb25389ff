/**
 * Unit tests for protocol/framing.ts on in-memory streams: the header layout, messages
 * read back whatever way the bytes arrive, the writer's coalescing and pass-through,
 * end of stream, limits, and failure.
 */

import assert from "node:assert/strict";
import { Decoder, Encoder, INLINE_BYTES_MAX } from "../protocol/codec.ts";
import { ConnectionClosedError, ProtocolError } from "../protocol/errors.ts";
import {
  type ByteReader,
  type ByteWriter,
  FRAME_BYTES_MAX,
  frameHeader,
  MESSAGE_FRAMES_MAX,
  MessageReader,
  MessageWriter,
} from "../protocol/framing.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

// ---------------------------------------------------------------------------------------
// In-memory streams

/**
 * Serves `data` in reads of at most `chunk(readNumber)` bytes, then null (or, with
 * `onEnd: "throw"`, an error: a reader that must not be asked for more).
 */
class ChunkReader implements ByteReader {
  reads = 0;
  #data: Uint8Array;
  #chunk: (read: number) => number;
  #onEnd: "eof" | "throw";
  #pos = 0;

  constructor(
    data: Uint8Array,
    options: { chunk?: (read: number) => number; onEnd?: "eof" | "throw" } = {},
  ) {
    this.#data = data;
    this.#chunk = options.chunk ?? (() => Infinity);
    this.#onEnd = options.onEnd ?? "eof";
  }

  get served(): number {
    return this.#pos;
  }

  read(p: Uint8Array): Promise<number | null> {
    this.reads++;
    assert.ok(p.length > 0, "the reader never asks for zero bytes");
    if (this.#pos >= this.#data.length) {
      if (this.#onEnd === "throw") return Promise.reject(new Error("read past the bytes provided"));
      return Promise.resolve(null);
    }
    const n = Math.min(p.length, this.#data.length - this.#pos, Math.max(1, this.#chunk(this.reads)));
    p.set(this.#data.subarray(this.#pos, this.#pos + n));
    this.#pos += n;
    return Promise.resolve(n);
  }
}

/** Accepts at most `maxPerWrite` bytes a call; keeps the views it was given and copies of the bytes. */
class LimitedWriter implements ByteWriter {
  /** The very views passed to write (not copies). */
  calls: Uint8Array[] = [];
  #chunks: Uint8Array[] = [];
  #maxPerWrite: number;

  constructor(maxPerWrite = Infinity) {
    this.#maxPerWrite = maxPerWrite;
  }

  write(p: Uint8Array): Promise<number> {
    this.calls.push(p);
    const n = Math.min(p.length, this.#maxPerWrite);
    this.#chunks.push(p.slice(0, n)); // the writer may reuse p once this resolves
    return Promise.resolve(n);
  }

  bytes(): Uint8Array {
    return concat(this.#chunks);
  }
}

function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let at = 0;
  for (const p of parts) (out.set(p, at), at += p.byteLength);
  return out;
}

/** xorshift32: seeded, so a failure can be replayed. */
function xorshift32(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

function patterned(n: number, salt: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 131 + salt * 17 + (i >> 9)) & 0xff;
  return out;
}

/** The bytes of a message as the wire carries it (the header itself is checked separately). */
function wire(...messages: Uint8Array[][]): Uint8Array {
  return concat(messages.flatMap((frames) => [frameHeader(frames), ...frames]));
}

/** A raw header: `count`, then each length as [lo, hi] u32 pairs. */
function rawHeader(count: number, lengths: [number, number][]): Uint8Array {
  const out = new Uint8Array(4 + 8 * lengths.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, count, true);
  lengths.forEach(([lo, hi], i) => {
    view.setUint32(4 + 8 * i, lo, true);
    view.setUint32(8 + 8 * i, hi, true);
  });
  return out;
}

async function readAll(reader: MessageReader): Promise<Uint8Array[][]> {
  const out: Uint8Array[][] = [];
  for (let m = await reader.next(); m !== null; m = await reader.next()) out.push(m);
  return out;
}

async function assertRejects(
  promise: Promise<unknown>,
  ErrorClass: new (...args: never[]) => Error,
  pattern: RegExp,
): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof ErrorClass, `expected ${ErrorClass.name}, got ${String(error)}`);
    assert.match(error.message, pattern);
    return error;
  }
  assert.fail(`expected ${ErrorClass.name} matching ${pattern}, but it resolved`);
}

// Frames up to 64 KiB are copied out of the read buffer; longer ones are read on their own.
const SMALL_FRAME_BYTES = 64 * 1024;
const MiB = 1024 * 1024;

/** Messages that exercise every path: one frame, several, empty, large, at the boundary. */
function sampleMessages(): Uint8Array[][] {
  return [
    [Uint8Array.of(1, 2, 3)],
    [patterned(10, 1), patterned(300, 2), patterned(70, 3)],
    [new Uint8Array(0)],
    [new Uint8Array(0), patterned(5, 4), new Uint8Array(0)],
    [patterned(MiB, 5)],
    [patterned(SMALL_FRAME_BYTES, 6), patterned(SMALL_FRAME_BYTES + 1, 7)],
    // Bigger than the reader's 256 KiB buffer, in frames small enough to be buffered.
    Array.from({ length: 5 }, (_, i) => patterned(60 * 1024, 8 + i)),
    [patterned(1, 20)],
  ];
}

// ---------------------------------------------------------------------------------------
// frameHeader

Deno.test("framing: frameHeader is u32 LE count then u64 LE lengths", () => {
  assert.deepEqual(frameHeader([]), Uint8Array.of(0, 0, 0, 0));
  assert.deepEqual(
    frameHeader([new Uint8Array(3)]),
    Uint8Array.of(1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0),
  );
  // Only byteLength is read, so lengths too large to allocate can be checked too.
  const fake = (byteLength: number) => ({ byteLength }) as Uint8Array;
  const header = frameHeader([
    fake(0),
    fake(0x01020304),
    fake(2 ** 32 - 1),
    fake(2 ** 32 + 5),
    fake(0x0a0b_0c0d_0e0f),
    fake(Number.MAX_SAFE_INTEGER),
  ]);
  assert.deepEqual(
    header,
    Uint8Array.of(
      ...[6, 0, 0, 0],
      ...[0, 0, 0, 0, 0, 0, 0, 0],
      ...[0x04, 0x03, 0x02, 0x01, 0, 0, 0, 0],
      ...[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
      ...[5, 0, 0, 0, 1, 0, 0, 0],
      ...[0x0f, 0x0e, 0x0d, 0x0c, 0x0b, 0x0a, 0, 0],
      ...[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0],
    ),
  );
});

Deno.test("framing: frameHeader uses the view's byteLength, not its buffer's", () => {
  const backing = new Uint8Array(100);
  const header = frameHeader([backing.subarray(10, 17), new Uint8Array(backing.buffer, 21, 6)]);
  const view = new DataView(header.buffer);
  assert.equal(view.getUint32(0, true), 2);
  assert.equal(view.getBigUint64(4, true), 7n);
  assert.equal(view.getBigUint64(12, true), 6n);
});

// ---------------------------------------------------------------------------------------
// Round trips

async function writeMessages(messages: Uint8Array[][], maxPerWrite = Infinity): Promise<Uint8Array> {
  const sink = new LimitedWriter(maxPerWrite);
  const writer = new MessageWriter(sink);
  const done = messages.map((m) => writer.write(m));
  await Promise.all(done);
  await writer.flushed();
  assert.equal(writer.queuedBytes, 0);
  return sink.bytes();
}

async function assertReadsBack(
  bytes: Uint8Array,
  messages: Uint8Array[][],
  chunk: (read: number) => number,
  label: string,
): Promise<void> {
  const source = new ChunkReader(bytes, { chunk });
  const got = await readAll(new MessageReader(source));
  assert.equal(got.length, messages.length, `${label}: message count`);
  for (let m = 0; m < messages.length; m++) {
    assert.equal(got[m].length, messages[m].length, `${label}: frames in message ${m}`);
    for (let f = 0; f < messages[m].length; f++) {
      assert.deepEqual(got[m][f], messages[m][f], `${label}: message ${m} frame ${f}`);
    }
  }
  assert.equal(source.served, bytes.length, `${label}: every byte consumed`);
}

Deno.test("framing: the writer's bytes are exactly header then frames, message after message", async () => {
  const messages = sampleMessages();
  const bytes = await writeMessages(messages);
  assert.deepEqual(bytes, wire(...messages));
  // And a hand-checked one.
  assert.deepEqual(
    await writeMessages([[Uint8Array.of(0xaa)], [new Uint8Array(0), Uint8Array.of(1, 2)]]),
    Uint8Array.of(
      ...[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xaa],
      ...[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 2],
    ),
  );
});

Deno.test("framing: messages read back when all bytes arrive at once", async () => {
  const messages = sampleMessages();
  await assertReadsBack(await writeMessages(messages), messages, () => Infinity, "all at once");
});

Deno.test("framing: messages read back one byte per read", async () => {
  const messages = sampleMessages();
  await assertReadsBack(await writeMessages(messages), messages, () => 1, "one byte per read");
});

Deno.test("framing: messages read back in random chunk sizes", async () => {
  const messages = sampleMessages();
  const bytes = await writeMessages(messages);
  for (const seed of [1, 0xdeadbeef, 20240601, 7, 99, 123456789]) {
    const next = xorshift32(seed);
    // Mostly tiny chunks, some mid-sized, the odd huge one: splits land everywhere.
    const chunk = () => {
      const r = next();
      return r % 8 === 0 ? 1 + (r >>> 8) % 300_000 : r % 8 < 4 ? 1 + (r >>> 8) % 8192 : 1 + (r >>> 8) % 64;
    };
    await assertReadsBack(bytes, messages, chunk, `random chunks, seed ${seed}`);
  }
});

Deno.test("framing: messages survive a sink that takes a few bytes per write", async () => {
  const messages = sampleMessages();
  for (const max of [1, 7, 4096, 100_000]) {
    // A byte or a few at a time over a whole MiB would only make the test slow.
    const limit = max === 1 ? 1000 : max === 7 ? 300_000 : Infinity;
    const small = messages.filter((m) => m.every((f) => f.length < limit));
    const bytes = await writeMessages(small, max);
    assert.deepEqual(bytes, wire(...small), `${max} bytes per write`);
    await assertReadsBack(bytes, small, () => 997, `${max} bytes per write`);
  }
});

Deno.test("framing: MESSAGE_FRAMES_MAX frames in one message", async () => {
  const frames = Array.from({ length: MESSAGE_FRAMES_MAX }, (_, i) => patterned(i % 5, i));
  const bytes = await writeMessages([frames]);
  await assertReadsBack(bytes, [frames], () => 1, "1024 frames, one byte per read");
  await assertReadsBack(bytes, [frames], () => Infinity, "1024 frames at once");
});

Deno.test("framing: frames read earlier are not overwritten by later reads", async () => {
  const first = [patterned(1000, 1), patterned(10, 2)];
  const firstCopy = first.map((f) => f.slice());
  const filler = Array.from(
    { length: 4 },
    (_, i) => [patterned(60 * 1024, 10 + i), patterned(50_000, 20 + i)],
  );
  const reader = new MessageReader(new ChunkReader(wire(first, ...filler)));
  const got = await reader.next();
  assert.ok(got);
  for (let i = 0; i < filler.length; i++) assert.deepEqual(await reader.next(), filler[i]);
  assert.deepEqual(got, firstCopy, "a small frame is its own copy, not a view of the read buffer");
  assert.equal(await reader.next(), null);
});

Deno.test("framing: a lent head is a view of the read buffer; other frames are always copies", async () => {
  const one = [patterned(40, 1)];
  const two = [patterned(30, 2), patterned(20, 3)];
  // Waiting for bytes (next) and already buffered (tryNext), lent and not.
  const reader = new MessageReader(new ChunkReader(wire(one, two, one, two, one)));
  const lent = await reader.next(true);
  assert.ok(lent);
  assert.deepEqual(lent, one);
  const buffered = reader.tryNext(true);
  assert.ok(buffered);
  assert.deepEqual(buffered, two);
  assert.equal(buffered[0].buffer, lent[0].buffer, "both heads are views of one read buffer");
  assert.notEqual(buffered[1].buffer, lent[0].buffer, "a frame after the head is its own copy");
  const owned = reader.tryNext();
  assert.ok(owned);
  assert.deepEqual(owned, one);
  assert.notEqual(owned[0].buffer, lent[0].buffer, "without lending, the head is a copy");

  // A small message trickling in byte by byte is read whole, then lent like a buffered one.
  const multi = new MessageReader(new ChunkReader(wire(two, one), { chunk: () => 1 }));
  const frames = await multi.next(true);
  assert.ok(frames);
  assert.deepEqual(frames, two);
  assert.notEqual(frames[0].byteLength, frames[0].buffer.byteLength, "the head is a view");
  assert.deepEqual(await multi.next(true), one, "the next message reads on after it");
  // Behind a large frame, read into its own memory after the head, the head is a copy:
  // reading the large frame may move the buffered bytes.
  const large = [patterned(30, 4), patterned(SMALL_FRAME_BYTES + 1, 5)];
  const behind = new MessageReader(new ChunkReader(wire(large), { chunk: () => 1000 }));
  const read = await behind.next(true);
  assert.ok(read);
  assert.deepEqual(read, large);
  assert.equal(
    read[0].byteLength,
    read[0].buffer.byteLength,
    "the head of a message with a large frame is a copy",
  );
});

Deno.test("framing: queued small frames are copied at once; the caller may reuse their memory", async () => {
  const sink = new LimitedWriter();
  const writer = new MessageWriter(sink);
  const scratch = patterned(100, 1);
  const expected = scratch.slice();
  const written = writer.write([scratch]);
  scratch.fill(0); // before the writer's turn
  // A scratch head larger than what is copied by default is copied too.
  const bigScratch = patterned(100_000, 2);
  const bigExpected = bigScratch.slice();
  const bigWritten = writer.write([bigScratch], true);
  bigScratch.fill(0);
  await Promise.all([written, bigWritten]);
  assert.deepEqual(sink.bytes(), wire([expected], [bigExpected]));
});

Deno.test("framing: the writer's arena is reused once all is written and never overwrites queued bytes", async () => {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => release = resolve);
  const chunks: Uint8Array[] = [];
  const seen: Uint8Array[] = [];
  let calls = 0;
  const sink: ByteWriter = {
    async write(p) {
      calls++;
      if (calls === 1) await gate;
      seen.push(p);
      chunks.push(p.slice());
      return p.length;
    },
  };
  const writer = new MessageWriter(sink);
  // While the first write waits, queue over 64 KiB of small messages (more than one arena),
  // some with a large frame between small ones.
  const messages: Uint8Array[][] = [[patterned(10, 0)]];
  const first = writer.write(messages[0]);
  await Promise.resolve();
  await Promise.resolve();
  const more: Promise<void>[] = [];
  for (let i = 1; i < 60; i++) {
    const m = i % 20 === 0
      ? [patterned(50, i), patterned(300_000, i), patterned(7, i)]
      : [patterned(4000, i)];
    messages.push(m);
    more.push(writer.write(m.map((f) => f.slice())));
  }
  release();
  await Promise.all([first, ...more]);
  assert.deepEqual(concat(chunks), wire(...messages));
  assert.equal(writer.queuedBytes, 0);

  // Idle again: the next tiny messages are written from the same memory as before.
  seen.length = 0;
  await writer.write([patterned(5, 1)]);
  await writer.write([patterned(6, 2)]);
  assert.equal(seen.length, 2);
  assert.equal(seen[0].buffer, seen[1].buffer, "one arena serves message after message");
  assert.equal(seen[0].byteOffset, seen[1].byteOffset, "from its start each time");
});

Deno.test("framing: codec and framing together carry a value with out-of-band buffers", async () => {
  const encoder = new Encoder();
  const value = { op: "put", data: new Float64Array(INLINE_BYTES_MAX).fill(1.25), small: Uint8Array.of(4) };
  const { head, buffers } = encoder.encode(value);
  assert.equal(buffers.length, 1);
  const bytes = await writeMessages([[head, ...buffers], [encoder.encode("bye").head]]);
  const reader = new MessageReader(new ChunkReader(bytes, { chunk: (i) => (i * 7919) % 5000 }));
  const decoder = new Decoder();
  const first = await reader.next();
  assert.ok(first);
  assert.deepEqual(decoder.decode(first[0], first.slice(1)), value);
  const second = await reader.next();
  assert.ok(second);
  assert.equal(decoder.decode(second[0], second.slice(1)), "bye");
  assert.equal(await reader.next(), null);
});

// ---------------------------------------------------------------------------------------
// End of stream

/** Reads every message as a Comm's read loop does: tryNext, else readSmall and received, else next. */
async function readAllAsLoop(reader: MessageReader): Promise<Uint8Array[][]> {
  const out: Uint8Array[][] = [];
  for (;;) {
    let frames = reader.tryNext();
    while (frames === null) {
      const reading = reader.readSmall();
      if (reading === null) {
        frames = await reader.next();
        break;
      }
      if (!reader.received(await reading)) return out;
      frames = reader.tryNext();
    }
    if (frames === null) return out;
    out.push(frames);
  }
}

Deno.test("framing: a loop of tryNext, readSmall and received reads what next() reads, however the bytes arrive", async () => {
  const messages = sampleMessages();
  for (const seed of [1, 2, 3]) {
    const rand = xorshift32(seed);
    const chunks = [() => Infinity, () => 1, () => 1 + (rand() % 9000)];
    for (const chunk of chunks) {
      const got = await readAllAsLoop(new MessageReader(new ChunkReader(wire(...messages), { chunk })));
      assert.deepEqual(got, messages, `seed ${seed}`);
    }
  }
});

Deno.test("framing: readSmall's stream ending inside a message is ConnectionClosedError, between messages false", async () => {
  const whole = wire([patterned(20, 1)], [patterned(3, 2)]);
  const reader = new MessageReader(new ChunkReader(whole.subarray(0, whole.length - 1), { chunk: () => 7 }));
  await assertRejects(
    readAllAsLoop(reader),
    ConnectionClosedError,
    /^Connection closed inside a message \(\d+ of 15 bytes\)/,
  );
  const clean = new MessageReader(new ChunkReader(whole, { chunk: () => 7 }));
  assert.deepEqual(await readAllAsLoop(clean), [[patterned(20, 1)], [patterned(3, 2)]]);
  assert.equal(clean.readSmall() === null, false, "a drained reader asks for the next header");
  assert.equal(clean.received(null), false);
});

Deno.test("framing: a clean end of stream between messages gives null, and again null", async () => {
  assert.equal(await new MessageReader(new ChunkReader(new Uint8Array(0))).next(), null);
  const reader = new MessageReader(new ChunkReader(wire([Uint8Array.of(1)], [Uint8Array.of(2)])));
  assert.deepEqual(await reader.next(), [Uint8Array.of(1)]);
  assert.deepEqual(await reader.next(), [Uint8Array.of(2)]);
  assert.equal(await reader.next(), null);
  assert.equal(await reader.next(), null);
});

Deno.test("framing: end of stream inside the header is ConnectionClosedError", async () => {
  const whole = wire([patterned(20, 1), patterned(3, 2)]);
  for (const cut of [1, 2, 3, 4, 5, 11, 12, 19]) {
    for (const chunk of [() => 1, () => Infinity]) {
      const reader = new MessageReader(new ChunkReader(whole.subarray(0, cut), { chunk }));
      await assertRejects(reader.next(), ConnectionClosedError, /^Connection closed inside a message/);
    }
  }
});

Deno.test("framing: end of stream inside a small frame is ConnectionClosedError", async () => {
  const whole = wire([patterned(20, 1), patterned(3, 2)]);
  for (const cut of [20, 21, 39, 40, 42]) {
    const reader = new MessageReader(new ChunkReader(whole.subarray(0, cut)));
    await assertRejects(reader.next(), ConnectionClosedError, /Connection closed/);
  }
});

Deno.test("framing: end of stream inside a large frame is ConnectionClosedError", async () => {
  const whole = wire([patterned(MiB, 1)]);
  for (const cut of [12 + 1, 12 + SMALL_FRAME_BYTES + 1, whole.length - 1]) {
    for (const chunk of [() => 4096, () => Infinity]) {
      const reader = new MessageReader(new ChunkReader(whole.subarray(0, cut), { chunk }));
      const error = await assertRejects(
        reader.next(),
        ConnectionClosedError,
        /Connection closed inside a frame/,
      );
      assert.equal(error.name, "ConnectionClosedError");
    }
  }
});

Deno.test("framing: a whole message, then an end inside the next header", async () => {
  const bytes = concat([wire([Uint8Array.of(9)]), Uint8Array.of(1, 0)]);
  const reader = new MessageReader(new ChunkReader(bytes, { chunk: () => 1 }));
  assert.deepEqual(await reader.next(), [Uint8Array.of(9)]);
  await assertRejects(reader.next(), ConnectionClosedError, /inside a message \(2 of 4 bytes\)/);
});

// ---------------------------------------------------------------------------------------
// Limits

Deno.test("framing: a frame count of 0 or over MESSAGE_FRAMES_MAX is a ProtocolError", async () => {
  for (const count of [0, MESSAGE_FRAMES_MAX + 1, 0xffff_ffff]) {
    // The source would fail if the reader went on to read the lengths.
    const reader = new MessageReader(new ChunkReader(rawHeader(count, []), { onEnd: "throw" }));
    const error = await assertRejects(reader.next(), ProtocolError, /^Bad frame header: /);
    assert.equal(error.name, "ProtocolError");
    assert.equal(error.message, `Bad frame header: ${count} frames (1 to ${MESSAGE_FRAMES_MAX} allowed)`);
  }
});

Deno.test("framing: a frame over frameBytesMax is refused before its body is read", async () => {
  const header = rawHeader(1, [[1025, 0]]);
  const source = new ChunkReader(header, { onEnd: "throw" });
  const reader = new MessageReader(source, { frameBytesMax: 1024 });
  await assertRejects(
    reader.next(),
    ProtocolError,
    /too large: frame 0 declares 1025 bytes \(the limit is 1024\)/,
  );
  assert.equal(source.served, header.length);

  // A later frame, and the header fed one byte at a time.
  const header2 = rawHeader(3, [[1, 0], [2000, 0], [1, 0]]);
  const reader2 = new MessageReader(new ChunkReader(header2, { onEnd: "throw", chunk: () => 1 }), {
    frameBytesMax: 1024,
  });
  await assertRejects(reader2.next(), ProtocolError, /too large: frame 1 declares 2000 bytes/);
});

Deno.test("framing: a frame of exactly frameBytesMax is accepted", async () => {
  const frames = [patterned(1024, 3)];
  const reader = new MessageReader(new ChunkReader(wire(frames)), { frameBytesMax: 1024 });
  assert.deepEqual(await reader.next(), frames);
});

Deno.test("framing: frames that together exceed frameBytesMax are a ProtocolError", async () => {
  const header = rawHeader(2, [[600, 0], [600, 0]]);
  const reader = new MessageReader(new ChunkReader(header, { onEnd: "throw" }), { frameBytesMax: 1024 });
  await assertRejects(
    reader.next(),
    ProtocolError,
    /^Message too large: 1200 bytes in frames \(the limit is 1024\)/,
  );
  // Right at the limit is fine.
  const frames = [patterned(600, 1), patterned(424, 2)];
  const ok = new MessageReader(new ChunkReader(wire(frames)), { frameBytesMax: 1024 });
  assert.deepEqual(await ok.next(), frames);
});

Deno.test("framing: a length whose high u32 is 0x200000 or more is a ProtocolError", async () => {
  for (const hi of [0x200000, 0x7fffffff, 0xffffffff]) {
    const header = rawHeader(1, [[0, hi]]);
    // With no configured limit, only the 2^53 check stands between us and the allocation.
    const reader = new MessageReader(new ChunkReader(header, { onEnd: "throw" }), {
      frameBytesMax: Infinity,
    });
    await assertRejects(reader.next(), ProtocolError, /Frame too large: frame 0 declares over 2\^53 bytes/);
  }
  // Under the default limit any high word is too large.
  const reader = new MessageReader(new ChunkReader(rawHeader(1, [[0, 1]]), { onEnd: "throw" }));
  await assertRejects(
    reader.next(),
    ProtocolError,
    new RegExp(`declares ${2 ** 32} bytes.*${FRAME_BYTES_MAX}`),
  );
  const low = new MessageReader(
    new ChunkReader(rawHeader(1, [[FRAME_BYTES_MAX + 1, 0]]), { onEnd: "throw" }),
  );
  await assertRejects(low.next(), ProtocolError, /too large/);
});

// ---------------------------------------------------------------------------------------
// The writer

Deno.test("framing: several writes in one turn become one sink write", async () => {
  const sink = new LimitedWriter();
  const writer = new MessageWriter(sink);
  const messages = Array.from({ length: 10 }, (_, i) => [patterned(10 + i, i), patterned(i, 50 + i)]);
  const promises = messages.map((m) => writer.write(m));
  const expectedBytes = messages.reduce(
    (n, m) => n + 4 + 8 * m.length + m.reduce((s, f) => s + f.length, 0),
    0,
  );
  assert.equal(writer.queuedBytes, expectedBytes);
  assert.equal(sink.calls.length, 0, "nothing is written before the turn ends");
  await Promise.all(promises);
  assert.equal(sink.calls.length, 1, `${messages.length} messages took ${sink.calls.length} writes`);
  assert.equal(writer.queuedBytes, 0);
  assert.deepEqual(sink.bytes(), wire(...messages));

  // A later turn starts a new write.
  await writer.write([Uint8Array.of(7)]);
  assert.equal(sink.calls.length, 2);
  assert.deepEqual(sink.bytes(), wire(...messages, [Uint8Array.of(7)]));
});

Deno.test("framing: a large frame is passed to the sink without copying", async () => {
  const backing = new Uint8Array(MiB + 64);
  backing.set(patterned(MiB, 9), 16);
  const big = backing.subarray(16, 16 + MiB);
  for (const max of [Infinity, 100_000]) {
    const sink = new LimitedWriter(max);
    const writer = new MessageWriter(sink);
    await writer.write([Uint8Array.of(1, 2), big]);
    const sameMemory = sink.calls.filter((p) => p.buffer === backing.buffer);
    assert.ok(sameMemory.length > 0, "the sink saw the caller's own buffer");
    // Every byte of the big frame went out as a view of the caller's buffer, in order.
    let expectedOffset = big.byteOffset;
    for (const p of sameMemory) {
      assert.equal(p.byteOffset, expectedOffset);
      expectedOffset += max === Infinity ? p.byteLength : Math.min(p.byteLength, max);
    }
    assert.equal(expectedOffset, big.byteOffset + big.byteLength);
    const copied = sink.calls.filter((p) => p.buffer !== backing.buffer);
    const copiedBytes = max === Infinity ? copied.reduce((n, p) => n + p.byteLength, 0) : -1;
    if (max === Infinity) {
      assert.equal(copiedBytes, 4 + 16 + 2, "only the header and small frame were copied");
    }
    assert.deepEqual(sink.bytes(), wire([Uint8Array.of(1, 2), big]));
  }
});

Deno.test("framing: writes queued while a write is in flight go out after it", async () => {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => release = resolve);
  const chunks: Uint8Array[] = [];
  let calls = 0;
  const sink: ByteWriter = {
    async write(p) {
      calls++;
      if (calls === 1) await gate;
      chunks.push(p.slice());
      return p.length;
    },
  };
  const writer = new MessageWriter(sink);
  const first = writer.write([Uint8Array.of(1)]);
  await Promise.resolve();
  await Promise.resolve();
  const second = writer.write([Uint8Array.of(2)]);
  const third = writer.write([Uint8Array.of(3)]);
  assert.ok(writer.queuedBytes > 0);
  release();
  await Promise.all([first, second, third]);
  assert.deepEqual(concat(chunks), wire([Uint8Array.of(1)], [Uint8Array.of(2)], [Uint8Array.of(3)]));
  assert.equal(calls, 2, "the two messages queued during the first write share one write");
  assert.equal(writer.queuedBytes, 0);
});

Deno.test("framing: flushed() resolves at once on an idle writer", async () => {
  const sink = new LimitedWriter();
  const writer = new MessageWriter(sink);
  await writer.flushed();
  assert.equal(sink.calls.length, 0);
  assert.equal(writer.queuedBytes, 0);
});

Deno.test("framing: a sink that throws fails the write, and every later write", async () => {
  for (const how of ["throws", "rejects"] as const) {
    const failure = new Error(`sink ${how}`);
    let calls = 0;
    const sink: ByteWriter = {
      write(): Promise<number> {
        calls++;
        if (how === "throws") throw failure;
        return Promise.reject(failure);
      },
    };
    const writer = new MessageWriter(sink);
    const a = writer.write([Uint8Array.of(1)]);
    const b = writer.write([Uint8Array.of(2)]); // queued in the same turn
    await assert.rejects(a, (e) => e === failure);
    await assert.rejects(b, (e) => e === failure);
    await writer.flushed(); // resolves even though the writes failed
    const later = writer.write([Uint8Array.of(3)]);
    await assert.rejects(later, (e) => e === failure);
    await assert.rejects(writer.write([Uint8Array.of(4)]), (e) => e === failure);
    assert.equal(calls, 1, `${how}: nothing more is written after a failure`);
  }
});

Deno.test("framing: send() reports a failed write once to onError and drops later messages", async () => {
  const failure = new Error("connection reset");
  let calls = 0;
  const heard: unknown[] = [];
  const writer = new MessageWriter({
    write(): Promise<number> {
      calls++;
      return Promise.reject(failure);
    },
  }, { onError: (error) => heard.push(error) });
  writer.send([Uint8Array.of(1)]);
  writer.send([Uint8Array.of(2)]); // queued in the same turn: the same failed write
  await writer.flushed();
  assert.deepEqual(heard, [failure]);
  writer.send([Uint8Array.of(3)]);
  await writer.flushed();
  assert.equal(calls, 1, "nothing more is written after a failure");
  assert.deepEqual(heard, [failure], "onError hears of the failure once");
  assert.equal(writer.queuedBytes, 0);
  // write() still rejects for whoever awaits it.
  await assert.rejects(writer.write([Uint8Array.of(4)]), (e) => e === failure);
});

Deno.test("framing: an abort is not a failure to report: onError stays silent", async () => {
  const heard: unknown[] = [];
  let release!: () => void;
  const writer = new MessageWriter({
    write: (p) => new Promise<number>((resolve) => release = () => resolve(p.length)),
  }, { onError: (error) => heard.push(error) });
  writer.send([Uint8Array.of(1)]);
  await Promise.resolve();
  await Promise.resolve();
  writer.send([Uint8Array.of(2)]); // waits behind the write under way
  writer.abort(new Error("closing"));
  release();
  await writer.flushed();
  assert.deepEqual(heard, []);
  assert.equal(writer.queuedBytes, 0);
});

Deno.test("framing: a sink that fails partway fails the pending writes", async () => {
  let calls = 0;
  const sink: ByteWriter = {
    write(p): Promise<number> {
      calls++;
      if (calls === 3) return Promise.reject(new Error("connection reset"));
      return Promise.resolve(Math.min(p.length, 5));
    },
  };
  const writer = new MessageWriter(sink);
  await assertRejects(writer.write([patterned(100, 1)]), Error, /connection reset/);
  await assertRejects(writer.write([Uint8Array.of(1)]), Error, /connection reset/);
  assert.equal(calls, 3);
});

// Regression: after the sink failed, the queue was dropped but queuedBytes kept counting
// the dropped bytes, forever.
Deno.test("framing: after a failure nothing is queued, and queuedBytes says so", async () => {
  const writer = new MessageWriter({ write: () => Promise.reject(new Error("connection reset")) });
  const pending = writer.write([new Uint8Array(10)]);
  assert.equal(writer.queuedBytes, 4 + 8 + 10);
  await assertRejects(pending, Error, /connection reset/);
  await assertRejects(writer.write([new Uint8Array(5)]), Error, /connection reset/);
  assert.equal(writer.queuedBytes, 0, "the dropped message still counts as queued");
});
