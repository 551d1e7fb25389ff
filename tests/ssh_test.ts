/**
 * `dist ssh` against real sshd servers, each in a network namespace of its own (two
 * "machines" on a bridge that this machine reaches through a veth pair): the scheduler
 * on the first, a worker on the second, a client here computing on them, the token never
 * on a command line, every node's output back with its host, and Ctrl-C stopping them all.
 *
 * Needs root, iproute2, openssh-server and openssh-client; skipped with the reason printed
 * otherwise.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Client, rpc, type SchedulerOps } from "../mod.ts";
import { NODE_PERMISSIONS, type NodeProcess, spawnNode } from "../client/spawn.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

const MAIN = new URL("../main.ts", import.meta.url);
const TOKEN = `ssh-test-${crypto.randomUUID()}`;
const SUBNET = "10.214.88";
const WAIT_MS = 60_000;

async function run(command: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(command, { args, stdin: "null", stdout: "piped", stderr: "piped" })
    .output();
  if (!out.success) {
    throw new Error(`${command} ${args.join(" ")} failed: ${new TextDecoder().decode(out.stderr).trim()}`);
  }
  return new TextDecoder().decode(out.stdout);
}

async function skipReason(): Promise<string | null> {
  if (Deno.build.os !== "linux") return "not Linux";
  try {
    if ((await run("id", ["-u"])).trim() !== "0") return "not root (network namespaces need it)";
    await run("ip", ["-V"]);
  } catch (error) {
    return `no iproute2: ${(error as Error).message}`;
  }
  for (const tool of ["/usr/sbin/sshd", "ssh", "ssh-keygen"]) {
    try {
      await run("sh", ["-c", `command -v ${tool}`]);
    } catch {
      return `${tool} is missing (apt-get install openssh-server openssh-client)`;
    }
  }
  return null;
}

const skip = await skipReason();
if (skip !== null) console.log(`ssh_test: skipped: ${skip}`);

/** Every process's command line, arguments apart by NUL (`cat` reads /proc for us). */
async function commandLines(): Promise<string> {
  return await run("sh", ["-c", "cat /proc/[0-9]*/cmdline 2>/dev/null; exit 0"]);
}

async function until(check: () => Promise<boolean>, what: string): Promise<void> {
  const deadline = performance.now() + WAIT_MS;
  while (!(await check().catch(() => false))) {
    if (performance.now() > deadline) throw new Error(`${what} within ${WAIT_MS} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

Deno.test({
  name:
    "dist ssh: a scheduler and a worker on two sshd hosts, the token on no command line, Ctrl-C stops all",
  ignore: skip !== null,
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const tag = crypto.randomUUID().slice(0, 6);
    const bridge = `dssh-br-${tag}`;
    const hosts = [`dssh-a-${tag}`, `dssh-b-${tag}`];
    const ips = [`${SUBNET}.1`, `${SUBNET}.2`];
    const dir = await Deno.makeTempDir({ prefix: "dist-ssh-" });
    const sshds: Deno.ChildProcess[] = [];
    const made: string[] = [];
    let dist: NodeProcess | null = null;
    try {
      // Two machines on a bridge; this one reaches it through a veth pair.
      for (const ns of [bridge, ...hosts]) {
        await run("ip", ["netns", "add", ns]);
        made.push(ns);
        await run("ip", ["-n", ns, "link", "set", "lo", "up"]);
      }
      await run("ip", ["-n", bridge, "link", "add", "br0", "type", "bridge"]);
      await run("ip", ["-n", bridge, "link", "set", "br0", "up"]);
      for (const [i, ns] of hosts.entries()) {
        await run("ip", [
          "link",
          "add",
          `dssh${tag}${i}`,
          "type",
          "veth",
          "peer",
          "name",
          "eth0",
          "netns",
          ns,
        ]);
        await run("ip", ["link", "set", `dssh${tag}${i}`, "netns", bridge]);
        await run("ip", ["-n", bridge, "link", "set", `dssh${tag}${i}`, "master", "br0", "up"]);
        await run("ip", ["-n", ns, "addr", "add", `${ips[i]}/24`, "dev", "eth0"]);
        await run("ip", ["-n", ns, "link", "set", "eth0", "up"]);
      }
      await run("ip", ["link", "add", `dssh${tag}h`, "type", "veth", "peer", "name", `dssh${tag}p`]);
      await run("ip", ["link", "set", `dssh${tag}p`, "netns", bridge]);
      await run("ip", ["-n", bridge, "link", "set", `dssh${tag}p`, "master", "br0", "up"]);
      await run("ip", ["addr", "add", `${SUBNET}.254/24`, "dev", `dssh${tag}h`]);
      await run("ip", ["link", "set", `dssh${tag}h`, "up"]);

      // An sshd on each, trusting one key of ours.
      await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", `${dir}/id`]);
      await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", `${dir}/host`]);
      await Deno.copyFile(`${dir}/id.pub`, `${dir}/authorized_keys`);
      await Deno.mkdir("/run/sshd", { recursive: true });
      for (const [i, ns] of hosts.entries()) {
        const config = `${dir}/sshd_config_${i}`;
        await Deno.writeTextFile(
          config,
          [
            `ListenAddress ${ips[i]}`,
            `HostKey ${dir}/host`,
            `PidFile ${dir}/sshd_${i}.pid`,
            `AuthorizedKeysFile ${dir}/authorized_keys`,
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PrintMotd no",
            "",
          ].join("\n"),
        );
        sshds.push(
          new Deno.Command("ip", {
            args: ["netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e", "-f", config],
            stdin: "null",
            stdout: "null",
            stderr: "null",
          }).spawn(),
        );
      }
      for (const ip of ips) {
        await until(async () => {
          (await Deno.connect({ hostname: ip, port: 22 })).close();
          return true;
        }, `sshd on ${ip} never answered`);
      }

      // dist ssh, as a user runs it, the token in its environment; the worker host from a file.
      await Deno.writeTextFile(`${dir}/hosts`, `# the worker hosts\n${ips[1]}  # b\n\n`);
      const remoteDist = [
        Deno.execPath(),
        "run",
        "--no-config",
        ...NODE_PERMISSIONS,
        "--allow-run",
        MAIN.href,
      ]
        .join(" ");
      dist = await spawnNode(
        [
          "ssh",
          ips[0],
          "--hosts-file",
          `${dir}/hosts`,
          "--nthreads",
          "1",
          "--remote-dist",
          remoteDist,
          `--ssh-options=-i ${dir}/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR`,
        ],
        { env: { DIST_AUTH_TOKEN: TOKEN } },
      );
      const stderr = dist.log;
      const address = `tcp://${ips[0]}:8786`;
      assert.equal(dist.address, address, stderr.join("\n"));

      await using client = await Client.connect(address, { authToken: TOKEN });
      const squares = client.map((x: number) => x * x, [1, 2, 3, 4]);
      assert.deepEqual(await client.gather(squares), [1, 4, 9, 16]);
      await using center = rpc<SchedulerOps>(address, { authToken: TOKEN });
      const workers = await center.workers();
      assert.equal(workers.length, 1);
      assert.match(workers[0].address, new RegExp(`^tcp://${ips[1].replaceAll(".", "\\.")}:\\d+$`));
      // Every node's output came back with its host and role.
      assert.ok(stderr.some((l) => l.startsWith(`[${ips[0]} scheduler] `)), stderr.join("\n"));
      assert.ok(stderr.some((l) => l.startsWith(`[${ips[1]} worker-0] `)), stderr.join("\n"));
      // The token is on no command line, here or on the hosts.
      assert.ok(!(await commandLines()).includes(TOKEN), "the token is on a command line");

      // Ctrl-C: dist ssh stops every node and exits.
      dist.child.kill("SIGINT");
      const status = await dist.status;
      dist = null;
      assert.equal(status.code, 0, stderr.join("\n"));
      // The worker (and its nanny) had the scheduler's address on their command line; the
      // scheduler's port closes.
      await until(async () => !(await commandLines()).includes(address), "the worker did not stop");
      await until(async () => {
        try {
          (await Deno.connect({ hostname: ips[0], port: 8786 })).close();
          return false;
        } catch {
          return true;
        }
      }, "the scheduler did not stop");
    } finally {
      try {
        dist?.child.kill("SIGKILL");
      } catch { /* exited */ }
      await dist?.status;
      for (const sshd of sshds) {
        try {
          sshd.kill("SIGTERM");
        } catch { /* exited */ }
        await sshd.status;
      }
      await run("ip", ["link", "del", `dssh${tag}h`]).catch(() => {});
      for (const ns of made.reverse()) await run("ip", ["netns", "del", ns]).catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
  },
});
