/**
 * Acceptance of the controller, end to end: a real kube-apiserver with a Module CRD, Modules in
 * five namespaces, a real registry with images built by the test, and the server registered as
 * the aggregated API, validating for PreflightValidations created with kubectl.
 */
import { createServer as createTcpServer, connect, type Server } from 'node:net';
import { join } from 'node:path';
import t from 'tap';
import { registerAggregatedServer } from '../helpers/aggregation.ts';
import { startControlPlane, type ControlPlane } from '../helpers/control-plane.ts';
import { pushImage } from '../helpers/images.ts';
import { buildModuleObject } from '../helpers/kmod-fixtures.ts';
import { startRegistry, type TestRegistry } from '../helpers/registry.ts';
import { freePort, ROOT, startTestServer, type TestServer } from '../helpers/server.ts';
import { pushReleaseImage } from '../helpers/manifests.ts';

t.setTimeout(900_000);

const K = '6.1.0-18-amd64';
const K2 = '6.2.0-1-amd64';
const NAMESPACES = ['ns-0', 'ns-1', 'ns-2', 'ns-3', 'ns-4'];

let cp: ControlPlane;
let registry: TestRegistry;
let server: TestServer;
let outagePort: number;
const relays: Server[] = [];

async function ok(args: readonly string[], input?: string) {
  const r = await cp.kubectl(args, input !== undefined ? { input } : {});
  if (r.code !== 0) throw new Error(`kubectl ${args.join(' ')} failed (${r.code}):\n${r.stderr}\n${r.stdout}`);
  return r.stdout;
}

async function moduleImage(repoTag: string, name: string, kernels: readonly string[], vermagicKernel?: string) {
  const entries = [];
  for (const k of kernels) {
    const ko = await buildModuleObject({ name, vermagic: `${vermagicKernel ?? k} SMP preempt mod_unload modversions` });
    entries.push({ path: `opt/lib/modules/${k}/extra/${name}.ko`, content: ko }, { path: `opt/lib/modules/${k}/modules.dep`, content: `extra/${name}.ko:\n` });
  }
  return pushImage(registry, repoTag, { layers: [{ entries }] });
}

const moduleYaml = (ns: string, name: string, image: string, mapping = `regexp: '^6\\..*'`) => `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata:
  name: ${name}
  namespace: ${ns}
spec:
  selector:
    kubernetes.io/arch: amd64
  moduleLoader:
    container:
      modprobe:
        moduleName: ${name}
      kernelMappings:
        - ${mapping}
          containerImage: ${image}
          registryTLS:
            insecure: true
`;

async function pfv(name: string) {
  const r = await cp.kubectl(['get', 'pfv', name, '-o', 'json']);
  return r.code === 0 ? (JSON.parse(r.stdout) as { metadata: { generation: number }; status?: any }) : undefined;
}

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 120_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\nserver output:\n${server?.output().slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

const entry = (o: { status?: any } | undefined, key: string) => o?.status?.modules?.find((m: any) => `${m.namespace}/${m.name}` === key);

t.before(async () => {
  [cp, registry] = await Promise.all([startControlPlane(), startRegistry()]);
  await ok(['apply', '-f', join(ROOT, 'test', 'fixtures', 'module-crd.yaml')]);
  await ok(['wait', '--for=condition=Established', 'crd/modules.kmm.sigs.x-k8s.io', '--timeout=60s']);
  await ok(['create', 'namespace', 'kmm-preflight']);
  for (const ns of NAMESPACES) await ok(['create', 'namespace', ns]);
  // 50 Modules, 10 per namespace, each with an image holding its module for both kernels.
  const docs: string[] = [];
  for (let i = 0; i < 50; i++) {
    const ns = NAMESPACES[i % 5]!;
    await moduleImage(`drivers/m${i}:v1`, `m${i}`, [K, K2]);
    docs.push(moduleYaml(ns, `m${i}`, `${registry.host}/drivers/m${i}:v1`));
  }
  await ok(['apply', '-f', '-'], docs.join('---\n'));
  outagePort = await freePort();
  server = await startTestServer([
    '--authentication-mode', 'delegated',
    '--kubeconfig', cp.kubeconfig,
    '--leader-elect=false',
    '--insecure-registries', registry.host,
    '--log-level', 'info',
  ]);
  await registerAggregatedServer(cp, server);
});

t.teardown(async () => {
  for (const r of relays) r.close();
  await server?.stop();
  await Promise.all([registry?.stop(), cp?.stop()]);
});

t.test('50 Modules in 5 namespaces all verify, Verified turns True, and kubectl wait returns', async (t) => {
  await ok(['apply', '-f', '-'], `apiVersion: kmm.sigs.x-k8s.io/v1beta2\nkind: PreflightValidation\nmetadata: {name: upgrade}\nspec: {kernelVersion: ${K}}\n`);
  const r = await cp.kubectl(['wait', '--for=condition=Verified', 'pfv/upgrade', '--timeout=120s'], { timeoutMs: 150_000 });
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /condition met/);
  const o = (await pfv('upgrade'))!;
  t.match(o.status.counts, { total: 50, verified: 50, failed: 0, error: 0, pending: 0 });
  t.ok(o.status.modules.every((m: any) => m.verificationStatus === 'True' && m.verificationStage === 'Done'));
  t.equal(new Set(o.status.modules.map((m: any) => m.namespace)).size, 5);
  const table = await ok(['get', 'pfv', 'upgrade']);
  t.match(table, /upgrade\s+6\.1\.0-18-amd64\s+50\s+0\s+0/);
});

t.test('failures in different ways keep distinct reasons; a fixed Module re-validates alone; adds and deletes follow', async (t) => {
  await moduleImage('drivers/wrong:v1', 'wrong', [K], '6.1.0-17-amd64');
  await ok(['apply', '-f', '-'], [
    moduleYaml('ns-0', 'nomap', `${registry.host}/drivers/nomap:v1`, 'literal: 5.14.0-1.el9.x86_64'),
    moduleYaml('ns-1', 'missing', `${registry.host}/drivers/missing:v1`),
    moduleYaml('ns-2', 'wrong', `${registry.host}/drivers/wrong:v1`),
  ].join('---\n'));
  const failed = await until('the failures', async () => {
    const o = await pfv('upgrade');
    return o?.status?.counts?.total === 53 && o.status.counts.pending === 0 ? o : undefined;
  });
  t.match(entry(failed, 'ns-0/nomap'), { verificationStatus: 'False', verificationStage: 'Requeued', statusReason: /6\.1\.0-18-amd64/ });
  t.match(entry(failed, 'ns-1/missing'), { verificationStatus: 'False', statusReason: /not found/ });
  t.match(entry(failed, 'ns-2/wrong'), { verificationStatus: 'False', statusReason: /6\.1\.0-17-amd64/ });
  t.equal(failed.status.counts.verified, 50, 'the others still verify');
  t.match(failed.status.conditions, [{ type: 'Verified', status: 'False', reason: 'ModulesFailed' }]);

  const times = new Map(failed.status.modules.map((m: any) => [`${m.namespace}/${m.name}`, m.lastTransitionTime]));
  await moduleImage('drivers/missing:v2', 'missing', [K]);
  await ok(['patch', 'module', 'missing', '-n', 'ns-1', '--type=json', '-p', `[{"op":"replace","path":"/spec/moduleLoader/container/kernelMappings/0/containerImage","value":"${registry.host}/drivers/missing:v2"}]`]);
  const fixed = await until('the fix', async () => {
    const o = await pfv('upgrade');
    return entry(o, 'ns-1/missing')?.verificationStatus === 'True' ? o : undefined;
  });
  for (const m of fixed!.status.modules) {
    const k = `${m.namespace}/${m.name}`;
    if (k !== 'ns-1/missing') t.equal(m.lastTransitionTime, times.get(k), `${k} untouched`);
  }

  await ok(['delete', 'module', 'nomap', '-n', 'ns-0']);
  await ok(['delete', 'module', 'wrong', '-n', 'ns-2']);
  await moduleImage('drivers/late:v1', 'late', [K, K2]);
  await ok(['apply', '-f', '-'], moduleYaml('ns-3', 'late', `${registry.host}/drivers/late:v1`));
  const after = await until('the add and the deletes', async () => {
    const o = await pfv('upgrade');
    const c = o?.status?.counts;
    return c && c.total === 52 && c.verified === 52 ? o : undefined;
  });
  t.notOk(entry(after, 'ns-0/nomap'), 'a deleted Module leaves the list');
  t.match(entry(after, 'ns-3/late'), { verificationStatus: 'True' });
  t.match(after!.status.conditions, [{ type: 'Verified', status: 'True' }]);
});

t.test('a registry outage gives Error, then True after recovery without any user action', async (t) => {
  await moduleImage('drivers/flaky:v1', 'flaky', [K]);
  await ok(['apply', '-f', '-'], moduleYaml('ns-4', 'flaky', `127.0.0.1:${outagePort}/drivers/flaky:v1`));
  await until('Error', async () => {
    const o = await pfv('upgrade');
    return entry(o, 'ns-4/flaky')?.verificationStatus === 'Error' ? o : undefined;
  });
  // The registry "comes back": a TCP relay to it on the port the Module names.
  const relay: Server = createTcpServer((c) => {
    const up = connect(Number(registry.host.split(':')[1]), '127.0.0.1');
    c.pipe(up).pipe(c);
    c.on('error', () => up.destroy());
    up.on('error', () => c.destroy());
  });
  await new Promise<void>((r) => relay.listen(outagePort, '127.0.0.1', () => r()));
  // The relay stays up for the later tests, which also validate this Module.
  relays.push(relay);
  const back = await until('True after recovery', async () => {
    const o = await pfv('upgrade');
    return entry(o, 'ns-4/flaky')?.verificationStatus === 'True' ? o : undefined;
  });
  t.match(entry(back, 'ns-4/flaky'), { verificationStage: 'Done' });
});

t.test('two kernels and an OpenShift release validate side by side with separate results', async (t) => {
  const release = await pushReleaseImage(registry, '4.16', K2, `${K2}-rt`);
  await ok(['apply', '-f', '-'], `apiVersion: kmm.sigs.x-k8s.io/v1beta2
kind: PreflightValidation
metadata: {name: next}
spec: {kernelVersion: ${K2}}
---
apiVersion: kmm.sigs.x-k8s.io/v1beta2
kind: PreflightValidationOCP
metadata: {name: ocp}
spec: {releaseImage: ${release.reference}}
`);
  const next = await until('the second kernel', async () => {
    const o = await pfv('next');
    return o?.status?.counts?.pending === 0 && o.status.counts.error === 0 && o.status.counts.total > 0 ? o : undefined;
  });
  t.equal(next.status.kernelVersion, K2);
  t.match(entry(next, 'ns-1/missing'), { verificationStatus: 'False' }, 'missing:v2 holds only the first kernel');
  t.match(entry(next, 'ns-0/m0'), { verificationStatus: 'True' });
  const ocp = await until('the OCP release', async () => {
    const r = await cp.kubectl(['get', 'pfvo', 'ocp', '-o', 'json']);
    const o = r.code === 0 ? JSON.parse(r.stdout) : undefined;
    return o?.status?.kernelVersion && o.status.counts?.pending === 0 && o.status.counts.error === 0 ? o : undefined;
  });
  t.equal(ocp.status.kernelVersion, K2, 'the kernel came from the release');
  t.equal(ocp.status.counts.verified, next.status.counts.verified, 'the same verdicts as for that kernel');
  const first = await pfv('upgrade');
  t.equal(first!.status.kernelVersion, K, 'and the first object is untouched');
});

t.test("rotating a Module's pull secret validates it again", async (t) => {
  const locked = await startRegistry({ auth: 'token' });
  t.teardown(() => locked.stop());
  const ko = await buildModuleObject({ name: 'private', vermagic: `${K} SMP preempt mod_unload modversions` });
  await pushImage(locked, 'drivers/private:v1', {
    layers: [{ entries: [{ path: `opt/lib/modules/${K}/extra/private.ko`, content: ko }, { path: `opt/lib/modules/${K}/modules.dep`, content: 'extra/private.ko:\n' }] }],
  });
  const secret = (config: string) => `apiVersion: v1
kind: Secret
metadata: {name: pull, namespace: ns-2}
type: kubernetes.io/dockerconfigjson
data:
  .dockerconfigjson: ${Buffer.from(config).toString('base64')}
`;
  const wrong = JSON.stringify({ auths: { [locked.host]: { auth: Buffer.from('kmm:wrong-password').toString('base64') } } });
  await ok(['apply', '-f', '-'], secret(wrong));
  await ok(['apply', '-f', '-'], moduleYaml('ns-2', 'private', `${locked.host}/drivers/private:v1`).replace('spec:\n', 'spec:\n  imageRepoSecret:\n    name: pull\n'));
  const refused = await until('the refusal', async () => {
    const o = await pfv('upgrade');
    return entry(o, 'ns-2/private')?.verificationStatus === 'False' ? o : undefined;
  });
  t.match(entry(refused, 'ns-2/private'), { statusReason: /unauthori[sz]ed|credentials|denied|refused/i });
  await ok(['apply', '-f', '-'], secret(locked.dockerConfigJson()));
  const accepted = await until('the rotated secret to be used', async () => {
    const o = await pfv('upgrade');
    return entry(o, 'ns-2/private')?.verificationStatus === 'True' ? o : undefined;
  });
  t.match(entry(accepted, 'ns-2/private'), { verificationStage: 'Done' });
});

t.test('kubectl describe shows the transition events', async (t) => {
  const out = await ok(['describe', 'pfv', 'upgrade']);
  t.match(out, /Events:/);
  t.match(out, /ModuleFailed/);
  t.match(out, /ModuleVerified/);
});
