/**
 * What the benchmarks share: the raw-TCP helper they run as a separate process to
 * measure the machine's limits next to dist's figures, the sending side of its sink, the
 * random data they send, and the small measuring helpers around them.
 *
 * @module
 */

/**
 * The helper's source. `echo` sends back whatever arrives. `sink` reads a header
 * (u64 LE length, u64 LE mode), then that many bytes, then acks with one byte. Mode 0
 * reads into one reused 1 MiB buffer (the limit); mode 1 reads into a new buffer per
 * transfer, as any receiver that keeps the data must (MessageReader does), and lets go of
 * it at once (a collection, when run with --expose-gc), as Python's reference counting
 * does and a dist worker's store asks V8 to.
 */
export const RAW_HELPER_SOURCE = `
const echo = Deno.listen({ hostname: "127.0.0.1", port: 0 });
const sink = Deno.listen({ hostname: "127.0.0.1", port: 0 });
console.log(JSON.stringify({ echo: echo.addr.port, sink: sink.addr.port }));

async function writeAll(conn, p) {
  let done = 0;
  while (done < p.byteLength) done += await conn.write(p.subarray(done));
}

async function readFull(conn, p) {
  let got = 0;
  while (got < p.byteLength) {
    const n = await conn.read(p.subarray(got));
    if (n === null) return false;
    got += n;
  }
  return true;
}

async function serveEcho(conn) {
  conn.setNoDelay(true);
  const buf = new Uint8Array(64 * 1024);
  try {
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      await writeAll(conn, buf.subarray(0, n));
    }
  } catch { /* the client went away */ }
  try { conn.close(); } catch { /* closed */ }
}

async function serveSink(conn) {
  conn.setNoDelay(true);
  const header = new Uint8Array(16);
  const view = new DataView(header.buffer);
  const reused = new Uint8Array(1024 * 1024);
  try {
    while (await readFull(conn, header)) {
      const total = Number(view.getBigUint64(0, true));
      if (view.getBigUint64(8, true) === 0n) {
        let left = total;
        while (left > 0) {
          const n = await conn.read(left < reused.byteLength ? reused.subarray(0, left) : reused);
          if (n === null) throw new Error("closed inside a transfer");
          left -= n;
        }
      } else {
        let fresh = new Uint8Array(total);
        if (!(await readFull(conn, fresh))) throw new Error("closed inside a transfer");
        fresh = null;
        globalThis.gc?.();
      }
      await writeAll(conn, new Uint8Array([1]));
    }
  } catch { /* the client went away */ }
  try { conn.close(); } catch { /* closed */ }
}

(async () => { for await (const c of echo) serveEcho(c); })();
(async () => { for await (const c of sink) serveSink(c); })();
`;

/** Random floats in [0, 1): incompressible, as most real data (xorshift32, seeded: the same every run). */
export function randomF64(bytes: number): Float64Array {
  const a = new Float64Array(bytes / 8);
  let x = 0x9e3779b9;
  for (let i = 0; i < a.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    a[i] = (x >>> 0) / 4294967296;
  }
  return a;
}

const MiB = 1024 * 1024;
const MB = 1e6;
/** Largest piece handed to one conn.write in the raw bulk test. */
const RAW_WRITE_CHUNK_BYTES = 16 * MiB;

/** Runs a small command and returns its stdout, or null if it fails. */
export async function output(command: string, args: string[]): Promise<string | null> {
  try {
    const out = await new Deno.Command(command, { args, stdin: "null", stdout: "piped", stderr: "null" })
      .output();
    return out.success ? new TextDecoder().decode(out.stdout) : null;
  } catch {
    return null;
  }
}

/** Minor page faults of `pid` so far (/proc/PID/stat field 10), or null where unreadable. */
export async function minorFaults(pid: number): Promise<number | null> {
  const stat = await output("cat", [`/proc/${pid}/stat`]);
  const fields = stat?.slice(stat.lastIndexOf(")") + 2).split(" ");
  const n = Number(fields?.[7]);
  return Number.isFinite(n) ? n : null;
}

/** Writes all of `p`. */
export async function writeAll(conn: Deno.Conn, p: Uint8Array): Promise<void> {
  let done = 0;
  while (done < p.byteLength) done += await conn.write(p.subarray(done));
}

/** Reads exactly `p.byteLength` bytes into `p`; a close before that throws. */
export async function readFull(conn: Deno.Conn, p: Uint8Array): Promise<void> {
  let got = 0;
  while (got < p.byteLength) {
    const n = await conn.read(p.subarray(got));
    if (n === null) throw new Error("The raw TCP helper closed the connection");
    got += n;
  }
}

/** Sends `data` through the helper's sink, into its reused buffer or into fresh memory; MB/s. */
export async function rawBulk(conn: Deno.Conn, data: Uint8Array, fresh: boolean): Promise<number> {
  const header = new Uint8Array(16);
  new DataView(header.buffer).setBigUint64(0, BigInt(data.byteLength), true);
  new DataView(header.buffer).setBigUint64(8, fresh ? 1n : 0n, true);
  const ack = new Uint8Array(1);
  const t0 = performance.now();
  await writeAll(conn, header);
  for (let at = 0; at < data.byteLength;) {
    at += await conn.write(data.subarray(at, Math.min(at + RAW_WRITE_CHUNK_BYTES, data.byteLength)));
  }
  await readFull(conn, ack);
  const t1 = performance.now();
  return data.byteLength / MB / ((t1 - t0) / 1000);
}

/** The median of `xs` (the mean of the middle two for an even count). */
export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}
