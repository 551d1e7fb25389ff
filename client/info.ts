/**
 * `dist info`: what a cluster looks like right now, from its scheduler.
 *
 * @module
 */

import type { Address } from "../protocol/address.ts";
import type {
  KeyStory,
  SchedulerIdentity,
  SchedulerOps,
  WorkerIdentity,
  WorkerInfo,
  WorkerOps,
} from "../protocol/ops.ts";
import { rpc } from "../protocol/rpc.ts";
import { formatBytes } from "../util/memory.ts";

/** A cluster at a glance. */
export interface ClusterInfo {
  /** The scheduler's identity (address, id, dashboard). */
  scheduler: SchedulerIdentity;
  /** Every worker with what it holds and runs. */
  workers: WorkerInfo[];
  /** Tasks the scheduler knows, by state. */
  tasks: Record<string, number>;
  /** Progress per task kind: done, erred, processing, waiting. */
  progress: Record<string, Record<string, number>>;
  /** Keys held somewhere in the cluster. */
  keys: number;
  /** What the scheduler says is wrong with its queue (tasks no worker may run), in words. */
  problems: string[];
}

/**
 * Asks the scheduler at `address` for its workers, keys and tasks. Throws an Error that
 * names the worker's scheduler when `address` is a worker's.
 */
export async function clusterInfo(
  address: string | Address,
  options: { authToken?: string } = {},
): Promise<ClusterInfo> {
  await using scheduler = rpc<SchedulerOps>(address, { authToken: options.authToken, timeoutMs: 30_000 });
  const identity = await scheduler.identity() as SchedulerIdentity | WorkerIdentity;
  if (identity.type === "worker") {
    throw new Error(
      `${identity.address} is a worker (${identity.name}), not a scheduler: a cluster is shown from its ` +
        `scheduler, dist info ${identity.scheduler}; a key on this worker with dist info ${identity.address} --story KEY`,
    );
  }
  const [workers, states, whoHas, problems] = await Promise.all([
    scheduler.workers(),
    scheduler.progress(),
    scheduler.who_has(),
    // A scheduler older than this op has none to tell.
    scheduler.problems().catch(() => [] as string[]),
  ]);
  const tasks: Record<string, number> = {};
  for (const byState of Object.values(states)) {
    for (const [state, n] of Object.entries(byState)) tasks[state] = (tasks[state] ?? 0) + n;
  }
  return {
    scheduler: identity,
    workers,
    tasks,
    progress: states,
    keys: Object.keys(whoHas).length,
    problems,
  };
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) =>
    r.map((cell, c) => c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c])).join("  ")
  ).join(
    "\n",
  );
}

/** The report as tables, for a terminal. */
export function formatInfo(info: ClusterInfo): string {
  const s = info.scheduler;
  const lines = [
    `Scheduler ${s.address}  (${info.workers.length} workers, ${info.keys} keys held${
      s.dashboard ? `, dashboard ${s.dashboard}` : ""
    })`,
    "",
  ];
  const workers = [
    ["worker", "name", "threads", "keys", "in memory", "spilled", "limit", "tasks", "cpu", "last seen", ""],
  ];
  for (const w of info.workers) {
    // Figures of the worker's latest heartbeat; before its first, what the scheduler counted.
    const m = w.metrics;
    workers.push([
      w.address,
      w.name,
      String(w.nthreads),
      String(w.nkeys),
      formatBytes(m.managed ?? w.nbytes),
      formatBytes(m.spilled ?? 0),
      m.memory_limit ? formatBytes(m.memory_limit) : "none",
      String(w.processing),
      `${Math.round((m.cpu ?? 0) * 100)} %`,
      `${w.last_seen.toFixed(1)} s ago`,
      m.paused === 1 ? "paused" : "",
    ]);
  }
  lines.push(info.workers.length ? table(workers) : "No workers.", "");
  // What workers say is wrong on them (a spill that fails, and why).
  const problems = [
    ...info.problems.map((p) => `  queue: ${p}`),
    ...info.workers.flatMap((w) => (w.problems ?? []).map((p) => `  ${w.name}: ${p}`)),
  ];
  if (problems.length) lines.push("Problems:", ...problems, "");
  const states = ["released", "waiting", "queued", "processing", "memory", "erred"];
  lines.push(table([["tasks", ...states], ["", ...states.map((st) => String(info.tasks[st] ?? 0))]]));
  return lines.join("\n");
}

/** A key's state and recent moves on one node (scheduler or worker), as its `story` op tells. */
export async function keyStory(
  address: string | Address,
  key: string,
  options: { authToken?: string } = {},
): Promise<KeyStory & { node: "scheduler" | "worker"; address: string }> {
  await using node = rpc<SchedulerOps & WorkerOps>(address, {
    authToken: options.authToken,
    timeoutMs: 30_000,
  });
  const identity = await node.identity() as { type: string; address: string };
  const story = await node.story({ key });
  return {
    ...story,
    node: identity.type === "scheduler" ? "scheduler" : "worker",
    address: identity.address,
  };
}

/** A story as lines: the state now, then one line per move (time, from -> to, why). */
export function formatStory(s: KeyStory & { node: string; address: string }): string {
  const lines = [`${s.key} on ${s.node} ${s.address}: ${s.state}`];
  if (s.why) lines.push(`  ${s.why}`);
  if (s.story.length === 0) {
    lines.push(`  no moves remembered (a key it never knew, or moves older than its story keeps)`);
  }
  for (const e of s.story) {
    lines.push(`  ${new Date(e.time).toISOString()}  ${e.from} -> ${e.to}  (${e.reason})`);
  }
  return lines.join("\n");
}
