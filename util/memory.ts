/**
 * Memory sizes: parsing `--memory-limit`, and what this machine (or its container) has.
 *
 * @module
 */

const UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  k: 1e3,
  kb: 1e3,
  m: 1e6,
  mb: 1e6,
  g: 1e9,
  gb: 1e9,
  t: 1e12,
  tb: 1e12,
  kib: 2 ** 10,
  mib: 2 ** 20,
  gib: 2 ** 30,
  tib: 2 ** 40,
};

/**
 * Bytes from `text`: a whole number of bytes, or a number with a unit (`512MiB`, `4GiB`,
 * `2GB`, `1.5e9`; kB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024). Throws
 * RangeError naming `what` and the forms it takes.
 */
export function parseBytes(text: string, what = "size"): number {
  const m = /^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([a-z]*)\s*$/i.exec(text);
  const unit = m ? UNITS[m[2].toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new RangeError(
      `Invalid ${what} ${
        JSON.stringify(text)
      }: expected bytes, or a number with a unit such as 512MiB, 4GiB or 2GB`,
    );
  }
  const bytes = Math.floor(Number(m[1]) * unit);
  if (!Number.isSafeInteger(bytes)) {
    throw new RangeError(`Invalid ${what} ${JSON.stringify(text)}: too large`);
  }
  return bytes;
}

/**
 * Reads a small file of /proc or /sys, or null when it is absent or unreadable. Deno
 * reads those only with --allow-all, whatever --allow-read says: where this process may
 * run `cat`, cat reads it.
 */
function readSystemFile(path: string): string | null {
  // Asked first: without the permission Deno would prompt at a terminal.
  if (Deno.permissions.querySync({ name: "read", path }).state === "granted") {
    try {
      return Deno.readTextFileSync(path);
    } catch { /* refused without --allow-all, or absent */ }
  }
  if (Deno.permissions.querySync({ name: "run", command: "cat" }).state !== "granted") return null;
  try {
    const out = new Deno.Command("cat", { args: [path], stdout: "piped", stderr: "null" }).outputSync();
    return out.success ? new TextDecoder().decode(out.stdout) : null;
  } catch {
    return null;
  }
}

/**
 * The memory this process may use in all: the machine's (`/proc/meminfo`), or less when
 * a cgroup (a container, a systemd slice) caps it. Null where neither can be read.
 */
export function machineMemoryBytes(): number | null {
  let total: number | null = null;
  if (Deno.permissions.querySync({ name: "sys", kind: "systemMemoryInfo" }).state === "granted") {
    total = Deno.systemMemoryInfo().total;
  } else {
    const meminfo = readSystemFile("/proc/meminfo");
    const m = meminfo === null ? null : /^MemTotal:\s+(\d+)\s*kB/m.exec(meminfo);
    if (m) total = Number(m[1]) * 1024;
  }
  // cgroup v2, then v1; "max" or a huge v1 number means no cap.
  for (const path of ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]) {
    const text = readSystemFile(path)?.trim();
    if (text === undefined || !/^\d+$/.test(text)) continue;
    const cap = Number(text);
    if (cap > 0 && cap < 2 ** 60 && (total === null || cap < total)) total = cap;
    break;
  }
  return total;
}

/**
 * A worker's memory limit from `--memory-limit`: `0` for none, `auto` for `share` of the
 * machine's memory (see `machineMemoryBytes`; none when that is unknown), else bytes as
 * `parseBytes` reads them.
 */
export function memoryLimit(text: string, share: number): number {
  const t = text.trim().toLowerCase();
  if (t === "auto") {
    const machine = machineMemoryBytes();
    return machine === null ? 0 : Math.floor(machine * Math.min(1, share));
  }
  return parseBytes(text, "--memory-limit");
}

/** `bytes` for people, in powers of 1000 as `dist info` prints them: `536.9 MB`, `900 B`. */
export function formatBytes(n: number): string {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) (n /= 1000, i++);
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}
