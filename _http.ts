/**
 * The HTTP side of nodes: a small server for the dashboard, /metrics and /health, under
 * the same rules as the node (its host; its token, when one is set), Prometheus text,
 * and an event-loop lag gauge.
 *
 * @module
 */

import { equalBytes, hmacSha256, toBase64 } from "./_sha256.ts";
import { formatAddress, isLoopback } from "./protocol/address.ts";
import type { Logger } from "./_log.ts";

/** A route handler; `null` means "not mine". */
export type Route = (request: Request, url: URL) => Response | Promise<Response> | null;

/** A running HTTP server. */
export interface HttpServer {
  /** `http://host:port`. */
  readonly url: string;
  /** Stops it; open event streams end. */
  close(): Promise<void>;
}

/** Options of `startHttp`. */
export interface HttpOptions {
  /** Interface to listen on. */
  host: string;
  /** Port (0: any). When it is taken, any free port is used instead, with a warning. */
  port: number;
  /** With a token, every route but /health needs it (cookie after login, or a Bearer header). */
  authToken?: string;
  /** Routes tried in order. */
  routes: Route[];
  /** Where it logs. */
  log: Logger;
  /** Largest request body read, in bytes (default HTTP_BODY_BYTES_MAX). */
  bodyBytesMax?: number;
  /** Longest a request body may take to arrive, in ms (default HTTP_BODY_TIMEOUT_MS). */
  bodyTimeoutMs?: number;
}

const COOKIE = "dist_auth";
/** How long a closing HTTP server waits for responses in flight to finish before it returns. */
const HTTP_CLOSE_GRACE_MS = 1_000;
/**
 * Largest HTTP request body a node reads: the one body it takes is the login form, a
 * few hundred bytes. Larger ones get 413 before anyone has proved anything.
 */
export const HTTP_BODY_BYTES_MAX = 16 * 1024;
/** Longest a request body may take to arrive: a peer that trickles its bytes gets 408. */
export const HTTP_BODY_TIMEOUT_MS = 10_000;

/**
 * Reads a request's body under a byte limit and a deadline, counting as it goes: the
 * bytes, or the response that refuses them (413 past the limit, 408 past the deadline).
 */
async function readBody(
  request: Request,
  bytesMax: number,
  timeoutMs: number,
): Promise<Uint8Array<ArrayBuffer> | Response> {
  const refuse = (status: number, message: string) =>
    new Response(`${message}\n`, { status, headers: { connection: "close", "cache-control": "no-store" } });
  const tooLarge = () => refuse(413, `Request body too large: the limit is ${bytesMax} bytes`);
  const declared = Number(request.headers.get("content-length") ?? "0");
  if (declared > bytesMax) return tooLarge();
  if (request.body === null) return new Uint8Array(0);
  const reader = request.body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<"late">((resolve) => timer = setTimeout(() => resolve("late"), timeoutMs));
  try {
    while (true) {
      // A peer that left half-way (the read fails) is answered like one that stopped sending.
      const got = await Promise.race([reader.read().catch(() => "gone" as const), late]);
      if (got === "gone") {
        return refuse(400, "Request body cut short: the connection failed while it was read");
      }
      if (got === "late") {
        return refuse(408, `Request body too slow: it did not arrive within ${timeoutMs} ms`);
      }
      if (got.done) break;
      total += got.value.byteLength;
      if (total > bytesMax) return tooLarge();
      chunks.push(got.value);
    }
  } finally {
    clearTimeout(timer);
    // Whatever is still coming is not ours to read: Deno discards it after the response.
    reader.cancel().catch(() => {});
  }
  const body = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    body.set(c, at);
    at += c.byteLength;
  }
  return body;
}

function cookieValue(token: string): string {
  return toBase64(hmacSha256(token, "dist-dashboard"), true);
}

function same(a: string, b: string): boolean {
  const x = new TextEncoder().encode(a);
  const y = new TextEncoder().encode(b);
  return equalBytes(x, y);
}

function authorized(request: Request, token: string): boolean {
  const header = request.headers.get("authorization");
  if (header?.startsWith("Bearer ") && same(header.slice(7), token)) return true;
  const cookie = request.headers.get("cookie") ?? "";
  const match = new RegExp(`(?:^|;\\s*)${COOKIE}=([^;]+)`).exec(cookie);
  return match !== null && same(match[1], cookieValue(token));
}

const loginPage = (failed: boolean) =>
  `<!doctype html><html><head><meta charset="utf-8"><title>dist: sign in</title>
<style>body{font:15px system-ui,sans-serif;margin:15vh auto;max-width:360px;color:#222}
input{font:inherit;padding:6px;width:100%;box-sizing:border-box;margin:8px 0}button{font:inherit;padding:6px 14px}
.err{color:#b00}</style></head><body><h1>dist</h1><p>This cluster needs its auth token.</p>
${failed ? '<p class="err">Wrong token.</p>' : ""}
<form method="post" action="/login"><input type="password" name="token" placeholder="auth token" autofocus>
<button type="submit">Open the dashboard</button></form></body></html>`;

/** Starts an HTTP server for a node. */
// deno-lint-ignore require-await
export async function startHttp(options: HttpOptions): Promise<HttpServer> {
  const { authToken, routes, log } = options;
  const bodyBytesMax = options.bodyBytesMax ?? HTTP_BODY_BYTES_MAX;
  const bodyTimeoutMs = options.bodyTimeoutMs ?? HTTP_BODY_TIMEOUT_MS;
  const handler = async (request: Request): Promise<Response> => {
    const url = new URL(request.url);
    // Every body, on every route, is read here under the limits: no route reads one.
    const body = await readBody(request, bodyBytesMax, bodyTimeoutMs);
    if (body instanceof Response) return body;
    if (url.pathname === "/health") {
      return Response.json({ status: "ok" }, { headers: { "cache-control": "no-store" } });
    }
    if (authToken) {
      if (url.pathname === "/login" && request.method === "POST") {
        // Parsed from the bytes already read: the form may be urlencoded or multipart.
        const form = await new Request(request.url, { method: "POST", headers: request.headers, body })
          .formData().catch(() => null);
        const given = String(form?.get("token") ?? "");
        if (!same(given, authToken)) return new Response(loginPage(true), htmlHeaders(401));
        return new Response(null, {
          status: 303,
          headers: {
            location: "/",
            "set-cookie": `${COOKIE}=${cookieValue(authToken)}; HttpOnly; SameSite=Strict; Path=/`,
          },
        });
      }
      if (!authorized(request, authToken)) {
        if (request.method === "GET" && (url.pathname === "/" || url.pathname === "/login")) {
          return new Response(loginPage(false), htmlHeaders(401));
        }
        return new Response("Unauthorized: this cluster needs its auth token\n", { status: 401 });
      }
    }
    for (const route of routes) {
      try {
        const response = await route(request, url);
        if (response) return response;
      } catch (error) {
        log.warn(`HTTP ${url.pathname} failed: ${(error as Error).message}`);
        return new Response(`Internal error: ${(error as Error).message}\n`, { status: 500 });
      }
    }
    return new Response("Not found\n", { status: 404 });
  };
  // Deno.serve binds at once (a taken port throws here), so no await is needed.
  const listen = (port: number) => Deno.serve({ hostname: options.host, port, onListen: () => {} }, handler);
  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = listen(options.port);
  } catch (error) {
    if (!(error instanceof Deno.errors.AddrInUse) || options.port === 0) throw error;
    log.warn(`Port ${options.port} is taken; the dashboard uses another`);
    server = listen(0);
  }
  const host = server.addr.hostname;
  const shown = host === "0.0.0.0" || host === "::" ? "127.0.0.1" : host;
  if (!isLoopback(host) && !authToken) {
    log.warn(
      `The dashboard on ${host}:${server.addr.port} needs no token: anyone who can reach it can watch the cluster`,
    );
  }
  return {
    url: formatAddress({ host: shown, port: server.addr.port }).replace(/^tcp:/, "http:"),
    async close() {
      // Responses still going (an event stream its owner has just ended) finish cleanly,
      // where aborting the server would cut them. One that has not finished within
      // HTTP_CLOSE_GRACE_MS (a viewer that stopped reading) is left to end with its
      // connection: Deno cannot abort a server that is shutting down.
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        server.shutdown(),
        new Promise((resolve) => timer = setTimeout(resolve, HTTP_CLOSE_GRACE_MS)),
      ]).finally(() => clearTimeout(timer));
    },
  };
}

function htmlHeaders(status = 200): ResponseInit {
  return { status, headers: { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" } };
}

/** An HTML response. */
export function html(body: string): Response {
  return new Response(body, htmlHeaders());
}

/** One Prometheus metric family. */
export interface Family {
  name: string;
  help: string;
  type: "gauge" | "counter" | "histogram";
  samples: { labels?: Record<string, string>; value: number; suffix?: string }[];
}

function escapeLabel(v: string): string {
  return v.replaceAll("\\", "\\\\").replaceAll("\n", "\\n").replaceAll('"', '\\"');
}

/** Prometheus text exposition format (version 0.0.4). */
export function prometheus(families: Family[]): Response {
  const lines: string[] = [];
  for (const f of families) {
    lines.push(`# HELP ${f.name} ${f.help}`, `# TYPE ${f.name} ${f.type}`);
    for (const s of f.samples) {
      const labels = s.labels && Object.keys(s.labels).length
        ? `{${Object.entries(s.labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(",")}}`
        : "";
      const value = Number.isFinite(s.value)
        ? String(s.value)
        : s.value > 0
        ? "+Inf"
        : s.value < 0
        ? "-Inf"
        : "NaN";
      lines.push(`${f.name}${s.suffix ?? ""}${labels} ${value}`);
    }
  }
  return new Response(lines.join("\n") + "\n", {
    headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8", "cache-control": "no-store" },
  });
}

/** A histogram's buckets, sum and count, as Prometheus samples. */
export class Histogram {
  readonly bounds: number[];
  #counts: number[];
  sum = 0;
  count = 0;

  /** Buckets with upper bounds `bounds` (and +Inf). */
  constructor(bounds: number[]) {
    this.bounds = bounds;
    this.#counts = new Array(bounds.length).fill(0);
  }

  /** Records one observation. */
  observe(v: number): void {
    this.sum += v;
    this.count++;
    for (let i = 0; i < this.bounds.length; i++) if (v <= this.bounds[i]) this.#counts[i]++;
  }

  /** The samples, with `labels` on each. */
  samples(labels: Record<string, string> = {}): Family["samples"] {
    return [
      ...this.bounds.map((b, i) => ({
        suffix: "_bucket",
        labels: { ...labels, le: String(b) },
        value: this.#counts[i],
      })),
      { suffix: "_bucket", labels: { ...labels, le: "+Inf" }, value: this.count },
      { suffix: "_sum", labels, value: this.sum },
      { suffix: "_count", labels, value: this.count },
    ];
  }
}

/** Measures how late a timer fires: how long the event loop is kept from work. */
export class LoopLag {
  /** The latest lag, in seconds. */
  seconds = 0;
  #timer: ReturnType<typeof setInterval>;

  /** Starts measuring every `intervalMs`. */
  constructor(intervalMs = 200) {
    let expected = performance.now() + intervalMs;
    this.#timer = setInterval(() => {
      const now = performance.now();
      this.seconds = Math.max(0, now - expected) / 1000;
      expected = now + intervalMs;
    }, intervalMs);
    Deno.unrefTimer(this.#timer);
  }

  /** Stops measuring. */
  stop(): void {
    clearInterval(this.#timer);
  }
}
