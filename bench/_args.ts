/**
 * The command line of a benchmark: strict options, `--help`, and a usage line for
 * anything it does not know.
 *
 * @module
 */

import { parseArgs } from "node:util";

type Options = Record<string, { type: "boolean" | "string"; default?: string | boolean }>;
type Values<O extends Options> = { [K in keyof O]?: O[K]["type"] extends "boolean" ? boolean : string };

/**
 * Parses `Deno.args` against `options` (and `--help`). Returns the values, or the exit
 * code once it has printed `usage`: 0 for `--help`, 2 (with what was wrong) for an option
 * it does not know or one without its value.
 */
export function benchArgs<O extends Options>(usage: string, options: O): Values<O> | number {
  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({
      args: Deno.args,
      options: { ...options, help: { type: "boolean" } },
      strict: true,
    }));
  } catch (error) {
    console.error(`${(error as Error).message.split("\n")[0]}\n${usage}`);
    return 2;
  }
  if (values.help) {
    console.log(usage);
    return 0;
  }
  return values as Values<O>;
}
