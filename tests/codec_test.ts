/**
 * Unit tests for protocol/codec.ts: every value kind round-trips, the bytes are standard
 * msgpack (checked against msgpackr both ways), unsendable values are refused with their
 * path, and malformed input only ever raises ProtocolError.
 */

import assert from "node:assert/strict";
import { addExtension, FLOAT32_OPTIONS, Packr, Unpackr } from "npm:msgpackr@1.11.5/pack";
import {
  BIGINT_BYTES_MAX,
  BUFFERS_MAX,
  Decoder,
  Encoder,
  EXT_BIGINT,
  EXT_MAP,
  EXT_REF,
  EXT_SET,
  EXT_TYPED_FRAME,
  EXT_TYPED_INLINE,
  EXT_UTF16,
  formatPath,
  INLINE_BYTES_MAX,
  Ref,
  ref,
  VALUE_DEPTH_MAX,
} from "../protocol/codec.ts";
import { ProtocolError } from "../protocol/errors.ts";
import { Rng } from "../testing/rng.ts";

// ---------------------------------------------------------------------------------------
// Helpers

const encoder = new Encoder();
const decoder = new Decoder();

function roundTrip(value: unknown): unknown {
  const { head, buffers } = encoder.encode(value);
  return decoder.decode(head, buffers);
}

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(" ");
}

function bytesOf(view: ArrayBufferView): Uint8Array {
  return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
}

/** Asserts that decoding `bytes` throws a ProtocolError whose message matches `pattern`. */
function assertMalformed(
  bytes: Uint8Array | number[],
  pattern: RegExp = /^Malformed msgpack: /,
  buffers: Uint8Array[] = [],
): void {
  const head = bytes instanceof Uint8Array ? bytes : Uint8Array.from(bytes);
  assert.throws(
    () => decoder.decode(head, buffers),
    (error: unknown) => {
      assert.ok(
        error instanceof ProtocolError,
        `expected a ProtocolError for ${hex(head)}, got ${String(error)}`,
      );
      assert.equal(error.name, "ProtocolError");
      assert.match(error.message, pattern, `for ${hex(head)}`);
      return true;
    },
  );
}

/** Asserts that encoding `value` throws a TypeError whose message matches every pattern. */
function assertUnsendable(value: unknown, patterns: RegExp[], root?: string): void {
  assert.throws(
    () => root === undefined ? encoder.encode(value) : encoder.encode(value, root),
    (error: unknown) => {
      assert.ok(error instanceof TypeError, `expected a TypeError, got ${String(error)}`);
      for (const pattern of patterns) assert.match(error.message, pattern);
      return true;
    },
  );
}

/** xorshift32: a tiny seeded PRNG so a failing fuzz case can be replayed from its seed. */
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

/** The fuzz tests' seed (DIST_FUZZ_SEED, or a fixed one), printed so that a run can be replayed. */
function fuzzSeed(): number {
  const state = Deno.permissions.querySync({ name: "env", variable: "DIST_FUZZ_SEED" }).state;
  const fromEnv = state === "granted" ? Deno.env.get("DIST_FUZZ_SEED") : undefined;
  const seed = fromEnv ? Number(fromEnv) >>> 0 : 0x2545f491;
  console.log(`seed ${seed} (replay: DIST_FUZZ_SEED=${seed})`);
  return seed;
}

interface TypedLike extends ArrayBufferView {
  readonly length: number;
}
interface TypedCtor {
  new (length: number): TypedLike;
  new (buffer: ArrayBuffer, byteOffset: number, length: number): TypedLike;
  readonly BYTES_PER_ELEMENT: number;
  readonly name: string;
}

const Float16 = (globalThis as Record<string, unknown>).Float16Array as TypedCtor | undefined;

const TYPED_KINDS: TypedCtor[] = [
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
  ...(Float16 ? [Float16] : []),
];

/** A typed array of `length` elements whose bytes are a deterministic pattern. */
function patterned(ctor: TypedCtor, length: number, salt = 1): TypedLike {
  const out = new ctor(length);
  const bytes = bytesOf(out);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 31 + salt * 7 + (i >> 8)) & 0xff;
  return out;
}

function assertSameTyped(actual: unknown, expected: TypedLike, label: string): void {
  assert.ok(ArrayBuffer.isView(actual), `${label}: decoded to ${String(actual)}`);
  assert.equal(actual.constructor, expected.constructor, `${label}: constructor`);
  assert.equal((actual as TypedLike).length, expected.length, `${label}: length`);
  assert.deepEqual(bytesOf(actual), bytesOf(expected), `${label}: contents`);
}

// ---------------------------------------------------------------------------------------
// Scalars

Deno.test("codec: null, booleans and undefined", () => {
  assert.equal(roundTrip(null), null);
  assert.equal(roundTrip(true), true);
  assert.equal(roundTrip(false), false);
  assert.equal(roundTrip(undefined), null);
  assert.deepEqual(encoder.encode(null).head, Uint8Array.of(0xc0));
  assert.deepEqual(encoder.encode(true).head, Uint8Array.of(0xc3));
  assert.deepEqual(encoder.encode(false).head, Uint8Array.of(0xc2));
});

Deno.test("codec: integers use the smallest msgpack format at every width boundary", () => {
  // [value, first byte, total encoded length]
  const cases: [number, number, number][] = [
    [0, 0x00, 1],
    [1, 0x01, 1],
    [127, 0x7f, 1],
    [128, 0xcc, 2],
    [255, 0xcc, 2],
    [256, 0xcd, 3],
    [65535, 0xcd, 3],
    [65536, 0xce, 5],
    [2 ** 32 - 1, 0xce, 5],
    [2 ** 32, 0xcf, 9],
    [2 ** 32 + 1, 0xcf, 9],
    [Number.MAX_SAFE_INTEGER, 0xcf, 9],
    [-1, 0xff, 1],
    [-32, 0xe0, 1],
    [-33, 0xd0, 2],
    [-128, 0xd0, 2],
    [-129, 0xd1, 3],
    [-32768, 0xd1, 3],
    [-32769, 0xd2, 5],
    [-(2 ** 31), 0xd2, 5],
    [-(2 ** 31) - 1, 0xd3, 9],
    [-(2 ** 32), 0xd3, 9],
    [Number.MIN_SAFE_INTEGER, 0xd3, 9],
  ];
  for (const [value, first, length] of cases) {
    const { head, buffers } = encoder.encode(value);
    assert.equal(buffers.length, 0);
    assert.equal(head[0], first, `first byte for ${value}: ${hex(head)}`);
    assert.equal(head.length, length, `length for ${value}: ${hex(head)}`);
    const back = decoder.decode(head);
    assert.equal(typeof back, "number", `type for ${value}`);
    assert.equal(back, value);
  }
});

Deno.test("codec: exact bytes of some integers", () => {
  assert.deepEqual(encoder.encode(0x1234).head, Uint8Array.of(0xcd, 0x12, 0x34));
  assert.deepEqual(encoder.encode(-2).head, Uint8Array.of(0xfe));
  assert.deepEqual(encoder.encode(-200).head, Uint8Array.of(0xd1, 0xff, 0x38));
  assert.deepEqual(
    encoder.encode(2 ** 40 + 5).head,
    Uint8Array.of(0xcf, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x05),
  );
  assert.deepEqual(
    encoder.encode(-(2 ** 40)).head,
    Uint8Array.of(0xd3, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00),
  );
});

Deno.test("codec: floats, -0, NaN and infinities", () => {
  const values = [
    -0,
    0.5,
    -1.5,
    0.1,
    Math.PI,
    1e300,
    -1e-300,
    Number.MIN_VALUE,
    Number.MAX_VALUE,
    Number.EPSILON,
    2 ** 53, // not a safe integer: travels as a float
    -(2 ** 53),
    2 ** 64,
    NaN,
    Infinity,
    -Infinity,
  ];
  for (const value of values) {
    const { head } = encoder.encode(value);
    assert.equal(head[0], 0xcb, `float64 for ${value}`);
    assert.equal(head.length, 9);
    const back = decoder.decode(head);
    assert.ok(Object.is(back, value), `${value} came back as ${back}`);
  }
  assert.ok(Object.is(roundTrip(0), 0));
  assert.ok(Object.is(roundTrip(-0), -0), "-0 keeps its sign");
});

Deno.test("codec: float32 on the wire decodes", () => {
  assert.equal(decoder.decode(Uint8Array.of(0xca, 0x3f, 0xc0, 0x00, 0x00)), 1.5);
  assert.ok(Number.isNaN(decoder.decode(Uint8Array.of(0xca, 0x7f, 0xc0, 0x00, 0x00))));
});

Deno.test("codec: uint64 and int64 beyond the safe range decode to bigint", () => {
  const u = decoder.decode(Uint8Array.of(0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff));
  assert.equal(u, 2n ** 64n - 1n);
  const safe = decoder.decode(Uint8Array.of(0xcf, 0x00, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff));
  assert.equal(safe, Number.MAX_SAFE_INTEGER);
  const over = decoder.decode(Uint8Array.of(0xcf, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00));
  assert.equal(over, 2n ** 53n);
  const i = decoder.decode(Uint8Array.of(0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0));
  assert.equal(i, -(2n ** 63n));
  const under = decoder.decode(Uint8Array.of(0xd3, 0xff, 0xe0, 0, 0, 0, 0, 0, 0));
  assert.equal(under, -(2n ** 53n));
});

Deno.test("codec: bigint round-trips as bigint", () => {
  const values = [
    0n,
    1n,
    -1n,
    5n,
    255n,
    256n,
    -256n,
    2n ** 63n,
    2n ** 64n,
    2n ** 64n - 1n,
    -(2n ** 64n),
    -(2n ** 100n),
    2n ** 1000n + 12345n,
  ];
  for (const value of values) {
    const back = roundTrip(value);
    assert.equal(typeof back, "bigint", `type for ${value}`);
    assert.equal(back, value);
  }
  assert.deepEqual(encoder.encode(0n).head, Uint8Array.of(0xd4, EXT_BIGINT, 0));
  assert.deepEqual(encoder.encode(-1n).head, Uint8Array.of(0xd5, EXT_BIGINT, 1, 1));
  assert.deepEqual(encoder.encode(0x1234n).head, Uint8Array.of(0xc7, 3, EXT_BIGINT, 0, 0x12, 0x34));
});

Deno.test("codec: a bigint of BIGINT_BYTES_MAX bytes round-trips in linear time; one byte more is refused", () => {
  // Byte-at-a-time shifts took seconds at this size (quadratic); hex conversion takes ~1 ms.
  const cap = (1n << BigInt(BIGINT_BYTES_MAX * 8)) - 1n;
  const start = performance.now();
  for (const value of [cap, -cap, cap - 12345678901234567890n, 1n << BigInt(BIGINT_BYTES_MAX * 8 - 1)]) {
    const { head } = encoder.encode(value);
    assert.equal(head.length, 6 + 1 + BIGINT_BYTES_MAX);
    assert.equal(decoder.decode(head), value);
  }
  // Generous for a loaded machine; the quadratic codec took about 4 s for these four.
  const ms = performance.now() - start;
  assert.ok(ms < 400, `four round trips of ${BIGINT_BYTES_MAX}-byte bigints took ${ms.toFixed(0)} ms`);
  for (const value of [cap + 1n, -(cap + 1n), 1n << (8n * 1024n * 1024n)]) {
    const start = performance.now();
    assert.throws(
      () => encoder.encode({ n: [value] }, "args"),
      (error: unknown) => {
        assert.ok(error instanceof RangeError, String(error));
        assert.equal(
          error.message,
          "Cannot send args.n[0]: a bigint of more than 65536 bytes (BIGINT_BYTES_MAX) cannot travel; " +
            "send it as a typed array of its digits, or as a string",
        );
        return true;
      },
    );
    assert.ok(performance.now() - start < 500, "refused without converting it");
  }
  // Another writer's bytes: a magnitude one byte past the cap is refused before any conversion.
  const ext = (size: number): Uint8Array => {
    const bytes = new Uint8Array(7 + size).fill(0xff);
    bytes[0] = 0xc9;
    new DataView(bytes.buffer).setUint32(1, size + 1);
    bytes[5] = EXT_BIGINT;
    bytes[6] = 0;
    return bytes;
  };
  assertMalformed(ext(BIGINT_BYTES_MAX + 1), /a bigint of 65537 bytes, past BIGINT_BYTES_MAX \(65536\)/);
  // (assert.throws, not assertMalformed: that one hex-dumps the bytes for its message.)
  assert.throws(
    () => decoder.decode(ext(16 * 1024 * 1024)),
    /a bigint of 16777216 bytes, past BIGINT_BYTES_MAX/,
  );
  // At the cap, a leading zero byte (not canonical, still readable) is fine.
  const padded = ext(BIGINT_BYTES_MAX);
  padded[7] = 0;
  assert.equal(decoder.decode(padded), cap >> 8n);
});

// ---------------------------------------------------------------------------------------
// Strings

Deno.test("codec: strings with lone surrogates keep every code unit, as values, keys and members", () => {
  const cut = "file-😀x".slice(0, 6); // ends with half of a surrogate pair
  const samples = [
    cut,
    "\uDC00",
    "\uD800\uD800",
    "a\uDFFFb",
    "é\uD83D",
    "x".repeat(70) + "\uD800",
    "\uDE00".repeat(9000),
  ];
  for (const s of samples) {
    assert.equal(s.isWellFormed(), false);
    const back = roundTrip({ [s]: s, list: [s], set: new Set([s]), map: new Map([[s, s]]) }) as {
      list: string[];
      set: Set<string>;
      map: Map<string, string>;
    } & Record<string, string>;
    assert.equal(back[s], s, "as an object key and value");
    assert.equal(back.list[0], s);
    assert.ok(back.set.has(s));
    assert.equal(back.map.get(s), s);
    const { head } = encoder.encode(s);
    const typeAt = head[0] === 0xc7 ? 2 : head[0] === 0xc8 ? 3 : head[0] === 0xc9 ? 5 : 1;
    assert.equal(head[typeAt], EXT_UTF16, hex(head.subarray(0, 8)));
  }
  // Well-formed strings (pairs included) stay msgpack str, read by any msgpack library.
  assert.deepEqual(encoder.encode("😀").head, Uint8Array.of(0xa4, 0xf0, 0x9f, 0x98, 0x80));
  assertMalformed([0xd6, EXT_UTF16, 0x61, 0x00, 0x62], /truncated/);
  assertMalformed([0xc7, 3, EXT_UTF16, 0x61, 0x00, 0x62], /odd byte count/);
});

Deno.test("codec: strings at every length boundary round-trip", () => {
  const lengths = [0, 1, 23, 24, 31, 32, 63, 64, 255, 256, 65535, 65536, 100_000];
  for (const n of lengths) {
    const ascii = "a".repeat(n);
    assert.equal(roundTrip(ascii), ascii, `ascii ${n}`);
    // Two bytes a character: 'é'; three: '€'; four (a surrogate pair): an emoji.
    for (const [unit, size] of [["é", 2], ["€", 3], ["😀", 4]] as const) {
      const count = Math.ceil(n / size);
      const s = unit.repeat(count);
      assert.equal(roundTrip(s), s, `${unit} x ${count}`);
    }
  }
  // A byte length exactly at each header boundary, with a multi-byte tail.
  for (const bytes of [31, 32, 255, 256, 65535, 65536]) {
    const s = "x".repeat(bytes - 3) + "€";
    assert.equal(new TextEncoder().encode(s).length, bytes);
    assert.equal(roundTrip(s), s, `${bytes} bytes`);
  }
});

// The decoder caches short strings, values as well as keys: what it gives back must be
// the string sent, whatever came before into the same slot.
Deno.test("codec: short strings decode exactly through the decoder's cache, repeated, colliding and non-ASCII", () => {
  const d = new Decoder();
  const once = (v: unknown) => d.decode(encoder.encode(v).head);
  const strings = [
    "get_data",
    "tiny",
    "a",
    "",
    "é",
    "ée",
    "ab",
    "ba",
    "x".repeat(16),
    "x".repeat(17),
    "日本",
    "\u0000",
  ];
  // Enough distinct ones of each length that every cache slot is taken and retaken.
  for (let i = 0; i < 2000; i++) strings.push(`k${i}`, `${i}é`.slice(0, 4));
  for (let round = 0; round < 3; round++) {
    for (const s of strings) {
      assert.equal(once(s), s);
      assert.deepEqual(once({ [s]: s, op: s }), { [s]: s, op: s });
      assert.deepEqual(once([s, s]), [s, s]);
    }
  }
});

Deno.test("codec: the string header declares the UTF-8 byte length", () => {
  assert.deepEqual(encoder.encode("").head, Uint8Array.of(0xa0));
  assert.deepEqual(encoder.encode("ab").head, Uint8Array.of(0xa2, 0x61, 0x62));
  // Whatever header the encoder picks, it must be a msgpack str type whose length is
  // the number of UTF-8 bytes that follow.
  for (const s of ["é", "a".repeat(31), "€".repeat(11), "a".repeat(300), "😀".repeat(20000)]) {
    const { head } = encoder.encode(s);
    const utf8 = new TextEncoder().encode(s);
    const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
    let declared: number;
    let start: number;
    if (head[0] >= 0xa0 && head[0] <= 0xbf) (declared = head[0] & 0x1f, start = 1);
    else if (head[0] === 0xd9) (declared = head[1], start = 2);
    else if (head[0] === 0xda) (declared = view.getUint16(1), start = 3);
    else if (head[0] === 0xdb) (declared = view.getUint32(1), start = 5);
    else throw new Error(`not a string header: ${head[0]}`);
    assert.equal(declared, utf8.length);
    assert.deepEqual(head.subarray(start), utf8);
  }
});

Deno.test("codec: multi-byte UTF-8, emoji and mixed scripts", () => {
  const samples = [
    "héllo",
    "日本語のテキスト",
    "😀",
    "👩‍👩‍👧‍👦 family",
    "a😀b€c\u0000d",
    "\u{10FFFF}",
    "mixed ascii then ü at the end of a string longer than twenty-four bytes ü",
  ];
  for (const s of samples) assert.equal(roundTrip(s), s);
});

// ---------------------------------------------------------------------------------------
// Arrays and objects

Deno.test("codec: arrays, holes and undefined", () => {
  assert.deepEqual(roundTrip([]), []);
  assert.deepEqual(roundTrip([1, "two", null, true, [3, [4]]]), [1, "two", null, true, [3, [4]]]);
  // deno-lint-ignore no-sparse-arrays
  assert.deepEqual(roundTrip([1, , 3]), [1, null, 3]);
  assert.deepEqual(roundTrip([undefined, 1, undefined]), [null, 1, null]);
  const sparse: unknown[] = [];
  sparse[4] = "x";
  assert.deepEqual(roundTrip(sparse), [null, null, null, null, "x"]);
  for (const n of [15, 16, 65535, 65536]) {
    const a = Array.from({ length: n }, (_, i) => i & 0x7f);
    const { head } = encoder.encode(a);
    const expected = n < 16 ? 0x90 | n : n < 65536 ? 0xdc : 0xdd;
    assert.equal(head[0], expected, `array header for ${n}`);
    assert.deepEqual(decoder.decode(head), a);
  }
});

Deno.test("codec: nested plain objects, with undefined fields omitted", () => {
  const value = { a: 1, b: { c: [1, 2, { d: "e" }], f: null }, g: "", h: undefined };
  const back = roundTrip(value) as Record<string, unknown>;
  assert.deepEqual(back, { a: 1, b: { c: [1, 2, { d: "e" }], f: null }, g: "" });
  assert.ok(!("h" in back), "an undefined field is omitted, not sent as null");
  assert.deepEqual(encoder.encode({ x: undefined, y: 1 }).head, Uint8Array.of(0x81, 0xa1, 0x79, 0x01));
  assert.deepEqual(roundTrip({ only: undefined }), {});
  assert.equal(Object.getPrototypeOf(back), Object.prototype);
  for (const n of [15, 16, 65536]) {
    const o: Record<string, number> = {};
    for (let i = 0; i < n; i++) o[`k${i}`] = i & 0x7f;
    const { head } = encoder.encode(o);
    const expected = n < 16 ? 0x80 | n : n < 65536 ? 0xde : 0xdf;
    assert.equal(head[0], expected, `map header for ${n}`);
    assert.deepEqual(decoder.decode(head), o);
  }
});

Deno.test("codec: keys that look special stay ordinary data", () => {
  const value = { "": 1, "a b": 2, "1": 3, constructor: 4, toString: 5, hasOwnProperty: 6 };
  assert.deepEqual(roundTrip(value), value);
});

Deno.test("codec: Object.create(null) objects", () => {
  const bare = Object.create(null) as Record<string, unknown>;
  bare.x = 1;
  bare.nested = Object.assign(Object.create(null), { y: [2] });
  const back = roundTrip(bare) as Record<string, unknown>;
  assert.deepEqual({ ...back }, { x: 1, nested: { y: [2] } });
  assert.deepEqual({ ...(back.nested as object) }, { y: [2] });
});

// Deno's __proto__ setter does not change a prototype on `obj[key] = v`, so under Deno a
// plain assignment would keep the key as data too; this guards the behaviour elsewhere.
Deno.test("codec: a __proto__ key stays data and never sets the prototype", () => {
  const value = JSON.parse('{"__proto__": {"polluted": true}, "x": 1}');
  assert.ok(Object.hasOwn(value, "__proto__"));
  const back = roundTrip(value) as Record<string, unknown>;
  assert.equal(Object.getPrototypeOf(back), Object.prototype);
  assert.ok(Object.hasOwn(back, "__proto__"), "__proto__ is an own data property");
  assert.deepEqual(Object.keys(back), ["__proto__", "x"]);
  assert.deepEqual(Object.getOwnPropertyDescriptor(back, "__proto__")?.value, { polluted: true });
  assert.equal(back.polluted, undefined);
  assert.equal(({} as Record<string, unknown>).polluted, undefined);

  // The same from hand-written bytes: {"__proto__": {"polluted": true}}
  const bytes = [0x81, 0xa9, ...new TextEncoder().encode("__proto__"), 0x81, 0xa8];
  bytes.push(...new TextEncoder().encode("polluted"), 0xc3);
  const raw = decoder.decode(Uint8Array.from(bytes)) as Record<string, unknown>;
  assert.equal(Object.getPrototypeOf(raw), Object.prototype);
  assert.equal(raw.polluted, undefined);
  assert.deepEqual(Object.getOwnPropertyDescriptor(raw, "__proto__")?.value, { polluted: true });
});

Deno.test("codec: non-string map keys from other encoders become strings", () => {
  // {1: "a", true: "b", null: "c"}
  const bytes = Uint8Array.of(0x83, 0x01, 0xa1, 0x61, 0xc3, 0xa1, 0x62, 0xc0, 0xa1, 0x63);
  assert.deepEqual(decoder.decode(bytes), { "1": "a", "true": "b", "null": "c" });
});

// ---------------------------------------------------------------------------------------
// Typed arrays and ArrayBuffer

Deno.test("codec: every typed array kind round-trips inline", () => {
  for (const ctor of TYPED_KINDS) {
    for (const length of [0, 1, 7, 64]) {
      const input = patterned(ctor, length);
      const { head, buffers } = encoder.encode({ t: input });
      assert.equal(buffers.length, 0, `${ctor.name}(${length}) is inline`);
      const back = decoder.decode(head, buffers) as { t: unknown };
      assertSameTyped(back.t, input, `${ctor.name}(${length})`);
    }
  }
});

Deno.test("codec: inline Uint8Array is msgpack bin; other kinds are ext 2 with a kind byte", () => {
  assert.deepEqual(encoder.encode(Uint8Array.of(1, 2, 3)).head, Uint8Array.of(0xc4, 3, 1, 2, 3));
  const i8 = encoder.encode(Int8Array.of(-1)).head;
  assert.deepEqual(i8, Uint8Array.of(0xd5, EXT_TYPED_INLINE, 1, 0xff)); // fixext 2: kind, one byte
  const i16 = encoder.encode(Int16Array.of(1)).head;
  assert.deepEqual(i16.subarray(0, 4), Uint8Array.of(0xc7, 3, EXT_TYPED_INLINE, 3)); // ext 8: kind, 2 bytes
  assert.equal(i16.length, 6);
  const kinds = TYPED_KINDS.map((ctor) => {
    const head = encoder.encode(new ctor(1)).head;
    return ctor === Uint8Array ? -1 : head[head.length - ctor.BYTES_PER_ELEMENT - 1];
  });
  // The kind byte is the index in the wire table; each kind has its own.
  assert.deepEqual(kinds.slice(1), TYPED_KINDS.slice(1).map((_, i) => i + 1));
});

Deno.test("codec: decoded inline typed arrays own their memory", () => {
  const input = Float64Array.of(1.5, -2.25, NaN);
  const { head } = encoder.encode(input);
  const back = decoder.decode(head) as Float64Array;
  assert.notEqual(back.buffer, head.buffer);
  head.fill(0);
  assert.equal(back[0], 1.5);
  assert.equal(back[1], -2.25);
  assert.ok(Number.isNaN(back[2]));
  const u8 = Uint8Array.of(9, 8, 7);
  const encoded = encoder.encode(u8).head;
  const backU8 = decoder.decode(encoded) as Uint8Array;
  encoded.fill(0);
  assert.deepEqual(backU8, Uint8Array.of(9, 8, 7));
});

Deno.test("codec: every typed array kind travels out of band when large", () => {
  for (const ctor of TYPED_KINDS) {
    const length = Math.ceil(INLINE_BYTES_MAX / ctor.BYTES_PER_ELEMENT) + 3;
    const input = patterned(ctor, length, 5);
    const { head, buffers } = encoder.encode({ before: 1, t: input, after: 2 });
    assert.equal(buffers.length, 1, `${ctor.name} is out of band`);
    assert.ok(head.length < 64, `${ctor.name}: the head stays small (${head.length} bytes)`);
    // The very same memory, not a copy.
    assert.equal(buffers[0].buffer, input.buffer, `${ctor.name}: same ArrayBuffer`);
    assert.equal(buffers[0].byteOffset, input.byteOffset);
    assert.equal(buffers[0].byteLength, input.byteLength);
    const back = decoder.decode(head, buffers) as Record<string, unknown>;
    assert.equal(back.before, 1);
    assert.equal(back.after, 2);
    assertSameTyped(back.t, input, `${ctor.name} out of band`);
  }
});

Deno.test("codec: the out-of-band buffer aliases the input (a write shows through)", () => {
  const input = new Uint8Array(INLINE_BYTES_MAX);
  const { buffers } = encoder.encode(input);
  assert.equal(buffers.length, 1);
  input[100] = 42;
  assert.equal(buffers[0][100], 42);
});

Deno.test("codec: INLINE_BYTES_MAX is the boundary, and inlineBytesMax overrides it", () => {
  assert.equal(encoder.encode(new Uint8Array(INLINE_BYTES_MAX - 1)).buffers.length, 0);
  assert.equal(encoder.encode(new Uint8Array(INLINE_BYTES_MAX)).buffers.length, 1);
  assert.equal(encoder.encode(new Float32Array(INLINE_BYTES_MAX / 4 - 1)).buffers.length, 0);
  assert.equal(encoder.encode(new Float32Array(INLINE_BYTES_MAX / 4)).buffers.length, 1);
  const small = new Encoder({ inlineBytesMax: 8 });
  assert.equal(small.encode(new Uint8Array(7)).buffers.length, 0);
  assert.equal(small.encode(new Uint8Array(8)).buffers.length, 1);
  const always = new Encoder({ inlineBytesMax: 0 });
  const empty = always.encode(new Int32Array(0));
  assert.equal(empty.buffers.length, 1);
  assertSameTyped(decoder.decode(empty.head, empty.buffers), new Int32Array(0), "empty out of band");
});

Deno.test("codec: several out-of-band buffers keep their order", () => {
  const a = patterned(Uint8Array, INLINE_BYTES_MAX, 1);
  const b = patterned(Float64Array, INLINE_BYTES_MAX / 8, 2);
  const c = patterned(Int16Array, INLINE_BYTES_MAX / 2, 3);
  const { head, buffers } = encoder.encode([a, { b }, new Set([c])]);
  assert.equal(buffers.length, 3);
  assert.equal(buffers[0].buffer, a.buffer);
  assert.equal(buffers[1].buffer, b.buffer);
  assert.equal(buffers[2].buffer, c.buffer);
  const back = decoder.decode(head, buffers) as [unknown, { b: unknown }, Set<unknown>];
  assertSameTyped(back[0], a, "a");
  assertSameTyped(back[1].b, b, "b");
  assertSameTyped([...back[2]][0], c, "c");
  // The head says which frame is which: hand b's and c's frames (same size) swapped.
  const swapped = decoder.decode(head, [buffers[0], buffers[2], buffers[1]]) as [unknown, { b: unknown }];
  assert.equal((swapped[1].b as object).constructor, Float64Array);
  assert.deepEqual(bytesOf(swapped[1].b as Float64Array), bytesOf(c));
});

Deno.test("codec: subarray views with an odd byteOffset send only their own bytes", () => {
  const backing = new Uint8Array(64);
  for (let i = 0; i < backing.length; i++) backing[i] = i;
  const view = backing.subarray(3, 14);
  assert.deepEqual(roundTrip(view), Uint8Array.from({ length: 11 }, (_, i) => i + 3));
  const i8 = new Int8Array(backing.buffer, 5, 9);
  assertSameTyped(roundTrip(i8), i8, "Int8Array at offset 5");
  const clamped = new Uint8ClampedArray(backing.buffer, 7, 3);
  assertSameTyped(roundTrip(clamped), clamped, "Uint8ClampedArray at offset 7");
  // Wider kinds cannot sit at odd offsets; a non-zero aligned offset is the equivalent.
  const f64 = new Float64Array(new ArrayBuffer(80), 24, 4);
  f64.set([1.5, -0, Infinity, 7]);
  const f64Back = roundTrip(f64) as Float64Array;
  assertSameTyped(f64Back, f64, "Float64Array at offset 24");
  assert.ok(Object.is(f64Back[1], -0));
  const i32 = new Int32Array(new ArrayBuffer(40), 4, 3);
  i32.set([-1, 2 ** 31 - 1, -(2 ** 31)]);
  assert.deepEqual(Array.from(roundTrip(i32) as Int32Array), [-1, 2 ** 31 - 1, -(2 ** 31)]);
  const u64 = new BigUint64Array(new ArrayBuffer(48), 8, 2);
  u64.set([2n ** 64n - 1n, 3n]);
  assert.deepEqual(Array.from(roundTrip(u64) as BigUint64Array), [2n ** 64n - 1n, 3n]);
});

Deno.test("codec: large subarray views out of band keep their offset", () => {
  const backing = new Uint8Array(INLINE_BYTES_MAX + 100);
  for (let i = 0; i < backing.length; i++) backing[i] = i & 0xff;
  const view = backing.subarray(3, 3 + INLINE_BYTES_MAX + 1);
  const { head, buffers } = encoder.encode(view);
  assert.equal(buffers.length, 1);
  assert.equal(buffers[0].buffer, backing.buffer);
  assert.equal(buffers[0].byteOffset, 3);
  assert.equal(buffers[0].byteLength, INLINE_BYTES_MAX + 1);
  assertSameTyped(decoder.decode(head, buffers), view, "odd-offset out of band");

  const f64 = new Float64Array(new ArrayBuffer(INLINE_BYTES_MAX + 64), 16, INLINE_BYTES_MAX / 8);
  f64.fill(2.5);
  const enc = encoder.encode(f64);
  assert.equal(enc.buffers[0].byteOffset, 16);
  assertSameTyped(decoder.decode(enc.head, enc.buffers), f64, "Float64Array at offset 16");
});

Deno.test("codec: an out-of-band frame is used in place when aligned and copied when not", () => {
  const input = patterned(Float64Array, INLINE_BYTES_MAX / 8, 9);
  const { head } = encoder.encode(input);
  const aligned = new Uint8Array(new ArrayBuffer(input.byteLength + 16), 8, input.byteLength);
  aligned.set(bytesOf(input));
  const inPlace = decoder.decode(head, [aligned]) as Float64Array;
  assertSameTyped(inPlace, input, "aligned frame");
  assert.equal(inPlace.buffer, aligned.buffer, "an aligned frame is not copied");

  const odd = new Uint8Array(new ArrayBuffer(input.byteLength + 16), 3, input.byteLength);
  odd.set(bytesOf(input));
  const copied = decoder.decode(head, [odd]) as Float64Array;
  assertSameTyped(copied, input, "misaligned frame");
  assert.equal(copied.byteOffset % 8, 0);
});

Deno.test("codec: ArrayBuffer round-trips, inline and out of band", () => {
  const small = new Uint8Array([1, 2, 3, 250]).buffer;
  const back = roundTrip(small);
  assert.ok(back instanceof ArrayBuffer, `decoded to ${String(back)}`);
  assert.deepEqual(new Uint8Array(back), new Uint8Array(small));
  assert.ok(roundTrip(new ArrayBuffer(0)) instanceof ArrayBuffer);

  const large = patterned(Uint8Array, INLINE_BYTES_MAX + 1, 4).buffer as ArrayBuffer;
  const { head, buffers } = encoder.encode({ large });
  assert.equal(buffers.length, 1);
  assert.equal(buffers[0].buffer, large, "same memory, not a copy");
  const out = (decoder.decode(head, buffers) as { large: unknown }).large;
  assert.ok(out instanceof ArrayBuffer);
  assert.deepEqual(new Uint8Array(out), new Uint8Array(large));
  // A frame that is a window into a larger buffer yields exactly the window.
  const window = new Uint8Array(large.byteLength + 10);
  window.set(new Uint8Array(large), 5);
  const fromWindow = (decoder.decode(head, [window.subarray(5, 5 + large.byteLength)]) as { large: unknown })
    .large;
  assert.ok(fromWindow instanceof ArrayBuffer);
  assert.equal((fromWindow as ArrayBuffer).byteLength, large.byteLength);
  assert.deepEqual(new Uint8Array(fromWindow as ArrayBuffer), new Uint8Array(large));
});

// ---------------------------------------------------------------------------------------
// Date, Set, Map, Ref

Deno.test("codec: Date round-trips to the millisecond", () => {
  const times = [0, 1, -1, 999, 1000, -1001, 1_700_000_000_123, -62_135_596_800_000, 8.64e15, -8.64e15];
  for (const t of times) {
    const back = roundTrip(new Date(t));
    assert.ok(back instanceof Date, `${t} decoded to ${String(back)}`);
    assert.equal(back.getTime(), t);
  }
});

Deno.test("codec: msgpack timestamp 32, 64 and 96 decode", () => {
  // timestamp 32: seconds only.
  const t32 = decoder.decode(Uint8Array.of(0xd6, 0xff, 0x00, 0x00, 0x00, 0x10)) as Date;
  assert.equal(t32.getTime(), 16_000);
  // timestamp 64: 30-bit nanoseconds, 34-bit seconds. 2 s + 5_000_000 ns.
  const ns = 5_000_000;
  const t64bytes = new Uint8Array(10);
  t64bytes[0] = 0xd7;
  t64bytes[1] = 0xff;
  const v = new DataView(t64bytes.buffer);
  v.setUint32(2, ns * 4 + 0x1); // the top two bits of seconds in the low bits: 2^32 s
  v.setUint32(6, 2);
  const t64 = decoder.decode(t64bytes) as Date;
  assert.equal(t64.getTime(), (2 ** 32 + 2) * 1000 + 5);
  // timestamp 96: u32 nanoseconds then i64 seconds.
  const t96bytes = new Uint8Array(15);
  t96bytes.set([0xc7, 12, 0xff]);
  const w = new DataView(t96bytes.buffer);
  w.setUint32(3, 250_000_000);
  w.setBigInt64(7, -3n);
  assert.equal((decoder.decode(t96bytes) as Date).getTime(), -2750);
});

Deno.test("codec: Set and Map round-trip with nested and non-string keys", () => {
  const set = new Set<unknown>([1, "two", null, [3], { four: 4 }, 5n]);
  const setBack = roundTrip(set);
  assert.ok(setBack instanceof Set);
  assert.deepEqual(setBack, set);
  assert.deepEqual(roundTrip(new Set()), new Set());

  const map = new Map<unknown, unknown>([
    ["a", 1],
    [2, "b"],
    [null, [1, 2]],
    [true, new Set([1])],
    [3n, new Map([["inner", new Date(5)]])],
  ]);
  const mapBack = roundTrip(map);
  assert.ok(mapBack instanceof Map);
  assert.deepEqual(mapBack, map);
  assert.deepEqual(roundTrip(new Map()), new Map());

  const { head } = encoder.encode(new Set([1]));
  assert.equal(head[0], 0xc9, "Set travels as ext 32");
  assert.equal(head[5], EXT_SET);
  assert.equal(encoder.encode(new Map([[1, 2]])).head[5], EXT_MAP);

  const big = new Set(Array.from({ length: 70_000 }, (_, i) => i));
  assert.deepEqual(roundTrip(big), big);
});

Deno.test("codec: Set and Map grow the encoder's buffer while writing their payload", () => {
  const fresh = new Encoder();
  const value = new Map([["k", "x".repeat(200_000)], ["j", "y".repeat(100_000)]]);
  const { head } = fresh.encode(new Set([value]));
  assert.ok(head.length > 300_000);
  assert.deepEqual(decoder.decode(head), new Set([value]));
});

Deno.test("codec: Ref decodes to a Ref with the same key", () => {
  for (const key of ["x", "", "a-much-longer-key-" + "k".repeat(300), "ключ😀"]) {
    const back = roundTrip(ref(key));
    assert.ok(back instanceof Ref, `${key}: ${String(back)}`);
    assert.equal(back.key, key);
  }
  const nested = roundTrip({ args: [ref("x"), 3, new Ref("y")] }) as { args: unknown[] };
  assert.ok(nested.args[0] instanceof Ref);
  assert.equal((nested.args[0] as Ref).key, "x");
  assert.equal(nested.args[1], 3);
  assert.equal((nested.args[2] as Ref).key, "y");
  const head = encoder.encode(ref("ab")).head;
  assert.deepEqual(head, Uint8Array.of(0xd5, EXT_REF, 0x61, 0x62));
  assert.throws(() => new Ref(1 as unknown as string), TypeError);
});

Deno.test("codec: the byte examples in PROTOCOL.md", () => {
  const cases: [unknown, number[]][] = [
    [{ op: "ping", id: 1, args: {} }, [
      0x83,
      ...[0xa2, 0x6f, 0x70, 0xa4, 0x70, 0x69, 0x6e, 0x67],
      ...[0xa2, 0x69, 0x64, 0x01],
      ...[0xa4, 0x61, 0x72, 0x67, 0x73, 0x80],
    ]],
    [{ reply: 1, result: "pong" }, [
      0x82,
      ...[0xa5, 0x72, 0x65, 0x70, 0x6c, 0x79, 0x01],
      ...[0xa6, 0x72, 0x65, 0x73, 0x75, 0x6c, 0x74, 0xa4, 0x70, 0x6f, 0x6e, 0x67],
    ]],
    [0n, [0xd4, 0x01, 0x00]],
    [-300n, [0xc7, 0x03, 0x01, 0x01, 0x01, 0x2c]],
    [ref("a"), [0xd4, 0x06, 0x61]],
    [new Set([1, "a"]), [0xc9, 0, 0, 0, 4, 0x04, 0x92, 0x01, 0xa1, 0x61]],
    [new Map([[1, 2]]), [0xc9, 0, 0, 0, 3, 0x05, 0x92, 0x01, 0x02]],
    [new Int16Array([1, -2]), [0xc7, 0x05, 0x02, 0x03, 0x01, 0x00, 0xfe, 0xff]],
    [new Date(1500), [0xc7, 0x0c, 0xff, 0x1d, 0xcd, 0x65, 0x00, 0, 0, 0, 0, 0, 0, 0, 0x01]],
    ["abcdefghij", [0xaa, ...new TextEncoder().encode("abcdefghij")]],
    ["abcdefghijk", [0xd9, 0x0b, ...new TextEncoder().encode("abcdefghijk")]],
    ["a\uD800", [0xd6, 0x07, 0x61, 0x00, 0x00, 0xd8]],
  ];
  for (const [value, bytes] of cases) {
    const { head, buffers } = encoder.encode(value);
    assert.equal(buffers.length, 0);
    assert.deepEqual(head, Uint8Array.from(bytes), `bytes of ${String(value)}`);
    assert.deepEqual(decoder.decode(head), value);
  }
  // {a: new Uint8Array(16384), b: new Float64Array(2048)}: a head of 21 bytes, two buffers.
  const a = new Uint8Array(16384);
  const b = new Float64Array(2048);
  const { head, buffers } = encoder.encode({ a, b });
  assert.deepEqual(
    head,
    Uint8Array.of(
      ...[0x82, 0xa1, 0x61, 0xc7, 0x05, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00],
      ...[0xa1, 0x62, 0xc7, 0x05, 0x03, 0x08, 0x00, 0x00, 0x00, 0x01],
    ),
  );
  assert.equal(buffers.length, 2);
  assert.equal(buffers[0].buffer, a.buffer);
  assert.equal(buffers[1].buffer, b.buffer);
});

Deno.test("codec: past BUFFERS_MAX out-of-band buffers, binary values go inline", () => {
  const big = patterned(Uint8Array, INLINE_BYTES_MAX, 3);
  const values = Array.from({ length: BUFFERS_MAX + 2 }, () => big);
  const { head, buffers } = encoder.encode(values);
  assert.equal(buffers.length, BUFFERS_MAX);
  assert.ok(head.length > 2 * INLINE_BYTES_MAX, "the last two travel inside the head");
  const back = decoder.decode(head, buffers) as unknown[];
  assert.equal(back.length, BUFFERS_MAX + 2);
  for (const i of [0, BUFFERS_MAX - 1, BUFFERS_MAX, BUFFERS_MAX + 1]) {
    assertSameTyped(back[i], big, `item ${i}`);
  }
});

Deno.test("codec: frames no extension refers to are ignored", () => {
  const { head } = encoder.encode([1, "x"]);
  assert.deepEqual(decoder.decode(head, [new Uint8Array(5), new Uint8Array(0)]), [1, "x"]);
});

Deno.test("codec: a value with one of everything round-trips", () => {
  const value = {
    n: [0, -1, 1.5, 2 ** 40],
    s: "tëxt",
    b: [true, false, null],
    big: -(2n ** 70n),
    d: new Date(123456789),
    set: new Set(["a"]),
    map: new Map([[1, { deep: [new Int32Array([1, -2])] }]]),
    r: ref("key"),
    bytes: Uint8Array.of(1, 2),
    large: new Float32Array(INLINE_BYTES_MAX / 4).fill(0.25),
    ab: Uint8Array.of(7).buffer,
  };
  const back = roundTrip(value) as typeof value;
  assert.deepEqual(back, value);
});

Deno.test("codec: the encoder is reusable and each head is its own copy", () => {
  const fresh = new Encoder();
  const first = fresh.encode({ a: "first" });
  const second = fresh.encode({ a: "other" });
  assert.deepEqual(decoder.decode(first.head), { a: "first" });
  assert.deepEqual(decoder.decode(second.head), { a: "other" });
  // A failed encode leaves nothing behind for the next one.
  assert.throws(() => fresh.encode([new Uint8Array(INLINE_BYTES_MAX), () => 1]), TypeError);
  const after = fresh.encode([1]);
  assert.deepEqual(after.head, Uint8Array.of(0x91, 0x01));
  assert.equal(after.buffers.length, 0);
  // A head longer than the encoder's initial 64 KiB.
  const long = "z".repeat(300_000);
  assert.equal(decoder.decode(fresh.encode(long).head), long);
});

Deno.test("codec: the decoder reads a head that is a view into a larger buffer", () => {
  const { head } = encoder.encode({ a: [1, 2.5, "s"], n: -70000 });
  const backing = new Uint8Array(head.length + 7);
  backing.fill(0xc1); // garbage on either side
  backing.set(head, 3);
  const view = backing.subarray(3, 3 + head.length);
  assert.deepEqual(decoder.decode(view), { a: [1, 2.5, "s"], n: -70000 });
});

// ---------------------------------------------------------------------------------------
// Unsendable values

Deno.test("codec: a function is refused with its path", () => {
  assertUnsendable({ a: [1, { f: () => 1 }] }, [/^Cannot send value\.a\[1\]\.f: /, /function/]);
  assertUnsendable(() => 1, [/^Cannot send value: a function/]);
  assertUnsendable({ "a b": [0, function named() {}] }, [/^Cannot send value\["a b"\]\[1\]: /]);
});

Deno.test("codec: a class instance is refused and named", () => {
  class Point {
    x = 1;
  }
  assertUnsendable({ p: new Point() }, [/^Cannot send value\.p: /, /a Point instance cannot travel/]);
  assertUnsendable([new DataView(new ArrayBuffer(2))], [/value\[0\]/, /DataView/]);
  assertUnsendable({ w: new WeakMap() }, [/value\.w/, /WeakMap/]);
  assertUnsendable({ e: new Error("x") }, [/value\.e/, /Error instance/]);
  class Sub extends Uint8Array {}
  assertUnsendable([new Sub(2)], [/value\[0\]/, /Sub instance/]);
});

Deno.test("codec: a symbol is refused", () => {
  assertUnsendable({ s: Symbol("x") }, [/^Cannot send value\.s: a symbol cannot travel/]);
  assertUnsendable(Symbol.iterator, [/^Cannot send value: a symbol/]);
});

Deno.test("codec: an invalid Date is refused", () => {
  assertUnsendable({ when: new Date(NaN) }, [/value\.when/, /invalid Date/]);
});

Deno.test("codec: a circular reference is refused at the depth limit", () => {
  const o: Record<string, unknown> = { name: "loop" };
  o.self = o;
  assertUnsendable(o, [/^Cannot send value\.self\.self\./, /nested deeper than 256 levels/, /circular/]);
  const a: unknown[] = [];
  a.push(a);
  assertUnsendable(a, [/^Cannot send value\[0\]\[0\]/, /circular/]);
});

Deno.test("codec: nesting up to VALUE_DEPTH_MAX encodes; one more is refused", () => {
  const nest = (levels: number): unknown => {
    let v: unknown = 1;
    for (let i = 0; i < levels; i++) v = [v];
    return v;
  };
  assert.deepEqual(roundTrip(nest(VALUE_DEPTH_MAX)), nest(VALUE_DEPTH_MAX));
  assertUnsendable(nest(VALUE_DEPTH_MAX + 1), [/nested deeper/]);
});

Deno.test("codec: Set and Map members name their index in the path", () => {
  assertUnsendable({ s: new Set([1, () => 1]) }, [/^Cannot send value\.s\[1\]: /]);
  assertUnsendable({ m: new Map<unknown, unknown>([["k", 1], ["j", Symbol()]]) }, [
    /^Cannot send value\.m\[1\]: /,
  ]);
});

Deno.test("codec: a custom root name shows in the message", () => {
  assertUnsendable({ fn: () => 1 }, [/^Cannot send args\.fn: /], "args");
  assertUnsendable([1, [2, Symbol()]], [/^Cannot send result\[1\]\[1\]: /], "result");
});

Deno.test("codec: formatPath quotes keys that are not identifiers", () => {
  assert.equal(formatPath("value", []), "value");
  assert.equal(formatPath("value", ["a", 0, "b_c$", "x-y", "", "1a"]), 'value.a[0].b_c$["x-y"][""]["1a"]');
});

// ---------------------------------------------------------------------------------------
// Interop with msgpackr

const packr = new Packr({ useRecords: false });
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: "number" });

// msgpackr has no handler for dist's ext types: register ones that just hand back the
// payload, so we can check it is a well-formed msgpack extension.
interface RawExt {
  ext: number;
  data: Uint8Array;
}
for (const type of [EXT_BIGINT, EXT_TYPED_INLINE, EXT_TYPED_FRAME, EXT_SET, EXT_MAP, EXT_REF]) {
  addExtension({ type, unpack: (data: Uint8Array): RawExt => ({ ext: type, data: Uint8Array.from(data) }) });
}

/** Replaces msgpackr's Buffers with plain Uint8Arrays so deepEqual compares contents. */
function plain(value: unknown): unknown {
  if (value instanceof Uint8Array) return Uint8Array.from(value);
  if (Array.isArray(value)) return value.map(plain);
  if (value && typeof value === "object" && Object.getPrototypeOf(value) === Object.prototype) {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  }
  return value;
}

const PLAIN_VALUES: unknown[] = [
  null,
  true,
  false,
  0,
  -0,
  127,
  128,
  255,
  256,
  65535,
  65536,
  2 ** 32 - 1,
  2 ** 32,
  Number.MAX_SAFE_INTEGER,
  -32,
  -33,
  -128,
  -129,
  -32768,
  -32769,
  -(2 ** 31),
  -(2 ** 31) - 1,
  Number.MIN_SAFE_INTEGER,
  1.5,
  -0.1,
  NaN,
  Infinity,
  -Infinity,
  "",
  "ascii",
  "a".repeat(31),
  "a".repeat(32),
  "a".repeat(255),
  "a".repeat(256),
  "a".repeat(65535),
  "a".repeat(65536),
  "日本語😀",
  [],
  [1, [2, [3, "x"]], null],
  Array.from({ length: 20 }, (_, i) => i),
  {},
  { a: 1, b: { c: ["d", { e: null }] } },
  Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`key${i}`, i])),
  Uint8Array.of(),
  Uint8Array.of(1, 2, 255),
  new Uint8Array(300).fill(7),
];

Deno.test("codec interop: msgpackr reads what our Encoder writes", () => {
  for (const value of PLAIN_VALUES) {
    const { head, buffers } = encoder.encode(value);
    assert.equal(buffers.length, 0);
    const theirs = unpackr.unpack(head);
    if (typeof value === "number") assert.ok(Object.is(theirs, value), `${value} -> ${theirs}`);
    else assert.deepEqual(plain(theirs), value, `for ${hex(head.subarray(0, 16))}`);
  }
  // Undefined fields are omitted and holes are nil, which msgpackr also reads as null.
  // deno-lint-ignore no-sparse-arrays
  assert.deepEqual(unpackr.unpack(encoder.encode({ a: undefined, b: [, 1] }).head), { b: [null, 1] });
});

Deno.test("codec interop: our Decoder reads what msgpackr writes", () => {
  for (const value of PLAIN_VALUES) {
    if (Object.is(value, -0)) continue; // msgpackr itself writes -0 as the integer 0
    const bytes = packr.pack(value);
    const ours = decoder.decode(Uint8Array.from(bytes));
    if (typeof value === "number") assert.ok(Object.is(ours, value), `${value} -> ${ours}`);
    else assert.deepEqual(ours, value, `for ${hex(Uint8Array.from(bytes).subarray(0, 16))}`);
  }
});

Deno.test("codec interop: float32, bigints and dates written by msgpackr", () => {
  const float32 = new Packr({ useRecords: false, useFloat32: FLOAT32_OPTIONS.ALWAYS });
  const f = Uint8Array.from(float32.pack(1.5));
  assert.equal(f[0], 0xca);
  assert.equal(decoder.decode(f), 1.5);

  assert.equal(decoder.decode(Uint8Array.from(packr.pack(2n ** 60n))), 2n ** 60n);
  assert.equal(decoder.decode(Uint8Array.from(packr.pack(-(2n ** 60n)))), -(2n ** 60n));

  // msgpackr picks timestamp 32, 64 or 96 by value; each must come back to the ms.
  for (const t of [0, 16_000, 1_700_000_000_123, -1, -62_135_596_800_000]) {
    const back = decoder.decode(Uint8Array.from(packr.pack(new Date(t))));
    assert.ok(back instanceof Date);
    assert.equal(back.getTime(), t);
  }
});

Deno.test("codec interop: msgpackr reads our Dates and sees our extensions as well-formed", () => {
  const date = unpackr.unpack(encoder.encode(new Date(1_700_000_000_123)).head);
  assert.ok(date instanceof Date);
  assert.equal(date.getTime(), 1_700_000_000_123);

  const large = new Float64Array(INLINE_BYTES_MAX / 8);
  const { head, buffers } = encoder.encode([
    -(2n ** 64n),
    Int16Array.of(1, -1),
    large,
    new Set([1, "a"]),
    new Map([["k", [2]]]),
    ref("key"),
    "after",
  ]);
  assert.equal(buffers.length, 1);
  const theirs = unpackr.unpack(head) as [RawExt, RawExt, RawExt, RawExt, RawExt, RawExt, string];
  assert.equal(theirs.length, 7);
  assert.equal(theirs[6], "after", "everything after the extensions is still in step");

  assert.equal(theirs[0].ext, EXT_BIGINT);
  assert.deepEqual(theirs[0].data, Uint8Array.of(1, 1, 0, 0, 0, 0, 0, 0, 0, 0));

  assert.equal(theirs[1].ext, EXT_TYPED_INLINE);
  assert.deepEqual(theirs[1].data, Uint8Array.of(3, ...bytesOf(Int16Array.of(1, -1))));

  assert.equal(theirs[2].ext, EXT_TYPED_FRAME);
  assert.deepEqual(theirs[2].data, Uint8Array.of(8, 0, 0, 0, 0)); // Float64Array, frame index 0

  assert.equal(theirs[3].ext, EXT_SET);
  assert.deepEqual(unpackr.unpack(theirs[3].data), [1, "a"]);

  assert.equal(theirs[4].ext, EXT_MAP);
  assert.deepEqual(unpackr.unpack(theirs[4].data), ["k", [2]]);

  assert.equal(theirs[5].ext, EXT_REF);
  assert.equal(new TextDecoder().decode(theirs[5].data), "key");
});

// ---------------------------------------------------------------------------------------
// Malformed input

const RICH_VALUE = {
  n: [0, 127, 128, -33, 65536, 2 ** 40, -(2 ** 40), 1.25],
  s: ["", "short", "x".repeat(40), "é".repeat(200)],
  b: [true, false, null],
  big: [0n, -(2n ** 80n)],
  bytes: Uint8Array.of(1, 2, 3),
  typed: Int32Array.of(-5, 6),
  ab: Uint8Array.of(9).buffer,
  d: new Date(1_700_000_000_123),
  set: new Set([1, "two"]),
  map: new Map<unknown, unknown>([[1, "one"], ["k", [null]]]),
  r: ref("the-key"),
  large: new Uint8Array(INLINE_BYTES_MAX),
};

Deno.test("codec malformed: every strict prefix of a valid encoding is truncated", () => {
  const { head, buffers } = encoder.encode(RICH_VALUE);
  assert.deepEqual(decoder.decode(head, buffers), RICH_VALUE);
  for (let n = 0; n < head.length; n++) {
    assertMalformed(head.subarray(0, n), /^Malformed msgpack: /, buffers);
  }
  // Scalars: every cut is reported as truncated.
  const scalars = [
    300,
    70_000,
    2 ** 40,
    -100,
    -300,
    -70_000,
    -(2 ** 40),
    1.5,
    "abc",
    "x".repeat(40),
    "y".repeat(300),
    Uint8Array.of(1, 2),
    5n,
    new Date(3),
    ref("k"),
    Int16Array.of(1),
  ];
  for (const value of scalars) {
    const bytes = encoder.encode(value).head;
    for (let n = 0; n < bytes.length; n++) assertMalformed(bytes.subarray(0, n), /truncated/);
  }
  const float32 = Uint8Array.of(0xca, 0x3f, 0xc0, 0x00, 0x00);
  for (let n = 1; n < float32.length; n++) assertMalformed(float32.subarray(0, n), /truncated/);
  // Containers: a cut may also show as more items claimed than bytes remain.
  for (const value of [[1, 2], { a: 1 }, new Set([1]), new Map([[1, 2]])]) {
    const bytes = encoder.encode(value).head;
    for (let n = 0; n < bytes.length; n++) assertMalformed(bytes.subarray(0, n), /truncated|container/);
  }
  assertMalformed([], /truncated/);
});

Deno.test("codec malformed: trailing bytes", () => {
  const { head } = encoder.encode({ a: 1 });
  const extra = new Uint8Array(head.length + 2);
  extra.set(head);
  assertMalformed(extra, /2 bytes after the value/);
  assertMalformed([0xc0, 0xc0], /1 bytes after the value/);
});

Deno.test("codec malformed: 0xc1 is never used", () => {
  assertMalformed([0xc1], /byte 0xc1 at offset 0 starts no value/);
  assertMalformed([0x92, 0x01, 0xc1], /0xc1 at offset 2/);
});

Deno.test("codec malformed: huge declared lengths are refused before allocating", () => {
  const cases: [number[], RegExp][] = [
    [[0xdb, 0xff, 0xff, 0xff, 0xff, 0x61], /truncated/], // str32
    [[0xda, 0xff, 0xff, 0x61], /truncated/], // str16
    [[0xd9, 0xff, 0x61], /truncated/], // str8
    [[0xc6, 0xff, 0xff, 0xff, 0xff, 0x00], /truncated/], // bin32
    [[0xc5, 0xff, 0xff, 0x00], /truncated/], // bin16
    [[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02], /container of 4294967295 items/], // array32
    [[0xdc, 0xff, 0xff, 0x01], /container of 65535 items/], // array16
    [[0xdf, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02], /container/], // map32
    [[0xdf, 0x80, 0x00, 0x00, 0x00, 0x01, 0x02], /container/], // map32, 2^31 pairs
    [[0xde, 0xff, 0xff, 0x01, 0x02], /container/], // map16
    [[0xc9, 0xff, 0xff, 0xff, 0xff, EXT_TYPED_INLINE, 0x00], /truncated/], // ext32
    [[0xc9, 0xff, 0xff, 0xff, 0xff, EXT_SET, 0x90], /truncated/],
    [[0x9f, 0x01], /container of 15 items in 1 bytes/], // fixarray
  ];
  for (const [bytes, pattern] of cases) assertMalformed(bytes, pattern);
});

Deno.test("codec malformed: a reference to a missing out-of-band frame", () => {
  const { head, buffers } = encoder.encode([
    new Uint8Array(INLINE_BYTES_MAX),
    new Uint8Array(INLINE_BYTES_MAX),
  ]);
  assert.equal(buffers.length, 2);
  assertMalformed(head, /reference to frame 1, which the message lacks/);
  assertMalformed(head, /reference to frame 2, which the message lacks/, [buffers[0]]);
  // Hand-written: frame index 7.
  assertMalformed([0xc7, 5, EXT_TYPED_FRAME, 0, 0, 0, 0, 7], /frame 8/, [new Uint8Array(1)]);
  // A frame reference whose payload is not 5 bytes.
  assertMalformed([0xd6, EXT_TYPED_FRAME, 0, 0, 0, 0], /5 bytes/, [new Uint8Array(1)]);
});

Deno.test("codec malformed: unknown extension types", () => {
  assertMalformed([0xd4, 8, 0], /unknown extension type 8/);
  assertMalformed([0xd4, 0, 0], /unknown extension type 0/); // msgpackr's "undefined"
  assertMalformed([0xc7, 0, 0x7f], /unknown extension type 127/);
  assertMalformed([0xd4, 0xfe, 0], /unknown extension type -2/);
});

Deno.test("codec malformed: unknown typed array kinds", () => {
  assertMalformed([0xd5, EXT_TYPED_INLINE, 13, 0], /unknown typed array kind 13/);
  assertMalformed([0xd4, EXT_TYPED_INLINE, 255], /unknown typed array kind 255/);
  assertMalformed([0xc7, 5, EXT_TYPED_FRAME, 200, 0, 0, 0, 0], /unknown typed array kind 200/, [
    new Uint8Array(8),
  ]);
  assertMalformed([0xc7, 0, EXT_TYPED_INLINE], /empty typed array/);
  if (!Float16) assertMalformed([0xd5, EXT_TYPED_INLINE, 11, 0], /unknown typed array kind 11/);
});

Deno.test("codec malformed: byte length not a multiple of the element size", () => {
  assertMalformed([0xd6, EXT_TYPED_INLINE, 5, 1, 2, 3], /3 bytes do not make a Int32Array/);
  assertMalformed([0xd5, EXT_TYPED_INLINE, 3, 1], /1 bytes do not make a Int16Array/);
  assertMalformed([0xc7, 5, EXT_TYPED_FRAME, 8, 0, 0, 0, 0], /7 bytes do not make a Float64Array/, [
    new Uint8Array(7),
  ]);
  assertMalformed([0xc7, 5, EXT_TYPED_FRAME, 9, 0, 0, 0, 0], /BigInt64Array/, [new Uint8Array(12)]);
});

Deno.test("codec malformed: invalid UTF-8", () => {
  assertMalformed([0xa2, 0xc3, 0x28]); // short string, fast path
  assertMalformed([0xa1, 0xff]);
  assertMalformed([0xa3, 0xed, 0xa0, 0x80]); // an encoded surrogate
  const long = [0xd9, 30, ...new Array(29).fill(0x61), 0x80]; // long string, TextDecoder path
  assertMalformed(long);
  assertMalformed([0x81, 0xa1, 0xc0, 0x01]); // as a map key
  assertMalformed([0xd5, EXT_REF, 0x61, 0xff]); // inside a Ref
  // The cause is kept for whoever wants it.
  try {
    decoder.decode(Uint8Array.of(0xa1, 0xff));
    assert.fail("should throw");
  } catch (error) {
    assert.ok(error instanceof ProtocolError);
    assert.ok(error.cause instanceof TypeError);
  }
});

Deno.test("codec malformed: nesting deeper than VALUE_DEPTH_MAX", () => {
  const nested = (levels: number, open: number[]): Uint8Array => {
    const out: number[] = [];
    for (let i = 0; i < levels; i++) out.push(...open);
    out.push(0x01);
    return Uint8Array.from(out);
  };
  assert.ok(Array.isArray(decoder.decode(nested(VALUE_DEPTH_MAX, [0x91]))));
  assertMalformed(nested(VALUE_DEPTH_MAX + 1, [0x91]), /nested deeper than 256/);
  assertMalformed(nested(100_000, [0x91]), /nested deeper than 256/);
  assertMalformed(nested(VALUE_DEPTH_MAX + 1, [0x81, 0xa0]), /nested deeper than 256/);
});

Deno.test("codec malformed: bad Set, Map, bigint and timestamp payloads", () => {
  assertMalformed([0xd4, EXT_SET, 0x01], /exactly one array/); // not an array
  assertMalformed([0xc7, 3, EXT_SET, 0x91, 0x01, 0x01], /exactly one array/); // bytes left over
  assertMalformed([0xd5, EXT_MAP, 0x91, 0x01], /key-value pairs/);
  assertMalformed([0xc7, 0, EXT_BIGINT], /empty bigint/);
  assertMalformed([0xd5, EXT_BIGINT, 2, 1], /bigint sign byte 2/);
  assertMalformed([0xd4, EXT_BIGINT, 0xff], /bigint sign byte 255/);
  assertMalformed([0xd5, 0xff, 0, 0], /timestamp of 2 bytes/);
  assertMalformed([0xc7, 5, 0xff, 0, 0, 0, 0, 0], /timestamp of 5 bytes/);
});

Deno.test("codec malformed: the decoder works again after an error", () => {
  assertMalformed([0x92, 0x01]);
  assert.deepEqual(decoder.decode(Uint8Array.of(0x92, 0x01, 0x02)), [1, 2]);
});

Deno.test("codec fuzz: random bytes either decode or throw ProtocolError", () => {
  const seed = fuzzSeed();
  const next = xorshift32(seed);
  const frames = [new Uint8Array(16), new Uint8Array(7)];
  // Bias towards bytes that start containers, strings and extensions so the decoder
  // gets past the first byte more often.
  const interesting = [0x90, 0x91, 0x9f, 0x80, 0x81, 0xa3, 0xc4, 0xc7, 0xc9, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8];
  for (let iter = 0; iter < 3000; iter++) {
    const length = next() % 48;
    const bytes = new Uint8Array(length);
    for (let i = 0; i < length; i++) {
      const r = next();
      bytes[i] = r % 4 === 0 ? interesting[(r >>> 8) % interesting.length] : (r >>> 8) & 0xff;
      if (r % 7 === 0 && i + 1 < length) bytes[++i] = (r >>> 16) % 13; // ext types and kinds
    }
    try {
      decoder.decode(bytes, frames);
    } catch (error) {
      assert.ok(
        error instanceof ProtocolError,
        `seed ${seed} iteration ${iter}: ${hex(bytes)} threw ${String(error)}`,
      );
    }
  }
});

Deno.test("codec fuzz: mutated valid encodings either decode or throw ProtocolError", () => {
  const seed = fuzzSeed() ^ 0x5bd1e995;
  const next = xorshift32(seed);
  const { head, buffers } = encoder.encode(RICH_VALUE);
  for (let iter = 0; iter < 2000; iter++) {
    const bytes = head.slice();
    const flips = 1 + (next() % 4);
    for (let f = 0; f < flips; f++) bytes[next() % bytes.length] = next() & 0xff;
    const cut = next() % 5 === 0 ? next() % bytes.length : bytes.length;
    const input = bytes.subarray(0, cut);
    try {
      decoder.decode(input, buffers);
    } catch (error) {
      assert.ok(
        error instanceof ProtocolError,
        `seed ${seed} iteration ${iter}: threw ${String(error)} for ${hex(input)}`,
      );
    }
  }
});

// ---------------------------------------------------------------------------------------
// Regression: the decoder once counted a Set or Map as two levels of nesting (the ext,
// then its payload array) where the encoder counts one, so a value the encoder accepted
// could be refused by the decoder on the other side.

function nest(levels: number, wrap: (v: unknown) => unknown, inner: unknown = 1): unknown {
  let v = inner;
  for (let i = 0; i < levels; i++) v = wrap(v);
  return v;
}

/** Encodes `value` (which must be accepted) and asserts that it decodes back. */
function assertDecodesWhatEncodes(value: unknown, label: string): void {
  const { head, buffers } = encoder.encode(value); // accepted: within VALUE_DEPTH_MAX
  let back: unknown;
  try {
    back = decoder.decode(head, buffers);
  } catch (error) {
    assert.fail(`${label} encodes but does not decode: ${(error as Error).message}`);
  }
  assert.deepEqual(back, value);
}

Deno.test("codec: whatever the encoder accepts, the decoder accepts (nested Sets)", () => {
  for (const levels of [128, 129, 200, VALUE_DEPTH_MAX]) {
    assertDecodesWhatEncodes(nest(levels, (v) => new Set([v])), `${levels} nested Sets`);
  }
});

Deno.test("codec: whatever the encoder accepts, the decoder accepts (nested Maps)", () => {
  for (const levels of [128, 129, 200, VALUE_DEPTH_MAX]) {
    assertDecodesWhatEncodes(nest(levels, (v) => new Map([[0, v]])), `${levels} nested Maps`);
  }
});

Deno.test("codec: whatever the encoder accepts, the decoder accepts (a Set at the deepest level)", () => {
  // 255 arrays around one Set: 256 containers, exactly VALUE_DEPTH_MAX.
  const value = nest(VALUE_DEPTH_MAX - 1, (v) => [v], new Set([1]));
  assertDecodesWhatEncodes(value, "a Set inside 255 arrays");
});

Deno.test("codec: one decoder gives every map key right, however many keys share its cache's slots", () => {
  const seed = 7_204;
  console.log(`seed ${seed}`);
  const rng = new Rng(seed);
  const alphabet = "abcdefghijklmnopqrstuvwxyz_0123456789é😀\uFFFD";
  const chars = Array.from(alphabet);
  const packr = new Packr({ useRecords: false });
  const decoder = new Decoder();
  for (let m = 0; m < 2_000; m++) {
    const value: Record<string, number> = {};
    for (let k = 0; k < 1 + rng.int(6); k++) {
      const length = rng.int(18);
      let key = "";
      for (let i = 0; i < length; i++) key += chars[rng.int(chars.length)];
      value[key] = m;
    }
    assert.deepEqual(decoder.decode(packr.pack(value)), value, `message ${m}`);
  }
  // A key that is not UTF-8 is refused, cached keys of its length or not.
  packr.pack({ "\uFFFD": 0, é: 0 });
  assert.deepEqual(decoder.decode(packr.pack({ "\uFFFD": 1 })), { "\uFFFD": 1 });
  assert.throws(() => decoder.decode(new Uint8Array([0x81, 0xa1, 0xff, 0x01])), ProtocolError);
  assert.throws(() => decoder.decode(new Uint8Array([0x81, 0xa2, 0xc3, 0x28, 0x01])), ProtocolError);
  assert.deepEqual(decoder.decode(packr.pack({ é: 3 })), { é: 3 });
});
