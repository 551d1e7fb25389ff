/**
 * What the scheduler knows, and nothing it does: which workers exist and which keys
 * each holds. Changed only through the methods below; the server shell turns messages
 * into these calls and carries out what they return.
 *
 * @module
 */

import type { WorkerInfo } from "../protocol/ops.ts";

/** A registered worker. */
export interface WorkerRecord {
  /** Where it listens. */
  address: string;
  /** Its name. */
  name: string;
  /** How many tasks it runs at once. */
  nthreads: number;
  /** The keys it holds. */
  keys: Set<string>;
  /** The bytes it holds, by the nbytes reported for its keys. */
  nbytes: number;
}

/** Which workers exist and who holds what. */
export class SchedulerState {
  /** Registered workers by address. */
  readonly workers = new Map<string, WorkerRecord>();
  /** For each key, the workers that hold a copy. */
  readonly whoHas = new Map<string, Set<string>>();
  /** Each key's size in bytes, as reported. */
  readonly nbytes = new Map<string, number>();

  /**
   * Adds a worker with the keys it already holds. A worker that registers again (a
   * reconnect) replaces its old record.
   */
  addWorker(
    w: {
      address: string;
      name?: string;
      nthreads?: number;
      keys?: string[];
      nbytes?: Record<string, number>;
    },
  ): void {
    if (this.workers.has(w.address)) this.removeWorker(w.address);
    this.workers.set(w.address, {
      address: w.address,
      name: w.name || w.address,
      nthreads: w.nthreads ?? 1,
      keys: new Set(),
      nbytes: 0,
    });
    this.addKeys(w.address, w.keys ?? [], w.nbytes);
  }

  /** Removes a worker; returns the keys that had their last copy there. */
  removeWorker(address: string): string[] {
    const worker = this.workers.get(address);
    if (worker === undefined) return [];
    const lost: string[] = [];
    for (const key of worker.keys) {
      const holders = this.whoHas.get(key)!;
      holders.delete(address);
      if (holders.size === 0) {
        this.whoHas.delete(key);
        this.nbytes.delete(key);
        lost.push(key);
      }
    }
    this.workers.delete(address);
    return lost;
  }

  /** Records that `address` holds `keys`. Throws for a worker that never registered. */
  addKeys(address: string, keys: readonly string[], nbytes: Record<string, number> = {}): void {
    const worker = this.#worker(address);
    for (const key of keys) {
      const size = nbytes[key] ?? this.nbytes.get(key) ?? 0;
      if (worker.keys.has(key)) worker.nbytes -= this.nbytes.get(key) ?? 0;
      else worker.keys.add(key);
      worker.nbytes += size;
      this.nbytes.set(key, size);
      let holders = this.whoHas.get(key);
      if (holders === undefined) this.whoHas.set(key, holders = new Set());
      holders.add(address);
    }
  }

  /** Records that `address` no longer holds `keys`. */
  removeKeys(address: string, keys: readonly string[]): void {
    const worker = this.#worker(address);
    for (const key of keys) {
      if (!worker.keys.delete(key)) continue;
      worker.nbytes -= this.nbytes.get(key) ?? 0;
      const holders = this.whoHas.get(key)!;
      holders.delete(address);
      if (holders.size === 0) {
        this.whoHas.delete(key);
        this.nbytes.delete(key);
      }
    }
  }

  /** Forgets `keys` everywhere; returns, per worker, the keys it must delete. */
  deleteKeys(keys: readonly string[]): Map<string, string[]> {
    const orders = new Map<string, string[]>();
    for (const key of keys) {
      for (const address of this.whoHas.get(key) ?? []) {
        let list = orders.get(address);
        if (list === undefined) orders.set(address, list = []);
        list.push(key);
      }
    }
    for (const [address, list] of orders) this.removeKeys(address, list);
    return orders;
  }

  /** `{ key: [address, ...] }` for `keys` (all keys when omitted); unknown keys map to []. */
  whoHasOf(keys?: readonly string[]): Record<string, string[]> {
    const out: Record<string, string[]> = {};
    for (const key of keys ?? this.whoHas.keys()) out[key] = [...(this.whoHas.get(key) ?? [])];
    return out;
  }

  /** `{ address: [key, ...] }` for `workers` (all when omitted); unknown workers map to []. */
  hasWhatOf(workers?: readonly string[]): Record<string, string[]> {
    const out: Record<string, string[]> = {};
    for (const address of workers ?? this.workers.keys()) {
      out[address] = [...(this.workers.get(address)?.keys ?? [])];
    }
    return out;
  }

  /** `{ address: nthreads }`. */
  ncores(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [address, w] of this.workers) out[address] = w.nthreads;
    return out;
  }

  /** Every worker, as the `workers` op replies. */
  workerList(): WorkerInfo[] {
    return [...this.workers.values()].map((w) => ({
      address: w.address,
      name: w.name,
      nthreads: w.nthreads,
      nkeys: w.keys.size,
      nbytes: w.nbytes,
    }));
  }

  #worker(address: string): WorkerRecord {
    const worker = this.workers.get(address);
    if (worker === undefined) throw new RangeError(`Unknown worker ${address}: it must register first`);
    return worker;
  }
}
