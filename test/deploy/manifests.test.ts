/**
 * The deploy manifests, rendered by the real `kubectl kustomize` (offline) from a copy of deploy/
 * with a freshly made serving certificate, checked for what an aggregated API server needs: the
 * APIService, Service, Deployment, ServiceAccount and bindings name each other consistently;
 * TLS is verified (caBundle or service-ca, never insecureSkipTLSVerify); the pods are locked down;
 * the server's own flag parser accepts the Deployment's arguments. Also: the certificate script,
 * the Containerfile (read, not built: no container engine here) and the docs' external-etcd
 * example.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { cp, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { request } from 'node:https';
import { isBuiltin } from 'node:module';
import { tmpdir } from 'node:os';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { promisify } from 'node:util';
import t, { type Test } from 'tap';
import { parseAllDocuments } from 'yaml';
import { loadConfig, type Config } from '../../src/config.ts';
import { ROOT, freePort } from '../helpers/server.ts';

const run = promisify(execFile);

/** A rendered Kubernetes object; loosely typed on purpose, the assertions say what is expected. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type K8s = Record<string, any>;

const APISERVICE = 'v1beta2.kmm.sigs.x-k8s.io';
const SERVING_SECRET = 'kmm-preflight-serving-cert';
const OVERLAYS = ['kubernetes', 'openshift', 'single-replica-sqlite'] as const;
type Overlay = (typeof OVERLAYS)[number] | 'base';

async function kustomize(dir: string): Promise<K8s[]> {
  const { stdout } = await run('kubectl', ['kustomize', dir], { maxBuffer: 64 * 1024 * 1024 });
  return parseAllDocuments(stdout).map((d) => {
    if (d.errors.length > 0) throw new Error(`kubectl kustomize ${dir} printed bad YAML: ${d.errors[0]!.message}`);
    return d.toJS() as K8s;
  });
}

function all(objs: readonly K8s[], kind: string): K8s[] {
  return objs.filter((o) => o['kind'] === kind);
}

function find(objs: readonly K8s[], kind: string, name: string, namespace?: string): K8s | undefined {
  return objs.find((o) => o['kind'] === kind && o['metadata']?.name === name && (namespace === undefined || o['metadata']?.namespace === namespace));
}

/** Every key of a selector's matchLabels equals the label. */
function selects(selector: Record<string, string> | undefined, labels: Record<string, string> | undefined): boolean {
  if (!selector || Object.keys(selector).length === 0) return false;
  return Object.entries(selector).every(([k, v]) => labels?.[k] === v);
}

function podTemplates(objs: readonly K8s[]): K8s[] {
  return objs.filter((o) => ['Deployment', 'StatefulSet', 'DaemonSet', 'Job'].includes(o['kind']));
}

function hasSubject(binding: K8s | undefined, sa: { name: string; namespace: string }): boolean {
  return (binding?.['subjects'] ?? []).some(
    (s: K8s) => s['kind'] === 'ServiceAccount' && s['name'] === sa.name && s['namespace'] === sa.namespace,
  );
}

function pemCertificates(pem: string): X509Certificate[] {
  return (pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? []).map((p) => new X509Certificate(p));
}

function issuedBy(cert: X509Certificate, cas: readonly X509Certificate[]): boolean {
  return cas.some((ca) => ca.ca && cert.checkIssued(ca) && cert.verify(ca.publicKey));
}

// ---------------------------------------------------------------------------------------------
// Fixture: deploy/ copied without any locally generated certificate, the script run on the copy.

let work: string;
let deploy: string;
let notGeneratedError = '';
const rendered = new Map<Overlay, K8s[]>();

t.before(async () => {
  work = await mkdtemp(join(tmpdir(), 'kmm-preflight-deploy-'));
  deploy = join(work, 'deploy');
  const generated = join(ROOT, 'deploy', 'overlays', 'kubernetes', 'serving-cert');
  await cp(join(ROOT, 'deploy'), deploy, {
    recursive: true,
    filter: (src) => !(src.startsWith(join(generated, 'pki')) || src === join(generated, 'apiservice-cabundle.yaml')),
  });
  try {
    await kustomize(join(deploy, 'overlays', 'kubernetes'));
  } catch (err) {
    notGeneratedError = String((err as { stderr?: string }).stderr ?? err);
  }
  await run('bash', [join(deploy, 'scripts', 'make-serving-cert.sh')]);
  rendered.set('base', await kustomize(join(deploy, 'base')));
  for (const o of OVERLAYS) rendered.set(o, await kustomize(join(deploy, 'overlays', o)));
});

t.teardown(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

function objects(overlay: Overlay): K8s[] {
  const objs = rendered.get(overlay);
  if (!objs) throw new Error(`${overlay} was not rendered`);
  return objs;
}

// ---------------------------------------------------------------------------------------------
// What every rendering must satisfy, with the differences between them as options.

interface Expect {
  readonly replicas: number;
  readonly pdb: boolean;
  readonly storage: 'etcd' | 'sqlite';
  /** Whether the etcd option (deploy/components/etcd) is part of the rendering. */
  readonly etcd: boolean;
  readonly cert: 'script' | 'service-ca' | 'none';
  /** The fixed user (and group, fsGroup) of the pods, or none (OpenShift assigns one). */
  readonly runAsUser: number | undefined;
}

const EXPECT: Record<Overlay, Expect> = {
  base: { replicas: 2, pdb: true, storage: 'etcd', etcd: false, cert: 'none', runAsUser: 65532 },
  kubernetes: { replicas: 2, pdb: true, storage: 'etcd', etcd: true, cert: 'script', runAsUser: 65532 },
  openshift: { replicas: 2, pdb: true, storage: 'etcd', etcd: true, cert: 'service-ca', runAsUser: undefined },
  'single-replica-sqlite': { replicas: 1, pdb: false, storage: 'sqlite', etcd: false, cert: 'script', runAsUser: 65532 },
};

function checkRendering(t: Test, overlay: Overlay): void {
  const objs = objects(overlay);
  const want = EXPECT[overlay];

  // APIService -> Service.
  const apis = all(objs, 'APIService');
  t.equal(apis.length, 1, 'one APIService');
  const api = find(objs, 'APIService', APISERVICE)!;
  t.ok(api, `APIService ${APISERVICE}`);
  t.match(api['spec'], { group: 'kmm.sigs.x-k8s.io', version: 'v1beta2', groupPriorityMinimum: 1000, versionPriority: 100 });
  t.notOk('insecureSkipTLSVerify' in api['spec'], 'no insecureSkipTLSVerify');
  const ref = api['spec']['service'] as { name: string; namespace: string; port: number };
  t.equal(ref.port, 443, 'APIService reaches the Service on 443');
  const svc = find(objs, 'Service', ref.name, ref.namespace)!;
  t.ok(svc, `the Service ${ref.namespace}/${ref.name} the APIService names exists`);
  const ns = ref.namespace;
  t.ok(find(objs, 'Namespace', ns), `Namespace ${ns} is part of the rendering`);

  // Service -> Deployment pods, and no other pods.
  const deployments = all(objs, 'Deployment');
  t.equal(deployments.length, 1, 'one Deployment');
  const dep = deployments[0]!;
  t.equal(dep['metadata']['namespace'], ns, 'the Deployment is in the Service namespace');
  const podLabels = dep['spec']['template']['metadata']['labels'] as Record<string, string>;
  t.ok(selects(svc['spec']['selector'], podLabels), 'the Service selects the Deployment pods');
  t.ok(selects(dep['spec']['selector']['matchLabels'], podLabels), 'the Deployment selector matches its pod labels');
  for (const w of podTemplates(objs)) {
    if (w === dep) continue;
    t.notOk(selects(svc['spec']['selector'], w['spec']['template']['metadata']['labels']), `the Service does not select ${w['kind']} ${w['metadata']['name']}`);
  }

  const pod = dep['spec']['template']['spec'] as K8s;
  t.equal(pod['containers'].length, 1, 'one container');
  const c = pod['containers'][0] as K8s;
  const ports = (c['ports'] ?? []) as K8s[];
  const portOf = (p: number | string): number | undefined => (typeof p === 'number' ? p : ports.find((x) => x['name'] === p)?.['containerPort']);
  const svcPort = (svc['spec']['ports'] as K8s[]).find((p) => p['port'] === 443);
  t.ok(svcPort, 'the Service has port 443');
  t.equal(portOf(svcPort?.['targetPort']), 8443, 'the Service targetPort is the container port 8443');
  t.ok(ports.some((p) => p['containerPort'] === 8443), 'the container declares port 8443');

  // The flags, read by the server's own configuration loader.
  let config: Config | undefined;
  t.doesNotThrow(() => (config = loadConfig(c['args'], {}, '/app')), 'the server accepts the arguments');
  if (!config) return;
  t.equal(c['command'], undefined, 'the image ENTRYPOINT runs the server');
  t.match(config, { authenticationMode: 'delegated', generateDevCerts: false, listenAddress: '0.0.0.0', port: 8443 });

  // ServiceAccount and its bindings.
  const sa = { name: pod['serviceAccountName'] as string, namespace: ns };
  t.ok(find(objs, 'ServiceAccount', sa.name, ns), `ServiceAccount ${ns}/${sa.name} exists`);
  const delegator = all(objs, 'ClusterRoleBinding').find((b) => b['roleRef']['name'] === 'system:auth-delegator');
  t.match(delegator?.['roleRef'], { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: 'system:auth-delegator' });
  t.ok(hasSubject(delegator, sa), 'system:auth-delegator is bound to the ServiceAccount');
  const reader = all(objs, 'RoleBinding').find((b) => b['roleRef']['name'] === 'extension-apiserver-authentication-reader');
  t.equal(reader?.['metadata']['namespace'], 'kube-system', 'the authentication reader RoleBinding is in kube-system');
  t.match(reader?.['roleRef'], { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'extension-apiserver-authentication-reader' });
  t.ok(hasSubject(reader, sa), 'extension-apiserver-authentication-reader is bound to the ServiceAccount');
  const serverRole = find(objs, 'ClusterRole', 'kmm-preflight');
  t.ok(serverRole, 'the server ClusterRole exists');
  const serverBinding = all(objs, 'ClusterRoleBinding').find((b) => b['roleRef']['kind'] === 'ClusterRole' && b['roleRef']['name'] === 'kmm-preflight');
  t.ok(hasSubject(serverBinding, sa), 'the server ClusterRole is bound to the ServiceAccount');
  const leaseBinding = all(objs, 'RoleBinding').find(
    (b) => b['metadata']['namespace'] === ns && b['roleRef']['kind'] === 'Role' && find(objs, 'Role', b['roleRef']['name'], ns),
  );
  const leaseRole = leaseBinding && find(objs, 'Role', leaseBinding['roleRef']['name'], ns);
  t.ok(hasSubject(leaseBinding, sa) && leaseRole, 'a Role in the server namespace is bound to the ServiceAccount');
  t.same(leaseRole?.['rules'], [{ apiGroups: ['coordination.k8s.io'], resources: ['leases'], verbs: ['get', 'create', 'update'] }], 'leader election: leases in its namespace only');

  // Every namespaced object is in a Namespace of the rendering, or kube-system.
  for (const o of objs) {
    const n = o['metadata']['namespace'] as string | undefined;
    if (n !== undefined && n !== 'kube-system') t.ok(find(objs, 'Namespace', n), `${o['kind']} ${o['metadata']['name']}: namespace ${n} is rendered`);
    t.equal(o['metadata']['labels']?.['app.kubernetes.io/name'], 'kmm-preflight', `${o['kind']} ${o['metadata']['name']} carries app.kubernetes.io/name`);
  }

  // Replicas, strategy, PodDisruptionBudget.
  t.equal(dep['spec']['replicas'], want.replicas, `${want.replicas} replica(s)`);
  const pdbs = all(objs, 'PodDisruptionBudget').filter((p) => p['metadata']['namespace'] === ns && selects(p['spec']['selector']['matchLabels'], podLabels));
  if (want.pdb) {
    t.equal(pdbs.length, 1, 'a PodDisruptionBudget covers the server pods');
    t.equal(pdbs[0]?.['spec']['minAvailable'], 1, 'minAvailable 1');
    t.match(dep['spec']['strategy'], { type: 'RollingUpdate', rollingUpdate: { maxUnavailable: 0 } }, 'rolling upgrade keeps every replica serving');
  } else {
    t.equal(pdbs.length, 0, 'no PodDisruptionBudget over a single replica');
    t.same(dep['spec']['strategy'], { type: 'Recreate' }, 'Recreate: one writer of the SQLite file at a time');
  }

  // Probes on /livez and /readyz over HTTPS on the serving port.
  for (const [probe, path] of [['livenessProbe', '/livez'], ['readinessProbe', '/readyz']] as const) {
    const g = c[probe]?.['httpGet'] as K8s | undefined;
    t.equal(g?.['path'], path, `${probe} on ${path}`);
    t.equal(g?.['scheme'], 'HTTPS', `${probe} over HTTPS`);
    t.equal(portOf(g?.['port']), config.port, `${probe} on the serving port`);
  }

  // Resources.
  t.same(c['resources'], { requests: { cpu: '100m', memory: '256Mi' }, limits: { memory: '1Gi' } }, 'requests 100m/256Mi, limit 1Gi');

  // Security of every pod of the rendering (the server, and etcd where present).
  for (const w of podTemplates(objs)) {
    const what = `${w['kind']} ${w['metadata']['name']}`;
    const spec = w['spec']['template']['spec'] as K8s;
    const psc = (spec['securityContext'] ?? {}) as K8s;
    t.equal(psc['runAsNonRoot'], true, `${what}: runAsNonRoot`);
    t.equal(psc['seccompProfile']?.['type'], 'RuntimeDefault', `${what}: seccomp RuntimeDefault`);
    t.equal(psc['runAsUser'], want.runAsUser, `${what}: runAsUser ${want.runAsUser ?? 'assigned by the platform'}`);
    t.equal(psc['fsGroup'], want.runAsUser, `${what}: fsGroup ${want.runAsUser ?? 'assigned by the platform'}`);
    t.notOk(spec['hostNetwork'] || spec['hostPID'] || spec['hostIPC'], `${what}: no host namespaces`);
    t.notOk((spec['volumes'] ?? []).some((v: K8s) => v['hostPath']), `${what}: no hostPath volume`);
    for (const k of [...(spec['initContainers'] ?? []), ...spec['containers']] as K8s[]) {
      const sc = (k['securityContext'] ?? {}) as K8s;
      t.equal(sc['allowPrivilegeEscalation'], false, `${what}/${k['name']}: no privilege escalation`);
      t.equal(sc['readOnlyRootFilesystem'], true, `${what}/${k['name']}: read-only root filesystem`);
      t.ok(sc['capabilities']?.['drop']?.includes('ALL') && !sc['capabilities']?.['add'], `${what}/${k['name']}: all capabilities dropped`);
      t.notOk(sc['privileged'], `${what}/${k['name']}: not privileged`);
      t.equal(sc['runAsUser'], undefined, `${what}/${k['name']}: the user is set once, in the pod`);
    }
  }
  const volumes = (pod['volumes'] ?? []) as K8s[];
  const mounts = (c['volumeMounts'] ?? []) as K8s[];
  const volumeAt = (path: string): K8s | undefined => {
    const m = mounts.find((x) => x['mountPath'] === path);
    return m && volumes.find((v) => v['name'] === m['name']);
  };
  t.ok(volumeAt('/tmp')?.['emptyDir'], '/tmp is an emptyDir');

  // TLS: the flags point into the mounted serving-certificate Secret.
  const certDir = dirname(config.tlsCertFile);
  t.equal(dirname(config.tlsPrivateKeyFile), certDir, 'certificate and key in one directory');
  t.same([basename(config.tlsCertFile), basename(config.tlsPrivateKeyFile)], ['tls.crt', 'tls.key'], 'the kubernetes.io/tls keys');
  const certVolume = volumeAt(certDir);
  t.equal(certVolume?.['secret']?.['secretName'], SERVING_SECRET, `--tls-cert-file is in the mounted Secret ${SERVING_SECRET}`);
  t.equal(mounts.find((m) => m['mountPath'] === certDir)?.['readOnly'], true, 'mounted read-only');
  t.equal(certVolume?.['secret']?.['defaultMode'], 0o440, 'the key is readable by owner and group (fsGroup) only');
  const secret = find(objs, 'Secret', SERVING_SECRET, ns);
  const annotations = (o: K8s) => (o['metadata']['annotations'] ?? {}) as Record<string, string>;
  if (want.cert === 'script') {
    t.equal(secret?.['type'], 'kubernetes.io/tls', 'the Secret is rendered, kubernetes.io/tls');
    const pem = (k: string) => Buffer.from(String(secret?.['data']?.[k] ?? ''), 'base64').toString('utf8');
    const cert = new X509Certificate(pem('tls.crt'));
    t.ok(cert.checkPrivateKey(createPrivateKey(pem('tls.key'))), 'tls.key belongs to tls.crt');
    t.match(cert.subjectAltName ?? '', `DNS:${svc['metadata']['name']}.${ns}.svc`, 'the certificate names the Service as kube-apiserver dials it');
    t.match(cert.subjectAltName ?? '', `DNS:${svc['metadata']['name']}.${ns}.svc.cluster.local`, 'and its cluster.local name');
    const bundle = pemCertificates(Buffer.from(String(api['spec']['caBundle'] ?? ''), 'base64').toString('utf8'));
    t.ok(bundle.length >= 1, 'the APIService has a caBundle');
    t.ok(issuedBy(cert, bundle), 'the serving certificate verifies against the caBundle');
    t.notOk(annotations(api)['service.beta.openshift.io/inject-cabundle'], 'no service-ca annotation');
  } else if (want.cert === 'service-ca') {
    t.equal(secret, undefined, 'no Secret: the service-ca operator creates it');
    t.equal(annotations(svc)['service.beta.openshift.io/serving-cert-secret-name'], SERVING_SECRET, 'the Service asks service-ca for the mounted Secret');
    t.equal(annotations(api)['service.beta.openshift.io/inject-cabundle'], 'true', 'service-ca injects the caBundle');
    t.equal(api['spec']['caBundle'], undefined, 'no caBundle of our own');
  } else {
    t.equal(secret, undefined, 'the base has no Secret');
    t.equal(api['spec']['caBundle'], undefined, 'the base has no caBundle');
  }

  // Storage.
  t.equal(config.storage, want.storage, `--storage=${want.storage}`);
  if (want.storage === 'etcd') {
    t.ok(config.etcdServers.length > 0, '--etcd-servers');
    t.match(config.etcdPrefix, /^\/kmm-preflight/, 'a prefix of its own, not kube-apiserver /registry');
    for (const server of config.etcdServers) {
      const u = new URL(server);
      const [svcName, svcNs, svcLabel] = u.hostname.split('.');
      t.equal(svcLabel, 'svc', `${server} is a Service name`);
      const etcdSvc = find(objs, 'Service', svcName!, svcNs!);
      if (!want.etcd) {
        t.equal(etcdSvc, undefined, `${overlay} leaves etcd to the etcd option or an external etcd`);
        continue;
      }
      t.ok(etcdSvc, `${server}: Service ${svcNs}/${svcName} is rendered`);
      t.ok((etcdSvc?.['spec']['ports'] as K8s[]).some((p) => String(p['port']) === u.port), `${server}: the Service has port ${u.port}`);
      const sts = all(objs, 'StatefulSet').find((s) => selects(etcdSvc?.['spec']['selector'], s['spec']['template']['metadata']['labels']));
      t.ok(sts, `${server}: the Service selects the etcd StatefulSet`);
      const policy = all(objs, 'NetworkPolicy').find((p) => selects(p['spec']['podSelector']['matchLabels'], sts?.['spec']['template']['metadata']['labels']));
      const allowed = (policy?.['spec']['ingress'] as K8s[] | undefined)?.some(
        (rule) =>
          (rule['ports'] as K8s[]).some((p) => String(p['port']) === u.port) &&
          (rule['from'] as K8s[] | undefined)?.some((f) => selects(f['podSelector']?.['matchLabels'], podLabels)),
      );
      t.ok(allowed, `${server}: the NetworkPolicy lets the server pods reach etcd`);
    }
  } else {
    const data = volumeAt(config.dataDir);
    const claim = data?.['persistentVolumeClaim']?.['claimName'] as string | undefined;
    t.ok(claim, '--data-dir is a mounted PersistentVolumeClaim');
    t.ok(claim && find(objs, 'PersistentVolumeClaim', claim, ns), 'and the claim is rendered');
  }
  t.equal(all(objs, 'StatefulSet').length, want.etcd ? 1 : 0, want.etcd ? 'the etcd option is included' : 'no etcd');
}

t.test('without the certificate script, the kubernetes overlay does not render, naming the missing file', async (t) => {
  t.match(notGeneratedError, /serving-cert\/pki\/tls\.crt/);
});

for (const overlay of ['base', ...OVERLAYS] as const) {
  t.test(`${overlay}: the aggregated API server's pieces agree`, async (t) => {
    checkRendering(t, overlay);
  });
}

t.test('RBAC: least privilege, no wildcard', async (t) => {
  for (const overlay of ['kubernetes', 'openshift'] as const) {
    for (const r of [...all(objects(overlay), 'ClusterRole'), ...all(objects(overlay), 'Role')]) {
      for (const rule of r['rules'] as K8s[]) {
        for (const field of ['apiGroups', 'resources', 'verbs']) {
          t.notOk((rule[field] ?? []).includes('*'), `${overlay}: ${r['kind']} ${r['metadata']['name']}: no * in ${field}`);
        }
      }
    }
  }
  const objs = objects('kubernetes');
  const rules = find(objs, 'ClusterRole', 'kmm-preflight')!['rules'] as K8s[];
  const grants = new Map<string, string[]>();
  for (const rule of rules) {
    for (const g of rule['apiGroups']) for (const res of rule['resources']) grants.set(`${g || 'core'}/${res}`, [...rule['verbs']].sort());
  }
  t.same(
    Object.fromEntries(grants),
    {
      'kmm.sigs.x-k8s.io/modules': ['get', 'list', 'watch'],
      'core/secrets': ['get', 'list', 'watch'],
      'core/configmaps': ['get', 'list', 'watch'],
      'core/nodes': ['list'],
      'core/events': ['create', 'patch'],
      'events.k8s.io/events': ['create', 'patch'],
      'batch/jobs': ['create', 'delete', 'get', 'list', 'watch'],
      'core/pods': ['list'],
      'core/pods/log': ['get'],
    },
    'exactly the grants docs/deploy.md explains (flowcontrol not needed: no API Priority and Fairness here)',
  );
  // Every rule carries a comment saying why.
  const source = (await readFile(join(ROOT, 'deploy', 'base', 'cluster-role.yaml'), 'utf8')).split('\n');
  source.forEach((line, i) => {
    if (/^\s*- apiGroups:/.test(line)) t.match(source[i - 1] ?? '', /^\s*#/, `cluster-role.yaml line ${i + 1}: the rule is explained`);
  });
});

t.test('aggregated ClusterRoles: view reads, edit and admin write, both kinds and their status', async (t) => {
  const objs = objects('kubernetes');
  const kinds = ['preflightvalidations', 'preflightvalidationsocp'];
  const grants = (label: string) => {
    const verbs = new Map<string, Set<string>>();
    for (const r of all(objs, 'ClusterRole').filter((r) => r['metadata']['labels']?.[`rbac.authorization.k8s.io/aggregate-to-${label}`] === 'true')) {
      for (const rule of r['rules'] as K8s[]) {
        if (!rule['apiGroups'].includes('kmm.sigs.x-k8s.io')) continue;
        for (const res of rule['resources']) for (const v of rule['verbs']) verbs.set(res, (verbs.get(res) ?? new Set()).add(v));
      }
    }
    return verbs;
  };
  const view = grants('view');
  for (const k of kinds) {
    for (const res of [k, `${k}/status`]) t.same([...(view.get(res) ?? [])].sort(), ['get', 'list', 'watch'], `view: read ${res}, nothing else`);
  }
  for (const label of ['edit', 'admin']) {
    const g = grants(label);
    for (const k of kinds) {
      for (const v of ['create', 'update', 'patch', 'delete', 'deletecollection', 'get', 'list', 'watch']) t.ok(g.get(k)?.has(v), `${label}: ${v} ${k}`);
      for (const v of ['update', 'patch']) t.ok(g.get(`${k}/status`)?.has(v), `${label}: ${v} ${k}/status`);
    }
  }
});

// ---------------------------------------------------------------------------------------------
// The upgrade gates (deploy/components/openshift): the ClusterVersion admission webhook and the
// RBAC for ClusterVersion reads and the kmm-preflight ClusterOperator. OpenShift only.

const WEBHOOK_CONFIG = 'kmm-preflight-clusterversion';
const WEBHOOK = 'clusterversions.kmm-preflight.kmm.sigs.x-k8s.io';
const GATES_ROLE = 'kmm-preflight:upgrade-gates';
const OPENSHIFT_GROUP = 'config.openshift.io';

/** The ClusterRole and Role rules of a rendering that name the config.openshift.io group. */
function openshiftGrants(objs: readonly K8s[]): { role: string; rule: K8s }[] {
  return [...all(objs, 'ClusterRole'), ...all(objs, 'Role')].flatMap((r) =>
    ((r['rules'] ?? []) as K8s[]).filter((rule) => (rule['apiGroups'] ?? []).includes(OPENSHIFT_GROUP)).map((rule) => ({ role: r['metadata']['name'] as string, rule })),
  );
}

/** Every `- apiGroups:` rule of a YAML file has a comment line right above it. */
async function everyRuleExplained(t: Test, path: string): Promise<void> {
  const source = (await readFile(join(ROOT, path), 'utf8')).split('\n');
  let rules = 0;
  source.forEach((line, i) => {
    if (!/^\s*- apiGroups:/.test(line)) return;
    rules++;
    t.match(source[i - 1] ?? '', /^\s*#/, `${path} line ${i + 1}: the rule is explained`);
  });
  t.ok(rules > 0, `${path} has rules`);
}

t.test('openshift: the ClusterVersion webhook reaches the server through its Service, trusted through service-ca', async (t) => {
  const objs = objects('openshift');
  t.equal(all(objs, 'MutatingWebhookConfiguration').length, 0, 'no mutating webhook: the gate never changes a ClusterVersion');
  t.equal(all(objs, 'ValidatingWebhookConfiguration').length, 1, 'one ValidatingWebhookConfiguration');
  const config = find(objs, 'ValidatingWebhookConfiguration', WEBHOOK_CONFIG)!;
  t.ok(config, `ValidatingWebhookConfiguration ${WEBHOOK_CONFIG}`);
  t.equal(config['metadata']['annotations']?.['service.beta.openshift.io/inject-cabundle'], 'true', 'the service-ca operator injects its CA into the caBundle');
  const webhooks = config['webhooks'] as K8s[];
  t.equal(webhooks.length, 1, 'one webhook');
  const w = webhooks[0]!;
  t.equal(w['name'], WEBHOOK);

  // Wiring: the API server's own Service and port, the server's path, the service-ca CA.
  t.same(
    w['clientConfig'],
    { service: { namespace: 'kmm-preflight', name: 'kmm-preflight', path: '/admission/clusterversions', port: 443 } },
    'a Service reference with the path: no url, no caBundle of our own (injected), never a way around TLS',
  );
  const ref = w['clientConfig']['service'] as K8s;
  const api = find(objs, 'APIService', APISERVICE)!;
  t.same({ name: ref['name'], namespace: ref['namespace'], port: ref['port'] }, api['spec']['service'], 'the same Service and port as the APIService: one HTTPS server');
  const svc = find(objs, 'Service', ref['name'], ref['namespace']);
  t.ok((svc?.['spec']['ports'] as K8s[] | undefined)?.some((p) => p['port'] === ref['port']), `the Service ${ref['namespace']}/${ref['name']} is rendered with port ${ref['port']}`);
  t.equal(
    svc?.['metadata']['annotations']?.['service.beta.openshift.io/serving-cert-secret-name'],
    SERVING_SECRET,
    'service-ca issues the serving certificate for that Service name, signed by the CA it injects',
  );

  // What reaches it, and how kube-apiserver treats it.
  t.same(
    w['rules'],
    [{ operations: ['UPDATE'], apiGroups: [OPENSHIFT_GROUP], apiVersions: ['v1'], resources: ['clusterversions'], scope: 'Cluster' }],
    'UPDATE of clusterversions only: not clusterversions/status, which the cluster-version operator writes often',
  );
  t.equal(w['sideEffects'], 'None', 'sideEffects None: dry-run requests may be sent');
  t.same(w['admissionReviewVersions'], ['v1'], 'AdmissionReview v1 only');
  t.ok(typeof w['timeoutSeconds'] === 'number' && w['timeoutSeconds'] >= 1 && w['timeoutSeconds'] <= 10, `a short timeout (${w['timeoutSeconds']} s): the answer comes from memory`);
  t.equal(w['failurePolicy'], 'Fail', 'Fail: no upgrade starts unchecked while the gate is down');
  t.notOk(w['namespaceSelector'] || w['objectSelector'], 'no selectors: ClusterVersion is cluster-scoped, `version` is the only one');
  const conditions = (w['matchConditions'] ?? []) as K8s[];
  t.equal(conditions.length, 1, 'one matchCondition');
  const expression = String(conditions[0]?.['expression'] ?? '');
  t.match(expression, /has\(object\.spec\.desiredUpdate\)/, 'only when the new object asks for an update...');
  t.match(expression, /object\.spec\.desiredUpdate != oldObject\.spec\.desiredUpdate/, '...that differs from the one asked for before');

  // The choice is explained where it is made.
  const source = (await readFile(join(ROOT, 'deploy', 'components', 'openshift', 'clusterversion-webhook.yaml'), 'utf8')).split('\n');
  const at = source.findIndex((l) => /^\s*failurePolicy:/.test(l));
  t.match(source[at - 1] ?? '', /^\s*#/, 'failurePolicy has a comment saying why');
  const docs = await readFile(join(ROOT, 'docs', 'deploy.md'), 'utf8');
  t.match(docs, /failurePolicy: Fail/, 'docs/deploy.md explains the failurePolicy');
});

t.test('openshift: the upgrade gates RBAC is exactly what they need, each rule explained, bound to the server', async (t) => {
  const objs = objects('openshift');
  const role = find(objs, 'ClusterRole', GATES_ROLE);
  t.same(
    role?.['rules'],
    [
      { apiGroups: [OPENSHIFT_GROUP], resources: ['clusterversions'], verbs: ['get', 'list', 'watch'] },
      { apiGroups: [OPENSHIFT_GROUP], resources: ['clusteroperators'], verbs: ['create', 'get', 'list', 'watch'] },
      { apiGroups: [OPENSHIFT_GROUP], resources: ['clusteroperators/status'], resourceNames: ['kmm-preflight'], verbs: ['update', 'patch'] },
    ],
    'read ClusterVersions; create and read ClusterOperators; write the status of kmm-preflight only',
  );
  const bindings = all(objs, 'ClusterRoleBinding').filter((b) => b['roleRef']['kind'] === 'ClusterRole' && b['roleRef']['name'] === GATES_ROLE);
  t.equal(bindings.length, 1, 'one ClusterRoleBinding');
  t.match(bindings[0]?.['roleRef'], { apiGroup: 'rbac.authorization.k8s.io' });
  t.same(bindings[0]?.['subjects'], [{ kind: 'ServiceAccount', name: 'kmm-preflight', namespace: 'kmm-preflight' }], "to the server's ServiceAccount only");
  t.same(
    openshiftGrants(objs).map((g) => g.role),
    [GATES_ROLE, GATES_ROLE, GATES_ROLE],
    'no other Role or ClusterRole grants anything in config.openshift.io (the base ClusterRole is unchanged)',
  );
  await everyRuleExplained(t, 'deploy/components/openshift/upgrade-gates-cluster-role.yaml');
});

for (const overlay of ['base', 'kubernetes', 'single-replica-sqlite'] as const) {
  t.test(`${overlay}: no upgrade gates (Kubernetes has no ClusterVersion)`, async (t) => {
    const objs = objects(overlay);
    t.equal(all(objs, 'ValidatingWebhookConfiguration').length + all(objs, 'MutatingWebhookConfiguration').length, 0, 'no admission webhook configuration');
    t.same(openshiftGrants(objs), [], 'no config.openshift.io RBAC');
    t.equal(find(objs, 'ClusterRole', GATES_ROLE), undefined, `no ${GATES_ROLE} ClusterRole`);
  });
}

t.test("docs/deploy.md's overlay for OpenShift before 4.14 renders the webhook without matchConditions, and nothing else changed", async (t) => {
  const docs = await readFile(join(ROOT, 'docs', 'deploy.md'), 'utf8');
  const section = docs.slice(docs.indexOf('### OpenShift 4.13 and older'));
  const yaml = /```yaml\n([\s\S]+?)```/.exec(section)?.[1];
  t.ok(yaml, 'the example is there');
  const dir = join(deploy, 'overlays', 'my-openshift');
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'kustomization.yaml'), yaml ?? '');
  const objs = await kustomize(dir);
  const webhook = find(objs, 'ValidatingWebhookConfiguration', WEBHOOK_CONFIG)?.['webhooks']?.[0] as K8s | undefined;
  t.ok(webhook, 'the webhook is rendered');
  t.notOk(webhook && 'matchConditions' in webhook, 'without matchConditions');
  const { matchConditions: _dropped, ...expected } = find(objects('openshift'), 'ValidatingWebhookConfiguration', WEBHOOK_CONFIG)!['webhooks'][0] as K8s;
  t.same(webhook, expected, 'the rest of the webhook as in the openshift overlay');
  t.equal(objs.length, objects('openshift').length, 'the same objects as the openshift overlay');
});

t.test('the etcd option: a three-member cluster that can form', async (t) => {
  const objs = objects('kubernetes');
  const sts = all(objs, 'StatefulSet')[0]!;
  const ns = sts['metadata']['namespace'] as string;
  const headless = find(objs, 'Service', sts['spec']['serviceName'], ns);
  t.equal(headless?.['spec']['clusterIP'], 'None', 'the StatefulSet service is headless');
  t.equal(headless?.['spec']['publishNotReadyAddresses'], true, 'members resolve each other before they are ready');
  const replicas = sts['spec']['replicas'] as number;
  t.equal(replicas, 3, 'three members');
  t.equal(sts['spec']['podManagementPolicy'], 'Parallel', 'members start together');
  const c = sts['spec']['template']['spec']['containers'][0] as K8s;
  t.match(c['image'], /^registry\.k8s\.io\/etcd:3\.5\.\d+-0$/, 'etcd 3.5');
  const arg = (name: string) => (c['args'] as string[]).find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
  const members = (arg('initial-cluster') ?? '').split(',');
  t.same(
    members,
    Array.from({ length: replicas }, (_, i) => {
      const pod = `${sts['metadata']['name']}-${i}`;
      return `${pod}=http://${pod}.${headless?.['metadata']['name']}.${ns}.svc:2380`;
    }),
    '--initial-cluster names every member by its stable DNS name',
  );
  t.match(arg('data-dir'), new RegExp(`^${c['volumeMounts'][0]['mountPath']}/`), 'data in a directory of the volume');
  t.equal(sts['spec']['volumeClaimTemplates'][0]['metadata']['name'], c['volumeMounts'][0]['name'], 'the volume is a claim per member');
  const pdb = all(objs, 'PodDisruptionBudget').find((p) => selects(p['spec']['selector']['matchLabels'], sts['spec']['template']['metadata']['labels']));
  t.equal(pdb?.['spec']['maxUnavailable'], 1, 'one member at a time may be disrupted');
});

t.test('images: an overlay of an overlay sets the server image', async (t) => {
  const dir = join(deploy, 'overlays', 'my-image');
  await mkdir(dir, { recursive: true });
  await writeFile(
    join(dir, 'kustomization.yaml'),
    'resources: [../openshift]\nimages:\n  - name: kmm-preflight\n    newName: registry.example.com/kmm-preflight\n    newTag: 1.2.3\n',
  );
  const dep = all(await kustomize(dir), 'Deployment')[0]!;
  t.equal(dep['spec']['template']['spec']['containers'][0]['image'], 'registry.example.com/kmm-preflight:1.2.3');
  for (const o of OVERLAYS) {
    const k = await readFile(join(ROOT, 'deploy', 'overlays', o, 'kustomization.yaml'), 'utf8');
    t.match(k, /images:\s*\n(\s*#.*\n)*\s*- name: kmm-preflight\n/, `${o} has an images: entry to edit`);
  }
});

t.test("docs/deploy.md's external etcd overlay renders and the server accepts it", async (t) => {
  const docs = await readFile(join(ROOT, 'docs', 'deploy.md'), 'utf8');
  const section = docs.slice(docs.indexOf('### An external etcd'));
  const yaml = /```yaml\n([\s\S]+?)```/.exec(section)?.[1];
  t.ok(yaml, 'the example is there');
  const dir = join(deploy, 'overlays', 'my-cluster');
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'kustomization.yaml'), yaml ?? '');
  for (const f of ['ca.crt', 'tls.crt', 'tls.key']) await writeFile(join(dir, f), 'placeholder\n');
  const objs = await kustomize(dir);
  t.equal(all(objs, 'StatefulSet').length, 0, 'no etcd StatefulSet');
  const dep = all(objs, 'Deployment')[0]!;
  const c = dep['spec']['template']['spec']['containers'][0] as K8s;
  const config = loadConfig(c['args'], {}, '/app');
  t.equal(config.storage, 'etcd');
  t.ok(config.etcdServers.length === 3 && config.etcdServers.every((s) => s.startsWith('https://')), 'three https etcd servers');
  t.equal(
    (c['args'] as string[]).filter((a) => a.startsWith('--etcd-servers=')).length,
    1,
    'the example replaced --etcd-servers (its index in deploy/base/deployment.yaml is right)',
  );
  const mount = (c['volumeMounts'] as K8s[]).find((m) => m['mountPath'] === dirname(config.etcdCaFile ?? ''));
  const volume = (dep['spec']['template']['spec']['volumes'] as K8s[]).find((v) => v['name'] === mount?.['name']);
  const secret = find(objs, 'Secret', volume?.['secret']?.['secretName'] ?? '', dep['metadata']['namespace']);
  t.ok(secret, 'the etcd client files are a mounted Secret of the rendering');
  for (const f of [config.etcdCaFile, config.etcdCertFile, config.etcdKeyFile]) t.ok(f && basename(f) in (secret?.['data'] ?? {}), `${f} is in the Secret`);
});

// ---------------------------------------------------------------------------------------------
// The certificate script.

t.test('make-serving-cert.sh: reuses its CA, replaces it on request, rejects bad input', async (t) => {
  const script = join(deploy, 'scripts', 'make-serving-cert.sh');
  const out = join(work, 'certs-run');
  const bundleOf = async () => {
    const patch = parseAllDocuments(await readFile(join(out, 'apiservice-cabundle.yaml'), 'utf8'))[0]!.toJS() as K8s;
    t.equal(patch['metadata']['name'], APISERVICE, 'the patch names the APIService');
    return pemCertificates(Buffer.from(patch['spec']['caBundle'], 'base64').toString('utf8'));
  };
  await run('bash', [script, '--out', out, '--days', '30']);
  const ca1 = await readFile(join(out, 'pki', 'ca.crt'), 'utf8');
  const cert1 = new X509Certificate(await readFile(join(out, 'pki', 'tls.crt')));
  t.equal((await bundleOf()).length, 1, 'one CA in the bundle');
  t.equal((await stat(join(out, 'pki', 'ca.key'))).mode & 0o077, 0, 'the CA key is private to its owner');

  await run('bash', [script, '--out', out]);
  t.equal(await readFile(join(out, 'pki', 'ca.crt'), 'utf8'), ca1, 'a second run keeps the CA');
  const cert2 = new X509Certificate(await readFile(join(out, 'pki', 'tls.crt')));
  t.not(cert2.serialNumber, cert1.serialNumber, 'and issues a new serving certificate');
  t.ok(issuedBy(cert2, await bundleOf()), 'signed by the same CA');

  await run('bash', [script, '--out', out, '--new-ca']);
  t.not(await readFile(join(out, 'pki', 'ca.crt'), 'utf8'), ca1, '--new-ca makes a new CA');
  const bundle = await bundleOf();
  t.equal(bundle.length, 2, 'the bundle holds the new and the previous CA');
  t.ok(issuedBy(cert1, bundle), 'certificates of the previous CA stay trusted during the rollout');
  t.ok(issuedBy(new X509Certificate(await readFile(join(out, 'pki', 'tls.crt'))), bundle.slice(0, 1)), 'the new certificate comes from the new CA');

  for (const bad of [['--namespace', 'Not_A_Label'], ['--days', '0'], ['--bogus']]) {
    const r = await run('bash', [script, '--out', join(work, 'never'), ...bad]).then(
      () => ({ code: 0, stderr: '' }),
      (e: { code: number; stderr: string }) => e,
    );
    t.equal(r.code, 2, `${bad.join(' ')} is refused with exit code 2`);
  }
});

t.test('the real server serves the generated certificate to a client that trusts the caBundle', async (t) => {
  const pki = join(deploy, 'overlays', 'kubernetes', 'serving-cert', 'pki');
  const port = await freePort();
  const dir = join(work, 'server');
  const child: ChildProcess = spawn(
    process.execPath,
    [
      join(ROOT, 'src', 'main.ts'),
      '--listen-address=127.0.0.1',
      `--port=${port}`,
      '--generate-dev-certs=false',
      `--tls-cert-file=${join(pki, 'tls.crt')}`,
      `--tls-private-key-file=${join(pki, 'tls.key')}`,
      `--client-ca-file=${join(pki, 'ca.crt')}`,
      '--storage=sqlite',
      `--data-dir=${join(dir, 'data')}`,
      `--cert-dir=${join(dir, 'certs')}`,
      '--log-level=warn',
    ],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  t.teardown(
    () =>
      new Promise<void>((done) => {
        if (child.exitCode !== null || child.signalCode !== null) return done();
        child.once('exit', () => done());
        child.kill('SIGTERM');
      }),
  );
  const ca = await readFile(join(pki, 'ca.crt'));
  const get = (servername: string) =>
    new Promise<number>((resolveGet, reject) => {
      const req = request({ host: '127.0.0.1', port, path: '/readyz', ca, servername, agent: false }, (res) => {
        res.resume();
        res.on('end', () => resolveGet(res.statusCode ?? 0));
      });
      req.on('error', reject);
      req.end();
    });
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`the server exited with ${child.exitCode}:\n${output}`);
    try {
      t.equal(await get('kmm-preflight.kmm-preflight.svc'), 200, 'TLS verified for kmm-preflight.kmm-preflight.svc, /readyz 200');
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ECONNREFUSED' || Date.now() > deadline) throw new Error(`${String(err)}\n${output}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  await t.rejects(get('kmm-preflight.other-namespace.svc'), { code: 'ERR_TLS_CERT_ALTNAME_INVALID' }, 'another name is refused');
});

// ---------------------------------------------------------------------------------------------
// The image (read only: there is no container engine to build it here).

function instructions(containerfile: string): { op: string; args: string }[] {
  return containerfile
    .replace(/\\\n/g, ' ')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'))
    .map((l) => {
      const m = /^(\S+)\s+(.*)$/.exec(l);
      return { op: (m?.[1] ?? l).toUpperCase(), args: m?.[2] ?? '' };
    });
}

t.test('Containerfile: Node 24 slim, production dependencies only, non-root, node src/main.ts', async (t) => {
  const ins = instructions(await readFile(join(ROOT, 'Containerfile'), 'utf8'));
  const arg = ins.find((i) => i.op === 'ARG' && i.args.startsWith('NODE_IMAGE='));
  t.match(arg?.args, /^NODE_IMAGE=docker\.io\/library\/node:24-bookworm-slim(@sha256:[0-9a-f]{64})?$/, 'base image: node:24-bookworm-slim');
  const froms = ins.filter((i) => i.op === 'FROM');
  t.ok(froms.length >= 2, 'multi-stage');
  for (const f of froms) t.match(f.args, /^\$\{NODE_IMAGE\}(\s+AS\s+\S+)?$/i, `FROM ${f.args}: the pinned base`);
  const runs = ins.filter((i) => i.op === 'RUN').map((i) => i.args);
  const ci = runs.find((r) => /\bnpm ci\b/.test(r));
  t.match(ci, /--omit=dev/, 'npm ci --omit=dev: no tap, TypeScript or the node devDependency');
  t.notOk(runs.some((r) => /\bnpm (install|i)\b/.test(r)), 'no npm install: exactly the lockfile');
  const lastStage = ins.slice(ins.lastIndexOf(froms[froms.length - 1]!));
  const copies = lastStage.filter((i) => i.op === 'COPY').map((i) => i.args);
  t.ok(copies.some((c) => /^src\s+\.\/src\/?$/.test(c)), 'copies src/');
  t.ok(copies.some((c) => /^--from=\S+\s+\/app\/node_modules\s/.test(c)), 'copies node_modules from the dependency stage');
  const sources = (c: string) => c.split(/\s+/).filter((w) => !w.startsWith('--')).slice(0, -1);
  t.notOk(copies.some((c) => sources(c).some((s) => s === '.' || s === './')), 'never copies the whole context');
  const user = lastStage.filter((i) => i.op === 'USER').pop()?.args ?? 'root';
  t.match(user, /^(node|[1-9][0-9]*)(:[1-9][0-9]*)?$/, `runs as non-root (${user})`);
  t.same(JSON.parse(lastStage.find((i) => i.op === 'ENTRYPOINT')?.args ?? 'null'), ['node', 'src/main.ts'], 'ENTRYPOINT ["node", "src/main.ts"]');
  t.notOk(ins.some((i) => i.op === 'HEALTHCHECK'), 'no HEALTHCHECK: Kubernetes probes the server');
  t.match(lastStage.find((i) => i.op === 'WORKDIR')?.args, '/app', 'WORKDIR /app (the Deployment resolves relative paths there)');
});

t.test('.containerignore and .dockerignore keep local state and secrets out of the context', async (t) => {
  const patterns = async (f: string) =>
    (await readFile(join(ROOT, f), 'utf8'))
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l !== '' && !l.startsWith('#'));
  const containerignore = await patterns('.containerignore');
  t.same(await patterns('.dockerignore'), containerignore, 'the same patterns for docker and podman');
  for (const p of ['node_modules', 'data', 'certs/*', '**/*.key', '**/*.crt', '**/*.db', '.git']) t.ok(containerignore.includes(p), `ignores ${p}`);
  for (const p of ['src', 'package.json', 'package-lock.json']) t.notOk(containerignore.includes(p), `keeps ${p}`);
});

async function sourceFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await sourceFiles(p)));
    else if (e.name.endsWith('.ts')) out.push(p);
  }
  return out;
}

t.test('the image holds all the server needs: src/ imports only src/, Node built-ins and production dependencies', async (t) => {
  const pkg = JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8')) as { dependencies: Record<string, string> };
  const src = join(ROOT, 'src');
  const used = new Set<string>();
  for (const file of await sourceFiles(src)) {
    const text = await readFile(file, 'utf8');
    // Value imports and re-exports (type-only ones are erased by type stripping), side-effect
    // imports, dynamic imports.
    const specifiers = [
      ...[...text.matchAll(/^\s*(?:import|export)\s+(?!type\s)[^;'"]*?\bfrom\s+'([^']+)'/gm)].map((m) => m[1]!),
      ...[...text.matchAll(/^\s*import\s+'([^']+)'/gm)].map((m) => m[1]!),
      ...[...text.matchAll(/\bimport\(\s*'([^']+)'\s*\)/g)].map((m) => m[1]!),
    ];
    for (const s of specifiers) {
      if (s.startsWith('.')) {
        const target = resolve(dirname(file), s);
        if (relative(src, target).startsWith('..')) t.fail(`${relative(ROOT, file)} imports ${s}, outside src/: not in the image`);
      } else if (!s.startsWith('node:') && !isBuiltin(s)) {
        used.add(s.startsWith('@') ? s.split('/').slice(0, 2).join('/') : s.split('/')[0]!);
      }
    }
  }
  t.ok(used.size > 0, 'found the runtime packages');
  for (const name of used) t.ok(name in pkg.dependencies, `${name} is a production dependency (npm ci --omit=dev installs it)`);
});
