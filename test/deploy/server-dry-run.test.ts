/**
 * Every overlay of deploy/, rendered by `kubectl kustomize`, submitted to a real kube-apiserver
 * (test/helpers/control-plane.ts) with `kubectl apply --dry-run=server` and `--dry-run=client`:
 * kube-apiserver decodes, defaults, validates and runs admission on each object without storing
 * it, and kubectl validates the fields against the server's OpenAPI schema, the schema check
 * that kubeconform would give. The Namespace is applied for real first (the namespaced objects of
 * a server dry-run need it). Also: test/fixtures/openshift-config-crds.yaml (the ClusterVersion and
 * ClusterOperator CRDs standing in for OpenShift's API) is applied, and objects like the real ones
 * are written under it.
 *
 * Never skipped: without the control plane's binaries this fails with the reason.
 */
import { execFile } from 'node:child_process';
import { readFile, rm } from 'node:fs/promises';
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

  // webhooks[].matchConditions (the ClusterVersion webhook's, deploy/components/openshift) came
  // with Kubernetes 1.27; an older kube-apiserver's OpenAPI lacks the field and kubectl refuses
  // it as unknown. Only there is it removed before the dry runs, exactly as docs/deploy.md's
  // overlay for OpenShift 4.13 and older does; a newer server checks it as written.
  const openapi = await kube.request('GET', '/openapi/v2');
  t.equal(openapi.status, 200, 'kube-apiserver serves its OpenAPI v2 document');
  const definitions = (JSON.parse(openapi.body) as { definitions: Record<string, { properties?: Record<string, unknown> }> }).definitions;
  const webhookSchema = definitions['io.k8s.api.admissionregistration.v1.ValidatingWebhook'];
  t.ok(webhookSchema, 'the OpenAPI document describes admissionregistration.k8s.io/v1 ValidatingWebhook');
  const knowsMatchConditions = 'matchConditions' in (webhookSchema?.properties ?? {});
  const withoutMatchConditions = (o: K8s): K8s => ({
    ...o,
    webhooks: (o['webhooks'] as K8s[]).map(({ matchConditions: _dropped, ...w }) => w),
  });

  /**
   * The objects as this kube-apiserver can take them. policy/v1 PodDisruptionBudget (what the
   * manifests use, Kubernetes 1.21 and later) is sent as policy/v1beta1 to an older server: the
   * fields used here (minAvailable, maxUnavailable, selector) are the same in both. Webhooks lose
   * their matchConditions where the server predates them (above). Any other group-version the
   * server does not serve is a failure.
   */
  const forServer = (objs: readonly K8s[]): K8s[] =>
    objs.map((o) => {
      if (o['kind'] === 'ValidatingWebhookConfiguration' && !knowsMatchConditions) o = withoutMatchConditions(o);
      if (served.has(o['apiVersion'])) return o;
      if (o['kind'] === 'PodDisruptionBudget' && o['apiVersion'] === 'policy/v1' && served.has('policy/v1beta1')) {
        return { ...o, apiVersion: 'policy/v1beta1' };
      }
      t.fail(`${o['kind']} ${o['metadata']['name']}: ${o['apiVersion']} is not served by this kube-apiserver`);
      return o;
    });
  if (!served.has('policy/v1')) t.comment('this kube-apiserver predates policy/v1: PodDisruptionBudgets are checked as policy/v1beta1');
  if (!knowsMatchConditions) t.comment('this kube-apiserver predates webhooks[].matchConditions: the ClusterVersion webhook is checked without them');

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

  if (!knowsMatchConditions) {
    t.test('control: this kube-apiserver refuses the webhook with matchConditions, hence the removal', async (t) => {
      const objs = await kustomize(join(work, 'deploy', 'overlays', 'openshift'));
      const webhook = objs.find((o) => o['kind'] === 'ValidatingWebhookConfiguration');
      t.ok(webhook?.['webhooks'][0]['matchConditions'], 'the rendered webhook has matchConditions');
      const r = await kube.kubectl(['apply', '--dry-run=server', '-f', '-'], { input: yamlOf([webhook!]) });
      t.not(r.code, 0, 'refused');
      t.match(r.stderr, /matchConditions/, 'naming the field');
    });
  }

  // The config.openshift.io CRDs that stand in for OpenShift's API in the upgrade-gate tests: a
  // structural schema kube-apiserver establishes, under which objects shaped like the real ones
  // (a recorded ClusterVersion; the ClusterOperator the server writes) keep every field, since
  // pruning would silently drop a field the schema lacked. Applied for real: the objects need them.
  t.test('test/fixtures/openshift-config-crds.yaml: established; a ClusterVersion and a ClusterOperator keep every field', async (t) => {
    const crds = ['clusterversions.config.openshift.io', 'clusteroperators.config.openshift.io'];
    const applied = await kube.kubectl(['apply', '-f', join(ROOT, 'test', 'fixtures', 'openshift-config-crds.yaml')]);
    t.equal(applied.code, 0, `the CRDs are applied${applied.code === 0 ? '' : `:\n${applied.stderr}`}`);
    const established = await kube.kubectl(['wait', '--for=condition=Established', '--timeout=60s', ...crds.map((n) => `crd/${n}`)], { timeoutMs: 90_000 });
    t.equal(established.code, 0, `both are Established${established.code === 0 ? '' : `:\n${established.stderr}`}`);
    const got = JSON.parse((await kube.kubectl(['get', 'crd', ...crds, '-o', 'json'])).stdout) as { items: K8s[] };
    for (const crd of got.items) {
      const conditions = (crd['status']['conditions'] ?? []) as K8s[];
      t.notOk(conditions.some((c) => c['type'] === 'NonStructuralSchema' && c['status'] === 'True'), `${crd['metadata']['name']}: a structural schema`);
    }

    const json = (r: { stdout: string }): K8s => JSON.parse(r.stdout) as K8s;
    const ok = (r: { code: number; stderr: string }, what: string) => t.equal(r.code, 0, `${what}${r.code === 0 ? '' : `:\n${r.stderr}`}`);

    // ClusterVersion `version`, as recorded on a 4.15 cluster asking for 4.16.3.
    const review = JSON.parse(await readFile(join(ROOT, 'test', 'fixtures', 'admission', 'update-to-4.16.3-conditional.json'), 'utf8')) as { request: { object: K8s } };
    const recorded = review.request.object;
    const cv = { apiVersion: 'config.openshift.io/v1', kind: 'ClusterVersion', metadata: { name: 'version' }, spec: recorded['spec'] };
    const cvDry = await kube.kubectl(['create', '--dry-run=server', '-o', 'json', '-f', '-'], { input: JSON.stringify(cv) });
    ok(cvDry, 'ClusterVersion version: server dry run of the create');
    if (cvDry.code === 0) t.same(json(cvDry)['spec'], cv.spec, 'spec kept whole (clusterID, channel, desiredUpdate)');
    ok(await kube.kubectl(['create', '-f', '-'], { input: JSON.stringify(cv) }), 'created (a status write needs the object)');
    const cvStatus = await kube.kubectl(
      ['patch', 'clusterversion', 'version', '--subresource=status', '--type=merge', '--dry-run=server', '-o', 'json', '-p', JSON.stringify({ status: recorded['status'] })],
    );
    ok(cvStatus, 'its recorded status: server dry run through the status subresource');
    if (cvStatus.code === 0) t.same(json(cvStatus)['status'], recorded['status'], 'status kept whole (desired, history, availableUpdates, conditionalUpdates, conditions, ...)');

    // ClusterOperator kmm-preflight, as the server creates it and then writes its status.
    const co = { apiVersion: 'config.openshift.io/v1', kind: 'ClusterOperator', metadata: { name: 'kmm-preflight' }, spec: {} };
    ok(await kube.kubectl(['create', '--dry-run=server', '-f', '-'], { input: JSON.stringify(co) }), 'ClusterOperator kmm-preflight: server dry run of the create');
    ok(await kube.kubectl(['create', '-f', '-'], { input: JSON.stringify(co) }), 'created');
    const since = '2024-07-18T06:40:03Z';
    const coStatus = {
      conditions: [
        { type: 'Available', status: 'True', reason: 'AsExpected', message: 'serving', lastTransitionTime: since },
        { type: 'Progressing', status: 'False', reason: 'AsExpected', lastTransitionTime: since },
        { type: 'Degraded', status: 'False', reason: 'AsExpected', lastTransitionTime: since },
        { type: 'Upgradeable', status: 'False', reason: 'ModulesNotVerified', message: 'PreflightValidationOCP upgrade-4-16-3: 1 of 3 Modules not verified', lastTransitionTime: since },
      ],
      versions: [{ name: 'operator', version: '0.1.0' }],
      relatedObjects: [
        { group: '', resource: 'namespaces', name: 'kmm-preflight' },
        { group: 'kmm.sigs.x-k8s.io', resource: 'preflightvalidationsocp', name: 'upgrade-4-16-3' },
      ],
      extension: { lastVerdict: { release: '4.16.3', failed: ['ns-a/module-a'] } },
    };
    const coWrite = ['patch', 'clusteroperator', 'kmm-preflight', '--subresource=status', '--type=merge', '-o', 'json', '-p', JSON.stringify({ status: coStatus })];
    const coDry = await kube.kubectl([...coWrite, '--dry-run=server']);
    ok(coDry, 'its status: server dry run through the status subresource');
    if (coDry.code === 0) t.same(json(coDry)['status'], coStatus, 'status kept whole (conditions, versions, relatedObjects, extension)');
    ok(await kube.kubectl(coWrite), 'written for real');
    const table = await kube.kubectl(['get', 'co', 'kmm-preflight']);
    ok(table, 'kubectl get co (the short name)');
    const [header, row] = table.stdout.trim().split('\n').map((l) => l.trim().split(/\s+/));
    t.same(header, ['NAME', 'VERSION', 'AVAILABLE', 'PROGRESSING', 'DEGRADED', 'SINCE'], "OpenShift's columns");
    t.same(row?.slice(0, 5), ['kmm-preflight', '0.1.0', 'True', 'False', 'False'], 'filled from the status');

    // The schemas do check: a missing required field, a value outside an enum, a wrong type.
    const noClusterID = await kube.kubectl(['create', '--dry-run=server', '-f', '-'], { input: JSON.stringify({ ...cv, spec: { channel: 'stable-4.16' } }) });
    t.not(noClusterID.code, 0, 'a ClusterVersion without spec.clusterID is refused');
    t.match(noClusterID.stderr, /clusterID/, 'naming the field');
    const badArch = await kube.kubectl(['create', '--dry-run=server', '-f', '-'], {
      input: JSON.stringify({ ...cv, spec: { ...cv.spec, desiredUpdate: { version: '4.16.3', architecture: 'Bogus' } } }),
    });
    t.not(badArch.code, 0, 'desiredUpdate.architecture outside its enum is refused');
    t.match(badArch.stderr, /architecture/, 'naming the field');
    const badVersions = await kube.kubectl(['patch', 'clusteroperator', 'kmm-preflight', '--subresource=status', '--type=merge', '--dry-run=server', '-p', '{"status":{"versions":"0.1.0"}}']);
    t.not(badVersions.code, 0, 'a ClusterOperator status.versions that is not a list is refused');
    t.match(badVersions.stderr, /versions/, 'naming the field');
  });

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
