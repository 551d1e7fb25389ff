/**
 * The records' sets: the shared empty one, a set of one, and a Set once a second item
 * comes, all through `withItem`; and the bounded story of moves.
 *
 * @module
 */

import assert from "node:assert/strict";
import { NONE, Story, withItem } from "../util/story.ts";

Deno.test("withItem: the shared empty set becomes a set of one, then a Set of two, and behaves as a Set throughout", () => {
  assert.throws(() => NONE.add(1 as never), /shared empty set was added to/);
  let s: Set<string> = NONE;
  s = withItem(s, "a");
  assert.notEqual(s, NONE);
  assert.equal(NONE.size, 0, "the shared set stays empty");
  assert.equal(s.size, 1);
  assert.ok(s.has("a") && !s.has("b"));
  assert.deepEqual([...s], ["a"]);
  assert.throws(() => s.add("b"), /set of one was added to/);
  // The same item again: the same set; a second item: a Set of both.
  assert.equal(withItem(s, "a"), s);
  const one = s;
  s = withItem(s, "b");
  assert.ok(s instanceof Set && s !== one);
  assert.deepEqual([...s].sort(), ["a", "b"]);
  // Emptied, a set of one takes an item again in place.
  assert.equal(one.delete("b"), false);
  assert.equal(one.delete("a"), true);
  assert.equal(one.size, 0);
  assert.deepEqual([...one], []);
  assert.equal(withItem(one, "c"), one);
  assert.deepEqual([...one.values()], ["c"]);
  const seen: string[] = [];
  one.forEach((v) => seen.push(v));
  assert.deepEqual(seen, ["c"]);
  assert.deepEqual([...one.entries()], [["c", "c"]]);
  assert.deepEqual([...one.union(new Set(["d"]))].sort(), ["c", "d"]);
  assert.ok(one.isSubsetOf(new Set(["c", "d"])));
  one.clear();
  assert.equal(one.size, 0);
});

Deno.test("story: keeps the last moves of every key, at most its capacity in all", () => {
  const story = new Story<string>(3);
  story.record(1, "a", "released", "waiting", "x");
  story.record(2, "b", "released", "waiting", "y");
  story.record(3, "a", "waiting", "memory", "z");
  story.record(4, "b", "waiting", "memory", "w");
  assert.deepEqual(story.of("a").map((m) => m.to), ["memory"], "the oldest move went first");
  assert.deepEqual(story.of("b").map((m) => m.to), ["waiting", "memory"]);
});
