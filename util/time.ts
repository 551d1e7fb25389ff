/**
 * Waiting, shared by every node: a deadline to ask how much time is left, a capped
 * exponential backoff for retries, and a pause. One of each, so that reconnects, retries
 * and timeouts behave alike and are tested once.
 *
 * @module
 */

/** A clock in ms: monotonic by default, so a wall-clock step neither ends nor stretches a wait. */
export type Clock = () => number;

const monotonic: Clock = () => performance.now();

/** A moment ahead: how much time is left until it, and whether it has passed. */
export interface Deadline {
  /** Milliseconds left, never below 0 (Infinity for a deadline that never comes). */
  remaining(): number;
  /** True once the moment has come. */
  expired(): boolean;
}

/**
 * The deadline `ms` from now (Infinity: never; 0 or less: already passed). `clock` is
 * for tests that drive time by hand.
 */
export function deadline(ms: number, clock: Clock = monotonic): Deadline {
  if (Number.isNaN(ms)) throw new RangeError("Cannot set a deadline: ms is NaN");
  const at = clock() + ms;
  return {
    remaining: () => Math.max(0, at - clock()),
    expired: () => clock() >= at,
  };
}

/** Resolves after `ms` (at once for 0 or less). */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));
}

/** Options of a Backoff. */
export interface BackoffOptions {
  /** The first pause, in ms; each next one doubles. */
  firstMs: number;
  /** The longest pause, in ms. */
  maxMs: number;
  /**
   * "full": each pause is random between 0 and its step, so that callers turned away
   * together do not all come back together. "none" (default): the step itself, the
   * same every run.
   */
  jitter?: "full" | "none";
  /** The random source for full jitter, in [0, 1) (default Math.random; tests pass a seeded one). */
  random?: () => number;
}

/**
 * Pauses between retries: `firstMs`, then twice as long each time, at most `maxMs`,
 * with full jitter or none.
 */
export class Backoff {
  readonly #firstMs: number;
  readonly #maxMs: number;
  readonly #random: (() => number) | null;
  #stepMs: number;

  /** Builds a backoff; throws RangeError for a first pause that is not positive or a cap below it. */
  constructor(options: BackoffOptions) {
    const { firstMs, maxMs } = options;
    if (!(firstMs > 0) || !(maxMs >= firstMs)) {
      throw new RangeError(`Bad backoff: want 0 < firstMs <= maxMs, got firstMs ${firstMs}, maxMs ${maxMs}`);
    }
    this.#firstMs = this.#stepMs = firstMs;
    this.#maxMs = maxMs;
    this.#random = options.jitter === "full" ? options.random ?? Math.random : null;
  }

  /** The next pause in ms; the one after is twice as long, up to the cap. */
  next(): number {
    const stepMs = this.#stepMs;
    this.#stepMs = Math.min(this.#maxMs, stepMs * 2);
    return this.#random === null ? stepMs : this.#random() * stepMs;
  }

  /** Starts again from the first pause (after a success). */
  reset(): void {
    this.#stepMs = this.#firstMs;
  }

  /** Waits the next pause, cut short to what is left of `until`. */
  pause(until?: Deadline): Promise<void> {
    const ms = this.next();
    return delay(until === undefined ? ms : Math.min(ms, until.remaining()));
  }
}

/**
 * Settles as `promise` does, keeping the process alive meanwhile: closing what does not
 * keep it alive by itself (a client's idle connection, an embedded scheduler) must still
 * finish before a script's last `await` returns.
 */
export async function keepingAlive<T>(promise: Promise<T>): Promise<T> {
  const timer = setInterval(() => {}, 60_000);
  try {
    return await promise;
  } finally {
    clearInterval(timer);
  }
}
