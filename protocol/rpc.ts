/**
 * The rpc client: `rpc(address)` gives an object whose methods are the op names, over
 * one reused connection that carries any number of concurrent calls.
 *
 * @module
 */

import { type Address, formatAddress, parseAddress } from "./address.ts";
import type { CallOptions, Comm } from "./comm.ts";
import { ConnectionClosedError } from "./errors.ts";
import { type Sendable, toFunctionSpec } from "./functions.ts";
import type { ArgsOf, OpSpec, OpTable, ReplyOf, SchedulerOps, WorkerOps } from "./ops.ts";
import { openComm, type SecurityOptions } from "./handshake.ts";

/** Options of an rpc client. */
export interface RpcOptions extends SecurityOptions {
  /** Largest frame accepted from the node, in bytes. */
  frameBytesMax?: number;
  /** A timeout for every call that sets none of its own. */
  timeoutMs?: number;
}

/** Two op tables as one; an op in both takes either's arguments and gives either's reply. */
export type MergeOps<A extends OpTable, B extends OpTable> = {
  [K in keyof A | keyof B]: K extends keyof A
    ? K extends keyof B ? OpSpec<ArgsOf<A, K> | ArgsOf<B, K>, ReplyOf<A, K> | ReplyOf<B, K>> : A[K]
    : K extends keyof B ? B[K]
    : never;
};

/** Every op of both node kinds: what `rpc(address)` offers when the kind is not named. */
export type NodeOps = MergeOps<WorkerOps, SchedulerOps>;

/** Arguments as a caller writes them: `compute` takes a real function too. */
export type CallArgs<T extends OpTable, K extends keyof T> = K extends "compute"
  ? Omit<ArgsOf<T, K>, "function"> & { function: Sendable }
  : ArgsOf<T, K>;

/** The method for op `K`: its arguments (optional when none is required) and typed reply. */
// `{}` here asks "are all fields optional?", which is exactly the question.
// deno-lint-ignore ban-types
export type RpcMethod<T extends OpTable, K extends keyof T> = {} extends CallArgs<T, K>
  ? (args?: CallArgs<T, K>, options?: CallOptions) => Promise<ReplyOf<T, K>>
  : (args: CallArgs<T, K>, options?: CallOptions) => Promise<ReplyOf<T, K>>;

/** An rpc client with one method per op of `T`. */
export type Rpc<T extends OpTable = NodeOps> = RpcClient & { [K in keyof T]: RpcMethod<T, K> };

/** The connection-owning part of an rpc: `call`, `close` and `await using`. */
export class RpcClient {
  /** The node's address, `tcp://host:port`. */
  readonly address: string;
  #target: Address;
  #options: RpcOptions;
  #comm: Comm | null = null;
  #connecting: Promise<Comm> | null = null;
  #closed = false;

  /** A client for the node at `address`; it connects on the first call. */
  constructor(address: string | Address, options: RpcOptions = {}) {
    this.#target = parseAddress(address);
    this.address = formatAddress(this.#target);
    this.#options = options;
  }

  /**
   * Calls `op` with `args` and resolves its reply. Rejects with RemoteError when the
   * op failed on the node (BusyError when the node was too busy to take it),
   * ConnectionClosedError when the connection is lost, TimeoutError after `timeoutMs`.
   */
  call(op: string, args: unknown = {}, options: CallOptions = {}): Promise<unknown> {
    if (op === "compute" && typeof args === "object" && args !== null && "function" in args) {
      try {
        args = { ...args, function: toFunctionSpec((args as { function: unknown }).function) };
      } catch (error) {
        return Promise.reject(error);
      }
    }
    if (this.#options.timeoutMs !== undefined && options.timeoutMs === undefined) {
      options = { ...options, timeoutMs: this.#options.timeoutMs };
    }
    // Connected: straight to the connection, no extra turn (a tiny call is ~40 us in all).
    const comm = this.#comm;
    if (comm && !comm.isClosed && !this.#closed) return comm.call(op, args, options);
    return this.#connect(options.signal).then((comm) => comm.call(op, args, options));
  }

  /** Closes the connection; calls still waiting reject with ConnectionClosedError. */
  async close(): Promise<void> {
    this.#closed = true;
    const comm = this.#comm ?? (await this.#connecting?.catch(() => null));
    await comm?.close();
  }

  /** `await using node = rpc(...)` closes it at the end of the scope. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  #connect(signal?: AbortSignal): Promise<Comm> {
    if (this.#closed) {
      return Promise.reject(new ConnectionClosedError(`This rpc to ${this.address} is closed`));
    }
    if (this.#comm && !this.#comm.isClosed) return Promise.resolve(this.#comm);
    // A lost connection is replaced on the next call; concurrent calls share one attempt.
    // Idle, the connection does not keep the process alive: a script that forgot close() ends.
    this.#connecting ??= openComm(this.#target, { ...this.#options, signal, keepsAlive: "busy" }).then(
      (comm) => {
        this.#comm = comm;
        if (this.#closed) comm.close();
        return comm;
      },
    ).finally(() => {
      this.#connecting = null;
    });
    return this.#connecting;
  }
}

/**
 * Connects to a dist node (scheduler or worker); methods are its op names.
 *
 * @example
 * ```ts
 * import { rpc } from "@dist/dist";
 * const alice = rpc("tcp://127.0.0.1:8788");
 * const bob = rpc({ host: "127.0.0.1", port: 8789 });
 * const d = await alice.get_data({ keys: ["x", "y"] });
 * await bob.update_data({ data: d });
 * await alice.close();
 * await bob.close();
 * ```
 */
export function rpc<T extends OpTable = NodeOps>(
  address: string | Address,
  options: RpcOptions = {},
): Rpc<T> {
  const client = new RpcClient(address, options);
  // One method per op name, made on its first use: a call makes no closure.
  const methods = new Map<string, (args?: unknown, options?: CallOptions) => Promise<unknown>>();
  return new Proxy(client, {
    get(target, prop) {
      if (typeof prop === "string") {
        const method = methods.get(prop);
        if (method !== undefined) return method;
      }
      if (typeof prop !== "string" || prop in target) {
        const value = Reflect.get(target, prop);
        return typeof value === "function" ? value.bind(target) : value;
      }
      // Not a thenable: `await rpc(...)` must not look for an op named "then".
      if (prop === "then") return undefined;
      const method = (args?: unknown, options?: CallOptions) => target.call(prop, args, options);
      methods.set(prop, method);
      return method;
    },
  }) as Rpc<T>;
}
