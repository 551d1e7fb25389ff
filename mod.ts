/**
 * dist: a distributed computing runtime for TypeScript on Deno. One scheduler keeps
 * the metadata; workers hold data in memory, compute on it, and move it peer to peer.
 *
 * ```ts
 * import { rpc, startScheduler, startWorker } from "@dist/dist";
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

export { Ref, ref, type TypedArray } from "./protocol/codec.ts";
export { type Address, formatAddress, parseAddress } from "./protocol/address.ts";
export {
  asCompleted,
  Client,
  type ClientOptions,
  Future,
  type FutureStatus,
  type Gathered,
  type Graph,
  type ResultOf,
  type SubmitOptions,
  type TaskFunction,
  TaskOptions,
  taskOptions,
  wait,
} from "./client/client.ts";
export { LocalCluster, type LocalClusterOptions } from "./client/local.ts";
export { progress, type ProgressOptions } from "./client/progress.ts";
export { type ClusterInfo, clusterInfo } from "./client/info.ts";
export {
  BusyError,
  CancelledError,
  ConnectionClosedError,
  KilledWorkerError,
  MissingDataError,
  NoWorkersError,
  ProtocolError,
  RemoteError,
  type RemoteErrorInfo,
  type TaskError,
  TimeoutError,
} from "./protocol/errors.ts";
export type { CallOptions } from "./protocol/comm.ts";
export {
  type ArgsOf,
  type ClientOps,
  clientOps,
  type FunctionSpec,
  type GraphTask,
  type OkReply,
  type OpSpec,
  type OpTable,
  type ReplyOf,
  type SchedulerIdentity,
  type SchedulerOps,
  schedulerOps,
  type WorkerIdentity,
  type WorkerInfo,
  type WorkerOps,
  workerOps,
} from "./protocol/ops.ts";
export type { Schema } from "./protocol/_validate.ts";
export { AuthenticationError, type SecurityOptions } from "./protocol/handshake.ts";
export type { TlsOptions } from "./protocol/transport.ts";
export { createLogger, type LogFormat, type Logger, type LogLevel } from "./util/log.ts";
export { DataStore } from "./worker/store.ts";
export type { Sendable } from "./protocol/functions.ts";
export {
  type CallArgs,
  type MergeOps,
  type NodeOps,
  type Rpc,
  rpc,
  RpcClient,
  type RpcMethod,
  type RpcOptions,
} from "./protocol/rpc.ts";
export {
  SCHEDULER_PORT,
  type SchedulerNode,
  type SchedulerOptions,
  startScheduler,
} from "./scheduler/scheduler.ts";
export { startWorker, type WorkerNode, type WorkerOptions } from "./worker/worker.ts";
export type { Isolation } from "./worker/executors.ts";
