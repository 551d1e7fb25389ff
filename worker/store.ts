/**
 * A worker's data: values by key, each with its size in bytes.
 *
 * @module
 */

import { Encoder, Ref } from "../protocol/codec.ts";

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

/** Values by key, with their sizes. */
export class DataStore {
  #values = new Map<string, unknown>();
  #nbytes = new Map<string, number>();

  /** How many keys it holds. */
  get size(): number {
    return this.#values.size;
  }

  /** Whether it holds `key`. */
  has(key: string): boolean {
    return this.#values.has(key);
  }

  /** The value of `key` (undefined when absent). */
  get(key: string): unknown {
    return this.#values.get(key);
  }

  /** Stores `value` under `key` (undefined as null: it must travel); returns its size. */
  set(key: string, value: unknown, nbytes = nbytesOf(value, key)): number {
    this.#values.set(key, value === undefined ? null : value);
    this.#nbytes.set(key, nbytes);
    return nbytes;
  }

  /** Deletes `key`; true if it was there. */
  delete(key: string): boolean {
    this.#nbytes.delete(key);
    return this.#values.delete(key);
  }

  /** Every key held. */
  keys(): string[] {
    return [...this.#values.keys()];
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

  /** Total bytes held. */
  totalBytes(): number {
    let n = 0;
    for (const v of this.#nbytes.values()) n += v;
    return n;
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
