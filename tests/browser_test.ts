/**
 * The dashboard in a real headless Chromium while a computation runs: it shows the
 * workers, draws the task stream (tasks and transfers) and memory, and reaches 100 %.
 * Saves a screenshot to tests/out/dashboard.png (docs/dashboard.png is a copy of one).
 *
 * Chromium is driven through its DevTools protocol over a WebSocket, with no npm
 * package: playwright-core cannot load under the suite's permissions (at import it
 * reads /proc/sys/fs/binfmt_misc/WSLInterop, which Deno grants only with --allow-all).
 * Skipped, saying why, where /usr/bin/chromium is missing (Debian: apt-get install chromium).
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, type Future, taskOptions, wait, type WorkerNode } from "../mod.ts";
import { startScheduler, startWorker } from "../node.ts";
import { testLogger } from "./_helpers.ts";

const CHROMIUM = "/usr/bin/chromium";
/** Flags that keep Chromium off the (closed) network and quick to start. */
const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--hide-scrollbars",
  "--mute-audio",
];
/** How long Chromium may take to open its DevTools port. */
const LAUNCH_TIMEOUT_MS = 20_000;
/** How long one DevTools call may take. */
const CALL_TIMEOUT_MS = 10_000;
/** How long the page may take to show something (it redraws every 500 ms). */
const PAGE_TIMEOUT_MS = 10_000;
/** Most of Chromium's stderr kept for a failure's message. */
const STDERR_KEPT_CHARS = 20_000;
const VIEWPORT = { width: 1400, height: 900 };

const OUT = new URL("./out/", import.meta.url);

const hasChromium = (() => {
  try {
    return Deno.statSync(CHROMIUM).isFile;
  } catch {
    return false;
  }
})();
if (!hasChromium) {
  console.log(`browser_test: skipped: no ${CHROMIUM} (install it with: apt-get install -y chromium)`);
}

const delay = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A DevTools protocol connection: calls by id, events by name. */
class DevTools {
  #socket: WebSocket;
  #nextId = 1;
  #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  #listeners: ((method: string, params: Record<string, unknown>, sessionId?: string) => void)[] = [];
  readonly closed: Promise<void>;

  private constructor(socket: WebSocket) {
    this.#socket = socket;
    this.closed = new Promise((resolve) => socket.addEventListener("close", () => resolve()));
    socket.addEventListener("message", (e) => {
      const message = JSON.parse(e.data as string);
      if (typeof message.id === "number") {
        const call = this.#pending.get(message.id);
        this.#pending.delete(message.id);
        if (message.error) call?.reject(new Error(`DevTools: ${JSON.stringify(message.error)}`));
        else call?.resolve(message.result);
      } else {
        for (const listen of this.#listeners) listen(message.method, message.params ?? {}, message.sessionId);
      }
    });
    socket.addEventListener("close", () => {
      for (const call of this.#pending.values()) call.reject(new Error("DevTools connection closed"));
      this.#pending.clear();
    });
  }

  static async open(url: string): Promise<DevTools> {
    const socket = new WebSocket(url);
    await new Promise<void>((resolve, reject) => {
      socket.addEventListener("open", () => resolve(), { once: true });
      socket.addEventListener("error", () => reject(new Error(`Cannot open ${url}`)), { once: true });
    });
    return new DevTools(socket);
  }

  // deno-lint-ignore no-explicit-any
  async send(method: string, params: Record<string, unknown> = {}, sessionId?: string): Promise<any> {
    const id = this.#nextId++;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const reply = new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new Error(`DevTools ${method}: no reply within ${CALL_TIMEOUT_MS} ms`));
      }, CALL_TIMEOUT_MS);
    });
    this.#socket.send(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }));
    try {
      return await reply;
    } finally {
      clearTimeout(timer);
    }
  }

  on(listen: (method: string, params: Record<string, unknown>, sessionId?: string) => void): void {
    this.#listeners.push(listen);
  }

  async close(): Promise<void> {
    if (this.#socket.readyState !== WebSocket.CLOSED) this.#socket.close();
    await this.closed;
  }
}

/** A page in the browser: navigate, evaluate, screenshot; its JS errors are kept. */
class Page {
  readonly errors: string[] = [];

  constructor(readonly devtools: DevTools, readonly sessionId: string) {
    devtools.on((method, params, session) => {
      if (session !== sessionId) return;
      if (method === "Runtime.exceptionThrown") {
        const details = params.exceptionDetails as { text: string; exception?: { description?: string } };
        this.errors.push(details.exception?.description ?? details.text);
      } else if (method === "Runtime.consoleAPICalled" && params.type === "error") {
        this.errors.push(JSON.stringify(params.args));
      }
    });
  }

  send(method: string, params: Record<string, unknown> = {}) {
    return this.devtools.send(method, params, this.sessionId);
  }

  async navigate(url: string): Promise<void> {
    const result = await this.send("Page.navigate", { url });
    if (result.errorText) throw new Error(`Cannot open ${url}: ${result.errorText}`);
    await this.waitFor(
      `document.readyState === "complete" && location.href.startsWith(${JSON.stringify(url)})`,
    );
  }

  /** The value of `expression` (awaited) in the page. */
  async evaluate<T = unknown>(expression: string): Promise<T> {
    const { result, exceptionDetails } = await this.send("Runtime.evaluate", {
      expression,
      returnByValue: true,
      awaitPromise: true,
    });
    if (exceptionDetails) {
      throw new Error(`${expression}: ${exceptionDetails.exception?.description ?? exceptionDetails.text}`);
    }
    return result.value as T;
  }

  /** Waits until `expression` is truthy in the page. */
  async waitFor(expression: string, timeoutMs = PAGE_TIMEOUT_MS): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!(await this.evaluate<boolean>(`Boolean(${expression})`))) {
      if (Date.now() > deadline) {
        const body = await this.evaluate<string>("document.body?.innerText.slice(0, 2000) ?? ''");
        throw new Error(`Not true within ${timeoutMs} ms: ${expression}\nThe page shows:\n${body}`);
      }
      await delay(50);
    }
  }

  /** A PNG of the whole page. */
  async screenshot(): Promise<Uint8Array> {
    const { cssContentSize } = await this.send("Page.getLayoutMetrics");
    const { data } = await this.send("Page.captureScreenshot", {
      format: "png",
      captureBeyondViewport: true,
      clip: {
        x: 0,
        y: 0,
        width: Math.ceil(cssContentSize.width),
        height: Math.ceil(cssContentSize.height),
        scale: 1,
      },
    });
    return Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  }
}

/** Headless Chromium with a fresh profile, closed (and its profile removed) on dispose. */
class Browser implements AsyncDisposable {
  private constructor(
    readonly child: Deno.ChildProcess,
    readonly profile: string,
    readonly devtools: DevTools,
    readonly stderrDone: Promise<void>,
    readonly log: { stderr: string },
  ) {}

  static async launch(): Promise<Browser> {
    const profile = await Deno.makeTempDir({ prefix: "dist-chromium-" });
    const child = new Deno.Command(CHROMIUM, {
      args: [
        ...CHROMIUM_FLAGS,
        `--user-data-dir=${profile}`,
        "--remote-debugging-port=0",
        `--window-size=${VIEWPORT.width},${VIEWPORT.height}`,
        "about:blank",
      ],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const log = { stderr: "" };
    const stderrDone = (async () => {
      for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) {
        log.stderr = (log.stderr + chunk).slice(-STDERR_KEPT_CHARS);
      }
    })();
    try {
      // Chromium writes its port and the browser's WebSocket path once it listens.
      const file = `${profile}/DevToolsActivePort`;
      const deadline = Date.now() + LAUNCH_TIMEOUT_MS;
      let lines: string[] = [];
      while (lines.length < 2) {
        if (Date.now() > deadline) {
          throw new Error(`Chromium wrote no ${file} within ${LAUNCH_TIMEOUT_MS} ms`);
        }
        await delay(50);
        lines = (await Deno.readTextFile(file).catch(() => "")).split("\n").filter(Boolean);
      }
      const devtools = await DevTools.open(`ws://127.0.0.1:${lines[0]}${lines[1]}`);
      return new Browser(child, profile, devtools, stderrDone, log);
    } catch (error) {
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
      await child.status;
      await stderrDone;
      await Deno.remove(profile, { recursive: true }).catch(() => {});
      throw new Error(`${(error as Error).message}\nChromium's stderr:\n${log.stderr}`);
    }
  }

  async newPage(): Promise<Page> {
    const devtools = this.devtools;
    const { targetId } = await devtools.send("Target.createTarget", { url: "about:blank" });
    const { sessionId } = await devtools.send("Target.attachToTarget", { targetId, flatten: true });
    const page = new Page(devtools, sessionId);
    await page.send("Runtime.enable");
    await page.send("Page.enable");
    await page.send("Emulation.setDeviceMetricsOverride", {
      ...VIEWPORT,
      deviceScaleFactor: 1,
      mobile: false,
    });
    return page;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      await this.devtools.send("Browser.close").catch(() => {});
      // Closing the browser closes the socket; don't wait on a browser that hangs.
      await Promise.race([
        this.child.status,
        new Promise((resolve) => timer = setTimeout(resolve, 5_000)),
      ]);
    } finally {
      clearTimeout(timer);
      try {
        this.child.kill("SIGKILL");
      } catch { /* exited */ }
      await this.child.status;
      await this.devtools.close();
      await this.stderrDone;
      await Deno.remove(this.profile, { recursive: true }).catch(() => {});
    }
  }
}

// ---- task functions (sent as source: no closures) ----

async function slow(x: number): Promise<number> {
  // The pause is the behaviour under test: tasks that take a while, so progress shows.
  await new Promise((resolve) => setTimeout(resolve, 10));
  return x * 2;
}

function chunk(n: number): Float64Array {
  return new Float64Array(n).fill(1);
}

function total(a: Float64Array): number {
  return a.reduce((p, q) => p + q, 0);
}

function add(a: number, b: number): number {
  return a + b;
}

/** Counts of what the page draws. */
const COUNT = (selector: string) => `document.querySelectorAll(${JSON.stringify(selector)}).length`;

/** Bytes as the page writes them. */
function bytes(n: number): string {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) (n /= 1000, i++);
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

Deno.test({
  name: "browser: the dashboard while a computation runs",
  ignore: !hasChromium,
  fn: async (t) => {
    await using scheduler = await startScheduler({ port: 0, dashboardPort: 0, log: testLogger("scheduler") });
    const workers: WorkerNode[] = [];
    try {
      for (const name of ["alice", "bob"]) {
        workers.push(
          await startWorker({ scheduler: scheduler.address, name, nthreads: 2, log: testLogger(name) }),
        );
      }
      const [alice, bob] = workers;
      await using browser = await Browser.launch();
      const page = await browser.newPage();
      await using client = await Client.connect(scheduler.address);

      await t.step("shows both workers, the task stream, memory and 100 % when done", async () => {
        await page.navigate(`${scheduler.dashboard}/`);
        assert.equal(await page.evaluate("document.title"), "dist dashboard");

        // Live: both workers listed by address, before any task.
        await page.waitFor(`document.querySelector("#live.on")`);
        await page.waitFor(`${COUNT("#workers tbody tr[data-worker]")} === 2`);
        const rows = await page.evaluate<string[]>(
          `[...document.querySelectorAll("#workers tbody tr[data-worker]")].map((tr) => tr.dataset.worker).sort()`,
        );
        assert.deepEqual(rows, [alice.address, bob.address].sort());
        assert.equal(await page.evaluate(`document.querySelector("#overall").dataset.percent`), "0");
        // Every percentage the page shows, as it shows it.
        await page.evaluate(`window.percents = [];
          new MutationObserver(() => percents.push(Number(document.querySelector("#overall").dataset.percent)))
            .observe(document.querySelector("#overall"), { attributes: true, attributeFilter: ["data-percent"] });`);

        // A few hundred tasks of 10 ms (on 4 threads: 750 ms at least, over the page's
        // 500 ms updates), and data that moves: chunks made on one worker, summed on
        // the other, then added up pairwise.
        const started = performance.now();
        const slows = client.map(slow, [...Array(300).keys()]);
        const chunks = [...Array(8).keys()].map((i) =>
          client.submit(chunk, 50_000 + i, taskOptions({ workers: [i % 2 ? "alice" : "bob"] }))
        );
        const sums = chunks.map((c, i) =>
          client.submit(total, c, taskOptions({ workers: [i % 2 ? "bob" : "alice"] }))
        );
        const adds: Future<number>[] = [];
        let level: Future<number>[] = sums;
        while (level.length > 1) {
          const next: Future<number>[] = [];
          for (let i = 0; i < level.length; i += 2) next.push(client.submit(add, level[i], level[i + 1]));
          adds.push(...next);
          level = next;
        }
        const all: Future[] = [...slows, ...chunks, ...sums, ...adds];
        const ntasks = all.length;

        // While it runs: the task stream draws rects.
        await page.waitFor(`${COUNT("svg#stream rect.task")} > 0`);
        assert.equal(await level[0].result(), 8 * 50_000 + 28);
        await wait(all);
        const ranMs = performance.now() - started;

        await page.waitFor(`document.querySelector('#overall[data-percent="100"]')`);
        const percents = await page.evaluate<number[]>("percents");
        assert.ok(
          percents.some((p) => p > 0 && p < 100),
          `the page showed no progress between 0 and 100 % in ${ranMs.toFixed(0)} ms: ${percents}`,
        );
        assert.deepEqual(percents, [...percents].sort((a, b) => a - b), "the percentage never goes back");
        await page.waitFor(
          `document.querySelector('#progress .task-kind[data-prefix="slow"][data-done="300"][data-total="300"]')`,
        );
        await page.waitFor(`${COUNT("svg#stream rect.task")} === ${ntasks}`);
        // Transfers come with heartbeats.
        await page.waitFor(`${COUNT("svg#stream rect.transfer")} > 0`);
        assert.equal(
          await page.evaluate(`document.querySelector("#ncompleted").textContent`),
          String(ntasks),
        );
        assert.equal(await page.evaluate(`document.querySelector("#nworkers").textContent`), "2");
        assert.equal(await page.evaluate(`document.querySelector("#nthreads").textContent`), "4");
        assert.equal(
          await page.evaluate(`document.querySelector("#address").textContent`),
          scheduler.address,
        );
        const kinds = await page.evaluate<Record<string, string>>(
          `Object.fromEntries([...document.querySelectorAll("#progress .task-kind")].map((k) => [k.dataset.prefix, k.dataset.done + "/" + k.dataset.total]))`,
        );
        assert.deepEqual(kinds, { add: "7/7", chunk: "8/8", slow: "300/300", total: "8/8" });
        // A lane per worker thread and one for each worker's incoming transfers.
        const lanes = await page.evaluate<string[]>(
          `[...document.querySelectorAll("svg#stream text")].map((t) => t.textContent)`,
        );
        assert.deepEqual([...lanes].sort(), [
          "alice #0",
          "alice #1",
          "alice in",
          "bob #0",
          "bob #1",
          "bob in",
        ]);
        // Memory: a line per worker, its scale up to what the largest holds (sampled once a second).
        await page.waitFor(`${COUNT("svg#memory polyline")} === 2`);
        const most = bytes(Math.max(alice.data.totalBytes(), bob.data.totalBytes()));
        await page.waitFor(
          `document.querySelector("svg#memory text")?.textContent === ${JSON.stringify(most)}`,
        );
        // Its axes: the values at the top, half way and zero; time back from now.
        assert.deepEqual(
          await page.evaluate(
            `[...document.querySelectorAll("svg#memory text.x-axis")].map((t) => t.textContent)`,
          ),
          ["-120 s", "-90 s", "-60 s", "-30 s", "now"],
        );
        assert.equal(await page.evaluate(`document.querySelectorAll("svg#memory text.y-axis").length`), 3);
        // Nothing overflows the window sideways.
        assert.ok(
          await page.evaluate<boolean>("document.documentElement.scrollWidth <= window.innerWidth"),
          "the page is wider than the window",
        );
        assert.deepEqual(page.errors, [], "the page threw");

        const png = await page.screenshot();
        assert.deepEqual([...png.slice(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
        await Deno.mkdir(OUT, { recursive: true });
        await Deno.writeFile(new URL("dashboard.png", OUT), png);
      });

      await t.step(
        "draws each worker's memory: values in memory, the rest of its process, on disk, its limit, paused",
        async () => {
          // The live workers: their process holds more than their values (they run in this test's process).
          await page.waitFor(
            `[...document.querySelectorAll("svg#memory-now g[data-worker]")].filter((g) => g.querySelector("rect.unmanaged")).length === 2`,
          );
          // A snapshot with a limit, values on disk and a paused worker, drawn and read back at once.
          const drawn = await page.evaluate<Record<string, unknown>[]>(`(() => {
          const worker = (name, o) => ({ address: "tcp://10.0.0.1:" + name.length, name, nthreads: 1, nkeys: 3, nbytes: 0,
            processing: 0, executing: 0, cpu: 0, bytesIn: 0, bytesOut: 0, lastSeen: 0.1, problems: [], ...o });
          render({ scheduler: { address: "tcp://10.0.0.1:8786", lag: 0 }, totals: { completed: 0, failed: 0 }, progress: {}, now: Date.now(),
            problems: ["1 task (e.g. \\"inc-1\\") may run only on worker-9, and no connected worker is one"],
            workers: [
              worker("calm", { managed: 100e6, rss: 250e6, spilled: 0, memoryLimit: 500e6, paused: false }),
              worker("squeezed", { managed: 300e6, rss: 450e6, spilled: 700e6, memoryLimit: 500e6, paused: true, processing: 5, executing: 2,
                problems: ["Cannot spill k (9 bytes) to /full: No space left on device (os error 28); it stays in memory"] }),
            ] });
          window.problems = [...document.querySelectorAll("#problems p.problem")].map((p) => p.textContent);
          window.running = [...document.querySelectorAll("#workers tbody tr")].map((tr) => tr.children[4].textContent);
          const W = 600 - 120 - 8, width = (g, c) => Number(g.querySelector("rect." + c)?.getAttribute("width") ?? 0);
          return [...document.querySelectorAll("svg#memory-now g[data-worker]")].map((g) => ({
            name: g.querySelector("text").textContent, paused: g.classList.contains("paused"),
            managed: Math.round(width(g, "managed") / W * 1150e6 / 1e6), unmanaged: Math.round(width(g, "unmanaged") / W * 1150e6 / 1e6),
            spilled: Math.round(width(g, "spilled") / W * 1150e6 / 1e6),
            limit: Math.round((Number(g.querySelector("line.limit")?.getAttribute("x1")) - 120) / W * 1150e6 / 1e6),
          }));
        })()`);
          // Drawn to scale (the largest, 1,150 MB in all, spans the bar): sizes in MB.
          assert.deepEqual(drawn, [
            { name: "calm", paused: false, managed: 100, unmanaged: 150, spilled: 0, limit: 500 },
            {
              name: "squeezed (paused)",
              paused: true,
              managed: 300,
              unmanaged: 150,
              spilled: 700,
              limit: 500,
            },
          ]);
          // Running is what the executors run; the rest sent to a worker waits in its queue.
          assert.deepEqual(await page.evaluate("running"), ["0", "2 + 3 queued"]);
          // What the scheduler says of its queue, and a worker of itself, is shown word for word.
          assert.deepEqual(await page.evaluate("problems"), [
            'queue: 1 task (e.g. "inc-1") may run only on worker-9, and no connected worker is one',
            "squeezed: Cannot spill k (9 bytes) to /full: No space left on device (os error 28); it stays in memory",
          ]);
          assert.deepEqual(page.errors, [], "the page threw");
        },
      );

      // The two-column grid has a 420 px floor per column and no one-column fallback:
      // at 800 px the page scrolls sideways, the header stops short of the cards, and
      // the workers table runs past its card.
      await t.step("fits an 800 px wide window", async () => {
        await page.send("Emulation.setDeviceMetricsOverride", {
          width: 800,
          height: VIEWPORT.height,
          deviceScaleFactor: 1,
          mobile: false,
        });
        // The page has the new size and has drawn a frame at it.
        await page.waitFor("window.innerWidth === 800");
        await page.evaluate(
          "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))",
        );
        const png = await page.screenshot();
        await Deno.writeFile(new URL("dashboard-800.png", OUT), png);
        const layout = await page.evaluate<Record<string, number>>(`({
          page: document.documentElement.scrollWidth,
          window: window.innerWidth,
          // A wide table scrolls inside its card rather than spilling out of it.
          table: document.querySelector("#workers").closest(".scroll").getBoundingClientRect().right,
          card: document.querySelector("#workers").closest("section").getBoundingClientRect().right,
        })`);
        assert.ok(layout.page <= layout.window, `the page is ${layout.page} px wide in an 800 px window`);
        assert.ok(
          layout.table <= layout.card,
          `the workers table ends at ${layout.table} px, its card at ${layout.card}`,
        );
      });

      // Colours come from a hash of the name whose last character moves the hue by a
      // degree or so: workers on neighbouring ports (9001, 9002) get the same colour in
      // the memory chart and its legend.
      await t.step("gives workers on neighbouring ports colours apart", async () => {
        const hues = await page.evaluate<number[]>(
          `["tcp://10.0.0.5:9001", "tcp://10.0.0.5:9002"].map((a) => Number(/^hsl\\((\\d+)/.exec(colorOf(a))[1]))`,
        );
        const apart = Math.min(Math.abs(hues[0] - hues[1]), 360 - Math.abs(hues[0] - hues[1]));
        assert.ok(apart >= 30, `hues ${hues.join(" and ")}: ${apart} degrees apart`);
      });
    } finally {
      await Promise.all(workers.map((w) => w.close()));
    }
  },
});
