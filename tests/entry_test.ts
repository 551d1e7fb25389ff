/**
 * What each entry point loads: the client (`mod.ts`) none of the scheduler's or the
 * worker's code, `node.ts` both. Read from Deno's own module graph: the modules a
 * program evaluates when it imports the entry (static code imports; type-only and
 * dynamic ones are not evaluated at import).
 *
 * @module
 */

import assert from "node:assert/strict";

interface GraphModule {
  specifier: string;
  dependencies?: { code?: { specifier?: string }; isDynamic?: boolean }[];
}

/** The modules evaluated when `entry` is imported. */
async function loadedBy(entry: string): Promise<string[]> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", new URL(`../${entry}`, import.meta.url).href],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
  const graph = JSON.parse(new TextDecoder().decode(out.stdout)) as {
    roots: string[];
    modules: GraphModule[];
  };
  const modules = new Map(graph.modules.map((m) => [m.specifier, m]));
  const seen = new Set<string>();
  const stack = [...graph.roots];
  while (stack.length > 0) {
    const specifier = stack.pop()!;
    if (seen.has(specifier)) continue;
    seen.add(specifier);
    for (const dep of modules.get(specifier)?.dependencies ?? []) {
      if (!dep.isDynamic && dep.code?.specifier) stack.push(dep.code.specifier);
    }
  }
  const root = new URL("../", import.meta.url).href;
  return [...seen].map((s) => s.startsWith(root) ? s.slice(root.length) : s).sort();
}

Deno.test("importing the client loads no scheduler, worker or dashboard code; node.ts loads them", async () => {
  const client = await loadedBy("mod.ts");
  assert.deepEqual(client.filter((m) => /^(scheduler|worker)\//.test(m)), [], client.join("\n"));
  assert.ok(client.includes("client/client.ts"));
  assert.ok(
    !client.some((m) => m.startsWith("npm:") || m.startsWith("node:")),
    "no Node layer in the client",
  );
  const node = await loadedBy("node.ts");
  for (
    const m of ["scheduler/scheduler.ts", "scheduler/dashboard.ts", "worker/worker.ts", "worker/state.ts"]
  ) {
    assert.ok(node.includes(m), `node.ts loads ${m}`);
  }
});
