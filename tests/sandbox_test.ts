/**
 * Tasks against their own worker process: a task runs on a thread of the worker's
 * process, so signalling "itself", reaching Deno's internals or reading the command
 * line would reach the worker. Real scheduler and worker processes, as a user runs them.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, rpc, type WorkerOps } from "../mod.ts";
import { ExecutorPool } from "../worker/executors.ts";
import { type NodeProcess, spawnNode } from "../client/spawn.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

const TOKEN = "sandbox-test-token-0123456789abcdef";
/** Longest a task here may take: one that took its worker down would otherwise hang the test. */
const TASK_MS_MAX = 20_000;

/** `promise`, or a rejection after TASK_MS_MAX. */
async function bounded<T>(promise: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`No answer within ${TASK_MS_MAX} ms`)), TASK_MS_MAX);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** A scheduler and one worker as processes, with the worker's extra flags. */
async function cluster(workerArgs: string[], env: Record<string, string> = {}, schedulerArgs: string[] = []) {
  const nodes: NodeProcess[] = [];
  const close = async () => {
    for (const n of nodes.reverse()) {
      try {
        n.child.kill("SIGCONT");
      } catch { /* exited */ }
      await n.stop();
    }
  };
  try {
    const scheduler = await spawnNode(["scheduler", "--port", "0", "--log-level", "info", ...schedulerArgs], {
      env,
    });
    nodes.push(scheduler);
    const worker = await spawnNode(
      ["worker", scheduler.address, "--nthreads", "1", "--log-level", "info", ...workerArgs],
      { env },
    );
    nodes.push(worker);
    return { scheduler, worker, close, [Symbol.asyncDispose]: close };
  } catch (error) {
    await close();
    throw error;
  }
}

/** The process's state letter in /proc (S sleeping, R running, T stopped), or "gone". */
async function processState(pid: number): Promise<string> {
  // Deno reads /proc/PID of another process only with --allow-all: ask `cat`.
  const out = await new Deno.Command("cat", { args: [`/proc/${pid}/stat`], stderr: "null" }).output();
  if (!out.success) return "gone";
  const stat = new TextDecoder().decode(out.stdout);
  return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
}

Deno.test("sandbox: a task cannot kill, stop or signal its own worker process, whatever it is granted", async () => {
  for (const permissions of ["none", "inherit"]) {
    await using c = await cluster(["--task-permissions", permissions]);
    await using client = await Client.connect(c.scheduler.address);
    const attempts: [string, (...args: never[]) => unknown][] = [
      ["SIGKILL to its own pid", () => Deno.kill(Deno.pid, "SIGKILL")],
      ["SIGSTOP to its own pid", () => Deno.kill(Deno.pid, "SIGSTOP")],
      ["SIGTERM to its own process group", () => Deno.kill(0, "SIGTERM")],
      ["SIGKILL to -pid", () => Deno.kill(-Deno.pid, "SIGKILL")],
      ["Deno.kill put back by hand", () => {
        delete (Deno as unknown as Record<string, unknown>).kill;
        Deno.kill(Deno.pid, "SIGKILL");
      }],
      ["the runtime's ops", () => {
        const internal = (Deno as unknown as Record<symbol, { core?: { ops?: Record<string, unknown> } }>)[
          (Deno as unknown as { internal: symbol }).internal
        ];
        const ops = internal?.core?.ops ?? {};
        for (const name of Object.keys(ops)) {
          if (/kill/.test(name)) (ops[name] as (pid: number, signal: string) => void)(Deno.pid, "SIGKILL");
        }
        return internal === undefined
          ? "no internals"
          : `internals reachable: ${Object.keys(ops).length} ops`;
      }],
    ];
    for (const [what, attempt] of attempts) {
      const outcome = await bounded(client.submit(attempt).result()).then(
        (value) => `returned ${JSON.stringify(value)}`,
        (error: Error) => `${error.name}: ${error.message}`,
      );
      assert.match(
        await processState(c.worker.child.pid),
        /^[SR]$/,
        `${permissions}, ${what}: ${outcome}\n${c.worker.log.join("\n")}`,
      );
      if (what === "the runtime's ops") assert.equal(outcome, 'returned "no internals"', what);
      else {
        assert.match(
          outcome,
          /^NotCapable: Cannot send SIG[A-Z]+ to .*may not signal it/,
          `${permissions}, ${what}`,
        );
      }
      await using w = rpc<WorkerOps>(c.worker.address);
      assert.equal(await w.ping(), "pong", `${permissions}, after ${what}`);
    }
    // The worker goes on computing, and nothing said it died.
    assert.equal(await client.submit((a: number, b: number) => a + b, 2, 3).result(), 5);
    assert.ok(!c.worker.log.some((line) => /ERROR|died|lost/i.test(line)), c.worker.log.join("\n"));
  }
});

Deno.test("sandbox: a task sees neither its worker's command line nor its token in the environment", async () => {
  await using c = await cluster(["--task-permissions", "env", "--auth-token", TOKEN], {
    DIST_AUTH_TOKEN: TOKEN,
  });
  await using client = await Client.connect(c.scheduler.address, { authToken: TOKEN });
  assert.deepEqual(await client.submit(() => [...Deno.args]).result(), []);
  assert.equal(await client.submit(() => Deno.env.get("DIST_AUTH_TOKEN") ?? null).result(), null);
  // Not replaceable from a task either.
  const replaced = await client.submit(() => {
    try {
      Object.defineProperty(Deno, "args", { value: ["x"] });
    } catch (error) {
      return (error as Error).name;
    }
    return "replaced";
  }).result();
  assert.equal(replaced, "TypeError");
  // A task may not move the working directory it shares with its worker.
  await assert.rejects(
    client.submit(() => Deno.chdir("/")).result(),
    /NotCapable: Cannot change the working directory to \/: tasks share it with their worker/,
  );
});

Deno.test("sandbox: with --isolation process, a task that exhausts its heap fails as KilledWorker; the worker and its data stay", async () => {
  await using c = await cluster(
    ["--isolation", "process", "--task-heap-mib", "64", "--task-permissions", "none"],
    {},
    ["--allowed-failures", "1"],
  );
  await using client = await Client.connect(c.scheduler.address);
  const [kept] = await client.scatter([new Float64Array(100_000).fill(2.5)]);
  const hog = client.submit(() => {
    const hoard: number[][] = [];
    for (;;) hoard.push(new Array(100_000).fill(1.5));
  });
  await assert.rejects(bounded(hog.result()), (error: Error) => {
    assert.equal(error.name, "KilledWorker", `${error.name}: ${error.message}`);
    assert.match(error.message, /ran out of memory \(it reached its JS heap limit\)/);
    return true;
  });
  assert.match(await processState(c.worker.child.pid), /^[SR]$/);
  // The worker still holds what it had and still computes, in a fresh executor process.
  const sum = (x: Float64Array) => x.reduce((a, b) => a + b, 0);
  assert.equal(await bounded(client.submit(sum, kept).result()), 250_000);
  // Signals and exits end only the executor's process too.
  await assert.rejects(
    bounded(client.submit(() => Deno.exit(3)).result()),
    /killed its executor: it ended its executor \(Deno\.exit or close, code 3\)/,
  );
  assert.equal(await bounded(client.submit(sum, kept).result()), 250_000);
  assert.ok(!c.worker.log.some((line) => /ERROR/.test(line)), c.worker.log.join("\n"));
});

Deno.test("sandbox: process executors keep the sandbox and carry every value kind both ways", async () => {
  const pool = new ExecutorPool(1, "none", { isolation: "process" });
  try {
    const value = {
      f64: new Float64Array([1.5, 2.5]),
      big: new Uint8Array(200_000).fill(7),
      map: new Map([["a", 1n << 80n]]),
      set: new Set(["x"]),
      date: new Date(0),
      nested: [null, true, "s"],
    };
    const { result } = await pool.run({ source: "(v) => v" }, [value], "echo");
    assert.deepEqual(result, value);
    await assert.rejects(
      pool.run({ source: "async () => await Deno.readTextFile('/etc/hostname')" }, [], "read"),
      /Requires read access/,
    );
    await assert.rejects(
      pool.run({ source: "() => Deno.kill(Deno.pid, 'SIGKILL')" }, [], "kill"),
      /may not signal it/,
    );
    assert.equal((await pool.run({ source: "() => 1" }, [], "after")).result, 1);
  } finally {
    await pool.close();
  }
  assert.throws(() => new ExecutorPool(1, "none", { heapMib: 64 }), /needs isolation: process/);
});

Deno.test("sandbox: a task that posts an executor's own messages fails nothing else", async () => {
  for (const isolation of ["thread", "process"] as const) {
    const pool = new ExecutorPool(1, "none", { isolation });
    try {
      const forged = await pool.run(
        { source: "() => { postMessage({ kind: 'error', message: 'forged' }); return 'posted'; }" },
        [],
        "forger",
      );
      assert.equal(forged.result, "posted", isolation);
      assert.equal((await pool.run({ source: "(x) => x + 1" }, [1], "next")).result, 2, isolation);
    } finally {
      await pool.close();
    }
  }
});

Deno.test("sandbox: a task the sandbox refuses is told the --task-permissions value that allows it, never an --allow-* flag", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dist-sandbox-" });
  try {
    const lib = `${dir}/lib.ts`;
    await Deno.writeTextFile(lib, "export function add(a: number, b: number): number { return a + b; }\n");
    const file = `${dir}/data.txt`;
    await Deno.writeTextFile(file, "42");
    {
      // dist local as a user starts it: the default sandbox refuses the file and the module.
      const local = await spawnNode(["local", "--workers", "1", "--port", "0", "--no-dashboard"]);
      try {
        await using client = await Client.connect(local.address);
        const read = client.submit((path: string) => Deno.readTextFileSync(path), file);
        const refused = await bounded(read.result()).then(() => null, (error: Error) => error);
        assert.ok(refused, "the default sandbox let a task read a file");
        assert.match(
          refused.message,
          new RegExp(`Requires read access to "${file}": tasks run with the worker's`),
        );
        assert.ok(refused.message.includes(`--task-permissions read=${file}`), refused.message);
        assert.ok(!refused.message.includes("--allow-read"), refused.message);
        const imported = client.submit({ module: new URL(`file://${lib}`).href, name: "add" }, 1, 2);
        const denied = await bounded(imported.result()).then(() => null, (error: Error) => error);
        assert.ok(denied?.message.includes(`--task-permissions read=${lib}`), denied?.message);
        // A relative specifier is refused by the sender, with the way to an absolute one.
        assert.throws(
          () => client.submit({ module: "./lib.ts", name: "add" }, 1, 2),
          /Cannot send \{ module: "\.\/lib\.ts", name: "add" \}: .*import\.meta\.resolve\("\.\/lib\.ts"\)/,
        );
      } finally {
        await local.stop();
      }
    }
    // dist local --task-permissions grants what the advice said.
    const local = await spawnNode([
      "local",
      "--workers",
      "1",
      "--port",
      "0",
      "--no-dashboard",
      "--task-permissions",
      `read=${dir}`,
    ]);
    try {
      await using client = await Client.connect(local.address);
      const imported = client.submit({ module: new URL(`file://${lib}`).href, name: "add" }, 1, 2);
      assert.equal(await bounded(imported.result()), 3);
      const read = client.submit((path: string) => Deno.readTextFileSync(path), file);
      assert.equal(await bounded(read.result()), "42");
    } finally {
      await local.stop();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
