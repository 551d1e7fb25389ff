/**
 * A progress bar in the terminal while futures complete; plain lines when output is
 * not a terminal (a log file, CI).
 *
 * @module
 */

import type { Future } from "./client.ts";

/** Options of `progress`. */
export interface ProgressOptions {
  /** Where to draw (default: stdout). */
  output?: { writeSync(p: Uint8Array): number; isTerminal(): boolean };
  /** How often to redraw, in ms (default 100). */
  intervalMs?: number;
  /** A label before the bar (default "tasks"). */
  label?: string;
}

const encoder = new TextEncoder();
const BAR_WIDTH = 40;

/**
 * Draws a bar while `futures` complete; resolves once all are done (finished, failed or
 * cancelled), with how many ended in each status. Without a terminal it prints a line
 * at each tenth.
 *
 * @example
 * ```ts
 * import { Client, progress } from "@dist/dist";
 * await using client = await Client.local({ workers: 2 });
 * const futures = client.map((x: number) => x * 2, [...Array(1000).keys()]);
 * await progress(futures); // [########################################] 100% 1000/1000 in 0.2 s
 * ```
 */
export async function progress(
  futures: readonly Future[],
  options: ProgressOptions = {},
): Promise<Record<string, number>> {
  const out = options.output ?? Deno.stdout;
  const tty = out.isTerminal();
  const label = options.label ?? "tasks";
  const total = futures.length;
  const started = performance.now();
  const write = (text: string) => {
    try {
      out.writeSync(encoder.encode(text));
    } catch {
      // Output closed: progress is a courtesy, never a failure.
    }
  };
  let done = 0;
  let printedTenth = -1;
  const draw = (final: boolean) => {
    const failed = futures.filter((f) => f.done() && f.status !== "finished").length;
    const fraction = total === 0 ? 1 : done / total;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const tail = `${Math.floor(fraction * 100)}% ${done}/${total}${
      failed ? `, ${failed} failed` : ""
    } in ${seconds} s`;
    if (tty) {
      const filled = Math.round(fraction * BAR_WIDTH);
      write(
        `\r${label} [${"#".repeat(filled)}${".".repeat(BAR_WIDTH - filled)}] ${tail}${final ? "\n" : ""}`,
      );
    } else {
      const tenth = Math.floor(fraction * 10);
      if (tenth > printedTenth || final) {
        if (!(final && tenth === printedTenth)) write(`${label}: ${tail}\n`);
        printedTenth = tenth;
      }
    }
  };
  const settled = Promise.all(futures.map((f) => f.wait().then(() => done++)));
  const timer = setInterval(() => draw(false), options.intervalMs ?? 100);
  try {
    draw(false);
    await settled;
  } finally {
    clearInterval(timer);
  }
  draw(true);
  const counts: Record<string, number> = {};
  for (const f of futures) counts[f.status] = (counts[f.status] ?? 0) + 1;
  return counts;
}
