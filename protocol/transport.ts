/**
 * The one file that opens sockets. Everything above sees `Conn` and `Listener`, so
 * tests and TLS can swap the transport.
 *
 * Plain TCP uses Deno.connect/Deno.listen. TLS clients use Deno.connectTls (with a
 * client certificate for mutual TLS); TLS servers use node:tls, because Deno.listenTls
 * cannot ask for and check a client's certificate.
 *
 * @module
 */

import type tls from "node:tls";
import type { Buffer } from "node:buffer";
import { type Address, formatAddress } from "./address.ts";
import { ConnectionClosedError } from "./errors.ts";
import type { ByteReader, ByteWriter } from "./framing.ts";
import { delay } from "../util/time.ts";

/** A byte stream to a peer. */
export interface Conn extends ByteReader, ByteWriter {
  /** The peer's address, `tcp://host:port`. */
  readonly remoteAddress: string;
  /** This end's address; `host` is the local interface that reaches the peer. */
  readonly local: Address;
  /** Closes the stream; safe to call twice. */
  close(): void;
  /**
   * Whether a read waiting on it keeps the process alive (true, the default): a client's
   * idle connection does not, so a script that forgot `close()` still ends.
   */
  setRef(ref: boolean): void;
}

/** Accepts connections. */
export interface Listener extends AsyncIterable<Conn> {
  /** Where it listens, with the real port when asked for port 0. */
  readonly address: Address;
  /** Stops accepting; safe to call twice. */
  close(): void;
  /** Whether waiting for connections keeps the process alive (true, the default). */
  setRef(ref: boolean): void;
}

/** Options of `listen`. */
export interface ListenOptions {
  /** TLS material, for tls:// addresses. */
  tls?: TlsOptions;
  /** Told of every failed TLS handshake. */
  onTlsError?: (error: Error) => void;
  /** Time a TLS peer has to finish its TLS handshake. */
  handshakeTimeoutMs?: number;
  /** Most open TLS connections. */
  connectionsMax?: number;
}

/** PEM texts for TLS. */
export interface TlsOptions {
  /** This node's certificate chain (PEM): required to listen on tls://, and for mutual TLS as a client. */
  cert?: string;
  /** The private key of `cert` (PEM). */
  key?: string;
  /**
   * The CA (PEM) that signs the peers' certificates. A client checks the server against it
   * (instead of the system's roots); a server then requires every client to present a
   * certificate it signed (mutual TLS).
   */
  ca?: string;
}

class DenoConn implements Conn {
  readonly remoteAddress: string;
  readonly local: Address;
  #conn: Deno.Conn;
  #closed = false;

  constructor(conn: Deno.Conn, tls: boolean) {
    this.#conn = conn;
    if ("setNoDelay" in conn) (conn as Deno.TcpConn).setNoDelay(true);
    const remote = conn.remoteAddr as Deno.NetAddr;
    const local = conn.localAddr as Deno.NetAddr;
    this.remoteAddress = formatAddress({ host: remote.hostname, port: remote.port, tls });
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

  setRef(ref: boolean): void {
    if (this.#closed) return;
    if (ref) this.#conn.ref();
    else this.#conn.unref();
  }
}

/** Bytes a node:tls socket may buffer for a slow reader before it stops reading. */
const SOCKET_BUFFER_BYTES = 4 * 1024 * 1024;
/** Pause after a failed accept (a peer reset, too many open files), so a lasting failure does not spin. */
const ACCEPT_RETRY_PAUSE_MS = 10;

/** A node:tls socket behind the Conn interface. */
class SocketConn implements Conn {
  readonly remoteAddress: string;
  readonly local: Address;
  #socket: tls.TLSSocket;
  #chunks: Uint8Array[] = [];
  #buffered = 0;
  #ended = false;
  #error: Error | null = null;
  #wake: (() => void) | null = null;

  constructor(socket: tls.TLSSocket) {
    this.#socket = socket;
    socket.setNoDelay(true);
    this.remoteAddress = formatAddress({
      host: socket.remoteAddress ?? "?",
      port: socket.remotePort ?? 0,
      tls: true,
    });
    this.local = { host: socket.localAddress ?? "?", port: socket.localPort ?? 0 };
    socket.on("data", (chunk: Buffer) => {
      this.#chunks.push(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
      this.#buffered += chunk.byteLength;
      if (this.#buffered > SOCKET_BUFFER_BYTES) socket.pause();
      this.#notify();
    });
    socket.on("end", () => {
      this.#ended = true;
      this.#notify();
    });
    socket.on("close", () => {
      this.#ended = true;
      this.#notify();
    });
    socket.on("error", (error: Error) => {
      this.#error = error;
      this.#notify();
    });
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  async read(p: Uint8Array): Promise<number | null> {
    while (this.#chunks.length === 0) {
      if (this.#error) throw new ConnectionClosedError(`TLS connection failed: ${this.#error.message}`);
      if (this.#ended) return null;
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
    let n = 0;
    while (n < p.length && this.#chunks.length > 0) {
      const chunk = this.#chunks[0];
      const take = Math.min(chunk.length, p.length - n);
      p.set(chunk.subarray(0, take), n);
      n += take;
      if (take === chunk.length) this.#chunks.shift();
      else this.#chunks[0] = chunk.subarray(take);
    }
    this.#buffered -= n;
    if (this.#buffered <= SOCKET_BUFFER_BYTES / 2 && this.#socket.isPaused()) this.#socket.resume();
    return n;
  }

  write(p: Uint8Array): Promise<number> {
    if (this.#error) {
      return Promise.reject(new ConnectionClosedError(`TLS connection failed: ${this.#error.message}`));
    }
    // node keeps a reference until the callback: copy, since our writer reuses its buffer.
    const copy = p.slice();
    return new Promise((resolve, reject) => {
      this.#socket.write(copy, (error?: Error | null) => error ? reject(error) : resolve(copy.length));
    });
  }

  close(): void {
    this.#socket.destroy();
  }

  setRef(ref: boolean): void {
    if (ref) this.#socket.ref();
    else this.#socket.unref();
  }
}

/** Opens a connection (TLS for tls:// addresses); errors say which address failed and why. */
export async function connect(
  address: Address,
  options: { signal?: AbortSignal; tls?: TlsOptions } = {},
): Promise<Conn> {
  try {
    if (address.tls) {
      const t = options.tls ?? {};
      const conn = await Deno.connectTls({
        hostname: address.host,
        port: address.port,
        caCerts: t.ca ? [t.ca] : undefined,
        ...(t.cert && t.key ? { cert: t.cert, key: t.key } : {}),
      });
      await conn.handshake();
      return new DenoConn(conn, true);
    }
    const conn = await Deno.connect({ hostname: address.host, port: address.port, signal: options.signal });
    return new DenoConn(conn, false);
  } catch (error) {
    const reason = error instanceof Deno.errors.ConnectionRefused
      ? "connection refused"
      : (error as Error).message;
    throw new ConnectionClosedError(`Cannot connect to ${formatAddress(address)}: ${reason}`, {
      cause: error,
    });
  }
}

function listenError(address: Address, error: unknown): Error {
  const reason = error instanceof Deno.errors.AddrInUse || (error as { code?: string }).code === "EADDRINUSE"
    ? "the address is in use"
    : (error as Error).message;
  return new Error(`Cannot listen at ${formatAddress(address)}: ${reason}`, { cause: error });
}

/** Listens on `address` (port 0: any free port); tls:// needs `tls.cert` and `tls.key`. */
export async function listen(address: Address, options: ListenOptions = {}): Promise<Listener> {
  if (address.tls) return await listenTls(address, options);
  let listener: Deno.TcpListener;
  try {
    listener = Deno.listen({ hostname: address.host, port: address.port, transport: "tcp" });
  } catch (error) {
    throw listenError(address, error);
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
    setRef(ref: boolean) {
      if (closed) return;
      if (ref) listener.ref();
      else listener.unref();
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
          await delay(ACCEPT_RETRY_PAUSE_MS);
          continue;
        }
        yield new DenoConn(conn, false);
      }
    },
  };
}

async function listenTls(address: Address, options: ListenOptions): Promise<Listener> {
  const t = options.tls ?? {};
  if (!t.cert || !t.key) {
    throw new TypeError(
      `Cannot listen at ${
        formatAddress(address)
      }: TLS needs a certificate and its key (--tls-cert, --tls-key)`,
    );
  }
  const mutual = t.ca !== undefined;
  // Loaded here, not at the top: node:tls starts Deno's Node compatibility layer, which
  // costs a process several MiB that plain TCP nodes never need.
  const { createServer } = await import("node:tls");
  const server = createServer({
    cert: t.cert,
    key: t.key,
    ca: mutual ? [t.ca!] : undefined,
    requestCert: mutual,
    rejectUnauthorized: mutual,
    // A peer that opens TCP and never speaks TLS is dropped like one that fails our handshake.
    handshakeTimeout: options.handshakeTimeoutMs ?? 10_000,
  });
  if (options.connectionsMax !== undefined) server.maxConnections = options.connectionsMax;
  const queue: Conn[] = [];
  let wake: (() => void) | null = null;
  let closed = false;
  server.on("secureConnection", (socket: tls.TLSSocket) => {
    queue.push(new SocketConn(socket));
    wake?.();
  });
  server.on("tlsClientError", (error: Error, socket: tls.TLSSocket) => {
    socket.destroy();
    options.onTlsError?.(error);
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (error: Error) => reject(listenError(address, error)));
    server.listen(address.port, address.host, () => resolve());
  });
  const bound = server.address() as { address: string; port: number };
  return {
    address: { host: bound.address, port: bound.port, tls: true },
    close() {
      if (closed) return;
      closed = true;
      server.close();
      wake?.();
    },
    setRef(ref: boolean) {
      if (ref) server.ref();
      else server.unref();
    },
    async *[Symbol.asyncIterator]() {
      while (true) {
        while (queue.length > 0) yield queue.shift()!;
        if (closed) return;
        await new Promise<void>((resolve) => wake = resolve);
        wake = null;
      }
    },
  };
}
