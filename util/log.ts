/**
 * Logs go to stderr, one line each, so stdout stays for what a node promises to print
 * (`listening at ...`).
 *
 * @module
 */

/** Log levels, least to most severe. */
export const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error", "silent"];
/** A log level. */
export type LogLevel = "debug" | "info" | "warn" | "error" | "silent";

/** Where nodes write what happens. */
export interface Logger {
  /** Details a developer needs to follow the exchange. */
  debug(message: string): void;
  /** Normal milestones: listening, a worker joined. */
  info(message: string): void;
  /** Something went wrong, and the node carries on. */
  warn(message: string): void;
  /** Something went wrong that the node cannot repair. */
  error(message: string): void;
}

const encoder = new TextEncoder();

/** How log lines look: text for people, one JSON object a line for machines. */
export type LogFormat = "text" | "json";

/**
 * A logger that writes lines at `level` and above to stderr, tagged with `name`: as
 * text (`2026-... INFO  scheduler: message`) or as JSON (`{"time","level","node","msg"}`).
 */
export function createLogger(name: string, level: LogLevel = "info", format: LogFormat = "text"): Logger {
  const threshold = LOG_LEVELS.indexOf(level);
  const at = (l: LogLevel) => (message: string) => {
    if (LOG_LEVELS.indexOf(l) < threshold) return;
    const time = new Date().toISOString();
    const line = format === "json"
      ? JSON.stringify({ time, level: l, node: name, msg: message }) + "\n"
      : `${time} ${l.toUpperCase().padEnd(5)} ${name}: ${message}\n`;
    try {
      Deno.stderr.writeSync(encoder.encode(line));
    } catch {
      // stderr gone (the parent closed it): logging must never take the node down.
    }
  };
  return { debug: at("debug"), info: at("info"), warn: at("warn"), error: at("error") };
}

/** A logger that drops everything. */
export const silentLogger: Logger = createLogger("", "silent");
