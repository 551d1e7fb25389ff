/**
 * Puts the `dist` command on the PATH: `deno install -g` of main.ts with exactly the
 * permissions a node needs, from this checkout or from the URL this file was run from.
 *
 *     deno task install                      # from a checkout
 *     deno run -A URL/deploy/install.ts      # from a URL
 *     ... [--root DIR] [--name NAME]         # default: $DENO_INSTALL_ROOT or ~/.deno, "dist"
 *
 * `deno install` writes a shell script that runs `deno` from the PATH. A user whose Deno
 * came from npm (`npx deno ...`) has none there, so when the PATH's `deno` is missing or
 * is another binary, the script runs the Deno this installer ran on, by its full path.
 *
 * @module
 */

import { NODE_PERMISSIONS, NODE_V8_FLAGS } from "../client/spawn.ts";

const usage = "Usage: deno task install [--root DIR] [--name NAME]";

/** Exactly what `dist` runs with: a node's permissions, and `run` (nannies, `dist local`, process executors). */
export const DIST_PERMISSIONS: readonly string[] = [...NODE_PERMISSIONS, "--allow-run"];

function flag(args: string[], name: string): string | undefined {
  const at = args.indexOf(name);
  if (at < 0) return undefined;
  const value = args[at + 1];
  if (value === undefined || value.startsWith("--")) throw new Error(`${name} needs a value. ${usage}`);
  args.splice(at, 2);
  return value;
}

/** The file `name` resolves to on `path` (a PATH value), or null. */
function onPath(name: string, path: string): string | null {
  for (const dir of path.split(":")) {
    if (dir === "") continue;
    try {
      const file = `${dir}/${name}`;
      if (Deno.statSync(file).isFile) return Deno.realPathSync(file);
    } catch { /* not there */ }
  }
  return null;
}

async function main(args: string[]): Promise<number> {
  args = [...args];
  if (args.includes("--help") || args.includes("-h")) {
    console.log(usage);
    return 0;
  }
  const name = flag(args, "--name") ?? "dist";
  const home = Deno.env.get("HOME");
  const root = flag(args, "--root") ?? Deno.env.get("DENO_INSTALL_ROOT") ??
    (home ? `${home}/.deno` : undefined);
  if (args.length > 0) throw new Error(`unexpected argument ${JSON.stringify(args[0])}. ${usage}`);
  if (root === undefined) throw new Error("No HOME and no DENO_INSTALL_ROOT: say where with --root DIR");
  const main = new URL("../main.ts", import.meta.url).href;
  const deno = Deno.execPath();
  const install = await new Deno.Command(deno, {
    args: [
      "install",
      "--global",
      "--force",
      "--name",
      name,
      "--root",
      root,
      "--no-config",
      NODE_V8_FLAGS,
      ...DIST_PERMISSIONS,
      main,
    ],
    stdout: "inherit",
    stderr: "piped",
  }).output();
  if (!install.success) {
    console.error(new TextDecoder().decode(install.stderr));
    throw new Error(`deno install failed (exit ${install.code})`);
  }
  const bin = `${root}/bin`;
  const shim = `${bin}/${name}`;
  const text = await Deno.readTextFile(shim);
  const path = Deno.env.get("PATH") ?? "";
  const pathDeno = onPath("deno", path);
  const ownDeno = Deno.realPathSync(deno);
  let runs = "deno (from the PATH)";
  if (pathDeno !== ownDeno && /^exec deno /m.test(text)) {
    // The PATH has no deno, or another one: run this one by its full path.
    await Deno.writeTextFile(
      shim,
      text.replace(/^exec deno /m, `exec '${ownDeno.replaceAll("'", "'\\''")}' `),
    );
    runs = `${ownDeno} (${pathDeno === null ? "the PATH has no deno" : `not the PATH's ${pathDeno}`})`;
  }
  console.log(`Installed ${shim}, which runs ${main} with ${runs}.`);
  if (!path.split(":").some((dir) => dir === bin || dir === `${bin}/`)) {
    console.log(`${bin} is not on your PATH; add it, e.g.:\n  export PATH="${bin}:$PATH"`);
  }
  console.log(`Try: ${name} --version && ${name} local`);
  return 0;
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args));
  } catch (error) {
    console.error(`install: ${(error as Error).message}`);
    Deno.exit(1);
  }
}
