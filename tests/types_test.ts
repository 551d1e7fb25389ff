/**
 * The client's types: `submit` and `map` check arguments against the function's
 * parameters (a future stands for its value, also inside arrays and objects), a plain
 * options object where Dask users put one is a type error, and `scatter` keeps its values'
 * types. The `@ts-expect-error` lines are the checks: `deno check` fails if any of them
 * compiles. The valid calls also run, on a real local cluster.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, type Future, taskOptions } from "../mod.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

const inc = (x: number) => x + 1;
const add = (a: number, b: number) => a + b;
const total = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
const keyOf = (o: { key: string }) => o.key;

/** Only type-checked, never run: each @ts-expect-error must be an error. */
function refusedAtCompileTime(client: Client, x: Future<number>, s: Future<string>): void {
  // @ts-expect-error: a string where inc takes a number
  client.submit(inc, "a");
  // @ts-expect-error: Dask's habit, an options object as a last argument inc does not take
  client.submit(inc, 1, { key: "x" });
  // @ts-expect-error: a future of a string where add takes a number
  client.submit(add, s, 10);
  // @ts-expect-error: too few arguments
  client.submit(add, 1);
  // @ts-expect-error: an iterable of strings for inc
  client.map(inc, ["a"]);
  // @ts-expect-error: map takes iterables, not one value
  client.map(inc, 1);
  // @ts-expect-error: a future of a number inside an array of strings
  client.submit((xs: string[]) => xs.join(), ["a", x]);
  // @ts-expect-error: the result of inc is a number, not a string
  const _wrong: Promise<string> = client.submit(inc, 1).result();
  // A function named by module: its types are the caller's to say.
  const _byModule: Future<number> = client.submit<number>(
    { module: "https://example.com/lib.ts", name: "f" },
    4,
  );
}

Deno.test("types: submit, map and scatter take what the function takes and keep their types", async () => {
  assert.equal(typeof refusedAtCompileTime, "function");
  await using client = await Client.local({ workers: 1, threads: 1, dashboardPort: null });
  const x = client.submit(inc, 1); // Future<number>
  const y = client.submit(add, x, 10);
  const opts = client.submit(inc, 5, taskOptions({ key: "six", pure: false }));
  const nested = client.submit(total, [x, 2, y]);
  const object = client.submit(keyOf, { key: "k" }); // fn takes an object: not options
  const squares = client.map(add, [1, 2, 3], [x, x, x]);
  const [big] = await client.scatter([new Float64Array([1, 2, 3])]); // Future<Float64Array>
  const { named } = await client.scatter({ named: "text" }); // Future<string>
  const length = client.submit((a: Float64Array) => a.length, big);
  const upper = client.submit((t: string) => t.toUpperCase(), named);
  // Each result has its function's type: assigning it to another is a compile error above.
  const got: [number, number, number, number, string, number[], number, string] = [
    await y.result(),
    await opts.result(),
    await nested.result(),
    await length.result(),
    await object.result(),
    await client.gather(squares),
    (await big.result())[2],
    await upper.result(),
  ];
  assert.deepEqual(got, [12, 6, 16, 3, "k", [3, 4, 5], 3, "TEXT"]);
});
