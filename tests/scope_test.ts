/**
 * The free-variable finder the client uses to refuse closures (protocol/_scope.ts):
 * tricky cases by hand, then every function and class of dist's own modules (thousands
 * of lines of real code: classes, private fields, generators, destructuring, templates,
 * regular expressions) checked against a reference scope analyser (espree and
 * eslint-scope, the parser and scope manager ESLint runs on).
 *
 * @module
 */

import assert from "node:assert/strict";
import * as espree from "npm:espree@10.3.0";
import * as eslintScope from "npm:eslint-scope@8.3.0";
import { freeVariables } from "../protocol/_scope.ts";
import { standaloneSource } from "../protocol/functions.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

/** What the reference says: the names the source reads that no scope of its own declares. */
function reference(source: string): Set<string> {
  const ast = espree.parse(`(${source}\n)`, { ecmaVersion: "latest", sourceType: "script", range: true });
  const manager = eslintScope.analyze(ast, { ecmaVersion: 2022, sourceType: "script" });
  // deno-lint-ignore no-explicit-any
  return new Set(manager.globalScope!.through.map((r: any) => r.identifier.name as string));
}

const CASES: [string, string[]][] = [
  ["(s) => s + name", ["name"]],
  ["(x) => x + 1", []],
  [
    "function f(a, {b, c: [d = e]}, ...g) { var h = a + b + d; let {i} = j; return k(f, h, i, arguments) }",
    ["e", "j", "k"],
  ],
  [
    "(a) => { const o = { a, b, c: d, [e]: 1, m() { return this.x + n }, get p() { return q } }; return o }",
    ["b", "d", "e", "n", "q"],
  ],
  ["x => x.catch(e => e.finally).default + y?.z.if", ["y"]],
  ["() => `a${b}c${`d${e}`}`", ["b", "e"]],
  ["() => /re/g.test(s) / t", ["s", "t"]],
  ["function () { try { a() } catch ({message}) { return message + b } finally { c } }", ["a", "b", "c"]],
  [
    "function () { for (const [k, v] of m) { use(k, v) } for (let i = 0; i < n; i++) {} return k }",
    ["m", "use", "n", "k"],
  ],
  ["function () { outer: for (;;) { break outer } }", []],
  ["function () { switch (a) { case b: let c = d; break; default: return c } }", ["a", "b", "d"]],
  [
    "function () { class A extends B { static s = C; #p = 1; m(x) { return x + this.#p + D } } return new A() }",
    ["B", "C", "D"],
  ],
  ["async function g() { await h(); const f = async (x) => x; return f }", ["h"]],
  ["function () { const a = 1\n let b = a\n return b + c }", ["c"]],
  ["(x) => ({ x, y })", ["y"]],
  ["function* gen() { yield x }", ["x"]],
  ["function () { const f = function self() { return self }; return f }", []],
  ["function () { return new.target }", []],
  ["(a = b, [c] = [a]) => c", ["b"]],
  ["function () { let x; [x, y] = [1, 2]; ({ z } = obj); return x }", ["y", "z", "obj"]],
  ["(a) => a ? b => b + c : d", ["c", "d"]],
  ["function () { return x\n(y) }", ["x", "y"]],
  ["function () { const re = /[/]\\//; return re.source + `${'}'}` + '`' }", []],
  ["(o) => { const { a: { b }, ...rest } = o; return [b, rest, ...more] }", ["more"]],
  ["function () { return class { static { init(this) } [key] = 1; get [k2]() { return 1 } } }", [
    "init",
    "key",
    "k2",
  ]],
];

Deno.test("scope: the free variables of tricky sources, by hand and by the reference", () => {
  for (const [source, want] of CASES) {
    assert.deepEqual([...freeVariables(source)].sort(), [...want].sort(), source);
    assert.deepEqual([...reference(source)].sort(), [...want].sort(), `the reference disagrees: ${source}`);
  }
});

/** The sources of every function, class and method dist's own modules export. */
async function corpus(): Promise<string[]> {
  const out = new Set<string>();
  const seen = new Set<unknown>();
  const add = (fn: unknown) => {
    if (typeof fn !== "function" || seen.has(fn)) return;
    seen.add(fn);
    const printed = Function.prototype.toString.call(fn);
    if (/\[native code\]/.test(printed)) return;
    // A method prints without `function`: the client puts it back, and so does this.
    const source = standaloneSource(printed);
    if (source === null) return;
    out.add(source);
    if (/^class\b/.test(source) || /^function [A-Z]/.test(source)) {
      for (const owner of [fn, (fn as { prototype?: object }).prototype]) {
        if (owner === undefined) continue;
        for (const [name, d] of Object.entries(Object.getOwnPropertyDescriptors(owner))) {
          if (name === "constructor" || name === "prototype") continue;
          for (const f of [d.value, d.get, d.set]) add(f);
        }
      }
    }
  };
  for (const dir of ["client", "protocol", "scheduler", "worker", "util", "testing"]) {
    for await (const entry of Deno.readDir(new URL(`../${dir}/`, import.meta.url))) {
      // executor.ts runs only as a Web Worker (it takes the worker's `self.postMessage`).
      if (!entry.name.endsWith(".ts") || entry.name === "executor.ts") continue;
      const mod = await import(new URL(`../${dir}/${entry.name}`, import.meta.url).href);
      for (const value of Object.values(mod)) add(value);
    }
  }
  // Other people's code, in other styles: a JavaScript parser written with prototypes, and
  // the reference's own modules.
  for (const mod of [await import("npm:acorn@8.14.0"), espree, eslintScope]) {
    for (const value of Object.values(mod)) add(value);
  }
  return [...out];
}

Deno.test("scope: every function and class of dist's own modules agrees with the reference", async () => {
  const sources = await corpus();
  let compared = 0;
  let lines = 0;
  const disagreements: string[] = [];
  for (const source of sources) {
    let want: Set<string>;
    try {
      want = reference(source);
    } catch {
      continue; // beyond the reference (a method using private fields outside its class)
    }
    compared++;
    lines += source.split("\n").length;
    let got: string[];
    try {
      got = [...freeVariables(source)].sort();
    } catch (error) {
      got = [`(ScopeError: ${(error as Error).message})`];
    }
    const expected = [...want].sort();
    if (JSON.stringify(got) !== JSON.stringify(expected)) {
      disagreements.push(
        `${source.slice(0, 120)}...\n  ours ${got.join(" ")}\n  reference ${expected.join(" ")}`,
      );
    }
  }
  console.log(`compared ${compared} sources (${lines} lines) with the reference`);
  assert.ok(compared > 400 && lines > 10_000, `only ${compared} sources (${lines} lines) compared`);
  assert.deepEqual(disagreements, []);
});
