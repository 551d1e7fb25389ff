/**
 * Unit tests of the scheduler's task state machine, with no sockets: events go in as
 * the method calls the shell makes, and what comes out is checked in the task states
 * and in the messages `drain()` returns.
 *
 * Tests named "regression:" guard a defect scheduler/tasks.ts once had (found by review or
 * the fuzzer, fixed since): each name says the behaviour that must hold.
 *
 * @module
 */

import assert from "node:assert/strict";
import type { RemoteErrorInfo } from "../protocol/errors.ts";
import {
  type ComputeTaskArgs,
  DEFAULT_DURATION_S,
  keyPrefix,
  type Outgoing,
  RELEASE_STEPS_PER_TURN,
  SchedulerTasks,
  type TaskSpec,
  tasksPerWorker,
  type TaskStateName,
  WORKER_AHEAD_MS,
  WORKER_EXTRA_TASKS,
  WORKER_TASKS_PER_THREAD_MAX,
} from "../scheduler/tasks.ts";

const A = "tcp://a:1";
const B = "tcp://b:1";
const C = "tcp://c:1";
const C1 = "client-1";
const C2 = "client-2";
const C3 = "client-3";
const BOOM: RemoteErrorInfo = { name: "ValueError", message: "boom", stack: "at f" };
const IDENTITY = { source: "(x) => x" };
/** What a task counts as before its kind has finished once (us), the same as `finish` reports. */
const UNKNOWN_US = DEFAULT_DURATION_S * 1e6;
const ROOM_1 = tasksPerWorker(1, UNKNOWN_US);

// ---- helpers ----

/** A task spec running the identity function unless told otherwise. */
function t(key: string, deps: string[] = [], extra: Partial<TaskSpec> = {}): TaskSpec {
  return { key, run: { function: IDENTITY, args: [] }, deps, ...extra };
}

/** Past this many tasks, `checked` validates every VALIDATE_EVERY calls only (validate is O(tasks)). */
const VALIDATE_TASKS_MAX = 2_000;
const VALIDATE_EVERY = 1_000;

/**
 * `s` with `validate()` run after every call of a method (every VALIDATE_EVERY-th once it
 * holds many tasks), so a test's every event is checked against the invariants.
 */
function checked(s: SchedulerTasks): SchedulerTasks {
  let calls = 0;
  return new Proxy(s, {
    get(target, name) {
      const v = Reflect.get(target, name, target);
      if (typeof v !== "function" || name === "validate" || name === "constructor") return v;
      return (...args: unknown[]) => {
        const out = v.apply(target, args);
        if (target.tasks.size <= VALIDATE_TASKS_MAX || ++calls % VALIDATE_EVERY === 0) target.validate();
        return out;
      };
    },
  });
}

/** A state with workers of one thread each (or as given), and nothing to send yet. */
function cluster(
  ...workers: (string | { address: string; name?: string; nthreads?: number })[]
): SchedulerTasks {
  const s = checked(new SchedulerTasks());
  for (const w of workers) s.addWorker(typeof w === "string" ? { address: w } : w);
  assert.deepEqual(s.drain(), []);
  return s;
}

function stateOf(s: SchedulerTasks, key: string): TaskStateName | undefined {
  return s.tasks.get(key)?.state;
}

function computes(out: Outgoing[], address?: string): ComputeTaskArgs[] {
  const found: ComputeTaskArgs[] = [];
  for (const m of out) {
    if (m.to === "worker" && m.op === "compute_task" && (address === undefined || m.address === address)) {
      found.push(m.args);
    }
  }
  return found;
}

/** `{ key: worker }` for every compute_task in `out`. */
function sentTo(out: Outgoing[]): Record<string, string> {
  const found: Record<string, string> = {};
  for (const m of out) {
    if (m.to === "worker" && m.op === "compute_task") {
      assert.ok(!(m.args.key in found), `${m.args.key} sent twice in one batch`);
      found[m.args.key] = m.address;
    }
  }
  return found;
}

/** Keys in free_keys or cancel_task messages (to `address` when given). */
function toWorker(out: Outgoing[], op: "free_keys" | "cancel_task", address?: string): string[] {
  const keys: string[] = [];
  for (const m of out) {
    if (m.to === "worker" && m.op === op && (address === undefined || m.address === address)) {
      keys.push(...m.args.keys);
    }
  }
  return keys.sort();
}

/** Keys of client messages of one kind (to `client` when given), in order. */
function toClient(
  out: Outgoing[],
  op: "key_done" | "key_erred" | "key_cancelled" | "key_lost",
  client?: string,
): string[] {
  const keys: string[] = [];
  for (const m of out) {
    if (m.to === "client" && m.op === op && (client === undefined || m.client === client)) {
      keys.push(m.args.key);
    }
  }
  return keys;
}

/** The arguments of each client message. */
interface ClientArgs {
  key_done: { key: string; nbytes: number; workers: string[] };
  key_erred: { key: string; error: RemoteErrorInfo; task: string };
  key_cancelled: { key: string; reason: string };
  key_lost: { key: string; reason: string };
}

/** The first `op` message about `key` to `client` (duplicates are checked apart). */
function clientMessage<Op extends keyof ClientArgs>(
  out: Outgoing[],
  op: Op,
  client: string,
  key: string,
): ClientArgs[Op] {
  const found = out.find((m) =>
    m.to === "client" && m.op === op && m.client === client && m.args.key === key
  );
  assert.ok(found, `No ${op} for ${key} to ${client} in ${JSON.stringify(out)}`);
  return found.args as unknown as ClientArgs[Op];
}

/** Where `key` is processing. */
function where(s: SchedulerTasks, key: string): string {
  const ws = s.tasks.get(key)?.processingOn;
  assert.ok(ws, `${key} is not processing (it is ${stateOf(s, key)})`);
  return ws.address;
}

/** The one worker holding `key`. */
function holder(s: SchedulerTasks, key: string): string {
  const ws = [...s.tasks.get(key)!.whoHas];
  assert.equal(ws.length, 1);
  return ws[0].address;
}

/** The worker `key` is processing on reports it finished. */
function finish(s: SchedulerTasks, key: string, nbytes = 1, durationS = DEFAULT_DURATION_S): void {
  s.taskFinished(where(s, key), key, nbytes, durationS);
}

/** The worker `key` is processing on reports it threw. */
function fail(s: SchedulerTasks, key: string, error: RemoteErrorInfo = BOOM): void {
  s.taskErred(where(s, key), key, error);
}

/** What the shell does for `client.scatter`: data on workers, wanted, not pinned. */
function scatter(s: SchedulerTasks, client: string, key: string, holders: string[], nbytes = 1): void {
  for (const address of holders) s.addKeys(address, [key], { [key]: nbytes });
  s.updateGraph(client, [], [key]);
  s.tasks.get(key)!.external = false;
}

/** Fills `address` (one thread) with tasks that may run only there. */
function fillUp(s: SchedulerTasks, address: string, prefix = "block"): string[] {
  const keys: string[] = [];
  const nthreads = s.workers.get(address)!.nthreads;
  const room = tasksPerWorker(nthreads, UNKNOWN_US);
  for (let i = 0; i < room; i++) keys.push(`${prefix}-${address}-${i}`);
  s.updateGraph(C3, keys.map((k) => t(k, [], { workers: [address] })), keys);
  assert.equal(computes(s.drain(), address).length, keys.length);
  assert.equal(s.workers.get(address)!.processing.size, room);
  return keys;
}

// ---- names ----

Deno.test("tasks: keyPrefix splits at the last dash", () => {
  assert.equal(keyPrefix("inc-abc-123"), "inc-abc");
  assert.equal(keyPrefix("inc-1"), "inc");
  assert.equal(keyPrefix("single"), "single");
  assert.equal(keyPrefix("-leading"), "-leading");
  assert.equal(keyPrefix("trailing-"), "trailing");
  assert.equal(keyPrefix(""), "");
});

Deno.test("tasks: functionId is stable per function and distinct across functions", () => {
  const s = new SchedulerTasks();
  const a = s.functionId({ source: "(x) => x" });
  const b = s.functionId({ module: "./m.ts", name: "f" });
  assert.notEqual(a, b);
  assert.equal(s.functionId({ source: "(x) => x" }), a);
  assert.equal(s.functionId({ module: "./m.ts", name: "f" }), b);
  assert.notEqual(s.functionId({ module: "./m.ts", name: "g" }), b);
});

// ---- graphs ----

Deno.test("tasks: a task with no dependencies runs at once; with no worker it is queued until one comes", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("inc-1", [], { run: { function: IDENTITY, args: [41] } })], ["inc-1"]);
  const out = s.drain();
  assert.deepEqual(out, [{
    to: "worker",
    address: A,
    op: "compute_task",
    args: { key: "inc-1", fn_id: 1, args: [41], who_has: {}, function: IDENTITY },
  }]);
  assert.equal(stateOf(s, "inc-1"), "processing");
  finish(s, "inc-1", 8);
  assert.deepEqual(s.drain(), [{
    to: "client",
    client: C1,
    op: "key_done",
    args: { key: "inc-1", nbytes: 8, workers: [A] },
  }]);
  assert.equal(stateOf(s, "inc-1"), "memory");
  assert.equal(s.completed, 1);

  const empty = cluster();
  empty.updateGraph(C1, [t("x")], ["x"]);
  assert.deepEqual(empty.drain(), []);
  assert.equal(stateOf(empty, "x"), "queued");
  assert.equal(empty.queued, 1);
  empty.addWorker({ address: B });
  assert.deepEqual(sentTo(empty.drain()), { x: B });
  assert.equal(empty.queued, 0);
});

Deno.test("tasks: a chain runs link by link; intermediates are freed once their dependent finished", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("a"), t("b", ["a"]), t("c", ["b"])], ["c"]);
  assert.deepEqual(sentTo(s.drain()), { a: A });
  assert.equal(stateOf(s, "b"), "waiting");
  assert.equal(stateOf(s, "c"), "waiting");
  assert.deepEqual([...s.tasks.get("b")!.waitingOn].map((d) => d.key), ["a"]);

  finish(s, "a", 10);
  let out = s.drain();
  assert.deepEqual(sentTo(out), { b: A });
  assert.deepEqual(computes(out)[0].who_has, { a: [A] });
  assert.deepEqual(toWorker(out, "free_keys"), [], "a is still needed by b");
  assert.deepEqual(toClient(out, "key_done"), [], "nobody wants a");

  finish(s, "b", 20);
  out = s.drain();
  assert.deepEqual(sentTo(out), { c: A });
  assert.deepEqual(toWorker(out, "free_keys", A), ["a"]);
  // Kept as lineage while its dependent exists, but holding no data.
  assert.equal(stateOf(s, "a"), "released");
  assert.equal(s.tasks.get("a")!.whoHas.size, 0);
  assert.equal(s.workers.get(A)!.nbytes, 20);

  finish(s, "c", 30);
  out = s.drain();
  assert.deepEqual(clientMessage(out, "key_done", C1, "c"), { key: "c", nbytes: 30, workers: [A] });
  assert.deepEqual(toWorker(out, "free_keys", A), ["b"]);
  assert.equal(s.workers.get(A)!.nbytes, 30);

  s.releaseKeys(C1, ["c"]);
  assert.deepEqual(toWorker(s.drain(), "free_keys", A), ["c"]);
  assert.equal(s.tasks.size, 0, `left: ${[...s.tasks.keys()]}`);
  assert.equal(s.workers.get(A)!.nbytes, 0);
  assert.equal(s.completed, 3);
});

Deno.test("tasks: a task whose dependencies are in memory runs at once, with who_has", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("x")], ["x"]);
  s.drain();
  finish(s, "x", 5);
  s.drain();
  s.updateGraph(C1, [t("y", ["x"])], ["y"]);
  const out = s.drain();
  assert.deepEqual(sentTo(out), { y: A });
  assert.deepEqual(computes(out)[0].who_has, { x: [A] });
});

Deno.test("tasks: a diamond runs the join once both sides are done, and frees the root after both", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("a"), t("b", ["a"]), t("c", ["a"]), t("d", ["b", "c"])], ["d"]);
  assert.deepEqual(Object.keys(sentTo(s.drain())), ["a"]);
  finish(s, "a");
  assert.deepEqual(Object.keys(sentTo(s.drain())).sort(), ["b", "c"]);
  finish(s, "b");
  let out = s.drain();
  assert.deepEqual(sentTo(out), {});
  assert.deepEqual(toWorker(out, "free_keys"), [], "a is still needed by c");
  assert.equal(stateOf(s, "d"), "waiting");
  assert.deepEqual([...s.tasks.get("d")!.waitingOn].map((x) => x.key), ["c"]);
  finish(s, "c");
  out = s.drain();
  assert.deepEqual(toWorker(out, "free_keys"), ["a"]);
  assert.deepEqual(Object.keys(sentTo(out)), ["d"]);
  assert.deepEqual(Object.keys(computes(out)[0].who_has).sort(), ["b", "c"]);
  finish(s, "d");
  out = s.drain();
  assert.deepEqual(toClient(out, "key_done"), ["d"]);
  assert.deepEqual(toWorker(out, "free_keys"), ["b", "c"]);
});

Deno.test("tasks: fan-out and fan-in: all leaves run together, the sum waits for every leaf", () => {
  const s = cluster(A, B);
  const leaves = [0, 1, 2, 3, 4].map((i) => `leaf-${i}`);
  s.updateGraph(C1, [t("root"), ...leaves.map((k) => t(k, ["root"])), t("sum", leaves)], ["sum"]);
  assert.deepEqual(Object.keys(sentTo(s.drain())), ["root"]);
  finish(s, "root");
  assert.deepEqual(Object.keys(sentTo(s.drain())).sort(), leaves);
  for (const [i, leaf] of leaves.entries()) {
    assert.equal(stateOf(s, "sum"), "waiting");
    assert.equal(s.tasks.get("sum")!.waitingOn.size, leaves.length - i);
    finish(s, leaf);
    const out = s.drain();
    if (i < leaves.length - 1) assert.deepEqual(sentTo(out), {});
    else {
      assert.deepEqual(Object.keys(sentTo(out)), ["sum"]);
      assert.deepEqual(toWorker(out, "free_keys"), ["root"]);
    }
  }
  finish(s, "sum");
  const out = s.drain();
  assert.deepEqual(toClient(out, "key_done"), ["sum"]);
  assert.deepEqual(toWorker(out, "free_keys"), leaves);
});

Deno.test("tasks: clients wanting the same pure key share one task, and each hears key_done", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("a"), t("x", ["a"])], ["x"]);
  assert.deepEqual(Object.keys(sentTo(s.drain())), ["a"]);
  s.updateGraph(C2, [t("a"), t("x", ["a"]), t("y", ["a"])], ["x", "y"]);
  assert.deepEqual(sentTo(s.drain()), {}, "nothing runs twice");
  finish(s, "a");
  assert.deepEqual(Object.keys(sentTo(s.drain())).sort(), ["x", "y"]);
  finish(s, "x", 3);
  const out = s.drain();
  assert.deepEqual(toClient(out, "key_done", C1), ["x"]);
  assert.deepEqual(toClient(out, "key_done", C2), ["x"]);
  // A third client asking for a key in memory hears at once, and alone.
  s.updateGraph(C3, [t("x", ["a"])], ["x"]);
  const late = s.drain();
  assert.deepEqual(late, [{
    to: "client",
    client: C3,
    op: "key_done",
    args: { key: "x", nbytes: 3, workers: [holder(s, "x")] },
  }]);
  // Releasing one client's want keeps the key for the others.
  s.releaseKeys(C1, ["x"]);
  s.releaseKeys(C3, ["x"]);
  assert.deepEqual(s.drain(), []);
  assert.equal(stateOf(s, "x"), "memory");
  s.releaseKeys(C2, ["x"]);
  assert.ok(toWorker(s.drain(), "free_keys").includes("x"));
  assert.equal(s.tasks.has("x"), false);
});

// ---- placement ----

Deno.test("tasks: a task goes to the worker holding the most bytes of its inputs", () => {
  for (const order of [[A, B], [B, A]]) {
    const s = cluster(...order);
    s.updateGraph(C1, [t("big", [], { workers: [A] }), t("small", [], { workers: [B] })], ["big", "small"]);
    s.drain();
    finish(s, "big", 1e9);
    finish(s, "small", 10);
    s.drain();
    for (let i = 0; i < 4; i++) {
      s.updateGraph(C1, [t(`z-${i}`, ["big", "small"])], [`z-${i}`]);
      const out = s.drain();
      assert.deepEqual(sentTo(out), { [`z-${i}`]: A });
      assert.deepEqual(computes(out)[0].who_has, { big: [A], small: [B] });
    }
    s.updateGraph(C1, [t("w-0", ["small"])], ["w-0"]);
    assert.deepEqual(sentTo(s.drain()), { "w-0": B });
  }
});

Deno.test("tasks: data locality is weighed against load: a small input moves to an idle worker", () => {
  const s = cluster(A, B);
  // Teach it that z tasks take 10 s.
  s.updateGraph(C1, [t("z-0", [], { workers: [A] })], ["z-0"]);
  s.drain();
  finish(s, "z-0", 1, 10);
  assert.equal(s.durations.get("z"), 10);
  s.updateGraph(C1, [t("x", [], { workers: [A] })], ["x"]);
  s.drain();
  finish(s, "x", 1000);
  s.updateGraph(C1, [0, 1, 2].map((i) => t(`slow-${i}`, [], { workers: [A] })), []);
  s.drain();
  assert.equal(s.workers.get(A)!.processing.size, 3);
  s.updateGraph(C1, [t("z-1", ["x"])], ["z-1"]);
  const out = s.drain();
  assert.deepEqual(sentTo(out), { "z-1": B });
  assert.deepEqual(computes(out)[0].who_has, { x: [A] });
  // Durations are a moving average.
  finish(s, "z-1", 1, 20);
  assert.equal(s.durations.get("z"), 10 * 0.8 + 20 * 0.2);
});

Deno.test("tasks: restrictions by address and by name are honoured", () => {
  const s = cluster({ address: A, name: "alice" }, { address: B, name: "bob" });
  for (let i = 0; i < 4; i++) {
    s.updateGraph(C1, [t(`bob-${i}`, [], { workers: ["bob"] }), t(`a-${i}`, [], { workers: [A] })], []);
    assert.deepEqual(sentTo(s.drain()), { [`bob-${i}`]: B, [`a-${i}`]: A });
  }
  // Either of two allowed workers.
  s.updateGraph(C1, [t("either", [], { workers: ["nobody", "alice", B] })], []);
  assert.ok([A, B].includes(sentTo(s.drain()).either));
});

Deno.test("tasks: a restricted task with no matching worker stays queued until one is added", () => {
  const s = cluster({ address: A, name: "alice" }, { address: B, name: "bob" });
  s.updateGraph(C1, [t("r", [], { workers: ["carol"] }), t("free")], ["r", "free"]);
  assert.deepEqual(Object.keys(sentTo(s.drain())), ["free"]);
  assert.equal(stateOf(s, "r"), "queued");
  assert.equal(s.queued, 1);
  finish(s, "free");
  assert.deepEqual(sentTo(s.drain()), {}, "free workers do not take it");
  assert.equal(stateOf(s, "r"), "queued");
  s.addWorker({ address: "tcp://d:1", name: "dave" });
  assert.deepEqual(sentTo(s.drain()), {});
  s.addWorker({ address: C, name: "carol" });
  assert.deepEqual(sentTo(s.drain()), { r: C });
  assert.equal(s.queued, 0);
  finish(s, "r");
  assert.deepEqual(toClient(s.drain(), "key_done"), ["r"]);
});

Deno.test("tasks: a restricted task waits for its full worker rather than going to an idle one", () => {
  const s = cluster(A, B);
  const blocks = fillUp(s, A);
  s.updateGraph(C1, [t("r", [], { workers: [A] })], ["r"]);
  assert.deepEqual(s.drain(), []);
  assert.equal(stateOf(s, "r"), "queued");
  finish(s, blocks[0]);
  assert.deepEqual(sentTo(s.drain()), { r: A });
});

// ---- no flooding, queueing, priorities ----

Deno.test("tasks: a worker gets nthreads + WORKER_EXTRA_TASKS tasks, or WORKER_AHEAD_MS of work a thread if more; the rest are queued", () => {
  const s = cluster(A);
  const room = ROOM_1;
  assert.equal(room, 1 + WORKER_EXTRA_TASKS);
  const keys = Array.from({ length: room + 11 }, (_, i) => `t-${i}`);
  s.updateGraph(C1, keys.map((k) => t(k)), keys);
  const first = Object.keys(sentTo(s.drain()));
  assert.deepEqual(first, keys.slice(0, room));
  assert.equal(s.queued, keys.length - room);
  assert.deepEqual(s.progress(), { t: { processing: room, queued: keys.length - room } });
  const sent = new Set(first);
  while (sent.size < keys.length || s.workers.get(A)!.processing.size > 0) {
    const next = [...s.workers.get(A)!.processing.keys()][0];
    finish(s, next.key);
    const more = Object.keys(sentTo(s.drain()));
    assert.ok(more.length <= 1, `one finished, ${more.length} sent`);
    for (const k of more) {
      assert.ok(!sent.has(k), `${k} sent twice`);
      sent.add(k);
    }
    assert.ok(s.workers.get(A)!.processing.size <= room);
  }
  assert.equal(sent.size, keys.length);
  assert.ok(keys.every((k) => stateOf(s, k) === "memory"));

  const two = cluster({ address: A, nthreads: 2 }, { address: B, nthreads: 1 });
  const roomA = tasksPerWorker(2, UNKNOWN_US);
  assert.equal(roomA, 2 * (1 + WORKER_AHEAD_MS));
  const many = Array.from({ length: roomA + ROOM_1 + 5 }, (_, i) => `m-${i}`);
  two.updateGraph(C1, many.map((k) => t(k)), many);
  const sentTwo = sentTo(two.drain());
  assert.equal(Object.values(sentTwo).filter((w) => w === A).length, roomA);
  assert.equal(Object.values(sentTwo).filter((w) => w === B).length, ROOM_1);
  assert.equal(two.queued, 5);
});

Deno.test("tasks: tiny tasks go hundreds ahead per thread, long ones WORKER_EXTRA_TASKS ahead, no more", () => {
  // Tiny: a kind known to take 2 us counts as TASK_OVERHEAD_US, ~500 a thread.
  const s = cluster({ address: A, nthreads: 2 });
  s.updateGraph(C1, [t("tiny-0")], ["tiny-0"]);
  s.drain();
  finish(s, "tiny-0", 1, 0.000002);
  const tiny = Array.from({ length: 1_500 }, (_, i) => `tiny-${i + 1}`);
  s.updateGraph(C1, tiny.map((k) => t(k)), tiny);
  const held = tasksPerWorker(2, 2);
  assert.ok(held >= 2 * 400 && held <= 2 * WORKER_TASKS_PER_THREAD_MAX, `${held} tiny tasks held`);
  assert.equal(computes(s.drain(), A).length, held);
  assert.equal(s.queued, tiny.length - held);
  // A task that finishes makes room for one more, not a flood.
  finish(s, "tiny-1", 1, 0.000002);
  assert.equal(computes(s.drain(), A).length, 1);

  // Long: a kind known to take 1 s gets no more than the fixed allowance.
  const l = cluster(A);
  l.updateGraph(C1, [t("long-0")], ["long-0"]);
  l.drain();
  finish(l, "long-0", 1, 1);
  const long = Array.from({ length: 40 }, (_, i) => `long-${i + 1}`);
  l.updateGraph(C1, long.map((k) => t(k)), long);
  assert.equal(tasksPerWorker(1, 1e6), 1 + WORKER_EXTRA_TASKS);
  assert.equal(computes(l.drain(), A).length, 1 + WORKER_EXTRA_TASKS);
  assert.equal(l.queued, long.length - 1 - WORKER_EXTRA_TASKS);
  // Past the allowance, work counts: behind 33 s of long tasks, a tiny one waits here.
  l.updateGraph(C1, [t("tiny-x")], ["tiny-x"]);
  assert.deepEqual(l.drain(), []);
  assert.equal(stateOf(l, "tiny-x"), "queued");
});

Deno.test("tasks: queued tasks come out by priority, then by submission order", () => {
  const s = cluster(A);
  const blocks = fillUp(s, A);
  s.updateGraph(C1, [t("lo", [], { priority: -1 }), t("mid-a"), t("hi", [], { priority: 5 })], [
    "lo",
    "mid-a",
    "hi",
  ]);
  s.updateGraph(C1, [t("mid-b"), t("hi-b", [], { priority: 5 })], ["mid-b", "hi-b"]);
  assert.deepEqual(s.drain(), []);
  assert.equal(s.queued, 5);
  const order: string[] = [];
  for (const b of blocks.slice(0, 5)) {
    finish(s, b);
    order.push(...Object.keys(sentTo(s.drain())));
  }
  assert.deepEqual(order, ["hi", "hi-b", "mid-a", "mid-b", "lo"]);
});

Deno.test("tasks: releasing a processing task frees its slot for a queued one", () => {
  const s = cluster(A);
  const keys = Array.from({ length: ROOM_1 + 2 }, (_, i) => `t-${i}`);
  s.updateGraph(C1, keys.map((k) => t(k)), keys);
  assert.equal(computes(s.drain()).length, ROOM_1);
  assert.equal(s.queued, 2);
  s.releaseKeys(C1, ["t-0"]);
  const out = s.drain();
  assert.deepEqual(toWorker(out, "cancel_task", A), ["t-0"]);
  assert.deepEqual(sentTo(out), { [keys[ROOM_1]]: A });
});

// ---- what compute_task carries ----

Deno.test("tasks: compute_task carries who_has of every dependency and sends a function once per worker", () => {
  const s = cluster(A, B);
  const other = { source: "(x) => x + 1" };
  s.updateGraph(C1, [t("x", [], { workers: [A] })], ["x"]);
  let out = s.drain();
  assert.deepEqual(computes(out)[0].function, IDENTITY);
  finish(s, "x", 8);
  s.addKeys(B, ["x"]);
  assert.equal(s.tasks.get("x")!.nbytes, 8);
  assert.equal(s.workers.get(B)!.nbytes, 8);
  s.drain();

  s.updateGraph(C1, [t("y", ["x"], { workers: [A] })], ["y"]);
  out = s.drain();
  let args = computes(out, A)[0];
  assert.deepEqual(args, { key: "y", fn_id: 1, args: [], who_has: { x: [A, B] }, nbytes: { x: 8 } });
  assert.ok(!("function" in args), "A knows function 1");

  s.updateGraph(C1, [t("y2", ["x"], { workers: [B] })], ["y2"]);
  args = computes(s.drain(), B)[0];
  assert.deepEqual(args.function, IDENTITY, "B's first task of function 1");
  assert.deepEqual(args.who_has, { x: [A, B] });

  s.updateGraph(C1, [t("g", [], { workers: [A], run: { function: other, args: [1] } })], ["g"]);
  args = computes(s.drain(), A)[0];
  assert.deepEqual(args.function, other);
  assert.equal(args.fn_id, 2);

  // A worker that registers again has forgotten every function: the tasks it was
  // running come back to it with their functions.
  s.addWorker({ address: A });
  const again = computes(s.drain(), A);
  assert.deepEqual(again.map((a) => [a.key, a.function]), [["y", IDENTITY], ["g", other]]);
  s.updateGraph(C1, [t("h", [], { workers: [A] })], ["h"]);
  assert.equal(computes(s.drain(), A)[0].function, undefined);
});

// ---- errors ----

Deno.test("tasks: an error errs the task and its dependents with the original error; others go on", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("a"), t("b", ["a"]), t("c", ["b"]), t("u")], ["c", "u"]);
  s.updateGraph(C2, [t("b", ["a"])], ["b"]);
  assert.deepEqual(Object.keys(sentTo(s.drain())).sort(), ["a", "u"]);
  fail(s, "a");
  const out = s.drain();
  for (const k of ["a", "b", "c"]) {
    assert.equal(stateOf(s, k), "erred", k);
    assert.deepEqual(s.tasks.get(k)!.error, BOOM);
    assert.equal(s.tasks.get(k)!.erredOn, "a");
  }
  assert.deepEqual(clientMessage(out, "key_erred", C1, "c"), { key: "c", error: BOOM, task: "a" });
  assert.deepEqual(clientMessage(out, "key_erred", C2, "b"), { key: "b", error: BOOM, task: "a" });
  assert.equal(toClient(out, "key_erred").length, 2, "a is wanted by nobody, b and c once each");
  assert.equal(s.failed, 1);
  assert.equal(stateOf(s, "u"), "processing");
  finish(s, "u");
  assert.deepEqual(toClient(s.drain(), "key_done", C1), ["u"]);
  // Erred keys are forgotten once released.
  s.releaseKeys(C1, ["c", "u"]);
  assert.equal(stateOf(s, "a"), "erred", "b still wanted");
  s.removeClient(C2);
  s.drain();
  assert.equal(s.tasks.size, 0, `left: ${[...s.tasks.keys()]}`);
});

Deno.test("tasks: in a diamond, the join errs once, naming the root", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("a"), t("b", ["a"]), t("c", ["a"]), t("d", ["b", "c"])], ["d", "b"]);
  s.drain();
  fail(s, "a");
  const out = s.drain();
  assert.deepEqual(toClient(out, "key_erred", C1).sort(), ["b", "d"]);
  assert.equal(clientMessage(out, "key_erred", C1, "d").task, "a");
});

Deno.test("tasks: an error in one side of a diamond cancels the other side's pending work", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("a"), t("b", ["a"]), t("c", ["a"]), t("d", ["b", "c"])], ["d"]);
  s.drain();
  finish(s, "a");
  s.drain();
  const cWorker = where(s, "c");
  fail(s, "b");
  const out = s.drain();
  assert.deepEqual(clientMessage(out, "key_erred", C1, "d"), { key: "d", error: BOOM, task: "b" });
  // c is needed by nobody now: it is cancelled, and a is freed.
  assert.deepEqual(toWorker(out, "cancel_task", cWorker), ["c"]);
  assert.deepEqual(toWorker(out, "free_keys"), ["a"]);
});

Deno.test("tasks: retries run a task again before it errs; a retry may succeed", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("r", [], { retries: 2 })], ["r"]);
  assert.deepEqual(sentTo(s.drain()), { r: A });
  fail(s, "r");
  let out = s.drain();
  assert.deepEqual(sentTo(out), { r: A });
  assert.deepEqual(toClient(out, "key_erred"), []);
  assert.equal(s.tasks.get("r")!.retries, 1);
  fail(s, "r");
  assert.deepEqual(sentTo(s.drain()), { r: A });
  fail(s, "r", { name: "Error", message: "third" });
  out = s.drain();
  assert.deepEqual(sentTo(out), {});
  assert.deepEqual(clientMessage(out, "key_erred", C1, "r").error, { name: "Error", message: "third" });
  assert.equal(stateOf(s, "r"), "erred");
  assert.equal(s.failed, 1);

  s.updateGraph(C1, [t("ok", [], { retries: 1 })], ["ok"]);
  s.drain();
  fail(s, "ok");
  s.drain();
  finish(s, "ok");
  assert.deepEqual(toClient(s.drain(), "key_done"), ["ok"]);
  assert.equal(s.failed, 1);
});

Deno.test("tasks: resubmitting an erred key runs it again (and its dependents)", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("x"), t("y", ["x"])], ["y"]);
  s.drain();
  fail(s, "x");
  assert.deepEqual(toClient(s.drain(), "key_erred"), ["y"]);
  s.updateGraph(C1, [t("x")], ["x"]);
  assert.deepEqual(sentTo(s.drain()), { x: A });
  assert.equal(stateOf(s, "x"), "processing");
  assert.equal(stateOf(s, "y"), "erred", "y was not resubmitted");
  finish(s, "x");
  assert.deepEqual(toClient(s.drain(), "key_done"), ["x"]);
  s.updateGraph(C1, [t("x"), t("y", ["x"])], ["y"]);
  assert.deepEqual(sentTo(s.drain()), { y: A });
  finish(s, "y");
  assert.deepEqual(toClient(s.drain(), "key_done"), ["y"]);
});

Deno.test("tasks: a dependency that nobody has errs the task at once, naming the missing key", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("y", ["nope"]), t("z", ["y"])], ["z"]);
  const out = s.drain();
  assert.deepEqual(sentTo(out), {});
  const msg = clientMessage(out, "key_erred", C1, "z");
  assert.equal(msg.task, "nope");
  assert.equal(msg.error.name, "MissingDataError");
  assert.match(msg.error.message, /Unknown key "nope"/);
  assert.equal(stateOf(s, "y"), "erred");
  s.releaseKeys(C1, ["z"]);
  assert.equal(s.tasks.size, 0, `left: ${[...s.tasks.keys()]}`);
});

Deno.test("tasks: a task submitted on top of an erred key errs at once with the origin", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("x")], ["x"]);
  s.drain();
  fail(s, "x");
  s.drain();
  s.updateGraph(C2, [t("y", ["x"])], ["y"]);
  const out = s.drain();
  assert.deepEqual(sentTo(out), {});
  assert.deepEqual(clientMessage(out, "key_erred", C2, "y"), { key: "y", error: BOOM, task: "x" });
  // A second client wanting the erred key itself hears so at once.
  s.updateGraph(C3, [], ["x"]);
  assert.deepEqual(clientMessage(s.drain(), "key_erred", C3, "x").task, "x");
});

Deno.test("regression: a task that errs inside updateGraph is reported to its client once, not twice", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("y", ["nope"])], ["y"]);
  assert.deepEqual(toClient(s.drain(), "key_erred", C1), ["y"]);

  s.updateGraph(C1, [t("x")], ["x"]);
  s.drain();
  fail(s, "x");
  s.drain();
  s.updateGraph(C2, [t("z", ["x"])], ["z"]);
  assert.deepEqual(toClient(s.drain(), "key_erred", C2), ["z"]);
});

Deno.test("tasks: taskErred from a worker the task is not processing on is ignored", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("x", [], { workers: [A] })], ["x"]);
  s.drain();
  s.taskErred(B, "x", BOOM);
  s.taskErred("tcp://nobody:1", "x", BOOM);
  s.taskErred(A, "unknown", BOOM);
  assert.deepEqual(s.drain(), []);
  assert.equal(stateOf(s, "x"), "processing");
  assert.equal(s.failed, 0);
  finish(s, "x");
  s.drain();
  s.taskErred(A, "x", BOOM);
  assert.deepEqual(s.drain(), []);
  assert.equal(stateOf(s, "x"), "memory");
});

// ---- release ----

Deno.test("tasks: releasing a wanted key in memory frees it on every holder and forgets it", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("x", [], { workers: [A] })], ["x"]);
  s.drain();
  finish(s, "x", 40);
  s.addKeys(B, ["x"]);
  s.drain();
  s.releaseKeys(C1, ["x", "unknown"]);
  s.releaseKeys(C2, ["x"]); // never wanted it: no effect
  const out = s.drain();
  assert.deepEqual(toWorker(out, "free_keys", A), ["x"]);
  assert.deepEqual(toWorker(out, "free_keys", B), ["x"]);
  assert.equal(s.tasks.has("x"), false);
  assert.equal(s.workers.get(A)!.nbytes, 0);
  assert.equal(s.workers.get(B)!.nbytes, 0);
  assert.deepEqual(s.hasWhatOf(), { [A]: [], [B]: [] });
});

Deno.test("tasks: a released key still needed by a waiting dependent is kept until the dependent finished", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("a"), t("slow"), t("b", ["a", "slow"])], ["a", "b"]);
  s.drain();
  finish(s, "a");
  s.drain();
  s.releaseKeys(C1, ["a"]);
  assert.deepEqual(s.drain(), [], "b still needs a");
  assert.equal(stateOf(s, "a"), "memory");
  finish(s, "slow");
  assert.deepEqual(sentTo(s.drain()), { b: A });
  finish(s, "b");
  const out = s.drain();
  assert.deepEqual(toWorker(out, "free_keys"), ["a", "slow"]);
  assert.deepEqual(toClient(out, "key_done"), ["b"]);
  s.releaseKeys(C1, ["b"]);
  s.drain();
  assert.equal(s.tasks.size, 0, `left: ${[...s.tasks.keys()]}`);
});

Deno.test("tasks: releasing a processing key cancels it on its worker; a late task_finished frees the result there", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("x")], ["x"]);
  s.drain();
  s.releaseKeys(C1, ["x"]);
  assert.deepEqual(s.drain(), [{ to: "worker", address: A, op: "cancel_task", args: { keys: ["x"] } }]);
  assert.equal(s.tasks.has("x"), false);
  assert.equal(s.workers.get(A)!.processing.size, 0);
  s.taskFinished(A, "x", 1, 0.001);
  assert.deepEqual(toWorker(s.drain(), "free_keys", A), ["x"]);
  assert.equal(s.workers.get(A)!.hasWhat.size, 0);
  assert.equal(s.completed, 0);
});

Deno.test("tasks: releasing a waiting key cancels the dependencies only it needed", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("a"), t("shared"), t("b", ["a", "shared"])], ["b"]);
  s.updateGraph(C2, [t("shared")], ["shared"]);
  s.drain();
  s.releaseKeys(C1, ["b"]);
  const out = s.drain();
  assert.deepEqual(toWorker(out, "cancel_task", A), ["a"]);
  assert.equal(s.tasks.has("a"), false);
  assert.equal(s.tasks.has("b"), false);
  assert.equal(stateOf(s, "shared"), "processing");
  assert.equal(s.tasks.get("shared")!.dependents.size, 0);
});

Deno.test("tasks: releasing a queued key drops it; the queue moves on to the next", () => {
  const s = cluster(A);
  const blocks = fillUp(s, A);
  s.updateGraph(C1, [t("q1"), t("q2")], ["q1", "q2"]);
  s.releaseKeys(C1, ["q1"]);
  assert.deepEqual(s.drain(), []);
  assert.equal(s.tasks.has("q1"), false);
  finish(s, blocks[0]);
  assert.deepEqual(sentTo(s.drain()), { q2: A });
  finish(s, blocks[1]);
  assert.deepEqual(sentTo(s.drain()), {});
});

Deno.test("regression: queued counts only tasks still queued (not ones released, cancelled or erred)", () => {
  const s = cluster(A);
  fillUp(s, A);
  s.updateGraph(C1, [t("q1"), t("q2"), t("q3"), t("q4", ["q3"])], ["q1", "q2", "q4"]);
  assert.equal(s.queued, 3);
  s.releaseKeys(C1, ["q1"]);
  s.cancelKeys(["q2"]);
  assert.equal(s.queued, 1, "only q3 is still queued");
});

// ---- cancel ----

Deno.test("tasks: cancelKeys tells every wanting client, cancels dependents and running work, and forgets", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("a"), t("b", ["a"]), t("c", ["b"]), t("u")], ["a", "c", "u"]);
  s.updateGraph(C2, [t("a"), t("b", ["a"])], ["a", "b"]);
  s.drain();
  s.cancelKeys(["a", "unknown"]);
  const out = s.drain();
  assert.deepEqual(toClient(out, "key_cancelled", C1).sort(), ["a", "c"]);
  assert.deepEqual(toClient(out, "key_cancelled", C2).sort(), ["a", "b"]);
  assert.equal(clientMessage(out, "key_cancelled", C1, "a").reason, "cancelled");
  assert.deepEqual(toWorker(out, "cancel_task", A), ["a"]);
  for (const k of ["a", "b", "c"]) assert.equal(s.tasks.has(k), false, k);
  assert.equal(stateOf(s, "u"), "processing");
  finish(s, "u");
  assert.deepEqual(toClient(s.drain(), "key_done"), ["u"]);
});

Deno.test("tasks: cancelling a key in memory frees it and cancels dependents queued on it", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("x")], ["x"]);
  s.drain();
  finish(s, "x");
  s.drain();
  const blocks = fillUp(s, A);
  s.updateGraph(C1, [t("d", ["x"]), t("r", ["x"], { workers: [A] })], ["d"]);
  s.updateGraph(C2, [t("r", ["x"], { workers: [A] })], ["r"]);
  assert.deepEqual(s.drain(), []);
  assert.equal(stateOf(s, "d"), "queued");
  assert.equal(stateOf(s, "r"), "queued");
  s.cancelKeys(["x"]);
  const out = s.drain();
  assert.deepEqual(toClient(out, "key_cancelled", C1).sort(), ["d", "x"]);
  assert.deepEqual(toClient(out, "key_cancelled", C2), ["r"]);
  assert.deepEqual(toWorker(out, "free_keys", A), ["x"]);
  for (const k of ["x", "d", "r"]) assert.equal(s.tasks.has(k), false, k);
  for (const b of blocks) {
    finish(s, b);
    assert.deepEqual(sentTo(s.drain()), {});
  }
});

// ---- clients leaving ----

Deno.test("tasks: a client leaving mid-graph releases what only it wanted; shared keys go on", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("a"), t("b", ["a"]), t("c", ["b"]), t("s")], ["c", "s"]);
  s.updateGraph(C2, [t("s"), t("e", ["s"])], ["e"]);
  s.drain();
  finish(s, "a");
  s.drain();
  const bWorker = where(s, "b");
  s.removeClient(C1);
  const out = s.drain();
  assert.deepEqual(toWorker(out, "cancel_task", bWorker), ["b"]);
  assert.deepEqual(toWorker(out, "free_keys"), ["a"]);
  assert.equal(out.filter((m) => m.to === "client").length, 0);
  for (const k of ["a", "b", "c"]) assert.equal(s.tasks.has(k), false, k);
  assert.equal(stateOf(s, "s"), "processing", "C2's e needs s");
  finish(s, "s");
  assert.deepEqual(Object.keys(sentTo(s.drain())), ["e"]);
  finish(s, "e");
  assert.deepEqual(toClient(s.drain(), "key_done", C2), ["e"]);
  s.removeClient(C2);
  s.drain();
  assert.equal(s.tasks.size, 0, `left: ${[...s.tasks.keys()]}`);
  assert.deepEqual(s.progress(), {});
});

// ---- workers leaving ----

Deno.test("tasks: tasks processing on a worker that leaves run elsewhere, or wait for a new worker", () => {
  const s = cluster(A, B);
  const keys = [0, 1, 2, 3].map((i) => `p-${i}`);
  s.updateGraph(C1, keys.map((k) => t(k)), keys);
  const first = sentTo(s.drain());
  const onA = keys.filter((k) => first[k] === A).sort();
  assert.ok(onA.length > 0 && onA.length < keys.length, JSON.stringify(first));
  assert.deepEqual(s.removeWorker(A), []);
  const out = s.drain();
  assert.deepEqual(Object.keys(sentTo(out)).sort(), onA);
  assert.ok(Object.values(sentTo(out)).every((w) => w === B));
  for (const k of keys) assert.equal(where(s, k), B);

  s.removeWorker(B);
  assert.deepEqual(s.drain(), []);
  assert.ok(keys.every((k) => stateOf(s, k) === "queued"));
  s.addWorker({ address: C });
  const again = s.drain();
  assert.deepEqual(Object.keys(sentTo(again)).sort(), keys);
  assert.deepEqual(computes(again)[0].function, IDENTITY);
});

Deno.test("tasks: a key whose last copy left is recomputed from lineage; its dependent waits for it again", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("a")], ["a"]);
  s.drain();
  finish(s, "a", 10);
  s.drain();
  s.addWorker({ address: B });
  s.updateGraph(C1, [t("slow", [], { workers: [B] }), t("b", ["a", "slow"])], ["b"]);
  assert.deepEqual(sentTo(s.drain()), { slow: B });
  assert.deepEqual(s.removeWorker(A), ["a"]);
  let out = s.drain();
  assert.deepEqual(sentTo(out), { a: B });
  assert.deepEqual(toClient(out, "key_lost"), [], "a can be recomputed");
  assert.equal(stateOf(s, "b"), "waiting");
  finish(s, "slow");
  assert.deepEqual(sentTo(s.drain()), {}, "b waits for a again");
  finish(s, "a", 10);
  out = s.drain();
  assert.deepEqual(toClient(out, "key_done", C1), ["a"]);
  assert.deepEqual(sentTo(out), { b: B });
  assert.deepEqual(computes(out)[0].who_has, { a: [B], slow: [B] });
  finish(s, "b");
  assert.deepEqual(toClient(s.drain(), "key_done", C1), ["b"]);
});

Deno.test("tasks: a lost key whose inputs were freed recomputes its inputs first", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("a"), t("b", ["a"]), t("c", ["b"])], ["c"]);
  s.drain();
  finish(s, "a");
  finish(s, "b");
  finish(s, "c");
  s.drain();
  assert.equal(stateOf(s, "a"), "released");
  assert.equal(stateOf(s, "b"), "released");
  s.addWorker({ address: B });
  assert.deepEqual(s.removeWorker(A), ["c"]);
  assert.deepEqual(sentTo(s.drain()), { a: B });
  assert.equal(stateOf(s, "b"), "waiting");
  assert.equal(stateOf(s, "c"), "waiting");
  finish(s, "a");
  assert.deepEqual(sentTo(s.drain()), { b: B });
  finish(s, "b");
  const out = s.drain();
  assert.deepEqual(sentTo(out), { c: B });
  assert.deepEqual(toWorker(out, "free_keys"), ["a"]);
  finish(s, "c");
  assert.deepEqual(toClient(s.drain(), "key_done", C1), ["c"]);
});

Deno.test("tasks: scattered data whose last copy left is lost: key_lost, erred, dependents erred", () => {
  const s = cluster(A, B);
  scatter(s, C1, "x", [A], 4);
  assert.deepEqual(toClient(s.drain(), "key_done", C1), ["x"]);
  s.updateGraph(C1, [t("slow", [], { workers: [B] }), t("y", ["x", "slow"])], ["y"]);
  s.updateGraph(C2, [t("z", ["y"])], ["z"]);
  s.drain();
  assert.deepEqual(s.removeWorker(A), ["x"]);
  const out = s.drain();
  assert.match(clientMessage(out, "key_lost", C1, "x").reason, /tcp:\/\/a:1/);
  assert.equal(clientMessage(out, "key_erred", C1, "x").error.name, "MissingDataError");
  assert.equal(clientMessage(out, "key_erred", C1, "y").task, "x");
  assert.equal(clientMessage(out, "key_erred", C2, "z").task, "x");
  assert.equal(toClient(out, "key_erred").length, 3);
  assert.deepEqual(sentTo(out), {});
  assert.deepEqual(toWorker(out, "cancel_task", B), ["slow"], "nobody needs slow any more");
  for (const k of ["x", "y", "z"]) assert.equal(stateOf(s, k), "erred", k);
});

Deno.test("tasks: external data that is lost errs its dependents; unneeded external data is just dropped", () => {
  const s = cluster(A, B);
  s.addKeys(A, ["ext", "spare"]);
  s.updateGraph(C1, [t("slow", [], { workers: [B] }), t("y", ["ext", "slow"])], ["y"]);
  s.drain();
  assert.deepEqual(s.removeWorker(A).sort(), ["ext", "spare"]);
  const out = s.drain();
  assert.deepEqual(toClient(out, "key_lost"), [], "nobody wanted ext itself");
  assert.equal(clientMessage(out, "key_erred", C1, "y").task, "ext");
  assert.equal(s.tasks.has("spare"), false);
});

Deno.test("tasks: a key with another replica is not recomputed when a holder leaves", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("x", [], { workers: [A] })], ["x"]);
  s.drain();
  finish(s, "x", 5);
  s.addKeys(B, ["x"]);
  s.drain();
  assert.deepEqual(s.removeWorker(A), []);
  assert.deepEqual(s.drain(), []);
  assert.equal(stateOf(s, "x"), "memory");
  assert.deepEqual(s.whoHasOf(["x"]), { x: [B] });
  s.updateGraph(C1, [t("y", ["x"])], ["y"]);
  const out = s.drain();
  assert.deepEqual(sentTo(out), { y: B });
  assert.deepEqual(computes(out)[0].who_has, { x: [B] });
});

Deno.test("tasks: removeKeys drops unwanted external data, recomputes computed keys, loses scattered ones", () => {
  const s = cluster(A);
  s.addKeys(A, ["ext"], { ext: 7 });
  s.removeKeys(A, ["ext"]);
  assert.equal(s.tasks.has("ext"), false);
  assert.equal(s.workers.get(A)!.nbytes, 0);

  s.updateGraph(C1, [t("x")], ["x"]);
  s.drain();
  finish(s, "x");
  s.drain();
  s.removeKeys(A, ["x"]);
  assert.deepEqual(sentTo(s.drain()), { x: A });

  scatter(s, C1, "sc", [A]);
  s.drain();
  s.removeKeys(A, ["sc"]);
  const out = s.drain();
  assert.match(clientMessage(out, "key_lost", C1, "sc").reason, /deleted it/);
  assert.deepEqual(toClient(out, "key_erred", C1), ["sc"]);
});

// ---- stale events ----

Deno.test("tasks: task_finished from a worker the task is not processing on only frees the result there", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("x", [], { workers: [A] })], ["x"]);
  s.drain();
  s.taskFinished(B, "x", 1, 0.001);
  s.taskFinished("tcp://nobody:1", "x", 1, 0.001);
  s.taskFinished(A, "unknown", 1, 0.001);
  const out = s.drain();
  assert.deepEqual(toWorker(out, "free_keys", B), ["x"]);
  assert.deepEqual(toWorker(out, "free_keys", A), ["unknown"]);
  assert.equal(out.length, 2);
  assert.equal(stateOf(s, "x"), "processing");
  assert.equal(s.workers.get(B)!.hasWhat.size, 0);
  assert.equal(s.tasks.has("unknown"), false);
  s.taskFinished(A, "x", 1, 0.001);
  assert.deepEqual(toClient(s.drain(), "key_done"), ["x"]);
  s.taskFinished(A, "x", 1, 0.001);
  assert.deepEqual(s.drain(), [], "a duplicate is ignored");
  assert.equal(s.completed, 1);
  assert.equal(s.workers.get(A)!.nbytes, 1);
});

Deno.test("tasks: a worker that left and came back cannot finish the task that moved away", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("x", [], { workers: [A, B] })], ["x"]);
  const first = sentTo(s.drain()).x;
  const other = first === A ? B : A;
  s.removeWorker(first);
  assert.deepEqual(sentTo(s.drain()), { x: other });
  s.addWorker({ address: first });
  s.drain();
  s.taskFinished(first, "x", 1, 0.001);
  assert.deepEqual(toWorker(s.drain(), "free_keys", first), ["x"]);
  assert.equal(where(s, "x"), other);
  finish(s, "x");
  assert.deepEqual(toClient(s.drain(), "key_done"), ["x"]);
});

// ---- external data ----

Deno.test("tasks: external data is never released by refcounting, only by deleteKeys", () => {
  const s = cluster(A, B);
  s.addKeys(A, ["ext"], { ext: 100 });
  s.addKeys(B, ["ext"]);
  const ext = s.tasks.get("ext")!;
  assert.equal(ext.state, "memory");
  assert.equal(ext.external, true);
  assert.equal(ext.run, null);
  assert.equal(s.workers.get(B)!.nbytes, 100);
  s.updateGraph(C1, [t("use", ["ext"])], ["use"]);
  let out = s.drain();
  assert.deepEqual(computes(out)[0].who_has, { ext: [A, B] });
  finish(s, "use");
  out = s.drain();
  assert.deepEqual(toWorker(out, "free_keys"), []);
  s.releaseKeys(C1, ["use"]);
  s.updateGraph(C2, [], ["ext"]);
  assert.deepEqual(toClient(s.drain(), "key_done", C2), ["ext"]);
  s.releaseKeys(C2, ["ext"]);
  s.removeClient(C2);
  assert.ok(!toWorker(s.drain(), "free_keys").includes("ext"));
  assert.equal(stateOf(s, "ext"), "memory");

  const orders = s.deleteKeys(["ext", "unknown"]);
  assert.deepEqual([...orders].sort(), [[A, ["ext"]], [B, ["ext"]]]);
  assert.deepEqual(s.drain(), [], "the shell tells holders itself, through the orders");
  assert.equal(s.tasks.has("ext"), false);
  assert.equal(s.workers.get(A)!.nbytes, 0);
  assert.equal(s.workers.get(B)!.nbytes, 0);
});

Deno.test("tasks: deleteKeys of a key with dependents cancels the pending ones, keeps finished ones", () => {
  const s = cluster(A);
  s.addKeys(A, ["ext"]);
  s.updateGraph(C1, [t("m", ["ext"])], ["m"]);
  s.drain();
  finish(s, "m");
  s.drain();
  s.updateGraph(C1, [t("p", ["ext"]), t("w", ["p"])], ["w"]);
  s.updateGraph(C2, [t("p", ["ext"])], ["p"]);
  s.drain();
  const orders = s.deleteKeys(["ext"]);
  assert.deepEqual([...orders], [[A, ["ext"]]]);
  const out = s.drain();
  assert.deepEqual(toClient(out, "key_cancelled", C1), ["w"]);
  assert.deepEqual(toClient(out, "key_cancelled", C2), ["p"]);
  assert.equal(clientMessage(out, "key_cancelled", C2, "p").reason, "deleted");
  assert.deepEqual(toWorker(out, "cancel_task", A), ["p"]);
  assert.equal(stateOf(s, "m"), "memory");
  assert.equal(s.tasks.has("p"), false);
  assert.equal(s.tasks.has("w"), false);
});

// ---- progress ----

Deno.test("tasks: progress counts tasks per prefix and state", () => {
  const s = cluster(A);
  s.updateGraph(
    C1,
    [t("inc-1"), t("inc-2"), t("inc-3"), t("sum-x", ["inc-1", "inc-2", "inc-3"]), t("lonely")],
    ["sum-x", "lonely"],
  );
  s.drain();
  assert.deepEqual(s.progress(), { inc: { processing: 3 }, sum: { waiting: 1 }, lonely: { processing: 1 } });
  finish(s, "inc-1");
  fail(s, "lonely");
  assert.deepEqual(s.progress(), {
    inc: { memory: 1, processing: 2 },
    sum: { waiting: 1 },
    lonely: { erred: 1 },
  });
});

// ---- bugs ----

Deno.test("regression: resubmitting a key kept only as lineage (released) runs it again", () => {
  const s = cluster(A);
  // A client submits a and b = f(a), drops its future on a, keeps b.
  s.updateGraph(C1, [t("a"), t("b", ["a"])], ["a", "b"]);
  s.drain();
  s.releaseKeys(C1, ["a"]);
  finish(s, "a");
  finish(s, "b");
  s.drain();
  assert.equal(stateOf(s, "a"), "released");
  // The same pure call again: same key.
  s.updateGraph(C1, [t("a")], ["a"]);
  assert.deepEqual(sentTo(s.drain()), { a: A }, `a is ${stateOf(s, "a")}, and nothing was sent`);
});

Deno.test("regression: a task processing on a leaving worker whose input is lost for good errs, and is not run", () => {
  const s = cluster(A, B);
  scatter(s, C1, "x", [A], 1e9);
  s.drain();
  s.updateGraph(C1, [t("y", ["x"])], ["y"]);
  assert.deepEqual(sentTo(s.drain()), { y: A }, "y goes where its 1 GB input is");
  assert.deepEqual(s.removeWorker(A), ["x"]);
  const out = s.drain();
  assert.equal(clientMessage(out, "key_erred", C1, "y").task, "x");
  assert.deepEqual(sentTo(out), {}, "y cannot run: its input is gone");
  assert.equal(stateOf(s, "y"), "erred");
});

Deno.test("regression: a queued dependent of a lost key waits for the key to be recomputed", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("x")], ["x"]);
  s.drain();
  finish(s, "x", 10);
  s.drain();
  s.addWorker({ address: B });
  const blocks = fillUp(s, B);
  // A is kept busy with tasks restricted to it, so d (which needs x) is queued.
  const aBlocks = fillUp(s, A, "ablock");
  s.updateGraph(C1, [t("d", ["x"])], ["d"]);
  assert.equal(stateOf(s, "d"), "queued");
  s.drain();
  assert.deepEqual(s.removeWorker(A), ["x"]);
  s.drain();
  assert.equal(aBlocks.every((k) => stateOf(s, k) === "queued"), true);
  // Run everything on B and check no task is sent before its inputs are in memory.
  for (const b of blocks) {
    finish(s, b);
    for (const args of computes(s.drain())) {
      for (const [dep, holders] of Object.entries(args.who_has)) {
        assert.ok(holders.length > 0, `${args.key} sent while ${dep} is ${stateOf(s, dep)}, with who_has []`);
      }
    }
  }
});

Deno.test("regression: a task processing elsewhere whose input lost its last copy is rescheduled, not left to fail", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("x")], ["x"]);
  s.drain();
  finish(s, "x", 10);
  s.drain();
  s.addWorker({ address: B });
  s.updateGraph(C1, [t("d", ["x"], { workers: [B] })], ["d"]);
  assert.deepEqual(computes(s.drain(), B)[0].who_has, { x: [A] });
  s.removeWorker(A);
  const out = s.drain();
  assert.deepEqual(sentTo(out), { x: B }, "x is recomputed");
  // B cannot fetch x from A any more: d must wait for the new x, as Dask does.
  assert.equal(
    stateOf(s, "d"),
    "waiting",
    "d is left processing with who_has pointing at a worker that left",
  );
  assert.deepEqual(toWorker(out, "cancel_task", B), ["d"]);
});

Deno.test("regression: a restricted queued task that a worker reports holding is not sent again", () => {
  const s = cluster(A, B);
  const blocks = fillUp(s, A);
  s.updateGraph(C1, [t("r", [], { workers: [A] })], ["r"]);
  assert.equal(stateOf(s, "r"), "queued");
  s.addKeys(B, ["r"], { r: 3 });
  assert.deepEqual(toClient(s.drain(), "key_done", C1), ["r"]);
  assert.equal(stateOf(s, "r"), "memory");
  finish(s, blocks[0]);
  assert.deepEqual(sentTo(s.drain()), {}, "r is in memory already");
  assert.equal(stateOf(s, "r"), "memory");
});

Deno.test("regression: restricted queued tasks come out by priority too", () => {
  const s = cluster(A);
  const blocks = fillUp(s, A);
  s.updateGraph(C1, [t("r-lo", [], { workers: [A] })], ["r-lo"]);
  s.updateGraph(C1, [t("r-hi", [], { workers: [A], priority: 5 })], ["r-hi"]);
  finish(s, blocks[0]);
  assert.deepEqual(sentTo(s.drain()), { "r-hi": A });
});

Deno.test("regression: a finished task whose cancelled input is later lost does not wait forever", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("a"), t("b", ["a"])], ["a", "b"]);
  s.drain();
  finish(s, "a");
  finish(s, "b");
  s.drain();
  s.cancelKeys(["a"]);
  s.drain();
  assert.equal(stateOf(s, "b"), "memory");
  s.addWorker({ address: B });
  assert.deepEqual(s.removeWorker(A), ["b"]);
  const out = s.drain();
  const told = [
    ...toClient(out, "key_erred", C1),
    ...toClient(out, "key_lost", C1),
    ...toClient(out, "key_done", C1),
  ];
  const b = s.tasks.get("b")!;
  assert.ok(
    told.includes("b") || b.state === "processing" || Object.keys(sentTo(out)).length > 0,
    `b is ${b.state}, waiting on ${
      [...b.waitingOn].map((d) => `${d.key} (${d.state})`)
    }; C1 was told nothing`,
  );
});

Deno.test("regression: a finished task whose deleted external input is later lost does not wait forever", () => {
  const s = cluster(A);
  s.addKeys(A, ["ext"]);
  s.updateGraph(C1, [t("m", ["ext"])], ["m"]);
  s.drain();
  finish(s, "m");
  s.drain();
  s.deleteKeys(["ext"]);
  s.drain();
  s.addWorker({ address: B });
  assert.deepEqual(s.removeWorker(A), ["m"]);
  const out = s.drain();
  const m = s.tasks.get("m")!;
  assert.ok(
    toClient(out, "key_erred", C1).includes("m") || toClient(out, "key_lost", C1).includes("m"),
    `m is ${m.state}, waiting on ${
      [...m.waitingOn].map((d) => `${d.key} (${d.state})`)
    }; C1 was told nothing`,
  );
});

Deno.test("regression: a task that depends on itself is refused or errs, rather than waiting forever", () => {
  for (const specs of [[t("loop", ["loop"])], [t("p", ["q"]), t("q", ["p"])]]) {
    const s = cluster(A);
    let threw = false;
    try {
      s.updateGraph(C1, specs, [specs[0].key]);
    } catch {
      threw = true;
    }
    const erred = toClient(s.drain(), "key_erred", C1).length > 0;
    assert.ok(threw || erred, `${specs[0].key} is ${stateOf(s, specs[0].key)} and nobody was told`);
  }
});

Deno.test("regression: a task that errs while wanting its inputs does not compute and hold its other inputs", () => {
  const s = cluster(A);
  // e, a = f(e), d2, b = g(a, d2): all done, only b wanted, so e, a and d2 are kept as lineage.
  s.updateGraph(C1, [t("e"), t("a", ["e"]), t("d2"), t("b", ["a", "d2"])], ["b"]);
  s.drain();
  for (const k of ["e", "d2", "a", "b"]) finish(s, k);
  s.drain();
  assert.deepEqual(["e", "a", "d2"].map((k) => stateOf(s, k)), ["released", "released", "released"]);
  // Another graph recomputes e, which now fails.
  s.updateGraph(C2, [t("x", ["e"])], ["x"]);
  s.drain();
  fail(s, "e");
  s.drain();
  assert.equal(stateOf(s, "e"), "erred");
  assert.equal(stateOf(s, "a"), "released");
  // b's only copy leaves: b is recomputed, a inherits e's error, so b errs.
  s.addWorker({ address: B });
  s.removeWorker(A);
  const out = s.drain();
  assert.equal(clientMessage(out, "key_erred", C1, "b").task, "e");
  assert.equal(stateOf(s, "b"), "erred");
  // Let whatever was started finish: d2 must not be kept for b, which has erred.
  for (const k of Object.keys(sentTo(out))) if (stateOf(s, k) === "processing") finish(s, k);
  const d2 = s.tasks.get("d2");
  assert.notEqual(
    d2?.state,
    "memory",
    `d2 was computed and is held for ${[...d2?.waiters ?? []].map((w) => w.key)}`,
  );
});

Deno.test("regression: worker byte counts stay right when holders report different sizes", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("x", [], { workers: [A] })], ["x"]);
  s.drain();
  finish(s, "x", 8);
  s.addKeys(B, ["x"], { x: 100 });
  s.releaseKeys(C1, ["x"]);
  s.drain();
  assert.deepEqual(s.workerList().map((w) => w.nbytes), [0, 0]);
});

/** A chain k-0 <- k-1 <- ... <- k-(n-1), computed on A, only the end wanted. */
function longChain(n: number): SchedulerTasks {
  const s = cluster(A);
  const specs = [t("k-0")];
  for (let i = 1; i < n; i++) specs.push(t(`k-${i}`, [`k-${i - 1}`]));
  s.updateGraph(C1, specs, [`k-${n - 1}`]);
  // One message a turn, as the scheduler handles them (a turn may release only so much).
  for (let i = 0; i < n; i++) (s.taskFinished(A, `k-${i}`, 1, 0.001), s.drain());
  assert.equal(stateOf(s, `k-${n - 1}`), "memory");
  return s;
}

const CHAIN_LENGTH = 50_000;

Deno.test("regression: releasing the end of a long chain does not overflow the stack", () => {
  const s = longChain(CHAIN_LENGTH);
  s.releaseKeys(C1, [`k-${CHAIN_LENGTH - 1}`]);
  while (s.continueReleases()) s.drain();
  assert.equal(s.tasks.size, 0);
});

Deno.test("a release too large for one turn goes on in later turns; a key wanted meanwhile stays", () => {
  const n = 2 * RELEASE_STEPS_PER_TURN + 1000;
  const s = longChain(n);
  s.releaseKeys(C1, [`k-${n - 1}`]);
  // One turn's worth is done: the end of the chain is forgotten, its start is still there.
  assert.equal(s.releasesPending, true);
  assert.equal(s.tasks.size, n - RELEASE_STEPS_PER_TURN);
  const freed = s.drain().filter((m) => m.op === "free_keys");
  assert.deepEqual(
    freed.map((m) => m.args),
    [{ keys: [`k-${n - 1}`] }],
    "one free for the one key in memory",
  );

  // Meanwhile another client builds on k-5, which the release has not reached.
  s.updateGraph(C2, [t("z", ["k-5"])], ["z"]);
  s.drain();
  let turns = 1;
  for (let more = true; more; turns++) (more = s.continueReleases(), s.drain());
  assert.equal(turns, 3, "50,000 tasks a turn, and 1,000 left for the third (it stops at k-5)");
  assert.equal(s.releasesPending, false);
  assert.deepEqual([...s.tasks.keys()].sort(), ["k-0", "k-1", "k-2", "k-3", "k-4", "k-5", "z"]);
  assert.equal(stateOf(s, "z"), "waiting");
});

Deno.test("regression: recomputing a long chain from lineage does not overflow the stack", () => {
  const s = longChain(CHAIN_LENGTH);
  s.addWorker({ address: B });
  s.removeWorker(A);
  assert.deepEqual(sentTo(s.drain()), { "k-0": B });
});

// ---- lifetimes: keys brought back, keys waited for, tasks with no worker ----

Deno.test("tasks: keys a registering worker brings back are kept for the grace, then freed unless claimed", () => {
  const s = cluster();
  s.unclaimedGraceMs = 1_000;
  s.addWorker({ address: A, keys: ["stray", "claimed", "used", "own"], external: ["own"] }, 5_000);
  assert.deepEqual(s.drain(), []);
  // Within the grace, a client claims one by wanting it, another by needing it as an input.
  s.updateGraph(C1, [t("use", ["used"])], ["claimed", "use"], 5_500);
  const out = s.drain();
  assert.deepEqual(toClient(out, "key_done", C1), ["claimed"]);
  assert.deepEqual(computes(out).map((c) => c.key), ["use"]);
  s.tick(5_999);
  assert.deepEqual(toWorker(s.drain(), "free_keys"), [], "freed before the grace ended");
  s.tick(6_000);
  assert.deepEqual(toWorker(s.drain(), "free_keys", A), ["stray"]);
  assert.equal(s.tasks.has("stray"), false);
  finish(s, "use");
  assert.deepEqual(toWorker(s.drain(), "free_keys", A), ["used"], "an input is freed once its dependent ran");
  s.releaseKeys(C1, ["claimed"]);
  assert.deepEqual(toWorker(s.drain(), "free_keys", A), ["claimed"], "a claimed key is refcounted");
  s.tick(1e9);
  assert.deepEqual(s.drain(), []);
  assert.equal(stateOf(s, "own"), "memory", "the worker's own data stays until deleted");
});

Deno.test("tasks: a worker that comes back with a key released meanwhile gets it freed after the grace", () => {
  const s = cluster(A);
  s.unclaimedGraceMs = 500;
  s.updateGraph(C1, [t("x")], ["x"]);
  s.drain();
  finish(s, "x");
  s.drain();
  s.removeWorker(A); // a TTL expired
  s.releaseKeys(C1, ["x"]);
  assert.equal(s.tasks.has("x"), false);
  s.addWorker({ address: A, keys: ["x"] }, 100);
  s.tick(599);
  assert.deepEqual(s.drain(), []);
  s.tick(600);
  assert.deepEqual(toWorker(s.drain(), "free_keys", A), ["x"]);
});

Deno.test("tasks: while recovering, keys a client holds that nobody has are waited for, then fail", () => {
  const s = cluster();
  s.recoveringUntil = 1_000;
  // A restarted scheduler hears from the client first: scattered data, and a task on it.
  s.updateGraph(C1, [t("y", ["data"])], ["data", "y"], 10);
  assert.deepEqual(toClient(s.drain(), "key_erred"), []);
  assert.equal(stateOf(s, "y"), "waiting");
  s.addWorker({ address: A, keys: ["data"] }, 20);
  let out = s.drain();
  assert.deepEqual(toClient(out, "key_done", C1), ["data"]);
  assert.deepEqual(computes(out).map((c) => c.key), ["y"]);
  // Another key no worker ever brings back fails once the recovery is over.
  s.updateGraph(C1, [t("z", ["gone"])], ["gone", "z"], 30);
  s.tick(999);
  assert.deepEqual(toClient(s.drain(), "key_erred"), []);
  s.tick(1_000);
  out = s.drain();
  assert.deepEqual(toClient(out, "key_erred", C1).sort(), ["gone", "z"]);
  assert.match(clientMessage(out, "key_erred", C1, "z").error.message, /Unknown key "gone"/);
  // Past the recovery, an unknown key fails at once, as always.
  s.updateGraph(C1, [t("w", ["nope"])], ["w"], 2_000);
  assert.deepEqual(toClient(s.drain(), "key_erred", C1), ["w"]);
});

Deno.test("regression: a result reported for a task no longer on that worker is freed there", () => {
  // Found by the simulation: a worker that finished a task the scheduler had meanwhile
  // moved (or never knew, after a restart) kept the result for good.
  const s = cluster(A, B);
  s.taskFinished(A, "ghost", 8, 0.001);
  assert.deepEqual(toWorker(s.drain(), "free_keys", A), ["ghost"]);
  s.updateGraph(C1, [t("x")], ["x"]);
  const first = where(s, "x");
  const other = first === A ? B : A;
  s.drain();
  s.taskFinished(other, "x", 8, 0.001);
  assert.deepEqual(toWorker(s.drain(), "free_keys", other), ["x"]);
  assert.equal(stateOf(s, "x"), "processing");
});

Deno.test("regression: a holder named in missing_data is told to free its copy, which the scheduler no longer counts", () => {
  // Found by the simulation (seed 100): only the way to the holder had failed; the
  // holder kept a copy the scheduler had forgotten, for good.
  const s = cluster(A, { address: B, nthreads: 1 });
  s.updateGraph(C1, [t("x", [], { workers: [A] })], ["x"]);
  s.drain();
  finish(s, "x");
  s.updateGraph(C1, [t("y", ["x"], { workers: [B] })], ["y"]);
  s.drain();
  s.missingData(B, "y", { x: [A] });
  const out = s.drain();
  assert.deepEqual(toWorker(out, "free_keys", A), ["x"]);
  assert.deepEqual(computes(out, A).map((c) => c.key), ["x"]);
  // In that order (seed 65): freed after the recompute, A would drop the new result.
  const at = (op: string) => out.findIndex((m) => m.to === "worker" && m.address === A && m.op === op);
  assert.ok(at("free_keys") < at("compute_task"), JSON.stringify(out));
});

Deno.test("regression: while recovering, an input waited for as unknown runs once a later graph defines it", () => {
  // Found by the simulation (seed 40): a client resubmitted a held task without its
  // (released) lineage, so its input became an unknown key waited for; the lineage came
  // in a later graph and filled the key in, but nothing ran it, and the task waited for good.
  const s = cluster(A);
  s.recoveringUntil = 1_000;
  s.updateGraph(C1, [t("d", ["b"])], ["d"], 10);
  assert.equal(stateOf(s, "d"), "waiting");
  assert.equal(stateOf(s, "b"), "released");
  s.drain();
  s.updateGraph(C1, [t("b"), t("d", ["b"])], ["d"], 20);
  assert.deepEqual(computes(s.drain()).map((c) => c.key), ["b"]);
  finish(s, "b");
  assert.deepEqual(computes(s.drain()).map((c) => c.key), ["d"]);
});

Deno.test("tasks: tasks with no worker fail after noWorkersTimeoutMs; a worker coming back resets the wait", () => {
  const s = cluster(A);
  s.noWorkersTimeoutMs = 1_000;
  s.updateGraph(C1, [t("x"), t("y", ["x"])], ["y"]);
  s.drain();
  s.removeWorker(A);
  s.drain();
  assert.equal(stateOf(s, "x"), "queued");
  s.tick(0);
  s.tick(900);
  s.addWorker({ address: B }, 950);
  s.removeWorker(B);
  s.drain();
  s.tick(1_000);
  s.tick(1_999);
  assert.deepEqual(toClient(s.drain(), "key_erred"), [], "failed although a worker had come meanwhile");
  s.tick(2_000);
  const out = s.drain();
  assert.deepEqual(toClient(out, "key_erred", C1), ["y"]);
  assert.equal(stateOf(s, "x"), "erred");
  const error = clientMessage(out, "key_erred", C1, "y").error;
  assert.equal(error.name, "NoWorkersError");
  assert.match(error.message, /no worker was connected for 1000 ms/);
});

Deno.test("tasks: a restricted task no connected worker may run fails after noWorkersTimeoutMs", () => {
  const s = cluster(A);
  s.noWorkersTimeoutMs = 100;
  s.updateGraph(C1, [t("r", [], { workers: ["nobody"] })], ["r"]);
  s.tick(0);
  s.tick(99);
  assert.deepEqual(toClient(s.drain(), "key_erred"), []);
  s.tick(100);
  const error = clientMessage(s.drain(), "key_erred", C1, "r").error;
  assert.match(error.message, /no worker it may run on \(nobody\)/);
});

Deno.test("tasks: progress counts the work held now: a kind of task goes once its last result is released", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("inc-1"), t("inc-2")], ["inc-1", "inc-2"]);
  s.drain();
  finish(s, "inc-1");
  assert.deepEqual(s.progressTotals().inc, { done: 1, erred: 0, processing: 1, waiting: 0 });
  finish(s, "inc-2");
  s.releaseKeys(C1, ["inc-1", "inc-2"]);
  while (s.releasesPending) s.continueReleases();
  s.drain();
  assert.equal(s.progressTotals().inc, undefined, "a finished, released batch still shows");
  // A new batch of the same kind starts from nothing, not from everything since the start.
  s.updateGraph(C1, [t("inc-3")], ["inc-3"]);
  s.drain();
  finish(s, "inc-3");
  assert.deepEqual(s.progressTotals().inc, { done: 1, erred: 0, processing: 0, waiting: 0 });
});

Deno.test("tasks: tasks no worker may run are problems, told once, and say why they wait", () => {
  const s = cluster(A);
  s.noWorkersTimeoutMs = 60_000;
  s.updateGraph(C1, [t("r1", [], { workers: ["nobody"] }), t("r2", [], { workers: ["nobody"] }), t("ok")], [
    "r1",
    "r2",
    "ok",
  ]);
  s.drain();
  // Before a tick has looked, it already says why (not "paused": no worker may run it at all).
  assert.match(
    s.why("r1", 0),
    /^queued: it may run only on nobody, and no connected worker is one; it fails in 60 s/,
  );
  s.tick(0);
  assert.equal(s.problems.length, 1);
  assert.match(
    s.problems[0],
    /^2 tasks \(e\.g\. "r[12]"\) may run only on nobody, and no connected worker is one/,
  );
  assert.match(s.problems[0], /fail after 60 s \(--no-workers-timeout\)/);
  assert.deepEqual(s.drainNotices(), s.problems, "a new problem is told");
  s.tick(1_000);
  assert.deepEqual(s.drainNotices(), [], "told once while it lasts");
  assert.match(
    s.why("r1", 20_000),
    /^queued: it may run only on nobody, and no connected worker is one; it fails in 40 s \(--no-workers-timeout\)/,
  );
  assert.match(s.why("ok", 20_000), /^processing: sent to /);
  assert.match(s.why("unknown-key", 0), /^unknown to the scheduler/);
  // A worker it may run on comes: the problem goes.
  s.addWorker({ address: B, name: "nobody" }, 2_000);
  s.drain();
  s.tick(2_000);
  assert.deepEqual(s.problems, []);
  // No worker at all: one line says it.
  s.removeWorker(A);
  s.removeWorker(B);
  s.drain();
  s.tick(3_000);
  assert.equal(s.problems.length, 1);
  assert.match(s.problems[0], /queued and no worker connected/);
  assert.match(s.why("ok", 3_000), /^queued: no worker is connected; it fails in 60 s/);
});

Deno.test("tasks: a compute_task the shell cannot send fails its task, and function ids start over", () => {
  const s = cluster(A);
  s.updateGraph(C1, [t("x", [], { retries: 2 })], ["x"]);
  assert.ok(computes(s.drain())[0].function, "the first task carries its function");
  s.computeTaskUnsent(A, "x", { name: "TypeError", message: "Task x cannot be sent to a worker: bad date" });
  const out = s.drain();
  assert.match(clientMessage(out, "key_erred", C1, "x").error.message, /bad date/);
  assert.equal(s.workers.get(A)!.processing.size, 0);
  s.updateGraph(C1, [t("y")], ["y"]);
  assert.ok(computes(s.drain())[0].function, "the worker never got the function: it is sent again");
});

Deno.test("tasks: a task report that fails its checks fails the task (retries or not) and frees the copy", () => {
  const s = cluster(A, B);
  s.updateGraph(C1, [t("x", [], { retries: 3 })], ["x"]);
  s.drain();
  const at = where(s, "x");
  s.reportRefused(at === A ? B : A, "x", { name: "ProtocolError", message: "not its task" });
  assert.deepEqual(s.drain(), [], "a worker the task is not on is ignored");
  s.reportRefused(at, "x", { name: "ProtocolError", message: "args.error.name: expected a string" });
  const out = s.drain();
  assert.equal(clientMessage(out, "key_erred", C1, "x").error.name, "ProtocolError");
  assert.deepEqual(toWorker(out, "free_keys", at), ["x"]);
  assert.equal(stateOf(s, "x"), "erred");
});

Deno.test("tasks: after a restart, lineage sent along with a key already back in memory is not run again", () => {
  const s = cluster();
  s.unclaimedGraceMs = 1_000;
  s.addWorker({ address: A, keys: ["total", "part"] }, 0);
  // The client sends what it holds (total) with its lineage (mid, part), and a task of its own.
  s.updateGraph(C1, [t("part"), t("mid", ["part"]), t("total", ["mid"]), t("solo")], ["total"], 10);
  let out = s.drain();
  assert.deepEqual(toClient(out, "key_done", C1), ["total"]);
  assert.deepEqual(computes(out).map((c) => c.key), ["solo"], "only the unwanted task nothing needs runs");
  finish(s, "solo");
  s.tick(1_000);
  out = s.drain();
  assert.deepEqual(toWorker(out, "free_keys", A), ["part", "solo"]);
  // total now has lineage: lost, it is recomputed from it.
  s.removeWorker(A);
  s.addWorker({ address: B }, 1_100);
  out = s.drain();
  assert.deepEqual(computes(out).map((c) => c.key), ["part"]);
  finish(s, "part");
  assert.deepEqual(computes(s.drain()).map((c) => c.key), ["mid"]);
  finish(s, "mid");
  assert.deepEqual(computes(s.drain()).map((c) => c.key), ["total"]);
  finish(s, "total");
  assert.deepEqual(toClient(s.drain(), "key_done", C1), ["total"]);
});

Deno.test("tasks: a worker paused by memory gets no new task; resumed, it takes the queued ones", () => {
  const s = cluster(A, B);
  s.heartbeat(A, 0, { paused: 1 });
  const keys = Array.from({ length: 40 }, (_, i) => `t${i}`);
  s.updateGraph(C1, keys.map((k) => t(k)), keys);
  const out = s.drain();
  assert.equal(computes(out, A).length, 0, "nothing for the paused worker");
  assert.ok(computes(out, B).length > 0);
  const queued = keys.filter((k) => stateOf(s, k) === "queued");
  assert.ok(queued.length > 0, "B is full, A paused: the rest wait");
  s.heartbeat(A, 1, { paused: 0 });
  assert.ok(computes(s.drain(), A).length > 0, "resumed, A takes queued tasks");
});

Deno.test("a graph sent out of order is taken whole (no cycle), and a cycle anywhere in a long graph is refused", () => {
  // Dependents before their dependencies: the one-pass check cannot tell, the full one can.
  const reversed = [t("c", ["b"]), t("b", ["a"]), t("a")];
  const s = cluster(A);
  s.updateGraph(C1, reversed, ["c"]);
  assert.deepEqual(["a", "b", "c"].map((k) => stateOf(s, k)), ["processing", "waiting", "waiting"]);
  // In order, then a cycle at the end: refused, and nothing of it taken.
  const chain = Array.from({ length: 1_000 }, (_, i) => t(`k${i}`, i ? [`k${i - 1}`] : []));
  chain.push(t("x", ["y"]), t("y", ["x"]));
  const s2 = cluster(A);
  assert.throws(() => s2.updateGraph(C1, chain, ["y"]), /depends on itself/);
  assert.equal(stateOf(s2, "k0"), undefined);
});
