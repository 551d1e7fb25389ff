/**
 * `deno task install` into a temporary root, run as a user whose Deno is not on the PATH
 * (as with `npx deno`): the installed `dist` prints its version, runs `dist local`, and
 * runs a scheduler and a worker that a client computes on.
 *
 * @module
 */

import assert from "node:assert/strict";
import config from "../deno.json" with { type: "json" };
import { Client } from "../mod.ts";
import { NODE_V8_FLAGS, type NodeProcess, spawnNode } from "../client/spawn.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

const INSTALLER = new URL("../deploy/install.ts", import.meta.url);
/** A PATH with no deno on it. */
const NO_DENO_PATH = "/nonexistent";

/** The installed dist running ARGS (with no deno on the PATH), once it says where it listens. */
function start(dist: string, ...args: string[]): Promise<NodeProcess> {
  return spawnNode(args, { command: dist, env: { PATH: NO_DENO_PATH } });
}

async function computeOn(address: string): Promise<void> {
  await using client = await Client.connect(address);
  const xs = client.map((x: number) => x * x, [1, 2, 3, 4]);
  assert.deepEqual(await client.gather(xs), [1, 4, 9, 16]);
}

Deno.test("deno task install: a dist on the PATH that runs without deno on the PATH", async () => {
  const root = await Deno.makeTempDir({ prefix: "dist-install-" });
  try {
    const install = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-read",
        "--allow-write",
        "--allow-env",
        "--allow-run",
        INSTALLER.href,
      ],
      // Where deno install puts it: a temporary DENO_INSTALL_ROOT (--root DIR does the same).
      env: { PATH: NO_DENO_PATH, DENO_INSTALL_ROOT: root },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const said = new TextDecoder().decode(install.stdout);
    assert.equal(install.code, 0, new TextDecoder().decode(install.stderr));
    assert.match(said, /the PATH has no deno/);
    assert.match(said, /is not on your PATH; add it/);
    const dist = `${root}/bin/dist`;
    const shim = await Deno.readTextFile(dist);
    assert.ok(shim.includes(`exec '${Deno.realPathSync(Deno.execPath())}' run`), shim);
    for (const flag of ["--allow-net", "--allow-run", "--unstable-worker-options", NODE_V8_FLAGS]) {
      assert.ok(shim.includes(flag), `the installed command runs deno with ${flag}: ${shim}`);
    }
    assert.ok(config.tasks.compile.includes(NODE_V8_FLAGS), "a compiled dist gets the nodes' V8 setting too");

    const version = await new Deno.Command(dist, { args: ["--version"], env: { PATH: NO_DENO_PATH } })
      .output();
    assert.equal(new TextDecoder().decode(version.stdout).trim(), `dist ${config.version}`);

    const local = await start(dist, "local", "--workers", "1", "--nthreads", "1", "--port", "0");
    try {
      await computeOn(local.address);
    } finally {
      assert.equal((await local.stop()).success, true);
    }

    const scheduler = await start(dist, "scheduler", "--port", "0", "--no-dashboard");
    try {
      const worker = await start(dist, "worker", scheduler.address, "--nthreads", "1");
      try {
        await computeOn(scheduler.address);
      } finally {
        assert.equal((await worker.stop()).success, true);
      }
    } finally {
      assert.equal((await scheduler.stop()).success, true);
    }
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});
