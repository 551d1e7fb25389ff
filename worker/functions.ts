/**
 * The worker side of functions that travel: compile source once and keep it, import
 * modules once and keep them.
 *
 * @module
 */

import type { FunctionSpec } from "../protocol/ops.ts";

/** Functions an executor keeps by id; the pool mirrors it (same size, same order of use). */
export const EXECUTOR_FUNCTIONS_MAX = 256;
/** A function a task runs. */
// deno-lint-ignore no-explicit-any
export type Fn = (...args: any[]) => unknown;

/** The function `spec` names: source compiled, or a module's export imported. */
export function loadFunction(spec: FunctionSpec): Promise<Fn> {
  return "source" in spec
    ? Promise.resolve().then(() => compile(spec.source))
    : importFunction(spec.module, spec.name);
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
    sandboxed(error);
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
    if (error instanceof ReferenceError) {
      error.message +=
        ` (if the function refers to a variable outside its own body: only its source travels, ` +
        `so pass the value as an argument, or import the function by { module, name })`;
    }
    throw sandboxed(error);
  }
}

/**
 * A task the sandbox refused something gets advice for the cluster, not Deno's (which
 * names an --allow-* flag of a process the task does not run as): `--task-permissions`
 * and the value that would allow it.
 */
export function sandboxed(error: unknown): unknown {
  if (!(error instanceof Error) || !/run again with the --allow-\w+ flag/.test(error.message)) return error;
  const denied = /Requires (\w+) access(?: to "([^"]*)")?/.exec(error.message);
  if (denied === null) return error;
  const [, name, what] = denied;
  const value = what === undefined ? name : `${name}=${what}`;
  const grant = what === undefined ? `{ ${name}: true }` : `{ ${name}: [${JSON.stringify(what)}] }`;
  error.message = error.message.replace(/,? ?run again with the --allow-\w+ flag\.?/, "") +
    `: tasks run with the worker's --task-permissions (default none); to allow this, start the workers ` +
    `(dist worker or dist local) with --task-permissions ${value}, or pass taskPermissions: ${grant} to ` +
    `Client.local`;
  return error;
}
