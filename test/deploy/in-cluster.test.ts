/**
 * The deploy manifests for real, short of a kubelet: the kubernetes overlay's Namespace,
 * ServiceAccount, RBAC and APIService (with the caBundle of make-serving-cert.sh) applied to a
 * real kube-apiserver (test/helpers/control-plane.ts), and the real server started with the
 * Deployment's own arguments as that ServiceAccount (its token, from the TokenRequest API), on
 * the serving certificate the script made. Proves that the granted RBAC is enough for delegated
 * mode, that kube-apiserver's aggregator trusts the certificate for the Service name, and that the
 * view/edit ClusterRoles give users what docs/deploy.md says.
 *
 * What a kubelet would do is replaced: the Service becomes an ExternalName to localhost on the
 * server's port (the control plane proxies to Services, not to pod IPs); the pod's paths and
 * listen address become local ones; the etcd option is the control plane's etcd under the
 * manifests' own --etcd-prefix. Never skipped: without the control plane's binaries this fails.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import t from 'tap';
import { parseAllDocuments, stringify } from 'yaml';
import { deployCopyWithServingCert } from '../helpers/deploy-copy.ts';
import { startControlPlane, type ControlPlane, type KubectlRun } from '../helpers/control-plane.ts';
import { ROOT, freePort } from '../helpers/server.ts';

t.setTimeout(30 * 60_000);

const run = promisify(execFile);

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type K8s = Record<string, any>;

const APISERVICE = 'v1beta2.kmm.sigs.x-k8s.io';
const yamlOf = (objs: readonly K8s[]) => objs.map((o) => stringify(o)).join('---\n');

const work = await deployCopyWithServingCert('kmm-preflight-in-cluster-');
t.teardown(() => rm(work, { recursive: true, force: true }));
const pki = join(work, 'deploy', 'overlays', 'kubernetes', 'serving-cert', 'pki');
const objs = parseAllDocuments(
  (await run('kubectl', ['kustomize', join(work, 'deploy', 'overlays', 'kubernetes')], { maxBuffer: 64 * 1024 * 1024 })).stdout,
).map((d) => d.toJS() as K8s);
const byKind = (kind: string) => objs.filter((o) => o['kind'] === kind);

let plane: ControlPlane | undefined;
try {
  plane = await startControlPlane();
} catch (err) {
  t.fail(`the test control plane did not start: ${(err as Error).message}`);
}
t.teardown(() => plane?.stop());

let child: ChildProcess | undefined;
let output = '';
t.teardown(
  () =>
    new Promise<void>((done) => {
      const c = child;
      if (!c || c.exitCode !== null || c.signalCode !== null) return done();
      c.once('exit', () => done());
      c.kill('SIGTERM');
    }),
);

if (plane) {
  const kube = plane;
  const ok = async (args: readonly string[], opts: { input?: string; kubeconfig?: string } = {}): Promise<string> => {
    const r = await kube.kubectl(args, opts);
    if (r.code !== 0) throw new Error(`kubectl ${args.join(' ')} failed (${r.code}):\n${r.stderr}\n${r.stdout}`);
    return r.stdout;
  };

  const dep = byKind('Deployment')[0]!;
  const ns = dep['metadata']['namespace'] as string;
  const saName = dep['spec']['template']['spec']['serviceAccountName'] as string;
  const container = dep['spec']['template']['spec']['containers'][0] as K8s;
  const port = await freePort();

  // Namespace, ServiceAccount and every RBAC object exactly as rendered.
  await ok(['apply', '-f', '-'], { input: yamlOf(byKind('Namespace')) });
  const rbacKinds = ['ServiceAccount', 'ClusterRole', 'ClusterRoleBinding', 'Role', 'RoleBinding'];
  await ok(['apply', '-f', '-'], { input: yamlOf(objs.filter((o) => rbacKinds.includes(o['kind']))) });

  // The Service as an ExternalName to this machine, the APIService as rendered but for the port.
  const svc = structuredClone(byKind('Service').find((s) => s['metadata']['name'] === dep['metadata']['name'])!);
  svc['spec'] = { type: 'ExternalName', externalName: 'localhost' };
  const api = structuredClone(byKind('APIService')[0]!);
  if (api['metadata']['name'] !== APISERVICE || !api['spec']['caBundle']) throw new Error(`the rendered APIService is not ${APISERVICE} with a caBundle`);
  api['spec']['service']['port'] = port;
  await ok(['apply', '-f', '-'], { input: yamlOf([svc, api]) });

  // The server as the ServiceAccount, with the Deployment's arguments made local.
  const token = await kube.serviceAccountToken(ns, saName);
  const kubeconfig = await kube.tokenKubeconfig(token);
  const local: Record<string, string> = {
    'listen-address': '127.0.0.1',
    port: String(port),
    'tls-cert-file': join(pki, 'tls.crt'),
    'tls-private-key-file': join(pki, 'tls.key'),
    'etcd-servers': kube.etcdUrl,
  };
  const args = (container['args'] as string[]).map((a) => {
    const name = /^--([^=]+)=/.exec(a)?.[1];
    return name !== undefined && name in local ? `--${name}=${local[name]}` : a;
  });
  args.push(`--kubeconfig=${kubeconfig}`);
  t.comment(`server arguments: ${args.join(' ')}`);
  const env: Record<string, string> = {};
  for (const e of (container['env'] ?? []) as K8s[]) env[e['name']] = e['value'];
  const c = spawn(process.execPath, [join(ROOT, 'src', 'main.ts'), ...args], {
    cwd: work,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child = c;
  c.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  c.stderr!.on('data', (d: Buffer) => (output += d.toString()));

  t.test('the APIService becomes Available: the aggregator trusts the certificate for the Service name', async (t) => {
    const deadline = Date.now() + 120_000;
    let last: KubectlRun | undefined;
    for (;;) {
      if (c.exitCode !== null) throw new Error(`the server exited with ${c.exitCode}:\n${output.slice(-8000)}`);
      last = await kube.kubectl(['get', 'apiservice', APISERVICE, '-o', 'json']);
      const cond = last.code === 0 ? ((JSON.parse(last.stdout).status?.conditions ?? []) as K8s[]).find((x) => x['type'] === 'Available') : undefined;
      if (cond?.['status'] === 'True') {
        // The aggregator may answer 404 for a few seconds after Available.
        if ((await kube.kubectl(['get', '--raw', `/apis/kmm.sigs.x-k8s.io/v1beta2`])).code === 0) break;
      }
      if (Date.now() > deadline) {
        throw new Error(`the APIService did not become Available: ${JSON.stringify(cond)}\n${last.stderr}\nserver output:\n${output.slice(-8000)}`);
      }
      await new Promise((r) => setTimeout(r, 500));
    }
    t.pass('Available');
    const list = await ok(['get', 'preflightvalidations', '-o', 'json']);
    t.ok(Array.isArray(JSON.parse(list)['items']), 'an admin lists PreflightValidations through kube-apiserver');
  });

  t.test('view and edit ClusterRoles, bound to users, give what docs/deploy.md says', async (t) => {
    const bind = (user: string, role: string) => ({
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'ClusterRoleBinding',
      metadata: { name: `test-${user}` },
      roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: role },
      subjects: [{ apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: user }],
    });
    const role = (label: string) =>
      byKind('ClusterRole').find((r) => r['metadata']['labels']?.[`rbac.authorization.k8s.io/aggregate-to-${label}`] === 'true')!['metadata']['name'] as string;
    // No controller-manager here to aggregate them into view/edit: bind the roles themselves.
    await ok(['apply', '-f', '-'], { input: yamlOf([bind('viewer', role('view')), bind('editor', role('edit'))]) });
    const viewer = await kube.userKubeconfig('viewer');
    const editor = await kube.userKubeconfig('editor');
    const stranger = await kube.userKubeconfig('stranger');
    const pfv = (name: string) =>
      yamlOf([{ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name }, spec: { kernelVersion: '6.1.0-18-amd64' } }]);
    const pfvo = (name: string) =>
      yamlOf([{ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidationOCP', metadata: { name }, spec: { releaseImage: 'quay.io/openshift-release-dev/ocp-release:4.16.0-x86_64' } }]);

    // SubjectAccessReviews are cached for 10 s by default (allowed and denied): distinct verbs
    // and names keep each check below a fresh decision.
    const editorCreate = await kube.kubectl(['create', '-f', '-'], { input: pfv('by-editor'), kubeconfig: editor });
    t.equal(editorCreate.code, 0, `edit: create a PreflightValidation ${editorCreate.stderr}`);
    const editorCreateOcp = await kube.kubectl(['create', '-f', '-'], { input: pfvo('by-editor'), kubeconfig: editor });
    t.equal(editorCreateOcp.code, 0, `edit: create a PreflightValidationOCP ${editorCreateOcp.stderr}`);
    const status = await kube.kubectl(
      ['patch', 'preflightvalidation', 'by-editor', '--subresource=status', '--type=merge', '-p', '{"status":{"observedGeneration":1}}'],
      { kubeconfig: editor },
    );
    t.equal(status.code, 0, `edit: patch the status ${status.stderr}`);

    const viewerList = await kube.kubectl(['get', 'preflightvalidations,preflightvalidationsocp', '-o', 'name'], { kubeconfig: viewer });
    t.equal(viewerList.code, 0, `view: list both kinds ${viewerList.stderr}`);
    t.match(viewerList.stdout, /preflightvalidation\.kmm\.sigs\.x-k8s\.io\/by-editor/, 'view: sees the PreflightValidation');
    t.match(viewerList.stdout, /preflightvalidationocp\.kmm\.sigs\.x-k8s\.io\/by-editor/, 'view: sees the PreflightValidationOCP');
    const viewerCreate = await kube.kubectl(['create', '-f', '-'], { input: pfv('by-viewer'), kubeconfig: viewer });
    t.not(viewerCreate.code, 0, 'view: may not create');
    t.match(viewerCreate.stderr, /forbidden/i, 'view: forbidden');
    const viewerDelete = await kube.kubectl(['delete', 'preflightvalidation', 'by-editor'], { kubeconfig: viewer });
    t.match(viewerDelete.stderr, /forbidden/i, 'view: may not delete');

    const strangerGet = await kube.kubectl(['get', 'preflightvalidations'], { kubeconfig: stranger });
    t.match(strangerGet.stderr, /forbidden/i, 'a user with neither role is forbidden');

    const editorDelete = await kube.kubectl(['delete', 'preflightvalidation', 'by-editor'], { kubeconfig: editor });
    t.equal(editorDelete.code, 0, `edit: delete ${editorDelete.stderr}`);
  });

  t.test('the server ran as the ServiceAccount, on the manifests storage settings', async (t) => {
    const prefix = args.find((a) => a.startsWith('--etcd-prefix='))!.slice('--etcd-prefix='.length);
    const b64 = (x: string) => Buffer.from(x).toString('base64');
    const end = prefix.slice(0, -1) + String.fromCharCode(prefix.charCodeAt(prefix.length - 1) + 1);
    const r = await fetch(`${kube.etcdUrl}/v3/kv/range`, {
      method: 'POST',
      body: JSON.stringify({ key: b64(prefix), range_end: b64(end), keys_only: true }),
    });
    const kvs = ((await r.json()) as { kvs?: { key: string }[] }).kvs ?? [];
    const keys = kvs.map((kv) => Buffer.from(kv.key, 'base64').toString('utf8'));
    t.ok(keys.some((k) => k.includes('by-editor')), `objects are stored under the manifests' --etcd-prefix ${prefix}: ${keys.join(', ')}`);
    t.notMatch(output, /forbidden/i, 'no request of the server itself was forbidden');
    t.ok(c.exitCode === null, 'the server is still running');
  });
}
