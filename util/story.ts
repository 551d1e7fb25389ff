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

/**
 * A set of at most one item, for a record's set that most often holds one (the client
 * that wants a key, the task that needs it): ~32 bytes where a Set of one is ~140. Added
 * to only through `withItem`, which makes it a Set when a second item comes.
 */
class OneSet<T> implements Set<T> {
  #item: T | undefined;
  #full: boolean;
  constructor(item: T) {
    this.#item = item;
    this.#full = true;
  }
  get size(): number {
    return this.#full ? 1 : 0;
  }
  has(item: T): boolean {
    return this.#full && this.#item === item;
  }
  add(): this {
    throw new Error("internal: a record's set of one was added to (use withItem)");
  }
  /** Holds `item` if it is empty or holds it already; false if it holds another. */
  fill(item: T): boolean {
    if (this.#full) return this.#item === item;
    this.#item = item;
    this.#full = true;
    return true;
  }
  /** Its item (undefined when empty). */
  get item(): T | undefined {
    return this.#item;
  }
  delete(item: T): boolean {
    if (!this.has(item)) return false;
    this.#item = undefined;
    this.#full = false;
    return true;
  }
  clear(): void {
    this.#item = undefined;
    this.#full = false;
  }
  forEach(fn: (value: T, key: T, set: Set<T>) => void, thisArg?: unknown): void {
    if (this.#full) fn.call(thisArg, this.#item as T, this.#item as T, this);
  }
  *values(): SetIterator<T> {
    if (this.#full) yield this.#item as T;
  }
  keys(): SetIterator<T> {
    return this.values();
  }
  *entries(): SetIterator<[T, T]> {
    if (this.#full) yield [this.#item as T, this.#item as T];
  }
  [Symbol.iterator](): SetIterator<T> {
    return this.values();
  }
  get [Symbol.toStringTag](): string {
    return "Set";
  }
  union<U>(other: ReadonlySetLike<U>): Set<T | U> {
    return new Set(this).union(other);
  }
  intersection<U>(other: ReadonlySetLike<U>): Set<T & U> {
    return new Set(this).intersection(other);
  }
  difference<U>(other: ReadonlySetLike<U>): Set<T> {
    return new Set(this).difference(other);
  }
  symmetricDifference<U>(other: ReadonlySetLike<U>): Set<T | U> {
    return new Set(this).symmetricDifference(other);
  }
  isSubsetOf(other: ReadonlySetLike<unknown>): boolean {
    return new Set(this).isSubsetOf(other);
  }
  isSupersetOf(other: ReadonlySetLike<unknown>): boolean {
    return new Set(this).isSupersetOf(other);
  }
  isDisjointFrom(other: ReadonlySetLike<unknown>): boolean {
    return new Set(this).isDisjointFrom(other);
  }
}

/**
 * `set` with `item` in it: the shared empty set becomes a set of one, a set of one holding
 * another item a Set of two.
 */
export function withItem<T>(set: Set<T>, item: T): Set<T> {
  if (set === NONE) return new OneSet(item);
  if (set instanceof OneSet) return set.fill(item) ? set : new Set([set.item as T, item]);
  set.add(item);
  return set;
}
