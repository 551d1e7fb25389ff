/**
 * A bounded map that forgets its least recently used entry when full. Two LRUs of the
 * same size touched in the same order hold the same keys: the scheduler and a worker
 * (or a worker and an executor) use that to agree on which functions the other side
 * still has, without asking.
 *
 * @module
 */

/** A map of at most `max` entries; `get` and `set` make an entry the most recent. */
export class Lru<K, V> {
  #map = new Map<K, V>();
  #max: number;
  /** The most recent key, when known: touching it again changes nothing (most touches, in a map of tasks). */
  #last: K | undefined = undefined;

  /** Holds at most `max` entries. */
  constructor(max: number) {
    this.#max = max;
  }

  /** How many entries it holds. */
  get size(): number {
    return this.#map.size;
  }

  /** The value of `key`, now the most recent; undefined when absent. */
  get(key: K): V | undefined {
    const value = this.#map.get(key);
    if (value !== undefined && key !== this.#last) {
      this.#map.delete(key);
      this.#map.set(key, value);
      this.#last = key;
    }
    return value;
  }

  /** Whether it holds `key` (without touching it). */
  has(key: K): boolean {
    return this.#map.has(key);
  }

  /** Sets `key`, the most recent now; returns the entry it forgot to make room, if any. */
  set(key: K, value: V): [K, V] | undefined {
    this.#map.delete(key);
    this.#map.set(key, value);
    this.#last = key;
    if (this.#map.size <= this.#max) return undefined;
    const oldest = this.#map.entries().next().value!;
    this.#map.delete(oldest[0]);
    return oldest;
  }

  /** Every entry, least recent first (without touching them). */
  entries(): IterableIterator<[K, V]> {
    return this.#map.entries();
  }

  /** Removes `key`. */
  delete(key: K): boolean {
    return this.#map.delete(key);
  }
}
