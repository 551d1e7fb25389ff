/**
 * `mod.ts` as a user imports it from a URL: no deno.json, so no import map.
 *
 * @module
 */

import assert from "node:assert/strict";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

const ROOT = new URL("../", import.meta.url);
const MOD = new URL("mod.ts", ROOT);
/** How long the script may run before it is killed. */
const SCRIPT_TIMEOUT_MS = 20_000;

Deno.test("mod.ts and node.ts work imported by URL with no deno.json in effect", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dist_mod_url_" });
  try {
    const script = `
import { rpc } from ${JSON.stringify(MOD.href)};
import { startScheduler, startWorker } from ${JSON.stringify(new URL("node.ts", MOD).href)};

await using scheduler = await startScheduler({ port: 0 });
await using worker = await startWorker({ scheduler: scheduler.address, port: 0, name: "w" });
await using w = rpc(worker.address);
await using s = rpc(scheduler.address);
const put = await w.update_data({ data: { x: new Float64Array([1.5, 2.5]), greeting: "hi" } });
const got = await w.get_data({ keys: ["x", "greeting", "missing"] });
const computed = await w.compute({ key: "y", function: (x) => x.map((v) => v * 2), keys: ["x"] });
const { y } = await w.get_data({ keys: ["y"] });
const whoHas = await s.who_has({ keys: ["x", "y"] });
console.log(JSON.stringify({
  put,
  keys: Object.keys(got).sort(),
  x: [got.x.constructor.name, Array.from(got.x)],
  greeting: got.greeting,
  computed,
  y: [y.constructor.name, Array.from(y)],
  whoHasIsWorker: whoHas.x[0] === worker.address && whoHas.y[0] === worker.address,
  whoHasLengths: [whoHas.x.length, whoHas.y.length],
}));
`;
    await Deno.writeTextFile(`${dir}/script.ts`, script);
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--no-config",
        "--unstable-worker-options",
        "--allow-net",
        "--allow-read",
        "--allow-env",
        "script.ts",
      ],
      cwd: dir,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(SCRIPT_TIMEOUT_MS),
    }).output();
    const stdout = new TextDecoder().decode(out.stdout);
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, `script failed:\n${stderr}`);
    const lines = stdout.trimEnd().split("\n");
    assert.equal(lines.length, 1, `stdout: ${stdout}`);
    const result = JSON.parse(lines[0]);
    // A string's size is what it takes on the wire: some small positive number.
    const greetingBytes = result.put?.nbytes?.greeting;
    assert.ok(typeof greetingBytes === "number" && greetingBytes > 0, `greeting nbytes: ${greetingBytes}`);
    assert.deepEqual(result, {
      put: { status: "OK", nbytes: { x: 16, greeting: greetingBytes } },
      keys: ["greeting", "x"],
      x: ["Float64Array", [1.5, 2.5]],
      greeting: "hi",
      computed: { status: "OK", key: "y", nbytes: 16 },
      y: ["Float64Array", [3, 5]],
      whoHasIsWorker: true,
      whoHasLengths: [1, 1],
    });
    // Logs went to stderr, where they belong.
    assert.match(stderr, /scheduler: Scheduler at tcp:\/\/127\.0\.0\.1:\d+/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Whether a module specifier resolves with no import map. */
function isSelfContained(specifier: string): boolean {
  if (specifier.startsWith("./") || specifier.startsWith("../")) return true;
  if (/^node:[a-z_]+(\/[a-z_]+)*$/.test(specifier)) return true;
  // npm:name@1.2.3, npm:@scope/name@1.2.3-rc.1, optionally with a subpath.
  return /^npm:(@[a-z0-9][\w.-]*\/)?[a-z0-9][\w.-]*@\d+\.\d+\.\d+(-[\w.]+)?(\+[\w.]+)?(\/[\w./-]+)?$/.test(
    specifier,
  );
}

// Statements at the start of a line only, so `import` in JSDoc examples (` * import`) is skipped.
const STATIC = /^\s*(?:import|export)\s+(?:type\s+)?(?:[\w*\s{},]*?\s+from\s+)?["']([^"']+)["']/gm;
const DYNAMIC = /\bimport\(\s*["']([^"']+)["']/g;

/** The import specifiers written in `source`. */
function specifiersIn(source: string): string[] {
  const found: string[] = [];
  for (const m of source.matchAll(STATIC)) found.push(m[1]);
  for (const m of source.matchAll(DYNAMIC)) found.push(m[1]);
  return found;
}

async function sourceFiles(): Promise<string[]> {
  const files: string[] = [];
  for (const dir of ["protocol", "scheduler", "worker"]) {
    for await (const entry of Deno.readDir(new URL(`${dir}/`, ROOT))) {
      if (entry.isFile && entry.name.endsWith(".ts")) files.push(`${dir}/${entry.name}`);
    }
  }
  for await (const entry of Deno.readDir(ROOT)) {
    if (entry.isFile && entry.name.endsWith(".ts")) files.push(entry.name);
  }
  return files.sort();
}

Deno.test("the specifier check tells self-contained specifiers from ones needing an import map", () => {
  for (
    const ok of ["./a.ts", "../protocol/codec.ts", "node:util", "node:fs/promises", "npm:msgpackr@1.11.2"]
  ) {
    assert.ok(isSelfContained(ok), ok);
  }
  assert.ok(isSelfContained("npm:@msgpack/msgpack@3.0.0-beta2/dist"));
  for (const bad of ["@std/assert", "msgpackr", "npm:msgpackr", "npm:msgpackr@1", "npm:msgpackr@^1.11.2"]) {
    assert.ok(!isSelfContained(bad), bad);
  }
  assert.ok(!isSelfContained("jsr:@std/assert"));
  assert.ok(!isSelfContained("https://deno.land/std/assert/mod.ts"));
  assert.ok(!isSelfContained("/abs/path.ts"));
  assert.deepEqual(
    specifiersIn([
      `import { a } from "./a.ts";`,
      `import type { B } from '../b.ts';`,
      `import * as v from "./_validate.ts";`,
      `import x, { y } from "npm:x@1.0.0";`,
      `import {\n  c,\n  d,\n} from "@std/bare";`,
      `export { e } from "./e.ts";`,
      `export type { F } from "./f.ts";`,
      `export * from "./g.ts";`,
      `import "./side_effect.ts";`,
      `import config from "./deno.json" with { type: "json" };`,
      ` * import { rpc } from "./in_a_comment.ts";`,
      `const m = await import("node:fs");`,
    ].join("\n")),
    [
      "./a.ts",
      "../b.ts",
      "./_validate.ts",
      "npm:x@1.0.0",
      "@std/bare",
      "./e.ts",
      "./f.ts",
      "./g.ts",
      "./side_effect.ts",
      "./deno.json",
      "node:fs",
    ],
  );
});

Deno.test("every import in the library and CLI needs no import map", async () => {
  const files = await sourceFiles();
  for (const must of ["mod.ts", "main.ts", "protocol/rpc.ts", "scheduler/scheduler.ts", "worker/worker.ts"]) {
    assert.ok(files.includes(must), `${must} should be among ${files.join(", ")}`);
  }
  const bad: string[] = [];
  let total = 0;
  for (const file of files) {
    const source = await Deno.readTextFile(new URL(file, ROOT));
    const specifiers = specifiersIn(source);
    total += specifiers.length;
    for (const s of specifiers) if (!isSelfContained(s)) bad.push(`${file}: ${s}`);
  }
  assert.ok(total >= 20, `only ${total} import specifiers found: the scan is broken`);
  assert.deepEqual(bad, [], `specifiers that need an import map:\n${bad.join("\n")}`);
});

Deno.test("the source scan finds every import Deno's module graph finds", async () => {
  // Guards the regexes above against a form of import they do not know.
  for (const entry of ["mod.ts", "main.ts"]) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["info", "--json", new URL(entry, ROOT).href],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    const graph = JSON.parse(new TextDecoder().decode(out.stdout)) as {
      modules: { specifier: string; dependencies?: { specifier: string }[] }[];
    };
    let local = 0;
    for (const module of graph.modules) {
      if (!module.specifier.startsWith(ROOT.href) || !module.specifier.endsWith(".ts")) continue;
      local++;
      const fromGraph = new Set((module.dependencies ?? []).map((d) => d.specifier));
      const fromScan = new Set(specifiersIn(await Deno.readTextFile(new URL(module.specifier))));
      assert.deepEqual(fromScan, fromGraph, module.specifier);
    }
    assert.ok(local >= 5, `${entry}: only ${local} local modules in the graph`);
  }
});
