/**
 * The seed exchange on a real local cluster: a scheduler and two workers, Alice and
 * Bob, each its own process on 127.0.0.1. The client asks Alice to compute
 * z <- add(x, a) while `a` lives only on Bob; the nodes' own logs show Alice asking
 * the scheduler who has `a`, fetching it from Bob, and reporting z.
 *
 * Run: deno task demo:rpc
 *
 * @module
 */

import { rpc } from "../mod.ts";
import { type NodeProcess, spawnNode } from "../client/spawn.ts";

const names = new Map<string, string>();
const show = (who: string) => (line: string) => {
  // Keep the node's message, drop its timestamp and level.
  const message = line.replace(/^\S+ +\w+ +[^:]+: /, "");
  if (/Scheduler at|Registered with|registered \(|Worker closed|Scheduler closed|left \(/.test(message)) {
    return;
  }
  console.log(`    ${who.padEnd(9)} | ${message.replace(/tcp:\/\/[\d.]+:\d+/g, (a) => names.get(a) ?? a)}`);
};

const nodes: NodeProcess[] = [];
try {
  console.log("Starting a scheduler and two workers, each its own process on 127.0.0.1 ...");
  const scheduler = await spawnNode(["scheduler", "--port", "0", "--log-level", "debug"], {
    onLog: show("scheduler"),
  });
  nodes.push(scheduler);
  names.set(scheduler.address, "scheduler");
  for (const name of ["alice", "bob"]) {
    const node = await spawnNode(["worker", scheduler.address, "--name", name, "--log-level", "debug"], {
      onLog: show(name),
    });
    nodes.push(node);
    names.set(node.address, name);
  }
  const [, aliceNode, bobNode] = nodes;
  for (const n of nodes) console.log(`  ${names.get(n.address)!.padEnd(9)} listening at ${n.address}`);

  await using alice = rpc(aliceNode.address);
  await using bob = rpc(bobNode.address);
  await using center = rpc(scheduler.address);

  console.log("\nclient: Hey Alice! Hold x.   Hey Bob! Hold a.");
  await alice.update_data({ data: { x: new Float64Array([1, 2, 3]) } });
  await bob.update_data({ data: { a: new Float64Array([10, 20, 30]) } });
  await scheduler.waitForLog(/has a/);

  console.log("\nclient: Hey Alice!   Compute z <- add(x, a)");
  const add = (x: Float64Array, y: Float64Array) => x.map((v, i) => v + y[i]);
  const reply = await alice.compute({ key: "z", function: add, keys: ["x", "a"] });
  // The reply can overtake the nodes' log lines on their way here: wait for them.
  await aliceNode.waitForLog(/Computed z/);
  await scheduler.waitForLog(/has z/);
  console.log(`alice:  Hey Client!  I've computed z and am holding on to it! -> ${JSON.stringify(reply)}`);

  const whoHas = await center.who_has({ keys: ["z", "a"] });
  const named = (list: string[]) => list.map((a) => names.get(a) ?? a).join(", ");
  console.log(`\nclient: Hey Center! Who has z? ${named(whoHas.z)}.  Who has a? ${named(whoHas.a)}.`);
  const { z } = await alice.get_data({ keys: ["z"] });
  console.log(`client: Hey Alice! Send me z! -> ${(z as Float64Array).constructor.name} [${z}]`);
  if (String(z) !== "11,22,33") throw new Error(`z should be 11,22,33, got ${z}`);
  console.log("\nStopping the nodes (SIGTERM) ...");
} finally {
  for (const node of nodes.reverse()) await node.stop();
}
console.log("Done.");
