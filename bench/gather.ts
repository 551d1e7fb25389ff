/**
 * Where a gather's time goes, next to its limits: in one run, 256 MiB random
 * `Float64Array` gathers from a worker to this process, and the same bytes sent from
 * this process into fresh memory by Deno's raw sink and by Python's (asyncio, numpy,
 * as Dask's comm receives). Every receiver gets transparent huge pages (glibc's
 * tunable for the Deno processes, numpy's own for Python), and each lets go of what it
 * received at once. With `--perf` (Linux `perf` on the PATH, allowed to attach), each
 * receiver is profiled during its runs and the run prints where its samples went: the
 * kernel zeroing fresh pages, copying from the socket, and the runtime's own code.
 *
 * Run: deno task bench:gather [--runs N] [--perf]
 *
 * @module
 */

import { benchArgs } from "./_args.ts";
import { median, minorFaults, randomF64, RAW_HELPER_SOURCE, rawBulk } from "./_raw.ts";
import { type NodeProcess, spawnNode } from "../client/spawn.ts";
import { Client } from "../mod.ts";

const MiB = 1024 * 1024;
const MB = 1e6;
const BYTES = 256 * MiB;
const START_TIMEOUT_MS = 60_000;
const WATCHDOG_MS = 300_000;
const DASK_SCRIPT = new URL("./dask_bench.py", import.meta.url);

interface Helper {
  child: Deno.ChildProcess;
  sink: number;
}

/** Starts a raw TCP helper and reads the ports it prints; its other output is dropped. */
async function startHelper(command: string, args: string[], env: Record<string, string>): Promise<Helper> {
  const child = new Deno.Command(command, { args, env, stdout: "piped", stderr: "null", stdin: "null" })
    .spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (!/\{"echo".*\}\n/.test(text)) {
    const { value, done } = await reader.read();
    if (done || Date.now() > deadline) throw new Error(`${command} printed no ports: ${text.slice(0, 300)}`);
    text += value;
  }
  await reader.cancel().catch(() => {}); // the helper prints nothing more
  const ports = JSON.parse(/(\{"echo".*\})/.exec(text)![1]) as { sink: number };
  return { child, sink: ports.sink };
}

/** A `perf record -g` of `pid` until stopped; null when perf is missing or may not attach. */
async function startPerf(pid: number, file: string): Promise<{ stop(): Promise<boolean> } | null> {
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command("perf", {
      args: ["record", "-q", "-g", "-p", String(pid), "-o", file],
      stdout: "null",
      stderr: "piped",
    }).spawn();
  } catch {
    return null;
  }
  // perf needs a moment to attach; a refusal ends it at once.
  const early = await Promise.race([child.status, new Promise<null>((r) => setTimeout(() => r(null), 500))]);
  if (early !== null) {
    const err = new TextDecoder().decode(
      (await child.output().catch(() => null))?.stderr ?? new Uint8Array(),
    );
    console.log(`  perf could not attach to ${pid}: ${err.trim().split("\n")[0] ?? "no reason given"}`);
    return null;
  }
  return {
    async stop() {
      child.kill("SIGINT");
      await child.stderr.cancel().catch(() => {});
      await child.status; // perf ends on SIGINT with a status of its own choosing; its file tells
      return (await Deno.stat(file).catch(() => null))?.size ? true : false;
    },
  };
}

/** The top lines of `perf report` for `file`, sorted by `key`: [percent, name]. */
async function perfTop(file: string, key: "dso" | "sym", min: number): Promise<[number, string][]> {
  const out = await new Deno.Command("perf", {
    args: ["report", "-i", file, "--no-children", "--sort", key, "--stdio", "-g", "none"],
    stdout: "piped",
    stderr: "null",
  }).output();
  const rows: [number, string][] = [];
  for (const line of new TextDecoder().decode(out.stdout).split("\n")) {
    const m = /^\s+([\d.]+)%\s+(.*\S)\s*$/.exec(line);
    if (m && Number(m[1]) >= min) rows.push([Number(m[1]), m[2].replace(/^\[[k.]\]\s+/, "")]);
  }
  return rows;
}

async function profileLines(file: string): Promise<string> {
  const dso = await perfTop(file, "dso", 0.5);
  const sym = await perfTop(file, "sym", 2);
  return `    by object: ${dso.map(([p, n]) => `${n} ${p.toFixed(1)}%`).join(", ")}\n` +
    `    top symbols: ${sym.slice(0, 6).map(([p, n]) => `${n} ${p.toFixed(1)}%`).join(", ")}`;
}

function summary(xs: number[]): string {
  const r = (x: number) => Math.round(x).toLocaleString("en-US");
  return `median ${r(median(xs))} MB/s (runs: ${xs.map(r).join(" ")})`;
}

async function findPython(): Promise<string | null> {
  for (const python of [Deno.env.get("DIST_COMPARE_PYTHON"), "/usr/bin/python3", "python3"]) {
    if (!python) continue;
    try {
      const out = await new Deno.Command(python, { args: ["-c", "import numpy"], stderr: "null" }).output();
      if (out.success) return python;
    } catch { /* not there */ }
  }
  return null;
}

async function main(): Promise<number> {
  const usage = "Usage: deno task bench:gather [--runs N] [--perf]";
  const values = benchArgs(usage, { runs: { type: "string", default: "10" }, perf: { type: "boolean" } });
  if (typeof values === "number") return values;
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1 || runs > 100) {
    console.error(`--runs ${values.runs}: expected a whole number from 1 to 100\n${usage}`);
    return 2;
  }
  if (!(Deno.env.get("GLIBC_TUNABLES") ?? "").includes("glibc.malloc.hugetlb=1")) {
    console.error(
      "Run it as `deno task bench:gather`: this process needs GLIBC_TUNABLES=glibc.malloc.hugetlb=1",
    );
    return 2;
  }
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) {
    console.error(
      "Run it as `deno task bench:gather`: it needs --v8-flags=--expose-gc to let go of a gather",
    );
    return 2;
  }
  const tmp = await Deno.makeTempDir({ prefix: "dist-bench-gather-" });
  const nodes: NodeProcess[] = [];
  const helpers: Helper[] = [];
  const conns: Deno.Conn[] = [];
  let client: Client | undefined;
  const watchdog = setTimeout(() => {
    console.error(`bench:gather took over ${WATCHDOG_MS / 1000} s; stopping`);
    for (const h of helpers) h.child.kill("SIGKILL");
    for (const n of nodes) n.child.kill("SIGKILL");
    Deno.exit(1);
  }, WATCHDOG_MS);
  try {
    const load = Deno.loadavg().map((x) => x.toFixed(2)).join(" ");
    console.log(
      `bench:gather: ${BYTES / MiB} MiB random Float64Array, ${runs} runs each after one unmeasured; ` +
        `${navigator.hardwareConcurrency} cores; load average at start ${load}`,
    );
    const value = randomF64(BYTES);
    const bytes = new Uint8Array(value.buffer);
    const scheduler = await spawnNode(["scheduler", "--port", "0", "--no-dashboard", "--log-level", "warn"]);
    nodes.push(scheduler);
    const worker = await spawnNode([
      ...["worker", scheduler.address, "--nthreads", "1", "--no-nanny", "--log-level", "warn"],
    ]);
    nodes.push(worker);
    client = await Client.connect(scheduler.address);
    const [future] = await client.scatter([value], { workers: [worker.address] });

    const rates: Record<string, number[]> = {};
    const faults: Record<string, number[]> = {};
    const profiles: Record<string, string> = {};
    const measure = async (name: string, pid: number, one: () => Promise<number>) => {
      await one(); // unmeasured: every buffer on the way reaches this size
      const file = `${tmp}/${name.replace(/\W+/g, "-")}.perf`;
      const perf = values.perf ? await startPerf(pid, file) : null;
      const out: number[] = [];
      const took: number[] = [];
      for (let i = 0; i < runs; i++) {
        const f0 = await minorFaults(pid);
        out.push(await one());
        const f1 = await minorFaults(pid);
        if (f0 !== null && f1 !== null) took.push(f1 - f0);
      }
      faults[name] = took;
      if (perf && await perf.stop()) profiles[name] = await profileLines(file);
      rates[name] = out;
    };

    await measure("dist gather, into this process", Deno.pid, async () => {
      const t0 = performance.now();
      let got: Float64Array | null = await future.result() as Float64Array;
      const mbps = BYTES / MB / ((performance.now() - t0) / 1000);
      if (got.length !== value.length || got[12345] !== value[12345]) {
        throw new Error("The gather came back wrong");
      }
      got = null;
      gc();
      return mbps;
    });

    // From a file, with a short command line: see startDenoHelper in compare.ts for why.
    await Deno.writeTextFile(`${tmp}/raw.js`, RAW_HELPER_SOURCE);
    const deno = await startHelper(Deno.execPath(), [
      "run",
      "--allow-net",
      "--v8-flags=--expose-gc",
      `${tmp}/raw.js`,
    ], { GLIBC_TUNABLES: "glibc.malloc.hugetlb=1" });
    helpers.push(deno);
    const denoSink = await Deno.connect({ hostname: "127.0.0.1", port: deno.sink });
    conns.push(denoSink);
    await measure("Deno's raw sink", deno.child.pid, () => rawBulk(denoSink, bytes, true));

    const python = await findPython();
    if (python) {
      const py = await startHelper(python, [DASK_SCRIPT.pathname, "raw-server"], {
        PYTHONDONTWRITEBYTECODE: "1",
      });
      helpers.push(py);
      const pySink = await Deno.connect({ hostname: "127.0.0.1", port: py.sink });
      conns.push(pySink);
      await measure(
        "Python's raw sink (asyncio, numpy.empty)",
        py.child.pid,
        () => rawBulk(pySink, bytes, true),
      );
    }

    console.log("\n256 MiB into fresh memory (huge pages), MB/s with 1 MB = 1e6 B:");
    for (const [name, xs] of Object.entries(rates)) {
      const took = faults[name].length ? `; page faults per run, median ${median(faults[name])}` : "";
      console.log(`  ${name}: ${summary(xs)}${took}`);
      if (profiles[name]) console.log(profiles[name]);
    }
    if (!python) console.log("  Python's raw sink: n/a (no python3 with numpy; apt install python3-numpy)");
    if (values.perf && Object.keys(profiles).length === 0) {
      console.log(
        "  (no profile: perf is missing or may not attach; try as root or lower kernel.perf_event_paranoid)",
      );
    }
    const gather = median(rates["dist gather, into this process"]);
    const raw = median(rates["Deno's raw sink"]);
    console.log(`\ndist's gather: ${Math.round((100 * gather) / raw)}% of Deno's raw sink into fresh memory`);
    console.log(
      "The gather's sender is the worker; the raw sinks' is this process. 256 MiB in huge pages takes ~130-700\n" +
        "faults, in 4 KiB pages 65,536. clear_page_* is the kernel zeroing a fresh page at its first touch,\n" +
        "_copy_to_iter the copy from the socket into it.",
    );
    return 0;
  } finally {
    clearTimeout(watchdog);
    for (const c of conns) {
      try {
        c.close();
      } catch { /* closed */ }
    }
    await client?.close();
    for (const h of helpers) {
      h.child.kill("SIGTERM");
      await h.child.status;
    }
    for (const n of nodes.reverse()) await n.stop();
    await Deno.remove(tmp, { recursive: true });
  }
}

if (import.meta.main) Deno.exit(await main());
