/**
 * Deterministic keys for pure tasks: the same function and arguments give the same
 * key, so repeated submits share one result.
 *
 * @module
 */

import { Encoder } from "../protocol/codec.ts";

const encoder = new Encoder();

/** Folds `bytes` into two 32-bit FNV-1a lanes with different seeds. */
function mix(bytes: Uint8Array, h: [number, number]): void {
  let [a, b] = h;
  for (let i = 0; i < bytes.length; i++) {
    const c = bytes[i];
    a = Math.imul(a ^ c, 0x01000193);
    b = Math.imul(b ^ c, 0x5bd1e995);
  }
  h[0] = a;
  h[1] = b;
}

/**
 * A 16-hex-digit token of a function and its arguments (whatever can travel), stable
 * across processes. It costs one encoding of each, linear in their size (the codec caps
 * what is slow to convert, like huge bigints), and names `args` paths in its errors.
 */
export function tokenize(fn: unknown, args: unknown[]): string {
  // A function's share of the hash is the same for every task of it: a map of 100,000
  // tasks encoded its source 100,000 times.
  let lanes = typeof fn === "string" ? sourceLanes.get(fn) : undefined;
  if (lanes === undefined) {
    const fresh: [number, number] = [0x811c9dc5, 0x9747b28c];
    mixValue(fn, "function", fresh);
    if (typeof fn === "string") {
      if (sourceLanes.size >= SOURCES_MAX) sourceLanes.clear();
      sourceLanes.set(fn, fresh);
    }
    lanes = fresh;
  }
  const h: [number, number] = [lanes[0], lanes[1]];
  mixValue(args, "args", h);
  return (h[0] >>> 0).toString(16).padStart(8, "0") + (h[1] >>> 0).toString(16).padStart(8, "0");
}

/** Function sources whose hash lanes are kept (all are dropped when it fills). */
const SOURCES_MAX = 1_000;
const sourceLanes = new Map<string, readonly [number, number]>();

function mixValue(value: unknown, root: string, h: [number, number]): void {
  // The head is the encoder's own memory until its next encode: mixed at once.
  const { head, buffers } = encoder.encode(value, root, true);
  mix(head, h);
  for (const b of buffers) mix(b, h);
}

/** 16 random hex digits, for keys of impure tasks and scattered data. */
export function randomToken(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
