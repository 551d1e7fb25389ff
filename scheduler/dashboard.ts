/**
 * What the scheduler shows: the dashboard's data (recent tasks per worker thread,
 * transfers, memory over time), its pages and live stream (Server-Sent Events), and
 * the Prometheus metrics. Fed by the scheduler shell; reads the state, never changes it.
 *
 * @module
 */

import { type Family, Histogram, html, LoopLag, prometheus, type Route } from "../util/http.ts";
import type { Transfer } from "../protocol/ops.ts";
import { DASHBOARD_PAGE } from "./dashboard_page.ts";
import type { SchedulerTasks } from "./tasks.ts";

/** Most recent tasks the task stream keeps. */
export const TASK_STREAM_MAX = 5_000;
/** Most recent transfers kept. */
export const TRANSFERS_MAX = 2_000;
/** Memory samples kept per worker (one a second). */
export const MEMORY_SAMPLES_MAX = 600;
/** How often the live stream sends an update. */
const STREAM_INTERVAL_MS = 500;
/** Most open live streams at once. */
const STREAMS_MAX = 64;

/** One task run, for the timeline. */
export interface TaskEvent {
  key: string;
  prefix: string;
  worker: string;
  thread: number;
  start: number;
  stop: number;
  status: "done" | "erred";
}

/** One transfer, for the timeline: `to` fetched `nbytes` from `from`. */
export interface TransferEvent extends Transfer {
  to: string;
}

/** The last `max` items pushed, oldest first; a push costs the same however full it is. */
export class Ring<T> {
  #items: T[] = [];
  /** Where the oldest item is, once the ring is full. */
  #head = 0;
  #max: number;
  /** Items ever pushed: a stream asks for what came after the count it saw. */
  total = 0;
  constructor(max: number) {
    this.#max = max;
  }
  push(item: T): void {
    this.total++;
    if (this.#items.length < this.#max) {
      this.#items.push(item);
      return;
    }
    // Full: the newest takes the oldest's place (it was a splice of the whole array).
    this.#items[this.#head] = item;
    this.#head = (this.#head + 1) % this.#max;
  }
  /**
   * The item the next push writes over (the oldest), once full: a record ring fills it in
   * and pushes it back, and allocates nothing per item (a task's run, on every task).
   */
  spare(): T | undefined {
    return this.#items.length < this.#max ? undefined : this.#items[this.#head];
  }
  /** The items pushed after the first `total` ever pushed (those still kept), oldest first. */
  since(total: number): T[] {
    const length = this.#items.length;
    const n = Math.min(length, this.total - total);
    const out: T[] = [];
    for (let i = length - Math.max(0, n); i < length; i++) out.push(this.#items[(this.#head + i) % length]);
    return out;
  }
}

/** The dashboard's view of a scheduler. */
export class Dashboard {
  readonly tasks = new Ring<TaskEvent>(TASK_STREAM_MAX);
  readonly transfers = new Ring<TransferEvent>(TRANSFERS_MAX);
  readonly memory = new Ring<{ t: number; workers: Record<string, number> }>(MEMORY_SAMPLES_MAX);
  readonly durations = new Histogram([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60]);
  transferredBytes = 0;
  readonly lag = new LoopLag();
  #state: SchedulerTasks;
  #info: () => { address: string; id: string; clients: number; started: number };
  #sampler: ReturnType<typeof setInterval>;
  #streams = new Set<ReadableStreamDefaultController<Uint8Array>>();

  /** Watches `state`; `info` gives what the shell knows (address, clients). */
  constructor(
    state: SchedulerTasks,
    info: () => { address: string; id: string; clients: number; started: number },
  ) {
    this.#state = state;
    this.#info = info;
    this.#sampler = setInterval(() => {
      const workers: Record<string, number> = {};
      for (const w of state.workers.values()) workers[w.address] = w.nbytes;
      this.memory.push({ t: Date.now(), workers });
    }, 1_000);
  }

  /** Its sampling no longer keeps the process alive (an embedded scheduler's). */
  unref(): void {
    Deno.unrefTimer(this.#sampler);
  }

  /** A task ran on `worker`'s executor `thread` from `start` to `stop` (epoch ms). */
  onTask(
    key: string,
    prefix: string,
    worker: string,
    thread: number,
    start: number,
    stop: number,
    status: TaskEvent["status"],
  ): void {
    const event = this.tasks.spare();
    if (event === undefined) this.tasks.push({ key, prefix, worker, thread, start, stop, status });
    else {
      event.key = key;
      event.prefix = prefix;
      event.worker = worker;
      event.thread = thread;
      event.start = start;
      event.stop = stop;
      event.status = status;
      this.tasks.push(event);
    }
    this.durations.observe(Math.max(0, stop - start) / 1000);
  }

  /** `worker` reports the fetches it made. */
  onTransfers(worker: string, transfers: Transfer[]): void {
    for (const t of transfers) {
      this.transfers.push({ ...t, to: worker });
      this.transferredBytes += t.nbytes;
    }
  }

  /** Stops the timers and ends every live stream. */
  close(): void {
    clearInterval(this.#sampler);
    this.lag.stop();
    for (const s of this.#streams) {
      try {
        s.close();
      } catch { /* closed by the client */ }
    }
    this.#streams.clear();
  }

  /** Everything the page shows, and the stream items after the given counts. */
  snapshot(since: { tasks?: number; transfers?: number; memory?: number } = {}) {
    const state = this.#state;
    const now = Date.now();
    const info = this.#info();
    const progress = state.progressTotals();
    // Kept by the state as tasks move: this costs the number of states, not of tasks.
    const byState: Record<string, number> = {};
    for (const [s, n] of Object.entries(state.counts())) if (n > 0 && s !== "forgotten") byState[s] = n;
    return {
      scheduler: { ...info, uptime: (now - info.started) / 1000, lag: this.lag.seconds },
      totals: { completed: state.completed, failed: state.failed, queued: state.queued, byState },
      workers: [...state.workers.values()].map((w) => ({
        address: w.address,
        name: w.name,
        nthreads: w.nthreads,
        nkeys: w.hasWhat.size,
        nbytes: w.nbytes,
        processing: w.processing.size,
        executing: w.metrics.executing ?? 0,
        cpu: w.metrics.cpu ?? 0,
        rss: w.metrics.rss ?? 0,
        managed: w.metrics.managed ?? w.nbytes,
        spilled: w.metrics.spilled ?? 0,
        memoryLimit: w.metrics.memory_limit ?? 0,
        paused: w.metrics.paused === 1,
        problems: w.problems,
        bytesIn: w.metrics.bytes_in ?? 0,
        bytesOut: w.metrics.bytes_out ?? 0,
        lastSeen: (now - w.lastSeen) / 1000,
      })),
      progress,
      problems: state.problems,
      // Copies: the ring's records are written over as tasks run.
      tasks: this.tasks.since(since.tasks ?? 0).map((t) => ({ ...t })),
      transfers: this.transfers.since(since.transfers ?? 0),
      memory: this.memory.since(since.memory ?? 0),
      counts: { tasks: this.tasks.total, transfers: this.transfers.total, memory: this.memory.total },
      now,
    };
  }

  /** The dashboard's routes: the page, /api/snapshot, /events and /metrics. */
  routes(): Route[] {
    return [
      (_req, url) => url.pathname === "/" ? html(DASHBOARD_PAGE) : null,
      (_req, url) => url.pathname === "/api/snapshot" ? Response.json(this.snapshot()) : null,
      (req, url) => url.pathname === "/events" ? this.#events(req) : null,
      (_req, url) => url.pathname === "/metrics" ? prometheus(this.metrics()) : null,
    ];
  }

  // The stream's cancel() is how a viewer's leaving is seen (request.signal in Deno 2.9
  // also fires on success, with a warning on stderr that would break JSON logs).
  #events(_request: Request): Response {
    if (this.#streams.size >= STREAMS_MAX) {
      return new Response(`Too many live streams (${STREAMS_MAX} open)\n`, { status: 503 });
    }
    const encoder = new TextEncoder();
    let timer: ReturnType<typeof setInterval> | undefined;
    let controller: ReadableStreamDefaultController<Uint8Array>;
    const seen = { tasks: 0, transfers: 0, memory: 0 };
    const stop = () => {
      clearInterval(timer);
      this.#streams.delete(controller);
    };
    const body = new ReadableStream<Uint8Array>({
      start: (c) => {
        controller = c;
        this.#streams.add(c);
        const send = () => {
          const snap = this.snapshot(seen);
          Object.assign(seen, snap.counts);
          try {
            c.enqueue(encoder.encode(`event: snapshot\ndata: ${JSON.stringify(snap)}\n\n`));
          } catch {
            stop();
          }
        };
        send();
        timer = setInterval(send, STREAM_INTERVAL_MS);
      },
      cancel: stop,
    });
    return new Response(body, {
      headers: { "content-type": "text/event-stream", "cache-control": "no-store", connection: "keep-alive" },
    });
  }

  /** The scheduler's Prometheus metrics. */
  metrics(): Family[] {
    const snap = this.snapshot({ tasks: Infinity, transfers: Infinity, memory: Infinity });
    const states = ["released", "waiting", "queued", "processing", "memory", "erred"];
    const worker = (
      name: string,
      help: string,
      pick: (w: typeof snap.workers[number]) => number,
    ): Family => ({
      name,
      help,
      type: "gauge",
      samples: snap.workers.map((w) => ({ labels: { worker: w.address }, value: pick(w) })),
    });
    return [
      {
        name: "dist_workers",
        help: "Workers registered.",
        type: "gauge",
        samples: [{ value: snap.workers.length }],
      },
      {
        name: "dist_scheduler_desired_workers",
        help:
          "Workers the work queued and running would like (for an autoscaler): its expected seconds over " +
          "5 s per thread, and enough workers to hold the values under their memory limits.",
        type: "gauge",
        samples: [{ value: this.#state.desiredWorkers() }],
      },
      {
        name: "dist_clients",
        help: "Clients connected.",
        type: "gauge",
        samples: [{ value: snap.scheduler.clients }],
      },
      {
        name: "dist_tasks",
        help: "Tasks the scheduler knows, by state.",
        type: "gauge",
        samples: states.map((s) => ({ labels: { state: s }, value: snap.totals.byState[s] ?? 0 })),
      },
      {
        name: "dist_tasks_completed_total",
        help: "Tasks that finished.",
        type: "counter",
        samples: [{ value: snap.totals.completed }],
      },
      {
        name: "dist_tasks_failed_total",
        help: "Tasks that failed for good.",
        type: "counter",
        samples: [{ value: snap.totals.failed }],
      },
      worker("dist_worker_bytes", "Bytes a worker holds.", (w) => w.nbytes),
      worker("dist_worker_keys", "Keys a worker holds.", (w) => w.nkeys),
      worker("dist_worker_tasks_processing", "Tasks sent to a worker and not finished.", (w) => w.processing),
      worker("dist_worker_cpu_ratio", "Share of a worker's executor time spent in tasks.", (w) => w.cpu),
      worker("dist_worker_managed_bytes", "Bytes of values a worker holds in memory.", (w) => w.managed),
      worker("dist_worker_spilled_bytes", "Bytes of values a worker spilled to disk.", (w) => w.spilled),
      worker("dist_worker_memory_limit_bytes", "A worker's memory limit; 0 for none.", (w) => w.memoryLimit),
      worker("dist_worker_paused", "1 while a worker is paused by memory.", (w) => (w.paused ? 1 : 0)),
      worker(
        "dist_worker_spill_failing",
        "1 while a worker cannot spill to disk (the reason is on the dashboard and in its log).",
        (w) => (w.problems.length > 0 ? 1 : 0),
      ),
      {
        name: "dist_transferred_bytes_total",
        help: "Bytes workers fetched from each other.",
        type: "counter",
        samples: [{ value: this.transferredBytes }],
      },
      {
        name: "dist_task_duration_seconds",
        help: "How long tasks ran on executors.",
        type: "histogram",
        samples: this.durations.samples(),
      },
      {
        name: "dist_event_loop_lag_seconds",
        help: "How late the scheduler's timers fire: its event loop's backlog.",
        type: "gauge",
        samples: [{ value: this.lag.seconds }],
      },
    ];
  }
}
