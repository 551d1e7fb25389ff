/**
 * The raw-TCP helper the benchmarks run as a separate process, to measure the
 * machine's limits next to dist's figures, and the random data they send.
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
