/**
 * Acceptance through a real kube-apiserver's aggregator: the server registered as the APIService
 * `v1beta2.kmm.sigs.x-k8s.io` (with a caBundle), reached through the front proxy, authenticating
 * callers from the request headers, tokens through TokenReview and authorizing through
 * SubjectAccessReview against that kube-apiserver.
 */
import { readFile } from 'node:fs/promises';
import { request } from 'node:https';
import { join } from 'node:path';
import t from 'tap';
import { startControlPlane, type ControlPlane } from '../helpers/control-plane.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

t.setTimeout(600_000);

const SERVER_RBAC = `apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kmm-preflight:auth-delegator
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:auth-delegator
subjects:
- kind: User
  name: kmm-preflight-server
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: kmm-preflight:auth-reader
  namespace: kube-system
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: extension-apiserver-authentication-reader
subjects:
- kind: User
  name: kmm-preflight-server
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: preflight-reader
rules:
- apiGroups: [kmm.sigs.x-k8s.io]
  resources: [preflightvalidations]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: jane-reads-preflight
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: preflight-reader
subjects:
- kind: User
  name: jane
`;

const PFV = `apiVersion: kmm.sigs.x-k8s.io/v1beta2
kind: PreflightValidation
metadata:
  name: through-aggregator
spec:
  kernelVersion: 6.1.0-18-amd64
`;

let cp: ControlPlane;
let server: TestServer;

async function ok(args: readonly string[], opts: { input?: string; kubeconfig?: string } = {}) {
  const r = await cp.kubectl(args, opts);
  if (r.code !== 0) throw new Error(`kubectl ${args.join(' ')} failed (${r.code}):\n${r.stderr}\n${r.stdout}`);
  return r.stdout;
}

t.before(async () => {
  cp = await startControlPlane();
  await ok(['create', 'namespace', 'kmm-preflight']);
  await ok(['apply', '-f', '-'], { input: SERVER_RBAC });
  const serverKubeconfig = await cp.userKubeconfig('kmm-preflight-server');
  server = await startTestServer([
    '--authentication-mode', 'delegated',
    '--kubeconfig', serverKubeconfig,
    '--authentication-cache-ttl', '4',
    '--log-level', 'debug',
  ]);
  const caBundle = (await readFile(join(server.certDir, 'ca.crt'))).toString('base64');
  await ok(['apply', '-f', '-'], {
    input: `apiVersion: v1
kind: Service
metadata:
  name: kmm-preflight
  namespace: kmm-preflight
spec:
  type: ExternalName
  externalName: localhost
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: v1beta2.kmm.sigs.x-k8s.io
spec:
  group: kmm.sigs.x-k8s.io
  version: v1beta2
  groupPriorityMinimum: 1000
  versionPriority: 100
  service:
    name: kmm-preflight
    namespace: kmm-preflight
    port: ${server.port}
  caBundle: ${caBundle}
`,
  });
  const deadline = Date.now() + 90_000;
  for (;;) {
    const r = await cp.kubectl(['get', 'apiservice', 'v1beta2.kmm.sigs.x-k8s.io', '-o', 'json']);
    const cond = r.code === 0 ? (JSON.parse(r.stdout).status?.conditions ?? []).find((c: { type: string }) => c.type === 'Available') : undefined;
    if (cond?.status === 'True') {
      // The aggregator may answer 404 for a few seconds after Available (KUBE-TESTBED.md).
      const probe = await cp.kubectl(['get', '--raw', '/apis/kmm.sigs.x-k8s.io/v1beta2']);
      if (probe.code === 0) break;
    }
    if (Date.now() > deadline) {
      throw new Error(`the APIService did not become Available: ${JSON.stringify(cond)}\nserver output:\n${server.output().slice(-4000)}`);
    }
    await new Promise((r) => setTimeout(r, 500));
  }
});

t.teardown(async () => {
  await server?.stop();
  await cp?.stop();
});

t.test('the APIService is Available: the aggregator discovery and OpenAPI fetches succeed', async (t) => {
  const apisvc = JSON.parse(await ok(['get', 'apiservice', 'v1beta2.kmm.sigs.x-k8s.io', '-o', 'json']));
  const available = apisvc.status.conditions.find((c: { type: string }) => c.type === 'Available');
  t.match(available, { status: 'True', reason: 'Passed' });
  t.notMatch(JSON.stringify(apisvc.status), /FailedDiscoveryCheck/);
  const resources = await ok(['api-resources', '--api-group=kmm.sigs.x-k8s.io']);
  t.match(resources, /preflightvalidations\s+pfv\s+kmm\.sigs\.x-k8s\.io\/v1beta2\s+false\s+PreflightValidation/);
  t.match(resources, /preflightvalidationsocp\s+pfvo/);
  // The aggregator downloads and merges OpenAPI in the background: wait for it, bounded.
  const deadline = Date.now() + 60_000;
  let merged = false;
  while (!merged && Date.now() < deadline) {
    merged = (await ok(['get', '--raw', '/openapi/v2'])).includes('io.x-k8s.sigs.kmm.v1beta2.PreflightValidation');
    if (!merged) await new Promise((r) => setTimeout(r, 1000));
  }
  t.ok(merged, "the aggregator merged the server's OpenAPI");
  t.match(await ok(['explain', 'pfv.spec']), /kernelVersion/);
});

t.test('kubectl through kube-apiserver lists, creates, gets a table, watches, patches and deletes', async (t) => {
  t.match(await ok(['apply', '-f', '-'], { input: PFV }), /through-aggregator created/);
  const table = await ok(['get', 'pfv']);
  t.match(table, /^NAME\s+KERNEL\s+VERIFIED\s+FAILED\s+PENDING\s+AGE/);
  t.match(table, /through-aggregator\s+6\.1\.0-18-amd64/);
  const watch = cp.kubectl(['get', 'pfv', 'through-aggregator', '-w', '--request-timeout=8s'], { timeoutMs: 20_000 });
  await new Promise((r) => setTimeout(r, 1500));
  await ok(['patch', 'pfv', 'through-aggregator', '--subresource=status', '--type=merge', '-p', '{"status":{"counts":{"total":2,"verified":2,"failed":0,"error":0,"pending":0}}}']);
  const watched = await watch;
  t.match(watched.stdout, /through-aggregator\s+6\.1\.0-18-amd64\s+2\s+0\s+0/, 'the watch showed the status change');
  t.match(await ok(['patch', 'pfv', 'through-aggregator', '--type=merge', '-p', '{"spec":{"pushBuiltImage":true}}']), /patched/);
  t.equal(JSON.parse(await ok(['get', 'pfv', 'through-aggregator', '-o', 'json'])).spec.pushBuiltImage, true);
  t.match(await ok(['delete', 'pfv', 'through-aggregator']), /deleted/);
});

t.test("requests arrive with the front proxy's certificate and the caller's identity", async (t) => {
  const jane = await cp.userKubeconfig('jane', ['team-a']);
  t.match(await ok(['get', 'pfv', '-o', 'name'], { kubeconfig: jane }), /^$|preflightvalidation/);
  // The server can only know "jane" from X-Remote-User, trusted because of the front-proxy certificate.
  t.match(server.output(), /"user":"jane"/);
  const denied = await cp.kubectl(['delete', 'pfv', 'anything'], { kubeconfig: jane });
  t.not(denied.code, 0);
  t.match(denied.stderr, /forbidden/i);
});

function direct(path: string, o: { headers?: Record<string, string>; cert?: { certPem: string; keyPem: string } }) {
  return readFile(join(server.certDir, 'ca.crt')).then(
    (ca) =>
      new Promise<{ status: number; body: any }>((resolve, reject) => {
        const req = request(
          { host: '127.0.0.1', port: server.port, path, ca, agent: false, headers: o.headers ?? {}, ...(o.cert ? { cert: o.cert.certPem, key: o.cert.keyPem } : {}) },
          (res) => {
            let text = '';
            res.on('data', (d: Buffer) => (text += d.toString()));
            res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text.startsWith('{') ? JSON.parse(text) : text }));
          },
        );
        req.on('error', reject);
        req.end();
      }),
  );
}

t.test('the SubjectAccessReview to kube-apiserver decides: a user without RBAC gets 403 naming verb and resource', async (t) => {
  const proxy = { certPem: cp.frontProxyClientCertPem, keyPem: cp.frontProxyClientKeyPem };
  const nobody = await direct('/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations', { cert: proxy, headers: { 'X-Remote-User': 'nobody', 'X-Remote-Group': 'system:authenticated' } });
  t.equal(nobody.status, 403);
  t.match(nobody.body, { kind: 'Status', reason: 'Forbidden' });
  t.match(nobody.body.message, /User "nobody" cannot list resource "preflightvalidations" in API group "kmm\.sigs\.x-k8s\.io"/);
  const jane = await direct('/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations', { cert: proxy, headers: { 'X-Remote-User': 'jane', 'X-Remote-Group': 'system:authenticated' } });
  t.equal(jane.status, 200, 'RBAC allows jane to list');
  const janeDelete = await direct('/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations/x', { cert: proxy, headers: { 'X-Remote-User': 'jane' } });
  t.equal(janeDelete.status, 404, 'get of a missing object is allowed, then NotFound');
  const noProxy = await direct('/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations', { headers: { 'X-Remote-User': 'jane' } });
  t.equal(noProxy.status, 401, 'headers without the front-proxy certificate are ignored');
  t.equal((await direct('/readyz', {})).status, 200, '/readyz needs no credentials');
});

t.test('a ServiceAccount token is checked through TokenReview, and the answer cached', async (t) => {
  await ok(['create', 'serviceaccount', 'ci', '-n', 'kmm-preflight']);
  const token = await cp.serviceAccountToken('kmm-preflight', 'ci');
  const auth = { authorization: `Bearer ${token}` };
  const path = '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations';
  const first = await direct(path, { headers: auth });
  t.equal(first.status, 403, 'authenticated, not authorized');
  t.match(first.body.message, /User "system:serviceaccount:kmm-preflight:ci" cannot list/);
  // Take away the server's right to make TokenReviews: only its cache can still answer.
  await ok(['delete', 'clusterrolebinding', 'kmm-preflight:auth-delegator']);
  t.teardown(() => ok(['apply', '-f', '-'], { input: SERVER_RBAC }).then(() => undefined));
  const cached = await direct(path, { headers: auth });
  t.equal(cached.status, 403, 'within the cache lifetime the same answer comes from the cache');
  await new Promise((r) => setTimeout(r, 4500));
  const expired = await direct(path, { headers: auth });
  t.equal(expired.status, 401, 'after it, the token is reviewed again, which now fails');
  t.match(expired.body.message, /token could not be checked/);
  const garbage = await direct(path, { headers: { authorization: 'Bearer not-a-token' } });
  t.equal(garbage.status, 401);
});

t.test('a front-proxy CA added to the authentication ConfigMap is trusted without a restart', async (t) => {
  const { generateCa, issueClientCertificate } = await import('../../src/certs/dev-pki.ts');
  const newCa = generateCa('rotated-front-proxy-ca');
  const newProxy = issueClientCertificate({ caCertPem: newCa.certPem, caKeyPem: newCa.keyPem, commonName: 'front-proxy-client' });
  const path = '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations';
  const headers = { 'X-Remote-User': 'jane', 'X-Remote-Group': 'team-a' };
  t.equal((await direct(path, { cert: newProxy, headers })).status, 401, 'not trusted before the rotation');
  const cm = JSON.parse(await ok(['get', 'configmap', 'extension-apiserver-authentication', '-n', 'kube-system', '-o', 'json']));
  const bundle = `${cm.data['requestheader-client-ca-file'].trim()}\n${newCa.certPem.trim()}\n`;
  await ok(['patch', 'configmap', 'extension-apiserver-authentication', '-n', 'kube-system', '--type=merge', '-p', JSON.stringify({ data: { 'requestheader-client-ca-file': bundle } })]);
  const deadline = Date.now() + 20_000;
  let r = await direct(path, { cert: newProxy, headers });
  while (r.status === 401 && Date.now() < deadline) {
    await new Promise((res) => setTimeout(res, 250));
    r = await direct(path, { cert: newProxy, headers });
  }
  t.equal(r.status, 200, 'the new CA is trusted, and jane may list');
});
