/**
 * The ClusterVersion webhook as served by the real server process: stand-alone with Modules from
 * a directory, a real registry holding a release image (by tag) and its driver-toolkit, and
 * AdmissionReviews POSTed over HTTPS without a client certificate, as kube-apiserver sends them.
 * The decision itself is tested in test/gate/; here: the route, its exemption from
 * authentication, the in-memory mirror of the PreflightValidationOCP objects, the Modules from
 * the controller's inputs, and the background resolution of a release tag to its digest.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { moduleYaml, pushModuleImage, until as untilHelper, pushReleaseImage } from '../helpers/manifests.ts';
import { startRegistry, type TestRegistry } from '../helpers/registry.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

t.setTimeout(300_000);

const K = '5.14.0-284.25.1.el9_2.x86_64';
const PATH = '/admission/clusterversions';

let registry: TestRegistry;
let server: TestServer;
let dir: string;
let releaseTag: string;
let releaseDigest: string;

const clusterVersion = (desiredUpdate?: Record<string, unknown>) => ({
  apiVersion: 'config.openshift.io/v1',
  kind: 'ClusterVersion',
  metadata: { name: 'version', resourceVersion: '1' },
  spec: { clusterID: '4f1e2f7c-0000-4000-8000-000000000001', channel: 'stable-4.16', ...(desiredUpdate ? { desiredUpdate } : {}) },
  status: { desired: { version: '4.15.21', image: 'quay.io/openshift-release-dev/ocp-release@sha256:' + '1'.repeat(64) }, availableUpdates: [] },
});

const review = (uid: string, desiredUpdate: Record<string, unknown>) =>
  JSON.stringify({
    apiVersion: 'admission.k8s.io/v1',
    kind: 'AdmissionReview',
    request: {
      uid,
      kind: { group: 'config.openshift.io', version: 'v1', kind: 'ClusterVersion' },
      resource: { group: 'config.openshift.io', version: 'v1', resource: 'clusterversions' },
      requestKind: { group: 'config.openshift.io', version: 'v1', kind: 'ClusterVersion' },
      requestResource: { group: 'config.openshift.io', version: 'v1', resource: 'clusterversions' },
      name: 'version',
      operation: 'UPDATE',
      userInfo: { username: 'system:admin', groups: ['system:masters', 'system:authenticated'] },
      object: clusterVersion(desiredUpdate),
      oldObject: clusterVersion(),
      dryRun: false,
      options: { apiVersion: 'meta.k8s.io/v1', kind: 'UpdateOptions' },
    },
  });

async function post(body: string) {
  const r = await server.request('POST', PATH, { body, headers: { 'content-type': 'application/json' }, anonymous: true });
  return { status: r.status, body: r.body ? (JSON.parse(r.body) as any) : undefined };
}

const until = <T>(what: string, probe: () => Promise<T | undefined>) => untilHelper(what, probe, 60_000, () => `server output:\n${server.output().slice(-3000)}`);

t.before(async () => {
  registry = await startRegistry();
  dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-gate-'));
  const release = await pushReleaseImage(registry, '4.16.1-x86_64', K, `${K}+rt`);
  releaseTag = release.reference;
  releaseDigest = `${registry.host}/ocp/release@${release.digest}`;
  await pushModuleImage(registry, 'good', K);
  const modules = join(dir, 'modules');
  await import('node:fs/promises').then((fs) => fs.mkdir(modules));
  await writeFile(join(modules, 'good.yaml'), moduleYaml(registry, 'good'));
  await writeFile(join(modules, 'bad.yaml'), moduleYaml(registry, 'bad'));
  server = await startTestServer(['--modules-dir', modules, '--insecure-registries', registry.host, '--builder', 'none']);
});

t.teardown(async () => {
  await server?.stop();
  await registry?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

t.test('the webhook needs no client certificate; the API still does', async (t) => {
  const api = await server.request('GET', '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidationsocp', { anonymous: true });
  t.equal(api.status, 401);
  const r = await post(review('u-0', { image: releaseDigest }));
  t.equal(r.status, 200);
  t.equal(r.body.response.uid, 'u-0');
});

t.test('malformed AdmissionReviews get 400 with a Status', async (t) => {
  const notJson = await post('{"apiVersion":');
  t.equal(notJson.status, 400);
  t.match(notJson.body, { kind: 'Status', reason: 'BadRequest' });
  const noRequest = await post(JSON.stringify({ apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview' }));
  t.equal(noRequest.status, 400);
  t.match(noRequest.body, { kind: 'Status', code: 400 });
});

t.test('without a validation the upgrade is refused; once the release (created by tag) is verified, it is allowed by digest', async (t) => {
  const none = await post(review('u-1', { image: releaseDigest, version: '4.16.1' }));
  t.equal(none.body.response.allowed, false);
  t.match(none.body.response.status.message, /PreflightValidationOCP/);
  t.match(none.body.response.status.message, new RegExp(`"releaseImage":"${releaseDigest.replace(/[.]/g, '\\.')}"`), 'says which object to create');

  const created = await server.request('POST', '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidationsocp', {
    body: JSON.stringify({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidationOCP', metadata: { name: 'to-4-16-1' }, spec: { releaseImage: releaseTag } }),
    headers: { 'content-type': 'application/json' },
  });
  t.equal(created.status, 201, created.body);
  // One Module has no image: the validation ends with it False, and the refusal names it.
  const denied = await until('a refusal naming the failing Module', async () => {
    const r = await post(review('u-2', { image: releaseDigest }));
    return r.body.response.allowed === false && /drivers\/bad/.test(r.body.response.status?.message ?? '') ? r : undefined;
  });
  t.equal(denied.body.response.uid, 'u-2');
  t.match(denied.body.response.status.message, /to-4-16-1/);
  t.notOk(denied.body.response.patch, 'never a patch');

  // Fix the Module: its image appears; the Module's file changes, so it is validated again.
  await pushModuleImage(registry, 'bad', K);
  await writeFile(join(dir, 'modules', 'bad.yaml'), (await import('node:fs/promises').then((fs) => fs.readFile(join(dir, 'modules', 'bad.yaml'), 'utf8'))).replace('selector: {kubernetes.io/arch: amd64}', 'selector: {kubernetes.io/arch: amd64, fixed: "yes"}'));
  const allowed = await until('the upgrade allowed', async () => {
    const r = await post(review('u-3', { image: releaseDigest }));
    return r.body.response.allowed === true ? r : undefined;
  });
  t.equal(allowed.body.response.uid, 'u-3');
  t.notOk(allowed.body.response.warnings, 'no warnings for a verified release');
});
