/**
 * Acceptance of the controller's leadership and durability: two replicas on one etcd, only the
 * Lease holder validates; kill -9 of the leader mid-validation, the standby finishes from the
 * stored statuses; kill -9 and restart of a lone server, the unfinished Modules resume.
 */
import { join } from 'node:path';
import t from 'tap';
import { startControlPlane, type ControlPlane } from '../helpers/control-plane.ts';
import { startEtcd, type TestEtcd } from '../helpers/etcd.ts';
import { pushImage } from '../helpers/images.ts';
import { buildModuleObject } from '../helpers/kmod-fixtures.ts';
import { issueClientCertificate } from '../../src/certs/dev-pki.ts';
import { startFaultProxy, startRegistry, type FaultProxy, type TestRegistry } from '../helpers/registry.ts';
import { ROOT, startTestServer, type TestServer } from '../helpers/server.ts';

t.setTimeout(900_000);

const K = '6.1.0-18-amd64';
const MODULES = 40;

let cp: ControlPlane;
let etcd: TestEtcd;
let registry: TestRegistry;
let slow: FaultProxy;
const servers: TestServer[] = [];
let survivor: TestServer | undefined;

async function ok(args: readonly string[], input?: string) {
  const r = await cp.kubectl(args, input !== undefined ? { input } : {});
  if (r.code !== 0) throw new Error(`kubectl ${args.join(' ')} failed (${r.code}):\n${r.stderr}\n${r.stdout}`);
  return r.stdout;
}

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 120_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\n${servers.map((s) => s.output().slice(-2000)).join('\n---\n')}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const moduleYaml = (i: number) => `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {name: m${i}, namespace: drivers}
spec:
  selector: {kubernetes.io/arch: amd64}
  moduleLoader:
    container:
      modprobe: {moduleName: m${i}}
      kernelMappings:
        - regexp: '^6\\..*'
          containerImage: ${slow.host}/drivers/m${i}:v1
          registryTLS: {insecure: true}
`;

let clusterAdmin: { certPem: string; keyPem: string };

/** Reads a validation object straight from a server (no aggregator needed), as a cluster admin. */
async function status(server: TestServer, name: string) {
  const r = await server.request('GET', `/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations/${name}`, { clientCert: clusterAdmin });
  return r.status === 200 ? r.json<{ status?: { counts?: { verified: number; total: number }; modules?: { namespace: string; name: string; verificationStatus: string; lastTransitionTime: string }[] } }>() : undefined;
}

const leading = (s: TestServer) => /preflight controller started/.test(s.output());

t.before(async () => {
  [cp, etcd, registry] = await Promise.all([startControlPlane(), startEtcd(), startRegistry()]);
  clusterAdmin = issueClientCertificate({ caCertPem: cp.caCertPem, caKeyPem: cp.caKeyPem, commonName: 'tester', organizations: ['system:masters'] });
  // Every blob comes slowly, so that a validation of all Modules takes seconds and can be cut.
  slow = await startFaultProxy(registry, [{ path: /\/blobs\//, times: Infinity, fault: { kind: 'slow', chunkBytes: 512, delayMs: 60 } }]);
  await ok(['apply', '-f', join(ROOT, 'test', 'fixtures', 'module-crd.yaml')]);
  await ok(['wait', '--for=condition=Established', 'crd/modules.kmm.sigs.x-k8s.io', '--timeout=60s']);
  await ok(['create', 'namespace', 'kmm-preflight']);
  await ok(['create', 'namespace', 'drivers']);
  const docs: string[] = [];
  for (let i = 0; i < MODULES; i++) {
    const ko = await buildModuleObject({ name: `m${i}`, vermagic: `${K} SMP preempt mod_unload modversions` });
    await pushImage(registry, `drivers/m${i}:v1`, {
      layers: [{ entries: [{ path: `opt/lib/modules/${K}/extra/m${i}.ko`, content: ko }, { path: `opt/lib/modules/${K}/modules.dep`, content: `extra/m${i}.ko:\n` }] }],
    });
    docs.push(moduleYaml(i));
  }
  await ok(['apply', '-f', '-'], docs.join('---\n'));
});

t.teardown(async () => {
  await Promise.all(servers.map((s) => s.stop()));
  await Promise.all([slow?.stop(), registry?.stop(), etcd?.stop(), cp?.stop()]);
});

const serverArgs = () => [
  '--authentication-mode', 'delegated',
  '--kubeconfig', cp.kubeconfig,
  '--storage', 'etcd',
  '--etcd-servers', etcd.url,
  '--validation-concurrency', '2',
  '--log-level', 'info',
];

const pfvBody = (name: string) =>
  JSON.stringify({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name }, spec: { kernelVersion: K } });

t.test('two replicas: only the leader validates; killing it, the other finishes from the stored statuses', async (t) => {
  const [a, b] = await Promise.all([startTestServer(serverArgs()), startTestServer(serverArgs())]);
  servers.push(a, b);
  const leader = await until('a leader', async () => (leading(a) ? a : leading(b) ? b : undefined), 60_000);
  const standby = leader === a ? b : a;
  t.notOk(leading(standby), 'the standby does not validate');
  const created = await leader.request('POST', '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations', { body: pfvBody('replicas'), headers: { 'content-type': 'application/json' }, clientCert: clusterAdmin });
  t.equal(created.status, 201);
  // While the validation runs: one Module deleted, one added.
  await ok(['delete', 'module', `m${MODULES - 1}`, '-n', 'drivers']);
  await ok(['apply', '-f', '-'], moduleYaml(MODULES).replace(`drivers/m${MODULES}:v1`, `drivers/m0:v1`).replace(`moduleName: m${MODULES}`, 'moduleName: m0'));
  const partial = await until('some, not all, Modules verified', async () => {
    const o = await status(standby, 'replicas');
    const v = o?.status?.counts?.verified ?? 0;
    return v >= 4 && v < MODULES ? o : undefined;
  });
  await leader.kill('SIGKILL');
  const verifiedBefore = new Map(
    (partial.status!.modules ?? []).filter((m) => m.verificationStatus === 'True').map((m) => [`${m.namespace}/${m.name}`, m.lastTransitionTime]),
  );
  const done = await until(
    'the standby to finish',
    async () => {
      const o = await status(standby, 'replicas');
      return o?.status?.counts?.verified === MODULES ? o : undefined;
    },
    120_000,
  );
  t.ok(leading(standby), 'the standby took over');
  const names = new Set(done.status!.modules!.map((m) => m.name));
  t.notOk(names.has(`m${MODULES - 1}`), 'the Module deleted during the validation left the list');
  t.ok(names.has(`m${MODULES}`), 'the Module added during the validation was validated');
  survivor = standby;
  for (const m of done.status!.modules!) {
    const before = verifiedBefore.get(`${m.namespace}/${m.name}`);
    if (before) t.equal(m.lastTransitionTime, before, `${m.name}: verified before the kill, kept`);
  }
  t.ok(verifiedBefore.size >= 4, `${verifiedBefore.size} verdicts of the killed leader were kept`);
});

t.test('kill -9 of a lone server mid-validation, restart: no status lost, the unfinished Modules resume', async (t) => {
  const server = survivor;
  if (!server) throw new Error('the previous test left no running server');
  const created = await server.request('POST', '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations', { body: pfvBody('restart'), headers: { 'content-type': 'application/json' }, clientCert: clusterAdmin });
  t.equal(created.status, 201);
  const partial = await until('some, not all, Modules verified', async () => {
    const o = await status(server, 'restart');
    const v = o?.status?.counts?.verified ?? 0;
    return v >= 4 && v < MODULES ? o : undefined;
  });
  await server.kill('SIGKILL');
  await server.restart();
  const done = await until(
    'the restarted server to finish',
    async () => {
      const o = await status(server, 'restart');
      return o?.status?.counts?.verified === MODULES ? o : undefined;
    },
    120_000,
  );
  const times = new Map(done.status!.modules!.map((m) => [`${m.namespace}/${m.name}`, m.lastTransitionTime]));
  for (const m of partial.status!.modules!.filter((m) => m.verificationStatus === 'True')) {
    t.equal(times.get(`${m.namespace}/${m.name}`), m.lastTransitionTime, `${m.name}: no status lost`);
  }
});
