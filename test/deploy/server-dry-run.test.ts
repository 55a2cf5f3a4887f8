/**
 * Every overlay of deploy/, rendered by `kubectl kustomize`, submitted to a real kube-apiserver
 * (test/helpers/control-plane.ts) with `kubectl apply --dry-run=server` and `--dry-run=client`:
 * kube-apiserver decodes, defaults, validates and runs admission on each object without storing
 * it, and kubectl validates the fields against the server's OpenAPI schema, the schema check
 * that kubeconform would give. The Namespace is applied for real first (the namespaced objects of
 * a server dry-run need it).
 *
 * Never skipped: without the control plane's binaries this fails with the reason.
 */
import { execFile } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import t from 'tap';
import { parseAllDocuments, stringify } from 'yaml';
import { deployCopyWithServingCert } from '../helpers/deploy-copy.ts';
import { startControlPlane, type ControlPlane } from '../helpers/control-plane.ts';
import { ROOT } from '../helpers/server.ts';

// Starting includes building kube-apiserver when the cache is cold and no `before` script ran.
t.setTimeout(30 * 60_000);

const run = promisify(execFile);

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type K8s = Record<string, any>;

const OVERLAYS = ['base', 'overlays/kubernetes', 'overlays/openshift', 'overlays/single-replica-sqlite'];

async function kustomize(dir: string): Promise<K8s[]> {
  const { stdout } = await run('kubectl', ['kustomize', dir], { maxBuffer: 64 * 1024 * 1024 });
  return parseAllDocuments(stdout).map((d) => d.toJS() as K8s);
}

const yamlOf = (objs: readonly K8s[]) => objs.map((o) => stringify(o)).join('---\n');

const work = await deployCopyWithServingCert('kmm-preflight-dry-run-');
t.teardown(() => rm(work, { recursive: true, force: true }));

let plane: ControlPlane | undefined;
try {
  plane = await startControlPlane();
} catch (err) {
  t.fail(`the test control plane did not start: ${(err as Error).message}`);
}
t.teardown(() => plane?.stop());

if (plane) {
  const kube = plane;
  const served = new Set((await kube.kubectl(['api-versions'])).stdout.split('\n').filter((l) => l !== ''));
  const version = JSON.parse((await kube.kubectl(['version', '-o', 'json'])).stdout) as { serverVersion?: { gitVersion?: string } };
  t.comment(`kube-apiserver ${version.serverVersion?.gitVersion ?? '(unknown)'}`);

  /**
   * The objects as this kube-apiserver can take them. policy/v1 PodDisruptionBudget (what the
   * manifests use, Kubernetes 1.21 and later) is sent as policy/v1beta1 to an older server: the
   * fields used here (minAvailable, maxUnavailable, selector) are the same in both. Any other
   * group-version the server does not serve is a failure.
   */
  const forServer = (objs: readonly K8s[]): K8s[] =>
    objs.map((o) => {
      if (served.has(o['apiVersion'])) return o;
      if (o['kind'] === 'PodDisruptionBudget' && o['apiVersion'] === 'policy/v1' && served.has('policy/v1beta1')) {
        return { ...o, apiVersion: 'policy/v1beta1' };
      }
      t.fail(`${o['kind']} ${o['metadata']['name']}: ${o['apiVersion']} is not served by this kube-apiserver`);
      return o;
    });
  if (!served.has('policy/v1')) t.comment('this kube-apiserver predates policy/v1: PodDisruptionBudgets are checked as policy/v1beta1');

  for (const overlay of OVERLAYS) {
    t.test(`${overlay}: kube-apiserver accepts every object`, async (t) => {
      const objs = forServer(await kustomize(join(work, 'deploy', overlay)));
      const namespaces = objs.filter((o) => o['kind'] === 'Namespace');
      const rest = objs.filter((o) => o['kind'] !== 'Namespace');
      t.ok(namespaces.length > 0 && rest.length > 0, 'a Namespace and the rest');

      const created = await kube.kubectl(['apply', '-f', '-'], { input: yamlOf(namespaces) });
      t.equal(created.code, 0, `the Namespace is applied: ${created.stderr}`);

      for (const mode of ['server', 'client'] as const) {
        const r = await kube.kubectl(['apply', `--dry-run=${mode}`, '-f', '-'], { input: yamlOf(rest), timeoutMs: 120_000 });
        t.equal(r.code, 0, `--dry-run=${mode} succeeds${r.code === 0 ? '' : `:\n${r.stderr}`}`);
        t.equal(r.stderr.trim(), '', `--dry-run=${mode}: no warning or error`);
        const lines = r.stdout.split('\n').filter((l) => l.endsWith(mode === 'server' ? '(server dry run)' : '(dry run)'));
        t.equal(lines.length, rest.length, `--dry-run=${mode}: every object (${rest.length}) went through`);
      }
    });
  }

  // The check is real: kube-apiserver and kubectl do reject bad manifests here.
  t.test('control: a bad field and a bad value are rejected', async (t) => {
    const objs = forServer(await kustomize(join(work, 'deploy', 'overlays', 'kubernetes')));
    const dep = structuredClone(objs.find((o) => o['kind'] === 'Deployment')!);
    dep['spec']['template']['spec']['containers'][0]['bogusField'] = true;
    const unknownField = await kube.kubectl(['apply', '--dry-run=server', '-f', '-'], { input: yamlOf([dep]) });
    t.not(unknownField.code, 0, 'an unknown field fails');
    t.match(unknownField.stderr, /bogusField/, 'naming the field');

    const recreate = structuredClone(objs.find((o) => o['kind'] === 'Deployment')!);
    recreate['spec']['strategy'] = { type: 'Recreate', rollingUpdate: { maxSurge: 1 } };
    const invalid = await kube.kubectl(['apply', '--dry-run=server', '-f', '-'], { input: yamlOf([recreate]) });
    t.not(invalid.code, 0, 'Recreate with rollingUpdate fails server validation');
    t.match(invalid.stderr, /rollingUpdate/, 'naming the field');
  });
}
