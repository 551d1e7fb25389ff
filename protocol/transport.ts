/**
 * The one file that opens sockets. Everything above sees `Conn` and `Listener`, so
 * tests and TLS can swap the transport.
 *
 * @module
 */

import { type Address, formatAddress } from "./address.ts";
import { ConnectionClosedError } from "./errors.ts";
import type { ByteReader, ByteWriter } from "./framing.ts";

/** A byte stream to a peer. */
export interface Conn extends ByteReader, ByteWriter {
  /** The peer's address, `tcp://host:port`. */
  readonly remoteAddress: string;
  /** This end's address; `host` is the local interface that reaches the peer. */
  readonly local: Address;
  /** Closes the stream; safe to call twice. */
  close(): void;
}

/** Accepts connections. */
export interface Listener extends AsyncIterable<Conn> {
  /** Where it listens, with the real port when asked for port 0. */
  readonly address: Address;
  /** Stops accepting; safe to call twice. */
  close(): void;
}

class TcpConn implements Conn {
  readonly remoteAddress: string;
  readonly local: Address;
  #conn: Deno.TcpConn;
  #closed = false;

  constructor(conn: Deno.TcpConn) {
    this.#conn = conn;
    conn.setNoDelay(true);
    const remote = conn.remoteAddr as Deno.NetAddr;
    const local = conn.localAddr as Deno.NetAddr;
    this.remoteAddress = formatAddress({ host: remote.hostname, port: remote.port });
    this.local = { host: local.hostname, port: local.port };
  }

  read(p: Uint8Array): Promise<number | null> {
    return this.#conn.read(p);
  }

  write(p: Uint8Array): Promise<number> {
    return this.#conn.write(p);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#conn.close();
    } catch {
      // Already closed by the runtime after an error: nothing left to release.
    }
  }
}

/** Opens a TCP connection; errors say which address failed and why. */
export async function connect(address: Address, options: { signal?: AbortSignal } = {}): Promise<Conn> {
  try {
    const conn = await Deno.connect({ hostname: address.host, port: address.port, signal: options.signal });
    return new TcpConn(conn);
  } catch (error) {
    const reason = error instanceof Deno.errors.ConnectionRefused
      ? "connection refused"
      : (error as Error).message;
    throw new ConnectionClosedError(`Cannot connect to ${formatAddress(address)}: ${reason}`, {
      cause: error,
    });
  }
}

/** Listens on `address` (port 0: any free port). */
export function listen(address: Address): Listener {
  let listener: Deno.TcpListener;
  try {
    listener = Deno.listen({ hostname: address.host, port: address.port, transport: "tcp" });
  } catch (error) {
    const reason = error instanceof Deno.errors.AddrInUse
      ? "the address is in use"
      : (error as Error).message;
    throw new Error(`Cannot listen at ${formatAddress(address)}: ${reason}`, { cause: error });
  }
  const addr = listener.addr as Deno.NetAddr;
  let closed = false;
  return {
    address: { host: addr.hostname, port: addr.port },
    close() {
      if (closed) return;
      closed = true;
      try {
        listener.close();
      } catch {
        // Closed already.
      }
    },
    async *[Symbol.asyncIterator]() {
      while (!closed) {
        let conn: Deno.TcpConn;
        try {
          conn = await listener.accept();
        } catch (error) {
          if (closed || error instanceof Deno.errors.BadResource) return;
          // A failed accept (a peer reset, too many open files) leaves the listener usable;
          // a short pause keeps a persistent failure from spinning.
          await new Promise((resolve) => setTimeout(resolve, 10));
          continue;
        }
        yield new TcpConn(conn);
      }
    },
  };
}
