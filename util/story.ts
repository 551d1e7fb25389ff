/**
 * What the pure state objects share: a bounded story of moves, and the empty set records
 * start with.
 *
 * @module
 */

/** One move of a key from one state to another, and why. */
export interface Move<S extends string> {
  /** ms, the clock the state object was given. */
  time: number;
  key: string;
  from: S;
  to: S;
  /** The event that caused it, and why. */
  reason: string;
}

/**
 * The last `max` moves of all keys together, oldest first. Once full, a move is written
 * over the oldest in place: recording allocates nothing.
 */
export class Story<S extends string> {
  readonly #moves: Move<S>[] = [];
  #next = 0;
  readonly #max: number;

  constructor(max: number) {
    this.#max = max;
  }

  /** Records a move. */
  record(time: number, key: string, from: S, to: S, reason: string): void {
    if (this.#moves.length < this.#max) {
      this.#moves.push({ time, key, from, to, reason });
      return;
    }
    const e = this.#moves[this.#next];
    e.time = time;
    e.key = key;
    e.from = from;
    e.to = to;
    e.reason = reason;
    this.#next = (this.#next + 1) % this.#max;
  }

  /** The moves of `key` still kept, oldest first (copies). */
  of(key: string): Move<S>[] {
    const n = this.#moves.length;
    const out: Move<S>[] = [];
    for (let i = 0; i < n; i++) {
      const e = this.#moves[(this.#next + i) % n];
      if (e.key === key) out.push({ ...e });
    }
    return out;
  }
}

/**
 * The empty set records' sets start as: most records never need most of them, and an
 * empty Set costs ~150 bytes. Never added to: `withItem` gives a record a set of its own.
 */
export const NONE: Set<never> = new (class extends Set<never> {
  override add(): never {
    throw new Error("internal: a record's shared empty set was added to (use withItem)");
  }
})();

/** `set` with `item` in it: the shared empty set is replaced by a new one. */
export function withItem<T>(set: Set<T>, item: T): Set<T> {
  if (set === NONE) return new Set([item]);
  set.add(item);
  return set;
}
