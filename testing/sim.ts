/**
 * A seeded simulation of a whole cluster: the real `SchedulerTasks` and `WorkerState`
 * (several workers, several clients) over a simulated network and clock. The shells'
 * glue is redone here in a few lines per op (what `scheduler/scheduler.ts` and
 * `worker/worker.ts` do with sockets and timers), every message is checked against the
 * op tables of protocol/ops.ts as a real node checks it, and faults come from the seed:
 * messages delayed (order kept per connection), connections cut, workers crashed and
 * restarted, peers busy, executors slow or dying, the scheduler restarted, clients
 * reconnecting.
 *
 * After every event, `validate()` runs on every state object. At the end, every future a
 * client held has settled once, with the right value or an error the run explains, and
 * once every client released everything, no key is left on any worker or in the
 * scheduler.
 *
 * Run: deno task sim [--seeds N] [--seed S] [--start S] [--verbose]
 * A failing seed prints the line that replays it.
 *
 * @module
 */

import { type ComputeTaskArgs, SchedulerTasks, type TaskSpec } from "../scheduler/tasks.ts";
import { clientOps, type OpTable, schedulerOps } from "../protocol/ops.ts";
import { Decoder, Encoder, Ref } from "../protocol/codec.ts";
import { Rng } from "./rng.ts";
import { type Link, World } from "./sim_net.ts";
import { SimWorker } from "./sim_worker.ts";

// ---- what a run is made of ----

/** What a task does when it runs, decided by the run (the worker's executor looks it up by key). */
export interface SimTask {
  key: string;
  deps: string[];
  /** ok computes; bad always throws; flaky throws `fails` times, then computes; data is scattered. */
  kind: "ok" | "bad" | "flaky" | "data";
  retries: number;
  fails: number;
  /** A scattered value. */
  value?: number;
}

/** A value mod this prime: small numbers, exact in a double. */
const VALUE_MOD = 1_000_003;

/** A stable hash of a key, for its task's value. */
export function keyHash(key: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193);
  return (h >>> 0) % VALUE_MOD;
}

/** The value a task computes from its inputs' values: what the worker's executor runs. */
export function computeValue(key: string, inputs: readonly number[]): number {
  let v = keyHash(key);
  for (const x of inputs) v = (v + x) % VALUE_MOD;
  return v;
}

/** Options of one run. */
export interface SimOptions {
  seed: number;
  /** Client actions in the active phase. */
  actions?: number;
  workers?: number;
  clients?: number;
  /** Threads per worker. */
  nthreads?: number;
  /** Faults on (default) or off. */
  faults?: boolean;
  /** Print every message and event. */
  verbose?: boolean;
  /**
   * A defect planted in the workers' shells, to show the checks catch it (tests only):
   * "lose-results" drops every tenth task_finished.
   */
  plant?: "lose-results";
}

/** What one run found. */
export interface SimResult {
  seed: number;
  failures: string[];
  /** Events run. */
  steps: number;
  /** Simulated time, ms. */
  simMs: number;
  futures: number;
  faults: Record<string, number>;
  outcomes: Record<string, number>;
}

/** How long the active phase lasts at most, simulated ms; then faults stop and the cluster settles. */
const ACTIVE_MS_MAX = 20_000;
/** How long everything may take to settle after the active phase, simulated ms. */
const SETTLE_MS = 120_000;
/** A worker's heartbeat and the scheduler's TTL check, simulated ms. */
export const HEARTBEAT_MS = 500;
const WORKER_TTL_MS = 5_000;
/** The scheduler's tick. */
const TICK_MS = 100;
/** Keys brought back after a scheduler restart are kept this long for a client to claim them. */
const UNCLAIMED_GRACE_MS = 2_000;
/** Reconnection backoff of workers and clients. */
export const RECONNECT_MS = 50;

/** The scheduler's address in the simulation. */
export const SCHEDULER = "tcp://scheduler:8786";

/** A failure the run can name; carries where it happened. */
export class SimFailure extends Error {}

// ---- the cluster ----

/** One seeded run: the world, the nodes, and the checks. */
export class Sim {
  readonly rng: Rng;
  readonly world: World;
  readonly failures: string[] = [];
  readonly tasks = new Map<string, SimTask>();
  /** How many times each key's function ran (flaky tasks fail their first runs). */
  readonly runs = new Map<string, number>();
  readonly faults: Record<string, number> = {};
  scheduler: SimScheduler | null = null;
  /** Workers by address; a crashed one is gone, its restart has a new address. */
  readonly workers = new Map<string, SimWorker>();
  readonly clients: SimClient[] = [];
  /** Called after every event (debugging). */
  watch?: () => void;
  /** Faults may happen (the active phase of a run with faults). */
  faulty: boolean;
  /** Faults that explain a lost value or a KilledWorker happened. */
  hadFaults = false;
  #expected = new Map<string, number | null>();
  #rerun = new Map<string, number | null>();
  #workerSerial = 0;

  constructor(readonly options: SimOptions) {
    this.rng = new Rng(options.seed);
    this.world = new World(this.rng);
    this.faulty = options.faults ?? true;
  }

  log(message: string): void {
    if (this.options.verbose) console.log(`${this.world.now.toFixed(1).padStart(9)} ${message}`);
  }

  fail(message: string): void {
    this.failures.push(`at ${this.world.now.toFixed(1)} ms (step ${this.world.steps}): ${message}`);
  }

  fault(kind: string): void {
    this.faults[kind] = (this.faults[kind] ?? 0) + 1;
    this.log(`FAULT ${kind}`);
  }

  /**
   * The value `key` must have, or null when it cannot have one (it or an input fails).
   * With `rerun`, flaky tasks count as succeeding: after a fault, a client's reconnect
   * submits an erred task again, and a flaky one may then succeed.
   */
  expected(key: string, rerun = false): number | null {
    const cache = rerun ? this.#rerun : this.#expected;
    const known = cache.get(key);
    if (known !== undefined) return known;
    // Iterative: a long chain must not overflow the stack.
    const stack = [key];
    while (stack.length > 0) {
      const k = stack[stack.length - 1];
      if (cache.has(k)) {
        stack.pop();
        continue;
      }
      const t = this.tasks.get(k);
      if (t === undefined) {
        cache.set(k, null);
        stack.pop();
        continue;
      }
      const missing = t.deps.filter((d) => !cache.has(d));
      if (missing.length > 0) {
        stack.push(...missing);
        continue;
      }
      stack.pop();
      if (t.kind === "data") cache.set(k, t.value!);
      else if (t.kind === "bad" || (!rerun && t.kind === "flaky" && t.fails > t.retries)) cache.set(k, null);
      else {
        const inputs = t.deps.map((d) => cache.get(d)!);
        cache.set(k, inputs.some((x) => x === null) ? null : computeValue(k, inputs as number[]));
      }
    }
    return cache.get(key)!;
  }

  /** Keys `key` depends on, itself included. */
  ancestry(key: string): Set<string> {
    const seen = new Set<string>();
    const stack = [key];
    while (stack.length > 0) {
      const k = stack.pop()!;
      if (seen.has(k)) continue;
      seen.add(k);
      for (const d of this.tasks.get(k)?.deps ?? []) stack.push(d);
    }
    return seen;
  }

  /** Checks a message as its receiver's op table does. */
  checkMessage(table: OpTable, kind: string, op: string, args: unknown): unknown {
    if (!Object.hasOwn(table, op)) {
      this.fail(`a ${kind} got unknown op ${op}`);
      return null;
    }
    try {
      return table[op].args.parse(args, "args");
    } catch (error) {
      this.fail(
        `a ${kind} got ${op} with bad arguments: ${(error as Error).message}: ${JSON.stringify(args)}`,
      );
      return null;
    }
  }

  newWorkerAddress(): string {
    return `tcp://w${++this.#workerSerial}:9000`;
  }

  startWorker(): SimWorker {
    const w = new SimWorker(this, this.newWorkerAddress(), this.options.nthreads ?? 2);
    this.workers.set(w.address, w);
    w.connect();
    return w;
  }

  startScheduler(): void {
    this.scheduler = new SimScheduler(this);
  }

  /** Every state object checks its invariants. */
  validate(): void {
    try {
      (this.scheduler?.state as { validate?: () => void } | undefined)?.validate?.();
    } catch (error) {
      throw new SimFailure(`scheduler: ${(error as Error).message}`);
    }
    for (const w of this.workers.values()) {
      try {
        w.validate();
      } catch (error) {
        throw new SimFailure(`worker ${w.address}: ${(error as Error).message}`);
      }
    }
  }
}

// ---- the scheduler's shell, in a few lines per op ----

/** A reply callback: a result, or an error. */
export type Reply = (result: unknown, error?: { name: string; message: string }) => void;

/** Sends `op` over `link` from `from`; the receiver's `receive` runs on arrival, its reply comes back the same way. */
export function send(
  link: Link,
  from: string,
  to: { receive(link: Link, op: string, args: unknown, reply: Reply | null): void },
  op: string,
  args: unknown,
  onReply?: Reply,
): void {
  // What travels is what the codec makes of it: neither side keeps the other's objects.
  const copy = wire(args);
  link.send(from, () => {
    const reply: Reply | null = onReply === undefined ? null : (result, error) => {
      const r = wire(result);
      link.send(link.a === from ? link.b : link.a, () => onReply(r, error));
    };
    to.receive(link, op, copy, reply);
  });
}

const encoder = new Encoder();
const decoder = new Decoder();

/** `value` encoded and decoded as a message carries it. */
export function wire(value: unknown): unknown {
  const { head, buffers } = encoder.encode(value, "message");
  return decoder.decode(head, buffers);
}

/** The scheduler node: `SchedulerTasks` and what its shell does for each op. */
export class SimScheduler {
  readonly state = new SchedulerTasks();
  /** The link each worker registered on. */
  readonly workerLinks = new Map<string, Link>();
  readonly clientLinks = new Map<string, Link>();
  /** Registrations per link, as the shell's tags. */
  readonly #workersOn = new Map<Link, Set<string>>();
  readonly #clientOn = new Map<Link, string>();
  /** Every open connection, registered or not: a dying scheduler drops them all. */
  readonly #links = new Set<Link>();
  alive = true;

  constructor(readonly sim: Sim) {
    const s = this.state;
    s.allowedFailures = 3;
    s.noWorkersTimeoutMs = 60_000;
    s.unclaimedGraceMs = UNCLAIMED_GRACE_MS;
    s.recoveringUntil = sim.world.now + UNCLAIMED_GRACE_MS;
    const tick = () => {
      if (!this.alive) return;
      const now = this.sim.world.now;
      for (const address of this.state.expiredWorkers(now, WORKER_TTL_MS)) {
        const link = this.workerLinks.get(address);
        this.#forget(address, true);
        link?.cut();
      }
      this.state.tick(now);
      this.flush();
      this.sim.world.after(TICK_MS, tick);
    };
    sim.world.after(TICK_MS, tick);
  }

  /** A new connection from a worker or a client. */
  accept(link: Link): void {
    this.#links.add(link);
    link.onClose(() => {
      this.#links.delete(link);
      if (!this.alive) return;
      for (const address of this.#workersOn.get(link) ?? []) {
        if (this.workerLinks.get(address) === link) this.#forget(address, true);
      }
      const client = this.#clientOn.get(link);
      if (client !== undefined && this.clientLinks.get(client) === link) {
        this.clientLinks.delete(client);
        this.state.removeClient(client);
        this.flush();
      }
    });
  }

  #forget(address: string, died: boolean): void {
    if (!this.state.workers.has(address)) return;
    this.state.removeWorker(address, died);
    this.workerLinks.delete(address);
    this.flush();
  }

  /** Sends what the state decided. */
  flush(): void {
    while (this.state.releasesPending) this.state.continueReleases();
    for (let out = this.state.drain(); out.length > 0; out = this.state.drain()) {
      for (const m of out) {
        if (m.to === "worker") {
          const link = this.workerLinks.get(m.address);
          const w = this.sim.workers.get(m.address);
          if (link === undefined || !link.open || w === undefined) continue;
          send(link, SCHEDULER, w, m.op, m.args);
        } else {
          const link = this.clientLinks.get(m.client);
          const c = this.sim.clients.find((c) => c.id === m.client);
          if (link === undefined || !link.open || c === undefined) continue;
          send(link, SCHEDULER, c, m.op, m.args);
        }
      }
    }
  }

  receive(link: Link, op: string, raw: unknown, reply: Reply | null): void {
    if (!this.alive) return;
    const args = this.sim.checkMessage(schedulerOps, "scheduler", op, raw) as Record<string, unknown> | null;
    if (args === null) return;
    const now = this.sim.world.now;
    const s = this.state;
    const workers = this.#workersOn.get(link) ?? new Set<string>();
    const client = this.#clientOn.get(link);
    let result: unknown = { status: "OK" };
    // deno-lint-ignore no-explicit-any
    const a = args as any;
    try {
      switch (op) {
        case "register": {
          const previous = this.workerLinks.get(a.address);
          if (previous && previous !== link) {
            this.#forget(a.address, true);
            previous.cut();
          }
          s.addWorker(a, now);
          this.workerLinks.set(a.address, link);
          if (!this.#workersOn.has(link)) this.#workersOn.set(link, new Set());
          this.#workersOn.get(link)!.add(a.address);
          result = { status: "OK", heartbeat_interval_ms: HEARTBEAT_MS, worker_ttl_ms: WORKER_TTL_MS };
          break;
        }
        case "unregister":
          this.#forget(a.address, false);
          break;
        case "heartbeat": {
          const known = this.workerLinks.get(a.address) === link && s.heartbeat(a.address, now, a.metrics);
          result = { status: known ? "OK" : "unknown", heartbeat_interval_ms: HEARTBEAT_MS };
          break;
        }
        case "add_keys":
          s.addKeys(a.address, a.keys, a.nbytes, a.replicas);
          break;
        case "remove_keys":
          s.removeKeys(a.address, a.keys);
          break;
        case "who_has":
          result = s.whoHasOf(a.keys);
          break;
        case "missing_data":
          for (const address of workers) s.missingData(address, a.key, a.missing);
          break;
        case "task_finished":
          for (const address of workers) s.taskFinished(address, a.key, a.nbytes, a.duration);
          break;
        case "task_erred":
          for (const address of workers) s.taskErred(address, a.key, a.error, a.killed);
          break;
        case "register_client": {
          const previous = this.clientLinks.get(a.id);
          if (previous && previous !== link) {
            this.#clientOn.delete(previous);
            previous.cut();
          }
          this.clientLinks.set(a.id, link);
          this.#clientOn.set(link, a.id);
          result = { status: "OK", dashboard: null };
          break;
        }
        case "update_graph": {
          if (client === undefined) throw new SimFailure("update_graph before register_client");
          const specs: TaskSpec[] = a.tasks.map((
            t: { key: string; fn: number; args: unknown[]; deps: string[] },
          ) => ({
            key: t.key,
            run: { function: a.functions[t.fn], args: t.args },
            deps: t.deps,
            // deno-lint-ignore no-explicit-any
            priority: (t as any).priority,
            // deno-lint-ignore no-explicit-any
            retries: (t as any).retries,
          }));
          s.updateGraph(client, specs, a.wanted, now);
          break;
        }
        case "release_keys":
          if (client !== undefined) s.releaseKeys(client, a.keys);
          break;
        case "cancel_keys":
          s.cancelKeys(a.keys);
          break;
        case "scatter": {
          if (client === undefined) break;
          for (const [key, holders] of Object.entries(a.who_has as Record<string, string[]>)) {
            for (const address of holders) s.addKeys(address, [key], a.nbytes);
          }
          s.updateGraph(client, [], Object.keys(a.who_has), now);
          for (const key of Object.keys(a.who_has)) {
            const ts = s.tasks.get(key);
            if (ts) ts.external = false;
          }
          break;
        }
        default:
          this.sim.fail(`the simulated scheduler does not handle ${op}`);
      }
    } catch (error) {
      // The real shell's dispatcher answers a refused input (RangeError, TypeError) with
      // an error reply and goes on; anything else is a bug of the state.
      if (!(error instanceof RangeError || error instanceof TypeError)) throw error;
      this.flush();
      reply?.(null, { name: error.name, message: error.message });
      return;
    }
    this.flush();
    reply?.(result);
  }

  /** The scheduler process dies: every connection drops, its state is gone. */
  kill(): void {
    this.alive = false;
    for (const link of this.#links) link.cut();
    for (const link of this.#workersOn.keys()) link.cut();
    for (const link of this.#clientOn.keys()) link.cut();
    for (const link of this.workerLinks.values()) link.cut();
    for (const link of this.clientLinks.values()) link.cut();
  }
}

// ---- a client ----

/** What a client learned of a future. */
interface Outcome {
  kind: "done" | "erred" | "cancelled" | "lost";
  value?: number;
  error?: { name: string; message: string };
  task?: string;
  at: number;
}

/** A client: submits graphs, scatters, releases and cancels; checks what it is told. */
export class SimClient {
  link: Link | null = null;
  /** Futures held: the first outcome, once settled. */
  readonly held = new Map<string, Outcome | null>();
  /** Keys it cancelled (they and what needs them may end cancelled). */
  readonly cancelled = new Set<string>();
  /** Every future it ever held, with its outcome. */
  readonly history: { key: string; outcome: Outcome | null }[] = [];
  #serial = 0;
  closed = false;

  constructor(readonly sim: Sim, readonly id: string) {}

  connect(): void {
    const sched = this.sim.scheduler;
    if (this.closed) return;
    if (sched === null || !sched.alive) {
      this.sim.world.after(RECONNECT_MS, () => this.connect());
      return;
    }
    const link = this.sim.world.link(this.id, SCHEDULER);
    this.link = link;
    sched.accept(link);
    link.onClose(() => {
      if (this.link === link) {
        this.link = null;
        this.sim.world.after(RECONNECT_MS, () => this.connect());
      }
    });
    send(link, this.id, sched, "register_client", { id: this.id }, () => this.#resubmit());
  }

  /** After a (re)connection: every held task and the lineage pending ones need, dependencies first. */
  #resubmit(): void {
    const tasks: SimTask[] = [];
    const wanted: string[] = [];
    const seen = new Set<string>();
    for (const [key, outcome] of this.held) {
      const t = this.sim.tasks.get(key)!;
      if (t.kind === "data") {
        wanted.push(key);
        continue;
      }
      wanted.push(key);
      const keys = outcome === null ? this.sim.ancestry(key) : new Set([key]);
      for (const k of keys) {
        const d = this.sim.tasks.get(k)!;
        if (d.kind === "data" || seen.has(k)) continue;
        seen.add(k);
        tasks.push(d);
      }
    }
    if (tasks.length > 0 || wanted.length > 0) this.#updateGraph(tasks, wanted);
  }

  #updateGraph(tasks: SimTask[], wanted: string[]): void {
    const link = this.link;
    if (link === null || !link.open) return; // resubmitted on reconnect
    const order = topo(tasks, this.sim);
    send(link, this.id, this.sim.scheduler!, "update_graph", {
      functions: [{ source: "(...xs) => sim(xs)" }],
      tasks: order.map((t) => ({
        key: t.key,
        fn: 0,
        args: t.deps.map((d) => new Ref(d)),
        deps: t.deps,
        retries: t.retries || undefined,
      })),
      wanted,
    });
  }

  #hold(key: string): void {
    if (this.held.has(key)) return;
    this.held.set(key, null);
  }

  /** Submits a random graph. */
  submit(): void {
    const rng = this.sim.rng;
    const n = ++this.#serial;
    const made: SimTask[] = [];
    const task = (name: string, deps: string[]): SimTask => {
      const r = rng.float();
      const kind = r < 0.04 ? "bad" : r < 0.1 ? "flaky" : "ok";
      const retries = kind === "flaky" ? 1 + rng.int(2) : rng.chance(0.1) ? 1 : 0;
      const fails = kind === "flaky" ? 1 + rng.int(retries + (rng.chance(0.2) ? 1 : 0)) : 0;
      const t: SimTask = { key: `${this.id}-${name}-${n}`, deps, kind, retries, fails };
      made.push(t);
      return t;
    };
    const heldKeys = [...this.held.keys()];
    const shape = rng.pick(["chain", "tree", "diamond", "fanout", "map", "single"] as const);
    let wanted: string[] = [];
    if (shape === "chain") {
      let prev: SimTask | null = null;
      const len = 2 + rng.int(8);
      for (let i = 0; i < len; i++) prev = task(`chain${i}`, prev ? [prev.key] : []);
      wanted = rng.chance(0.5) ? [prev!.key] : made.map((t) => t.key);
    } else if (shape === "tree") {
      let level = Array.from({ length: 2 + rng.int(7) }, (_, i) => task(`leaf${i}`, []));
      let depth = 0;
      while (level.length > 1) {
        const next: SimTask[] = [];
        for (let i = 0; i < level.length; i += 2) {
          next.push(task(`sum${depth}.${i}`, level.slice(i, i + 2).map((t) => t.key)));
        }
        level = next;
        depth++;
      }
      wanted = [level[0].key];
    } else if (shape === "diamond") {
      const a = task("a", heldKeys.length && rng.chance(0.5) ? [rng.pick(heldKeys)] : []);
      const b = task("b", [a.key]);
      const c = task("c", [a.key]);
      const d = task("d", [b.key, c.key]);
      wanted = [d.key];
    } else if (shape === "fanout") {
      const src = task("src", []);
      const k = 2 + rng.int(6);
      for (let i = 0; i < k; i++) task(`fan${i}`, [src.key]);
      wanted = made.slice(1).map((t) => t.key);
    } else if (shape === "map" && heldKeys.length > 0) {
      const k = 1 + rng.int(Math.min(5, heldKeys.length));
      for (let i = 0; i < k; i++) task(`map${i}`, [rng.pick(heldKeys)]);
      wanted = made.map((t) => t.key);
    } else {
      wanted = [task("single", []).key];
    }
    for (const t of made) this.sim.tasks.set(t.key, t);
    for (const key of wanted) this.#hold(key);
    this.sim.log(`${this.id} submits ${shape} (${made.length} tasks), wants ${wanted.join(" ")}`);
    this.#updateGraph(made, wanted);
  }

  /** Puts a value on a worker and tells the scheduler, as Client.scatter does. */
  scatter(): void {
    const alive = [...this.sim.workers.values()].filter((w) => w.alive);
    if (alive.length === 0 || this.link === null) return;
    const w = this.sim.rng.pick(alive);
    const key = `${this.id}-data-${++this.#serial}`;
    const value = this.sim.rng.int(VALUE_MOD);
    this.sim.tasks.set(key, { key, deps: [], kind: "data", retries: 0, fails: 0, value });
    const link = this.sim.world.link(this.id, w.address);
    w.accept(link);
    this.sim.log(`${this.id} scatters ${key} to ${w.address}`);
    // As Client.scatter: a scatter the scheduler did not record takes its value back,
    // also from a worker whose update_data failed (it may have stored it).
    const takeBack = () => {
      if (!w.alive) return;
      const back = this.sim.world.link(this.id, w.address);
      w.accept(back);
      send(back, this.id, w, "delete_data", { keys: [key], report: false }, () => back.cut());
    };
    let stored = false;
    link.onClose(() => {
      if (!stored) takeBack();
    });
    send(link, this.id, w, "update_data", { data: { [key]: value }, report: false }, (_r, error) => {
      stored = true;
      link.cut();
      if (error !== undefined) return takeBack();
      const sched = this.link;
      if (sched === null || !sched.open) return takeBack();
      let answered = false;
      sched.onClose(() => {
        if (answered) return;
        answered = true;
        takeBack();
      });
      const args = { who_has: { [key]: [w.address] }, nbytes: { [key]: 8 } };
      send(sched, this.id, this.sim.scheduler!, "scatter", args, (_r, error) => {
        if (answered) return;
        answered = true;
        if (error !== undefined) takeBack();
        // Client.scatter's futures are finished when it returns.
        else if (!this.held.has(key)) this.held.set(key, { kind: "done", value, at: this.sim.world.now });
      });
    });
  }

  /** Drops the future of one held key (or all). */
  release(all = false): void {
    const keys = [...this.held.keys()];
    if (keys.length === 0) return;
    const drop = all ? keys : [this.sim.rng.pick(keys)];
    for (const key of drop) {
      this.history.push({ key, outcome: this.held.get(key)! });
      this.held.delete(key);
    }
    this.sim.log(`${this.id} releases ${drop.length} keys`);
    if (this.link !== null) send(this.link, this.id, this.sim.scheduler!, "release_keys", { keys: drop });
  }

  /** Cancels one pending future. */
  cancel(): void {
    const pending = [...this.held].filter(([, o]) => o === null).map(([k]) => k);
    if (pending.length === 0 || this.link === null) return;
    const key = this.sim.rng.pick(pending);
    this.cancelled.add(key);
    this.sim.log(`${this.id} cancels ${key}`);
    send(this.link, this.id, this.sim.scheduler!, "cancel_keys", { keys: [key] });
  }

  receive(_link: Link, op: string, raw: unknown, _reply: Reply | null): void {
    const args = this.sim.checkMessage(clientOps, "client", op, raw) as Record<string, unknown> | null;
    if (args === null) return;
    const key = args.key as string;
    if (!this.held.has(key)) return; // released meanwhile: a real client ignores it too
    const now = this.sim.world.now;
    let outcome: Outcome;
    if (op === "key_done") {
      // The value as the first holder has it now, when it still has it (it may have gone since).
      const holders = args.workers as string[];
      let value: number | undefined;
      for (const h of holders) {
        value = this.sim.workers.get(h)?.peek(key);
        if (value !== undefined) break;
      }
      outcome = { kind: "done", value, at: now };
    } else if (op === "key_erred") {
      outcome = { kind: "erred", error: args.error as Outcome["error"], task: args.task as string, at: now };
    } else if (op === "key_cancelled") outcome = { kind: "cancelled", at: now };
    else outcome = { kind: "lost", at: now };
    this.#check(key, outcome);
    const first = this.held.get(key);
    if (first === null) this.held.set(key, outcome);
    else if (first !== undefined) this.#checkAgain(key, first, outcome);
  }

  /** Is this outcome one the run explains? */
  #check(key: string, o: Outcome): void {
    const sim = this.sim;
    const expected = sim.expected(key);
    const ancestry = sim.ancestry(key);
    const cancelled = [...ancestry].some((k) => this.cancelled.has(k));
    if (o.kind === "done") {
      const rerun = sim.expected(key, true);
      if (
        expected === null &&
        !(sim.hadFaults && rerun !== null && (o.value === undefined || o.value === rerun))
      ) {
        sim.fail(`${key} is done, but it must fail (${why(sim, key)})`);
      } else if (expected !== null && o.value !== undefined && o.value !== expected) {
        sim.fail(`${key} is done with ${o.value}, but its value is ${expected}`);
      }
      return;
    }
    if (o.kind === "cancelled") {
      if (!cancelled) sim.fail(`${key} was cancelled, but nothing it needs was`);
      return;
    }
    if (o.kind === "lost") {
      if (!sim.hadFaults) sim.fail(`${key} was lost without a fault`);
      return;
    }
    const e = o.error!;
    const t = sim.tasks.get(o.task!);
    if (e.message === `boom ${o.task}` && t !== undefined && ancestry.has(t.key)) {
      if (t.kind === "bad" || (t.kind === "flaky" && t.fails > t.retries)) return;
      // A flaky task may fail for good when deaths re-ran it and used up its retries.
      if (t.kind === "flaky" && sim.hadFaults) return;
      sim.fail(`${key} erred with ${o.task}'s error, but ${o.task} (${t.kind}) must succeed`);
      return;
    }
    if ((e.name === "KilledWorker" || e.name === "MissingDataError") && sim.hadFaults) return;
    if (cancelled && e.name === "MissingDataError") return;
    sim.fail(`${key} erred unexplained (task ${o.task}): ${e.name}: ${e.message}`);
  }

  /** A second outcome for a settled future must not contradict the first. */
  #checkAgain(key: string, first: Outcome, next: Outcome): void {
    if (
      first.kind === "done" && next.kind === "done" && first.value !== undefined &&
      next.value !== undefined &&
      first.value !== next.value
    ) {
      this.sim.fail(`${key} is done twice with different values: ${first.value}, then ${next.value}`);
    }
  }
}

/** Why `key` must fail: the failing task it needs. */
function why(sim: Sim, key: string): string {
  for (const k of sim.ancestry(key)) {
    const t = sim.tasks.get(k)!;
    if (t.kind === "bad") return `${k} always throws`;
    if (t.kind === "flaky" && t.fails > t.retries) {
      return `${k} throws ${t.fails} times with ${t.retries} retries`;
    }
  }
  return "?";
}

/** `tasks` in dependency order (a task after the tasks of this list it needs). */
function topo(tasks: SimTask[], _sim: Sim): SimTask[] {
  const byKey = new Map(tasks.map((t) => [t.key, t]));
  const out: SimTask[] = [];
  const done = new Set<string>();
  const visit = (t: SimTask) => {
    const stack: [SimTask, number][] = [[t, 0]];
    while (stack.length > 0) {
      const top = stack[stack.length - 1];
      const [task, i] = top;
      if (done.has(task.key)) {
        stack.pop();
        continue;
      }
      if (i < task.deps.length) {
        top[1]++;
        const d = byKey.get(task.deps[i]);
        if (d !== undefined && !done.has(d.key)) stack.push([d, 0]);
        continue;
      }
      done.add(task.key);
      out.push(task);
      stack.pop();
    }
  };
  for (const t of tasks) visit(t);
  return out;
}

// ---- one run ----

/** Runs one seed; returns what it found (failures empty when all held). */
export function runSeed(options: SimOptions): SimResult {
  const sim = new Sim(options);
  const { world, rng } = sim;
  const nworkers = options.workers ?? 2 + rng.int(3);
  const nclients = options.clients ?? 1 + rng.int(2);
  const actions = options.actions ?? 40 + rng.int(60);
  sim.startScheduler();
  for (let i = 0; i < nworkers; i++) sim.startWorker();
  for (let i = 0; i < nclients; i++) {
    const c = new SimClient(sim, `client${i + 1}`);
    sim.clients.push(c);
    c.connect();
  }
  // The active phase: client actions and faults at random times.
  let t = 10;
  for (let i = 0; i < actions; i++) {
    t += rng.float() * 40;
    world.at(t, () => act(sim));
  }
  const activeEnd = Math.min(t + 50, ACTIVE_MS_MAX);
  world.at(activeEnd, () => {
    sim.faulty = false;
    sim.log("faults stop");
  });
  const step = (until: number): boolean => {
    while (world.step(until)) {
      sim.watch?.();
      try {
        sim.validate();
      } catch (error) {
        sim.fail((error as Error).message);
        return false;
      }
      if (sim.failures.length > 0) return false;
    }
    return true;
  };
  const settled = () => sim.clients.every((c) => [...c.held.values()].every((o) => o !== null));
  const check = () => {
    if (!step(activeEnd)) return;
    // Settle: run until every held future has an outcome.
    const deadline = world.now + SETTLE_MS;
    while (!settled() && world.now < deadline) {
      if (!step(world.now + 100)) return;
    }
    if (!settled()) {
      for (const c of sim.clients) {
        for (const [key, o] of c.held) {
          if (o === null) sim.fail(`${c.id}'s future ${key} never settled: ${describe(sim, key)}`);
        }
      }
      return;
    }
    // Release everything; the cluster must forget it all.
    for (const c of sim.clients) c.release(true);
    const end = world.now + SETTLE_MS / 4;
    const empty = () =>
      sim.scheduler!.state.tasks.size === 0 && [...sim.workers.values()].every((w) => w.keyCount() === 0);
    while (!empty() && world.now < end) if (!step(world.now + 100)) return;
    if (!empty()) {
      const left = [...sim.scheduler!.state.tasks.keys()].slice(0, 5);
      for (const w of sim.workers.values()) {
        if (w.keyCount() > 0) {
          const keys = [...w.store.keys()].slice(0, 3);
          sim.fail(
            `${w.address} still holds ${w.keyCount()} keys after every release: ` +
              keys.map((k) => `${describe(sim, k)}, story ${JSON.stringify(w.state.story(k))}`).join("; "),
          );
        }
      }
      if (left.length > 0) {
        sim.fail(
          `the scheduler still has ${sim.scheduler!.state.tasks.size} tasks after every release: ` +
            left.map((k) => describe(sim, k)).join("; "),
        );
      }
    }
  };
  check();
  for (const c of sim.clients) c.closed = true;
  const outcomes: Record<string, number> = {};
  let futures = 0;
  for (const c of sim.clients) {
    for (const { outcome } of c.history) {
      futures++;
      const k = outcome?.kind ?? "unsettled";
      outcomes[k] = (outcomes[k] ?? 0) + 1;
    }
  }
  return {
    seed: options.seed,
    failures: sim.failures,
    steps: world.steps,
    simMs: world.now,
    futures,
    faults: sim.faults,
    outcomes,
  };
}

/** One random thing happens: a client acts, or (in a faulty run) a fault strikes. */
function act(sim: Sim): void {
  const { rng } = sim;
  const r = rng.float();
  const client = rng.pick(sim.clients);
  if (!sim.faulty || r < 0.8) {
    const a = rng.float();
    if (a < 0.55) client.submit();
    else if (a < 0.65) client.scatter();
    else if (a < 0.9) client.release();
    else client.cancel();
    return;
  }
  const workers = [...sim.workers.values()].filter((w) => w.alive);
  const f = rng.float();
  sim.hadFaults = true;
  if (f < 0.2 && workers.length > 0) {
    sim.fault("crash worker");
    const w = rng.pick(workers);
    w.crash();
    sim.world.after(50 + rng.float() * 500, () => sim.startWorker());
  } else if (f < 0.35 && workers.length > 0) {
    sim.fault("cut worker-scheduler link");
    rng.pick(workers).cutScheduler();
  } else if (f < 0.5 && workers.length > 0) {
    sim.fault("cut peer links");
    rng.pick(workers).cutPeers();
  } else if (f < 0.65 && workers.length > 0) {
    sim.fault("busy worker");
    rng.pick(workers).busyFor(50 + rng.float() * 500);
  } else if (f < 0.78 && workers.length > 0) {
    sim.fault("executor dies");
    rng.pick(workers).killExecutor();
  } else if (f < 0.86) {
    sim.fault("client link cut");
    client.link?.cut();
  } else if (f < 0.92 && sim.scheduler?.alive) {
    sim.fault("scheduler restart");
    sim.scheduler.kill();
    sim.world.after(20 + rng.float() * 300, () => sim.startScheduler());
  } else if (workers.length > 0) {
    sim.fault("slow executor");
    rng.pick(workers).slowFor(200 + rng.float() * 2_000);
  }
}

/** What the scheduler and the workers know of `key`, for a failure report. */
function describe(sim: Sim, key: string): string {
  const ts = sim.scheduler?.state.tasks.get(key);
  const parts = [
    ts
      ? `scheduler: ${ts.state}, waits for ${
        [...ts.waitingOn].map((d) =>
          `${d.key} (${d.state}, held by ${d.whoHas.size}, waits for ${
            [...d.waitingOn].map((e) =>
              `${e.key} ${e.state} run=${e.run !== null} wants=${e.whoWants.size} waiters=${
                [...e.waiters].map((w) => w.key)
              } deps=${
                [...e.dependencies].map((x) => x.key + ":" + x.state)
              }`
            ).join(" ") || "nothing"
          })`
        ).join(" ") || "nothing"
      }, on ${ts.processingOn?.address ?? "-"}, held by ${
        [...ts.whoHas].map((w) => w.address).join(" ") || "-"
      }`
      : "scheduler: unknown",
  ];
  for (const w of sim.workers.values()) {
    const s = w.stateOf(key);
    if (s !== null) parts.push(`${w.address}: ${s}`);
  }
  return `${key} (${parts.join("; ")})`;
}

// ---- the command ----

if (import.meta.main) {
  const args = Deno.args;
  const flag = (name: string) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
  };
  const verbose = args.includes("--verbose");
  const one = flag("--seed");
  const seeds = one !== undefined ? [Number(one)] : (() => {
    const n = Number(flag("--seeds") ?? 200);
    const start = Number(flag("--start") ?? Date.now() % 1_000_000);
    return Array.from({ length: n }, (_, i) => start + i);
  })();
  const started = performance.now();
  let failed = 0;
  let steps = 0;
  let futures = 0;
  const faults: Record<string, number> = {};
  for (const seed of seeds) {
    const r = runSeed({ seed, verbose });
    steps += r.steps;
    futures += r.futures;
    for (const [k, n] of Object.entries(r.faults)) faults[k] = (faults[k] ?? 0) + n;
    if (r.failures.length > 0) {
      failed++;
      console.log(`seed ${seed} FAILED (${r.failures.length}):`);
      for (const f of r.failures.slice(0, 5)) console.log(`  ${f}`);
      console.log(`  replay: deno task sim --seed ${seed} --verbose`);
    }
  }
  const s = (performance.now() - started) / 1000;
  console.log(
    `${seeds.length} seeds (${seeds[0]}..${seeds[seeds.length - 1]}) in ${s.toFixed(1)} s: ` +
      `${(seeds.length / s).toFixed(1)} seeds/s, ${steps} events, ${futures} futures; ${failed} failed`,
  );
  console.log(`faults: ${JSON.stringify(faults)}`);
  if (failed > 0) Deno.exit(1);
}

export type { ComputeTaskArgs };
