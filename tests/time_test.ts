import assert from "node:assert/strict";
import { Backoff, deadline, delay } from "../util/time.ts";
import { Lru } from "../util/lru.ts";
import { Rng } from "../testing/rng.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

Deno.test("a deadline counts down on its clock, never below 0, and expires at its moment", () => {
  let now = 1_000;
  const clock = () => now;
  const until = deadline(250, clock);
  assert.equal(until.remaining(), 250);
  assert.equal(until.expired(), false);
  now += 249;
  assert.equal(until.remaining(), 1);
  assert.equal(until.expired(), false);
  now += 1;
  assert.equal(until.remaining(), 0);
  assert.equal(until.expired(), true);
  now += 1_000;
  assert.equal(until.remaining(), 0);
  assert.equal(deadline(0, clock).expired(), true);
  assert.equal(deadline(-5, clock).remaining(), 0);
  const never = deadline(Infinity, clock);
  now = Number.MAX_SAFE_INTEGER;
  assert.equal(never.expired(), false);
  assert.equal(never.remaining(), Infinity);
  assert.throws(() => deadline(NaN), RangeError);
});

Deno.test("a deadline on the real clock expires after its time", async () => {
  const until = deadline(30);
  assert.ok(until.remaining() > 0 && until.remaining() <= 30);
  await delay(40); // the time passing is what is under test
  assert.equal(until.expired(), true);
});

Deno.test("backoff without jitter doubles from the first pause up to the cap, and starts again on reset", () => {
  const backoff = new Backoff({ firstMs: 50, maxMs: 1_000 });
  assert.deepEqual(Array.from({ length: 8 }, () => backoff.next()), [
    50,
    100,
    200,
    400,
    800,
    1_000,
    1_000,
    1_000,
  ]);
  backoff.reset();
  assert.equal(backoff.next(), 50);
});

Deno.test("backoff with full jitter pauses between 0 and each step, from the given random source", () => {
  const draws = [0, 0.5, 0.999, 0.25, 0.75];
  let i = 0;
  const backoff = new Backoff({ firstMs: 20, maxMs: 100, jitter: "full", random: () => draws[i++] });
  assert.deepEqual(Array.from({ length: 5 }, () => backoff.next()), [0, 20, 0.999 * 80, 25, 75]);
  const real = new Backoff({ firstMs: 20, maxMs: 100, jitter: "full" });
  for (let n = 0; n < 100; n++) {
    const ms = real.next();
    assert.ok(ms >= 0 && ms < Math.min(100, 20 * 2 ** n), `pause ${n}: ${ms}`);
  }
});

Deno.test("a backoff pause is cut short by its deadline", async () => {
  const backoff = new Backoff({ firstMs: 60_000, maxMs: 60_000 });
  const started = performance.now();
  await backoff.pause(deadline(0));
  assert.ok(performance.now() - started < 10_000, "waited the whole pause past the deadline");
});

Deno.test("a backoff refuses pauses that are not positive, or a cap below the first", () => {
  assert.throws(() => new Backoff({ firstMs: 0, maxMs: 10 }), RangeError);
  assert.throws(() => new Backoff({ firstMs: NaN, maxMs: 10 }), RangeError);
  assert.throws(
    () => new Backoff({ firstMs: 10, maxMs: 5 }),
    /want 0 < firstMs <= maxMs, got firstMs 10, maxMs 5/,
  );
});

Deno.test("an Lru keeps and forgets exactly what a plain list in use order would, most recent key touched again or not", () => {
  const seed = 20261204;
  console.log(`seed ${seed}`);
  const rng = new Rng(seed);
  for (const max of [1, 2, 3, 8]) {
    const lru = new Lru<number, string>(max);
    /** Keys, least recent first. */
    let order: number[] = [];
    for (let step = 0; step < 5_000; step++) {
      const key = rng.int(max * 2);
      const op = rng.int(10);
      if (op < 5) {
        const expected = order.includes(key) ? `v${key}` : undefined;
        assert.equal(lru.get(key), expected, `step ${step}: get ${key}`);
        if (expected !== undefined) order = [...order.filter((k) => k !== key), key];
      } else if (op < 9) {
        const forgot = lru.set(key, `v${key}`);
        order = [...order.filter((k) => k !== key), key];
        const gone = order.length > max ? order.shift() : undefined;
        assert.deepEqual(forgot?.[0], gone, `step ${step}: set ${key}`);
      } else {
        assert.equal(lru.delete(key), order.includes(key), `step ${step}: delete ${key}`);
        order = order.filter((k) => k !== key);
      }
      assert.deepEqual([...lru.entries()].map(([k]) => k), order, `step ${step}`);
    }
  }
});
