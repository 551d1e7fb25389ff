/**
 * The worker side of functions that travel: compile source once and keep it, import
 * modules once and keep them.
 *
 * @module
 */

import type { FunctionSpec } from "../protocol/ops.ts";
import { Lru } from "../_lru.ts";

/** Functions an executor keeps by id; the pool mirrors it (same size, same order of use). */
export const EXECUTOR_FUNCTIONS_MAX = 256;
/** Most compiled functions a worker keeps; the oldest go first. */
export const FUNCTION_CACHE_MAX = 1024;

// deno-lint-ignore no-explicit-any
type Fn = (...args: any[]) => unknown;

/** A bounded cache of compiled functions, keyed by their source (or module and name). */
export class FunctionCache {
  #cache = new Lru<string, Fn>(FUNCTION_CACHE_MAX);

  /** How many functions are cached. */
  get size(): number {
    return this.#cache.size;
  }

  /** The function `spec` names, compiled or imported on first use. */
  async get(spec: FunctionSpec): Promise<Fn> {
    const cacheKey = "source" in spec ? spec.source : `${spec.module}\0${spec.name}`;
    let fn = this.#cache.get(cacheKey);
    if (fn === undefined) {
      fn = "source" in spec ? compile(spec.source) : await importFunction(spec.module, spec.name);
      this.#cache.set(cacheKey, fn);
    }
    return fn;
  }
}

function compile(source: string): Fn {
  let fn: unknown;
  try {
    // Indirect eval: the source sees globals only, never this module's scope.
    fn = (0, eval)(`(${source}\n)`);
  } catch (error) {
    throw new SyntaxError(`The function's source does not compile: ${(error as Error).message}`);
  }
  if (typeof fn !== "function") throw new TypeError(`The source evaluates to a ${typeof fn}, not a function`);
  return fn as Fn;
}

async function importFunction(module: string, name: string): Promise<Fn> {
  let mod: Record<string, unknown>;
  try {
    mod = await import(module);
  } catch (error) {
    throw new TypeError(`Cannot import module ${module}: ${(error as Error).message}`);
  }
  const fn = mod[name];
  if (typeof fn !== "function") {
    throw new TypeError(`Module ${module} has no exported function ${JSON.stringify(name)}`);
  }
  return fn as Fn;
}

/**
 * Calls `fn`, turning a ReferenceError from a variable the function closed over into
 * advice: only the function's source travels, not the variables around it.
 */
export async function callFunction(fn: Fn, args: unknown[]): Promise<unknown> {
  try {
    return await fn(...args);
  } catch (error) {
    if (error instanceof ReferenceError && /is not defined/.test(error.message)) {
      error.message += ` (the function refers to a variable outside its own body; only its source travels, ` +
        `so pass the value as an argument, or import the function by { module, name })`;
    }
    throw error;
  }
}
