/**
 * Task throughput through the client, the layout of the issue: a scheduler and two
 * workers with one thread each, all separate processes on 127.0.0.1, the client here.
 *
 *   1. 10,000 independent trivial tasks (map(inc, range) then gather): tasks/s
 *   2. a tree reduction summing 4,096 leaves pairwise (8,191 tasks): tasks/s
 *   3. a chain of 1,000 dependent tasks: ms per task
 *   4. the seed exchange through the client, fresh keys each time: median ms
 *   5. CPU-bound tasks on one worker with 1 and with 2 threads: the speedup
 *
 * Each figure is run `rounds` times after a warm-up round (the processes' JIT);
 * the median is reported, with the best and the runs.
 *
 * Run: deno task bench (runs this after bench.ts), or deno run ... bench/tasks.ts [--quick]
 *
 * @module
 */

import { type NodeProcess, spawnNode } from "../client/spawn.ts";
import { Client, type Future } from "../mod.ts";

const quick = Deno.args.includes("--quick");
const ROUNDS = quick ? 1 : 5;
const MAP_TASKS = quick ? 1_000 : 10_000;
const TREE_LEAVES = quick ? 256 : 4_096;
const CHAIN = quick ? 100 : 1_000;
const SEEDS = quick ? 20 : 200;
const CPU_TASKS = 8;

/** Dask distributed on this machine in the same layout, as the issue gives it. */
const DASK = { map: "600-2,200 tasks/s", tree: "2,000-2,300 tasks/s", chain: "5.7 ms/task", seed: "12 ms" };

const inc = (x: number) => x + 1;
const add = (a: number, b: number) => a + b;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

async function startNodes(workers: number, threads: number): Promise<NodeProcess[]> {
  const scheduler = await spawnNode(["scheduler", "--port", "0", "--log-level", "warn"]);
  const nodes = [scheduler];
  try {
    for (let i = 0; i < workers; i++) {
      nodes.push(
        await spawnNode([
          "worker",
          scheduler.address,
          "--nthreads",
          String(threads),
          "--name",
          `w${i}`,
          "--log-level",
          "warn",
          "--no-nanny",
        ]),
      );
    }
  } catch (error) {
    for (const n of nodes.reverse()) await n.stop();
    throw error;
  }
  return nodes;
}

async function stopNodes(nodes: NodeProcess[]): Promise<void> {
  for (const n of [...nodes].reverse()) await n.stop();
}

/** Runs `once` for a warm-up and then `ROUNDS` times; the figures it returns, in order. */
async function rounds(once: (round: number) => Promise<number>): Promise<number[]> {
  await once(-1);
  const out: number[] = [];
  for (let r = 0; r < ROUNDS; r++) out.push(await once(r));
  return out;
}

async function mapRate(client: Client, round: number): Promise<number> {
  // Fresh inputs each round: pure keys would otherwise find last round's results.
  const base = (round + 2) * 1e7;
  const t = performance.now();
  const futures = client.map(inc, Array.from({ length: MAP_TASKS }, (_, i) => base + i));
  const results = await client.gather(futures);
  const s = (performance.now() - t) / 1000;
  if (results[MAP_TASKS - 1] !== base + MAP_TASKS) throw new Error("map gave a wrong result");
  for (const f of futures) f.release();
  return MAP_TASKS / s;
}

async function treeRate(client: Client, round: number): Promise<number> {
  const base = (round + 2) * 1e7;
  const t = performance.now();
  let level: Future<number>[] = client.map(inc, Array.from({ length: TREE_LEAVES }, (_, i) => base + i));
  let tasks = level.length;
  while (level.length > 1) {
    const next: Future<number>[] = [];
    for (let i = 0; i < level.length; i += 2) next.push(client.submit(add, level[i], level[i + 1]));
    for (const f of level) f.release();
    tasks += next.length;
    level = next;
  }
  const total = await level[0].result();
  const s = (performance.now() - t) / 1000;
  const expected = TREE_LEAVES * (base + 1) + (TREE_LEAVES * (TREE_LEAVES - 1)) / 2;
  if (total !== expected) throw new Error(`tree gave ${total}, expected ${expected}`);
  level[0].release();
  return tasks / s;
}

async function chainMs(client: Client, round: number): Promise<number> {
  const t = performance.now();
  let f = client.submit(inc, (round + 2) * 1e7);
  for (let i = 1; i < CHAIN; i++) {
    const next = client.submit(inc, f);
    f.release();
    f = next;
  }
  const value = await f.result();
  const ms = (performance.now() - t) / CHAIN;
  if (value !== (round + 2) * 1e7 + CHAIN) throw new Error("chain gave a wrong result");
  f.release();
  return ms;
}

/** The seed exchange through the client: x on one worker, a fresh `a` on the other. */
async function seedMs(client: Client, workers: string[], round: number): Promise<number> {
  const [x] = await client.scatter([new Float64Array(1000).fill(1)], { workers: [workers[0]] });
  const samples: number[] = [];
  for (let i = 0; i < SEEDS; i++) {
    const [a] = await client.scatter([new Float64Array([round * SEEDS + i])], { workers: [workers[1]] });
    const t = performance.now();
    const z = client.submit((u: Float64Array, v: Float64Array) => u[0] + v[0], x, a);
    await z.result();
    samples.push(performance.now() - t);
    z.release();
    a.release();
  }
  x.release();
  return median(samples);
}

/** CPU-bound tasks (a busy loop of ~100 ms each) on one worker with `threads` threads: seconds. */
async function cpuSeconds(threads: number): Promise<number> {
  const nodes = await startNodes(1, threads);
  try {
    await using client = await Client.connect(nodes[0].address);
    const spin = (ms: number, seed: number) => {
      const end = Date.now() + ms;
      let x = seed;
      while (Date.now() < end) x = (x * 1103515245 + 12345) % 2147483648;
      return x;
    };
    await client.gather(client.map(spin, [10, 10], [-1, -2])); // warm-up: executors compile
    const t = performance.now();
    await client.gather(
      client.map(spin, Array(CPU_TASKS).fill(quick ? 20 : 100), [...Array(CPU_TASKS).keys()]),
    );
    return (performance.now() - t) / 1000;
  } finally {
    await stopNodes(nodes);
  }
}

function row(
  name: string,
  runs: number[],
  unit: string,
  target: string,
  pass: boolean,
  dask: string,
  digits = 0,
) {
  const fmt = (v: number) =>
    v.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
  return [
    name,
    `${fmt(median(runs))} ${unit}`,
    runs.map(fmt).join(" / "),
    dask,
    `${target}: ${pass ? "PASS" : "MISS"}`,
  ];
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) => r.map((cell, c) => cell.padEnd(widths[c])).join("  ").trimEnd()).join("\n");
}

const started = performance.now();
const nodes = await startNodes(2, 1);
const results: string[][] = [["figure", "median", "runs", "Dask (issue)", "target (5x Dask)"]];
try {
  await using client = await Client.connect(nodes[0].address);
  const workers = nodes.slice(1).map((n) => n.address);
  const map = await rounds((r) => mapRate(client, r));
  results.push(
    row(`1. map(inc, ${MAP_TASKS}) + gather`, map, "tasks/s", ">= 10,000", median(map) >= 10_000, DASK.map),
  );
  const tree = await rounds((r) => treeRate(client, r));
  results.push(
    row(
      `2. tree reduction, ${TREE_LEAVES} leaves`,
      tree,
      "tasks/s",
      ">= 10,000",
      median(tree) >= 10_000,
      DASK.tree,
    ),
  );
  const chain = await rounds((r) => chainMs(client, r));
  results.push(row(`3. chain of ${CHAIN}`, chain, "ms/task", "<= 1 ms", median(chain) <= 1, DASK.chain, 3));
  const seed = await rounds((r) => seedMs(client, workers, r));
  results.push(row("4. seed exchange via client", seed, "ms", "<= 2 ms", median(seed) <= 2, DASK.seed, 2));
} finally {
  await stopNodes(nodes);
}
const one = await cpuSeconds(1);
const two = await cpuSeconds(2);
console.log(
  `Task throughput: a scheduler and 2 workers x 1 thread, separate processes on 127.0.0.1; ` +
    `${navigator.hardwareConcurrency} cores; deno ${Deno.version.deno}; ${ROUNDS} rounds after a warm-up${
      quick ? " (--quick: smoke test)" : ""
    }\n`,
);
console.log(table(results));
console.log(
  `\n5. ${CPU_TASKS} CPU-bound tasks on one worker: 1 thread ${one.toFixed(2)} s, 2 threads ${
    two.toFixed(2)
  } s: ` +
    `speedup ${(one / two).toFixed(2)}x (2 cores)`,
);
console.log(`\n(whole run: ${((performance.now() - started) / 1000).toFixed(1)} s)`);
