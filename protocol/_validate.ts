/**
 * Small schemas for op arguments: each checks an unknown value at the boundary and
 * names the field and what was wrong, so handlers only ever see valid data.
 *
 * @module
 */

import { parseAddress } from "./address.ts";

/** Checks and types one value. */
export interface Schema<T> {
  /** Returns the value typed, or throws TypeError naming `path`. */
  parse(value: unknown, path: string): T;
  /** What the schema expects, for messages: "an array of strings". */
  readonly expected: string;
  /** True for fields that may be absent. */
  readonly optional?: boolean;
}

/** The type a schema checks for. */
export type Infer<S> = S extends Schema<infer T> ? T : never;

/** Names the type of a value for error messages. */
export function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (value instanceof Uint8Array) return "bytes";
  if (ArrayBuffer.isView(value)) return `a ${value.constructor.name}`;
  const type = typeof value;
  if (type === "object") {
    const proto = Object.getPrototypeOf(value);
    return proto === Object.prototype || proto === null
      ? "an object"
      : `a ${proto.constructor?.name ?? "object"}`;
  }
  // A bigint's decimal form costs time superlinear in its size; its hex length is cheap.
  if (type === "bigint") return `a bigint (${(value as bigint).toString(16).length * 4} bits or so)`;
  return `${type === "undefined" ? "nothing" : `a ${type}`} (${String(value).slice(0, 40)})`;
}

/**
 * Where `key` has a lone surrogate (half of a UTF-16 pair, e.g. from cutting "😀" in two),
 * or -1 when it is well-formed.
 */
function loneSurrogateAt(key: string): number {
  for (let i = 0; i < key.length; i++) {
    const c = key.charCodeAt(i);
    if (c < 0xd800 || c > 0xdfff) continue;
    if (c <= 0xdbff && i + 1 < key.length) {
      const d = key.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        i++;
        continue;
      }
    }
    return i;
  }
  return -1;
}

/**
 * Throws a TypeError unless `key` is a string that is well-formed Unicode: a key with a lone
 * surrogate would not be the same key on every node and language (UTF-8 cannot carry it).
 * `what` names it in the message: "submit: key".
 */
export function checkKey(key: unknown, what = "Key"): asserts key is string {
  if (typeof key !== "string") throw new TypeError(`${what} must be a string, got ${describe(key)}`);
  if (key.isWellFormed()) return;
  throw new TypeError(
    `${what} ${JSON.stringify(key)} is not a well-formed string: a lone surrogate at index ${
      loneSurrogateAt(key)
    }; cut strings at code points (Array.from(s)), or use s.toWellFormed()`,
  );
}

/**
 * The error of a part that failed, with `where` (the part's path) in front of its
 * message. Containers check their parts with the path "" and name a part only when it
 * fails: a message checked whole builds no path strings (most of what checking a task's
 * report cost the scheduler).
 */
function at(error: unknown, where: string): Error {
  if (!(error instanceof Error)) return new TypeError(`${where}: ${String(error)}`);
  const Kind = error instanceof RangeError ? RangeError : TypeError;
  return new Kind(`${where}${error.message}`);
}

function fail(path: string, expected: string, value: unknown): never {
  throw new TypeError(`${path}: expected ${expected}, got ${describe(value)}`);
}

function schema<T>(expected: string, check: (v: unknown) => boolean): Schema<T> {
  return {
    expected,
    parse(value, path) {
      if (!check(value)) fail(path, expected, value);
      return value as T;
    },
  };
}

/** Any string. */
export const string: Schema<string> = schema("a string", (v) => typeof v === "string");
/**
 * A key: a well-formed string (see `checkKey`). It says "a string" where it expects one,
 * so "an array of strings" reads as before; a lone surrogate gets its own message.
 */
export const key: Schema<string> = {
  expected: "a string",
  parse(value, path) {
    if (typeof value !== "string") fail(path, "a string", value);
    if (!value.isWellFormed()) {
      throw new TypeError(
        `${path}: expected a well-formed string (a key), got one with a lone surrogate at index ${
          loneSurrogateAt(value)
        }`,
      );
    }
    return value;
  },
};
/** A non-empty string. */
export const name: Schema<string> = schema(
  "a non-empty string",
  (v) => typeof v === "string" && v.length > 0,
);
/**
 * A node address, `tcp://host:port` or `tls://host:port`: on the wire always with its
 * scheme (the form nodes give and compare), though people may type `host:port`.
 */
export const address: Schema<string> = {
  expected: "an address tcp://host:port",
  parse(value, path) {
    if (typeof value !== "string" || !/^(tcp|tls):\/\//.test(value)) {
      fail(path, "an address tcp://host:port", value);
    }
    try {
      parseAddress(value);
    } catch (error) {
      throw new TypeError(`${path}: ${(error as Error).message}`);
    }
    return value;
  },
};
/** An absolute module specifier: a URL (`file:`, `https:`, ...) or `npm:`/`jsr:`. */
export const moduleSpecifier: Schema<string> = schema(
  "an absolute module specifier (file:, https:, npm:, ...)",
  (v) => typeof v === "string" && /^[a-z][a-z0-9+.-]*:/i.test(v),
);
/** true or false. */
export const boolean: Schema<boolean> = schema("a boolean", (v) => typeof v === "boolean");
/** A finite number. */
export const number: Schema<number> = schema(
  "a finite number",
  (v) => typeof v === "number" && Number.isFinite(v),
);
/** A whole number from 0 up. */
export const count: Schema<number> = schema(
  "a whole number from 0 up",
  (v) => typeof v === "number" && Number.isSafeInteger(v) && v >= 0,
);
/** A whole number from 1 up. */
export const positive: Schema<number> = schema(
  "a whole number from 1 up",
  (v) => typeof v === "number" && Number.isSafeInteger(v) && v >= 1,
);
/** Anything that arrived (values are user data). */
export const unknown: Schema<unknown> = { expected: "any value", parse: (v) => v };

/** A field that may be absent (or null). */
export function optional<T>(inner: Schema<T>): Schema<T | undefined> & { optional: true } {
  return {
    expected: inner.expected,
    optional: true,
    parse: (v, path) => (v === undefined || v === null ? undefined : inner.parse(v, path)),
  };
}

/** An array whose items all match `item`. */
export function arrayOf<T>(item: Schema<T>, options: { itemsMax?: number } = {}): Schema<T[]> {
  const expected = `an array of ${item.expected.replace(/^an? /, "")}s`;
  return {
    expected,
    parse(value, path) {
      if (!Array.isArray(value)) fail(path, expected, value);
      if (options.itemsMax !== undefined && value.length > options.itemsMax) {
        throw new RangeError(`${path}: at most ${options.itemsMax} items, got ${value.length}`);
      }
      for (let i = 0; i < value.length; i++) {
        try {
          item.parse(value[i], "");
        } catch (error) {
          throw at(error, `${path}[${i}]`);
        }
      }
      return value as T[];
    },
  };
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v)) return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

/**
 * An object used as a map: any keys, every value matching `item`. With `keys`, every
 * field name must match it too (a record of data by key checks its keys are keys).
 */
export function recordOf<T>(
  item: Schema<T>,
  options: { keys?: Schema<string> } = {},
): Schema<Record<string, T>> {
  const expected = `an object of ${item.expected.replace(/^an? /, "")} values`;
  return {
    expected,
    parse(value, path) {
      if (!isPlainObject(value)) fail(path, expected, value);
      for (const k in value) {
        try {
          options.keys?.parse(k, "");
        } catch (error) {
          throw at(error, `${path} field ${JSON.stringify(k)}`);
        }
        try {
          item.parse(value[k], "");
        } catch (error) {
          throw at(error, `${path}.${k}`);
        }
      }
      return value as Record<string, T>;
    },
  };
}

type Shape = Record<string, Schema<unknown>>;
type Required<S extends Shape> = {
  [K in keyof S as S[K] extends { optional: true } ? never : K]: Infer<S[K]>;
};
type Optional<S extends Shape> = {
  [K in keyof S as S[K] extends { optional: true } ? K : never]?: Infer<S[K]>;
};
type Flatten<T> = { [K in keyof T]: T[K] };
/** The typed object an object schema checks for. */
export type ObjectOf<S extends Shape> = Flatten<Required<S> & Optional<S>>;

/** An object with exactly these fields (unknown fields are refused: they are typos). */
export function object<S extends Shape>(shape: S): Schema<ObjectOf<S>> {
  const keys = Object.keys(shape);
  const expected = keys.length === 0 ? "an object with no fields" : `an object with ${keys.join(", ")}`;
  return {
    expected,
    parse(value, path) {
      if (value === undefined || value === null) value = {};
      if (!isPlainObject(value)) fail(path, expected, value);
      for (const key in value) {
        // Own fields only: `in` would let inherited names through ("toString", "__proto__").
        if (!Object.hasOwn(shape, key)) {
          throw new TypeError(
            `${path}: unknown field ${JSON.stringify(key)} (known: ${keys.join(", ") || "none"})`,
          );
        }
      }
      // Nil optional fields become absent, so handlers' defaults apply, as the protocol
      // promises: then (or when a field's check gives another value) the result is a
      // fresh object of the checked fields; otherwise the value itself, checked (no copy
      // of every task of a graph).
      const given = value as Record<string, unknown>;
      let out: Record<string, unknown> | null = null;
      for (let i = 0; i < keys.length; i++) {
        const key = keys[i];
        const s = shape[key];
        const present = Object.hasOwn(given, key);
        const v = present ? given[key] : undefined;
        if (v === undefined || v === null) {
          if (!s.optional) throw new TypeError(`${path}.${key}: missing (expected ${s.expected})`);
          if (present) out ??= checkedSoFar(given, keys, i);
          continue;
        }
        let checked: unknown;
        try {
          checked = s.parse(v, "");
        } catch (error) {
          throw at(error, `${path}.${key}`);
        }
        if (checked !== v) out ??= checkedSoFar(given, keys, i);
        if (out !== null) out[key] = checked;
      }
      return (out ?? given) as ObjectOf<S>;
    },
  };
}

/** A fresh object of `value`'s fields among the first `n` of `keys` that are not nil (checked already). */
function checkedSoFar(
  value: Record<string, unknown>,
  keys: readonly string[],
  n: number,
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (let i = 0; i < n; i++) {
    const v = Object.hasOwn(value, keys[i]) ? value[keys[i]] : undefined;
    if (v !== undefined && v !== null) out[keys[i]] = v;
  }
  return out;
}

/** One of several schemas; the first that accepts wins. */
export function oneOf<T>(expected: string, ...schemas: Schema<T>[]): Schema<T> {
  return {
    expected,
    parse(value, path) {
      for (const s of schemas) {
        try {
          return s.parse(value, path);
        } catch {
          // Try the next.
        }
      }
      return fail(path, expected, value);
    },
  };
}
