/**
 * The server side: an accept loop that gives each connection a Comm, and the typed
 * op dispatch that checks arguments before any handler sees them.
 *
 * @module
 */

import { type Logger, silentLogger } from "../util/log.ts";
import { type Address, formatAddress, isLoopback } from "./address.ts";
import { Comm, type Dispatch } from "./comm.ts";
import { ProtocolError } from "./errors.ts";
import { handshakeReader, type SecurityOptions, serverHandshake } from "./handshake.ts";
import type { MessageReader, SharedFrames } from "./framing.ts";
import type { ArgsOf, OpTable, ReplyOf } from "./ops.ts";
import { type Conn, listen } from "./transport.ts";
import { CONNECTIONS_MAX } from "../util/defaults.ts";

export { CONNECTIONS_MAX } from "../util/defaults.ts";
/**
 * Most connections still in the handshake (not yet past the token's proof). Past it the
 * oldest is dropped to make room: a flood of strangers costs at most this many small
 * buffers, and cannot lock out a real peer, which proves itself in milliseconds.
 */
export const HANDSHAKES_MAX = 1_000;

/** A handler for every op of table `T`; a missing one is a compile error. */
export type Handlers<T extends OpTable> = {
  [K in keyof T]: (args: ArgsOf<T, K>, comm: Comm) => ReplyOf<T, K> | Promise<ReplyOf<T, K>>;
};

/**
 * Builds a dispatch for `ops`: an unknown op or bad arguments throw an error that
 * names the op and the field; the handler sees checked arguments only.
 */
export function dispatchTo<T extends OpTable>(kind: string, ops: T, handlers: Handlers<T>): Dispatch {
  const known = Object.keys(ops).sort().join(", ");
  return (op, args, comm) => {
    if (!Object.hasOwn(ops, op)) {
      throw new ProtocolError(`Unknown op ${JSON.stringify(op)}: a ${kind} serves ${known}`);
    }
    let checked: unknown;
    try {
      checked = ops[op].args.parse(args, "args");
    } catch (error) {
      const e = error as Error;
      const wrapped = e instanceof RangeError ? RangeError : TypeError;
      throw new wrapped(`Bad arguments for op ${op}: ${e.message}`);
    }
    // deno-lint-ignore no-explicit-any
    return (handlers[op] as any)(checked, comm);
  };
}

/** Options of a server. */
export interface ServeOptions extends SecurityOptions {
  /** Largest frame accepted. */
  frameBytesMax?: number;
  /** Most open connections. */
  connectionsMax?: number;
  /** Receive large frames into shared memory, or into what a function gives. */
  sharedFrames?: SharedFrames;
  /** Most connections in the handshake at once (default HANDSHAKES_MAX). */
  handshakesMax?: number;
  /** Bytes queued for a peer past which its requests wait (see WRITE_QUEUE_BYTES_MAX). */
  writeQueueBytesMax?: number;
  /** How long a peer over that limit may take nothing before it is dropped (see WRITE_STALL_MS). */
  writeStallMs?: number;
  /** Called for every connection that closes (after its Comm has closed). */
  onClose?: (comm: Comm) => void;
  /**
   * Whether the server keeps the process alive (true, the default). False for a node
   * embedded in a script (Client.local's scheduler): its connections and waiting for
   * more do not, so the script ends when its own work is done.
   */
  keepsAlive?: boolean;
  /** Where it logs. */
  log?: Logger;
}

/** A listening server. */
export interface Server {
  /** Where it listens (the real port when asked for 0). */
  readonly address: Address;
  /** `tcp://host:port`. */
  readonly url: string;
  /** The open connections. */
  readonly comms: ReadonlySet<Comm>;
  /** Connections still in the handshake, and the bytes their read buffers hold. */
  handshaking(): { count: number; bufferBytes: number };
  /** Stops accepting and closes every connection. */
  close(): Promise<void>;
}

/**
 * Listens on `address` and serves `dispatch` on every connection, each after the
 * handshake (and the auth token's proof, when one is set).
 */
export async function serve(
  address: Address,
  dispatch: Dispatch,
  options: ServeOptions = {},
): Promise<Server> {
  const log = options.log ?? silentLogger;
  const listener = await listen(address, {
    tls: options.tls,
    onTlsError: (error) => log.warn(`TLS handshake failed: ${error.message}`),
    handshakeTimeoutMs: options.handshakeTimeoutMs,
    connectionsMax: options.connectionsMax ?? CONNECTIONS_MAX,
  });
  // TLS alone encrypts; only a client CA (mutual TLS) or a token decides who gets in.
  if (!isLoopback(listener.address.host) && !options.authToken && !(address.tls && options.tls?.ca)) {
    log.warn(
      `Listening on ${
        formatAddress(listener.address)
      } with neither an auth token nor client certificates: anyone who can reach ` +
        `this port can read and delete its data and run any code on the workers. Give every node a token ` +
        `(DIST_AUTH_TOKEN or --auth-token-file: --auth-token shows in ps) and use tls://.`,
    );
  }
  const keepsAlive = options.keepsAlive ?? true;
  if (!keepsAlive) listener.setRef(false);
  const comms = new Set<Comm>();
  const handshaking = new Map<Conn, { done: Promise<unknown>; reader: MessageReader }>();
  const max = options.connectionsMax ?? CONNECTIONS_MAX;
  const handshakesMax = options.handshakesMax ?? HANDSHAKES_MAX;
  let evicted = 0;
  const dropped = new WeakSet<Conn>();
  // Dropped handshakes still end (their reads fail); close() waits for them too.
  const ending = new Set<Promise<unknown>>();
  const accepting = (async () => {
    for await (const conn of listener) {
      if (handshaking.size >= handshakesMax) {
        // The Map keeps insertion order: its first connection has waited longest.
        const [[oldest, { done }]] = handshaking;
        handshaking.delete(oldest);
        dropped.add(oldest);
        ending.add(done);
        done.finally(() => ending.delete(done));
        oldest.close();
        // One line per thousand: a flood must not flood the log too.
        if (evicted++ % 1_000 === 0) {
          log.warn(
            `Dropped ${oldest.remoteAddress}: ${handshakesMax} connections were in the handshake (the limit), ` +
              `so the oldest goes (${evicted} dropped so far)`,
          );
        }
      }
      if (comms.size + handshaking.size >= max) {
        log.warn(`Refusing connection from ${conn.remoteAddress}: ${max} connections open (the limit)`);
        conn.close();
        continue;
      }
      if (!keepsAlive) conn.setRef(false);
      const reader = handshakeReader(conn);
      const shaking = serverHandshake(conn, { ...options, reader }).then((reader) => {
        const comm = new Comm(conn, {
          dispatch,
          frameBytesMax: options.frameBytesMax,
          sharedFrames: options.sharedFrames,
          reader,
          log,
          writeQueueBytesMax: options.writeQueueBytesMax,
          writeStallMs: options.writeStallMs,
          keepsAlive: keepsAlive ? "always" : "busy",
        });
        comms.add(comm);
        comm.closed.then(() => {
          comms.delete(comm);
          options.onClose?.(comm);
        });
      }, (error) => {
        conn.close();
        if (!dropped.has(conn)) {
          log.warn(`Handshake with ${conn.remoteAddress} failed: ${(error as Error).message}`);
        }
      });
      handshaking.set(conn, { done: shaking, reader });
      shaking.finally(() => handshaking.delete(conn));
    }
  })();
  return {
    address: listener.address,
    url: formatAddress(listener.address),
    comms,
    handshaking() {
      let bufferBytes = 0;
      for (const { reader } of handshaking.values()) bufferBytes += reader.bufferBytes;
      return { count: handshaking.size, bufferBytes };
    },
    async close() {
      listener.close();
      await accepting;
      const shaking = [...handshaking.entries()];
      for (const [conn] of shaking) conn.close();
      await Promise.all([...shaking.map(([, s]) => s.done), ...ending]);
      await Promise.all([...comms].map((comm) => comm.close()));
    },
  };
}
