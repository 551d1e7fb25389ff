/**
 * A small HTTP/1.1 server for the nodes' dashboard and metrics, on Deno.listen. It reads
 * each request whole, under limits, before any route sees it: a head of at most
 * HTTP_HEAD_BYTES_MAX within HTTP_HEAD_TIMEOUT_MS, a body of at most bodyBytesMax
 * within bodyTimeoutMs, counted as it arrives. One request a connection, then the
 * connection closes, so a refused or late request costs nothing after its answer.
 *
 * Deno.serve could do neither: a handler cannot close its connection (after a 413 it
 * drains whatever the peer still sends, for as long as it sends), nor does it time out
 * a head that trickles in, nor cap its connections.
 *
 * @module
 */

import { type Deadline, deadline } from "./time.ts";

/**
 * Most HTTP connections open at once (viewers, scrapers). Past it the one that has
 * waited longest for its request is closed; when every one is being answered (event
 * streams), the newcomer is.
 */
export const HTTP_CONNECTIONS_MAX = 256;
/** Largest request head: the request line and the headers. */
export const HTTP_HEAD_BYTES_MAX = 16 * 1024;
/** Longest a request head may take to arrive after the connection opens. */
export const HTTP_HEAD_TIMEOUT_MS = 10_000;
/** How much of a body is read from the socket at once. */
const READ_BYTES = 16 * 1024;

const REASONS: Record<number, string> = {
  200: "OK",
  303: "See Other",
  400: "Bad Request",
  401: "Unauthorized",
  404: "Not Found",
  408: "Request Timeout",
  413: "Content Too Large",
  431: "Request Header Fields Too Large",
  500: "Internal Server Error",
  503: "Service Unavailable",
};

const text = new TextEncoder();

/** Limits of an HTTP server. */
export interface HttpLimits {
  /** Largest request body, in bytes. */
  bodyBytesMax: number;
  /** Longest a request body may take to arrive, in ms. */
  bodyTimeoutMs: number;
  /** Longest a request head may take to arrive, in ms (default HTTP_HEAD_TIMEOUT_MS). */
  headTimeoutMs?: number;
  /** Most connections open at once (default HTTP_CONNECTIONS_MAX). */
  connectionsMax?: number;
}

/** A listening HTTP server. */
export interface HttpListener {
  /** Where it listens. */
  readonly addr: Deno.NetAddr;
  /** Connections open now. */
  readonly connections: number;
  /**
   * Stops accepting; responses still going get `graceMs` to finish (an event stream its
   * owner has just ended), then every connection is closed.
   */
  close(graceMs: number): Promise<void>;
  /** Waiting for connections no longer keeps the process alive (open ones still do). */
  unref(): void;
}

/** A request that is refused before any route sees it: its status and why. */
class Refusal {
  constructor(readonly status: number, readonly message: string) {}
}

/** Reads from `conn` until `until`; null at end of stream. */
async function readBy(
  conn: Deno.Conn,
  buf: Uint8Array,
  until: Deadline,
  what: Refusal,
): Promise<number | null> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<"late">((resolve) => timer = setTimeout(() => resolve("late"), until.remaining()));
  try {
    const reading = conn.read(buf);
    // Past the deadline the read is left pending: it fails when the connection closes.
    reading.catch(() => {});
    const got = await Promise.race([reading, late]);
    if (got === "late") throw what;
    return got;
  } finally {
    clearTimeout(timer);
  }
}

/** The request on `conn`, read whole under the limits; null when the peer left first. */
async function readRequest(
  conn: Deno.Conn,
  host: string,
  limits: HttpLimits,
): Promise<{ request: Request; http10: boolean } | null> {
  const headDeadline = deadline(limits.headTimeoutMs ?? HTTP_HEAD_TIMEOUT_MS);
  const slowHead = new Refusal(408, "Request head too slow: it did not arrive in time");
  let buf = new Uint8Array(1024);
  let filled = 0;
  let end = -1;
  while (end < 0) {
    if (filled === buf.length) {
      if (buf.length >= HTTP_HEAD_BYTES_MAX) {
        throw new Refusal(431, `Request head too large: the limit is ${HTTP_HEAD_BYTES_MAX} bytes`);
      }
      const next = new Uint8Array(Math.min(HTTP_HEAD_BYTES_MAX, buf.length * 4));
      next.set(buf);
      buf = next;
    }
    const n = await readBy(conn, buf.subarray(filled), headDeadline, slowHead);
    if (n === null) return null;
    const from = Math.max(0, filled - 3);
    filled += n;
    for (let i = from; i + 3 < filled; i++) {
      if (buf[i] === 13 && buf[i + 1] === 10 && buf[i + 2] === 13 && buf[i + 3] === 10) {
        end = i;
        break;
      }
    }
  }
  const lines = new TextDecoder().decode(buf.subarray(0, end)).split("\r\n");
  const start = /^([A-Z]+) (\S+) HTTP\/1\.([01])$/.exec(lines[0]);
  if (!start) throw new Refusal(400, "Bad request line: expected METHOD TARGET HTTP/1.1");
  const headers = new Headers();
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    if (colon <= 0) throw new Refusal(400, `Bad header line: ${JSON.stringify(line.slice(0, 80))}`);
    try {
      headers.append(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
    } catch {
      throw new Refusal(400, `Bad header line: ${JSON.stringify(line.slice(0, 80))}`);
    }
  }
  const [, method, target, minor] = start;
  const body = await readBody(conn, headers, buf.subarray(end + 4, filled), limits);
  const url = target.startsWith("/") ? `http://${headers.get("host") ?? host}${target}` : target;
  let request: Request;
  try {
    const hasBody = body.length > 0 && method !== "GET" && method !== "HEAD";
    request = new Request(url, { method, headers, body: hasBody ? body : null });
  } catch (error) {
    throw new Refusal(400, `Bad request: ${(error as Error).message}`);
  }
  return { request, http10: minor === "0" };
}

/**
 * The body that follows the head (`early` holds bytes read with it): content-length or
 * chunked, counted as it arrives, refused past the limit (413) or the deadline (408).
 */
async function readBody(
  conn: Deno.Conn,
  headers: Headers,
  early: Uint8Array,
  limits: HttpLimits,
): Promise<Uint8Array<ArrayBuffer>> {
  const max = limits.bodyBytesMax;
  const tooLarge = new Refusal(413, `Request body too large: the limit is ${max} bytes`);
  const slow = new Refusal(408, `Request body too slow: it did not arrive within ${limits.bodyTimeoutMs} ms`);
  const bodyDeadline = deadline(limits.bodyTimeoutMs);
  const chunked = /chunked/i.test(headers.get("transfer-encoding") ?? "");
  const length = headers.get("content-length");
  if (!chunked && length === null) return new Uint8Array(0);
  // Bytes of the body as they come off the wire (decoded below for chunked).
  let raw = new Uint8Array(Math.min(Math.max(early.length, READ_BYTES), max + READ_BYTES));
  raw.set(early);
  let filled = early.length;
  // The wire may hold chunk framing on top of the body: a little room beyond the limit.
  const wireMax = chunked ? max + Math.max(1024, max / 4) : max;
  const more = async (): Promise<boolean> => {
    if (filled === raw.length) {
      if (raw.length >= wireMax) throw tooLarge;
      const next = new Uint8Array(Math.min(wireMax, raw.length * 2));
      next.set(raw);
      raw = next;
    }
    const n = await readBy(conn, raw.subarray(filled), bodyDeadline, slow);
    if (n === null) return false;
    filled += n;
    return true;
  };
  if (!chunked) {
    const n = Number(length);
    if (!Number.isSafeInteger(n) || n < 0) throw new Refusal(400, `Bad content-length: ${length}`);
    if (n > max) throw tooLarge;
    while (filled < n) {
      if (!(await more())) throw new Refusal(400, "Request body cut short: the connection ended");
    }
    return raw.slice(0, n);
  }
  const body = new Uint8Array(max);
  let size = 0;
  let at = 0;
  while (true) {
    // A chunk: hex size, CRLF, data, CRLF; size 0 ends the body.
    let eol = -1;
    while ((eol = indexOfCrlf(raw, at, filled)) < 0) {
      if (!(await more())) throw new Refusal(400, "Request body cut short: the connection ended");
    }
    const n = parseInt(new TextDecoder().decode(raw.subarray(at, eol)).split(";")[0], 16);
    if (!Number.isSafeInteger(n) || n < 0) {
      throw new Refusal(400, "Bad chunked body: a chunk size is not hex");
    }
    if (size + n > max) throw tooLarge;
    const dataAt = eol + 2;
    while (filled < dataAt + n + 2) {
      if (!(await more())) throw new Refusal(400, "Request body cut short: the connection ended");
    }
    if (n === 0) return body.slice(0, size);
    body.set(raw.subarray(dataAt, dataAt + n), size);
    size += n;
    // Chunks already decoded leave the wire buffer, so it never holds more than the limit.
    raw.copyWithin(0, dataAt + n + 2, filled);
    filled -= dataAt + n + 2;
    at = 0;
  }
}

function indexOfCrlf(buf: Uint8Array, from: number, to: number): number {
  for (let i = from; i + 1 < to; i++) if (buf[i] === 13 && buf[i + 1] === 10) return i;
  return -1;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.length) done += await conn.write(bytes.subarray(done));
}

/**
 * Writes `response` and returns when it has ended: its body chunked as it comes, or for
 * an HTTP/1.0 peer (no chunks) as it comes until the connection closes.
 */
async function writeResponse(
  conn: Deno.Conn,
  response: Response,
  head: boolean,
  http10: boolean,
): Promise<void> {
  const lines = [`HTTP/1.1 ${response.status} ${REASONS[response.status] ?? "Status"}`];
  for (const [name, value] of response.headers) {
    if (name !== "connection" && name !== "content-length" && name !== "transfer-encoding") {
      lines.push(`${name}: ${value}`);
    }
  }
  lines.push(`date: ${new Date().toUTCString()}`, "connection: close");
  const body = head ? null : response.body;
  if (body === null) lines.push("content-length: 0");
  else if (!http10) lines.push("transfer-encoding: chunked");
  await writeAll(conn, text.encode(lines.join("\r\n") + "\r\n\r\n"));
  if (body === null) {
    await response.body?.cancel();
    return;
  }
  const reader = body.getReader();
  try {
    while (true) {
      const { done, value } = await reader.read();
      if (done) break;
      if (value.length === 0) continue;
      if (http10) {
        await writeAll(conn, value);
        continue;
      }
      await writeAll(conn, text.encode(`${value.length.toString(16)}\r\n`));
      await writeAll(conn, value);
      await writeAll(conn, text.encode("\r\n"));
    }
    if (!http10) await writeAll(conn, text.encode("0\r\n\r\n"));
  } catch (error) {
    // The viewer left (the write failed): its stream's cancel() is how the route learns it.
    await reader.cancel(error).catch(() => {});
  }
}

/**
 * Listens on `host:port` and answers every request with `handler`, one request a
 * connection. Throws Deno.errors.AddrInUse when the port is taken.
 */
export function listenHttp(
  host: string,
  port: number,
  handler: (request: Request) => Promise<Response>,
  limits: HttpLimits,
): HttpListener {
  const listener = Deno.listen({ hostname: host, port, transport: "tcp" });
  const addr = listener.addr as Deno.NetAddr;
  const open = new Map<Deno.Conn, Promise<void>>();
  // Connections still reading their request, oldest first.
  const waiting = new Set<Deno.Conn>();
  // Connections dropped to make room: they end on their own; close() waits for them.
  const ending = new Set<Promise<void>>();
  const max = limits.connectionsMax ?? HTTP_CONNECTIONS_MAX;
  let closing = false;
  const serveConn = async (conn: Deno.Conn) => {
    try {
      let response: Response;
      let method = "GET";
      let http10 = false;
      try {
        waiting.add(conn);
        const read = await readRequest(conn, `${addr.hostname}:${addr.port}`, limits)
          .finally(() => waiting.delete(conn));
        if (read === null) return;
        ({ http10 } = read);
        method = read.request.method;
        response = await handler(read.request);
      } catch (error) {
        if (!(error instanceof Refusal)) throw error;
        response = new Response(`${error.message}\n`, {
          status: error.status,
          headers: { "content-type": "text/plain; charset=utf-8", "cache-control": "no-store" },
        });
      }
      await writeResponse(conn, response, method === "HEAD", http10);
    } catch {
      // The peer left, or wrote nonsense past a refusal: nothing more to say to it.
    } finally {
      try {
        conn.close();
      } catch { /* closed already */ }
    }
  };
  const accepting = (async () => {
    for await (const conn of listener) {
      if (!closing && open.size >= max && waiting.size > 0) {
        // Full: the connection that has waited longest for its request goes, so idle
        // strangers cannot keep viewers and scrapers out.
        const [oldest] = waiting;
        waiting.delete(oldest);
        try {
          oldest.close();
        } catch { /* closed already */ }
        const done = open.get(oldest)!;
        open.delete(oldest);
        ending.add(done);
        done.finally(() => ending.delete(done));
      }
      if (closing || open.size >= max) {
        conn.close();
        continue;
      }
      const serving = serveConn(conn);
      open.set(conn, serving);
      serving.finally(() => open.delete(conn));
    }
  })().catch(() => {});
  return {
    addr,
    get connections() {
      return open.size;
    },
    unref() {
      listener.unref();
    },
    async close(graceMs: number) {
      closing = true;
      try {
        listener.close();
      } catch { /* closed already */ }
      await accepting;
      // Those still waiting for their request get none: only answers under way get the grace.
      for (const conn of waiting) {
        try {
          conn.close();
        } catch { /* closed already */ }
      }
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        Promise.all(open.values()),
        new Promise((resolve) => timer = setTimeout(resolve, graceMs)),
      ]).finally(() => clearTimeout(timer));
      // Past the grace (a viewer that stopped reading, a peer that never finished its
      // request): closing the connection ends its read or write.
      for (const conn of open.keys()) {
        try {
          conn.close();
        } catch { /* closed already */ }
      }
      await Promise.all([...open.values(), ...ending]);
    },
  };
}
