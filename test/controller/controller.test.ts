/**
 * The controller in-process: real storage and registries of the API server, Modules from a
 * directory (stand-alone inputs), a real image registry and the real Image stage.
 */
import { mkdtemp, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import t, { type Test } from 'tap';
import type { KubeObject } from '../../src/api/resources.ts';
import type { Builder, BuildRequest } from '../../src/build/types.ts';
import { Registry } from 'prom-client';
import { createPreflightController, type EventRecorder } from '../../src/controller/controller.ts';
import { createControllerMetrics } from '../../src/controller/metrics.ts';
import { createDirectoryInputs } from '../../src/controller/directory-inputs.ts';
import { createImageStage } from '../../src/engine/image-stage.ts';
import { createMemoryLayerCache } from '../../src/engine/layer-cache.ts';
import { createRegistryClient } from '../../src/registry/client.ts';
import type { RequestContext } from '../../src/server/registry.ts';
import { createRegistries } from '../../src/server/server.ts';
import { openSqliteStore } from '../../src/storage/sqlite-store.ts';
import { pushImage } from '../helpers/images.ts';
import { buildModuleObject } from '../helpers/kmod-fixtures.ts';
import { startRegistry, type TestRegistry } from '../helpers/registry.ts';

t.setTimeout(180_000);

const K = '6.1.0-18-amd64';
const K2 = '6.2.0-1-amd64';
const logger = pino({ level: 'silent' });
const ctx: RequestContext = { user: { username: 'test', groups: ['system:masters'] }, dryRun: false, fieldManager: 'test', fieldValidation: 'Strict', warnings: [] };

let registry: TestRegistry;
let dir: string;

async function image(repoTag: string, name: string, kernel: string) {
  const ko = await buildModuleObject({ name, vermagic: `${kernel} SMP preempt mod_unload modversions` });
  return pushImage(registry, repoTag, {
    layers: [{ entries: [{ path: `opt/lib/modules/${kernel}/extra/${name}.ko`, content: ko }, { path: `opt/lib/modules/${kernel}/modules.dep`, content: `extra/${name}.ko:\n` }] }],
  });
}

const moduleYaml = (name: string, ns: string, imageRef: string) => `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {name: ${name}, namespace: ${ns}}
spec:
  selector: {kubernetes.io/arch: amd64}
  moduleLoader:
    container:
      modprobe: {moduleName: ${name}}
      kernelMappings:
        - regexp: '^6\\..*'
          containerImage: ${imageRef}
          registryTLS: {insecure: true}
`;

t.before(async () => {
  registry = await startRegistry();
  dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-controller-'));
});
t.teardown(async () => {
  await registry?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** Storage and registries of the API server, Modules from `modulesDir`, a registry client; closed after `t`. */
async function parts(t: Test, modulesDir: string, db: string) {
  const store = await openSqliteStore({ path: join(dir, `${db}.sqlite`), compactIntervalMs: 0 });
  t.teardown(() => store.close());
  const [pfv, pfvo] = createRegistries(store, logger);
  const inputs = createDirectoryInputs([modulesDir], logger);
  t.teardown(() => inputs.stop());
  const client = createRegistryClient();
  t.teardown(() => client.close());
  return { pfv, pfvo, inputs, client };
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

t.test('every Module validated; failures keep distinct reasons; a fix re-validates only that Module; adds and deletes follow', async (t) => {
  const modulesDir = join(dir, 'modules');
  await import('node:fs/promises').then((fs) => fs.mkdir(modulesDir));
  for (let i = 0; i < 6; i++) {
    await image(`drivers/m${i}:${K}`, `m${i}`, K);
    await writeFile(join(modulesDir, `m${i}.yaml`), moduleYaml(`m${i}`, `ns-${i % 2}`, `${registry.host}/drivers/m${i}:\${KERNEL_FULL_VERSION}`));
  }
  await writeFile(join(modulesDir, 'missing.yaml'), moduleYaml('missing', 'ns-0', `${registry.host}/drivers/missing:\${KERNEL_FULL_VERSION}`));
  const { pfv, pfvo, inputs, client } = await parts(t, modulesDir, 'db');
  const events: string[] = [];
  const recorder: EventRecorder = { record: (obj, type, reason, message) => void events.push(`${obj.metadata.name}:${type}:${reason}:${message}`) };
  const metricsRegistry = new Registry();
  let ctrl: { stats: { queued: number; running: number } } | undefined;
  const metrics = createControllerMetrics(metricsRegistry, {
    queued: () => ctrl?.stats.queued ?? 0,
    running: () => ctrl?.stats.running ?? 0,
    registryBytes: () => client.bytesReceived,
  });
  const controller = createPreflightController({
    metrics,
    pfv: pfv!,
    pfvo: pfvo!,
    inputs,
    imageStage: createImageStage({ registry: client, cache: createMemoryLayerCache() }),
    registryClient: client,
    platform: { os: 'linux', architecture: 'amd64' },
    logger,
    events: recorder,
    flushIntervalMs: 100,
  });
  await pfv!.create({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name: 'k1' }, spec: { kernelVersion: K } }, ctx);
  await pfv!.create({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name: 'k2' }, spec: { kernelVersion: K2 } }, ctx);
  ctrl = controller;
  await controller.start();
  t.teardown(() => controller.stop());

  const settled = (name: string, total: number) =>
    waitFor(`${name} to settle`, async () => {
      const o = (await pfv!.get(name)).obj as KubeObject;
      const c = o.status?.counts;
      return c && c.total === total && c.pending === 0 && c.error === 0 ? o : undefined;
    });
  const k1 = await settled('k1', 7);
  t.match(k1.status!.counts, { total: 7, verified: 6, failed: 1 });
  const byKey = new Map(k1.status!.modules!.map((m) => [`${m.namespace}/${m.name}`, m]));
  t.match(byKey.get('ns-0/m0'), { verificationStatus: 'True', verificationStage: 'Done' });
  t.match(byKey.get('ns-0/missing'), { verificationStatus: 'False', verificationStage: 'Requeued', statusReason: /not found/ });
  t.match(k1.status!.conditions, [{ type: 'Verified', status: 'False', reason: 'ModulesFailed' }, { type: 'Progressing', status: 'False' }]);
  t.equal(k1.status!.observedGeneration, 1);
  t.equal(k1.status!.kernelVersion, K);

  const k2 = await settled('k2', 7);
  t.equal(k2.status!.counts!.verified, 0, 'the other kernel has its own, separate results');
  t.match(k2.status!.modules!.find((m) => m.name === 'm0'), { verificationStatus: 'False', statusReason: /not found/ });

  // Fix the failing Module with a new image: only it is validated again.
  const before = new Map(k1.status!.modules!.map((m) => [m.name, m.lastTransitionTime]));
  await image(`drivers/missing:${K}`, 'missing', K);
  await writeFile(join(modulesDir, 'missing.yaml'), moduleYaml('missing', 'ns-0', `${registry.host}/drivers/missing:${K}`));
  const fixed = await waitFor('the fixed Module to verify', async () => {
    const o = (await pfv!.get('k1')).obj as KubeObject;
    return o.status?.counts?.verified === 7 ? o : undefined;
  });
  t.match(fixed.status!.conditions, [{ type: 'Verified', status: 'True', reason: 'AllModulesVerified' }]);
  for (const m of fixed.status!.modules!) {
    if (m.name !== 'missing') t.equal(m.lastTransitionTime, before.get(m.name), `${m.name} untouched`);
  }

  // Delete one Module and add another.
  await unlink(join(modulesDir, 'm5.yaml'));
  await image(`drivers/late:${K}`, 'late', K);
  await writeFile(join(modulesDir, 'late.yaml'), moduleYaml('late', 'ns-9', `${registry.host}/drivers/late:${K}`));
  const after = await waitFor('the add and the delete', async () => {
    const o = (await pfv!.get('k1')).obj as KubeObject;
    const names = new Set(o.status?.modules?.map((m) => m.name));
    return names.has('late') && !names.has('m5') && o.status?.counts?.pending === 0 ? o : undefined;
  });
  t.equal(after.status!.counts!.total, 7);
  t.ok(events.some((e) => e.startsWith('k1:Warning:ModuleFailed:Module ns-0/missing')), 'a Warning event for the failure');
  t.ok(events.some((e) => e.startsWith('k1:Normal:ModuleVerified:Module ns-0/missing')), 'a Normal event for its fix');
  // A spec change of the object restarts its validation, for the new kernel.
  await pfv!.patch('k2', 'merge', { spec: { kernelVersion: K } }, ctx, '', false);
  const restarted = await waitFor('the restarted validation', async () => {
    const o = (await pfv!.get('k2')).obj as KubeObject;
    return o.status?.observedGeneration === 2 && o.status.counts?.pending === 0 && o.status.counts.error === 0 ? o : undefined;
  });
  t.equal(restarted.status!.kernelVersion, K);
  t.equal(restarted.status!.counts!.verified, 7, 'every Module validated again for the new kernel');
  t.ok(controller.stats.statusWrites < 40, `status writes are coalesced (${controller.stats.statusWrites})`);
  const text = await metricsRegistry.metrics();
  t.match(text, /kmm_preflight_validation_outcomes_total\{status="True",code="Verified"\} \d+/);
  t.match(text, /kmm_preflight_validation_outcomes_total\{status="False",code="ImageNotFound"\} \d+/);
  t.match(text, /kmm_preflight_stage_duration_seconds_count\{stage="Image"\} \d+/);
  t.match(text, /kmm_preflight_status_writes_total \d+/);
  t.match(text, /kmm_preflight_registry_received_bytes [1-9]\d*/);
  t.match(text, /kmm_preflight_validation_queue_depth 0/);
});

t.test("a Module is validated for its own architecture: the platform comes from platformFor", async (t) => {
  const modulesDir = join(dir, 'arch-modules');
  await import('node:fs/promises').then((fs) => fs.mkdir(modulesDir));
  const { pushIndex } = await import('../helpers/images.ts');
  const amd64 = await image(`drivers/multi:amd64`, 'multi', K);
  const index = await pushIndex(registry, 'drivers/multi:v1', [{ platform: { os: 'linux', architecture: 'amd64' }, ref: amd64 }]);
  await writeFile(join(modulesDir, 'amd.yaml'), moduleYaml('multi', 'ns-a', index.reference));
  await writeFile(join(modulesDir, 'arm.yaml'), moduleYaml('multi', 'ns-b', index.reference).replace('kubernetes.io/arch: amd64', 'kubernetes.io/arch: arm64'));
  const { pfv, pfvo, inputs, client } = await parts(t, modulesDir, 'arch');
  const controller = createPreflightController({
    pfv: pfv!,
    pfvo: pfvo!,
    inputs,
    imageStage: createImageStage({ registry: client, cache: createMemoryLayerCache() }),
    registryClient: client,
    platform: { os: 'linux', architecture: 'amd64' },
    platformFor: (m) => ({ os: 'linux', architecture: m.spec.selector['kubernetes.io/arch'] ?? 'amd64' }),
    logger,
    flushIntervalMs: 100,
  });
  await pfv!.create({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name: 'arch' }, spec: { kernelVersion: K } }, ctx);
  await controller.start();
  t.teardown(() => controller.stop());
  const o = await waitFor('both verdicts', async () => {
    const x = (await pfv!.get('arch')).obj as KubeObject;
    return x.status?.counts?.total === 2 && x.status.counts.pending === 0 && x.status.counts.error === 0 ? x : undefined;
  });
  const by = new Map(o.status!.modules!.map((m) => [m.namespace, m]));
  t.match(by.get('ns-a'), { verificationStatus: 'True' });
  t.match(by.get('ns-b'), { verificationStatus: 'False', statusReason: /arm64/ });
});

t.test('a running build shows Unknown/Build; its end, announced by the builder, is recorded, then the build is released', async (t) => {
  const modulesDir = join(dir, 'build-modules');
  await import('node:fs/promises').then((fs) => fs.mkdir(modulesDir));
  await writeFile(
    join(modulesDir, 'built.yaml'),
    `${moduleYaml('built', 'ns-b', `${registry.host}/drivers/built:\${KERNEL_FULL_VERSION}`)}      build: {dockerfileConfigMap: {name: df}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: df, namespace: ns-b}\ndata: {dockerfile: "FROM scratch"}\n`,
  );
  const { pfv, pfvo, inputs, client } = await parts(t, modulesDir, 'build');

  let finished = false;
  const listeners: ((key: string) => void)[] = [];
  const runs: BuildRequest[] = [];
  const releases: { key: string; statusAtRelease: string | undefined }[] = [];
  const entryOf = async () => ((await pfv!.get('b1')).obj as KubeObject).status?.modules?.find((m) => m.name === 'built');
  const builder: Builder = {
    kind: 'test',
    async run(req) {
      runs.push(req);
      return finished
        ? { state: 'Succeeded', image: req.destination, pushed: false, reason: `built ${req.destination} (not pushed: pushBuiltImage is false)` }
        : { state: 'Running', reason: 'build Job ns-b/built-build-x running for 1 s' };
    },
    async release(key) {
      releases.push({ key, statusAtRelease: (await entryOf())?.verificationStatus });
    },
    onUpdate: (l) => void listeners.push(l),
    async close() {},
  };
  const controller = createPreflightController({
    pfv: pfv!,
    pfvo: pfvo!,
    inputs,
    imageStage: createImageStage({ registry: client, cache: createMemoryLayerCache() }),
    registryClient: client,
    platform: { os: 'linux', architecture: 'amd64' },
    logger,
    flushIntervalMs: 100,
    builder,
    signStage: { run: async () => ({ status: 'False', code: 'Unused', reason: 'no sign section here' }) },
    // Longer than the test: only the builder's announcement can bring the end in time.
    buildPollMs: 600_000,
  });
  await pfv!.create({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name: 'b1' }, spec: { kernelVersion: K } }, ctx);
  await controller.start();
  t.teardown(() => controller.stop());

  const running = await waitFor('Unknown/Build', async () => {
    const e = await entryOf();
    return e?.verificationStage === 'Build' ? e : undefined;
  });
  t.equal(running.verificationStatus, 'Unknown');
  t.match(running.statusReason, /running for 1 s/);
  t.equal(runs[0]!.key, 'pfv/b1|ns-b/built', 'one build per (object, Module)');
  t.match(runs[0]!.owner, { kind: 'PreflightValidation', name: 'b1' });
  t.ok(runs[0]!.owner.uid, 'owned by the object (its uid)');
  t.equal(releases.length, 0, 'nothing released while the build runs');

  finished = true;
  for (const l of listeners) l(runs[0]!.key);
  const done = await waitFor('True/Done', async () => {
    const e = await entryOf();
    return e?.verificationStatus === 'True' ? e : undefined;
  });
  t.equal(done.verificationStage, 'Done');
  t.match(done.statusReason, /not pushed/);
  await waitFor('the release', async () => (releases.length > 0 ? true : undefined));
  t.same(releases, [{ key: 'pfv/b1|ns-b/built', statusAtRelease: 'True' }], 'released after the verdict was written');
});
