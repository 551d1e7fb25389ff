/**
 * A cut network, for real: the scheduler, two workers and a client each on a host of
 * their own (Linux network namespaces joined by a bridge that lives in a namespace of
 * its own, so the root namespace is never touched). Mid-computation alice's cable is
 * pulled (her bridge port goes down: her TCP connections stay open, only the silence
 * tells), the computation must still finish with the right result, and once the cable
 * is back alice must register again and take part in new work.
 *
 * Needs root and iproute2 (`ip`); skipped, with the reason printed, where it cannot
 * create namespaces (not root, no `ip`, an unprivileged container).
 *
 * Every packet stays inside the namespaces this test creates: the private subnet
 * below exists only there and is never routed out.
 *
 * @module
 */

import assert from "node:assert/strict";
import { lines as linesOf, NODE_PERMISSIONS } from "../client/spawn.ts";

const MAIN = new URL("../main.ts", import.meta.url);
const MOD = new URL("../mod.ts", import.meta.url);
/** What every process in a namespace runs with (the nodes' own permissions). */
const PERMISSIONS = NODE_PERMISSIONS;
/** A private subnet that exists only inside this test's namespaces. */
const SUBNET = "10.213.77";
const HOSTS = { scheduler: 1, alice: 2, bob: 3, client: 4 } as const;
type Host = keyof typeof HOSTS;
const SCHEDULER_PORT = 8786;
const WORKER_TTL_S = 2;
const DEATH_TIMEOUT_S = 60;

/** The computation: A_INPUTS computed inputs x B_INPUTS scattered ones, each pair one slow task. */
const A_INPUTS = 6;
const B_INPUTS = 8;
const ELEMENTS = 20_000;
const TASK_MS = 150;

/** Time limits of each step. */
const START_TIMEOUT_MS = 30_000;
const INPUTS_TIMEOUT_MS = 30_000;
const PROGRESS_TIMEOUT_MS = 30_000;
/** The TTL, plus a heartbeat interval and the scheduler's check period, plus slack. */
const REMOVAL_TIMEOUT_MS = WORKER_TTL_S * 1000 + 6_000;
const RESULT_TIMEOUT_MS = 40_000;
const REJOIN_TIMEOUT_MS = 30_000;
const SECOND_RESULT_TIMEOUT_MS = 20_000;
/** How long a node's log line may lag behind what the client saw. */
const LOG_TIMEOUT_MS = 5_000;
/** How long a process has to exit after SIGTERM before it gets SIGKILL. */
const STOP_GRACE_MS = 5_000;
/** Lines of each process's output shown when a step fails. */
const TAIL_LINES = 25;

// ---- the functions the cluster runs (their source is also the client script's) ----

function makeA(i: number, n: number): Float64Array {
  const a = new Float64Array(n);
  for (let k = 0; k < n; k++) a[k] = (k * 7 + i) % 13;
  return a;
}

function makeB(j: number, n: number): Float64Array {
  const b = new Float64Array(n);
  for (let k = 0; k < n; k++) b[k] = (k * 3 + j) % 11;
  return b;
}

function combine(a: Float64Array, b: Float64Array, delayMs: number): number {
  const end = Date.now() + delayMs;
  let s = 0;
  for (let k = 0; k < a.length; k++) s += a[k] * b[k];
  while (Date.now() < end) { /* a slow task */ }
  return s;
}

function sum(...xs: number[]): number {
  return xs.reduce((p, q) => p + q, 0);
}

function expectedTotal(): number {
  let total = 0;
  for (let i = 0; i < A_INPUTS; i++) {
    for (let j = 0; j < B_INPUTS; j++) total += combine(makeA(i, ELEMENTS), makeB(j, ELEMENTS), 0);
  }
  return total;
}

/**
 * The client (plain JavaScript: the functions above travel as their transpiled
 * source), run inside the client's namespace. It prints one JSON line per event and
 * every change of the scheduler's worker list (polled on an rpc of its own). The test
 * tells it on stdin when alice's link is "cut" and when it is "restored".
 */
const CLIENT_SCRIPT = `
import { asCompleted, Client, rpc, taskOptions, wait } from ${JSON.stringify(MOD.href)};

${makeA}
${makeB}
${combine}
${sum}

const [scheduler] = Deno.args;
const emit = (ev, data = {}) => console.log(JSON.stringify({ ev, t: Date.now(), ...data }));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let phase = "connect";
try {
  const client = await Client.connect(scheduler);
  const center = rpc(scheduler);
  let workers = [];
  let inputKeys = [];
  let monitoring = true;
  const monitor = (async () => {
    let last = "";
    while (monitoring) {
      try {
        workers = await center.workers({}, { timeoutMs: 2000 });
        const names = workers.map((w) => w.name).sort();
        const seen = JSON.stringify(workers.map((w) => [w.name, w.address]).sort());
        if (seen !== last) {
          // Where the inputs are as of this change (once there are inputs).
          const inputs = inputKeys.length ? await center.who_has({ keys: inputKeys }, { timeoutMs: 2000 }) : {};
          emit("workers", { names, addresses: workers.map((w) => w.address), inputs });
        }
        last = seen;
      } catch (error) {
        emit("monitor_error", { message: String(error) });
      }
      await sleep(100);
    }
  })();
  const until = async (what, ok, ms) => {
    const deadline = Date.now() + ms;
    while (!ok()) {
      if (Date.now() > deadline) throw new Error("Timed out waiting for " + what);
      await sleep(50);
    }
  };
  const lines = Deno.stdin.readable.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  const command = async () => {
    while (!buffered.includes("\\n")) {
      const { value, done } = await lines.read();
      if (done) throw new Error("stdin closed");
      buffered += value;
    }
    const nl = buffered.indexOf("\\n");
    const line = buffered.slice(0, nl);
    buffered = buffered.slice(nl + 1);
    return line;
  };

  phase = "waiting for both workers";
  await until("two workers", () => workers.length === 2, 20000);
  emit("ready");

  phase = "inputs";
  // Bob's inputs are scattered onto bob (who keeps his link). Alice's are computed by
  // pure tasks the scheduler places: what is lost with her can be computed again.
  const bobIn = await client.scatter(
    Array.from({ length: ${B_INPUTS} }, (_, j) => makeB(j, ${ELEMENTS})),
    { workers: ["bob"] },
  );
  const aIn = client.map(makeA, Array.from({ length: ${A_INPUTS} }, (_, i) => i), Array(${A_INPUTS}).fill(${ELEMENTS}));
  await wait(aIn);
  inputKeys = [...aIn, ...bobIn].map((f) => f.key);
  emit("inputs", {
    a: aIn.map((f) => f.key),
    b: bobIn.map((f) => f.key),
    whoHas: await center.who_has({ keys: inputKeys }),
  });

  phase = "a value only alice holds";
  // A fresh pure value that the scheduler happens to place on alice (round robin: a
  // few tries at most). No task needs it before the cut, so bob has no copy of it.
  const aliceAddress = workers.find((w) => w.name === "alice").address;
  let only = null;
  for (let seed = 1000; seed < 1008 && only === null; seed++) {
    const f = client.submit(makeA, seed, ${ELEMENTS});
    await f.wait();
    const holders = (await center.who_has({ keys: [f.key] }))[f.key];
    if (holders.length === 1 && holders[0] === aliceAddress) only = { f, seed };
  }
  if (only === null) throw new Error("the scheduler put none of 8 tasks on alice");
  emit("only_alice", { key: only.f.key, seed: only.seed });

  phase = "computation";
  // Told "cut" once alice's link is down: a task pinned to bob that needs the value
  // only alice holds, so bob's fetch starts after the cut and meets only silence.
  const acrossCut = command().then((said) => {
    if (said !== "cut") throw new Error("expected cut, got " + JSON.stringify(said));
    const probe = client.submit(combine, only.f, bobIn[0], 0, taskOptions({ workers: ["bob"] }));
    emit("probe_submitted", { key: probe.key });
    return probe.result();
  }).then((value) => emit("probe_done", { value, seed: only.seed }));
  acrossCut.catch(() => {}); // awaited below
  const combos = [];
  for (const a of aIn) for (const b of bobIn) combos.push(client.submit(combine, a, b, ${TASK_MS}));
  const total = client.submit(sum, ...combos);
  let done = 0;
  for await (const f of asCompleted(combos)) {
    done++;
    emit("progress", { done, of: combos.length, status: f.status });
  }
  const value = await total.result();
  await acrossCut;
  emit("result", {
    value,
    total: total.key,
    whoHas: await center.who_has({ keys: [total.key, ...combos.map((f) => f.key)] }),
  });

  phase = "waiting for restored on stdin";
  const said = await command();
  if (said !== "restored") throw new Error("unexpected command " + JSON.stringify(said));
  phase = "waiting for alice to rejoin";
  await until("alice in the worker list", () => workers.some((w) => w.name === "alice"), ${REJOIN_TIMEOUT_MS});
  emit("rejoined", { whoHas: await center.who_has({ keys: inputKeys }) });

  phase = "second computation";
  // Pinned now that both are back: x is made on alice, y on bob, z needs both.
  const x = client.submit(makeA, 100, ${ELEMENTS}, taskOptions({ workers: ["alice"] }));
  const y = client.submit(makeB, 100, ${ELEMENTS}, taskOptions({ workers: ["bob"] }));
  const z = client.submit(combine, x, y, 0);
  const value2 = await z.result();
  const where = await center.who_has({ keys: [x.key, y.key, z.key] });
  emit("result2", { value: value2, whoHas: { x: where[x.key], y: where[y.key], z: where[z.key] } });

  phase = "closing";
  monitoring = false;
  await monitor;
  await lines.cancel();
  await center.close();
  await client.close();
  emit("bye");
  Deno.exit(0);
} catch (error) {
  emit("error", { phase, message: String(error?.stack ?? error) });
  Deno.exit(1);
}
`;

// ---- running things ----

const decoder = new TextDecoder();

/** Runs `ip ARGS...` to the end; throws with its stderr when it fails. */
async function ip(...args: string[]): Promise<string> {
  const out = await new Deno.Command("ip", { args, stdin: "null", stdout: "piped", stderr: "piped" })
    .output();
  if (!out.success) {
    throw new Error(`ip ${args.join(" ")} failed (exit ${out.code}): ${decoder.decode(out.stderr).trim()}`);
  }
  return decoder.decode(out.stdout);
}

/** Why this machine cannot run the test, or null if it can (a namespace was made and removed). */
async function skipReason(): Promise<string | null> {
  if (Deno.build.os !== "linux") return `network namespaces need Linux, not ${Deno.build.os}`;
  try {
    if (Deno.uid() !== 0) return `not root (uid ${Deno.uid()}): cannot create network namespaces`;
  } catch (error) {
    return `cannot tell whether this is root: ${(error as Error).message}`;
  }
  try {
    await ip("-V");
  } catch (error) {
    return `no usable iproute2 \`ip\`: ${(error as Error).message}`;
  }
  const probe = `dist-probe-${crypto.randomUUID().slice(0, 8)}`;
  try {
    await ip("netns", "add", probe);
  } catch (error) {
    return `cannot create a network namespace (unprivileged container?): ${(error as Error).message}`;
  }
  try {
    await ip("-n", probe, "link", "add", "probe0", "type", "bridge");
  } catch (error) {
    return `cannot create a bridge inside a namespace: ${(error as Error).message}`;
  } finally {
    await ip("netns", "del", probe).catch(() => {});
  }
  return null;
}

interface Line {
  text: string;
  /** Date.now() when it arrived. */
  at: number;
}

type Stream = "out" | "err";

interface Waiter {
  stream: Stream;
  from: number;
  match: (text: string) => boolean;
  resolve: (line: Line) => void;
  reject: (error: Error) => void;
}

/**
 * A deno process inside a namespace: `ip netns exec NS deno run ...`. `ip netns exec`
 * execs the command, so the child's pid is deno's and SIGTERM reaches it.
 */
class Proc {
  readonly out: Line[] = [];
  readonly err: Line[] = [];
  readonly status: Promise<Deno.CommandStatus>;
  readonly child: Deno.ChildProcess;
  #waiters = new Set<Waiter>();
  #exited: Deno.CommandStatus | null = null;
  #stdin: WritableStreamDefaultWriter<Uint8Array> | null = null;

  constructor(
    readonly label: string,
    namespace: string,
    args: string[],
    env: Record<string, string>,
    stdin: boolean,
  ) {
    const child = new Deno.Command("ip", {
      args: ["netns", "exec", namespace, Deno.execPath(), "run", ...PERMISSIONS, ...args],
      env,
      stdin: stdin ? "piped" : "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.child = child;
    if (stdin) this.#stdin = child.stdin.getWriter();
    const read = async (stream: Stream, from: ReadableStream<Uint8Array>) => {
      const lines = this[stream];
      for await (const text of linesOf(from)) {
        const line = { text, at: Date.now() };
        lines.push(line);
        for (const w of this.#waiters) {
          if (w.stream === stream && lines.length - 1 >= w.from && w.match(text)) w.resolve(line);
        }
      }
    };
    const stdout = read("out", child.stdout);
    const stderr = read("err", child.stderr);
    this.status = Promise.all([child.status, stdout, stderr]).then(([s]) => {
      this.#exited = s;
      for (const w of this.#waiters) {
        w.reject(new Error(`${this.label} exited (code ${s.code}, signal ${s.signal}) first`));
      }
      return s;
    });
  }

  /** The first line of `stream` (from index `from` on) that `match`es; rejects after `timeoutMs` or at exit. */
  waitFor(
    stream: Stream,
    what: string,
    match: (text: string) => boolean,
    timeoutMs: number,
    from = 0,
  ): Promise<Line> {
    const seen = this[stream].slice(from).find((l) => match(l.text));
    if (seen) return Promise.resolve(seen);
    if (this.#exited) {
      return Promise.reject(
        new Error(`Waiting for ${what}: ${this.label} has exited (${this.#exited.code})`),
      );
    }
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.#waiters.delete(waiter);
      };
      const waiter: Waiter = {
        stream,
        from,
        match,
        resolve: (line) => {
          done();
          resolve(line);
        },
        reject: (error) => {
          done();
          reject(new Error(`Waiting for ${what}: ${error.message}`));
        },
      };
      const timer = setTimeout(
        () => waiter.reject(new Error(`not seen within ${timeoutMs} ms`)),
        timeoutMs,
      );
      this.#waiters.add(waiter);
    });
  }

  async send(line: string): Promise<void> {
    await this.#stdin!.write(new TextEncoder().encode(line + "\n"));
  }

  /** SIGTERM, then SIGKILL if it has not exited within STOP_GRACE_MS; waits for the end. */
  async stop(): Promise<Deno.CommandStatus> {
    const writer = this.#stdin;
    this.#stdin = null;
    await writer?.close().catch(() => {});
    if (this.#exited === null) {
      try {
        this.child.kill("SIGTERM");
      } catch { /* exited meanwhile */ }
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = await Promise.race([
        this.status.then(() => false),
        new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(true), STOP_GRACE_MS)),
      ]);
      clearTimeout(timer);
      if (late) {
        this.err.push({ text: `[test] no exit ${STOP_GRACE_MS} ms after SIGTERM: SIGKILL`, at: Date.now() });
        try {
          this.child.kill("SIGKILL");
        } catch { /* exited meanwhile */ }
      }
    }
    return await this.status;
  }

  tail(t0: number, lines = TAIL_LINES): string {
    const show = (all: Line[]) =>
      all.slice(-lines).map((l) => `    +${((l.at - t0) / 1000).toFixed(2)}s ${l.text}`).join("\n");
    return `--- ${this.label} (${this.#exited ? `exit ${this.#exited.code}` : "running"})\n` +
      `  stdout:\n${show(this.out)}\n  stderr:\n${show(this.err)}`;
  }
}

interface ClientEvent {
  ev: string;
  t: number;
  [field: string]: unknown;
}

function parseEvent(text: string): ClientEvent | null {
  try {
    const value = JSON.parse(text);
    return typeof value === "object" && value !== null && typeof value.ev === "string" ? value : null;
  } catch {
    return null;
  }
}

const skip = await skipReason();
if (skip !== null) console.log(`netns_test: skipped: ${skip}`);

Deno.test({
  name: "a cut network (netns): the scheduler drops alice after the TTL, the work finishes, alice rejoins",
  ignore: skip !== null,
  async fn() {
    const t0 = Date.now();
    const id = crypto.randomUUID().slice(0, 8);
    const ns = {
      scheduler: `dist-${id}-s`,
      alice: `dist-${id}-a`,
      bob: `dist-${id}-b`,
      client: `dist-${id}-c`,
      bridge: `dist-${id}-br`,
    };
    const addressOf = (host: Host) => `${SUBNET}.${HOSTS[host]}`;
    const port = (host: Host) => `p-${host}`; // the bridge's side of each host's cable
    const created: string[] = [];
    const procs: Proc[] = [];
    const timeline: [string, number][] = [];
    const mark = (what: string, at = Date.now()) => timeline.push([what, at]);
    const showTimeline = () =>
      timeline.toSorted((x, y) => x[1] - y[1]).map(([what, at]) =>
        `  +${((at - t0) / 1000).toFixed(2)}s ${what}`
      ).join("\n");
    const dir = await Deno.makeTempDir({ prefix: "dist-netns-" });
    // A fresh secret per run, handed over in the environment, never argv.
    const bytes = crypto.getRandomValues(new Uint8Array(24));
    const token = [...bytes].map((x) => x.toString(16).padStart(2, "0")).join("");
    const env = { DIST_AUTH_TOKEN: token, NO_COLOR: "1" };
    let step = "setting up the namespaces";
    try {
      // ---- the network: four hosts on a bridge that lives in a namespace of its own ----
      for (const name of Object.values(ns)) {
        await ip("netns", "add", name);
        created.push(name);
        await ip("-n", name, "link", "set", "lo", "up");
      }
      await ip("-n", ns.bridge, "link", "add", "br0", "type", "bridge");
      await ip("-n", ns.bridge, "link", "set", "br0", "up");
      for (const host of Object.keys(HOSTS) as Host[]) {
        // Made inside the bridge's namespace, one end moved straight to the host's.
        await ip(
          "-n",
          ns.bridge,
          "link",
          "add",
          port(host),
          "type",
          "veth",
          "peer",
          "name",
          "eth0",
          "netns",
          ns[host],
        );
        await ip("-n", ns.bridge, "link", "set", port(host), "master", "br0");
        await ip("-n", ns.bridge, "link", "set", port(host), "up");
        await ip("-n", ns[host], "addr", "add", `${addressOf(host)}/24`, "dev", "eth0");
        await ip("-n", ns[host], "link", "set", "eth0", "up");
      }
      mark("namespaces ready");

      // ---- the nodes ----
      step = "starting the scheduler";
      const start = async (host: Host, args: string[]): Promise<{ proc: Proc; address: string }> => {
        const proc = new Proc(host, ns[host], [MAIN.href, ...args], env, false);
        procs.push(proc);
        const line = await proc.waitFor(
          "out",
          `${host}'s "listening at" line`,
          (t) => /^listening at \S+$/.test(t),
          START_TIMEOUT_MS,
        );
        return { proc, address: line.text.slice("listening at ".length) };
      };
      const scheduler = await start("scheduler", [
        "scheduler",
        "--host",
        addressOf("scheduler"),
        "--port",
        String(SCHEDULER_PORT),
        "--worker-ttl",
        String(WORKER_TTL_S),
      ]);
      assert.equal(scheduler.address, `tcp://${addressOf("scheduler")}:${SCHEDULER_PORT}`);
      step = "starting the workers";
      const worker = (name: Host) =>
        start(name, [
          "worker",
          scheduler.address,
          "--host",
          addressOf(name),
          "--name",
          name,
          "--nthreads",
          "1",
          "--death-timeout",
          String(DEATH_TIMEOUT_S),
        ]);
      const [alice, bob] = await Promise.all([worker("alice"), worker("bob")]);
      assert.match(alice.address, new RegExp(`^tcp://${addressOf("alice").replaceAll(".", "\\.")}:\\d+$`));
      mark("nodes listening");
      const holderName = (address: string) =>
        address === alice.address ? "alice" : address === bob.address ? "bob" : address;

      // ---- the client ----
      step = "starting the client";
      const script = `${dir}/client.js`;
      await Deno.writeTextFile(script, CLIENT_SCRIPT);
      const client = new Proc("client", ns.client, [script, scheduler.address], env, true);
      procs.push(client);
      const event = (what: string, ok: (e: ClientEvent) => boolean, timeoutMs: number, from = 0) =>
        client.waitFor(
          "out",
          what,
          (text) => {
            const e = parseEvent(text);
            return e !== null && (e.ev === "error" || ok(e));
          },
          timeoutMs,
          from,
        ).then((line) => {
          const e = parseEvent(line.text)!;
          if (e.ev === "error") throw new Error(`The client failed while ${e.phase}: ${e.message}`);
          return { e, line, index: client.out.indexOf(line) };
        });
      const hasAlice = (e: ClientEvent) => e.ev === "workers" && (e.names as string[]).includes("alice");
      const noAlice = (e: ClientEvent) => e.ev === "workers" && !(e.names as string[]).includes("alice");

      step = "waiting for the client to see both workers";
      await event("ready", (e) => e.ev === "ready", START_TIMEOUT_MS);
      step = "waiting for the inputs";
      const inputs = (await event("inputs", (e) => e.ev === "inputs", INPUTS_TIMEOUT_MS)).e;
      const whoHas = inputs.whoHas as Record<string, string[]>;
      const onAlice = (inputs.a as string[]).filter((k) => whoHas[k]?.includes(alice.address));
      mark(`inputs ready: alice computed ${onAlice.length} of ${A_INPUTS} A inputs; B inputs on bob`);
      assert.ok(
        onAlice.length > 0,
        `alice holds none of the computed inputs, so cutting her loses nothing: ${JSON.stringify(whoHas)}`,
      );
      for (const k of inputs.b as string[]) assert.deepEqual(whoHas[k], [bob.address], `scattered ${k}`);

      const only = (await event("only_alice", (e) => e.ev === "only_alice", INPUTS_TIMEOUT_MS)).e;

      // ---- the cut ----
      step = "waiting for a third of the tasks";
      const third = Math.ceil((A_INPUTS * B_INPUTS) / 3);
      const progress = await event(
        `${third} tasks done`,
        (e) => e.ev === "progress" && (e.done as number) >= third,
        PROGRESS_TIMEOUT_MS,
      );
      step = "cutting alice's link";
      await ip("-n", ns.bridge, "link", "set", port("alice"), "down");
      const cutAt = Date.now();
      mark(`cut alice's link (${progress.e.done}/${progress.e.of} tasks done)`);
      await client.send("cut");

      step = "waiting for the scheduler to remove alice (TTL)";
      const removed = await event("a worker list without alice", noAlice, REMOVAL_TIMEOUT_MS, progress.index);
      mark("the scheduler's worker list lost alice", removed.e.t);
      // The reason is the TTL, not a closed connection.
      const left = await scheduler.proc.waitFor(
        "err",
        "the scheduler's log of alice leaving for want of heartbeats",
        (text) => text.includes(`Worker ${alice.address} left (`),
        LOG_TIMEOUT_MS,
      );
      assert.match(left.text, new RegExp(`left \\(no heartbeat for over ${WORKER_TTL_S * 1000} ms\\)`));
      mark("the scheduler logged alice leaving", left.at);
      // Only the TTL could tell: nothing arrived to close the connection.
      assert.ok(
        removed.e.t - cutAt >= WORKER_TTL_S * 1000 - 1_000,
        `alice was removed ${removed.e.t - cutAt} ms after the cut, before the TTL could have expired`,
      );

      step = "waiting for the result";
      const result = await event("the result", (e) => e.ev === "result", RESULT_TIMEOUT_MS, progress.index);
      mark("result", result.e.t);
      assert.equal(result.e.value, expectedTotal());
      // The task that had to fetch from alice after the cut got its input all the same.
      const submitted = (await event(
        "probe_submitted",
        (e) => e.ev === "probe_submitted",
        0,
        progress.index,
      )).e;
      const probe = (await event("probe_done", (e) => e.ev === "probe_done", 0, progress.index)).e;
      mark("across-the-cut task submitted (bob must fetch from alice)", submitted.t);
      mark("across-the-cut task done", probe.t);
      assert.equal(probe.value, combine(makeA(only.seed as number, ELEMENTS), makeB(0, ELEMENTS), 0));
      const held = result.e.whoHas as Record<string, string[]>;
      assert.ok(
        !Object.values(held).some((holders) => holders.includes(alice.address)),
        `alice is cut off, yet listed as a holder: ${JSON.stringify(held)}`,
      );

      // ---- the cable goes back ----
      step = "restoring alice's link";
      await ip("-n", ns.bridge, "link", "set", port("alice"), "up");
      const restoredAt = Date.now();
      mark("restored alice's link");
      await client.send("restored");
      step = "waiting for alice to rejoin";
      const back = await event("a worker list with alice again", hasAlice, REJOIN_TIMEOUT_MS, removed.index);
      mark("the scheduler lists alice again", back.e.t);
      assert.ok(back.e.t >= restoredAt - 100, "alice was listed again before her link came back");
      const registered = (text: string) => text.includes(`Worker ${alice.address} registered`);
      const again = await scheduler.proc.waitFor(
        "err",
        "the scheduler's log of alice registering again",
        registered,
        LOG_TIMEOUT_MS,
        scheduler.proc.err.indexOf(left) + 1,
      );
      const keysBack = Number(/\((\d+) threads, (\d+) keys\)/.exec(again.text)?.[2]);
      mark(`alice re-registered with ${keysBack} keys`, again.at);
      assert.ok(keysBack > 0, `alice came back empty-handed: ${again.text}`);
      const rejoined = await event("rejoined", (e) => e.ev === "rejoined", REJOIN_TIMEOUT_MS, back.index);
      const heldAgain = rejoined.e.whoHas as Record<string, string[]>;
      mark(
        `alice is a holder again of ${
          Object.values(heldAgain).filter((h) => h.includes(alice.address)).length
        } input keys`,
      );

      step = "waiting for the second computation (both workers)";
      const second = await event("result2", (e) => e.ev === "result2", SECOND_RESULT_TIMEOUT_MS, back.index);
      mark("second result", second.e.t);
      assert.equal(second.e.value, combine(makeA(100, ELEMENTS), makeB(100, ELEMENTS), 0));
      const where = Object.fromEntries(
        Object.entries(second.e.whoHas as Record<string, string[]>).map(([k, h]) => [k, h.map(holderName)]),
      );
      assert.ok(where.x.includes("alice"), `x was made on alice: ${JSON.stringify(where)}`);
      assert.ok(where.y.includes("bob"), `y was made on bob: ${JSON.stringify(where)}`);
      assert.equal(where.z.length, 1, `z is held once: ${JSON.stringify(where)}`);
      const on = (holders: string[]) => holders.join("+");
      mark(`second computation: x on ${on(where.x)}, y on ${on(where.y)}, z on ${on(where.z)}`);
      step = "waiting for the client to finish";
      await event("bye", (e) => e.ev === "bye", 10_000, second.index);
      const status = await client.status;
      assert.equal(status.code, 0, "the client's exit code");

      const registrations = scheduler.proc.err.filter((l) => registered(l.text)).length;
      assert.equal(registrations, 2, `alice registered ${registrations} times, not twice (flapping?)`);
      for (const node of [scheduler, alice, bob]) {
        assert.ok(
          !node.proc.err.some((l) => /neither an auth token/.test(l.text)),
          `${node.proc.label} warned about listening without a token`,
        );
      }
      // `ip netns exec` execs deno, so SIGTERM reaches the node itself: each shuts
      // down on its own (exit 0), none needs the SIGKILL that follows a silent grace period.
      step = "stopping the nodes with SIGTERM";
      for (const node of [alice, bob, scheduler]) {
        const stopped = await node.proc.stop();
        assert.deepEqual(
          { code: stopped.code, signal: stopped.signal },
          { code: 0, signal: null },
          `${node.proc.label} did not exit cleanly on SIGTERM`,
        );
      }
      mark("nodes stopped");
      console.log(`timeline:\n${showTimeline()}`);
      // DIST_TEST_LOG (as in _helpers.ts) asks for every process's output too.
      if (Deno.env.get("DIST_TEST_LOG")) console.log(procs.map((p) => p.tail(t0, Infinity)).join("\n"));
    } catch (error) {
      throw new Error(
        `Step "${step}" failed: ${(error as Error).message}\ntimeline:\n${showTimeline()}\n` +
          procs.map((p) => p.tail(t0)).join("\n"),
        { cause: error },
      );
    } finally {
      // The client first, then the workers (they unregister), then the scheduler.
      const order = (label: string) => ["client", "alice", "bob", "scheduler"].indexOf(label);
      const byStage = Object.groupBy(procs, (p) => String(order(p.label)));
      for (const stage of ["0", "1", "2", "3"]) {
        await Promise.all((byStage[stage] ?? []).map((p) => p.stop()));
      }
      for (const name of created.reverse()) await ip("netns", "del", name).catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
  },
});
