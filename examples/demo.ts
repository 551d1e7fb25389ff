/**
 * dist in one minute: a local cluster (a scheduler here, two worker processes on
 * 127.0.0.1) and real computations through the client, each step printed.
 *
 * Run: deno task demo
 *
 * @module
 */

import { Client, rpc, type SchedulerOps, taskOptions } from "../mod.ts";

const inc = (x: number) => x + 1;
const add = (a: number, b: number) => a + b;

console.log("Starting a local cluster: a scheduler here, 2 worker processes with 1 thread each ...");
const t0 = performance.now();
await using client = await Client.local({ workers: 2, threads: 1 });
await using center = rpc<SchedulerOps>(client.scheduler);
const workers = await center.workers();
console.log(`  scheduler at ${client.scheduler}, workers ${workers.map((w) => w.address).join(", ")}`);
console.log(`  ready in ${(performance.now() - t0).toFixed(0)} ms\n`);

console.log("submit: x = inc(1); y = add(x, 10)");
const x = client.submit(inc, 1);
const y = client.submit(add, x, 10);
console.log(
  `  y.result() = ${await y.result()}   (x ran on ${(await center.who_has({ keys: [x.key] }))[x.key]})\n`,
);

console.log("map + gather: 10,000 tasks of inc over 0..9999");
let t = performance.now();
const many = client.map(inc, Array.from({ length: 10_000 }, (_, i) => i));
const values = await client.gather(many);
const s = (performance.now() - t) / 1000;
console.log(
  `  sum = ${values.reduce((p, q) => p + q, 0)} in ${(s * 1000).toFixed(0)} ms (${
    (10_000 / s).toFixed(0)
  } tasks/s on a fresh cluster; its processes reach full speed after ~40,000 tasks)\n`,
);
for (const f of many) f.release();

console.log("A tree reduction over 1,024 leaves (2,047 tasks), results moving between workers:");
t = performance.now();
let level = client.map((i: number) => i, Array.from({ length: 1024 }, (_, i) => i));
while (level.length > 1) {
  const next = [];
  for (let i = 0; i < level.length; i += 2) next.push(client.submit(add, level[i], level[i + 1]));
  level = next;
}
console.log(`  total = ${await level[0].result()} in ${(performance.now() - t).toFixed(0)} ms\n`);

console.log("The seed exchange: x (8 MB) on one worker, a (24 bytes) on the other, z <- add(x, a):");
const [alice, bob] = workers.map((w) => w.address);
const [xs] = await client.scatter([new Float64Array(1_000_000).fill(1)], { workers: [alice] });
const [as] = await client.scatter([new Float64Array([10, 20, 30])], { workers: [bob] });
const z = client.submit((u: Float64Array, v: Float64Array) => v.map((e, i) => e + u[i]), xs, as);
console.log(`  z = [${await z.result()}]`);
const whoHas = await center.who_has({ keys: [z.key, as.key] });
console.log(
  `  z was computed on ${whoHas[z.key]}, next to x; a was fetched there: ${whoHas[as.key].join(" and ")}\n`,
);

console.log("An error travels to result(), with the task that raised it:");
const bad = client.submit(
  (v: number) => {
    if (v > 1) throw new RangeError(`${v} is too big`);
    return v;
  },
  5,
  taskOptions({ key: "check-5" }),
);
const after = client.submit(inc, bad);
await after.result().catch((e) => console.log(`  ${e.name}: ${e.message} (raised by task ${e.task})`));

console.log("\nClosing the client stops the cluster.");
