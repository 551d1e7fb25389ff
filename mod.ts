/**
 * dist: a distributed computing runtime for TypeScript on Deno. One scheduler keeps
 * the metadata; workers hold data in memory, compute on it, and move it peer to peer.
 * This is the client: `Client` with futures and graphs, and `rpc(address)` for the
 * nodes' own operations. It loads no scheduler or worker code; `@dist/dist/node` starts
 * nodes in this process, and `Client.local` starts a cluster on this machine.
 *
 * ```ts
 * import { Client } from "@dist/dist";
 *
 * await using client = await Client.local({ workers: 2, processes: false });
 * const squares = client.map((x: number) => x * x, [1, 2, 3]);
 * const total = client.submit((xs: number[]) => xs.reduce((a, b) => a + b, 0), squares);
 * console.log(await total.result()); // 14
 * ```
 *
 * @module
 */

export { Ref, ref, type TypedArray } from "./protocol/codec.ts";
export { type Address, formatAddress, parseAddress } from "./protocol/address.ts";
export {
  type Arg,
  asCompleted,
  Client,
  type ClientOptions,
  Future,
  type FutureStatus,
  type Gathered,
  type Graph,
  type MapArgs,
  type ResultOf,
  type SubmitArgs,
  type SubmitOptions,
  type TaskArgs,
  type TaskFunction,
  TaskOptions,
  taskOptions,
  wait,
} from "./client/client.ts";
export { type Adaptive, LocalCluster, type LocalClusterOptions } from "./client/local.ts";
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
export { SCHEDULER_PORT } from "./util/defaults.ts";
export type { SchedulerNode, SchedulerOptions } from "./scheduler/scheduler.ts";
export type { WorkerNode, WorkerOptions } from "./worker/worker.ts";
export type { Isolation } from "./worker/executors.ts";
