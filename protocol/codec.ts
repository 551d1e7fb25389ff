/**
 * Values <-> msgpack bytes. Standard msgpack (any msgpack library reads it) with six
 * extension types for what msgpack lacks: bigint, typed arrays inline, typed arrays out
 * of band (their bytes travel as frames of their own, never copied through the
 * encoder), Set, Map and key references; Date uses msgpack's own timestamp type.
 * PROTOCOL.md has the byte layouts.
 *
 * @module
 */

import { checkKey } from "./_validate.ts";
import { ProtocolError } from "./errors.ts";

/** Extension type codes (PROTOCOL.md, "Extension types"). */
export const EXT_BIGINT = 1;
/** A typed array whose bytes follow the kind byte. */
export const EXT_TYPED_INLINE = 2;
/** A typed array whose bytes are frame `index + 1` of the message. */
export const EXT_TYPED_FRAME = 3;
/** A Set; the payload is a msgpack array of its members. */
export const EXT_SET = 4;
/** A Map; the payload is a msgpack array of alternating keys and values. */
export const EXT_MAP = 5;
/** A reference to a key's value (`ref("x")`); the payload is the key as UTF-8. */
export const EXT_REF = 6;
/**
 * A string that is not well-formed UTF-16 (it has a lone surrogate, which UTF-8 cannot
 * carry); the payload is its UTF-16 code units, little-endian. Written only for such strings.
 */
export const EXT_UTF16 = 7;
const EXT_TIMESTAMP = -1;

/**
 * Refers to the value a worker holds under `key`, inside a computation's `args`.
 *
 * @example
 * ```ts
 * import { ref, rpc } from "@dist/dist";
 * const alice = rpc("tcp://127.0.0.1:8788");
 * await alice.compute({ key: "y", function: (x: number, n: number) => x * n, args: [ref("x"), 3] });
 * await alice.close();
 * ```
 */
export function ref(key: string): Ref {
  return new Ref(key);
}

/**
 * A reference to the value a worker holds under `key`: in a computation's arguments it
 * stands for that value, fetched from a peer when the worker lacks it.
 */
export class Ref {
  /** The key referred to. */
  readonly key: string;
  /** Builds a reference to `key`. */
  constructor(key: string) {
    checkKey(key, "ref: key");
    this.key = key;
  }
}

/** Values nested deeper than this are refused (also what stops a circular reference). */
export const VALUE_DEPTH_MAX = 256;
/** Most out-of-band buffers in one message; binary values past it go inline. */
export const BUFFERS_MAX = 1023;
/** Binary values at least this long travel as frames of their own. */
export const INLINE_BYTES_MAX = 16 * 1024;
/**
 * Largest bigint magnitude that travels, in bytes (a 524,288-bit number): it encodes and
 * decodes in about a millisecond. Without a cap one message could hold a node's only
 * thread for seconds (BigInt arithmetic on huge numbers is slow), and its heartbeats with it.
 */
export const BIGINT_BYTES_MAX = 64 * 1024;
// Magnitudes at or past this do not fit in BIGINT_BYTES_MAX bytes; a comparison costs nothing.
const BIGINT_LIMIT = 1n << BigInt(BIGINT_BYTES_MAX * 8);

/** Any typed array kind dist carries. */
export type TypedArray =
  | Uint8Array
  | Int8Array
  | Uint8ClampedArray
  | Int16Array
  | Uint16Array
  | Int32Array
  | Uint32Array
  | Float32Array
  | Float64Array
  | BigInt64Array
  | BigUint64Array;

type TypedArrayConstructor = {
  new (buffer: ArrayBuffer, byteOffset: number, length: number): TypedArray;
  readonly BYTES_PER_ELEMENT: number;
  readonly name: string;
};

// The index into this table is the kind byte on the wire; never reorder it.
const KINDS: (TypedArrayConstructor | undefined)[] = [
  Uint8Array,
  Int8Array,
  Uint8ClampedArray,
  Int16Array,
  Uint16Array,
  Int32Array,
  Uint32Array,
  Float32Array,
  Float64Array,
  BigInt64Array,
  BigUint64Array,
  // deno-lint-ignore no-explicit-any
  (globalThis as any).Float16Array,
];
const KIND_ARRAY_BUFFER = 12;
const KIND_OF = new Map<unknown, number>();
KINDS.forEach((ctor, kind) => ctor && KIND_OF.set(ctor.prototype, kind));

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: true });
const latin1 = new TextDecoder("latin1");
// Hex digits as ASCII, and back: bigints go through hex strings, which V8 converts in linear time.
const HEX_DIGITS = textEncoder.encode("0123456789abcdef");
const NIBBLE = new Uint8Array(128);
for (let i = 0; i < 16; i++) NIBBLE[HEX_DIGITS[i]] = i;

/** A value that cannot travel; `path` says where inside the value it sits. */
class UnsendableError extends TypeError {
  readonly segments: (string | number)[] = [];
  readonly what: string;
  readonly advice: string;
  /** Past a size limit (a RangeError to the caller), rather than of a kind that cannot travel. */
  readonly tooLarge: boolean;
  constructor(what: string, advice: string, tooLarge = false) {
    super(what);
    this.what = what;
    this.advice = advice;
    this.tooLarge = tooLarge;
  }
}

/** Formats a path like `data.x[3].y` from its segments. */
export function formatPath(root: string, segments: readonly (string | number)[]): string {
  let out = root;
  for (const s of segments) {
    out += typeof s === "number"
      ? `[${s}]`
      : /^[A-Za-z_$][\w$]*$/.test(s)
      ? `.${s}`
      : `[${JSON.stringify(s)}]`;
  }
  return out;
}

/** An encoded message: the msgpack head and the out-of-band buffers it refers to. */
export interface Encoded {
  /** The msgpack bytes. */
  head: Uint8Array;
  /** Out-of-band buffers, frame `i + 1` of the message. */
  buffers: Uint8Array[];
}

/** The buffers of an encoding that has none (frozen: shared by all of them). */
const NO_BUFFERS: Uint8Array[] = Object.freeze([]) as unknown as Uint8Array[];

/**
 * A reusable msgpack encoder. Not re-entrant: one `encode` at a time (JS is single
 * threaded, and encoding never awaits).
 */
export class Encoder {
  #buf = new Uint8Array(64 * 1024);
  #view = new DataView(this.#buf.buffer);
  #pos = 0;
  // Made only when a value has a buffer to send apart: most messages have none.
  #buffers: Uint8Array[] | null = null;
  #inlineBytesMax: number;

  /** `inlineBytesMax`: binary values at least this long travel out of band. */
  constructor(options: { inlineBytesMax?: number } = {}) {
    this.#inlineBytesMax = options.inlineBytesMax ?? INLINE_BYTES_MAX;
  }

  /**
   * Encodes `value`. Throws a TypeError naming `root` and the path inside the value
   * when part of it cannot travel. With `scratch`, `head` is a view of the encoder's own
   * memory, valid until its next `encode`: for a caller that copies it at once.
   */
  encode(value: unknown, root = "value", scratch = false): Encoded {
    this.#pos = 0;
    this.#buffers = null;
    try {
      this.#value(value, 0);
    } catch (error) {
      if (error instanceof UnsendableError) {
        const ctor = error.tooLarge ? RangeError : TypeError;
        throw new ctor(`Cannot send ${formatPath(root, error.segments)}: ${error.what}; ${error.advice}`);
      }
      throw error;
    }
    const head = scratch ? this.#buf.subarray(0, this.#pos) : this.#buf.slice(0, this.#pos);
    const buffers = this.#buffers ?? NO_BUFFERS;
    this.#buffers = null;
    return { head, buffers };
  }

  #ensure(n: number): void {
    if (this.#pos + n <= this.#buf.length) return;
    let size = this.#buf.length * 2;
    while (size < this.#pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.#buf.subarray(0, this.#pos));
    this.#buf = next;
    this.#view = new DataView(next.buffer);
  }

  #byte(b: number): void {
    this.#ensure(1);
    this.#buf[this.#pos++] = b;
  }

  #value(v: unknown, depth: number): void {
    switch (typeof v) {
      case "string":
        return this.#string(v);
      case "number":
        return this.#number(v);
      case "boolean":
        return this.#byte(v ? 0xc3 : 0xc2);
      case "undefined":
        return this.#byte(0xc0);
      case "bigint":
        return this.#bigint(v);
      case "object":
        if (v === null) return this.#byte(0xc0);
        if (depth >= VALUE_DEPTH_MAX) {
          throw new UnsendableError(
            `nested deeper than ${VALUE_DEPTH_MAX} levels`,
            "is it a circular reference?",
          );
        }
        return this.#object(v, depth + 1);
      case "function":
        throw new UnsendableError(
          "a function cannot travel as a value",
          "pass functions as the task's function, or send data only",
        );
      default:
        throw new UnsendableError(
          `a ${typeof v} cannot travel`,
          "send strings, numbers, booleans, null, bigints, arrays, plain objects or typed arrays",
        );
    }
  }

  #number(n: number): void {
    this.#ensure(9);
    const b = this.#buf;
    if (Number.isSafeInteger(n) && !Object.is(n, -0)) {
      if (n >= 0) {
        if (n < 0x80) b[this.#pos++] = n;
        else if (n < 0x100) (b[this.#pos++] = 0xcc, b[this.#pos++] = n);
        else if (n < 0x10000) (b[this.#pos++] = 0xcd, this.#view.setUint16(this.#pos, n), this.#pos += 2);
        else if (n < 0x100000000) (b[this.#pos++] = 0xce, this.#view.setUint32(this.#pos, n), this.#pos += 4);
        else {
          b[this.#pos++] = 0xcf;
          this.#view.setUint32(this.#pos, Math.floor(n / 0x100000000));
          this.#view.setUint32(this.#pos + 4, n >>> 0);
          this.#pos += 8;
        }
      } else {
        if (n >= -32) b[this.#pos++] = n & 0xff;
        else if (n >= -0x80) (b[this.#pos++] = 0xd0, this.#view.setInt8(this.#pos, n), this.#pos += 1);
        else if (n >= -0x8000) (b[this.#pos++] = 0xd1, this.#view.setInt16(this.#pos, n), this.#pos += 2);
        else if (n >= -0x80000000) (b[this.#pos++] = 0xd2, this.#view.setInt32(this.#pos, n), this.#pos += 4);
        else {
          b[this.#pos++] = 0xd3;
          this.#view.setBigInt64(this.#pos, BigInt(n));
          this.#pos += 8;
        }
      }
      return;
    }
    b[this.#pos++] = 0xcb;
    this.#view.setFloat64(this.#pos, n);
    this.#pos += 8;
  }

  #string(s: string): void {
    const len = s.length;
    const max = len * 3;
    this.#ensure(max + 5);
    const b = this.#buf;
    const headerSize = max < 0x20 ? 1 : max < 0x100 ? 2 : max < 0x10000 ? 3 : 5;
    const start = this.#pos + headerSize;
    let n = 0;
    // Short ASCII is the common case (keys, ops); it skips TextEncoder's call overhead.
    if (len < 64) {
      for (; n < len; n++) {
        const c = s.charCodeAt(n);
        if (c >= 0x80) break;
        b[start + n] = c;
      }
    }
    if (n < len) {
      // UTF-8 has no lone surrogates (TextEncoder would write U+FFFD): such a string goes as UTF-16.
      if (!s.isWellFormed()) return this.#utf16(s);
      n = textEncoder.encodeInto(s, b.subarray(start)).written;
    }
    const at = this.#pos;
    if (headerSize === 1) b[at] = 0xa0 | n;
    else if (headerSize === 2) (b[at] = 0xd9, b[at + 1] = n);
    else if (headerSize === 3) (b[at] = 0xda, this.#view.setUint16(at + 1, n));
    else (b[at] = 0xdb, this.#view.setUint32(at + 1, n));
    this.#pos = start + n;
  }

  #extHeader(type: number, length: number): void {
    this.#ensure(6);
    const b = this.#buf;
    if (length === 1) b[this.#pos++] = 0xd4;
    else if (length === 2) b[this.#pos++] = 0xd5;
    else if (length === 4) b[this.#pos++] = 0xd6;
    else if (length === 8) b[this.#pos++] = 0xd7;
    else if (length === 16) b[this.#pos++] = 0xd8;
    else if (length < 0x100) (b[this.#pos++] = 0xc7, b[this.#pos++] = length);
    else if (length < 0x10000) {
      (b[this.#pos++] = 0xc8, this.#view.setUint16(this.#pos, length), this.#pos += 2);
    } else (b[this.#pos++] = 0xc9, this.#view.setUint32(this.#pos, length), this.#pos += 4);
    b[this.#pos++] = type & 0xff;
  }

  #utf16(s: string): void {
    const n = s.length;
    this.#extHeader(EXT_UTF16, n * 2);
    this.#ensure(n * 2);
    for (let i = 0; i < n; i++) this.#view.setUint16(this.#pos + i * 2, s.charCodeAt(i), true);
    this.#pos += n * 2;
  }

  #bigint(v: bigint): void {
    const negative = v < 0n;
    const mag = negative ? -v : v;
    if (mag >= BIGINT_LIMIT) {
      throw new UnsendableError(
        `a bigint of more than ${BIGINT_BYTES_MAX} bytes (BIGINT_BYTES_MAX) cannot travel`,
        "send it as a typed array of its digits, or as a string",
        true,
      );
    }
    // Hex, not byte-by-byte shifts: each shift copies the whole number, quadratic in its size.
    const hex = mag === 0n ? "" : mag.toString(16);
    const odd = hex.length & 1;
    const size = (hex.length + odd) >> 1;
    this.#extHeader(EXT_BIGINT, size + 1);
    this.#ensure(size + 1);
    const b = this.#buf;
    b[this.#pos++] = negative ? 1 : 0;
    let j = 0;
    if (odd) b[this.#pos++] = NIBBLE[hex.charCodeAt(j++)];
    for (; j < hex.length; j += 2) {
      b[this.#pos++] = (NIBBLE[hex.charCodeAt(j)] << 4) | NIBBLE[hex.charCodeAt(j + 1)];
    }
  }

  #binary(kind: number, bytes: Uint8Array): void {
    const buffers = this.#buffers;
    if (bytes.byteLength >= this.#inlineBytesMax && (buffers === null || buffers.length < BUFFERS_MAX)) {
      this.#extHeader(EXT_TYPED_FRAME, 5);
      this.#ensure(5);
      this.#buf[this.#pos++] = kind;
      this.#view.setUint32(this.#pos, buffers === null ? 0 : buffers.length);
      this.#pos += 4;
      if (buffers === null) this.#buffers = [bytes];
      else buffers.push(bytes);
      return;
    }
    const n = bytes.byteLength;
    if (kind === 0) {
      this.#ensure(n + 5);
      if (n < 0x100) (this.#buf[this.#pos++] = 0xc4, this.#buf[this.#pos++] = n);
      else if (n < 0x10000) {
        (this.#buf[this.#pos++] = 0xc5, this.#view.setUint16(this.#pos, n), this.#pos += 2);
      } else (this.#buf[this.#pos++] = 0xc6, this.#view.setUint32(this.#pos, n), this.#pos += 4);
    } else {
      this.#extHeader(EXT_TYPED_INLINE, n + 1);
      this.#ensure(n + 1);
      this.#buf[this.#pos++] = kind;
    }
    this.#buf.set(bytes, this.#pos);
    this.#pos += n;
  }

  #arrayHeader(n: number): void {
    this.#ensure(5);
    if (n < 0x10) this.#buf[this.#pos++] = 0x90 | n;
    else if (n < 0x10000) (this.#buf[this.#pos++] = 0xdc, this.#view.setUint16(this.#pos, n), this.#pos += 2);
    else (this.#buf[this.#pos++] = 0xdd, this.#view.setUint32(this.#pos, n), this.#pos += 4);
  }

  #mapHeader(n: number): void {
    this.#ensure(5);
    if (n < 0x10) this.#buf[this.#pos++] = 0x80 | n;
    else if (n < 0x10000) (this.#buf[this.#pos++] = 0xde, this.#view.setUint16(this.#pos, n), this.#pos += 2);
    else (this.#buf[this.#pos++] = 0xdf, this.#view.setUint32(this.#pos, n), this.#pos += 4);
  }

  #items(items: Iterable<unknown>, depth: number): void {
    let i = 0;
    for (const item of items) {
      try {
        this.#value(item, depth);
      } catch (error) {
        if (error instanceof UnsendableError) error.segments.unshift(i);
        throw error;
      }
      i++;
    }
  }

  #object(v: object, depth: number): void {
    if (Array.isArray(v)) {
      this.#arrayHeader(v.length);
      // Indexing (not iterating) turns holes into nil.
      for (let i = 0; i < v.length; i++) {
        try {
          this.#value(v[i], depth);
        } catch (error) {
          if (error instanceof UnsendableError) error.segments.unshift(i);
          throw error;
        }
      }
      return;
    }
    const proto = Object.getPrototypeOf(v);
    if (proto === Object.prototype || proto === null) {
      const record = v as Record<string, unknown>;
      let count = 0;
      for (const key in record) if (record[key] !== undefined) count++;
      this.#mapHeader(count);
      for (const key in record) {
        const item = record[key];
        if (item === undefined) continue;
        this.#string(key);
        try {
          this.#value(item, depth);
        } catch (error) {
          if (error instanceof UnsendableError) error.segments.unshift(key);
          throw error;
        }
      }
      return;
    }
    if (ArrayBuffer.isView(v) && !(v instanceof DataView)) {
      const kind = KIND_OF.get(proto);
      if (kind !== undefined) {
        return this.#binary(kind, new Uint8Array(v.buffer, v.byteOffset, v.byteLength));
      }
    }
    if (v instanceof ArrayBuffer) return this.#binary(KIND_ARRAY_BUFFER, new Uint8Array(v));
    if (v instanceof Date) {
      const ms = v.getTime();
      if (Number.isNaN(ms)) throw new UnsendableError("an invalid Date cannot travel", "send a valid date");
      const sec = Math.floor(ms / 1000);
      this.#extHeader(EXT_TIMESTAMP, 12);
      this.#ensure(12);
      this.#view.setUint32(this.#pos, (ms - sec * 1000) * 1e6);
      this.#view.setBigInt64(this.#pos + 4, BigInt(sec));
      this.#pos += 12;
      return;
    }
    if (v instanceof Ref) {
      const bytes = textEncoder.encode(v.key);
      this.#extHeader(EXT_REF, bytes.length);
      this.#ensure(bytes.length);
      this.#buf.set(bytes, this.#pos);
      this.#pos += bytes.length;
      return;
    }
    if (v instanceof Set || v instanceof Map) {
      // The payload's length is known only once it is written: reserve an ext32 header.
      this.#ensure(6);
      const at = this.#pos;
      this.#pos += 6;
      const start = this.#pos;
      if (v instanceof Set) {
        this.#arrayHeader(v.size);
        this.#items(v, depth);
      } else {
        this.#arrayHeader(v.size * 2);
        let i = 0;
        for (const [key, item] of v) {
          try {
            this.#value(key, depth);
            this.#value(item, depth);
          } catch (error) {
            if (error instanceof UnsendableError) error.segments.unshift(i);
            throw error;
          }
          i++;
        }
      }
      this.#buf[at] = 0xc9;
      this.#view.setUint32(at + 1, this.#pos - start);
      this.#buf[at + 5] = v instanceof Set ? EXT_SET : EXT_MAP;
      return;
    }
    const name = (proto && proto.constructor && proto.constructor.name) || "object";
    throw new UnsendableError(
      `a ${name} instance cannot travel`,
      "convert it to a plain object, an array or a typed array first",
    );
  }
}

// What a decoder holds between messages (so it keeps no message alive).
const NO_BYTES = new Uint8Array(0);

/** Strings (map keys and values) at most this long are cached by the decoder. */
const STRING_CACHE_CHARS_MAX = 16;
/** Slots of the decoder's string cache (a string takes the slot its hash names). */
const STRING_CACHE_SLOTS = 256;

/** Decodes msgpack bytes, resolving out-of-band references against `buffers`. */
export class Decoder {
  #buf: Uint8Array = NO_BYTES;
  #view: DataView = new DataView(this.#buf.buffer);
  #pos = 0;
  #buffers: readonly Uint8Array[] = [];

  /**
   * Decodes one value that must fill `head` exactly. Throws ProtocolError on anything
   * that is not well-formed msgpack of the kinds dist knows.
   */
  decode(head: Uint8Array, buffers: readonly Uint8Array[] = []): unknown {
    this.#buf = head;
    this.#view = new DataView(head.buffer, head.byteOffset, head.byteLength);
    this.#pos = 0;
    this.#buffers = buffers;
    try {
      const value = this.#value(0);
      if (this.#pos !== head.length) {
        throw new ProtocolError(`Malformed msgpack: ${head.length - this.#pos} bytes after the value`);
      }
      return value;
    } catch (error) {
      if (error instanceof ProtocolError) throw error;
      throw new ProtocolError(`Malformed msgpack: ${(error as Error).message}`, { cause: error });
    } finally {
      this.#buffers = [];
      this.#buf = NO_BYTES;
    }
  }

  #need(n: number): void {
    if (this.#pos + n > this.#buf.length) {
      throw new ProtocolError(`Malformed msgpack: truncated (needs ${n} bytes at offset ${this.#pos})`);
    }
  }

  #u8(): number {
    this.#need(1);
    return this.#buf[this.#pos++];
  }
  #u16(): number {
    this.#need(2);
    const v = this.#view.getUint16(this.#pos);
    this.#pos += 2;
    return v;
  }
  #u32(): number {
    this.#need(4);
    const v = this.#view.getUint32(this.#pos);
    this.#pos += 4;
    return v;
  }

  #bytes(n: number): Uint8Array {
    this.#need(n);
    const out = this.#buf.slice(this.#pos, this.#pos + n);
    this.#pos += n;
    return out;
  }

  #string(n: number): string {
    this.#need(n);
    const b = this.#buf;
    const start = this.#pos;
    this.#pos += n;
    if (n <= 64) {
      const end = start + n;
      let i = start;
      while (i < end && b[i] < 0x80) i++;
      if (i === end) return String.fromCharCode.apply(null, b.subarray(start, end) as unknown as number[]);
    }
    return textDecoder.decode(b.subarray(start, start + n));
  }

  #container(n: number, depth: number): void {
    if (depth >= VALUE_DEPTH_MAX) {
      throw new ProtocolError(`Malformed msgpack: nested deeper than ${VALUE_DEPTH_MAX}`);
    }
    // Every item takes a byte at least: refuse counts the bytes cannot hold before allocating.
    if (n > this.#buf.length - this.#pos) {
      throw new ProtocolError(
        `Malformed msgpack: a container of ${n} items in ${this.#buf.length - this.#pos} bytes`,
      );
    }
  }

  #array(n: number, depth: number): unknown[] {
    this.#container(n, depth);
    const out = new Array(n);
    for (let i = 0; i < n; i++) out[i] = this.#value(depth + 1);
    return out;
  }

  /**
   * A short string of `n` bytes at #pos, from the cache when it was seen before: the field
   * names every message repeats ("key", "nbytes"...) and the values it repeats (op names, a
   * worker's address) are not built again, char by char, for each message.
   */
  #cachedString(n: number): string {
    if (this.#pos + n > this.#buf.length) return this.#string(n);
    const b = this.#buf;
    const start = this.#pos;
    let h = n;
    for (let i = start; i < start + n; i++) h = (Math.imul(h, 31) + b[i]) | 0;
    const slot = (h >>> 0) % STRING_CACHE_SLOTS;
    const cached = this.#strings[slot];
    if (cached !== undefined && cached.length === n) {
      let same = true;
      for (let i = 0; i < n; i++) {
        if (cached.charCodeAt(i) !== b[start + i]) {
          same = false;
          break;
        }
      }
      if (same) {
        this.#pos = start + n;
        return cached;
      }
    }
    const key = this.#string(n);
    // Only ASCII strings compare byte for char.
    if (key.length === n) this.#strings[slot] = key;
    return key;
  }

  #strings: (string | undefined)[] = new Array(STRING_CACHE_SLOTS);

  #map(n: number, depth: number): Record<string, unknown> {
    this.#container(n * 2, depth);
    const out: Record<string, unknown> = {};
    for (let i = 0; i < n; i++) {
      const k = this.#value(depth + 1);
      const key = typeof k === "string" ? k : String(k);
      const value = this.#value(depth + 1);
      // A "__proto__" key must stay data, never become the object's prototype.
      if (key === "__proto__") {
        Object.defineProperty(out, key, { value, enumerable: true, writable: true, configurable: true });
      } else out[key] = value;
    }
    return out;
  }

  #value(depth: number): unknown {
    const t = this.#u8();
    if (t < 0x80) return t;
    if (t >= 0xe0) return t - 0x100;
    if (t < 0x90) return this.#map(t & 0x0f, depth);
    if (t < 0xa0) return this.#array(t & 0x0f, depth);
    if (t < 0xc0) {
      return (t & 0x1f) <= STRING_CACHE_CHARS_MAX ? this.#cachedString(t & 0x1f) : this.#string(t & 0x1f);
    }
    let v: number;
    switch (t) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0xc4:
        return this.#bytes(this.#u8());
      case 0xc5:
        return this.#bytes(this.#u16());
      case 0xc6:
        return this.#bytes(this.#u32());
      case 0xc7:
        return this.#ext(this.#u8(), depth);
      case 0xc8:
        return this.#ext(this.#u16(), depth);
      case 0xc9:
        return this.#ext(this.#u32(), depth);
      case 0xca:
        this.#need(4);
        v = this.#view.getFloat32(this.#pos);
        this.#pos += 4;
        return v;
      case 0xcb:
        this.#need(8);
        v = this.#view.getFloat64(this.#pos);
        this.#pos += 8;
        return v;
      case 0xcc:
        return this.#u8();
      case 0xcd:
        return this.#u16();
      case 0xce:
        return this.#u32();
      case 0xcf: {
        this.#need(8);
        const big = this.#view.getBigUint64(this.#pos);
        this.#pos += 8;
        return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
      }
      case 0xd0:
        this.#need(1);
        return this.#view.getInt8(this.#pos++);
      case 0xd1:
        this.#need(2);
        v = this.#view.getInt16(this.#pos);
        this.#pos += 2;
        return v;
      case 0xd2:
        this.#need(4);
        v = this.#view.getInt32(this.#pos);
        this.#pos += 4;
        return v;
      case 0xd3: {
        this.#need(8);
        const big = this.#view.getBigInt64(this.#pos);
        this.#pos += 8;
        return big <= BigInt(Number.MAX_SAFE_INTEGER) && big >= BigInt(Number.MIN_SAFE_INTEGER)
          ? Number(big)
          : big;
      }
      case 0xd4:
        return this.#ext(1, depth);
      case 0xd5:
        return this.#ext(2, depth);
      case 0xd6:
        return this.#ext(4, depth);
      case 0xd7:
        return this.#ext(8, depth);
      case 0xd8:
        return this.#ext(16, depth);
      case 0xd9:
        return this.#string(this.#u8());
      case 0xda:
        return this.#string(this.#u16());
      case 0xdb:
        return this.#string(this.#u32());
      case 0xdc:
        return this.#array(this.#u16(), depth);
      case 0xdd:
        return this.#array(this.#u32(), depth);
      case 0xde:
        return this.#map(this.#u16(), depth);
      case 0xdf:
        return this.#map(this.#u32(), depth);
      default:
        throw new ProtocolError(
          `Malformed msgpack: byte 0x${t.toString(16)} at offset ${this.#pos - 1} starts no value`,
        );
    }
  }

  #ext(length: number, depth: number): unknown {
    this.#need(1);
    const type = this.#view.getInt8(this.#pos);
    this.#pos += 1;
    this.#need(length);
    const end = this.#pos + length;
    switch (type) {
      case EXT_BIGINT: {
        if (length < 1) throw new ProtocolError("Malformed msgpack: empty bigint");
        if (length - 1 > BIGINT_BYTES_MAX) {
          throw new ProtocolError(
            `Malformed msgpack: a bigint of ${length - 1} bytes, past BIGINT_BYTES_MAX (${BIGINT_BYTES_MAX})`,
          );
        }
        const sign = this.#buf[this.#pos];
        if (sign > 1) throw new ProtocolError(`Malformed msgpack: bigint sign byte ${sign} (0 or 1 allowed)`);
        const hex = new Uint8Array(3 + (length - 1) * 2);
        hex[0] = 0x30; // "0x0": a valid literal even when the magnitude has no bytes
        hex[1] = 0x78;
        hex[2] = 0x30;
        for (let i = this.#pos + 1, j = 3; i < end; i++, j += 2) {
          hex[j] = HEX_DIGITS[this.#buf[i] >> 4];
          hex[j + 1] = HEX_DIGITS[this.#buf[i] & 15];
        }
        const mag = BigInt(latin1.decode(hex));
        this.#pos = end;
        return sign === 1 ? -mag : mag;
      }
      case EXT_UTF16: {
        if (length % 2 !== 0) {
          throw new ProtocolError("Malformed msgpack: a UTF-16 string of an odd byte count");
        }
        const units = new Uint16Array(length / 2);
        for (let i = 0; i < units.length; i++) units[i] = this.#view.getUint16(this.#pos + i * 2, true);
        this.#pos = end;
        let out = "";
        // In slices: fromCharCode takes its arguments on the stack.
        for (let i = 0; i < units.length; i += 8192) {
          out += String.fromCharCode(...units.subarray(i, i + 8192));
        }
        return out;
      }
      case EXT_TYPED_INLINE: {
        if (length < 1) throw new ProtocolError("Malformed msgpack: empty typed array");
        const kind = this.#buf[this.#pos];
        // A copy: the result must own aligned memory, apart from the message buffer.
        const bytes = this.#buf.slice(this.#pos + 1, end);
        this.#pos = end;
        return typedFromBytes(kind, bytes);
      }
      case EXT_TYPED_FRAME: {
        if (length !== 5) throw new ProtocolError("Malformed msgpack: a frame reference takes 5 bytes");
        const kind = this.#buf[this.#pos];
        const index = this.#view.getUint32(this.#pos + 1);
        this.#pos = end;
        const frame = this.#buffers[index];
        if (frame === undefined) {
          throw new ProtocolError(
            `Malformed msgpack: reference to frame ${index + 1}, which the message lacks`,
          );
        }
        return typedFromBytes(kind, frame);
      }
      case EXT_REF: {
        const key = textDecoder.decode(this.#buf.subarray(this.#pos, end));
        this.#pos = end;
        return new Ref(key);
      }
      case EXT_SET:
      case EXT_MAP: {
        // The payload array is this value's one level of nesting, as the encoder counts it.
        const items = this.#value(depth);
        if (this.#pos !== end || !Array.isArray(items)) {
          throw new ProtocolError("Malformed msgpack: a Set or Map payload must be exactly one array");
        }
        if (type === EXT_SET) return new Set(items);
        if (items.length % 2 !== 0) throw new ProtocolError("Malformed msgpack: a Map needs key-value pairs");
        const map = new Map();
        for (let i = 0; i < items.length; i += 2) map.set(items[i], items[i + 1]);
        return map;
      }
      case EXT_TIMESTAMP: {
        let ms: number;
        if (length === 4) ms = this.#view.getUint32(this.#pos) * 1000;
        else if (length === 8) {
          const hi = this.#view.getUint32(this.#pos);
          const lo = this.#view.getUint32(this.#pos + 4);
          ms = ((hi & 0x3) * 0x100000000 + lo) * 1000 + Math.floor((hi >>> 2) / 1e6);
        } else if (length === 12) {
          ms = Number(this.#view.getBigInt64(this.#pos + 4)) * 1000 +
            Math.floor(this.#view.getUint32(this.#pos) / 1e6);
        } else throw new ProtocolError(`Malformed msgpack: a timestamp of ${length} bytes`);
        this.#pos = end;
        return new Date(ms);
      }
      default:
        throw new ProtocolError(`Malformed msgpack: unknown extension type ${type}`);
    }
  }
}

/** Builds a typed array of wire kind `kind` over `bytes`, copying only if misaligned. */
function typedFromBytes(kind: number, bytes: Uint8Array): unknown {
  if (kind === KIND_ARRAY_BUFFER) {
    // A frame in a worker's shared memory is copied out: an ArrayBuffer must stay one (the
    // encoder, and the user's code, take a SharedArrayBuffer for something else).
    return bytes.buffer instanceof ArrayBuffer && bytes.byteOffset === 0 &&
        bytes.byteLength === bytes.buffer.byteLength
      ? bytes.buffer
      : bytes.slice().buffer;
  }
  const ctor = KINDS[kind];
  if (ctor === undefined) throw new ProtocolError(`Malformed msgpack: unknown typed array kind ${kind}`);
  const size = ctor.BYTES_PER_ELEMENT;
  if (bytes.byteLength % size !== 0) {
    throw new ProtocolError(`Malformed msgpack: ${bytes.byteLength} bytes do not make a ${ctor.name}`);
  }
  const aligned = bytes.byteOffset % size === 0 ? bytes : bytes.slice();
  return new ctor(aligned.buffer as ArrayBuffer, aligned.byteOffset, aligned.byteLength / size);
}
