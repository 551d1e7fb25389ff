/**
 * The real CLI, run as child processes: `deno run main.ts scheduler|worker ...`.
 *
 * @module
 */

import assert from "node:assert/strict";
import config from "../deno.json" with { type: "json" };
import { Client, rpc, type SchedulerOps, type WorkerOps } from "../mod.ts";
import { NODE_PERMISSIONS, type NodeProcess, spawnNode } from "../client/spawn.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

const MAIN = new URL("../main.ts", import.meta.url);
/** How long a poll waits for the scheduler to notice something, and its step. */
const POLL_TIMEOUT_MS = 5_000;
const POLL_STEP_MS = 50;
/** How long a raw child may take to print its first stdout line. */
const FIRST_LINE_TIMEOUT_MS = 30_000;

const delay = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Runs `dist ARGS...` to the end. */
async function dist(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...NODE_PERMISSIONS, "--allow-run", MAIN.href, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

/** A free TCP port on 127.0.0.1 (free a moment ago, at least). */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

/** Nodes started by one test, all stopped (SIGTERM, workers first) at the end of its scope. */
class Nodes implements AsyncDisposable {
  readonly #nodes: NodeProcess[] = [];

  async spawn(...args: string[]): Promise<NodeProcess> {
    return this.add(await spawnNode(args));
  }

  add(node: NodeProcess): NodeProcess {
    this.#nodes.push(node);
    return node;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    for (const node of this.#nodes.reverse()) await node.stop();
  }
}

/** Polls `probe` until `ok` holds, for at most POLL_TIMEOUT_MS. */
async function eventually<T>(what: string, probe: () => Promise<T>, ok: (value: T) => boolean): Promise<T> {
  const deadline = Date.now() + POLL_TIMEOUT_MS;
  for (;;) {
    const value = await probe();
    if (ok(value)) return value;
    if (Date.now() >= deadline) {
      throw new Error(`Expected ${what} within ${POLL_TIMEOUT_MS} ms; last saw ${JSON.stringify(value)}`);
    }
    await delay(POLL_STEP_MS);
  }
}

/** What the scheduler knows of workers and keys, in one look. */
async function snapshot(scheduler: string) {
  await using s = rpc<SchedulerOps>(scheduler);
  const [whoHas, hasWhat, ncores, workers] = await Promise.all([
    s.who_has(),
    s.has_what(),
    s.ncores(),
    s.workers(),
  ]);
  return { whoHas, hasWhat, ncores, workers: workers.map((w) => w.address).sort() };
}

/** A child whose whole stdout and stderr are kept, for checking exactly what it prints. */
function spawnRaw(args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", ...NODE_PERMISSIONS, MAIN.href, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const out = { stdout: "", stderr: "" };
  let gotLine!: (line: string | null) => void;
  const firstLine = new Promise<string | null>((resolve) => gotLine = resolve);
  const collect = async (stream: ReadableStream<Uint8Array>, which: "stdout" | "stderr") => {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      out[which] += chunk;
      const nl = out.stdout.indexOf("\n");
      if (nl >= 0) gotLine(out.stdout.slice(0, nl));
    }
  };
  const done = Promise.all([child.status, collect(child.stdout, "stdout"), collect(child.stderr, "stderr")])
    .then(([status]) => {
      gotLine(null);
      return status;
    });
  return {
    out,
    child,
    done,
    async firstLine(): Promise<string> {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const line = await Promise.race([
        firstLine,
        new Promise<"timeout">((resolve) =>
          timer = setTimeout(() => resolve("timeout"), FIRST_LINE_TIMEOUT_MS)
        ),
      ]);
      clearTimeout(timer);
      if (typeof line !== "string") throw new Error(`dist ${args.join(" ")} printed no line: ${out.stderr}`);
      return line;
    },
    async stop(): Promise<Deno.CommandStatus> {
      try {
        child.kill("SIGTERM");
      } catch { /* exited already */ }
      return await done;
    },
  };
}

Deno.test("cli: the seed exchange across three processes", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0");
  const aliceNode = await nodes.spawn("worker", scheduler.address, "--name", "alice");
  const bobNode = await nodes.spawn("worker", scheduler.address, "--name", "bob");
  await using alice = rpc<WorkerOps>(aliceNode.address);
  await using bob = rpc<WorkerOps>(bobNode.address);
  await using center = rpc<SchedulerOps>(scheduler.address);

  const x = new Float64Array([1, 2, 3]);
  const a = new Float64Array([10, 20, 30]);
  assert.deepEqual(await alice.update_data({ data: { x } }), { status: "OK", nbytes: { x: x.byteLength } });
  assert.deepEqual(await bob.update_data({ data: { a } }), { status: "OK", nbytes: { a: a.byteLength } });
  assert.deepEqual(await center.who_has({ keys: ["x", "a"] }), {
    x: [aliceNode.address],
    a: [bobNode.address],
  });

  const add = (p: Float64Array, q: Float64Array) => p.map((v, i) => v + q[i]);
  const reply = await alice.compute({ key: "z", function: add, keys: ["x", "a"] });
  assert.deepEqual(reply, { status: "OK", key: "z", nbytes: 3 * Float64Array.BYTES_PER_ELEMENT });

  const whoHas = await center.who_has({ keys: ["z", "a"] });
  assert.deepEqual(whoHas.z, [aliceNode.address]);
  assert.deepEqual(new Set(whoHas.a), new Set([bobNode.address, aliceNode.address]));
  assert.equal(whoHas.a.length, 2);

  const { z } = await alice.get_data({ keys: ["z"] });
  assert.ok(
    z instanceof Float64Array,
    `z should be a Float64Array, got ${Object.prototype.toString.call(z)}`,
  );
  assert.deepEqual(Array.from(z), [11, 22, 33]);
  assert.deepEqual((await alice.keys()).sort(), ["a", "x", "z"]);
  assert.deepEqual(await bob.keys(), ["a"]);
  assert.deepEqual(await center.ncores(), {
    [aliceNode.address]: navigator.hardwareConcurrency,
    [bobNode.address]: navigator.hardwareConcurrency,
  });
});

Deno.test("cli: stdout is exactly the listening line; logs go to stderr", async () => {
  const scheduler = spawnRaw(["scheduler", "--port", "0"]);
  let worker: ReturnType<typeof spawnRaw> | null = null;
  try {
    const line = await scheduler.firstLine();
    const match = /^listening at tcp:\/\/127\.0\.0\.1:(\d+)$/.exec(line);
    assert.ok(match, `first stdout line: ${JSON.stringify(line)}`);
    const port = Number(match[1]);
    assert.ok(port > 0 && port <= 65535, `port ${port}`);
    const address = `tcp://127.0.0.1:${port}`;
    {
      // The port is real: the scheduler answers there.
      await using s = rpc<SchedulerOps>(address);
      assert.equal(await s.ping(), "pong");
      assert.equal((await s.identity()).address, address);
    }

    worker = spawnRaw(["worker", address, "--name", "w"]);
    const workerLine = await worker.firstLine();
    const workerMatch = /^listening at (tcp:\/\/127\.0\.0\.1:(\d+))$/.exec(workerLine);
    assert.ok(workerMatch, `worker's first stdout line: ${JSON.stringify(workerLine)}`);
    assert.notEqual(Number(workerMatch[2]), 0);
    assert.deepEqual(Object.keys((await snapshot(address)).ncores), [workerMatch[1]]);

    const workerStatus = await worker.stop();
    assert.equal(workerStatus.code, 0);
    assert.equal(worker.out.stdout, `${workerLine}\n`);
    assert.match(worker.out.stderr, /INFO +worker w: Registered with tcp:\/\/127\.0\.0\.1:\d+/);

    const status = await scheduler.stop();
    assert.equal(status.code, 0);
    assert.equal(scheduler.out.stdout, `${line}\n`);
    assert.match(scheduler.out.stderr, /INFO +scheduler: Scheduler at tcp:\/\/127\.0\.0\.1:\d+/);
    assert.match(scheduler.out.stderr, /Scheduler closed/);
  } finally {
    await worker?.stop();
    await scheduler.stop();
  }
});

Deno.test("cli: --version prints the version from deno.json", async () => {
  const { code, stdout, stderr } = await dist("--version");
  assert.equal(code, 0);
  assert.equal(stdout, `dist ${config.version}\n`);
  assert.equal(stderr, "");
});

Deno.test("cli: --help of each command lists every flag with its default", async () => {
  const security = {
    "auth-token": null,
    "auth-token-file": null,
    "tls-cert": null,
    "tls-key": null,
    "tls-ca": null,
    "frame-bytes-max": "1073741824",
    "connections-max": "10000",
    "handshake-timeout": "10",
  };
  const expected: Record<string, Record<string, string | null>> = {
    scheduler: {
      host: "127.0.0.1",
      port: "8786",
      "worker-ttl": "30",
      "allowed-failures": "3",
      "no-workers-timeout": "60",
      "unclaimed-grace": "10",
      "scheduler-file": null,
      "dashboard-port": "8787",
      "no-dashboard": null,
      ...security,
      "log-level": "info",
      "log-format": "text",
      help: null,
    },
    worker: {
      host: "127.0.0.1",
      port: "0",
      name: "its address",
      nthreads: String(navigator.hardwareConcurrency),
      "death-timeout": "60",
      "scheduler-file": null,
      "task-permissions": "none",
      isolation: "thread",
      "task-heap-mib": null,
      "http-port": null,
      "transfers-out-max": "8",
      "memory-limit": "auto",
      "memory-target": "0.6",
      "memory-spill": "0.7",
      "memory-pause": "0.8",
      "memory-terminate": "0.95",
      "local-directory": null,
      "no-nanny": null,
      ...security,
      "log-level": "info",
      "log-format": "text",
      help: null,
    },
    local: {
      workers: String(navigator.hardwareConcurrency),
      nthreads: "1",
      "memory-limit": "auto",
      host: "127.0.0.1",
      port: "8786",
      "task-permissions": "none",
      "no-nanny": null,
      "dashboard-port": "8787",
      "no-dashboard": null,
      "auth-token": null,
      "auth-token-file": null,
      "log-level": "info",
      "log-format": "text",
      help: null,
    },
    ssh: {
      "hosts-file": null,
      port: "8786",
      "workers-per-host": "1",
      nthreads: null,
      "memory-limit": null,
      "remote-dist": "dist",
      "ssh-options": null,
      "auth-token-file": null,
      "log-level": "info",
      "log-format": "text",
      help: null,
    },
    info: { json: null, story: null, "auth-token": null, "auth-token-file": null, help: null },
  };
  for (const [command, flags] of Object.entries(expected)) {
    const { code, stdout, stderr } = await dist(command, "--help");
    assert.equal(code, 0, `dist ${command} --help`);
    assert.equal(stderr, "");
    assert.match(stdout, new RegExp(`Usage:\\n  dist ${command}`));
    const listed = stdout.split("\n").filter((l) => /^\s+--/.test(l));
    assert.deepEqual(
      listed.map((l) => /^\s+--([\w-]+)/.exec(l)![1]).sort(),
      Object.keys(flags).sort(),
      `flags of dist ${command} --help`,
    );
    for (const [flag, value] of Object.entries(flags)) {
      const row = listed.find((l) => l.trimStart().startsWith(`--${flag} `) || l.trim() === `--${flag}`)!;
      if (value !== null) assert.ok(row.includes(`(default: ${value})`), `dist ${command} --help: ${row}`);
    }
  }
});

Deno.test("cli: bad usage exits 2 with one line saying what was wrong", async () => {
  const scheduler = "tcp://127.0.0.1:8786";
  // Each line must match every pattern of its case: the flag or value, and what was expected.
  const cases: [string[], ...RegExp[]][] = [
    [["scheduler", "--bogus"], /unknown flag --bogus/],
    [["worker", scheduler, "--frobnicate", "3"], /unknown flag --frobnicate/],
    [
      ["worker", "http://127.0.0.1:8786"],
      /"http:\/\/127\.0\.0\.1:8786"/,
      /expected host:port, tcp:\/\/host:port/,
    ],
    [["worker", "tcp://host:99999"], /99999/, /0 to 65535/],
    [["scheduler", "--port", "abc"], /--port/, /"abc"/, /0 to 65535/],
    [["scheduler", "--port", "70000"], /--port/, /"70000"/, /0 to 65535/],
    [["scheduler", "--port"], /--port needs a value/],
    [["scheduler", "--no-dashboard=yes"], /--no-dashboard takes no value/],
    [["scheduler", "-p", "1"], /unknown flag -p/],
    [["scheduler", "--port=1=2"], /--port/, /"1=2"/],
    [["scheduler", "--", "--port"], /unexpected argument "--port"/],
    [["worker", scheduler, "--port", "abc"], /--port/, /"abc"/],
    [["worker", scheduler, "--nthreads", "0"], /--nthreads/, /"0"/, /above 0/],
    [["worker", scheduler, "--nthreads=-1"], /--nthreads/, /"-1"/, /above 0/],
    [["worker", scheduler, "--nthreads", "1.5"], /--nthreads/, /"1\.5"/, /whole number/],
    [["worker", scheduler, "--death-timeout", "0"], /--death-timeout/, /"0"/],
    [["scheduler", "--log-level", "loud"], /--log-level/, /"loud"/, /debug, info/],
    [["worker", scheduler, "--isolation", "vm"], /--isolation/, /"vm"/, /thread or process/],
    [["worker", scheduler, "--task-heap-mib", "64"], /--task-heap-mib/, /--isolation process/],
    [["worker", scheduler, "--isolation", "process", "--task-heap-mib", "8"], /--task-heap-mib/, /"8"/, /16/],
    [["worker", scheduler, "--memory-limit", "4gigs"], /--memory-limit/, /"4gigs"/, /512MiB/],
    [["worker", scheduler, "--memory-target", "1.5"], /--memory-target/, /"1\.5"/, /at most 1/],
    [["local", "--memory-limit", "lots"], /--memory-limit/, /"lots"/],
    [["_executor"], /started by a worker/],
    [["frobnicate"], /unknown command "frobnicate"/],
    [["worker"], /missing SCHEDULER_ADDRESS/],
    [[], /missing command: scheduler, worker, local, ssh or info/],
    [["scheduler", "extra"], /unexpected argument "extra"/],
  ];
  for (const [args, ...patterns] of cases) {
    const { code, stdout, stderr } = await dist(...args);
    const what = `dist ${args.join(" ")}`;
    assert.equal(code, 2, `${what}: exit code (stderr: ${stderr})`);
    assert.equal(stdout, "", `${what}: stdout`);
    assert.ok(stderr.endsWith("\n"), `${what}: stderr ends its line`);
    const lines = stderr.trimEnd().split("\n");
    assert.equal(lines.length, 1, `${what}: stderr should be one line: ${stderr}`);
    assert.match(lines[0], /^dist: /, what);
    for (const pattern of patterns) assert.match(lines[0], pattern, what);
  }
});

// `--nthreads -1` (a space, not `=`) is what people type. Node's parseArgs calls such a
// value "ambiguous"; passing on only that word would name neither the value nor the fix.
Deno.test("cli: --nthreads -1 (with a space) says what was wrong", async () => {
  const { code, stdout, stderr } = await dist("worker", "tcp://127.0.0.1:8786", "--nthreads", "-1");
  assert.equal(code, 2);
  assert.equal(stdout, "");
  const lines = stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, stderr);
  assert.match(lines[0], /--nthreads/);
  assert.match(lines[0], /-1/, `the line should name the bad value: ${lines[0]}`);
});

Deno.test("cli: a worker started before its scheduler registers once it appears", async () => {
  const port = freePort();
  const address = `tcp://127.0.0.1:${port}`;
  await using nodes = new Nodes();
  const waiting = Promise.withResolvers<void>();
  const early = spawnNode(
    ["worker", address, "--death-timeout", "20", "--name", "early", "--nthreads", "3"],
    {
      onLog: (line) => {
        if (line.includes(`Waiting for scheduler ${address}`)) waiting.resolve();
      },
    },
  );
  // The worker has tried and failed to register before the scheduler starts.
  await Promise.race([waiting.promise, early.then(() => {}, () => {})]);
  const late = spawnNode(["scheduler", "--port", String(port)]);
  const [w, s] = await Promise.allSettled([early, late]);
  // Register whatever started before judging, so that the finally stops it.
  if (s.status === "fulfilled") nodes.add(s.value);
  if (w.status === "fulfilled") nodes.add(w.value);
  if (s.status === "rejected") throw s.reason;
  if (w.status === "rejected") throw w.reason;
  const [worker, scheduler] = [w.value, s.value];

  assert.equal(scheduler.address, address);
  assert.ok(
    worker.log.some((l) => l.includes(`Waiting for scheduler ${address}`)),
    `the worker should have waited:\n${worker.log.join("\n")}`,
  );
  await using center = rpc<SchedulerOps>(address);
  assert.deepEqual(await center.ncores(), { [worker.address]: 3 });
  assert.deepEqual((await center.workers()).map((i) => i.name), ["early"]);
});

Deno.test("cli: --death-timeout 1 with no scheduler exits 3 saying it cannot register, and its nanny too", async () => {
  const address = `tcp://127.0.0.1:${freePort()}`;
  const { code, stdout, stderr } = await dist("worker", address, "--death-timeout", "1");
  // 3: gave up on its scheduler; the nanny does not start it again and exits the same way.
  assert.equal(code, 3, stderr);
  assert.equal(stdout, "");
  const last = stderr.trimEnd().split("\n").at(-1)!;
  assert.match(
    last,
    new RegExp(`^dist: error: Cannot register with scheduler ${address} after \\d+ attempts: `),
  );
  assert.match(last, /connection refused/);
});

Deno.test("cli: a worker that could not start its executors refuses to start, naming --allow-read", async () => {
  // It used to register and look healthy, then fail every task it was given.
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0", "--no-dashboard");
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--no-prompt",
      ...NODE_PERMISSIONS.filter((flag) => flag !== "--allow-read"),
      MAIN.href,
      "worker",
      scheduler.address,
      "--no-nanny",
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 2, stderr);
  assert.match(
    stderr,
    /^dist: error: This worker cannot start its executors: it needs read access to .*executor\.ts\. Run it with --allow-read/m,
  );
  const center = rpc<SchedulerOps>(scheduler.address);
  try {
    assert.deepEqual(await center.workers(), []);
  } finally {
    center.close();
  }
});

Deno.test("cli: a worker that could not keep its memory limit refuses to start, naming the flag", async () => {
  const run = async (drop: string, ...extra: string[]) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--no-prompt",
        ...NODE_PERMISSIONS.filter((flag) => flag !== drop),
        MAIN.href,
        "worker",
        "127.0.0.1:1",
        "--no-nanny",
        ...extra,
      ],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
  };
  // `auto` with no way to read the machine's memory would have run with no limit at all.
  const noSys = await run("--allow-sys");
  assert.equal(noSys.code, 2, noSys.stderr);
  assert.match(
    noSys.stderr,
    /^dist: --memory-limit auto cannot read this machine's memory: run with --allow-sys/,
  );
  // A limit with no way to spill would fail when it matters.
  const noWrite = await run("--allow-write", "--memory-limit", "1GiB");
  assert.equal(noWrite.code, 2, noWrite.stderr);
  assert.match(
    noWrite.stderr,
    /^dist: a worker with a memory limit spills values to disk and needs write access/,
  );
  assert.match(noWrite.stderr, /--allow-write .* or --memory-limit 0 to never spill/);
});

Deno.test("cli: --scheduler-file: a worker started first waits for it; a client reads it too", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dist-scheduler-file-" });
  try {
    const file = `${dir}/scheduler.json`;
    await using nodes = new Nodes();
    // As a batch job does: the worker may start before the scheduler has written the file.
    const worker = spawnNode(["worker", "--scheduler-file", file, "--nthreads", "1", "--name", "w"]);
    await delay(300);
    const scheduler = await nodes.spawn(
      "scheduler",
      "--port",
      "0",
      "--no-dashboard",
      "--scheduler-file",
      file,
    );
    nodes.add(await worker);
    const written = JSON.parse(await Deno.readTextFile(file));
    assert.equal(written.address, scheduler.address);
    assert.equal(typeof written.id, "string");
    await using client = await Client.connect({ schedulerFile: file });
    assert.equal(await client.submit((x: number) => x * 2, 21).result(), 42);

    // A file that is not a scheduler's is refused with what was wrong; so is a file that never comes.
    await Deno.writeTextFile(`${dir}/bad.json`, '{"hello": 1}');
    const bad = await dist("worker", "--scheduler-file", `${dir}/bad.json`, "--no-nanny");
    assert.equal(bad.code, 3, bad.stderr);
    assert.match(bad.stderr, /^dist: error: The scheduler file .*bad\.json has no scheduler address/m);
    const missing = await dist("worker", "--scheduler-file", `${dir}/none.json`, "--death-timeout", "0.3");
    assert.equal(missing.code, 3, missing.stderr);
    assert.match(missing.stderr, /did not appear within 0\.3 s: start the scheduler with --scheduler-file/);
    const both = await dist("worker", scheduler.address, "--scheduler-file", file);
    assert.equal(both.code, 2);
    assert.match(both.stderr, /give SCHEDULER_ADDRESS or --scheduler-file, not both/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("cli: SIGTERM and SIGINT make a worker unregister and exit 0", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0");
  const alice = await nodes.spawn("worker", scheduler.address, "--name", "alice");
  const bob = await nodes.spawn("worker", scheduler.address, "--name", "bob");
  const carol = await nodes.spawn("worker", scheduler.address, "--name", "carol");
  {
    await using a = rpc<WorkerOps>(alice.address);
    await using b = rpc<WorkerOps>(bob.address);
    await a.update_data({ data: { x: new Float64Array([1]), shared: 1 } });
    await b.update_data({ data: { y: new Float64Array([2]), shared: 1 } });
  }
  const before = await snapshot(scheduler.address);
  assert.deepEqual(before.workers, [alice.address, bob.address, carol.address].sort());
  assert.deepEqual(before.whoHas.x, [alice.address]);

  alice.child.kill("SIGTERM");
  const aliceStatus = await alice.status;
  assert.equal(aliceStatus.code, 0, alice.log.join("\n"));
  assert.ok(alice.log.some((l) => l.includes("Worker closed")), alice.log.join("\n"));
  // It said goodbye before exiting, so the scheduler already knows: no polling.
  await scheduler.waitForLog(new RegExp(`Worker ${alice.address} left \\(unregistered\\)`));
  const afterTerm = await snapshot(scheduler.address);
  assert.deepEqual(afterTerm.workers, [bob.address, carol.address].sort());
  assert.equal(afterTerm.ncores[alice.address], undefined);
  assert.equal(afterTerm.hasWhat[alice.address], undefined);
  // x lived only on alice: she handed it over before leaving (to carol, who held least).
  assert.deepEqual(afterTerm.whoHas.x, [carol.address], "x moved before alice left");
  {
    await using c = rpc<WorkerOps>(carol.address);
    assert.deepEqual((await c.get_data({ keys: ["x"] })).x, new Float64Array([1]));
  }
  assert.deepEqual(afterTerm.whoHas.y, [bob.address]);
  assert.deepEqual(afterTerm.whoHas.shared, [bob.address]);

  bob.child.kill("SIGINT");
  assert.equal((await bob.status).code, 0, bob.log.join("\n"));
  await scheduler.waitForLog(new RegExp(`Worker ${bob.address} left \\(unregistered\\)`));
  const afterInt = await snapshot(scheduler.address);
  assert.deepEqual(afterInt.workers, [carol.address]);
  // Nothing was lost: every key now lives on carol.
  assert.deepEqual(afterInt.whoHas, { x: [carol.address], y: [carol.address], shared: [carol.address] });
});

Deno.test("cli: SIGTERM and the terminate op make a scheduler exit 0", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0");
  const worker = await nodes.spawn("worker", scheduler.address, "--death-timeout", "30");
  scheduler.child.kill("SIGTERM");
  const status = await scheduler.status;
  assert.equal(status.code, 0, scheduler.log.join("\n"));
  assert.ok(scheduler.log.some((l) => l.includes("Scheduler closed")), scheduler.log.join("\n"));
  await worker.waitForLog(/Lost the scheduler/);

  const other = await nodes.spawn("scheduler", "--port", "0");
  {
    await using s = rpc<SchedulerOps>(other.address);
    assert.deepEqual(await s.terminate(), { status: "OK" });
  }
  assert.equal((await other.status).code, 0, other.log.join("\n"));
});

Deno.test("cli: the terminate op makes a worker exit 0 and the scheduler drops it", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0");
  const alice = await nodes.spawn("worker", scheduler.address, "--name", "alice");
  const bob = await nodes.spawn("worker", scheduler.address, "--name", "bob");
  {
    await using a = rpc<WorkerOps>(alice.address);
    await a.update_data({ data: { x: 1 } });
    assert.deepEqual(await a.terminate(), { status: "OK" });
  }
  assert.equal((await alice.status).code, 0, alice.log.join("\n"));
  await scheduler.waitForLog(new RegExp(`Worker ${alice.address} left \\(unregistered\\)`));
  const after = await snapshot(scheduler.address);
  assert.deepEqual(after.workers, [bob.address]);
  assert.deepEqual(Object.keys(after.ncores), [bob.address]);
  // Alice's only copy of x went to bob before she left.
  assert.deepEqual(after.whoHas, { x: [bob.address] });
});

Deno.test("cli: a SIGKILLed worker is dropped once its connection closes", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0");
  const alice = await nodes.spawn("worker", scheduler.address, "--name", "alice", "--no-nanny");
  const bob = await nodes.spawn("worker", scheduler.address, "--name", "bob");
  {
    await using a = rpc<WorkerOps>(alice.address);
    await using b = rpc<WorkerOps>(bob.address);
    await a.update_data({ data: { x: new Float64Array([1, 2]), both: 0 } });
    await b.update_data({ data: { y: new Float64Array([3]), both: 0 } });
  }
  const before = await snapshot(scheduler.address);
  assert.deepEqual(before.hasWhat[alice.address]?.sort(), ["both", "x"]);

  alice.child.kill("SIGKILL");
  const status = await alice.status;
  assert.equal(status.success, false);
  assert.equal(status.signal, "SIGKILL");

  const after = await eventually(
    `${alice.address} gone from the scheduler`,
    () => snapshot(scheduler.address),
    (s) => !(alice.address in s.ncores),
  );
  assert.deepEqual(after.workers, [bob.address]);
  assert.deepEqual(after.ncores, { [bob.address]: navigator.hardwareConcurrency });
  assert.deepEqual(Object.keys(after.hasWhat), [bob.address]);
  assert.equal(after.whoHas.x, undefined, "x lived only on alice");
  assert.deepEqual(after.whoHas.both, [bob.address]);
  assert.deepEqual(after.whoHas.y, [bob.address]);
  await scheduler.waitForLog(new RegExp(`Worker ${alice.address} left \\(connection closed\\)`));
});

Deno.test("cli: a worker takes its scheduler as host:port too, as Dask does", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0");
  const hostPort = scheduler.address.replace(/^tcp:\/\//, "");
  const worker = await nodes.spawn("worker", hostPort, "--name", "plain", "--no-nanny");
  await using center = rpc<SchedulerOps>(hostPort);
  assert.deepEqual((await center.workers()).map((w) => [w.name, w.address]), [["plain", worker.address]]);
  assert.match(worker.address, /^tcp:\/\//, "a node says its address with the scheme");
});

Deno.test("cli: dist info pointed at a worker names its scheduler and the --story it can answer", async () => {
  await using nodes = new Nodes();
  const scheduler = await nodes.spawn("scheduler", "--port", "0");
  const worker = await nodes.spawn("worker", scheduler.address, "--name", "wendy", "--no-nanny");
  const { code, stdout, stderr } = await dist("info", worker.address);
  assert.equal(code, 1, stderr);
  assert.equal(stdout, "");
  assert.match(stderr, new RegExp(`is a worker \\(wendy\\), not a scheduler`));
  assert.ok(stderr.includes(`dist info ${scheduler.address}`), stderr);
  assert.ok(stderr.includes(`dist info ${worker.address} --story KEY`), stderr);
});
