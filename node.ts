/**
 * Running dist's nodes in this process: `startScheduler` and `startWorker`, with their
 * options, and the worker's `DataStore`. A program that only uses a cluster imports
 * `@dist/dist` (the client), which loads none of this; `Client.local` and
 * `LocalCluster` load it when they start nodes.
 *
 * ```ts
 * import { startScheduler, startWorker } from "@dist/dist/node";
 * import { rpc } from "@dist/dist";
 *
 * await using scheduler = await startScheduler({ port: 0 });
 * await using alice = await startWorker({ scheduler: scheduler.address, name: "alice" });
 * await using bob = await startWorker({ scheduler: scheduler.address, name: "bob" });
 *
 * await using a = rpc(alice.address);
 * await using b = rpc(bob.address);
 * await a.update_data({ data: { x: 1 } });
 * await b.update_data({ data: { a: 2 } });
 * // Alice asks the scheduler who has `a`, fetches it from Bob, computes z, keeps it.
 * await a.compute({ key: "z", function: (x: number, y: number) => x + y, keys: ["x", "a"] });
 * console.log(await a.get_data({ keys: ["z"] })); // { z: 3 }
 * ```
 *
 * @module
 */

export {
  SCHEDULER_PORT,
  type SchedulerNode,
  type SchedulerOptions,
  startScheduler,
} from "./scheduler/scheduler.ts";
export { MemoryLimitError, startWorker, type WorkerNode, type WorkerOptions } from "./worker/worker.ts";
export type { Isolation } from "./worker/executors.ts";
export { DataStore, type DataStoreOptions, type ValueHolds } from "./worker/store.ts";
