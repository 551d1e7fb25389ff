/**
 * The deployment smoke test (`deno task deploy:smoke`; also part of `deno task test`):
 * build the image offline (deploy/build_image.sh), `podman kube play` the pod of
 * deploy/podman/dist-pod.yaml (a scheduler and two workers), compute on it from this
 * machine, kill a worker's container in the middle of a map and still get the right
 * result, restart the scheduler's container and see the client's futures complete.
 *
 * It needs root, podman (with runc), mmdebstrap and npm; without them it is skipped,
 * saying why. Here podman needs lowered limits (runc cannot raise RLIMIT_NOFILE in this
 * VM): the test gives podman a containers.conf of its own with them.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, rpc, type SchedulerOps } from "../mod.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

const ROOT = new URL("../", import.meta.url);
const TOKEN = `smoke-${crypto.randomUUID()}`;
const IMAGE = "localhost/dist:0.1.0";
/** How long the pod's nodes may take to start, and a client to see a future complete. */
const WAIT_MS = 90_000;

async function sh(command: string, args: string[], env: Record<string, string> = {}) {
  const out = await new Deno.Command(command, { args, env, stdout: "piped", stderr: "piped", cwd: ROOT })
    .output().catch((error) => ({
      success: false,
      code: -1,
      stdout: new Uint8Array(),
      stderr: new TextEncoder().encode(String(error)),
    }));
  const text = new TextDecoder();
  return { ok: out.success, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

/** Why the smoke test cannot run here, or null. */
async function missing(): Promise<string | null> {
  if (Deno.build.os !== "linux") return "not Linux";
  const uid = await sh("id", ["-u"]);
  if (uid.stdout.trim() !== "0") return "not root (the image build extracts a root file system)";
  for (const tool of ["podman", "mmdebstrap", "npm", "runc"]) {
    if (!(await sh("sh", ["-c", `command -v ${tool}`])).ok) {
      return `${tool} is not installed (apt-get install podman mmdebstrap runc catatonit; npm)`;
    }
  }
  return null;
}

const reason = await missing();
if (reason !== null) console.log(`deploy smoke test skipped: ${reason}`);

Deno.test({
  name: "deploy smoke: the image in a podman pod survives a killed worker and a restarted scheduler",
  ignore: reason !== null,
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "dist-smoke-" });
    const pod = `distsmoke${crypto.randomUUID().slice(0, 6)}`;
    const env = { CONTAINERS_CONF: `${dir}/containers.conf` };
    const podman = (...args: string[]) => sh("podman", args, env);
    try {
      await Deno.writeTextFile(
        env.CONTAINERS_CONF,
        '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]\n',
      );
      await Deno.mkdir(`${dir}/etc-dist`);
      await Deno.writeTextFile(`${dir}/etc-dist/token`, TOKEN, { mode: 0o644 });
      await Deno.chmod(`${dir}/etc-dist`, 0o755);
      await Deno.chmod(dir, 0o755);

      const build = await sh("deploy/build_image.sh", [IMAGE]);
      assert.ok(build.ok, `deploy/build_image.sh failed:\n${build.stdout}\n${build.stderr}`);
      console.log(build.stdout.trim().split("\n").at(-1));

      // The README's pod, under a name of its own and with this test's token file.
      const manifest = (await Deno.readTextFile(new URL("deploy/podman/dist-pod.yaml", ROOT)))
        .replace(/^ {2}name: dist$/m, `  name: ${pod}`)
        .replaceAll("tcp://dist:8786", `tcp://${pod}:8786`)
        .replace("path: /etc/dist", `path: ${dir}/etc-dist`);
      await Deno.writeTextFile(`${dir}/pod.yaml`, manifest);
      const play = await podman("kube", "play", `${dir}/pod.yaml`);
      assert.ok(play.ok, `podman kube play failed:\n${play.stderr}`);

      // The pod's address, from a worker's first line (it listens on the pod's own address).
      const address = await eventually(async () => {
        const logs = await podman("logs", `${pod}-worker-a`);
        return /listening at tcp:\/\/([\d.]+):\d+/.exec(logs.stdout)?.[1] ?? null;
      }, `${pod}-worker-a never said where it listens`);
      const scheduler = `tcp://${address}:8786`;
      await using client = await Client.connect(scheduler, { authToken: TOKEN });
      await using center = rpc<SchedulerOps>(scheduler, { authToken: TOKEN });
      await eventually(
        async () => (await center.workers()).length === 2 || null,
        "the two workers never registered",
      );

      // A map long enough to be in the middle of when a worker's container is killed.
      const slow = (x: number) => {
        const end = Date.now() + 40;
        while (Date.now() < end) { /* work */ }
        return x * x;
      };
      const xs = Array.from({ length: 150 }, (_, i) => i);
      const squares = client.map(slow, xs);
      await eventually(
        () => Promise.resolve(squares.filter((f) => f.done()).length >= 20 || null),
        "the map never started",
      );
      const kill = await podman("kill", "--signal", "KILL", `${pod}-worker-a`);
      assert.ok(kill.ok, kill.stderr);
      console.log(`killed ${pod}-worker-a after ${squares.filter((f) => f.done()).length} of 150 tasks`);
      assert.deepEqual(await within(client.gather(squares)), xs.map((x) => x * x));

      // Podman does not restart a container it killed itself: start it again, as an orchestrator would.
      const start = await podman("start", `${pod}-worker-a`);
      assert.ok(start.ok, start.stderr);
      await eventually(async () => (await center.workers()).length === 2 || null, "worker-a never came back");

      // A worker's container stopped as Kubernetes stops a pod (SIGTERM, through tini and its
      // nanny): the data only it holds moves to the other worker first.
      const b = /listening at (tcp:\/\/\S+)/.exec((await podman("logs", `${pod}-worker-b`)).stdout)![1];
      const [onB] = await client.scatter([new Float64Array([4, 5, 6])], { workers: [b] });
      const stop = await podman("stop", "--time", "60", `${pod}-worker-b`);
      assert.ok(stop.ok, stop.stderr);
      const left = (await center.workers()).map((w) => w.address);
      assert.ok(!left.includes(b), `${b} is still registered: ${left}`);
      assert.ok(left.length >= 1, "no worker left to hand over to");
      assert.deepEqual([...await within(onB.result())], [4, 5, 6]);
      console.log(`stopped ${pod}-worker-b: the value only it held was handed over`);

      // The scheduler's container restarts while tasks are under way: the futures complete.
      const more = client.map(slow, xs.map((x) => x + 1000));
      const restart = await podman("restart", "--time", "2", `${pod}-scheduler`);
      assert.ok(restart.ok, restart.stderr);
      console.log(`restarted ${pod}-scheduler with ${more.filter((f) => f.done()).length} of 150 tasks done`);
      assert.deepEqual(await within(client.gather(more)), xs.map((x) => (x + 1000) ** 2));
    } finally {
      await podman("pod", "rm", "--force", "--time", "2", pod);
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** Polls `probe` until it gives something other than null, failing with `what` after WAIT_MS. */
async function eventually<T>(probe: () => Promise<T | null>, what: string): Promise<T> {
  const deadline = performance.now() + WAIT_MS;
  for (;;) {
    const value = await probe().catch(() => null);
    if (value !== null && value !== false) return value;
    if (performance.now() > deadline) throw new Error(what);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

/** `promise`, or a failure after WAIT_MS. */
async function within<T>(promise: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) =>
        timer = setTimeout(() => reject(new Error(`Not done within ${WAIT_MS} ms`)), WAIT_MS)
      ),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
