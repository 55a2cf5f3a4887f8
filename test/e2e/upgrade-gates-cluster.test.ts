/**
 * The upgrade gates through a real kube-apiserver: OpenShift's ClusterVersion and ClusterOperator
 * as CRDs written for the tests (test/fixtures/openshift-config-crds.yaml), the project's own
 * ValidatingWebhookConfiguration (rendered from deploy/overlays/openshift, pointed at the test
 * server: its CA instead of service-ca's, the server's port behind the ExternalName Service), the
 * server registered as the aggregated API and validating a real release image from a real
 * registry. `kubectl patch clusterversion version` is refused while the release is not verified
 * and goes through once it is; the ClusterOperator's Upgradeable follows.
 */
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import t from 'tap';
import { parseAllDocuments, stringify } from 'yaml';
import { registerAggregatedServer } from '../helpers/aggregation.ts';
import { startControlPlane, type ControlPlane } from '../helpers/control-plane.ts';
import { moduleYaml, pushModuleImage, until as untilHelper, pushReleaseImage } from '../helpers/manifests.ts';
import { startRegistry, type TestRegistry } from '../helpers/registry.ts';
import { ROOT, startTestServer, type TestServer } from '../helpers/server.ts';

t.setTimeout(900_000);

const run = promisify(execFile);
const K = '5.14.0-427.22.1.el9_4.x86_64';

let cp: ControlPlane;
let registry: TestRegistry;
let server: TestServer;
let releaseTag: string;
let releaseDigest: string;

async function ok(args: readonly string[], input?: string) {
  const r = await cp.kubectl(args, input !== undefined ? { input } : {});
  if (r.code !== 0) throw new Error(`kubectl ${args.join(' ')} failed (${r.code}):\n${r.stderr}\n${r.stdout}`);
  return r.stdout;
}

const until = <T>(what: string, probe: () => Promise<T | undefined>) => untilHelper(what, probe, 90_000, () => `server output:\n${server?.output().slice(-4000)}`);

async function upgradeable(): Promise<{ status: string; reason: string; message: string } | undefined> {
  const r = await cp.kubectl(['get', 'clusteroperator', 'kmm-preflight', '-o', 'json']);
  if (r.code !== 0) return undefined;
  return JSON.parse(r.stdout).status?.conditions?.find((c: { type: string }) => c.type === 'Upgradeable');
}

t.before(async () => {
  [cp, registry] = await Promise.all([startControlPlane(), startRegistry()]);
  const release = await pushReleaseImage(registry, '4.16.1-x86_64', K, `${K}+rt`);
  releaseTag = release.reference;
  releaseDigest = `${registry.host}/ocp/release@${release.digest}`;

  await ok(['apply', '-f', join(ROOT, 'test', 'fixtures', 'module-crd.yaml')]);
  await ok(['apply', '-f', join(ROOT, 'test', 'fixtures', 'openshift-config-crds.yaml')]);
  await ok(['wait', '--for=condition=Established', 'crd/modules.kmm.sigs.x-k8s.io', 'crd/clusterversions.config.openshift.io', 'crd/clusteroperators.config.openshift.io', '--timeout=60s']);
  await ok(['create', 'namespace', 'kmm-preflight']);
  await ok(['create', 'namespace', 'drivers']);
  // The cluster runs 4.15.21; 4.16.1 is offered.
  await ok(['apply', '-f', '-'], `apiVersion: config.openshift.io/v1
kind: ClusterVersion
metadata: {name: version}
spec: {clusterID: 5d5f5a8e-7c6b-4a43-9a4c-1d2e3f405162, channel: stable-4.16}
`);
  await ok(['patch', 'clusterversion', 'version', '--subresource=status', '--type=merge', '-p', JSON.stringify({
    status: {
      desired: { version: '4.15.21', image: `quay.io/openshift-release-dev/ocp-release@sha256:${'2'.repeat(64)}` },
      availableUpdates: [{ version: '4.16.1', image: releaseDigest }],
      observedGeneration: 1,
      versionHash: 'x',
      history: [],
    },
  })]);
  // A Module whose image for the new kernel does not exist yet.
  await ok(['apply', '-f', '-'], moduleYaml(registry, 'nic'));

  server = await startTestServer([
    '--authentication-mode', 'delegated',
    '--kubeconfig', cp.kubeconfig,
    '--leader-elect=false',
    '--insecure-registries', registry.host,
    '--builder', 'none',
    '--cluster-operator-interval', '0.5',
  ]);
  await registerAggregatedServer(cp, server);

  // The project's webhook configuration, as the openshift overlay renders it, pointed at the test
  // server: the server's CA (no service-ca here) and port (the ExternalName Service leads to
  // localhost). kube-apiserver 1.20 has no matchConditions: dropped, so every ClusterVersion
  // update reaches the webhook, which must then let unrelated ones through.
  const { stdout } = await run('kubectl', ['kustomize', join(ROOT, 'deploy', 'overlays', 'openshift')], { maxBuffer: 64 << 20 });
  const webhook = parseAllDocuments(stdout).map((d) => d.toJS()).find((o) => o?.kind === 'ValidatingWebhookConfiguration');
  if (!webhook) throw new Error('deploy/overlays/openshift renders no ValidatingWebhookConfiguration');
  const caBundle = (await readFile(join(server.certDir, 'ca.crt'))).toString('base64');
  delete webhook.metadata.annotations;
  for (const w of webhook.webhooks) {
    w.clientConfig.caBundle = caBundle;
    w.clientConfig.service.port = server.port;
    delete w.matchConditions;
  }
  await ok(['apply', '-f', '-'], stringify(webhook));
});

t.teardown(async () => {
  await server?.stop();
  await Promise.all([registry?.stop(), cp?.stop()]);
});

const patchDesired = (desiredUpdate: Record<string, unknown> | null) =>
  cp.kubectl(['patch', 'clusterversion', 'version', '--type=merge', '-p', JSON.stringify({ spec: { desiredUpdate } })]);

t.test('the ClusterOperator is created and says no validation exists', async (t) => {
  const c = await until('Upgradeable=False', async () => {
    const u = await upgradeable();
    return u?.status === 'False' ? u : undefined;
  });
  t.equal(c.reason, 'NoPreflightValidation');
  const co = JSON.parse(await ok(['get', 'clusteroperator', 'kmm-preflight', '-o', 'json']));
  t.match(co.status.conditions, [{ type: 'Upgradeable' }, { type: 'Available', status: 'True' }, { type: 'Degraded', status: 'False' }, { type: 'Progressing' }]);
  t.same(co.status.relatedObjects, [{ group: '', resource: 'namespaces', name: 'kmm-preflight' }]);
});

t.test('an unrelated ClusterVersion update goes through even without matchConditions', async (t) => {
  const r = await cp.kubectl(['patch', 'clusterversion', 'version', '--type=merge', '-p', '{"spec":{"channel":"fast-4.16"}}']);
  t.equal(r.code, 0, r.stderr);
});

t.test('an upgrade to an unverified release is refused with the webhook\'s message; verified, the same patch goes through', async (t) => {
  const refused = await patchDesired({ version: '4.16.1', image: releaseDigest });
  t.not(refused.code, 0, 'kubectl patch fails');
  t.match(refused.stderr, /admission webhook "clusterversions\.kmm-preflight\.kmm\.sigs\.x-k8s\.io" denied the request/);
  t.match(refused.stderr, /no PreflightValidationOCP validates release/);
  const cv = JSON.parse(await ok(['get', 'clusterversion', 'version', '-o', 'json']));
  t.notOk(cv.spec.desiredUpdate, 'nothing was stored');

  // Pending desired update or not, the operator judges the newest validation's release next.
  await ok(['apply', '-f', '-'], `apiVersion: kmm.sigs.x-k8s.io/v1beta2\nkind: PreflightValidationOCP\nmetadata: {name: to-4-16-1}\nspec: {releaseImage: ${releaseTag}}\n`);
  const notYet = await until('Upgradeable=False for the Module', async () => {
    const u = await upgradeable();
    return u?.status === 'False' && u.reason === 'ModulesNotVerified' ? u : undefined;
  });
  t.match(notYet.message, /drivers\/nic/);
  const stillRefused = await until('a refusal naming the Module', async () => {
    const r = await patchDesired({ version: '4.16.1', image: releaseDigest });
    return r.code !== 0 && /drivers\/nic/.test(r.stderr) ? r : undefined;
  });
  t.match(stillRefused.stderr, /to-4-16-1/);

  // The driver's image for the new kernel is published and the Module updated: it verifies.
  await pushModuleImage(registry, 'nic', K);
  await ok(['patch', 'module', 'nic', '-n', 'drivers', '--type=merge', '-p', '{"spec":{"selector":{"kubernetes.io/arch":"amd64","node-role.kubernetes.io/worker":""}}}']);
  await ok(['wait', '--for=condition=Verified', 'pfvo/to-4-16-1', '--timeout=90s']);
  const yes = await until('Upgradeable=True', async () => {
    const u = await upgradeable();
    return u?.status === 'True' ? u : undefined;
  });
  t.equal(yes.reason, 'AllModulesVerified');
  const co = JSON.parse(await ok(['get', 'clusteroperator', 'kmm-preflight', '-o', 'json']));
  t.same(co.status.relatedObjects[1], { group: 'kmm.sigs.x-k8s.io', resource: 'preflightvalidationsocp', name: 'to-4-16-1' });

  const allowed = await until('the patch allowed', async () => {
    const r = await patchDesired({ version: '4.16.1', image: releaseDigest });
    return r.code === 0 ? r : undefined;
  });
  t.equal(allowed.code, 0);
  const after = JSON.parse(await ok(['get', 'clusterversion', 'version', '-o', 'json']));
  t.match(after.spec.desiredUpdate, { version: '4.16.1', image: releaseDigest });
  // Clearing the update is always allowed.
  t.equal((await patchDesired(null)).code, 0);
});
