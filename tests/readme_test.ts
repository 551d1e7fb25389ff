/**
 * The README runs: every TypeScript snippet in it is extracted, type-checked and run as a
 * script of its own, with exactly the flags the README's "What your script needs" gives
 * its entry point, against the cluster it describes (its own `Client.local`, or a
 * `dist local` for the raw rpc example). The shell snippets are covered elsewhere: the
 * quick start by CI (`deno task demo`, `deno task test`), Install by install_test.ts,
 * the TLS commands by the TLS tests.
 *
 * @module
 */

import assert from "node:assert/strict";
import { spawnNode } from "../client/spawn.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

const README = new URL("../README.md", import.meta.url);
const MOD = new URL("../mod.ts", import.meta.url).href;
/** A snippet that has not ended in this long is stuck. */
const SNIPPET_MS_MAX = 60_000;

/** The ```ts blocks of the README, with the line each starts on. */
async function snippets(): Promise<{ line: number; code: string }[]> {
  const lines = (await Deno.readTextFile(README)).split("\n");
  const out: { line: number; code: string }[] = [];
  for (let i = 0; i < lines.length; i++) {
    if (lines[i].trim() !== "```ts") continue;
    const start = i + 1;
    let end = start;
    while (end < lines.length && lines[end].trim() !== "```") end++;
    out.push({ line: start + 1, code: lines.slice(start, end).join("\n") });
    i = end;
  }
  return out;
}

/** The flags the README's table gives a script of this kind. */
function flagsFor(code: string): string[] {
  if (/processes:\s*false/.test(code)) return ["--allow-net", "--allow-read", "--unstable-worker-options"];
  if (code.includes("Client.local") || code.includes("LocalCluster.start")) {
    return ["--allow-net", "--allow-run"];
  }
  return ["--allow-net"];
}

/**
 * Each `await EXPR; // VALUE` line whose VALUE (up to a colon) is JSON becomes a check that
 * EXPR gives VALUE: what the README says a call returns, it returns.
 */
function withChecks(code: string): { code: string; checks: number } {
  let checks = 0;
  const lines = code.split("\n").map((line) => {
    const m = /^(\s*)await (.+); \/\/ ([^:]+?)(?::.*)?$/.exec(line);
    if (m === null) return line;
    let value: unknown;
    try {
      value = JSON.parse(m[3]);
    } catch {
      return line;
    }
    checks++;
    const want = JSON.stringify(JSON.stringify(value));
    return `${m[1]}{ const got = JSON.stringify(await ${m[2]}); if (got !== ${want}) ` +
      `throw new Error(${JSON.stringify(`${m[2]} gave `)} + got + ${
        JSON.stringify(`, the README says ${m[3]}`)
      }); }`;
  });
  return { code: lines.join("\n"), checks };
}

async function run(code: string, flags: string[], args: string[]) {
  const dir = await Deno.makeTempDir({ prefix: "dist-readme-" });
  try {
    const file = `${dir}/snippet.ts`;
    await Deno.writeTextFile(file, code.replaceAll('from "./mod.ts"', `from ${JSON.stringify(MOD)}`));
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--check", "--no-prompt", ...flags, file, ...args],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), SNIPPET_MS_MAX));
    const output = child.output();
    const done = await Promise.race([output, timeout]);
    clearTimeout(timer);
    if (done === null) {
      child.kill("SIGKILL");
      await output;
      throw new Error(`The snippet ran past ${SNIPPET_MS_MAX} ms`);
    }
    const text = new TextDecoder();
    return { code: done.code, stdout: text.decode(done.stdout), stderr: text.decode(done.stderr) };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("readme: every TypeScript snippet type-checks and runs with the flags the README gives", async (t) => {
  const all = await snippets();
  assert.ok(all.length >= 3, `found ${all.length} snippets`);
  for (const { line, code } of all) {
    await t.step(`README.md:${line}`, async () => {
      const flags = flagsFor(code);
      const needsCluster = code.includes("Deno.args[0]");
      const cluster = needsCluster
        ? await spawnNode(["local", "--workers", "2", "--port", "0", "--no-dashboard"])
        : null;
      try {
        const checked = withChecks(code);
        const result = await run(checked.code, flags, cluster ? [cluster.address] : []);
        if (checked.checks > 0) console.log(`README.md:${line}: ${checked.checks} results checked`);
        assert.equal(result.code, 0, `README.md:${line} with ${flags.join(" ")}:\n${result.stderr}`);
        assert.doesNotMatch(result.stderr, /error/i, result.stderr);
        // What a snippet's comments say it prints, it prints.
        for (const [, shown] of code.matchAll(/console\.log\([^;]*\); \/\/ (.+)$/gm)) {
          if (shown.startsWith("http:")) continue; // an address: its port is any free one
          const expected = shown.replace(/^\{ /, "").replace(/ \}$/, "");
          assert.ok(
            result.stdout.includes(expected),
            `README.md:${line} says it prints ${shown}; it printed:\n${result.stdout}`,
          );
        }
      } finally {
        await cluster?.stop();
      }
    });
  }
});
