/**
 * The nodes' defaults that `dist --help` shows, in a file of their own so that main.ts
 * can print them without loading a node's code (each command loads only its own).
 *
 * @module
 */

/** Default for the largest frame, and the largest message, a node accepts: 1 GiB. */
export const FRAME_BYTES_MAX = 1024 * 1024 * 1024;
/** Default time a peer has to complete the handshake. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/** Most connections a node keeps open at once; more are closed on arrival. */
export const CONNECTIONS_MAX = 10_000;

/** The auth token from the environment (DIST_AUTH_TOKEN), when the process may read it. */
export function tokenFromEnv(): string | undefined {
  try {
    if (Deno.permissions.querySync({ name: "env", variable: "DIST_AUTH_TOKEN" }).state !== "granted") {
      return undefined;
    }
    return Deno.env.get("DIST_AUTH_TOKEN") || undefined;
  } catch {
    return undefined;
  }
}

/** Default scheduler port, as Dask's. */
export const SCHEDULER_PORT = 8786;
/** Default dashboard port, as Dask's. */
export const DASHBOARD_PORT = 8787;
/** Default time after which a worker that sent no heartbeat is removed. */
export const WORKER_TTL_MS = 30_000;
/** Default number of deaths a task may cause before it fails with KilledWorker. */
export const ALLOWED_FAILURES = 3;
/** Default for how long a worker keeps trying to reach its scheduler: 60 s. */
export const DEATH_TIMEOUT_MS = 60_000;
/** Default for how many large values (1 MiB or more) a worker sends at once. */
export const TRANSFERS_OUT_MAX = 8;
/**
 * Default for how long tasks wait with no worker to run them (none connected, or none
 * their restrictions allow) before they fail: a future never hangs for good.
 */
export const NO_WORKERS_TIMEOUT_MS = 60_000;
/**
 * Default for how long keys that a registering worker brings back, and that nobody
 * wants, are kept for a client to claim them. After a scheduler restart, workers and
 * clients come back in any order: a client reconnects within its backoff (at most 2 s
 * between attempts) and asks again for what it holds; whatever nobody asked for by then
 * is freed, so no key outlives what wants it.
 */
export const UNCLAIMED_GRACE_MS = 10_000;

/** Share of a worker's memory limit that values in memory may take before they spill (Dask's `target`). */
export const MEMORY_TARGET_FRACTION = 0.6;
/** Share of a worker's memory limit its process may take before values spill to make room (Dask's `spill`). */
export const MEMORY_SPILL_FRACTION = 0.7;
/** Share of a worker's memory limit past which it starts no task and no fetch (Dask's `pause`). */
export const MEMORY_PAUSE_FRACTION = 0.8;

/** Share of a worker's memory limit past which its nanny kills it and starts a new one (Dask's `terminate`). */
export const MEMORY_TERMINATE_FRACTION = 0.95;

/** Exit code of a command given bad flags or arguments (the nanny does not restart it). */
export const EXIT_USAGE = 2;
/** Exit code of a worker that gave up reaching its scheduler (`--death-timeout`): its nanny stops too. */
export const EXIT_SCHEDULER_LOST = 3;
/** Exit code of a worker past its memory's terminate share: its nanny starts a new one. */
export const EXIT_MEMORY = 4;
