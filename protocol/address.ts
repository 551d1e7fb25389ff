/**
 * Node addresses: `tcp://host:port`, the form every address takes in replies; `host:port`
 * alone is read as `tcp://host:port`, as Dask reads it.
 *
 * @module
 */

/** A parsed node address. */
export interface Address {
  /** Host name or IP (IPv6 without brackets). */
  host: string;
  /** TCP port, 0 to 65535. */
  port: number;
  /** True for `tls://` addresses: the connection is encrypted. */
  tls?: boolean;
}

/** Reads a port number, throwing RangeError with what was wrong. */
export function parsePort(text: string | number, what = "port"): number {
  const port = typeof text === "number" ? text : /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new RangeError(
      `Invalid ${what}: expected a port from 0 to 65535, got ${JSON.stringify(String(text))}`,
    );
  }
  return port;
}

/**
 * Parses `"tcp://host:port"`, `"tls://host:port"` or `"host:port"` (tcp; an IPv6 host in
 * brackets), or `{ host, port, tls? }`. Throws TypeError or RangeError that says what was
 * wrong.
 */
export function parseAddress(address: string | Address): Address {
  if (typeof address === "object" && address !== null) {
    if (typeof address.host !== "string" || address.host === "") {
      throw new TypeError(`Invalid address: host must be a non-empty string`);
    }
    const parsed: Address = { host: address.host, port: parsePort(address.port) };
    if (address.tls) parsed.tls = true;
    return parsed;
  }
  if (typeof address !== "string") {
    throw new TypeError(
      `Invalid address: expected "tcp://host:port" or { host, port }, got ${typeof address}`,
    );
  }
  const match = /^(?:(tcp|tls):\/\/)?(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):([^/]*)$/.exec(address);
  if (!match) {
    throw new TypeError(
      `Invalid address ${
        JSON.stringify(address)
      }: expected host:port, tcp://host:port or tls://host:port (e.g. 127.0.0.1:8786)`,
    );
  }
  const host = match[2].startsWith("[") ? match[2].slice(1, -1) : match[2];
  const parsed: Address = { host, port: parsePort(match[3], `address ${JSON.stringify(address)}`) };
  if (match[1] === "tls") parsed.tls = true;
  return parsed;
}

/** Formats an address as `tcp://host:port` or `tls://host:port` (brackets around IPv6 hosts). */
export function formatAddress(address: Address): string {
  const host = address.host.includes(":") ? `[${address.host}]` : address.host;
  return `${address.tls ? "tls" : "tcp"}://${host}:${address.port}`;
}

/** True for hosts that only this machine can reach. */
export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\./.test(host);
}
