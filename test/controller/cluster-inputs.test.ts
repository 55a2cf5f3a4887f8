/**
 * The cluster inputs (src/controller/cluster-inputs.ts) against a real kube-apiserver
 * (test/helpers/control-plane.ts) with the test Module CRD (test/fixtures/module-crd.yaml):
 * the first sync, Module events, dependency events for referenced Secrets and ConfigMaps only,
 * the data of unreferenced Secrets kept out of memory, and restarts that lose no change.
 *
 * The client talks to kube-apiserver through a TCP proxy of this test, which can cut every
 * connection and refuse new ones: the informers then fail and restart. kube-apiserver runs
 * without its watch cache and compacts etcd every 2 s, so that a long enough outage makes the
 * informers' resourceVersion too old (410) and they must list again.
 *
 * Never skipped: without the control plane's binaries this fails with the reason.
 */
import { KubeConfig } from '@kubernetes/client-node';
import { createServer, connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import t from 'tap';
import { createClusterInputs } from '../../src/controller/cluster-inputs.ts';
import type { ClusterInputs, DependencyChange, ModuleChange } from '../../src/controller/inputs.ts';
import { moduleKey } from '../../src/engine/module.ts';
import { startControlPlane, type ControlPlane } from '../helpers/control-plane.ts';
import { ROOT } from '../helpers/server.ts';

// Starting includes building kube-apiserver when the cache is cold and no `before` script ran.
t.setTimeout(30 * 60_000);

const WAIT_MS = 15_000;

type Event = ({ event: 'module' } & ModuleChange) | ({ event: 'dependency' } & DependencyChange);
const describeEvent = (e: Event) => (e.event === 'module' ? `module ${e.type} ${moduleKey(e.module)}` : `dependency ${e.kind} ${e.namespace}/${e.name} [${e.modules.join(',')}]`);

function recorder(inputs: ClusterInputs, onModule?: (c: ModuleChange) => void) {
  const queue: Event[] = [];
  let wake: (() => void) | undefined;
  const push = (e: Event) => {
    queue.push(e);
    wake?.();
  };
  inputs.on('module', (c) => {
    onModule?.(c);
    push({ event: 'module', ...c });
  });
  inputs.on('dependency', (c) => push({ event: 'dependency', ...c }));
  const waitForAny = async (deadline: number) => {
    const left = deadline - Date.now();
    if (left <= 0) return false;
    await new Promise<void>((r) => {
      const timer = setTimeout(r, left);
      wake = () => {
        clearTimeout(timer);
        r();
      };
    });
    wake = undefined;
    return true;
  };
  return {
    /** The next event, in order. */
    async next(ms = WAIT_MS): Promise<Event> {
      const deadline = Date.now() + ms;
      while (queue.length === 0) if (!(await waitForAny(deadline))) throw new Error(`no event within ${ms} ms`);
      return queue.shift()!;
    },
    /** Events until every one of `expected` (described) has been seen; returns all, described. */
    async until(expected: readonly (string | RegExp)[], ms = WAIT_MS): Promise<string[]> {
      const deadline = Date.now() + ms;
      const seen: string[] = [];
      const missing = () => expected.filter((e) => !seen.some((s) => (typeof e === 'string' ? s === e : e.test(s))));
      while (missing().length > 0) {
        while (queue.length > 0) seen.push(describeEvent(queue.shift()!));
        if (missing().length === 0) break;
        if (!(await waitForAny(deadline))) throw new Error(`within ${ms} ms, still missing ${JSON.stringify(missing())}; seen ${JSON.stringify(seen)}`);
      }
      return seen;
    },
    drain(): string[] {
      return queue.splice(0).map(describeEvent);
    },
  };
}

/** A TCP proxy to kube-apiserver that can cut every connection and refuse new ones. */
async function startProxy(targetUrl: string) {
  const target = new URL(targetUrl);
  const sockets = new Set<Socket>();
  let blocked = false;
  const server = createServer((client) => {
    if (blocked) {
      client.resetAndDestroy();
      return;
    }
    const upstream = connect(Number(target.port), target.hostname);
    sockets.add(client);
    sockets.add(upstream);
    const close = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', close).on('close', close);
    upstream.on('error', close).on('close', close);
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return {
    url: `https://127.0.0.1:${port}`,
    block() {
      blocked = true;
      for (const s of sockets) s.resetAndDestroy();
    },
    unblock() {
      blocked = false;
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

function logCapture() {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(...chunk.toString().split('\n').filter((l) => l !== ''));
      cb();
    },
  });
  return { logger: pino({ level: 'debug' }, stream), lines };
}

function bounded<T>(p: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p.finally(() => clearTimeout(timer)), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms)))]);
}

async function eventually(what: string, ok: () => boolean | Promise<boolean>, ms = WAIT_MS): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const moduleYaml = (namespace: string, name: string, o: { image?: string; pullSecret?: string; buildSecret?: string; dockerfile?: string; keySecret?: string } = {}) => `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata:
  name: ${name}
  namespace: ${namespace}
spec:
${o.pullSecret ? `  imageRepoSecret:\n    name: ${o.pullSecret}\n` : ''}  selector:
    kubernetes.io/os: linux
  moduleLoader:
    container:
      modprobe:
        moduleName: ${name}
${o.buildSecret ? `      build:\n        dockerfileConfigMap:\n          name: ${o.dockerfile ?? 'unused-dockerfile'}\n        secrets:\n          - name: ${o.buildSecret}\n` : ''}      kernelMappings:
        - regexp: '^.+$'
          containerImage: ${o.image ?? `registry.example/${name}:\${KERNEL_FULL_VERSION}`}
${o.dockerfile && !o.buildSecret ? `          build:\n            dockerfileConfigMap:\n              name: ${o.dockerfile}\n` : ''}${o.keySecret ? `          sign:\n            keySecret:\n              name: ${o.keySecret}\n            certSecret:\n              name: ${o.keySecret}\n` : ''}`;

/** Secret values the logs must never show (plain and base64). */
const SECRET_VALUES: string[] = [];
const pullSecretYaml = (namespace: string, name: string, password: string) => {
  const config = JSON.stringify({ auths: { 'registry.example': { auth: Buffer.from(`user:${password}`).toString('base64') } } });
  SECRET_VALUES.push(password, Buffer.from(config).toString('base64'));
  return `apiVersion: v1
kind: Secret
metadata:
  name: ${name}
  namespace: ${namespace}
type: kubernetes.io/dockerconfigjson
data:
  .dockerconfigjson: ${Buffer.from(config).toString('base64')}
`;
};
const opaqueSecretYaml = (namespace: string, name: string, value: string) => {
  SECRET_VALUES.push(value);
  return `apiVersion: v1\nkind: Secret\nmetadata:\n  name: ${name}\n  namespace: ${namespace}\nstringData:\n  value: ${value}\n`;
};
const configMapYaml = (namespace: string, name: string, dockerfile: string) =>
  `apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ${name}\n  namespace: ${namespace}\ndata:\n  dockerfile: ${JSON.stringify(dockerfile)}\n`;

t.test('an unreachable kube-apiserver: restarts with a growing delay; stop() ends it and rejects synced', async (t) => {
  const closed = createServer();
  await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
  const port = (closed.address() as { port: number }).port;
  await new Promise<void>((r) => closed.close(() => r()));
  const kc = new KubeConfig();
  kc.loadFromOptions({
    clusters: [{ name: 'c', server: `https://127.0.0.1:${port}`, skipTLSVerify: true }],
    users: [{ name: 'u', token: 'not-a-real-token' }],
    contexts: [{ name: 'x', cluster: 'c', user: 'u' }],
    currentContext: 'x',
  });
  const { logger, lines } = logCapture();
  const inputs = createClusterInputs(kc, logger, { retryBaseMs: 50, retryMaxMs: 400 });
  const delays = () => lines.filter((l) => l.includes('restarting the informer')).map((l) => (JSON.parse(l) as { retryInMs: number; resource: string }));
  await eventually('four restarts', () => delays().length >= 4, 10_000);
  t.ok(delays().every((d) => d.resource === 'modules'), 'only the Module informer runs before the Modules are listed');
  const ms = delays().map((d) => d.retryInMs);
  t.ok(ms[3]! > ms[0]!, `the delay grows: ${JSON.stringify(ms)}`);
  t.ok(ms.every((d) => d <= 400 * 1.2), 'up to the maximum (with jitter)');
  await bounded(inputs.stop(), 'stop');
  await t.rejects(inputs.synced, /stopped before the first sync/);
  const after = delays().length;
  await new Promise((r) => setTimeout(r, 600));
  t.equal(delays().length, after, 'no restart after stop()');
});

let plane: ControlPlane | undefined;
try {
  plane = await startControlPlane({ extraApiServerArgs: ['--watch-cache=false', '--etcd-compaction-interval=2s'] });
} catch (err) {
  t.fail(`the test control plane did not start: ${(err as Error).message}`);
}
t.teardown(() => plane?.stop());

if (plane) {
  const kube = plane;
  const kubectl = async (args: readonly string[], input?: string) => {
    const r = await kube.kubectl(args, input === undefined ? {} : { input });
    if (r.code !== 0) throw new Error(`kubectl ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
    return r.stdout;
  };
  const apply = (yaml: string) => kubectl(['apply', '-f', '-'], yaml);

  await kubectl(['apply', '-f', join(ROOT, 'test', 'fixtures', 'module-crd.yaml')]);
  await kubectl(['wait', '--for=condition=Established', 'crd/modules.kmm.sigs.x-k8s.io', '--timeout=60s']);
  await kubectl(['create', 'namespace', 'ns-a']);
  await kubectl(['create', 'namespace', 'ns-b']);

  // Before the inputs start: Modules, their pull secret, a Dockerfile ConfigMap, a signing key,
  // Secrets no Module references, and an invalid Module.
  await apply(
    [
      moduleYaml('ns-a', 'm1', { pullSecret: 'pull-a', dockerfile: 'dockerfile-a', keySecret: 'key-a' }),
      moduleYaml('ns-a', 'm2', { pullSecret: 'pull-a' }),
      moduleYaml('ns-b', 'm3', { pullSecret: 'pull-a' }),
      pullSecretYaml('ns-a', 'pull-a', 'first-password'),
      pullSecretYaml('ns-b', 'pull-a', 'ns-b-password'),
      opaqueSecretYaml('ns-a', 'key-a', 'signing-key-material'),
      opaqueSecretYaml('ns-a', 'unreferenced', 'unreferenced-secret-value'),
      opaqueSecretYaml('ns-a', 'late', 'late-secret-value'),
      configMapYaml('ns-a', 'dockerfile-a', 'FROM scratch'),
      configMapYaml('ns-a', 'unreferenced-cm', 'FROM nothing'),
      'apiVersion: kmm.sigs.x-k8s.io/v1beta1\nkind: Module\nmetadata:\n  name: broken\n  namespace: ns-b\nspec:\n  moduleLoader:\n    container: {}\n',
    ].join('---\n'),
  );

  const proxy = await startProxy(kube.url);
  t.teardown(() => proxy.close());
  const kc = new KubeConfig();
  kc.loadFromFile(kube.kubeconfig);
  kc.loadFromOptions({
    clusters: kc.clusters.map((c) => ({ ...c, server: proxy.url })),
    users: kc.users,
    contexts: kc.contexts,
    currentContext: kc.getCurrentContext(),
  });

  const { logger, lines } = logCapture();
  const invalid: { key: string; errors: readonly string[] }[] = [];
  // relistAfterWatchFailures: only a real 410 makes this instance list again (see the forced relist below).
  const inputs = createClusterInputs(kc, logger, {
    retryBaseMs: 100,
    retryMaxMs: 500,
    listPageSize: 2,
    relistAfterWatchFailures: 1000,
    onInvalid: (key, errors) => invalid.push({ key, errors }),
  });
  t.teardown(() => inputs.stop());
  /** What a listener could read when its Module event came. */
  const seenAtEvent = new Map<string, string | undefined>();
  const events = recorder(inputs, (c) => {
    const secret = c.module.spec.imageRepoSecret?.name;
    if (secret) seenAtEvent.set(`${c.type} ${moduleKey(c.module)}`, inputs.pullSecret(c.module.metadata.namespace ?? '', secret));
  });

  t.test('first sync: an added event per valid Module, referenced data only', async (t) => {
    await bounded(inputs.synced, 'synced');
    t.same(events.drain(), ['module added ns-a/m1', 'module added ns-a/m2', 'module added ns-b/m3'], 'added events before synced resolved, sorted');
    t.same(inputs.modules().map(moduleKey), ['ns-a/m1', 'ns-a/m2', 'ns-b/m3']);
    t.equal(invalid.length, 1, 'the invalid Module reported');
    t.equal(invalid[0]?.key, 'ns-b/broken');
    t.match(invalid[0]?.errors.join('\n'), /spec\.selector: required/);
    t.match(JSON.parse(inputs.pullSecret('ns-a', 'pull-a') ?? '{}'), { auths: { 'registry.example': {} } });
    t.match(inputs.pullSecret('ns-b', 'pull-a'), /auths/, 'the pull secret of the same name in the other namespace');
    t.equal(inputs.secretData('ns-a', 'key-a')?.['value']?.toString(), 'signing-key-material', 'a signing key (sign.keySecret in a kernel mapping)');
    t.same(inputs.configMapData('ns-a', 'dockerfile-a'), { dockerfile: 'FROM scratch' });
    t.equal(inputs.secretData('ns-a', 'unreferenced'), undefined, 'an unreferenced Secret is not kept');
    t.equal(inputs.configMapData('ns-a', 'unreferenced-cm'), undefined, 'nor an unreferenced ConfigMap');
    t.equal(seenAtEvent.get('added ns-a/m1') !== undefined, true, 'the pull secret was readable in the added event');
  });

  t.test('Module added, modified, deleted', async (t) => {
    await apply(moduleYaml('ns-b', 'm4'));
    t.equal(describeEvent(await events.next()), 'module added ns-b/m4');
    await apply(moduleYaml('ns-a', 'm1', { pullSecret: 'pull-a', dockerfile: 'dockerfile-a', keySecret: 'key-a', image: 'registry.example/m1:v2' }));
    const modified = await events.next();
    t.equal(describeEvent(modified), 'module modified ns-a/m1');
    t.equal(modified.event === 'module' && modified.module.spec.moduleLoader?.container.kernelMappings[0]?.containerImage, 'registry.example/m1:v2');
    t.equal(modified.event === 'module' && modified.module.metadata.generation, 2, 'the new generation');
    t.equal(inputs.modules().find((m) => moduleKey(m) === 'ns-a/m1')?.metadata.generation, 2, 'state updated before the event');
    // A metadata-only change (same generation, new resourceVersion): still `modified`.
    await kubectl(['annotate', 'modules.kmm.sigs.x-k8s.io', '-n', 'ns-b', 'm4', 'touched=yes']);
    t.equal(describeEvent(await events.next()), 'module modified ns-b/m4');
    await kubectl(['delete', 'modules.kmm.sigs.x-k8s.io', '-n', 'ns-b', 'm4', '--wait=false']);
    t.equal(describeEvent(await events.next()), 'module deleted ns-b/m4');
    t.same(inputs.modules().map(moduleKey), ['ns-a/m1', 'ns-a/m2', 'ns-b/m3']);
  });

  t.test('dependency events for referenced Secrets and ConfigMaps only, naming the Modules using them', async (t) => {
    // An unreferenced Secret and ConfigMap change first: the next dependency event must be the pull secret's.
    await apply(opaqueSecretYaml('ns-a', 'unreferenced', 'changed-unreferenced-value'));
    await apply(configMapYaml('ns-a', 'unreferenced-cm', 'FROM changed'));
    await apply(pullSecretYaml('ns-a', 'pull-a', 'second-password'));
    t.same(await events.next(), { event: 'dependency', kind: 'Secret', namespace: 'ns-a', name: 'pull-a', modules: ['ns-a/m1', 'ns-a/m2'] }, 'not ns-b/m3: another namespace');
    t.match(Buffer.from(JSON.parse(inputs.pullSecret('ns-a', 'pull-a')!).auths['registry.example'].auth, 'base64').toString(), 'second-password', 'the new content');
    // Metadata only (a label): the content is the same, no event.
    await kubectl(['label', 'secret', '-n', 'ns-a', 'pull-a', 'touched=yes']);
    await apply(configMapYaml('ns-a', 'dockerfile-a', 'FROM debian'));
    t.same(await events.next(), { event: 'dependency', kind: 'ConfigMap', namespace: 'ns-a', name: 'dockerfile-a', modules: ['ns-a/m1'] }, 'a label is no content change');
    t.same(inputs.configMapData('ns-a', 'dockerfile-a'), { dockerfile: 'FROM debian' });

    // A Secret a Module waits for, created later; then deleted.
    await apply(moduleYaml('ns-b', 'm5', { buildSecret: 'build-b' }));
    t.equal(describeEvent(await events.next()), 'module added ns-b/m5');
    t.equal(inputs.secretData('ns-b', 'build-b'), undefined);
    await apply(opaqueSecretYaml('ns-b', 'build-b', 'build-secret-value'));
    t.same(await events.next(), { event: 'dependency', kind: 'Secret', namespace: 'ns-b', name: 'build-b', modules: ['ns-b/m5'] });
    t.equal(inputs.secretData('ns-b', 'build-b')?.['value']?.toString(), 'build-secret-value');
    await kubectl(['delete', 'secret', '-n', 'ns-b', 'build-b']);
    t.same(await events.next(), { event: 'dependency', kind: 'Secret', namespace: 'ns-b', name: 'build-b', modules: ['ns-b/m5'] });
    t.equal(inputs.secretData('ns-b', 'build-b'), undefined);
  });

  t.test('a Module that starts to reference an existing Secret: its data is read before the event', async (t) => {
    t.equal(inputs.secretData('ns-a', 'late'), undefined, 'not kept while unreferenced');
    await apply(moduleYaml('ns-a', 'm6', { pullSecret: 'late' }));
    t.equal(describeEvent(await events.next()), 'module added ns-a/m6');
    t.equal(inputs.secretData('ns-a', 'late')?.['value']?.toString(), 'late-secret-value');
    t.ok(seenAtEvent.has('added ns-a/m6'), 'the listener ran');
    t.equal(inputs.pullSecret('ns-a', 'late'), undefined, 'no .dockerconfigjson key in it');
    // No longer referenced: dropped.
    await apply(moduleYaml('ns-a', 'm6'));
    t.equal(describeEvent(await events.next()), 'module modified ns-a/m6');
    t.equal(inputs.secretData('ns-a', 'late'), undefined, 'dropped once unreferenced');
    // A Module that becomes invalid is deleted from the inputs.
    await apply('apiVersion: kmm.sigs.x-k8s.io/v1beta1\nkind: Module\nmetadata:\n  name: m6\n  namespace: ns-a\nspec:\n  moduleLoader:\n    container: {}\n');
    t.equal(describeEvent(await events.next()), 'module deleted ns-a/m6');
    t.equal(invalid.at(-1)?.key, 'ns-a/m6');
  });

  const restarts = (resource: string) => lines.filter((l) => l.includes('restarting the informer') && l.includes(`"resource":"${resource}"`)).length;
  const lists = (resource: string) => lines.filter((l) => l.includes('"msg":"listed"') && l.includes(`"resource":"${resource}"`)).length;

  /** Cuts every connection until each informer has failed at least once more. */
  const outage = async () => {
    const before = ['modules', 'secrets', 'configmaps'].map(restarts);
    proxy.block();
    await eventually('every informer failing', () => ['modules', 'secrets', 'configmaps'].every((r, i) => restarts(r) > before[i]!));
  };

  t.test('an informer error and restart loses no change', async (t) => {
    await outage();
    await apply(moduleYaml('ns-a', 'm2', { pullSecret: 'pull-a', image: 'registry.example/m2:v2' }));
    await kubectl(['delete', 'modules.kmm.sigs.x-k8s.io', '-n', 'ns-b', 'm5', '--wait=false']);
    await apply(pullSecretYaml('ns-a', 'pull-a', 'third-password'));
    await apply(moduleYaml('ns-b', 'm7'));
    t.same(events.drain(), [], 'nothing while cut off');
    proxy.unblock();
    const seen = await events.until([
      'module modified ns-a/m2',
      'module deleted ns-b/m5',
      'dependency Secret ns-a/pull-a [ns-a/m1,ns-a/m2]',
      'module added ns-b/m7',
    ]);
    t.equal(seen.length, 4, `exactly the changes: ${JSON.stringify(seen)}`);
    t.match(Buffer.from(JSON.parse(inputs.pullSecret('ns-a', 'pull-a')!).auths['registry.example'].auth, 'base64').toString(), 'third-password');
  });

  t.test('an outage longer than etcd keeps history: a relist (410) loses no change, deletions included', async (t) => {
    const listsBefore = lists('secrets');
    const current = JSON.parse((await kube.request('GET', '/api/v1/namespaces/ns-a/configmaps?limit=1')).body) as { metadata: { resourceVersion: string } };
    await outage();
    await apply(moduleYaml('ns-b', 'm7', { image: 'registry.example/m7:v2' }));
    await kubectl(['delete', 'modules.kmm.sigs.x-k8s.io', '-n', 'ns-a', 'm1', '--wait=false']);
    await apply(pullSecretYaml('ns-a', 'pull-a', 'fourth-password'));
    await kubectl(['delete', 'configmap', '-n', 'ns-a', 'dockerfile-a']);
    // Wait until etcd has compacted past what the informers last saw.
    await eventually(
      'etcd compacted past the outage',
      async () => (await kube.request('GET', `/api/v1/namespaces/ns-a/configmaps?limit=1&resourceVersion=${current.metadata.resourceVersion}&resourceVersionMatch=Exact`)).status === 410,
      30_000,
    );
    proxy.unblock();
    const seen = await events.until(['module modified ns-b/m7', 'module deleted ns-a/m1', /^dependency Secret ns-a\/pull-a /], 30_000);
    await new Promise((r) => setTimeout(r, 500));
    seen.push(...events.drain());
    // The three informers resume independently: a change of the pull secret or of m1's
    // ConfigMap seen before m1's deletion still names m1, and not after it.
    const m1Deleted = seen.indexOf('module deleted ns-a/m1');
    const pull = seen.findIndex((e) => e.startsWith('dependency Secret ns-a/pull-a '));
    t.equal(seen[pull], pull < m1Deleted ? 'dependency Secret ns-a/pull-a [ns-a/m1,ns-a/m2]' : 'dependency Secret ns-a/pull-a [ns-a/m2]', `the pull secret's users as of its event: ${JSON.stringify(seen)}`);
    const cm = seen.indexOf('dependency ConfigMap ns-a/dockerfile-a [ns-a/m1]');
    t.ok(cm === -1 || cm < m1Deleted, 'the deleted ConfigMap names m1 only before m1 is gone');
    t.equal(seen.length, cm === -1 ? 3 : 4, 'nothing else');
    t.ok(lists('secrets') > listsBefore, 'the Secrets were listed again');
    t.same(inputs.modules().map(moduleKey), ['ns-a/m2', 'ns-b/m3', 'ns-b/m7']);
    t.equal(inputs.configMapData('ns-a', 'dockerfile-a'), undefined);
    t.match(Buffer.from(JSON.parse(inputs.pullSecret('ns-a', 'pull-a')!).auths['registry.example'].auth, 'base64').toString(), 'fourth-password');
    // Still watching after the relist.
    await apply(moduleYaml('ns-a', 'm8'));
    t.same(await events.until(['module added ns-a/m8']), ['module added ns-a/m8']);
  });

  t.test('watches failing again and again: the informers list again by themselves', async (t) => {
    const second = logCapture();
    const other = createClusterInputs(kc, second.logger, { retryBaseMs: 50, retryMaxMs: 200, relistAfterWatchFailures: 2 });
    t.teardown(() => other.stop());
    const otherEvents = recorder(other);
    await bounded(other.synced, 'synced');
    t.same(otherEvents.drain(), ['module added ns-a/m2', 'module added ns-a/m8', 'module added ns-b/m3', 'module added ns-b/m7']);
    const forced = (resource: string) => second.lines.filter((l) => l.includes('forcing a relist') && l.includes(`"resource":"${resource}"`)).length;
    const listed = (resource: string) => second.lines.filter((l) => l.includes('"msg":"listed"') && l.includes(`"resource":"${resource}"`)).length;
    const listedBefore = listed('modules');
    proxy.block();
    await eventually('a forced relist of every informer', () => ['modules', 'secrets', 'configmaps'].every((r) => forced(r) > 0));
    await kubectl(['delete', 'modules.kmm.sigs.x-k8s.io', '-n', 'ns-a', 'm8', '--wait=false']);
    proxy.unblock();
    t.same(await otherEvents.until(['module deleted ns-a/m8']), ['module deleted ns-a/m8'], 'the deletion seen through the relist');
    t.ok(listed('modules') > listedBefore, 'the Modules were listed again');
    t.same(await events.until(['module deleted ns-a/m8']), ['module deleted ns-a/m8'], 'the first instance saw it too');
    await bounded(other.stop(), 'stop');
  });

  t.test('no Secret data in the logs', async (t) => {
    t.ok(lines.length > 0);
    const all = lines.join('\n');
    for (const v of SECRET_VALUES) t.notOk(all.includes(v), `the logs do not hold ${v.slice(0, 12)}…`);
  });

  t.test('stop(): no event after it', async (t) => {
    await bounded(inputs.stop(), 'stop');
    await apply(moduleYaml('ns-a', 'm9'));
    await new Promise((r) => setTimeout(r, 1000));
    t.same(events.drain(), []);
  });
}
