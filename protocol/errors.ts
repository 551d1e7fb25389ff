/**
 * The few error classes of dist, each catchable for a reason.
 *
 * @module
 */

/** The connection closed (or was never made) while a call was in flight. */
export class ConnectionClosedError extends Error {
  /** Builds the error; `cause` carries the transport's own error, if any. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ConnectionClosedError";
  }
}

/** A peer sent bytes or a message that break the protocol. */
export class ProtocolError extends Error {
  /** Builds the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ProtocolError";
  }
}

/** A call took longer than its timeout. */
export class TimeoutError extends Error {
  /** Builds the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "TimeoutError";
  }
}

/**
 * A node is too busy to take this request now: a worker already sends as many large
 * values as it allows at once (`transfersOutMax`), or a connection already runs as many
 * requests as it allows. Ask again a little later; fetches back off and retry on their
 * own. A busy reply from a peer rejects the call with this class (the peer's error, with
 * its op and stack, is the `cause`).
 */
export class BusyError extends Error {
  /** Builds the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "BusyError";
  }
}

/** The keys a computation needs exist nowhere the cluster can reach. */
export class MissingDataError extends Error {
  /** The keys that could not be found. */
  readonly keys: string[];
  /** For each key, the holders that were tried and failed. */
  holders: Record<string, string[]> = {};
  /** Builds the error for `keys`. */
  constructor(keys: string[], options?: ErrorOptions) {
    super(
      `Missing data: no reachable worker holds ${keys.map((k) => JSON.stringify(k)).join(", ")}`,
      options,
    );
    this.name = "MissingDataError";
    this.keys = keys;
  }
}

/** A future's task was cancelled (by `Future.cancel()` or a deleted dependency). */
export class CancelledError extends Error {
  /** The key that was cancelled. */
  readonly key: string;
  /** Builds the error for `key`. */
  constructor(key: string, reason = "cancelled", options?: ErrorOptions) {
    super(`Task ${key} was ${reason}`, options);
    this.name = "CancelledError";
    this.key = key;
  }
}

/**
 * A task's future failed because workers (or executors) kept dying while it ran: past
 * `--allowed-failures` it is not tried again. Its name stays Dask's, `KilledWorker`.
 */
export class KilledWorkerError extends Error {
  /** Builds the error; `message` says how many died and what the last one said. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "KilledWorker";
  }
}

/** A task's future failed because no connected worker may run it, for `--no-workers-timeout`. */
export class NoWorkersError extends Error {
  /** Builds the error; `message` names the task and what it waited for. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "NoWorkersError";
  }
}

/** What a remote error looks like on the wire. */
export interface RemoteErrorInfo {
  /** The remote error's class name, e.g. `TypeError`. */
  name: string;
  /** The remote error's message. */
  message: string;
  /** The remote stack trace, when there was one. */
  stack?: string;
}

/**
 * A call failed on the remote node. `remoteName`, `message` and `remoteStack` are the
 * remote error's own; `op` is the operation that failed.
 */
export class RemoteError extends Error {
  /** The remote error's class name, e.g. `TypeError` or `MissingDataError`. */
  readonly remoteName: string;
  /** The remote error's stack trace ("" when the remote sent none). */
  readonly remoteStack: string;
  /** The op whose call failed. */
  readonly op: string;
  /** Builds the error from what the remote sent. */
  constructor(op: string, info: RemoteErrorInfo, options?: ErrorOptions) {
    super(info.message, options);
    this.name = "RemoteError";
    this.op = op;
    this.remoteName = info.name;
    this.remoteStack = info.stack ?? "";
  }
}

/**
 * Errors a node answers a call with that come back to the caller as their own classes,
 * by name on the wire: the caller tells them apart by class, never by their text.
 */
const CALL_ERRORS: Record<string, new (message: string, options?: ErrorOptions) => Error> = {
  BusyError,
};

/**
 * The error a failed call rejects with: a known one (BusyError) as its class, its cause
 * the RemoteError that carries the op and the remote stack; any other as RemoteError.
 */
export function callError(op: string, info: RemoteErrorInfo): Error {
  const remote = new RemoteError(op, info);
  if (!Object.hasOwn(CALL_ERRORS, info.name)) return remote;
  return new CALL_ERRORS[info.name](info.message, { cause: remote });
}

/**
 * Most characters of an error's name, message or stack that travel; the rest is cut
 * with a note of how much. A task's error of megabytes would not fit a peer's frame
 * limit, and its report would be lost.
 */
export const ERROR_TEXT_CHARS_MAX = 16_384;

/**
 * Turns anything thrown into what travels in an error reply: name, message and stack
 * are always strings, whatever was thrown (an Error whose `name` is a number, a plain
 * object, a Proxy, null), of at most `ERROR_TEXT_CHARS_MAX` characters each. It never
 * throws: a report that fails validation on the other end would be dropped, and the
 * task it reports would never settle.
 */
export function toRemoteErrorInfo(error: unknown): RemoteErrorInfo {
  const info = errorInfo(error);
  return { name: clip(info.name), message: clip(info.message), stack: clip(info.stack ?? "") };
}

function clip(text: string): string {
  if (text.length <= ERROR_TEXT_CHARS_MAX) return text;
  return `${text.slice(0, ERROR_TEXT_CHARS_MAX)}… (${text.length - ERROR_TEXT_CHARS_MAX} more characters)`;
}

function errorInfo(error: unknown): RemoteErrorInfo {
  if (error instanceof RemoteError) {
    return { name: error.remoteName, message: error.message, stack: error.remoteStack };
  }
  if (typeof error === "object" && error !== null) {
    const isError = safely(() => error instanceof Error, false);
    const name = textOf(safely(() => (error as { name?: unknown }).name, undefined));
    const message = textOf(safely(() => (error as { message?: unknown }).message, undefined));
    const stack = textOf(safely(() => (error as { stack?: unknown }).stack, undefined));
    return {
      name: name || "Error",
      message: message ?? (isError ? "" : textOf(error) ?? "a value that cannot be shown"),
      stack: stack ?? "",
    };
  }
  return { name: "Error", message: textOf(error) ?? "a value that cannot be shown", stack: "" };
}

function safely<T>(read: () => T, fallback: T): T {
  try {
    return read();
  } catch {
    return fallback;
  }
}

/** `value` as text, or undefined when absent or when it will not become a string. */
function textOf(value: unknown): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value === "string") return value;
  return safely(() => {
    const s = String(value);
    return typeof s === "string" ? s : undefined;
  }, undefined) ?? safely(() => Object.prototype.toString.call(value), undefined);
}

const BUILT_IN_ERRORS: Record<string, ErrorConstructor> = {
  Error,
  TypeError,
  RangeError,
  SyntaxError,
  ReferenceError,
  EvalError,
  URIError,
};

/** The errors the cluster itself gives a task, by their names on the wire: they come back as their classes. */
const CLUSTER_ERRORS: Record<string, new (message: string) => Error> = {
  KilledWorker: KilledWorkerError,
  NoWorkersError,
};

/** A task's error as its future rejects with it: the original's class (where built in), message and stack. */
export interface TaskError extends Error {
  /** The key of the task that failed first (a dependency's key when this task inherited its failure). */
  task: string;
}

/**
 * Rebuilds a task's error on the client: a built-in class comes back as itself
 * (`instanceof RangeError` holds), and so do KilledWorkerError and NoWorkersError;
 * anything else as an Error with the original name.
 */
export function reviveError(info: RemoteErrorInfo, task: string): TaskError {
  const ctor: new (message: string) => Error = Object.hasOwn(BUILT_IN_ERRORS, info.name)
    ? BUILT_IN_ERRORS[info.name]
    : Object.hasOwn(CLUSTER_ERRORS, info.name)
    ? CLUSTER_ERRORS[info.name]
    : Error;
  const error = new ctor(info.message) as TaskError;
  if (error.name !== info.name) {
    Object.defineProperty(error, "name", { value: info.name, writable: true, configurable: true });
  }
  if (info.stack) error.stack = info.stack;
  error.task = task;
  return error;
}
