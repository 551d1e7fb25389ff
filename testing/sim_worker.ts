/**
 * A worker in the simulation: the real `WorkerState` with a shell that does in a few
 * lines what `worker/worker.ts` does with sockets, timers and executors. Values are
 * numbers (a task's value is `computeValue` of its inputs), executors are timers, and
 * every message goes over a simulated link, checked against the op tables.
 *
 * @module
 */

import { type Instruction, type ToScheduler, type WorkerEvent, WorkerState } from "../worker/state.ts";
import { workerOps } from "../protocol/ops.ts";
import type { Link } from "./sim_net.ts";
import { computeValue, HEARTBEAT_MS, RECONNECT_MS, type Reply, SCHEDULER, send, type Sim } from "./sim.ts";

/** How long a task runs, simulated ms (longer while the worker is slowed). */
const TASK_MS_MAX = 20;

/** A running task: its timer's cancel, so abort and a dying executor can stop it. */
interface Running {
  key: string;
  stop: () => void;
  /** Ends it as a death of its executor. */
  kill: () => void;
}

/** One worker node of the simulation. */
export class SimWorker {
  readonly state: WorkerState;
  alive = true;
  /** Values held (what the DataStore holds in a real worker). */
  readonly store = new Map<string, number>();
  #scheduler: Link | null = null;
  /** The link a registration is under way on: the scheduler may send tasks on it before it answers. */
  #registering: Link | null = null;
  /** Links to peers this worker fetches from, by address. */
  readonly #peers = new Map<string, Link>();
  /** Links others opened to this worker. */
  readonly #incoming = new Set<Link>();
  readonly #running = new Map<string, Running>();
  /** gather_keys waiting for the state's answer, by request id. */
  readonly #requests = new Map<number, Reply>();
  #requestIds = 0;
  #busyUntil = 0;
  /** task_finished sent (for a planted defect). */
  #finished = 0;
  #slowUntil = 0;
  /** Tasks here take well under a millisecond: the state hands them to executors ahead. */
  readonly #quick: boolean;

  constructor(readonly sim: Sim, readonly address: string, nthreads: number) {
    this.state = new WorkerState({ address, nthreads, random: () => sim.rng.float() });
    this.#quick = sim.rng.float() < 0.5;
  }

  // ---- what the checks read ----

  peek(key: string): number | undefined {
    return this.alive ? this.store.get(key) : undefined;
  }

  keyCount(): number {
    return this.store.size;
  }

  stateOf(key: string): string | null {
    const s = this.state.stateOf(key);
    return s === "released" && !this.store.has(key) ? null : s;
  }

  /** The store and the state agree on what is held. */
  validate(): void {
    this.state.validate();
    const memory = new Set(this.state.memoryKeys());
    for (const key of this.store.keys()) {
      if (!memory.has(key)) {
        throw new Error(`holds ${key}, which its state has as ${this.state.stateOf(key)}`);
      }
    }
    for (const key of memory) {
      if (!this.store.has(key)) throw new Error(`its state has ${key} in memory, not held`);
    }
  }

  // ---- the scheduler connection ----

  connect(): void {
    if (!this.alive) return;
    const sched = this.sim.scheduler;
    if (sched === null || !sched.alive) {
      this.sim.world.after(RECONNECT_MS, () => this.connect());
      return;
    }
    const link = this.sim.world.link(this.address, SCHEDULER);
    sched.accept(link);
    // As the real shell: what the worker says before the reply follows register on this link.
    this.#registering = link;
    this.#apply({ type: "scheduler-found" });
    link.onClose(() => {
      if (!this.alive) return;
      if (this.#registering === link || this.#scheduler === link) {
        this.#registering = null;
        this.#scheduler = null;
        this.#apply({ type: "scheduler-lost" });
        this.sim.world.after(RECONNECT_MS, () => this.connect());
      }
    });
    const keys = [...this.store.keys()];
    send(link, this.address, sched, "register", {
      address: this.address,
      nthreads: this.state.nthreads,
      keys,
      nbytes: Object.fromEntries(keys.map((k) => [k, 8])),
      external: this.state.ownKeys(),
    }, (_result, error) => {
      if (!this.alive || !link.open) return;
      if (error !== undefined) {
        link.cut();
        return;
      }
      this.#registering = null;
      this.#scheduler = link;
      this.#heartbeat(link);
    });
  }

  #heartbeat(link: Link): void {
    this.sim.world.after(HEARTBEAT_MS, () => {
      if (!this.alive || this.#scheduler !== link || !link.open) return;
      send(link, this.address, this.sim.scheduler!, "heartbeat", { address: this.address }, (result) => {
        if ((result as { status?: string } | undefined)?.status !== "OK") link.cut();
      });
      this.#heartbeat(link);
    });
  }

  // ---- incoming ----

  accept(link: Link): void {
    this.#incoming.add(link);
    link.onClose(() => this.#incoming.delete(link));
  }

  receive(link: Link, op: string, raw: unknown, reply: Reply | null): void {
    if (!this.alive) return;
    const args = this.sim.checkMessage(workerOps, "worker", op, raw) as Record<string, unknown> | null;
    if (args === null) return;
    // deno-lint-ignore no-explicit-any
    const a = args as any;
    const ok = { status: "OK" };
    const fromScheduler = link === this.#scheduler || link === this.#registering;
    switch (op) {
      case "get_data": {
        if (this.sim.world.now < this.#busyUntil) {
          reply?.(null, { name: "BusyError", message: `Busy: ${this.address}` });
          return;
        }
        const data: Record<string, number> = {};
        for (const key of a.keys as string[]) if (this.store.has(key)) data[key] = this.store.get(key)!;
        reply?.(a.bytes_max === undefined ? data : { data, rest: [] });
        return;
      }
      case "update_data": {
        const nbytes: Record<string, number> = {};
        for (const [key, value] of Object.entries(a.data as Record<string, number>)) {
          this.store.set(key, value);
          nbytes[key] = 8;
          this.#apply({ type: "put", key, nbytes: 8, own: a.report !== false });
        }
        reply?.({ status: "OK", nbytes });
        return;
      }
      case "delete_data":
        this.#apply({ type: "delete", keys: a.keys });
        reply?.(ok);
        return;
      case "keys":
        reply?.([...this.store.keys()]);
        return;
      case "ping":
        reply?.("pong");
        return;
    }
    if (!fromScheduler) {
      reply?.(null, { name: "ProtocolError", message: `Op ${op} is for the scheduler only` });
      return;
    }
    switch (op) {
      case "compute_task":
        this.#apply({
          type: "compute",
          key: a.key,
          task: { who_has: a.who_has, nbytes: a.nbytes, run: a.key },
        });
        return;
      case "free_keys":
        this.#apply({ type: "free", keys: a.keys });
        reply?.(ok);
        return;
      case "cancel_task":
        this.#apply({ type: "cancel", keys: a.keys });
        reply?.(ok);
        return;
      case "gather_keys": {
        const id = ++this.#requestIds;
        if (reply) this.#requests.set(id, reply);
        this.#apply({
          type: "acquire",
          id,
          keys: Object.keys(a.who_has),
          who_has: a.who_has,
          replica: false,
        });
        return;
      }
      default:
        this.sim.fail(`the simulated worker does not handle ${op}`);
    }
  }

  // ---- the shell ----

  #apply(event: WorkerEvent, values?: Record<string, number>): void {
    if (!this.alive) return;
    if (this.sim.options.verbose) {
      const what = "key" in event
        ? event.key
        : "keys" in event
        ? event.keys.join(" ")
        : "peer" in event
        ? event.peer
        : "";
      this.sim.log(`${this.address} <- ${event.type} ${what}`);
    }
    for (const i of this.state.handle(event, this.sim.world.now)) this.#carryOut(i, values);
  }

  #carryOut(i: Instruction, values: Record<string, number> | undefined): void {
    const world = this.sim.world;
    switch (i.type) {
      case "store":
        for (const key of i.keys) {
          if (values === undefined || !(key in values)) {
            this.sim.fail(`${this.address} was told to store ${key}, which it does not have in hand`);
            continue;
          }
          this.store.set(key, values[key]);
        }
        return;
      case "discard":
        return;
      case "drop":
        for (const key of i.keys) this.store.delete(key);
        return;
      case "fetch":
        this.#fetch(i.peer, i.keys);
        return;
      case "execute":
        this.#execute(i.key);
        return;
      case "abort": {
        const run = this.#running.get(i.key);
        if (run === undefined) return;
        run.stop();
        this.#running.delete(i.key);
        world.after(0.1, () =>
          this.#apply({
            type: "execute-failed",
            key: i.key,
            error: { name: "CancelledError", message: `${i.key} was cancelled` },
            killed: false,
            report: {},
          }));
        return;
      }
      case "lookup": {
        const link = this.#scheduler ?? this.#registering;
        if (link === null || !link.open) {
          world.after(0.1, () => this.#apply({ type: "lookup-failed", keys: i.keys }));
          return;
        }
        let answered = false;
        link.onClose(() => {
          if (!answered) this.#apply({ type: "lookup-failed", keys: i.keys });
          answered = true;
        });
        send(link, this.address, this.sim.scheduler!, "who_has", { keys: i.keys }, (result, error) => {
          if (answered) return;
          answered = true;
          if (error !== undefined) this.#apply({ type: "lookup-failed", keys: i.keys });
          else {
            const whoHas = result as Record<string, string[]>;
            this.#apply({
              type: "who-has",
              who_has: Object.fromEntries(i.keys.map((k) => [k, whoHas[k] ?? []])),
            });
          }
        });
        return;
      }
      case "send":
        this.#send(i.message);
        return;
      case "acquired": {
        const reply = this.#requests.get(i.id);
        this.#requests.delete(i.id);
        if (i.error !== undefined) reply?.(null, { name: "Error", message: String(i.error) });
        else reply?.({ status: "OK", missing: Object.keys(i.missing) });
        return;
      }
      case "wake": {
        // Real timers fire to the millisecond: sometimes a little before the moment asked for.
        const early = this.sim.rng.float() < 0.3 ? this.sim.rng.float() : 0;
        world.at(i.at - early, () => this.#apply({ type: "tick" }));
        return;
      }
    }
  }

  #send(m: ToScheduler): void {
    const link = this.#scheduler ?? this.#registering;
    const sched = this.sim.scheduler;
    if (link === null || !link.open || sched === null) return;
    switch (m.op) {
      case "task_finished":
        if (this.sim.options.plant === "lose-results" && ++this.#finished % 10 === 0) return;
        send(link, this.address, sched, "task_finished", { duration: 0, ...m.args });
        return;
      case "task_erred": {
        const e = m.error as { name?: string; message?: string };
        send(link, this.address, sched, "task_erred", {
          key: m.key,
          error: { name: String(e?.name ?? "Error"), message: String(e?.message ?? e) },
          killed: m.killed,
          ...m.report,
        });
        return;
      }
      case "missing_data":
        send(link, this.address, sched, "missing_data", m.args);
        return;
      case "add_keys":
        send(link, this.address, sched, "add_keys", { address: this.address, ...m.args });
        return;
    }
  }

  #fetch(peer: string, keys: string[]): void {
    const world = this.sim.world;
    const target = this.sim.workers.get(peer);
    if (target === undefined || !target.alive) {
      // Nobody listens there: the connection fails after a moment.
      world.after(world.delay(), () => this.#apply({ type: "fetch-failed", peer, reason: "gone" }));
      return;
    }
    let link = this.#peers.get(peer);
    if (link === undefined || !link.open) {
      link = world.link(this.address, peer);
      target.accept(link);
      this.#peers.set(peer, link);
    }
    let answered = false;
    link.onClose(() => {
      if (answered) return;
      answered = true;
      this.#apply({ type: "fetch-failed", peer, reason: "gone" });
    });
    send(link, this.address, target, "get_data", { keys, bytes_max: 1 << 30 }, (result, error) => {
      if (answered) return;
      answered = true;
      if (error !== undefined) {
        const reason = error.name === "BusyError" ? "busy" : "refused";
        this.#apply({ type: "fetch-failed", peer, reason, error });
        return;
      }
      const data = (result as { data: Record<string, number> }).data;
      const nbytes = Object.fromEntries(Object.keys(data).map((k) => [k, 8]));
      if (Object.keys(data).length > 0) this.#apply({ type: "fetched", peer, nbytes }, data);
      this.#apply({ type: "fetch-done", peer });
    });
  }

  #execute(key: string): void {
    const sim = this.sim;
    const world = sim.world;
    const task = sim.tasks.get(key);
    if (task === undefined) {
      sim.fail(`${this.address} was told to run ${key}, which no client submitted`);
      return;
    }
    // Inputs are read now, as the real shell resolves them when it starts the run.
    const inputs: number[] = [];
    for (const dep of task.deps) {
      const v = this.store.get(dep);
      if (v === undefined) {
        sim.fail(`${this.address} runs ${key} without its input ${dep} (state ${this.state.stateOf(dep)})`);
        return;
      }
      inputs.push(v);
    }
    const runs = (sim.runs.get(key) ?? 0) + 1;
    sim.runs.set(key, runs);
    const slow = world.now < this.#slowUntil ? 20 : 1;
    const ms = (this.#quick ? 0.01 + sim.rng.float() * 0.2 : 0.5 + sim.rng.float() * TASK_MS_MAX) * slow;
    const report = { start: world.now, stop: world.now + ms };
    let done = false;
    const finish = (event: WorkerEvent, values?: Record<string, number>) => {
      if (done) return;
      done = true;
      this.#running.delete(key);
      this.#apply(event, values);
    };
    const timer = { cancelled: false };
    world.after(ms, () => {
      if (timer.cancelled) return;
      const fails = task.kind === "bad" || (task.kind === "flaky" && runs <= task.fails);
      if (fails) {
        finish({
          type: "execute-failed",
          key,
          error: { name: "Error", message: `boom ${key}` },
          killed: false,
          report,
        });
      } else {
        finish({ type: "executed", key, nbytes: 8, report }, { [key]: computeValue(key, inputs) });
      }
    });
    this.#running.set(key, {
      key,
      stop: () => {
        timer.cancelled = true;
        done = true;
      },
      kill: () => {
        timer.cancelled = true;
        finish({
          type: "execute-failed",
          key,
          error: { name: "ExecutorDiedError", message: `The executor running ${key} died` },
          killed: true,
          report: {},
        });
      },
    });
  }

  // ---- faults ----

  /** The process dies: links drop, data and state are gone. */
  crash(): void {
    this.alive = false;
    this.#scheduler?.cut();
    this.#registering?.cut();
    for (const link of this.#peers.values()) link.cut();
    for (const link of this.#incoming) link.cut();
    for (const run of this.#running.values()) run.stop();
    this.#running.clear();
    this.store.clear();
    this.sim.workers.delete(this.address);
  }

  cutScheduler(): void {
    this.#scheduler?.cut();
  }

  cutPeers(): void {
    for (const link of this.#peers.values()) link.cut();
    for (const link of this.#incoming) link.cut();
  }

  busyFor(ms: number): void {
    this.#busyUntil = this.sim.world.now + ms;
  }

  /** The executor of one running task dies. */
  killExecutor(): void {
    const runs = [...this.#running.values()];
    if (runs.length > 0) this.sim.rng.pick(runs).kill();
  }

  slowFor(ms: number): void {
    this.#slowUntil = this.sim.world.now + ms;
  }
}
