/**
 * The server side: an accept loop that gives each connection a Comm, and the typed
 * op dispatch that checks arguments before any handler sees them.
 *
 * @module
 */

import { type Logger, silentLogger } from "../_log.ts";
import { type Address, formatAddress, isLoopback } from "./address.ts";
import { Comm, type Dispatch } from "./comm.ts";
import { ProtocolError } from "./errors.ts";
import { type SecurityOptions, serverHandshake } from "./handshake.ts";
import type { ArgsOf, OpTable, ReplyOf } from "./ops.ts";
import { type Conn, listen } from "./transport.ts";

/** Most connections a node keeps open at once; more are closed on arrival. */
export const CONNECTIONS_MAX = 10_000;

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
  /** Receive large frames into shared memory. */
  sharedFrames?: boolean;
  /** Called for every connection that closes (after its Comm has closed). */
  onClose?: (comm: Comm) => void;
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
        `this port can read and delete its data and run any code on the workers. Set --auth-token (and use tls://).`,
    );
  }
  const comms = new Set<Comm>();
  const handshaking = new Map<Conn, Promise<unknown>>();
  const max = options.connectionsMax ?? CONNECTIONS_MAX;
  const accepting = (async () => {
    for await (const conn of listener) {
      if (comms.size + handshaking.size >= max) {
        log.warn(`Refusing connection from ${conn.remoteAddress}: ${max} connections open (the limit)`);
        conn.close();
        continue;
      }
      const shaking = serverHandshake(conn, options).then((reader) => {
        const comm = new Comm(conn, {
          dispatch,
          frameBytesMax: options.frameBytesMax,
          sharedFrames: options.sharedFrames,
          reader,
          log,
        });
        comms.add(comm);
        comm.closed.then(() => {
          comms.delete(comm);
          options.onClose?.(comm);
        });
      }, (error) => {
        conn.close();
        log.warn(`Handshake with ${conn.remoteAddress} failed: ${(error as Error).message}`);
      });
      handshaking.set(conn, shaking);
      shaking.finally(() => handshaking.delete(conn));
    }
  })();
  return {
    address: listener.address,
    url: formatAddress(listener.address),
    comms,
    async close() {
      listener.close();
      await accepting;
      for (const conn of handshaking.keys()) conn.close();
      await Promise.all(handshaking.values());
      await Promise.all([...comms].map((comm) => comm.close()));
    },
  };
}
