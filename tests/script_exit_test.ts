/**
 * A script that forgot `close()` ends once its own work is done, as a Python script
 * using Dask does: the client's connections and an embedded scheduler do not hold the
 * process open, and the worker processes Client.local started end with it.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Processes } from "./_helpers.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

const MOD = new URL("../mod.ts", import.meta.url).href;
/** A script that is done must be gone within this (it usually takes well under a second). */
const EXIT_MS_MAX = 15_000;

/**
 * Every process's command line, arguments apart by NUL (Deno reads /proc only with
 * --allow-all: `cat` reads it; processes that end meanwhile are skipped).
 */
async function commandLines(): Promise<string> {
  const out = await new Deno.Command("sh", {
    args: ["-c", "cat /proc/[0-9]*/cmdline 2>/dev/null; exit 0"],
    stdout: "piped",
    stderr: "null",
  }).output();
  assert.ok(out.success);
  return new TextDecoder().decode(out.stdout);
}

/** Runs `source` as a script with `flags`; its exit code and output, or a failure past EXIT_MS_MAX. */
async function runScript(source: string, flags: string[], args: string[] = []) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", ...flags, "-", ...args],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(new TextEncoder().encode(source));
  await writer.close();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timedOut = new Promise<"timeout">((resolve) =>
    timer = setTimeout(() => resolve("timeout"), EXIT_MS_MAX)
  );
  const started = performance.now();
  const output = child.output();
  const first = await Promise.race([output, timedOut]);
  clearTimeout(timer);
  if (first === "timeout") {
    child.kill("SIGKILL");
    await output;
    throw new Error(
      `The script was still running ${EXIT_MS_MAX} ms after it started: something holds it open`,
    );
  }
  const text = new TextDecoder();
  return {
    code: first.code,
    stdout: text.decode(first.stdout),
    stderr: text.decode(first.stderr),
    ms: performance.now() - started,
  };
}

Deno.test("a script that forgot close() ends when its work is done: Client.connect and rpc", async () => {
  await using nodes = new Processes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0", "--no-dashboard");
  await nodes.spawn("worker", scheduler.address, "--nthreads", "1");
  const source = `
    import { Client, rpc } from ${JSON.stringify(MOD)};
    const client = await Client.connect(Deno.args[0]);
    const x = client.submit((n: number) => n + 1, 1);
    const ys = client.map((n: number) => n * 2, [1, 2, 3]);
    console.log(JSON.stringify([await x.result(), await client.gather(ys), await x.why()]));
    const raw = rpc(Deno.args[0]);
    console.log((await raw.identity()).type);
  `;
  const run = await runScript(source, ["--allow-net"], [scheduler.address]);
  assert.equal(run.code, 0, run.stderr);
  const [result, gathered, why] = JSON.parse(run.stdout.split("\n")[0]);
  assert.equal(result, 2);
  assert.deepEqual(gathered, [2, 4, 6]);
  assert.match(why, /^done: in memory on /);
  assert.equal(run.stdout.split("\n")[1], "scheduler");
  console.log(`the script ended ${run.ms.toFixed(0)} ms after it started`);
});

Deno.test("a script that forgot close() ends when its work is done: Client.local, and its workers with it", async () => {
  const source = `
    import { Client } from ${JSON.stringify(MOD)};
    const client = await Client.local({ workers: 2, threads: 1, dashboardPort: null });
    console.log(client.scheduler);
    console.log(await client.submit((n: number) => n + 1, 41).result());
  `;
  const run = await runScript(source, ["--allow-net", "--allow-run"]);
  assert.equal(run.code, 0, run.stderr);
  const [address, answer] = run.stdout.trim().split("\n");
  assert.equal(answer, "42");
  assert.match(address, /^tcp:\/\/127\.0\.0\.1:\d+$/);
  // Its nannies and workers were started with the scheduler's address: none is left.
  const started = performance.now();
  for (;;) {
    const left = (await commandLines()).split("\0").filter((arg) => arg === address);
    if (left.length === 0) break;
    if (performance.now() - started > EXIT_MS_MAX) {
      throw new Error(`${left.length} processes started for ${address} are still running`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  console.log(
    `the script ended ${run.ms.toFixed(0)} ms after it started; its workers ${
      (performance.now() - started).toFixed(0)
    } ms after that`,
  );
});

Deno.test("a script that closes its client and cluster still ends cleanly, with no pending-promise error", async () => {
  const source = `
    import { Client } from ${JSON.stringify(MOD)};
    await using client = await Client.local({ workers: 1, threads: 1, dashboardPort: null });
    console.log(await client.submit((n: number) => n * 2, 21).result());
  `;
  const run = await runScript(source, ["--allow-net", "--allow-run"]);
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.stdout.trim(), "42");
  assert.doesNotMatch(run.stderr, /error/i);
});
