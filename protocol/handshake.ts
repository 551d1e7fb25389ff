/**
 * The first exchange on every connection, before any op is read. The server says hello
 * and whether it needs proof of the shared secret; if it does, both sides prove they
 * know it with HMAC-SHA256 over fresh random nonces, so the secret never crosses the
 * wire and neither side can be impersonated by replaying an old exchange.
 *
 *     server -> { dist: 2, auth: null, frame_bytes_max }                    no secret set
 *     server -> { dist: 2, auth: "hmac-sha256", nonce: S, frame_bytes_max }
 *     client -> { proof: HMAC(k, "client" S C), nonce: C }
 *     server -> { ok: true, proof: HMAC(k, "server" C S) }   or  { ok: false, error }
 *
 * @module
 */

import { type Address, formatAddress } from "./address.ts";
import { Decoder, Encoder } from "./codec.ts";
import { Comm, type CommOptions } from "./comm.ts";
import { ConnectionClosedError, ProtocolError, TimeoutError } from "./errors.ts";
import { FRAME_BYTES_MAX, frameHeader, HANDSHAKE_READ_BYTES, MessageReader } from "./framing.ts";
import { type Conn, connect, type TlsOptions } from "./transport.ts";
import { equalBytes, hmacSha256 } from "../util/sha256.ts";
import { HANDSHAKE_TIMEOUT_MS, tokenFromEnv } from "../util/defaults.ts";

/** The protocol version a server announces. */
export const PROTOCOL_VERSION = 2;
/** Largest handshake message: a stranger gets this much of the node's attention, no more. */
export const HANDSHAKE_BYTES_MAX = 4096;
export { HANDSHAKE_TIMEOUT_MS, tokenFromEnv } from "../util/defaults.ts";
const NONCE_BYTES = 32;

/** Who may connect, and how connections are protected. */
export interface SecurityOptions {
  /** The shared secret every connection must prove it knows (default: DIST_AUTH_TOKEN, if set). */
  authToken?: string;
  /** TLS material, for tls:// addresses. */
  tls?: TlsOptions;
  /** Time a peer has to complete the handshake, in ms. */
  handshakeTimeoutMs?: number;
}

/** The peer failed to prove it knows the shared secret, or asked for one we lack. */
export class AuthenticationError extends Error {
  /** Builds the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "AuthenticationError";
  }
}

const encoder = new Encoder();
const decoder = new Decoder();
const text = new TextEncoder();

async function send(conn: Conn, message: Record<string, unknown>): Promise<void> {
  const { head } = encoder.encode(message, "handshake");
  const bytes = new Uint8Array(12 + head.length);
  bytes.set(frameHeader([head]));
  bytes.set(head, 12);
  let done = 0;
  while (done < bytes.length) done += await conn.write(bytes.subarray(done));
}

async function receive(reader: MessageReader, what: string): Promise<Record<string, unknown>> {
  const frames = await reader.next();
  if (frames === null) throw new ConnectionClosedError(`Connection closed during the handshake (${what})`);
  if (frames.length !== 1) throw new ProtocolError(`Bad handshake: ${what} must be one frame`);
  const message = decoder.decode(frames[0]);
  if (typeof message !== "object" || message === null || Array.isArray(message)) {
    throw new ProtocolError(`Bad handshake: ${what} must be a map`);
  }
  return message as Record<string, unknown>;
}

/** The proof of the token for one side: HMAC-SHA256 under the token of `label`, then both nonces. */
function hmac(token: string, label: string, a: Uint8Array, b: Uint8Array): Uint8Array {
  const head = text.encode(label);
  const data = new Uint8Array(head.length + a.length + b.length);
  data.set(head);
  data.set(a, head.length);
  data.set(b, head.length + a.length);
  return hmacSha256(token, data);
}

function equal(a: unknown, b: Uint8Array): boolean {
  return a instanceof Uint8Array && equalBytes(a, b);
}

function withTimeout<T>(promise: Promise<T>, ms: number, conn: Conn, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      conn.close();
      reject(new TimeoutError(`Handshake with ${conn.remoteAddress} took over ${ms} ms (${what})`));
    }, ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * The reader a connection's handshake uses: tight limits and a small buffer, since the
 * peer has proved nothing yet. The Comm that follows configures it for real traffic.
 */
export function handshakeReader(conn: Conn): MessageReader {
  return new MessageReader(conn, { frameBytesMax: HANDSHAKE_BYTES_MAX, readBytes: HANDSHAKE_READ_BYTES });
}

/**
 * The server side: says hello and, with a token, checks the client's proof. Resolves
 * the reader to hand to the connection's Comm; throws (after telling the client why,
 * and closing) when the client fails.
 */
export function serverHandshake(
  conn: Conn,
  security: SecurityOptions & { frameBytesMax?: number; reader?: MessageReader } = {},
): Promise<MessageReader> {
  const reader = security.reader ?? handshakeReader(conn);
  const token = security.authToken;
  const run = async () => {
    const limit = security.frameBytesMax ?? FRAME_BYTES_MAX;
    if (!token) {
      await send(conn, { dist: PROTOCOL_VERSION, auth: null, frame_bytes_max: limit });
      return reader;
    }
    const nonce = crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
    await send(conn, { dist: PROTOCOL_VERSION, auth: "hmac-sha256", nonce, frame_bytes_max: limit });
    let reason: string;
    try {
      const reply = await receive(reader, "the client's proof");
      const clientNonce = reply.nonce;
      if (!(clientNonce instanceof Uint8Array) || clientNonce.length !== NONCE_BYTES) {
        reason =
          "the first message must be the auth proof { proof, nonce }; this node requires an auth token";
      } else if (!equal(reply.proof, hmac(token, "client", nonce, clientNonce))) {
        reason = "wrong auth token";
      } else {
        await send(conn, { ok: true, proof: hmac(token, "server", clientNonce, nonce) });
        return reader;
      }
    } catch (error) {
      if (error instanceof ConnectionClosedError) {
        throw new AuthenticationError(`Client left: ${error.message}`);
      }
      reason = `the first message must be the auth proof (${(error as Error).message})`;
    }
    await send(conn, {
      ok: false,
      error: { name: "AuthenticationError", message: `Authentication failed: ${reason}` },
    })
      .catch(() => {});
    conn.close();
    throw new AuthenticationError(`Refused ${conn.remoteAddress}: ${reason}`);
  };
  return withTimeout(
    run(),
    security.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS,
    conn,
    "waiting for the client",
  );
}

/** What the client learns in the handshake. */
export interface ClientHandshake {
  /** The reader to hand to the connection's Comm. */
  reader: MessageReader;
  /** The largest message the server accepts, as it announced. */
  peerFrameBytesMax?: number;
}

/**
 * The client side: reads the hello and, when asked, proves it knows the token. A client
 * holding a token refuses a server that does not ask for it.
 */
export function clientHandshake(conn: Conn, security: SecurityOptions = {}): Promise<ClientHandshake> {
  const reader = handshakeReader(conn);
  const run = async () => {
    const hello = await receive(reader, "the server's hello");
    if (hello.dist !== PROTOCOL_VERSION) {
      throw new ProtocolError(
        `${conn.remoteAddress} speaks protocol ${
          String(hello.dist)
        }, not ${PROTOCOL_VERSION}: every node and ` +
          `client of a cluster must run the same dist protocol (see PROTOCOL.md, "Evolving the protocol"); ` +
          `upgrade the older side`,
      );
    }
    const peerLimit = typeof hello.frame_bytes_max === "number" ? hello.frame_bytes_max : undefined;
    if (hello.auth === null || hello.auth === undefined) {
      // Holding a token and meeting a node that asks for none: a stripped challenge, or a
      // node outside the cluster. Either way, nothing goes to it.
      if (security.authToken) {
        throw new AuthenticationError(
          `${conn.remoteAddress} does not ask for the auth token: it may be an impostor, or a node started without one`,
        );
      }
      return { reader, peerFrameBytesMax: peerLimit };
    }
    if (hello.auth !== "hmac-sha256" || !(hello.nonce instanceof Uint8Array)) {
      throw new ProtocolError(`${conn.remoteAddress} asks for unknown auth ${String(hello.auth)}`);
    }
    const token = security.authToken;
    if (!token) {
      throw new AuthenticationError(
        `${conn.remoteAddress} requires an auth token: pass --auth-token (or authToken), or set DIST_AUTH_TOKEN`,
      );
    }
    const nonce = crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
    await send(conn, { proof: hmac(token, "client", hello.nonce, nonce), nonce });
    const answer = await receive(reader, "the server's verdict");
    if (answer.ok !== true) {
      const e = answer.error as { message?: string } | undefined;
      throw new AuthenticationError(
        `${conn.remoteAddress} refused the connection: ${e?.message ?? "no reason given"}`,
      );
    }
    if (!equal(answer.proof, hmac(token, "server", nonce, hello.nonce))) {
      throw new AuthenticationError(
        `${conn.remoteAddress} does not know the auth token: it may be an impostor`,
      );
    }
    return { reader, peerFrameBytesMax: peerLimit };
  };
  return withTimeout(
    run(),
    security.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS,
    conn,
    "waiting for the server",
  );
}

/** Connects to `address`, runs the handshake, and returns the connection's Comm. */
export async function openComm(
  address: Address,
  options: CommOptions & SecurityOptions & { signal?: AbortSignal } = {},
): Promise<Comm> {
  const timeoutMs = options.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS;
  // The TCP connect and the TLS handshake get the same deadline as ours: a peer that
  // accepts and then says nothing must not hang the caller.
  const connecting = connect(address, { signal: options.signal, tls: options.tls });
  let timer: ReturnType<typeof setTimeout> | undefined;
  const conn = await Promise.race([
    connecting,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        connecting.then((c) => c.close(), () => {});
        reject(
          new TimeoutError(`Cannot connect to ${formatAddress(address)}: no answer within ${timeoutMs} ms`),
        );
      }, timeoutMs);
    }),
  ]).finally(() => clearTimeout(timer));
  try {
    const shake = await clientHandshake(conn, { ...options, authToken: options.authToken ?? tokenFromEnv() });
    return new Comm(conn, { ...options, reader: shake.reader, peerFrameBytesMax: shake.peerFrameBytesMax });
  } catch (error) {
    conn.close();
    if (error instanceof AuthenticationError || error instanceof ProtocolError) throw error;
    throw new ConnectionClosedError(
      `Cannot connect to ${formatAddress(address)}: ${(error as Error).message}`,
      {
        cause: error,
      },
    );
  }
}
