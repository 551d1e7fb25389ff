/**
 * The scheduler file, as Dask's `--scheduler-file`: on a shared file system (an HPC
 * cluster's home directory) the scheduler writes where it listens, and workers and
 * clients started by the same batch job read it instead of being told an address.
 *
 * @module
 */

/** What a scheduler file holds (JSON). */
export interface SchedulerFile {
  /** Where the scheduler listens: `tcp://host:port` or `tls://host:port`. */
  address: string;
  /** Its dashboard, `http://host:port`, or null. */
  dashboard: string | null;
  /** The scheduler's id (a new one each time it starts). */
  id: string;
  /** When it started, ms since the epoch. */
  started: number;
}

/** How often a reader looks for a file that is not there yet. */
const POLL_MS = 100;

/**
 * Writes `info` to `path` whole or not at all (a reader never sees half a file): to a
 * file beside it, then renamed over it.
 */
export async function writeSchedulerFile(path: string, info: SchedulerFile): Promise<void> {
  const partial = `${path}.${crypto.randomUUID().slice(0, 8)}.partial`;
  try {
    await Deno.writeTextFile(partial, JSON.stringify(info, null, 2) + "\n");
    await Deno.rename(partial, path);
  } catch (error) {
    await Deno.remove(partial).catch(() => {});
    throw new Error(`Cannot write the scheduler file ${path}: ${(error as Error).message}`, { cause: error });
  }
}

/**
 * The scheduler's address from the file at `path`, waiting up to `timeoutMs` for the file
 * to appear (a batch job starts its workers and its scheduler at once). Throws an Error
 * that says what was wrong with the file, or that it never came.
 */
export async function readSchedulerFile(path: string, timeoutMs = 60_000): Promise<string> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    let text: string | null = null;
    try {
      text = await Deno.readTextFile(path);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) {
        throw new Error(`Cannot read the scheduler file ${path}: ${(error as Error).message}`, {
          cause: error,
        });
      }
    }
    if (text !== null) {
      let info: Partial<SchedulerFile>;
      try {
        info = JSON.parse(text);
      } catch {
        throw new Error(`The scheduler file ${path} is not JSON: is it a file a dist scheduler wrote?`);
      }
      if (typeof info?.address !== "string" || !/^(tcp|tls):\/\//.test(info.address)) {
        throw new Error(
          `The scheduler file ${path} has no scheduler address ("address": "tcp://host:port"): ` +
            `is it a file a dist scheduler wrote?`,
        );
      }
      return info.address;
    }
    if (performance.now() >= deadline) {
      throw new Error(
        `The scheduler file ${path} did not appear within ${
          (timeoutMs / 1000).toFixed(timeoutMs < 10_000 ? 1 : 0)
        } s: start the ` +
          `scheduler with --scheduler-file ${path} (on a file system this machine shares)`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}
