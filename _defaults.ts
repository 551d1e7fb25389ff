/**
 * The nodes' defaults that `dist --help` shows, in a file of their own so that main.ts
 * can print them without loading a node's code (each command loads only its own).
 *
 * @module
 */

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
