/**
 * The Build stage in a cluster, end to end: a real kube-apiserver (no controller-manager, no
 * kubelet), the server registered as the aggregated API, Modules whose images are missing and
 * whose mappings have build (and sign) sections. The controller creates a build Job per
 * (validation object, Module); the test plays the Job controller and the kubelet, writing Job
 * status through the status subresource (and, for a successful push, the image kaniko would have
 * pushed), and checks what the Module's status becomes and that Jobs are cleaned up.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer as createHttpsServer, type Server } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import t from 'tap';
import { parseImageReference } from '../../src/image/reference.ts';
import { createRegistryClient } from '../../src/registry/client.ts';
import { verifyModuleFile } from '../../src/sign/module-signature.ts';
import { readImageFiles } from '../../src/engine/image-layers.ts';
import { registerAggregatedServer } from '../helpers/aggregation.ts';
import { startControlPlane, type ControlPlane } from '../helpers/control-plane.ts';
import { pushImage } from '../helpers/images.ts';
import { buildModuleObject } from '../helpers/kmod-fixtures.ts';
import { startRegistry, type TestRegistry } from '../helpers/registry.ts';
import { ROOT, startTestServer, type TestServer } from '../helpers/server.ts';

t.setTimeout(900_000);

const run = promisify(execFile);
const K = '6.1.0-18-amd64';
const K2 = '6.1.0-21-amd64';
const NS = 'drivers';
const TIMEOUT_S = 12;

let cp: ControlPlane;
let registry: TestRegistry;
let server: TestServer;
let kubelet: Server | undefined;
let keyDir: string;

async function ok(args: readonly string[], input?: string) {
  const r = await cp.kubectl(args, input !== undefined ? { input } : {});
  if (r.code !== 0) throw new Error(`kubectl ${args.join(' ')} failed (${r.code}):\n${r.stderr}\n${r.stdout}`);
  return r.stdout;
}

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\nserver output:\n${server?.output().slice(-4000)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function getJson(args: readonly string[]): Promise<any> {
  const r = await cp.kubectl([...args, '-o', 'json']);
  return r.code === 0 ? JSON.parse(r.stdout) : undefined;
}

const entry = async (pfv: string, module: string) => (await getJson(['get', 'pfv', pfv]))?.status?.modules?.find((m: any) => m.namespace === NS && m.name === module);

/** The build Job of `module` for validation object `pfv` (found by its labels). */
async function jobOf(pfv: string, module: string): Promise<any> {
  const list = await getJson(['get', 'jobs', '-n', NS, '-l', `kmm-preflight.sigs.x-k8s.io/validation=${pfv},kmm-preflight.sigs.x-k8s.io/module=${module}`]);
  return list?.items?.[0];
}

/** What the Job controller writes when a Job ends. */
async function finishJob(name: string, condition: { type: 'Complete' | 'Failed'; reason?: string; message?: string }) {
  const now = new Date().toISOString();
  const status = {
    startTime: now,
    ...(condition.type === 'Complete' ? { completionTime: now, succeeded: 1 } : { failed: 1 }),
    conditions: [{ type: condition.type, status: 'True', lastProbeTime: now, lastTransitionTime: now, ...(condition.reason ? { reason: condition.reason } : {}), ...(condition.message ? { message: condition.message } : {}) }],
  };
  await ok(['patch', 'job', name, '-n', NS, '--subresource=status', '--type=merge', '-p', JSON.stringify({ status })]);
}

const moduleYaml = (name: string, mapping: string, extra = '') => `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {name: ${name}, namespace: ${NS}}
spec:
  selector: {kubernetes.io/arch: amd64}
  imageRepoSecret: {name: pull}
  moduleLoader:
    container:
      modprobe: {moduleName: ${name}}
      kernelMappings:
${mapping}
${extra}`;

async function moduleLayer(name: string, kernel: string) {
  const ko = await buildModuleObject({ name, vermagic: `${kernel} SMP preempt mod_unload modversions` });
  return [
    { path: `opt/lib/modules/${kernel}/extra/${name}.ko`, content: ko },
    { path: `opt/lib/modules/${kernel}/modules.dep`, content: `extra/${name}.ko:\n` },
  ];
}

t.before(async () => {
  [cp, registry] = await Promise.all([startControlPlane(), startRegistry()]);
  keyDir = await mkdtemp(join(tmpdir(), 'kmm-preflight-build-jobs-'));
  await run('openssl', ['req', '-x509', '-new', '-nodes', '-utf8', '-sha256', '-days', '3650', '-batch', '-subj', '/CN=kmm-preflight build test key', '-newkey', 'rsa:2048', '-keyout', join(keyDir, 'key.pem'), '-out', join(keyDir, 'cert.pem')]);
  await ok(['apply', '-f', join(ROOT, 'test', 'fixtures', 'module-crd.yaml')]);
  await ok(['wait', '--for=condition=Established', 'crd/modules.kmm.sigs.x-k8s.io', '--timeout=60s']);
  await ok(['create', 'namespace', 'kmm-preflight']);
  await ok(['create', 'namespace', NS]);
  // No controller-manager: the namespace's default ServiceAccount must be made by hand for Pods.
  await ok(['create', 'serviceaccount', 'default', '-n', NS]);
  await ok(['create', 'secret', 'docker-registry', 'pull', '-n', NS, `--docker-server=${registry.host}`, '--docker-username=builder', '--docker-password=secret-password']);
  await ok(['create', 'secret', 'generic', 'build-token', '-n', NS, '--from-literal=token=abc']);
  await ok(['create', 'secret', 'generic', 'signing-key', '-n', NS, `--from-file=key=${join(keyDir, 'key.pem')}`]);
  await ok(['create', 'secret', 'generic', 'signing-cert', '-n', NS, `--from-file=cert=${join(keyDir, 'cert.pem')}`]);
  await ok(['create', 'configmap', 'dockerfile', '-n', NS, '--from-literal=dockerfile=FROM scratch\nARG KERNEL_VERSION\n']);
  server = await startTestServer([
    '--authentication-mode', 'delegated',
    '--kubeconfig', cp.kubeconfig,
    '--leader-elect=false',
    '--builder', 'job',
    '--builder-image', 'registry.example/kaniko/executor:v1.23.2',
    '--build-timeout', String(TIMEOUT_S),
    '--build-poll-interval', '0.3',
    '--log-level', 'info',
  ]);
  await registerAggregatedServer(cp, server);
});

t.teardown(async () => {
  kubelet?.close();
  await server?.stop();
  await Promise.all([registry?.stop(), cp?.stop()]);
  await rm(keyDir, { recursive: true, force: true });
});

t.test('the build Job, field by field; completing it verifies the Module and removes the Job', async (t) => {
  const image = `${registry.host}/drivers/alpha:${K}`;
  await ok(['apply', '-f', '-'], moduleYaml('alpha', `        - literal: ${K}
          containerImage: ${registry.host}/drivers/alpha:\${KERNEL_FULL_VERSION}
          registryTLS: {insecure: true}
          build:
            dockerfileConfigMap: {name: dockerfile}
            buildArgs:
              - {name: KERNEL_VERSION, value: overridden-by-kmm}
              - {name: EXTRA, value: from-mapping}
`, `      build:
        dockerfileConfigMap: {name: dockerfile}
        buildArgs: [{name: EXTRA, value: from-module}, {name: FIRST, value: one}]
        secrets: [{name: build-token}]
        baseImageRegistryTLS: {insecureSkipTLSVerify: true}
        kanikoParams: {tag: v1.9.0-debug}
        selector: {node-role.kubernetes.io/builder: ""}
`));
  await ok(['apply', '-f', '-'], `apiVersion: kmm.sigs.x-k8s.io/v1beta2\nkind: PreflightValidation\nmetadata: {name: push}\nspec: {kernelVersion: ${K}, pushBuiltImage: true}\n`);
  const job = await until('the build Job of alpha', () => jobOf('push', 'alpha'));
  const pfv = await getJson(['get', 'pfv', 'push']);

  t.match(job.metadata.name, /^alpha-build-[0-9a-f]{10}$/, 'a deterministic name readable by its Module');
  t.same(job.metadata.ownerReferences, [{ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', name: 'push', uid: pfv.metadata.uid, controller: true, blockOwnerDeletion: false }]);
  t.match(job.metadata.labels, {
    'app.kubernetes.io/managed-by': 'kmm-preflight',
    'app.kubernetes.io/component': 'build',
    'kmm-preflight.sigs.x-k8s.io/validation': 'push',
    'kmm-preflight.sigs.x-k8s.io/validation-kind': 'PreflightValidation',
    'kmm-preflight.sigs.x-k8s.io/module': 'alpha',
    'kmm-preflight.sigs.x-k8s.io/kernel': K,
  });
  t.equal(job.spec.backoffLimit, 0);
  t.equal(job.spec.activeDeadlineSeconds, TIMEOUT_S, 'the build timeout is the Job deadline');
  const pod = job.spec.template.spec;
  t.equal(pod.restartPolicy, 'Never');
  t.same(pod.nodeSelector, { 'node-role.kubernetes.io/builder': '' }, 'build.selector');
  t.equal(pod.containers.length, 1);
  const c = pod.containers[0];
  t.equal(c.image, 'registry.example/kaniko/executor:v1.9.0-debug', 'the builder image, with kanikoParams.tag');
  t.same(c.args, [
    '--dockerfile=/workspace/Dockerfile',
    '--context=dir:///workspace',
    `--destination=${image}`,
    '--build-arg=EXTRA=from-mapping',
    '--build-arg=FIRST=one',
    `--build-arg=KERNEL_VERSION=${K}`,
    `--build-arg=KERNEL_FULL_VERSION=${K}`,
    '--build-arg=MOD_NAME=alpha',
    `--build-arg=MOD_NAMESPACE=${NS}`,
    '--insecure',
    '--skip-tls-verify-pull',
  ], "args: Dockerfile, destination (pushed), build args (mapping's win by name, KMM's own over all), TLS");
  t.notOk(c.args.includes('--no-push'), 'pushBuiltImage: the builder pushes');
  const mounts = Object.fromEntries(c.volumeMounts.map((m: any) => [m.mountPath, m]));
  const volumes = Object.fromEntries(pod.volumes.map((v: any) => [v.name, v]));
  t.match(volumes[mounts['/workspace'].name].configMap, { name: 'dockerfile', items: [{ key: 'dockerfile', path: 'Dockerfile' }] }, 'the Dockerfile from the ConfigMap');
  t.match(volumes[mounts['/kaniko/.docker'].name].secret, { secretName: 'pull', items: [{ key: '.dockerconfigjson', path: 'config.json' }] }, 'imageRepoSecret to pull and push');
  t.equal(volumes[mounts['/run/secrets/build-token'].name].secret.secretName, 'build-token', 'build.secrets mounted');
  t.ok(Object.values(mounts).every((m: any) => m.readOnly === true), 'mounts are read-only');

  const pending = await until('alpha Unknown in Build', async () => {
    const e = await entry('push', 'alpha');
    return e?.verificationStage === 'Build' ? e : undefined;
  });
  t.equal(pending.verificationStatus, 'Unknown');
  t.match(pending.statusReason, new RegExp(`build Job ${NS}/${job.metadata.name}`));

  // kaniko pushes the image, then the Job controller marks the Job complete. The server may see
  // the image before the Job's end: then the Image stage verifies the Module and the Job goes.
  await pushImage(registry, `drivers/alpha:${K}`, { layers: [{ entries: await moduleLayer('alpha', K) }] });
  await finishJob(job.metadata.name, { type: 'Complete' }).catch((err: Error) => {
    if (!/NotFound/.test(err.message)) throw err;
  });
  const done = await until('alpha verified', async () => {
    const e = await entry('push', 'alpha');
    return e?.verificationStatus === 'True' ? e : undefined;
  });
  t.equal(done.verificationStage, 'Done');
  // Whether the server first sees the pushed image or the completed Job, the image decides.
  t.match(done.statusReason, new RegExp(`module alpha found in image ${image.replace(/[.]/g, '\\.')}`));
  await until('the Job removed', async () => ((await jobOf('push', 'alpha')) === undefined ? true : undefined));
});

t.test('a failed build is False with the Job\'s reason and the last lines of its log; the Job is removed', async (t) => {
  // A kubelet for the build Pod's log: kube-apiserver proxies `kubectl logs` to the node's port.
  kubelet = createHttpsServer({ key: cp.caKeyPem, cert: cp.caCertPem }, (req, res) => {
    if (req.url?.startsWith(`/containerLogs/${NS}/`)) {
      res.end(Array.from({ length: 40 }, (_, i) => `STEP ${i + 1}: output line ${i + 1}`).join('\n') + '\nerror building image: error building stage: RUN make: exit status 2\n');
    } else {
      res.statusCode = 404;
      res.end();
    }
  });
  await new Promise<void>((r) => kubelet!.listen(0, '127.0.0.1', r));
  const port = (kubelet.address() as { port: number }).port;
  await ok(['apply', '-f', '-'], `apiVersion: v1\nkind: Node\nmetadata: {name: builder-0}\n`);
  await ok(['patch', 'node', 'builder-0', '--subresource=status', '--type=merge', '-p', JSON.stringify({ status: { addresses: [{ type: 'InternalIP', address: '127.0.0.1' }], daemonEndpoints: { kubeletEndpoint: { Port: port } } } })]);

  await ok(['apply', '-f', '-'], moduleYaml('bravo', `        - literal: ${K}
          containerImage: ${registry.host}/drivers/bravo:${K}
          registryTLS: {insecure: true}
          build: {dockerfileConfigMap: {name: dockerfile}}
`));
  const job = await until('the build Job of bravo', () => jobOf('push', 'bravo'));
  // The Pod the Job controller would have made, on the node above.
  await ok(['apply', '-f', '-'], `apiVersion: v1
kind: Pod
metadata: {name: ${job.metadata.name}-x1, namespace: ${NS}, labels: {job-name: ${job.metadata.name}}}
spec:
  nodeName: builder-0
  restartPolicy: Never
  automountServiceAccountToken: false
  containers: [{name: builder, image: registry.example/kaniko/executor:v1.23.2}]
`);
  await finishJob(job.metadata.name, { type: 'Failed', reason: 'BackoffLimitExceeded', message: 'Job has reached the specified backoff limit' });
  const failed = await until('bravo False', async () => {
    const e = await entry('push', 'bravo');
    return e?.verificationStatus === 'False' ? e : undefined;
  });
  t.equal(failed.verificationStage, 'Requeued');
  t.match(failed.statusReason, /failed \(BackoffLimitExceeded: Job has reached the specified backoff limit\)/);
  t.match(failed.statusReason, /last lines of the build log:\n(.|\n)*RUN make: exit status 2/, 'the log tail, read through kube-apiserver from the kubelet, is in the reason');
  t.notMatch(failed.statusReason, /output line 20\n/, 'only the last lines');
  t.ok(Buffer.byteLength(failed.statusReason) < 3000, 'the reason is size-bounded');
  await until('the Job removed', async () => ((await jobOf('push', 'bravo')) === undefined ? true : undefined));
});

t.test('a Job past its deadline is BuildTimedOut, whether the Job controller or the server notices', async (t) => {
  await ok(['apply', '-f', '-'], [
    moduleYaml('charlie', `        - literal: ${K}\n          containerImage: ${registry.host}/drivers/charlie:${K}\n          registryTLS: {insecure: true}\n          build: {dockerfileConfigMap: {name: dockerfile}}\n`),
    moduleYaml('delta', `        - literal: ${K}\n          containerImage: ${registry.host}/drivers/delta:${K}\n          registryTLS: {insecure: true}\n          build: {dockerfileConfigMap: {name: dockerfile}}\n`),
  ].join('---\n'));
  const charlie = await until('the build Job of charlie', () => jobOf('push', 'charlie'));
  await until('the build Job of delta', () => jobOf('push', 'delta'));
  await finishJob(charlie.metadata.name, { type: 'Failed', reason: 'DeadlineExceeded', message: 'Job was active longer than specified deadline' });
  const c = await until('charlie False', async () => {
    const e = await entry('push', 'charlie');
    return e?.verificationStatus === 'False' ? e : undefined;
  });
  t.match(c.statusReason, new RegExp(`did not finish within ${TIMEOUT_S} s \\(Job was active longer than specified deadline\\)`));
  // delta's Job is left running: past the timeout the server itself stops it.
  const d = await until(
    'delta timed out',
    async () => {
      const e = await entry('push', 'delta');
      return e?.verificationStatus === 'False' ? e : undefined;
    },
    (TIMEOUT_S + 30) * 1000,
  );
  t.match(d.statusReason, new RegExp(`did not finish within ${TIMEOUT_S} s`));
  await until('both Jobs removed', async () => ((await jobOf('push', 'charlie')) === undefined && (await jobOf('push', 'delta')) === undefined ? true : undefined));
});

t.test('a changed Dockerfile replaces a running build Job', async (t) => {
  await ok(['create', 'configmap', 'dockerfile-echo', '-n', NS, '--from-literal=dockerfile=FROM scratch\n']);
  await ok(['apply', '-f', '-'], moduleYaml('echo', `        - literal: ${K}\n          containerImage: ${registry.host}/drivers/echo:${K}\n          registryTLS: {insecure: true}\n          build: {dockerfileConfigMap: {name: dockerfile-echo}}\n`));
  const first = await until('the build Job of echo', () => jobOf('push', 'echo'));
  await ok(['create', 'configmap', 'dockerfile-echo', '-n', NS, '--from-literal=dockerfile=FROM scratch\nRUN true\n', '--dry-run=client', '-o', 'yaml'], undefined).then((y) => ok(['apply', '-f', '-'], y));
  const second = await until('a new build Job of echo', async () => {
    const j = await jobOf('push', 'echo');
    return j && j.metadata.uid !== first.metadata.uid ? j : undefined;
  });
  t.equal(second.metadata.name, first.metadata.name, 'the same deterministic name');
  t.not(second.metadata.annotations['kmm-preflight.sigs.x-k8s.io/fingerprint'], first.metadata.annotations['kmm-preflight.sigs.x-k8s.io/fingerprint']);
  await ok(['delete', 'module', 'echo', '-n', NS]);
});

t.test('without pushBuiltImage the builder does not push, and a finished build verifies', async (t) => {
  await ok(['apply', '-f', '-'], moduleYaml('foxtrot', `        - literal: ${K2}\n          containerImage: ${registry.host}/drivers/foxtrot:${K2}\n          registryTLS: {insecure: true}\n          build: {dockerfileConfigMap: {name: dockerfile}}\n`));
  await ok(['apply', '-f', '-'], `apiVersion: kmm.sigs.x-k8s.io/v1beta2\nkind: PreflightValidation\nmetadata: {name: nopush}\nspec: {kernelVersion: ${K2}}\n`);
  const job = await until('the build Job of foxtrot', () => jobOf('nopush', 'foxtrot'));
  t.ok(job.spec.template.spec.containers[0].args.includes('--no-push'));
  await finishJob(job.metadata.name, { type: 'Complete' });
  const e = await until('foxtrot True', async () => {
    const x = await entry('nopush', 'foxtrot');
    return x?.verificationStatus === 'True' ? x : undefined;
  });
  t.match(e.statusReason, /not pushed: pushBuiltImage is false/);
  const client = createRegistryClient();
  await t.rejects(client.resolveImage(parseImageReference(`${registry.host}/drivers/foxtrot:${K2}`), { insecure: true }, { os: 'linux', architecture: 'amd64' }), { code: 'NotFound' }, 'nothing was pushed');
  await client.close();
});

t.test('the full pipeline: image missing → Build (Job) → Sign in-process → pushed, signed, verified', async (t) => {
  const final = `${registry.host}/drivers/golf:${K}`;
  await ok(['apply', '-f', '-'], moduleYaml('golf', `        - literal: ${K}
          containerImage: ${final}
          registryTLS: {insecure: true}
          build: {dockerfileConfigMap: {name: dockerfile}}
          sign:
            keySecret: {name: signing-key}
            certSecret: {name: signing-cert}
            filesToSign: ['/opt/lib/modules/\${KERNEL_FULL_VERSION}/extra/golf.ko']
`));
  const job = await until('the build Job of golf', () => jobOf('push', 'golf'));
  const destination = job.spec.template.spec.containers[0].args.find((a: string) => a.startsWith('--destination=')).slice('--destination='.length);
  t.not(destination, final, 'a sign stage follows: the build goes to a temporary image');
  t.match(destination, new RegExp(`^${registry.host.replace(/[.]/g, '\\.')}/drivers/golf:${NS}_golf_kmm_preflight_unsigned_[0-9a-f]{8}$`));
  // kaniko pushes the unsigned image to the temporary name.
  await pushImage(registry, destination.slice(registry.host.length + 1), { layers: [{ entries: await moduleLayer('golf', K) }] });
  await finishJob(job.metadata.name, { type: 'Complete' });
  const e = await until('golf True', async () => {
    const x = await entry('push', 'golf');
    return x?.verificationStatus === 'True' || x?.verificationStatus === 'False' ? x : undefined;
  });
  t.equal(e.verificationStatus, 'True', e.statusReason);
  t.equal(e.verificationStage, 'Done');
  t.match(e.statusReason, /signed/);
  const client = createRegistryClient();
  const { files } = await readImageFiles(client, final, { insecure: true }, { os: 'linux', architecture: 'amd64' }, (p) => p.endsWith('/golf.ko'));
  t.equal(files.length, 1, 'the signed module is in the pushed image');
  const cert = await readFile(join(keyDir, 'cert.pem'));
  const verified = await verifyModuleFile(files[0]!.data, files[0]!.path, cert, { maxBytes: 64 << 20 });
  t.match(verified, { signer: 'kmm-preflight build test key', hashAlgorithm: 'sha256' });
  await client.close();
  await until('the Job removed', async () => ((await jobOf('push', 'golf')) === undefined ? true : undefined));
});
