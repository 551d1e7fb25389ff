/**
 * How a function travels: its source text, or a module specifier and an export name.
 * The sender checks here what cannot travel as source, and says what to do instead.
 *
 * @module
 */

import { sha256, toBase64 } from "../util/sha256.ts";
import type { FunctionSpec } from "./ops.ts";

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
  const label = fn.name ? `function ${fn.name}` : "an anonymous function";
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
  if (!compiles(source)) {
    // A method (`add(a, b) { ... }`) prints without the `function` keyword.
    const method = /^(async\s+)?(\*\s*)?([\w$]+\s*\()/.exec(source);
    const rewritten = method &&
      source.replace(method[0], `${method[1] ?? ""}function${method[2] ?? " "}${method[3]}`);
    if (!rewritten || !compiles(rewritten)) {
      throw new TypeError(
        `Cannot send ${label}: its source does not compile on its own; send a plain function, or name it by module with { module, name }`,
      );
    }
    source = rewritten;
  }
  return { source };
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
