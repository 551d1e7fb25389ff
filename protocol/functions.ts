/**
 * How a function travels: its source text, or a module specifier and an export name.
 * The sender checks here what cannot travel as source, and says what to do instead.
 *
 * @module
 */

import { sha256, toBase64 } from "../util/sha256.ts";
import type { FunctionSpec } from "./ops.ts";
import { freeVariables, ScopeError } from "./_scope.ts";
import { Lru } from "../util/lru.ts";

/**
 * Globals an executor (a Web Worker) has of its own: a function that reads one may mean
 * the script's (a variable of that name, or this process's value) and would silently get
 * the executor's. `globalThis.name` says which is meant. `const self = this` is a common
 * local: in an executor `self` is its own global object.
 */
const EXECUTOR_OWN = new Set([
  "self",
  "name",
  "close",
  "location",
  "navigator",
  "onmessage",
  "onmessageerror",
  "postMessage",
  "onerror",
  "onunhandledrejection",
]);
/** Globals of a main thread that no executor has (measured: a Deno main thread against a Worker). */
const MAIN_THREAD_ONLY = new Set([
  "closed",
  "alert",
  "confirm",
  "prompt",
  "localStorage",
  "sessionStorage",
  "onload",
  "onunload",
  "onbeforeunload",
  "Window",
  "Location",
  "Navigator",
  "Storage",
]);

/** Checked functions, by object: a map of 10,000 tasks parses its function once. */
const checked = new WeakMap<object, FunctionSpec>();
/** Most sources remembered as checked: a loop that submits a new arrow each time parses it once. */
const CHECKED_SOURCES_MAX = 1024;
const checkedSources = new Lru<string, FunctionSpec>(CHECKED_SOURCES_MAX);

/**
 * Refuses a function whose source reads a variable from outside its own body (a closure):
 * only the source travels, and the executor would fail on it (a ReferenceError) or, worse,
 * silently read a global of its own by that name. Globals every executor has (Math, JSON,
 * Deno, fetch, crypto, ...) are fine.
 */
function checkClosure(label: string, source: string): void {
  let free: Set<string>;
  try {
    free = freeVariables(source);
  } catch (error) {
    if (error instanceof ScopeError) return; // beyond the finder: the executor still explains a ReferenceError
    throw error;
  }
  for (const name of free) {
    if (EXECUTOR_OWN.has(name)) {
      throw new TypeError(
        `Cannot send ${label}: it reads ${name}, which the executor has as a global of its own, not this ` +
          `script's ${name}; pass the value as an argument, or write globalThis.${name} to mean the executor's`,
      );
    }
    if (!(name in globalThis) || MAIN_THREAD_ONLY.has(name)) {
      throw new TypeError(
        `Cannot send ${label}: it reads ${name}, a variable from outside its own body, and only the ` +
          `function's source travels; pass ${name} as an argument, or name the function by { module, name }`,
      );
    }
  }
}

/** A function dist can send: a plain JS function, or `{ module, name }`. */
// deno-lint-ignore no-explicit-any
export type Sendable = ((...args: any[]) => unknown) | FunctionSpec;

function compiles(source: string): boolean {
  try {
    // Compiled, never called: only the syntax is checked.
    new Function(`return (${source}\n);`);
    return true;
  } catch {
    return false;
  }
}

/**
 * A function's printed source as an expression that compiles on its own: as printed, or a
 * method's (`add(a, b) { ... }`, printed without `function`) with the keyword put back;
 * null when neither compiles (a getter, a method using `super`).
 */
export function standaloneSource(source: string): string | null {
  if (compiles(source)) return source;
  const method = /^(async\s+)?(\*\s*)?([\w$]+\s*\()/.exec(source);
  const rewritten = method &&
    source.replace(method[0], `${method[1] ?? ""}function${method[2] ?? " "}${method[3]}`);
  return rewritten && compiles(rewritten) ? rewritten : null;
}

/**
 * Turns a function into what travels. Throws TypeError for functions that cannot
 * travel as source (native, bound, classes), naming the function and the way out.
 */
export function toFunctionSpec(fn: unknown): FunctionSpec {
  if (typeof fn === "object" && fn !== null) {
    const spec = fn as Record<string, unknown>;
    if (typeof spec.module === "string" && typeof spec.name === "string") {
      if (!/^[a-z][a-z0-9+.-]*:/i.test(spec.module)) {
        const shown = `{ module: ${JSON.stringify(spec.module)}, name: ${JSON.stringify(spec.name)} }`;
        throw new TypeError(
          `Cannot send ${shown}: a worker cannot resolve a relative or bare module specifier; give an ` +
            `absolute one, e.g. { module: import.meta.resolve(${JSON.stringify(spec.module)}), name: ${
              JSON.stringify(spec.name)
            } }`,
        );
      }
      return { module: spec.module, name: spec.name };
    }
    if (typeof spec.source === "string") return { source: spec.source };
  }
  if (typeof fn !== "function") {
    throw new TypeError(
      `Cannot send the function: expected a function or { module, name }, got ${
        fn === null ? "null" : typeof fn
      }`,
    );
  }
  const known = checked.get(fn);
  if (known !== undefined) return known;
  // An arrow given as `{ function: (x) => ... }` takes the property's name, "function".
  const label = fn.name && fn.name !== "function" ? `function ${fn.name}` : "an anonymous function";
  let source = Function.prototype.toString.call(fn);
  if (/\{\s*\[native code\]\s*\}\s*$/.test(source)) {
    if (fn.name.startsWith("bound ")) {
      throw new TypeError(
        `Cannot send ${label}: a bound function's bound values cannot travel; send the unbound function and pass those values as arguments`,
      );
    }
    throw new TypeError(
      `Cannot send ${label}: it is built into the runtime, so it has no source; wrap it, e.g. (x) => Math.sqrt(x)`,
    );
  }
  if (/^class\b/.test(source)) {
    throw new TypeError(`Cannot send ${label}: it is a class; send a function that builds what you need`);
  }
  const standalone = standaloneSource(source);
  if (standalone === null) {
    throw new TypeError(
      `Cannot send ${label}: its source does not compile on its own; send a plain function, or name it by module with { module, name }`,
    );
  }
  source = standalone;
  let spec = checkedSources.get(source);
  if (spec === undefined) {
    checkClosure(label, source);
    spec = { source };
    checkedSources.set(source, spec);
  }
  checked.set(fn, spec);
  return spec;
}

const digests = new WeakMap<FunctionSpec, string>();

/**
 * A short digest that names a function spec: tables of functions keep this, never the
 * source itself, so thousands of large functions cannot fill a node's memory. Cached
 * per spec object (the tasks of one graph share theirs).
 */
export function functionKey(spec: FunctionSpec): string {
  let key = digests.get(spec);
  if (key === undefined) {
    const text = "source" in spec ? `s${spec.source}` : `m${spec.module}\0${spec.name}`;
    key = toBase64(sha256(text));
    digests.set(spec, key);
  }
  return key;
}
