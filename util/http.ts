/**
 * The HTTP side of nodes: a small server for the dashboard, /metrics and /health, under
 * the same rules as the node (its host; its token, when one is set), Prometheus text,
 * and an event-loop lag gauge.
 *
 * @module
 */

import { equalBytes, hmacSha256, toBase64 } from "./sha256.ts";
import { formatAddress, isLoopback } from "../protocol/address.ts";
import type { Logger } from "./log.ts";
import { type HttpListener, listenHttp } from "./http_server.ts";

/** A route handler; `null` means "not mine". */
export type Route = (request: Request, url: URL) => Response | Promise<Response> | null;

/** A running HTTP server. */
export interface HttpServer {
  /** `http://host:port`. */
  readonly url: string;
  /** Stops it; open event streams end. */
  close(): Promise<void>;
  /** Waiting for viewers no longer keeps the process alive (a viewer connected still does). */
  unref(): void;
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
  /** Longest a request head may take to arrive, in ms (default HTTP_HEAD_TIMEOUT_MS). */
  headTimeoutMs?: number;
  /** Most HTTP connections open at once (default HTTP_CONNECTIONS_MAX). */
  connectionsMax?: number;
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
export { HTTP_CONNECTIONS_MAX, HTTP_HEAD_BYTES_MAX, HTTP_HEAD_TIMEOUT_MS } from "./http_server.ts";

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
    if (url.pathname === "/health") {
      return Response.json({ status: "ok" }, { headers: { "cache-control": "no-store" } });
    }
    if (authToken) {
      if (url.pathname === "/login" && request.method === "POST") {
        // The server read the body whole, under HTTP_BODY_BYTES_MAX: parsing it costs no more.
        const form = await request.formData().catch(() => null);
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
  const limits = {
    bodyBytesMax,
    bodyTimeoutMs,
    headTimeoutMs: options.headTimeoutMs,
    connectionsMax: options.connectionsMax,
  };
  const listen = (port: number) => listenHttp(options.host, port, handler, limits);
  let server: HttpListener;
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
      // Responses still going (an event stream its owner has just ended) finish cleanly;
      // one that has not within HTTP_CLOSE_GRACE_MS (a viewer that stopped reading) is cut.
      await server.close(HTTP_CLOSE_GRACE_MS);
    },
    unref() {
      server.unref();
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
