/**
 * What the tests share: in-process clusters on 127.0.0.1 with port 0, and a bounded
 * poll for things that happen asynchronously.
 *
 * @module
 */

import { createLogger, type Logger, type LogLevel } from "../util/log.ts";
import {
  type SchedulerNode,
  startScheduler,
  startWorker,
  type WorkerNode,
  type WorkerOptions,
} from "../mod.ts";

/** Test logs are silent unless DIST_TEST_LOG names a level. */
export function testLogger(name: string): Logger {
  return createLogger(name, (Deno.env.get("DIST_TEST_LOG") as LogLevel | undefined) ?? "silent");
}

/** A scheduler and workers in this process. */
export interface Cluster extends AsyncDisposable {
  scheduler: SchedulerNode;
  workers: WorkerNode[];
  close(): Promise<void>;
}

/** Starts a scheduler and `n` workers (named alice, bob, carol, ...). */
export async function startCluster(
  n = 2,
  options: Partial<Omit<WorkerOptions, "scheduler">> & { frameBytesMax?: number } = {},
): Promise<Cluster> {
  const names = ["alice", "bob", "carol", "dave", "erin", "frank"];
  const scheduler = await startScheduler({
    port: 0,
    log: testLogger("scheduler"),
    frameBytesMax: options.frameBytesMax,
  });
  const workers: WorkerNode[] = [];
  for (let i = 0; i < n; i++) {
    const name = names[i] ?? `worker${i}`;
    workers.push(
      await startWorker({
        scheduler: scheduler.address,
        name,
        log: testLogger(name),
        nthreads: 1,
        ...options,
      }),
    );
  }
  const close = async () => {
    await Promise.all(workers.map((w) => w.close()));
    await scheduler.close();
  };
  return { scheduler, workers, close, [Symbol.asyncDispose]: close };
}

/** Polls `check` until it returns true; throws after `timeoutMs`. */
export async function eventually(check: () => boolean | Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`Condition not met within ${timeoutMs} ms: ${check}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
