/**
 * Connections to peers, opened on first use and kept: workers fetch from each other
 * and clients fetch results through one long-lived connection per peer.
 *
 * @module
 */

import type { Logger } from "../util/log.ts";
import { parseAddress } from "./address.ts";
import type { Comm, CommOptions } from "./comm.ts";
import { ConnectionClosedError } from "./errors.ts";
import { openComm, type SecurityOptions } from "./handshake.ts";

/** Most peer connections a pool keeps open; the least recently opened is closed past it. */
export const PEER_CONNECTIONS_MAX = 256;

/** A bounded set of connections to peers, by address. */
export class ConnectionPool {
  #peers = new Map<string, Promise<Comm>>();
  #options: CommOptions & SecurityOptions;
  #max: number;
  #closed = false;

  /** Connections get `options`; at most `max` stay open. */
  constructor(options: CommOptions & SecurityOptions & { log?: Logger } = {}, max = PEER_CONNECTIONS_MAX) {
    this.#options = options;
    this.#max = max;
  }

  /** The connection to `address`, opened if needed. A closed one is replaced. */
  get(address: string): Promise<Comm> {
    if (this.#closed) {
      return Promise.reject(
        new ConnectionClosedError(`Cannot connect to ${address}: the connection pool is closed`),
      );
    }
    let peer = this.#peers.get(address);
    if (peer !== undefined) return peer;
    if (this.#peers.size >= this.#max) {
      const [oldest, comm] = this.#peers.entries().next().value!;
      this.#peers.delete(oldest);
      comm.then((c) => c.close(), () => {});
    }
    const forget = () => {
      if (this.#peers.get(address) === peer) this.#peers.delete(address);
    };
    peer = openComm(parseAddress(address), this.#options).then((comm) => {
      comm.closed.then(forget);
      return comm;
    });
    peer.catch(forget);
    this.#peers.set(address, peer);
    return peer;
  }

  /** Closes every connection. */
  async close(): Promise<void> {
    this.#closed = true;
    const peers = await Promise.allSettled(this.#peers.values());
    this.#peers.clear();
    await Promise.all(peers.map((p) => p.status === "fulfilled" ? p.value.close() : undefined));
  }
}
